"""Autoregressive decoding over a step function: greedy, temperature/top-k/top-p sampling, beam search.

Every algorithm drives a model-agnostic step function

    step_fn(state, token_ids [b]) -> (logits [b, vocab] float32, new_state)

that feeds one token per row and returns the next-token logits (every network's `decode_step` over
the one KV-cache `nn.attention.DecodeState`). `decode` picks the algorithm and its settings from one
`DecodeConfig`. Each algorithm is ONE `jax.lax.while_loop` (no per-token Python, so it runs
inside `jax.jit`) that feeds `start_id` first and stops once every row is finished or after
`max_decode_length` steps. Output tokens are int32 [.., max_decode_length] with 0 after a row's EOS.

State contract: every leaf of `state` with ndim >= 1 has the batch as its leading axis (beam search
repeats such leaves to batch * beam rows and gathers them by beam); scalar leaves (the decode position,
counters) are shared by all rows. The keyword arguments are Python values (they shape the program).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

State = Any
StepFn = Callable[[State, jax.Array], tuple[jax.Array, State]]
METHODS = ("greedy", "sample", "beam")


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """How to decode: `method` "greedy", "sample" (temperature 0 = argmax, `top_k` 0 = off, `top_p` 1 =
    off; needs an rng) or "beam" (`beam_size`, length penalty `alpha`; the best beam is returned).
    `start_id` is the first id fed; an encoder-decoder model sets it to its `decoder_start_id`. Hashable, so it can be a static argument of a jitted function."""

    method: str = "greedy"
    beam_size: int = 4
    alpha: float = 0.6
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    eos_id: int = 1
    start_id: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"Unknown decoding method={self.method!r}; use one of {list(METHODS)}.")
        if self.beam_size < 1:
            raise ValueError(f"beam_size={self.beam_size} must be >= 1.")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 means greedy).")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 disables top-k).")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1] (1 disables nucleus sampling).")


def _decode_loop(
    step_fn: StepFn,
    state: State,
    batch_size: int,
    max_decode_length: int,
    choose: Callable[[jax.Array, jax.Array], jax.Array],
    eos_id: int,
    start_id: int,
) -> jax.Array:
    """Shared one-token-per-step loop: `choose(logits [b, V], step) -> [b]` picks each next token.

    Finished rows keep emitting 0 (and are fed 0) until every row is finished or the length is hit.
    """

    def cond(carry):
        step, _, done, _, _ = carry
        return (step < max_decode_length) & ~jnp.all(done)

    def body(carry):
        step, token, done, tokens, state = carry
        logits, state = step_fn(state, token)
        next_token = jnp.where(done, 0, choose(logits.astype(jnp.float32), step).astype(jnp.int32))
        tokens = jax.lax.dynamic_update_slice(tokens, next_token[:, None], (0, step))
        return step + 1, next_token, done | (next_token == eos_id), tokens, state

    init = (
        jnp.zeros((), jnp.int32),
        jnp.full((batch_size,), start_id, jnp.int32),
        jnp.zeros((batch_size,), jnp.bool_),
        jnp.zeros((batch_size, max_decode_length), jnp.int32),
        state,
    )
    return jax.lax.while_loop(cond, body, init)[3]


def greedy_decode(
    step_fn: StepFn, state: State, batch_size: int, max_decode_length: int, eos_id: int = 1, start_id: int = 0
) -> jax.Array:
    """Greedy decoding: each step emits the argmax token (ties -> lowest id). Returns [b, L] int32."""
    return _decode_loop(
        step_fn, state, batch_size, max_decode_length, lambda logits, _: jnp.argmax(logits, -1), eos_id, start_id
    )


def temperature_sample(
    step_fn: StepFn,
    state: State,
    rng: jax.Array,
    batch_size: int,
    max_decode_length: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_id: int = 1,
    start_id: int = 0,
) -> jax.Array:
    """Ancestral sampling from softmax(logits / temperature), optionally truncated. Returns [b, L] int32.

    temperature 0 is greedy (argmax). top_k > 0 keeps only the k most likely tokens; top_p < 1 (nucleus)
    keeps the smallest most-likely set whose probability reaches top_p (always at least the top token),
    renormalised after any top-k cut. Both are applied in descending-sorted space (`lax.top_k`), so
    ties never let more than k tokens through. Step t draws with `fold_in(rng, t)`: fixed rng, same tokens.
    """
    DecodeConfig(method="sample", temperature=temperature, top_k=top_k, top_p=top_p)  # checks the settings

    def choose(logits: jax.Array, step: jax.Array) -> jax.Array:
        if temperature == 0:
            return jnp.argmax(logits, axis=-1)
        key = jax.random.fold_in(rng, step)
        logits = logits / temperature
        if top_k == 0 and top_p == 1.0:
            return jax.random.categorical(key, logits, axis=-1)
        k = logits.shape[-1] if top_k == 0 else min(top_k, logits.shape[-1])
        values, indices = jax.lax.top_k(logits, k)  # [b, k], best first
        if top_p < 1.0:
            probs = jax.nn.softmax(values, axis=-1)
            mass_before = jnp.cumsum(probs, axis=-1) - probs  # probability of the better tokens
            values = jnp.where(mass_before < top_p, values, -jnp.inf)
        choice = jax.random.categorical(key, values, axis=-1)
        return jnp.take_along_axis(indices, choice[:, None], axis=-1)[:, 0]

    return _decode_loop(step_fn, state, batch_size, max_decode_length, choose, eos_id, start_id)


def length_penalty(length: jax.Array, alpha: float) -> jax.Array:
    """GNMT length penalty ((5 + length) / 6) ** alpha (T5X's form); scores are log-prob / penalty."""
    return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def beam_search(
    step_fn: StepFn,
    state: State,
    batch_size: int,
    beam_size: int,
    max_decode_length: int,
    alpha: float = 0.6,
    eos_id: int = 1,
    start_id: int = 0,
) -> tuple[jax.Array, jax.Array]:
    """Beam search with length penalty. Returns tokens [b, beam, L] and scores [b, beam], best first.

    Alive and finished hypotheses are kept apart. Each step extends every alive beam by every token and
    takes the 2*beam best candidates by summed log-prob (at most `beam` of them end in EOS, so `beam`
    non-EOS ones always remain). Non-EOS candidates refill the alive beams (the state rows are gathered
    from their parents). A candidate ending in EOS — or any candidate at the last step — is moved to the
    finished set, scored sum-log-prob / length_penalty(length incl. EOS), only if it ranks among the
    `beam` best candidates of its step (fairseq's rule); a row stops once it has `beam` finished
    hypotheses. With beam_size 1 this is exactly greedy decoding. A score is -inf (tokens 0) only
    where fewer than `beam` finite-probability hypotheses exist.
    """
    DecodeConfig(method="beam", beam_size=beam_size)  # checks the settings
    b, k, length = batch_size, beam_size, max_decode_length
    state = jax.tree.map(lambda x: x if jnp.ndim(x) == 0 else jnp.repeat(x, k, axis=0), state)
    rank_ok = jnp.arange(2 * k) < k  # [2k]: candidates allowed to finish

    def cond(carry):
        step, num_finished = carry[0], carry[5]
        return (step < length) & ~jnp.all(num_finished >= k)

    def body(carry):
        step, alive_tokens, alive_log_probs, last_token, finished, num_finished, state = carry
        finished_tokens, finished_scores = finished
        logits, state = step_fn(state, last_token.reshape(b * k))
        vocab = logits.shape[-1]
        log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1).reshape(b, k, vocab)
        candidates = (alive_log_probs[:, :, None] + log_probs).reshape(b, k * vocab)
        top_log_probs, top_index = jax.lax.top_k(candidates, 2 * k)  # [b, 2k]
        top_parent, top_token = top_index // vocab, top_index % vocab
        top_tokens = jnp.take_along_axis(alive_tokens, top_parent[:, :, None], axis=1)  # [b, 2k, L]
        top_tokens = top_tokens.at[:, :, step].set(top_token)

        # Finished: EOS (or last-step) candidates among this step's `beam` best, merged by score.
        ends = (top_token == eos_id) | (step == length - 1)
        finalize = ends & rank_ok[None] & (num_finished < k)[:, None] & jnp.isfinite(top_log_probs)
        new_scores = jnp.where(finalize, top_log_probs / length_penalty(step + 1, alpha), -jnp.inf)
        all_scores = jnp.concatenate([finished_scores, new_scores], axis=1)
        all_tokens = jnp.concatenate([finished_tokens, top_tokens], axis=1)
        finished_scores, pick = jax.lax.top_k(all_scores, k)
        finished_tokens = jnp.take_along_axis(all_tokens, pick[:, :, None], axis=1)
        num_finished = num_finished + jnp.sum(finalize, axis=1, dtype=jnp.int32)

        # Alive: the `beam` best candidates not ending in EOS; their parents' state rows follow them.
        alive_log_probs, pick = jax.lax.top_k(jnp.where(top_token == eos_id, -jnp.inf, top_log_probs), k)
        alive_tokens = jnp.take_along_axis(top_tokens, pick[:, :, None], axis=1)
        last_token = jnp.take_along_axis(top_token, pick, axis=1)
        rows = (jnp.arange(b)[:, None] * k + jnp.take_along_axis(top_parent, pick, axis=1)).reshape(b * k)
        state = jax.tree.map(lambda x: x if jnp.ndim(x) == 0 else jnp.take(x, rows, axis=0), state)
        finished = (finished_tokens, finished_scores)
        return step + 1, alive_tokens, alive_log_probs, last_token, finished, num_finished, state

    # All beams start identical: only beam 0 is live, so the first step does not pick duplicates.
    init = (
        jnp.zeros((), jnp.int32),
        jnp.zeros((b, k, length), jnp.int32),
        jnp.tile(jnp.where(jnp.arange(k) == 0, 0.0, -jnp.inf).astype(jnp.float32)[None], (b, 1)),
        jnp.full((b, k), start_id, jnp.int32),
        (jnp.zeros((b, k, length), jnp.int32), jnp.full((b, k), -jnp.inf, jnp.float32)),
        jnp.zeros((b,), jnp.int32),
        state,
    )
    carry = jax.lax.while_loop(cond, body, init)
    finished_tokens, finished_scores = carry[4]
    return finished_tokens, finished_scores


GREEDY = DecodeConfig()


def decode(
    step_fn: StepFn,
    state: State,
    batch_size: int,
    max_decode_length: int,
    config: DecodeConfig = GREEDY,
    rng: jax.Array | None = None,
) -> jax.Array:
    """[b, max_decode_length] tokens by `config.method`: greedy, sampling (needs `rng`) or the best beam."""
    c = config
    if c.method == "greedy":
        return greedy_decode(step_fn, state, batch_size, max_decode_length, eos_id=c.eos_id, start_id=c.start_id)
    if c.method == "sample":
        if rng is None:
            raise ValueError("Decoding with method='sample' needs rng=jax.random.key(...).")
        return temperature_sample(
            step_fn, state, rng, batch_size, max_decode_length,
            temperature=c.temperature, top_k=c.top_k, top_p=c.top_p, eos_id=c.eos_id, start_id=c.start_id,
        )
    tokens, _ = beam_search(
        step_fn, state, batch_size, c.beam_size, max_decode_length, alpha=c.alpha, eos_id=c.eos_id, start_id=c.start_id
    )
    return tokens[:, 0]
