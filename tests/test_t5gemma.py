"""T5Gemma against Hugging Face `T5GemmaForConditionalGeneration` (PyTorch, CPU) on random tiny models:
encoder and decoder of unequal sizes, grouped-query attention, local (window 3) and global layers,
attention and output soft caps on."""

import copy
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from t5x_lite import decoding, hf
from t5x_lite.networks import t5gemma
from t5x_lite.networks.t5gemma import T5Gemma, T5GemmaConfig
from t5x_lite.nn import attention, kernels, layers
from tests.hf.conftest import random_inputs

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 96
SHARED = {"vocab_size": VOCAB, "sliding_window": 3, "query_pre_attn_scalar": 16, "attn_logit_softcapping": 5.0,
          "final_logit_softcapping": 10.0, "hidden_activation": "gelu_pytorch_tanh", "pad_token_id": 0,
          "eos_token_id": 1, "bos_token_id": 0}
ENCODER = {**SHARED, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 3, "num_attention_heads": 4,
           "num_key_value_heads": 2, "head_dim": 8}
DECODER = {**SHARED, "hidden_size": 24, "intermediate_size": 40, "num_hidden_layers": 4, "num_attention_heads": 6,
           "num_key_value_heads": 2, "head_dim": 12}


def random_hf_t5gemma(tied: bool):
    """A random tiny HF T5Gemma; norm weights random too (HF inits them to 0, i.e. scale 1)."""
    torch.set_num_threads(2)
    torch.manual_seed(0)
    config = transformers.T5GemmaConfig(encoder=ENCODER, decoder=DECODER, vocab_size=VOCAB, tie_word_embeddings=tied,
                                        decoder_start_token_id=0, attn_implementation="eager")
    model = transformers.T5GemmaForConditionalGeneration(config).eval()
    with torch.no_grad():
        for _, param in model.named_parameters():
            param.normal_(0.0, 0.1)
        if not tied:  # transformers ties the head in the module; give it its own weights
            model.lm_head.out_proj.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.out_proj.weight) * 0.1)
    return model


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """"tied" / "untied" -> (HF model, its save_pretrained directory)."""
    out = {}
    for name in ("tied", "untied"):
        model, folder = random_hf_t5gemma(name == "tied"), tmp_path_factory.mktemp(f"t5gemma_{name}")
        model.save_pretrained(folder)
        out[name] = (model, folder)
    return out


def hf_logits(model, enc: np.ndarray, dec: np.ndarray) -> np.ndarray:
    """HF's logits; the decoder mask is explicit, as HF's default hides the start id 0 (= pad)."""
    with torch.no_grad():
        return model(input_ids=torch.tensor(enc, dtype=torch.long), attention_mask=torch.tensor(enc > 0).long(),
                     decoder_input_ids=torch.tensor(dec, dtype=torch.long),
                     decoder_attention_mask=torch.ones(dec.shape, dtype=torch.long)).logits.numpy()


def our_logits(network, enc, dec) -> np.ndarray:
    return np.asarray(network(jnp.asarray(enc), jnp.asarray(dec)))


@pytest.mark.parametrize("variant,kernels", [("tied", "cpu_tuned"), ("untied", "xla")])
def test_imported_logits_match_hf(hf_dirs, variant, kernels):
    model, folder = hf_dirs[variant]
    network, _ = hf.from_pretrained(folder, kernels=kernels)
    config = network.config
    assert (config.encoder_d_model, config.decoder_d_model, config.decoder_num_kv_heads) == (32, 24, 2)
    assert config.tie_word_embeddings == (variant == "tied") and config.sliding_window == 3
    enc, dec = random_inputs(VOCAB)
    expected = hf_logits(model, enc, dec)
    max_abs_diff = float(np.abs(our_logits(network, enc, dec) - expected).max())
    print(f"{variant}: max |logits - HF| = {max_abs_diff:.2e} (max |logit| {np.abs(expected).max():.1f})")
    assert max_abs_diff < 1e-4


