"""Random tiny Hugging Face T5 models saved to temporary directories (no download), and the inputs and
logits of encoder-decoder parity checks."""

from collections.abc import Callable

import numpy as np
import pytest

TINY = {
    "vocab_size": 96, "d_model": 32, "d_kv": 8, "num_heads": 4, "d_ff": 48, "num_layers": 2, "num_decoder_layers": 3,
    "dropout_rate": 0.0,
}

# name -> (model class, feed_forward_proj, tie_word_embeddings, give lm_head its own weights)
VARIANTS = {
    "t5_v1_0": ("T5ForConditionalGeneration", "relu", True, False),
    "t5_v1_1": ("T5ForConditionalGeneration", "gated-gelu", False, True),
    "mt5": ("MT5ForConditionalGeneration", "gated-gelu", False, True),
    # transformers 5 with tie_word_embeddings=False but no own lm_head: unscaled, head == embedding.
    "t5_unscaled_shared_head": ("T5ForConditionalGeneration", "gated-gelu", False, False),
}


def random_hf_t5(variant: str):
    """A random tiny HF model of `variant`, norms randomised too (HF inits them to 1)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.set_num_threads(2)
    class_name, proj, tied, own_head = VARIANTS[variant]
    torch.manual_seed(0)
    config_class = transformers.MT5Config if class_name.startswith("MT5") else transformers.T5Config
    config = config_class(**TINY, feed_forward_proj=proj, tie_word_embeddings=tied)
    model = getattr(transformers, class_name)(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layer_norm" in name:
                param.uniform_(0.5, 1.5)
        if own_head:  # transformers 5 ties lm_head to `shared` in the module; give it its own weights
            model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight) * TINY["d_model"] ** -0.5)
    return model


@pytest.fixture(scope="session")
def hf_t5_dirs(tmp_path_factory):
    """variant -> (HF model, its save_pretrained directory)."""
    out = {}
    for variant in VARIANTS:
        model = random_hf_t5(variant)
        folder = tmp_path_factory.mktemp(variant)
        model.save_pretrained(folder)
        out[variant] = (model, folder)
    return out


def randomised(model, norm_scale: Callable[[str], bool]):
    """`model` with every parameter random: norm scales (the names `norm_scale` accepts) in [0.5, 1.5],
    the rest normal(0, 0.2); HF's zero biases and unit scales would hide a wrong mapping."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            param.uniform_(0.5, 1.5) if norm_scale(name) else param.normal_(0.0, 0.2)
    return model


def random_inputs(vocab_size: int, seed: int = 0, first_id: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Encoder ids in [first_id, vocab_size) with padding (0) in two rows, and decoder ids starting with 0
    (BOS, t5x_lite's decoder start)."""
    rng = np.random.default_rng(seed)
    enc = rng.integers(first_id, vocab_size, (3, 11)).astype(np.int32)
    enc[0, 7:] = 0
    enc[2, 4:] = 0
    dec = rng.integers(first_id, vocab_size, (3, 9)).astype(np.int32)
    dec[:, 0] = 0
    return enc, dec


def hf_logits(model, enc: np.ndarray, dec: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(
            input_ids=torch.tensor(enc, dtype=torch.long),
            attention_mask=torch.tensor(enc > 0, dtype=torch.long),
            decoder_input_ids=torch.tensor(dec, dtype=torch.long),
        ).logits.numpy()
