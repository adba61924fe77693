"""Every model gin file builds the architecture it names: its parameter count equals Hugging Face's for the
same (published) sizes, or differs by exactly what this code does differently on purpose.

Ours are counted on abstract arrays (`nnx.eval_shape`), HF's on the meta device: nothing is allocated.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gin
import jax
import pytest
from flax import nnx

from t5x_lite import cli

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@gin.configurable("test_gin_configs_model")
def model_from_gin(model: Any = gin.REQUIRED) -> Any:
    return model


def t5(d_model: int, d_ff: int, heads: int, layers: int, v1_1: bool, vocab: int = 32128, d_kv: int = 64,
       proj: str = "gated-gelu") -> tuple:
    """HF T5 at these sizes. transformers 5 always ties T5's output layer to `shared` (T5Config forces
    tie_word_embeddings=True); v1.1 (and UL2, `proj` gated-silu) has its own output layer, as the published
    checkpoints do: + vocab x d_model."""
    config = transformers.T5Config(vocab_size=vocab, d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_layers=layers,
                                   num_heads=heads, feed_forward_proj=proj if v1_1 else "relu")
    return transformers.T5ForConditionalGeneration, config, vocab * d_model if v1_1 else 0


def bert(d_model: int, d_ff: int, heads: int, layers: int, vocab: int = 30522) -> tuple:
    """HF BertForMaskedLM (MLM head, no pooler), as ours."""
    config = transformers.BertConfig(vocab_size=vocab, hidden_size=d_model, intermediate_size=d_ff,
                                     num_attention_heads=heads, num_hidden_layers=layers)
    return transformers.BertForMaskedLM, config, 0


def deberta_v3(d_model: int, d_ff: int, heads: int, layers: int, vocab: int = 128100) -> tuple:
    """HF DebertaV2ForMaskedLM (legacy MLM head, tied decoder) in DeBERTa-v3's layout, as ours."""
    config = transformers.DebertaV2Config(
        vocab_size=vocab, hidden_size=d_model, intermediate_size=d_ff, num_attention_heads=heads,
        num_hidden_layers=layers, relative_attention=True, position_buckets=256, norm_rel_ebd="layer_norm",
        share_att_key=True, pos_att_type="p2c|c2p", position_biased_input=False, type_vocab_size=0)
    return transformers.DebertaV2ForMaskedLM, config, 0


def gpt2(d_model: int, heads: int, layers: int, ours_vocab: int, positions: int = 1024, vocab: int = 50257) -> tuple:
    """HF GPT2LMHeadModel; our vocabulary is padded to a multiple of 128 (50257 -> 50304): + the extra rows."""
    config = transformers.GPT2Config(vocab_size=vocab, n_positions=positions, n_embd=d_model, n_layer=layers,
                                     n_head=heads)
    return transformers.GPT2LMHeadModel, config, (ours_vocab - vocab) * d_model


def bart(d_model: int, d_ff: int, heads: int, layers: int, ours_vocab: int, positions: int = 1024,
         vocab: int = 50265) -> tuple:
    """HF BartForConditionalGeneration. Ours: the vocabulary padded to a multiple of 128 (50265 -> 50304), the
    output bias a parameter (HF's `final_logits_bias` is a buffer): + the extra rows + ours_vocab; HF's learned
    positions keep 2 offset rows in each of the two stacks: - 4 x d_model."""
    config = transformers.BartConfig(vocab_size=vocab, d_model=d_model, encoder_layers=layers, decoder_layers=layers,
                                     encoder_attention_heads=heads, decoder_attention_heads=heads,
                                     encoder_ffn_dim=d_ff, decoder_ffn_dim=d_ff, max_position_embeddings=positions)
    return transformers.BartForConditionalGeneration, config, (ours_vocab - vocab) * d_model + ours_vocab - 4 * d_model


