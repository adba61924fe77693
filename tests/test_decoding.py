"""Tests for KV-cache decoding (`T5.decode_step`), the decoding algorithms and predict/score_batch."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from t5x_lite import decoding
from t5x_lite.models.seq2seq import EncoderDecoderModel
from t5x_lite.networks.t5 import T5Config

TINY = T5Config(vocab_size=64, d_model=32, num_heads=2, head_dim=8, d_ff=48, num_encoder_layers=1, num_decoder_layers=2)
EOS = 1
LENGTH = 8  # max decode length
EOS_BOOST = 2.0  # added to the EOS logit so random-weight models stop at varied steps


def make_model(config=TINY):
    model = EncoderDecoderModel(config)
    graphdef, state = nnx.split(model.build_network(nnx.Rngs(0)))
    return model, graphdef, state


@pytest.fixture(scope="module")
def tiny():
    return make_model()


def encoder_inputs(seed=1, shape=(4, 7)):
    """Random encoder tokens with padding: row r keeps 7 - r tokens (one row fully real)."""
    enc = jax.random.randint(jax.random.key(seed), shape, 2, TINY.vocab_size)
    return jnp.where(jnp.arange(shape[1])[None] < shape[1] - jnp.arange(shape[0])[:, None], enc, 0)


def boosted(step_fn, boost=EOS_BOOST):
    def step(state, token_ids):
        logits, state = step_fn(state, token_ids)
        return logits.at[:, EOS].add(boost), state

    return step


def shift_right(targets):
    return jnp.pad(targets, ((0, 0), (1, 0)))[:, :-1]


@functools.partial(jax.jit, static_argnums=(0,))
def teacher_forced_logits(graphdef, state, enc, dec_inputs):
    return nnx.merge(graphdef, state)(enc, dec_inputs)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def decode_with(graphdef, algorithm, boost, state, enc, *args):
    """Encodes once and runs `algorithm(step_fn, decode_state, batch, *args)` on the cached step."""
    net = nnx.merge(graphdef, state)
    decode_state = net.init_decode_state(net.encode(enc), enc > 0, LENGTH)
    return algorithm(boosted(net.decode_step, boost), decode_state, enc.shape[0], *args)


def greedy_fn(step_fn, state, batch):
    return decoding.greedy_decode(step_fn, state, batch, LENGTH)


@functools.cache  # one function per setting, so `decode_with` compiles it once
def beam_fn(beam_size, alpha):
    def run(step_fn, state, batch):
        return decoding.beam_search(step_fn, state, batch, beam_size, LENGTH, alpha=alpha)

    return run


def log_probs_of(graphdef, state, enc, tokens, boost=EOS_BOOST):
    """Teacher-forced per-token log-probs [b, L] of `tokens` (EOS-boosted like the decoders)."""
    logits = teacher_forced_logits(graphdef, state, enc, shift_right(tokens)).at[..., EOS].add(boost)
    return jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], -1)[..., 0]


def lengths_of(tokens):
    """Length incl. EOS for rows that end in EOS, else the full length; checks that only zeros follow EOS
    (before it a random-weight model may pick any id, the padding id 0 included)."""
    tokens = np.asarray(tokens)
    lengths = []
    for row in tokens.reshape(-1, tokens.shape[-1]):
        eos = np.flatnonzero(row == EOS)
        n = eos[0] + 1 if eos.size else len(row)
        assert np.all(row[n:] == 0), row
        lengths.append(n)
    return np.array(lengths).reshape(tokens.shape[:-1])


# ---------------------------------------------------------------------------------------------
# The cache


@pytest.mark.parametrize("tied", [False, True])
def test_cached_steps_equal_teacher_forced_logits(tied):
    config = dataclasses.replace(TINY, feed_forward="relu", tie_word_embeddings=True) if tied else TINY
    _, graphdef, state = make_model(config)
    enc = encoder_inputs()
    targets = jax.random.randint(jax.random.key(2), (4, 6), 2, TINY.vocab_size)
    expected = teacher_forced_logits(graphdef, state, enc, shift_right(targets))

    @jax.jit
    def cached(state, enc, dec_inputs):
        net = nnx.merge(graphdef, state)
        decode_state = net.init_decode_state(net.encode(enc), enc > 0, LENGTH + 3)  # cache longer than targets

        def step(decode_state, token_ids):
            logits, decode_state = net.decode_step(decode_state, token_ids)
            return decode_state, logits

        decode_state, logits = jax.lax.scan(step, decode_state, dec_inputs.T)
        return jnp.swapaxes(logits, 0, 1), decode_state

    logits, decode_state = cached(state, enc, shift_right(targets))
    assert logits.shape == expected.shape and logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, expected, atol=1e-5)
    assert int(decode_state.index) == 6
    layers, heads, head_dim = TINY.num_decoder_layers, TINY.num_heads, TINY.head_dim
    # An unrolled stack keeps one head-major cache per layer (a scanned one stacks them: tests/nn/test_stacks.py).
    assert len(decode_state.cache) == len(decode_state.cross) == layers
    assert decode_state.cache[1].key.shape == (4, heads, LENGTH + 3, head_dim)
    assert decode_state.cross[1].value.shape == (4, heads, 7, head_dim)
    assert np.all(np.any(decode_state.cache[1].value[:, :, :6] != 0, axis=-1))  # slots 0..5 written
    assert not np.any(decode_state.cache[1].key[:, :, 6:])  # slots past the index are never written


def uncached_greedy(graphdef, state, enc, boost=EOS_BOOST):
    """Greedy decoding WITHOUT a cache: reruns the whole teacher-forced decoder on the growing prefix
    at every step (fixed width; causality makes the zeros after the prefix irrelevant)."""
    prefix = np.zeros((enc.shape[0], LENGTH), np.int32)
    expected = np.zeros((enc.shape[0], LENGTH), np.int32)
    done = np.zeros(enc.shape[0], bool)
    for t in range(LENGTH):
        logits = np.array(teacher_forced_logits(graphdef, state, enc, jnp.asarray(prefix))[:, t])
        logits[:, EOS] += boost
        expected[:, t] = np.where(done, 0, logits.argmax(-1))
        done |= expected[:, t] == EOS
        if done.all():
            break
        if t + 1 < LENGTH:
            prefix[:, t + 1] = expected[:, t]
    return expected


def penalised_scores(graphdef, state, enc, tokens, alpha, boost=EOS_BOOST):
    """Length-penalised sums of teacher-forced log-probs of [n, L] token rows."""
    lengths = lengths_of(tokens)
    mask = jnp.arange(LENGTH)[None] < lengths[:, None]
    log_likelihood = jnp.sum(log_probs_of(graphdef, state, enc, tokens, boost) * mask, -1)
    return np.asarray(log_likelihood / ((5.0 + lengths) / 6.0) ** alpha)


def test_cached_greedy_equals_uncached_greedy(tiny):
    _, graphdef, state = tiny
    enc = encoder_inputs()
    tokens = decode_with(graphdef, greedy_fn, EOS_BOOST, state, enc)
    np.testing.assert_array_equal(tokens, uncached_greedy(graphdef, state, enc))
    lengths = lengths_of(tokens)
    assert len(set(lengths)) > 1 and min(lengths) < LENGTH, lengths  # the boost makes rows stop at EOS


# ---------------------------------------------------------------------------------------------
# Beam search


def test_beam_size_one_is_greedy(tiny):
    _, graphdef, state = tiny
    for seed in (1, 3):
        enc = encoder_inputs(seed)
        greedy = decode_with(graphdef, greedy_fn, EOS_BOOST, state, enc)
        beams, scores = decode_with(graphdef, beam_fn(1, 0.6), EOS_BOOST, state, enc)
        assert beams.shape == (4, 1, LENGTH) and scores.shape == (4, 1)
        np.testing.assert_array_equal(beams[:, 0], greedy)


def test_beam_scores_are_sorted_penalised_log_likelihoods(tiny):
    _, graphdef, state = tiny
    enc, beam_size, alpha = encoder_inputs(), 4, 0.6
    beams, scores = decode_with(graphdef, beam_fn(beam_size, alpha), EOS_BOOST, state, enc)
    assert beams.shape == (4, beam_size, LENGTH) and scores.shape == (4, beam_size)
    assert np.all(np.diff(np.asarray(scores), axis=1) <= 0)  # best first
    lengths = lengths_of(beams)  # every beam ends with EOS or runs to the max length
    assert np.any(lengths < LENGTH) and np.any(lengths == LENGTH)  # both endings occur
    for r in range(4):
        assert len({tuple(beam) for beam in np.asarray(beams[r])}) == beam_size  # distinct hypotheses

    flat = beams.reshape(4 * beam_size, LENGTH)
    expected = penalised_scores(graphdef, state, jnp.repeat(enc, beam_size, axis=0), flat, alpha)
    np.testing.assert_allclose(scores.reshape(-1), expected, rtol=1e-5, atol=1e-5)

    # The best beam is at least as good (penalised) as the greedy hypothesis.
    greedy = decode_with(graphdef, greedy_fn, EOS_BOOST, state, enc)
    assert np.all(np.asarray(scores[:, 0]) >= penalised_scores(graphdef, state, enc, greedy, alpha) - 1e-5)


def table_step_fn(table):
    """Contrived model: next-token log-probs depend only on the previous token; counts calls."""
    log_table = jnp.log(jnp.asarray(table, jnp.float32))

    def step(state, token_ids):
        return log_table[token_ids], {"calls": state["calls"] + 1}

    return step


def test_beam_search_finds_what_greedy_misses():
    # Tokens: 0 start, 1 EOS, 2 "A", 3 "B". Greedy takes A (0.6) then EOS (0.4): p = 0.24.
    # B (0.4) then EOS (0.9) is p = 0.36, found only by keeping B alive.
    eps = 1e-6
    table = [[eps, eps, 0.6, 0.4], [eps, 0.9, 0.05, 0.05], [eps, 0.4, 0.3, 0.3], [eps, 0.9, 0.05, 0.05]]
    step, state = table_step_fn(table), {"calls": jnp.zeros((), jnp.int32)}
    greedy = jax.jit(lambda s: decoding.greedy_decode(step, s, 1, 5))(state)
    np.testing.assert_array_equal(greedy, [[2, 1, 0, 0, 0]])
    beams, scores = jax.jit(lambda s: decoding.beam_search(step, s, 1, 2, 5, alpha=0.0))(state)
    np.testing.assert_array_equal(beams, [[[3, 1, 0, 0, 0], [2, 1, 0, 0, 0]]])
    np.testing.assert_allclose(scores, np.log([[0.36, 0.24]]), rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# Sampling


def bigram_step_fn(vocab=32, seed=0):
    """Contrived model: random next-token logits given the previous token, shifted by a per-row offset
    held in the state (so rows differ); EOS is likely enough that some rows stop early."""
    table = jax.random.normal(jax.random.key(seed), (vocab, vocab)) * 2.0
    table = table.at[:, EOS].add(1.0).at[:, 0].set(-1e9)  # never the padding id

    def step(state, token_ids):
        return table[(token_ids + state["offset"]) % vocab], state

    return step


def test_degenerate_sampling_is_greedy_and_sampling_is_reproducible():
    step, batch, length = bigram_step_fn(), 16, 10
    state = {"offset": jnp.arange(batch)}
    greedy = jax.jit(lambda: decoding.greedy_decode(step, state, batch, length))()
    lengths = lengths_of(greedy)
    assert np.any(lengths < length) and np.any(lengths == length)

    @functools.partial(jax.jit, static_argnames=("temperature", "top_k", "top_p"))
    def sample(rng, temperature=1.0, top_k=0, top_p=1.0):
        return decoding.temperature_sample(step, state, rng, batch, length, temperature, top_k, top_p)

    rng = jax.random.key(7)
    for kwargs in ({"temperature": 0.0}, {"top_k": 1}, {"top_p": 1e-6}, {"top_k": 5, "top_p": 1e-6}):
        np.testing.assert_array_equal(sample(rng, **kwargs), greedy, err_msg=str(kwargs))
    a = sample(rng, temperature=1.5)
    np.testing.assert_array_equal(a, sample(rng, temperature=1.5))
    assert not np.array_equal(a, sample(jax.random.key(8), temperature=1.5)) and not np.array_equal(a, greedy)
    lengths_of(a)  # zeros after EOS


def fixed_logits_step_fn(logits):
    logits = jnp.asarray(logits, jnp.float32)

    def step(state, token_ids):
        return jnp.broadcast_to(logits, (token_ids.shape[0], logits.shape[0])), state

    return step


def test_top_k_and_top_p_only_emit_allowed_tokens():
    logits = jax.random.permutation(jax.random.key(0), jnp.arange(16.0)) * 0.3
    logits = logits.at[EOS].set(-10.0)  # never in the top k: rows run to the max length
    allowed = set(np.argsort(-np.asarray(logits))[:3].tolist())
    run = jax.jit(lambda rng: decoding.temperature_sample(fixed_logits_step_fn(logits), {}, rng, 64, 8, top_k=3))
    tokens = np.asarray(run(jax.random.key(1)))
    assert set(np.unique(tokens).tolist()) == allowed  # all three drawn, nothing else

    # Nucleus: probabilities .5, .3, .15, .05 with top_p .7 keep the first two (mass before the third is .8).
    nucleus_logits = jnp.log(jnp.asarray([0.05, 1e-9, 0.5, 0.15, 0.3]))
    run = jax.jit(
        lambda rng: decoding.temperature_sample(fixed_logits_step_fn(nucleus_logits), {}, rng, 64, 8, top_p=0.7)
    )
    assert set(np.unique(np.asarray(run(jax.random.key(2)))).tolist()) == {2, 4}


# ---------------------------------------------------------------------------------------------
# Stopping


def counted(step_fn, calls):
    """`step_fn` that also appends its state's call counter to the host list `calls` at each run."""

    def step(state, token_ids):
        logits, state = step_fn(state, token_ids)
        jax.debug.callback(lambda n: calls.append(int(n)), state["calls"], ordered=True)
        return logits, state

    return step


