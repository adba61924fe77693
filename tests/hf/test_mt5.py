"""UL2's gated SiLU, mT5 and umT5 (per-layer relative position tables) against Hugging Face `transformers`
(PyTorch, CPU) on random tiny models: import and export, logits and greedy decoding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from t5x_lite import hf
from tests.hf.conftest import TINY, hf_logits, random_inputs, randomised

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# model_type -> (config class, model class, vocabulary, feed_forward_proj); mT5 with its real vocabulary so
# that export names it mt5 (d_model 16 keeps the 250,112-row tables small).
KINDS = {
    "ul2": ("T5Config", "T5ForConditionalGeneration", TINY["vocab_size"], "gated-silu"),
    "mt5": ("MT5Config", "MT5ForConditionalGeneration", 250112, "gated-gelu"),
    "umt5": ("UMT5Config", "UMT5ForConditionalGeneration", TINY["vocab_size"], "gated-gelu"),
}


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """kind -> (random tiny HF model with its own output layer, its save_pretrained directory)."""
    torch.set_num_threads(2)
    out = {}
    for kind, (config_class, model_class, vocab, proj) in KINDS.items():
        torch.manual_seed(0)
        sizes = {**TINY, "vocab_size": vocab, **({"d_model": 16, "d_ff": 24} if kind == "mt5" else {})}
        config = getattr(transformers, config_class)(**sizes, feed_forward_proj=proj, tie_word_embeddings=False)
        model = randomised(getattr(transformers, model_class)(config).eval(), lambda name: "layer_norm" in name)
        with torch.no_grad():
            model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight) * 0.2)
        folder = tmp_path_factory.mktemp(kind)
        model.save_pretrained(folder)
        out[kind] = (model, folder)
    return out


def our_logits(network, enc, dec) -> np.ndarray:
    return np.asarray(network(jnp.asarray(enc), jnp.asarray(dec)))


@pytest.mark.parametrize("kind", list(KINDS))
def test_imported_logits_match_hf(hf_dirs, kind):
    model, folder = hf_dirs[kind]
    network, _ = hf.from_pretrained(folder)
    assert network.config.feed_forward == KINDS[kind][3]
    assert network.config.relative_bias_per_layer == (kind == "umt5")
    enc, dec = random_inputs(KINDS[kind][2])
    expected = hf_logits(model, enc, dec)
    max_abs_diff = float(np.abs(our_logits(network, enc, dec) - expected).max())
    print(f"{kind}: max |logits - HF| = {max_abs_diff:.2e} (max |logit| {np.abs(expected).max():.1f})")
    assert max_abs_diff < 1e-4


@pytest.mark.parametrize("kind", list(KINDS))
def test_export_reloads_in_transformers_with_the_same_logits(hf_dirs, kind, tmp_path):
    model, folder = hf_dirs[kind]
    network, _ = hf.from_pretrained(folder)
    hf.save_pretrained(network, tmp_path)
    reloaded = getattr(transformers, KINDS[kind][1]).from_pretrained(tmp_path).eval()
    assert reloaded.config.model_type == {"ul2": "t5"}.get(kind, kind)
    enc, dec = random_inputs(KINDS[kind][2], seed=1)
    np.testing.assert_allclose(hf_logits(reloaded, enc, dec), hf_logits(model, enc, dec), rtol=0, atol=1e-4)
    again, _ = hf.from_pretrained(tmp_path)  # ...and back: the same network
    assert again.config == network.config
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=0),
                 nnx.state(again, nnx.Param), nnx.state(network, nnx.Param))


def test_umt5_cached_decode_steps_match_hf_logits(hf_dirs):
    """Each decode step adds every layer's own table at the query position: step t's logits equal HF's
    teacher-forced logits at t, unrolled and scanned."""
    model, folder = hf_dirs["umt5"]
    enc, dec = random_inputs(TINY["vocab_size"], seed=3)
    expected = hf_logits(model, enc, dec)
    for scan_layers in (False, True):
        network, _ = hf.from_pretrained(folder, scan_layers=scan_layers)
        state = network.init_decode_state(network.encode(jnp.asarray(enc)), jnp.asarray(enc > 0), dec.shape[1])
        step = nnx.jit(lambda network, state, ids: network.decode_step(state, ids))
        for t in range(dec.shape[1]):
            logits, state = step(network, state, jnp.asarray(dec[:, t]))
            np.testing.assert_allclose(np.asarray(logits), expected[:, t], rtol=0, atol=1e-4, err_msg=f"step {t}")