def t5gemma(encoder: tuple, decoder: tuple, vocab: int = 256000) -> tuple:
    """HF T5GemmaForConditionalGeneration with stacks of (d_model, d_ff, heads, kv heads, head_dim, layers);
    the output layer tied to the decoder embedding, as ours."""
    keys = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
            "num_hidden_layers")
    config = transformers.T5GemmaConfig(encoder=dict(zip(keys, encoder), vocab_size=vocab),
                                        decoder=dict(zip(keys, decoder), vocab_size=vocab), vocab_size=vocab)
    return transformers.T5GemmaForConditionalGeneration, config, 0


GEMMA_2B, GEMMA_9B = (2304, 9216, 8, 4, 256, 26), (3584, 14336, 16, 8, 256, 42)
# The T5-sized stacks: d_model, d_ff, depth and heads x head_dim give the published checkpoints' totals
# (T5GEMMA_PUBLISHED); how the attention width splits into heads the totals cannot tell (see docs/models.md).
T5GEMMA_SIZES = {"s": (512, 1024, 8, 8, 64, 8), "b": (768, 2048, 12, 12, 64, 12), "l": (1024, 2816, 16, 16, 64, 24),
                 "ml": (1152, 6912, 4, 4, 256, 26), "xl": (2048, 5120, 32, 32, 64, 24), "2b": GEMMA_2B, "9b": GEMMA_9B}
# gin file -> the parameter total of the published google/t5gemma-* checkpoints (their safetensors).
T5GEMMA_PUBLISHED = {"t5gemma/s_s.gin": 312_517_632, "t5gemma/b_b.gin": 591_490_560,
                     "t5gemma/ml_ml.gin": 2_200_345_344, "t5gemma/xl_xl.gin": 3_766_980_608,
                     "t5gemma/9b_2b.gin": 12_292_375_296, "t5gemma/9b_9b.gin": 20_333_401_088}


# gin file -> (HF class, HF config, our count minus HF's). Published sizes, except the tiny test models.
REFERENCES = {
    "t5_1_0/small.gin": lambda: t5(512, 2048, 8, 6, v1_1=False),
    "t5_1_0/base.gin": lambda: t5(768, 3072, 12, 12, v1_1=False),
    "t5_1_1/tiny.gin": lambda: t5(128, 256, 4, 2, v1_1=True, vocab=8192, d_kv=32),
    "t5_1_1/small.gin": lambda: t5(512, 1024, 6, 8, v1_1=True),
    "t5_1_1/base.gin": lambda: t5(768, 2048, 12, 12, v1_1=True),
    "t5_1_1/large.gin": lambda: t5(1024, 2816, 16, 24, v1_1=True),
    "t5_1_1/xl.gin": lambda: t5(2048, 5120, 32, 24, v1_1=True),
    "t5_1_1/xxl.gin": lambda: t5(4096, 10240, 64, 24, v1_1=True),
    **{f"flan_t5/{size}.gin": lambda size=size: REFERENCES[f"t5_1_1/{size}.gin"]()
       for size in ("small", "base", "large", "xl", "xxl")},
    "ul2/ul2_20b.gin": lambda: t5(4096, 16384, 16, 32, v1_1=True, d_kv=256, proj="gated-silu"),
    "ul2/flan_ul2.gin": lambda: t5(4096, 16384, 16, 32, v1_1=True, d_kv=256, proj="gated-silu"),
    "bert/tiny.gin": lambda: bert(128, 512, 4, 2, vocab=8192),
    "bert/base.gin": lambda: bert(768, 3072, 12, 12),
    "bert/large.gin": lambda: bert(1024, 4096, 16, 24),
    "deberta_v3/tiny.gin": lambda: deberta_v3(128, 512, 4, 2, vocab=8192),
    "deberta_v3/xsmall.gin": lambda: deberta_v3(384, 1536, 6, 12),
    "deberta_v3/small.gin": lambda: deberta_v3(768, 3072, 12, 6),
    "deberta_v3/base.gin": lambda: deberta_v3(768, 3072, 12, 12),
    "deberta_v3/large.gin": lambda: deberta_v3(1024, 4096, 16, 24),
    "gpt/tiny.gin": lambda: gpt2(128, 4, 2, ours_vocab=8192, positions=512, vocab=8192),
    "gpt/small.gin": lambda: gpt2(768, 12, 12, ours_vocab=50304),
    "gpt/medium.gin": lambda: gpt2(1024, 16, 24, ours_vocab=50304),
    "bart/tiny.gin": lambda: bart(128, 512, 4, 2, ours_vocab=8192, positions=512, vocab=8192),
    "bart/base.gin": lambda: bart(768, 3072, 12, 6, ours_vocab=50304),
    "bart/large.gin": lambda: bart(1024, 4096, 16, 12, ours_vocab=50304),
    **{f"t5gemma/{enc}_{dec}.gin": lambda enc=enc, dec=dec: t5gemma(T5GEMMA_SIZES[enc], T5GEMMA_SIZES[dec])
       for enc, dec in (("s", "s"), ("b", "b"), ("l", "l"), ("ml", "ml"), ("xl", "xl"), ("2b", "2b"), ("9b", "9b"),
                        ("9b", "2b"))},
    "t5gemma/tiny.gin": lambda: t5gemma((128, 256, 4, 2, 32, 2), (96, 192, 4, 2, 24, 2), vocab=8192),
}