def test_loop_stops_when_every_row_has_finished():
    state = {"calls": jnp.zeros((), jnp.int32)}
    always_eos = table_step_fn([[1e-3, 0.99, 4e-3, 5e-3]] * 4)
    expected = np.zeros((3, 6), np.int32)
    expected[:, 0] = EOS
    runs = {
        "greedy": (1, lambda step, s: decoding.greedy_decode(step, s, 3, 6)),
        "sample": (1, lambda step, s: decoding.temperature_sample(step, s, jax.random.key(0), 3, 6, temperature=0.5)),
        "beam1": (1, lambda step, s: decoding.beam_search(step, s, 3, 1, 6)[0][:, 0]),
        # Beam 2: step 1 finishes only the first beam's EOS; step 2 finishes the runner-up's.
        "beam2": (2, lambda step, s: decoding.beam_search(step, s, 3, 2, 6)[0][:, 0]),
    }
    for name, (expected_calls, run) in runs.items():
        calls = []
        tokens = jax.jit(functools.partial(run, counted(always_eos, calls)))(state)
        np.testing.assert_array_equal(tokens, expected, err_msg=name)
        jax.effects_barrier()
        assert calls == list(range(1, expected_calls + 1)), name


def eos_at_step_fn(num_rows):
    """Row r (of `num_rows`; beam rows follow their batch row) emits EOS at step r, token 2 before."""

    def step(state, token_ids):
        rows = jnp.arange(token_ids.shape[0]) // (token_ids.shape[0] // num_rows)
        target = jnp.where(rows == state["calls"], EOS, 2)
        return jax.nn.one_hot(target, 5) * 30.0, {"calls": state["calls"] + 1}

    return step