def packed(*lengths: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Segment ids (1, 2, ...) and in-segment positions of one row packing segments of these lengths."""
    segments = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)])[None]
    return jnp.asarray(segments), jnp.asarray(np.concatenate([np.arange(n) for n in lengths])[None])


def test_scan_and_packing_keep_the_logits(hf_dirs):
    _, folder = hf_dirs["tied"]
    network, _ = hf.from_pretrained(folder)
    enc, dec = random_inputs(VOCAB)
    expected = our_logits(network, enc, dec)
    scanned, _ = hf.from_pretrained(folder, scan_layers=True)
    np.testing.assert_allclose(our_logits(scanned, enc, dec), expected, atol=1e-5)
    # Rows 0 (7 encoder tokens) and 2 (4) packed into one row: positions restart, segments stay apart.
    length = dec.shape[1]
    (enc_segments, enc_positions), (dec_segments, dec_positions) = packed(7, 4), packed(length, length)
    logits = network(
        jnp.asarray(np.concatenate([enc[0, :7], enc[2, :4]])[None]), jnp.asarray(np.concatenate([dec[0], dec[2]])[None]),
        enc_segments, dec_segments, enc_positions, dec_positions,
    )
    np.testing.assert_allclose(np.asarray(logits[0, :length]), expected[0], atol=1e-5)
    np.testing.assert_allclose(np.asarray(logits[0, length:]), expected[2], atol=1e-5)


@pytest.mark.parametrize("scan", [False, True])
def test_greedy_decode_matches_hf_generate(hf_dirs, scan, tmp_path):
    model = copy.deepcopy(hf_dirs["tied"][0])
    with torch.no_grad():  # EOS takes the output row of a token that row 1 emits second: it stops early, the
        embeddings = model.model.decoder.embed_tokens.weight  # others do not; padding after EOS is compared too
        embeddings[1] = embeddings[27] * 1.05
    model.save_pretrained(tmp_path)
    length = 8
    enc, _ = random_inputs(VOCAB, seed=3)
    with torch.no_grad():
        generated = model.generate(
            input_ids=torch.tensor(enc, dtype=torch.long), attention_mask=torch.tensor(enc > 0, dtype=torch.long),
            do_sample=False, num_beams=1, max_new_tokens=length, decoder_start_token_id=0, eos_token_id=1,
            pad_token_id=0,
        ).numpy()[:, 1:]  # drop the decoder start token
    expected = np.zeros((enc.shape[0], length), np.int32)
    expected[:, : generated.shape[1]] = generated
    stopped = [row for row in expected if 1 in row.tolist()]
    assert 0 < len(stopped) < len(expected) and any(row.tolist().index(1) > 0 for row in stopped)
    network, _ = hf.from_pretrained(tmp_path, scan_layers=scan)
    ours = hf.load_model(tmp_path, scan_layers=scan)
    predict = nnx.jit(lambda m, e: ours.predict_batch(m, {"encoder_input_tokens": e}, max_decode_length=length))
    np.testing.assert_array_equal(np.asarray(predict(network, jnp.asarray(enc))), expected)


def test_export_reloads_in_transformers_with_the_same_logits(hf_dirs, tmp_path):
    model, folder = hf_dirs["untied"]
    network, _ = hf.from_pretrained(folder)
    hf.save_pretrained(network, tmp_path / "exported")
    reloaded = type(model).from_pretrained(tmp_path / "exported", attn_implementation="eager").eval()
    enc, dec = random_inputs(VOCAB, seed=1)
    np.testing.assert_allclose(hf_logits(reloaded, enc, dec), hf_logits(model, enc, dec), atol=1e-5)
    again, _ = hf.from_pretrained(tmp_path / "exported")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
                 nnx.state(again, nnx.Param), nnx.state(network, nnx.Param))


def test_bfloat16_remat_gradient_is_finite():
    config = T5GemmaConfig(vocab_size=64, encoder_d_model=32, encoder_num_layers=2, encoder_num_heads=4,
                           encoder_num_kv_heads=1, encoder_head_dim=8, encoder_d_ff=48, decoder_d_model=16,
                           decoder_num_layers=2, decoder_num_heads=2, decoder_num_kv_heads=1, decoder_head_dim=8,
                           decoder_d_ff=32, sliding_window=2, dtype="bfloat16", scan_layers=True, remat_policy="full",
                           dropout_rate=0.1)
    network = T5Gemma(config, rngs=nnx.Rngs(0))
    enc, dec = random_inputs(64)

    def loss(network):
        logits = network(jnp.asarray(enc), jnp.asarray(dec), dropout_rngs=nnx.Rngs(dropout=1))
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1))

    value, grads = nnx.jit(nnx.value_and_grad(loss))(network)
    assert np.isfinite(float(value))
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="decoder_num_heads=6 must be a multiple of decoder_num_kv_heads=4"):
        T5GemmaConfig(decoder_num_heads=6, decoder_num_kv_heads=4)
    with pytest.raises(ValueError, match=r"T5GemmaConfig.encoder_d_ff=0 must be a positive integer"):
        T5GemmaConfig(encoder_d_ff=0)
    assert dataclasses.replace(T5GemmaConfig(), sliding_window=None).windows(3) == (2**30,) * 3


def test_fused_attention_path_equals_einsum():
    """Without a soft cap the fused `jax.nn.dot_product_attention` runs (on GPU under "auto"; "xla" forces it
    here): the same outputs as the einsum form, grouped-query heads and a window mask included."""
    ops = kernels.resolve("xla")

    def gqa(implementation: str) -> attention.GroupedQueryAttention:
        return attention.GroupedQueryAttention(32, 4, 2, 8, kernels=ops, query_scale=0.25, rope_theta=10000.0,
                                               implementation=implementation, rngs=nnx.Rngs(0))

    x = jax.random.normal(jax.random.key(1), (2, 6, 32))
    positions = jnp.arange(6)[None]
    mask = layers.causal_mask(6) & layers.sliding_window_mask(positions, positions, 3, causal=True)
    fused, einsum = gqa("xla"), gqa("einsum")
    assert fused.implementation == "xla"
    expected = einsum(x, x, mask, q_positions=positions, kv_positions=positions)
    np.testing.assert_allclose(fused(x, x, mask, q_positions=positions, kv_positions=positions), expected, atol=1e-5)



RING = T5GemmaConfig(vocab_size=64, encoder_d_model=32, encoder_num_layers=2, encoder_num_heads=4,
                     encoder_num_kv_heads=2, encoder_head_dim=8, encoder_d_ff=48, decoder_d_model=24,
                     decoder_num_layers=3, decoder_num_heads=4, decoder_num_kv_heads=2, decoder_head_dim=6,
                     decoder_d_ff=40, sliding_window=3, query_pre_attn_scalar=16, attn_logit_softcapping=5.0,
                     final_logit_softcapping=10.0)


def cached_logits(network: T5Gemma, enc: np.ndarray, dec: np.ndarray):
    """Teacher-forced decode steps over `dec` [b, t] with a cache of t slots: ([b, t, vocab] logits, last state)."""

    @nnx.jit
    def run(network, enc, dec):
        state = network.init_decode_state(network.encode(enc), enc > 0, dec.shape[1])

        def step(state, token_ids):
            logits, state = network.decode_step(state, token_ids)
            return state, logits

        state, logits = jax.lax.scan(step, state, dec.T)
        return jnp.swapaxes(logits, 0, 1), state

    return run(network, jnp.asarray(enc), jnp.asarray(dec))


@pytest.mark.parametrize("scan", [False, True])
def test_ring_buffer_decode_equals_the_forward_pass(scan):
    """Local layers (0 and 2 of 3: the trailing local layer runs after the scanned pairs) keep a window of 3
    slots while 9 positions decode; every step's logits equal the full forward pass's."""
    network = T5Gemma(dataclasses.replace(RING, scan_layers=scan), rngs=nnx.Rngs(0))
    enc, dec = random_inputs(RING.vocab_size)
    logits, state = cached_logits(network, enc, dec)
    np.testing.assert_allclose(logits, our_logits(network, enc, dec), atol=1e-5)
    cache, (b, kv, d) = state.cache, (3, RING.decoder_num_kv_heads, RING.decoder_head_dim)
    local, full = ((b, 2, kv, 3, d), (b, 1, kv, 9, d)) if scan else ((b, kv, 3, d), (b, kv, 9, d))
    assert isinstance(cache, t5gemma.WindowedCache)
    assert [leaf.shape for leaf in jax.tree.leaves(cache.local)] == [local] * (2 if scan else 4)
    assert [leaf.shape for leaf in jax.tree.leaves(cache.full)] == [full] * 2


def test_beam_search_gathers_the_ring_buffers():
    """Beam search repeats and gathers every cache leaf row-wise: each beam's score (alpha 0) is the
    forward pass's log-likelihood of its tokens, decoded 6 positions past a 3-slot local cache."""
    network = T5Gemma(dataclasses.replace(RING, scan_layers=True), rngs=nnx.Rngs(1))
    enc, _ = random_inputs(RING.vocab_size)
    beam, length = 3, 6

    @nnx.jit
    def search(network, enc):
        state = network.init_decode_state(network.encode(enc), enc > 0, length)
        return decoding.beam_search(network.decode_step, state, enc.shape[0], beam, length, alpha=0.0)

    beams, scores = search(network, jnp.asarray(enc))
    tokens = np.asarray(beams).reshape(-1, length)
    inputs = np.pad(tokens, ((0, 0), (1, 0)))[:, :-1]
    log_probs = jax.nn.log_softmax(our_logits(network, np.repeat(enc, beam, axis=0), inputs))
    per_token = np.take_along_axis(np.asarray(log_probs), tokens[..., None], -1)[..., 0]
    ends = [list(row).index(1) + 1 if 1 in row else length for row in tokens.tolist()]
    expected = [row[:end].sum() for row, end in zip(per_token, ends)]
    np.testing.assert_allclose(np.asarray(scores).reshape(-1), expected, atol=1e-4)


def test_decode_cache_layouts_without_a_window_or_with_a_wide_one():
    """sliding_window=None: one cache of every layer; a window wider than the decode: local layers keep the
    decode length (a ring of that length is a plain cache)."""
    encoded, mask = jax.ShapeDtypeStruct((2, 5, 32), jnp.float32), jax.ShapeDtypeStruct((2, 5), jnp.bool_)

    def cache(**changes):
        config = dataclasses.replace(RING, scan_layers=True, **changes)
        graphdef, params = nnx.split(nnx.eval_shape(lambda: T5Gemma(config, rngs=nnx.Rngs(0))))
        return jax.eval_shape(lambda p, e, m: nnx.merge(graphdef, p).init_decode_state(e, m, 7),
                              params, encoded, mask).cache

    assert cache(sliding_window=None).key.shape == (2, 3, 2, 7, 6)
    wide = cache(sliding_window=100)
    assert (wide.local.key.shape, wide.full.key.shape) == ((2, 2, 2, 7, 6), (2, 1, 2, 7, 6))