def test_every_model_gin_file_has_a_reference():
    files = sorted(str(p.relative_to(cli.GIN_CONFIGS_DIR / "models")) for p in (cli.GIN_CONFIGS_DIR / "models").rglob("*.gin"))
    assert files == sorted(REFERENCES)


def our_param_count(gin_file: str) -> int:
    """The parameters of the model a run with `gin_file` builds (with the pre-training run's macros)."""
    gin.clear_config()
    try:
        cli.parse_gin(["runs/pretrain.gin", str(Path("models") / gin_file)], ["test_gin_configs_model.model = %MODEL"])
        model = model_from_gin()
    finally:
        gin.clear_config()
    network = nnx.eval_shape(lambda: model.build_network(nnx.Rngs(0)))
    return sum(x.size for x in jax.tree.leaves(nnx.state(network, nnx.Param)))


def hf_param_count(cls: type, config: Any) -> int:
    with torch.device("meta"):
        model = cls(config)
    return sum(p.numel() for p in model.parameters())  # tied weights once


@pytest.mark.parametrize("gin_file", sorted(REFERENCES))
def test_model_gin_file_matches_hugging_face(gin_file):
    cls, config, ours_minus_hf = REFERENCES[gin_file]()
    assert our_param_count(gin_file) == hf_param_count(cls, config) + ours_minus_hf


@pytest.mark.parametrize("gin_file", sorted(T5GEMMA_PUBLISHED))
def test_t5gemma_sizes_match_the_published_checkpoints(gin_file):
    assert hf_param_count(*REFERENCES[gin_file]()[:2]) == T5GEMMA_PUBLISHED[gin_file]


@pytest.mark.slow
def test_an_unknown_feed_forward_is_one_error_line(tmp_path):
    """The activations T5 has (UL2's gated SiLU among them) are named when gin builds MODEL; no run folder made."""
    from tests.test_cli import run_cli
    from tests.test_safety import QUICKSTART, assert_one_error

    result = run_cli(QUICKSTART, f"--gin.MODEL_DIR='{tmp_path / 'run'}'", "--gin.T5Config.feed_forward='swiglu'")
    assert_one_error(result, "T5Config.feed_forward='swiglu' is not supported; "
                             "use 'gated-gelu' (T5 v1.1), 'gated-silu' (UL2) or 'relu' (T5 v1.0).")
    assert not (tmp_path / "run").exists()