def test_rows_stop_at_eos_with_zeros_after():
    state = {"calls": jnp.zeros((), jnp.int32)}
    expected = [[1] + [0] * 7, [2, 1] + [0] * 6, [2, 2, 1] + [0] * 5, [2, 2, 2, 1] + [0] * 4]
    calls = []
    step = counted(eos_at_step_fn(4), calls)
    tokens = jax.jit(lambda s: decoding.greedy_decode(step, s, 4, 8))(state)
    np.testing.assert_array_equal(tokens, expected)
    jax.effects_barrier()
    assert calls == [1, 2, 3, 4]  # the loop ends with the slowest row, not at the max length
    sampled = jax.jit(lambda s: decoding.temperature_sample(step, s, jax.random.key(0), 4, 8))(state)
    np.testing.assert_array_equal(sampled, expected)
    beams, _ = jax.jit(lambda s: decoding.beam_search(eos_at_step_fn(4), s, 4, 1, 8))(state)
    np.testing.assert_array_equal(beams[:, 0], expected)


# ---------------------------------------------------------------------------------------------
# The trainer-facing model


def test_predict_batch_methods(tiny):
    model, graphdef, state = tiny
    enc = encoder_inputs()

    @functools.partial(jax.jit, static_argnames=("method",))
    def predict(state, enc, method, rng=None):
        net = nnx.merge(graphdef, state)
        return model.predict_batch(
            net, {"encoder_input_tokens": enc}, max_decode_length=LENGTH,
            decode=decoding.DecodeConfig(method=method, beam_size=3), rng=rng,
        )

    greedy = predict(state, enc, "greedy")
    np.testing.assert_array_equal(greedy, uncached_greedy(graphdef, state, enc, boost=0.0))
    best = predict(state, enc, "beam")
    assert best.shape == (4, LENGTH)
    beam_score = penalised_scores(graphdef, state, enc, best, 0.6, boost=0.0)
    assert np.all(beam_score >= penalised_scores(graphdef, state, enc, greedy, 0.6, boost=0.0) - 1e-5)
    sampled = predict(state, enc, "sample", jax.random.key(0))
    assert sampled.shape == (4, LENGTH) and sampled.dtype == jnp.int32
    with pytest.raises(ValueError, match="rng"):
        predict(state, enc, "sample")
    with pytest.raises(ValueError, match="method"):
        predict(state, enc, "nucleus")


