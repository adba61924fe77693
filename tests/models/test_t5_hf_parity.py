"""Numerical parity of our T5 with Hugging Face `transformers` T5 (PyTorch, CPU) on random tiny configs."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from t5x_lite.models import layers  # noqa: E402
from t5x_lite.models.encoder_decoder import T5, T5Config  # noqa: E402

torch.set_num_threads(2)

HF_TINY = dict(
    vocab_size=512, d_model=64, d_kv=16, num_heads=4, d_ff=128, num_layers=2, num_decoder_layers=2, dropout_rate=0.0
)


def copy_hf_weights(hf: "transformers.T5ForConditionalGeneration", model: T5) -> None:
    """Copies HF torch weights into our model. torch Linear weights are [out, in]; our kernels are [in, out]
    with q/k/v split as [embed, heads, kv] and o as [heads, kv, embed]."""
    sd = {name: value.detach().numpy() for name, value in hf.state_dict().items()}
    heads, head_dim = model.config.num_heads, model.config.head_dim

    def put(param: nnx.Param, value: np.ndarray) -> None:
        assert param.shape == value.shape, (param.shape, value.shape)
        param.set_value(jnp.asarray(value))

    def put_attention(attention: layers.MultiHeadAttention, prefix: str) -> None:
        for ours, theirs in ((attention.query, "q"), (attention.key, "k"), (attention.value, "v")):
            put(ours.kernel, sd[f"{prefix}.{theirs}.weight"].T.reshape(-1, heads, head_dim))
        put(attention.out.kernel, sd[f"{prefix}.o.weight"].T.reshape(heads, head_dim, -1))

    def put_mlp(mlp: layers.MlpBlock, prefix: str) -> None:
        names = ("wi_0", "wi_1", "wo") if model.config.feed_forward == "gated-gelu" else ("wi", "wo")
        for name in names:
            put(getattr(mlp, name).kernel, sd[f"{prefix}.{name}.weight"].T)

    put(model.token_embedder.embedding, sd["shared.weight"])
    if model.logits_dense is not None:
        put(model.logits_dense.kernel, sd["lm_head.weight"].T)
    for stack, name in ((model.encoder, "encoder"), (model.decoder, "decoder")):
        bias = sd[f"{name}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]  # [buckets, heads]
        put(stack.relpos_bias.rel_embedding, bias.T)
    put(model.encoder.encoder_norm.scale, sd["encoder.final_layer_norm.weight"])
    put(model.decoder.decoder_norm.scale, sd["decoder.final_layer_norm.weight"])
    for i, layer in enumerate(model.encoder.layers):
        p = f"encoder.block.{i}.layer"
        put_attention(layer.attention, f"{p}.0.SelfAttention")
        put(layer.pre_attention_layer_norm.scale, sd[f"{p}.0.layer_norm.weight"])
        put_mlp(layer.mlp, f"{p}.1.DenseReluDense")
        put(layer.pre_mlp_layer_norm.scale, sd[f"{p}.1.layer_norm.weight"])
    for i, layer in enumerate(model.decoder.layers):
        p = f"decoder.block.{i}.layer"
        put_attention(layer.self_attention, f"{p}.0.SelfAttention")
        put(layer.pre_self_attention_layer_norm.scale, sd[f"{p}.0.layer_norm.weight"])
        put_attention(layer.encoder_decoder_attention, f"{p}.1.EncDecAttention")
        put(layer.pre_cross_attention_layer_norm.scale, sd[f"{p}.1.layer_norm.weight"])
        put_mlp(layer.mlp, f"{p}.2.DenseReluDense")
        put(layer.pre_mlp_layer_norm.scale, sd[f"{p}.2.layer_norm.weight"])


def random_hf_model(feed_forward: str, tied: bool) -> "transformers.T5ForConditionalGeneration":
    torch.manual_seed(0)
    config = transformers.T5Config(**HF_TINY, feed_forward_proj=feed_forward, tie_word_embeddings=tied)
    hf = transformers.T5ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if "layer_norm" in name:  # HF inits norms to 1: randomise so the mapping is checked
                param.uniform_(0.5, 1.5)
        if not tied:  # transformers 5 always ties lm_head to `shared`; give it its own weights
            hf.lm_head.weight = torch.nn.Parameter(torch.randn_like(hf.lm_head.weight) * HF_TINY["d_model"] ** -0.5)
    return hf


@pytest.mark.parametrize("feed_forward,tied", [("gated-gelu", False), ("relu", True)])
def test_logits_match_hf(feed_forward, tied):
    hf = random_hf_model(feed_forward, tied)
    config = T5Config(
        vocab_size=HF_TINY["vocab_size"], d_model=HF_TINY["d_model"], num_heads=HF_TINY["num_heads"],
        head_dim=HF_TINY["d_kv"], d_ff=HF_TINY["d_ff"], num_encoder_layers=2, num_decoder_layers=2,
        feed_forward=feed_forward, tie_word_embeddings=tied,
    )
    model = T5(config, rngs=nnx.Rngs(0))
    copy_hf_weights(hf, model)

    rng = np.random.default_rng(0)
    enc = rng.integers(1, config.vocab_size, (3, 11))
    enc[0, 7:] = 0  # padding
    enc[2, 4:] = 0
    dec = rng.integers(1, config.vocab_size, (3, 9))
    dec[:, 0] = 0  # decoder starts with BOS = pad id
    with torch.no_grad():
        expected = hf(
            input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc > 0), decoder_input_ids=torch.tensor(dec)
        ).logits.numpy()
    logits = np.asarray(nnx.jit(lambda m, e, d: m(e, d))(model, jnp.asarray(enc), jnp.asarray(dec)))
    max_abs_diff = float(np.abs(logits - expected).max())
    print(f"{feed_forward} tied={tied}: max |logits - HF| = {max_abs_diff:.2e} (max |logit| {np.abs(expected).max():.1f})")
    assert max_abs_diff < 1e-4


def test_relative_position_bucket_matches_hf():
    relative = np.arange(-600, 600)
    for bidirectional in (True, False):
        for num_buckets, max_distance in ((32, 128), (8, 20), (64, 256)):
            expected = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
                torch.tensor(relative), bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
            ).numpy()
            ours = layers.relative_position_bucket(
                relative, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
            )
            np.testing.assert_array_equal(ours, expected)