def test_score_batch_is_the_weighted_target_log_likelihood(tiny):
    model, graphdef, state = tiny
    enc = encoder_inputs()
    targets = jax.random.randint(jax.random.key(3), (4, 6), 2, TINY.vocab_size)
    weights = (jnp.arange(6)[None] < jnp.array([6, 4, 2, 5])[:, None]).astype(jnp.float32)
    targets = jnp.where(weights > 0, targets, 0)
    batch = {
        "encoder_input_tokens": enc,
        "decoder_input_tokens": shift_right(targets),
        "decoder_target_tokens": targets,
        "decoder_loss_weights": weights,
    }
    scores = jax.jit(lambda state, batch: model.score_batch(nnx.merge(graphdef, state), batch))(state, batch)
    assert scores.shape == (4,) and scores.dtype == jnp.float32
    expected = jnp.sum(log_probs_of(graphdef, state, enc, targets, boost=0.0) * weights, -1)
    np.testing.assert_allclose(scores, expected, rtol=1e-6, atol=1e-5)


def test_bfloat16_cached_decoding_executes():
    config = dataclasses.replace(TINY, dtype="bfloat16")
    model, graphdef, state = make_model(config)
    enc = encoder_inputs()

    @jax.jit
    def run(state, enc):
        net = nnx.merge(graphdef, state)
        decode_state = net.init_decode_state(net.encode(enc), enc > 0, LENGTH)
        logits, next_state = net.decode_step(decode_state, jnp.zeros((4,), jnp.int32))
        tokens = model.predict_batch(net, {"encoder_input_tokens": enc}, max_decode_length=LENGTH)
        beams = model.predict_batch(
            net, {"encoder_input_tokens": enc}, max_decode_length=LENGTH,
            decode=decoding.DecodeConfig(method="beam", beam_size=2),
        )
        return logits, next_state.cache[0].key, tokens, beams

    logits, keys, tokens, beams = jax.block_until_ready(run(state, enc))
    assert keys.dtype == jnp.bfloat16 and logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))
    first = teacher_forced_logits(graphdef, state, enc, jnp.zeros((4, 1), jnp.int32))[:, 0]
    np.testing.assert_allclose(logits, first, atol=0.05 * float(jnp.abs(first).max()))
    assert tokens.shape == beams.shape == (4, LENGTH)
    np.testing.assert_array_equal(tokens[:, 0], jnp.argmax(logits, -1))
