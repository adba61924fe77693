"""Measures t5x_lite's speed the same way every time: peak, train step (MFU), data pipeline, decoding.

    python tools/benchmark.py --config small --batch 8 --inputs_length 512 --targets_length 114 --compare-hf
    python tools/benchmark.py --config tiny --batch 8 --inputs_length 128 --targets_length 32 --compare-hf

Prints a table, then ONE final line of JSON with every figure (with `--compare-hf` it has `ratio_vs_hf`,
the train-step tokens/s ratio t5x_lite / HF at the first `--dropout` rate, and `decode_ratio_vs_hf`, the
greedy-decoding tokens/s ratio at the longest `--decode_lengths`).

What is measured, and how:
- peak: a jitted square matmul (2048 on CPU, 8192 on accelerators), median of `--peak_repeats` runs, in the
  run's dtype (a bf16 run multiplies bf16 x bf16 with float32 accumulation, the way the model's matmuls do).
- train: the real `steps.make_train_step` (jitted, donated state, AdamW or Adafactor from `optimizers`) on
  one device, on synthetic full-length unpacked rows (every token real). Compile time is reported apart;
  then `--warmup` untimed turns, then at least `--steps` timed steps in at least `--turns` turns (each step
  includes the host->device batch transfer), median.
  tokens/s = batch x (inputs_length + targets_length) / step time. FLOPs are `model_flops` (analytic).
- --compare-hf: HF `transformers` T5ForConditionalGeneration (PyTorch) with the same shape, dropout,
  AdamW (same hyperparameters, fused kernel where torch has one), global-norm clipping and thread count;
  bf16 runs use `torch.autocast(bfloat16)` (float32 params, like ours). The two sides alternate in turns
  of `--turn_s` seconds (one step per turn when a step takes longer), so load on a shared machine hits both
  alike; their ratio is the robust figure. (Switching every step charges each step for the caches the other
  side evicted, which squeezes the ratio of short steps toward 1.) Beside wall times
  the report gives the process CPU seconds of the same runs (`step_cpu_s`, `cpu_s`), which on an
  oversubscribed machine track the work done better than wall time.
- kernels (with --compare-hf): each matmul form of the step (projection, feed-forward, weight gradient,
  attention logits and values) alone, ours (the `KERNELS` set's einsum) vs the product HF computes, in GFLOP/s: tells
  a gap in the matmul kernels apart from a gap in the rest of the step.
- data: the bundled span-corruption task through `pipeline.get_dataset` with packing (seqio
  EncDecFeatureConverter), rows/s over `--data_batches` batches after a warm-up, beside the rows/s the
  train step consumes.
- decode: `EncoderDecoderModel.predict_batch` (KV cache, one `while_loop`, jitted) greedy and beam search
  for each of `--decode_lengths` new tokens, with EOS disabled so every run makes exactly that many;
  tokens/s = batch x length / time (for beams: output tokens of the best beam). The marginal cost per
  decode step between consecutive lengths shows whether the per-token cost stays flat. HF's `generate`
  (KV cache) runs alternately on the same inputs.

Named model shapes (`SHAPES`, T5 v1.1 gated-GELU, untied logits): tiny = d_model 128, 4 heads x 32,
d_ff 256, 2+2 layers, vocab 2048; small/base/large = the published T5 v1.1 sizes (vocab 32128).
`--attention auto` (the T5Config default) runs cuDNN's fused attention on GPU in bf16 and einsum
attention elsewhere; should the fused kernel fail on a GPU, the run continues with einsum and says so.
`--scan_layers auto` scans the layer stacks on accelerators (an unrolled T5-base step compiled for
minutes on an H200, the scanned one in 14 s) and loops over them on CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from t5x_lite import host_memory, partitioning
from t5x_lite.cli import UserError
from t5x_lite.decoding import DecodeConfig
from t5x_lite.models.seq2seq import EncoderDecoderModel
from t5x_lite.networks.t5 import T5Config
from t5x_lite.nn import attention as attention_lib
from t5x_lite.nn import kernels as kernels_lib
from t5x_lite.training import optimizers, steps, train_state

SHAPES: dict[str, dict[str, int]] = {
    "tiny": {"vocab_size": 2048, "d_model": 128, "num_heads": 4, "head_dim": 32, "d_ff": 256,
             "num_encoder_layers": 2, "num_decoder_layers": 2},
    "small": {"vocab_size": 32128, "d_model": 512, "num_heads": 6, "head_dim": 64, "d_ff": 1024,
              "num_encoder_layers": 8, "num_decoder_layers": 8},
    "base": {"vocab_size": 32128, "d_model": 768, "num_heads": 12, "head_dim": 64, "d_ff": 2048,
             "num_encoder_layers": 12, "num_decoder_layers": 12},
    "large": {"vocab_size": 32128, "d_model": 1024, "num_heads": 16, "head_dim": 64, "d_ff": 2816,
              "num_encoder_layers": 24, "num_decoder_layers": 24},
}

Timed = Callable[[], Any]  # runs one unit of work to completion (blocking) and returns a value to check


# ---------------------------------------------------------------------------------------------
# Shapes and FLOPs


def model_config(name: str, dtype: str, dropout_rate: float, attention: str = "auto",
                 scan_layers: bool = False, kernels: str = "auto") -> T5Config:
    """The named benchmark shape (see `SHAPES`) as a T5Config with the given activation dtype, dropout,
    attention implementation (`attention.attention_impl`), layer stacks (scanned or a Python loop) and
    `KERNELS` set."""
    if name not in SHAPES:
        raise UserError(f"--config {name!r} is not a benchmark shape; use one of {sorted(SHAPES)}.")
    if attention not in attention_lib.ATTENTION_IMPLS:
        raise UserError(
            f"--attention {attention!r} is not supported; use one of {list(attention_lib.ATTENTION_IMPLS)}."
        )
    if kernels not in kernels_lib.KERNEL_CHOICES:
        raise UserError(f"--kernels {kernels!r} is not supported; use one of {list(kernels_lib.KERNEL_CHOICES)}.")
    return T5Config(**SHAPES[name], dtype=dtype, dropout_rate=dropout_rate, attention_impl=attention,
                    scan_layers=scan_layers, kernels=kernels)


def with_attention_fallback(build: Callable[[T5Config], Any], config: T5Config) -> tuple[Any, str]:
    """`build(config)` (which compiles and runs the program once) and the attention implementation used.

    If the cuDNN fused attention fails there (it supports a subset of shapes, and no test machine here has
    a GPU), the run goes on with einsum attention and the returned note says why.
    """
    impl = attention_lib.attention_impl(config.attention_impl, jnp.dtype(config.dtype), config.head_dim)
    if impl != "einsum" and config.dropout_rate > 0:
        impl = "einsum (fused kernels have no attention dropout)"
    try:
        return build(config), impl
    except Exception as e:  # cuDNN reports unsupported configurations with several exception types
        if not impl.startswith("cudnn"):
            raise
        note = f"einsum (cudnn failed: {type(e).__name__}: {e})"[:500]
        return build(dataclasses.replace(config, attention_impl="einsum")), note


def model_flops(config: T5Config, batch: int, inputs_length: int, targets_length: int) -> dict[str, int]:
    """Analytic matmul + attention FLOPs of one forward pass and of one train step (forward + backward).

    A [m, k] x [k, n] matmul is 2mkn FLOPs. Per encoder token: q, k, v, o projections (4 x 2 d hd, hd =
    heads x head_dim) and the feed-forward (3 x 2 d ff gated, 2 x 2 d ff ReLU); attention scores and
    the probability-weighted values over all S keys (2 x 2 S hd). Per decoder token: self-attention q,
    k, v, o, cross-attention q and o, the feed-forward, full T x T self-attention (causal halves are
    computed too) and T x S cross-attention, plus the logits (2 d vocab); cross-attention k and v are
    projected once per encoder token. Embedding lookups, norms, softmax, masks, the loss and the
    optimizer are not counted (a few % at these sizes). Backward = 2 x forward, so a step is 3 x forward.
    """
    d, hd, ff, vocab = config.d_model, config.num_heads * config.head_dim, config.d_ff, config.vocab_size
    s, t = inputs_length, targets_length
    n_ff = 3 if config.feed_forward == "gated-gelu" else 2
    encoder_layer = s * (4 * 2 * d * hd + n_ff * 2 * d * ff) + 2 * 2 * s * s * hd
    decoder_layer = (
        t * (6 * 2 * d * hd + n_ff * 2 * d * ff) + s * 2 * 2 * d * hd + 2 * 2 * t * t * hd + 2 * 2 * t * s * hd
    )
    forward = batch * (
        config.num_encoder_layers * encoder_layer + config.num_decoder_layers * decoder_layer + 2 * t * d * vocab
    )
    return {"forward": forward, "train_step": 3 * forward}


# ---------------------------------------------------------------------------------------------
# Timing


def progress(message: str) -> None:
    """One line on stderr as each measurement finishes (the report itself goes to stdout)."""
    print(f"[benchmark] {message}", file=sys.stderr, flush=True)


def median_time(fn: Timed, repeats: int) -> tuple[float, list[float]]:
    """Median and all wall times of `repeats` calls of a blocking `fn`."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def time_alternating(
    runners: dict[str, Timed], warmup: int, repeats: int, turn_s: float = 1.0, turns: int = 1
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Warms the runners up for `warmup` turns each, then times them in turns (a's, b's, a's, ...) until
    each has at least `repeats` timed runs and `turns` turns, so load that comes and goes on a shared
    machine lands on every side alike (a single one-second turn per side let the tiny ratio swing from
    1.27x to 1.58x).

    A turn is as many consecutive runs as fill `turn_s` seconds (one run when a run takes longer). Warm-up
    turns alternate too: both sides share one malloc heap, whose blocks settle only after a few rounds
    of both (T5-small: our step page-faulted 840k, 650k, 200k, then ~40 times in its first four turns
    alternating with HF's, 7.4 / 6.3 / 7.0 / 5.6 s, against 5.1-5.5 s steps alone). Switching sides every
    run charges each run for the caches the other side evicted: on the 2-core CPU that added ~15 ms to
    both sides' 40-55 ms tiny steps and pulled their ratio from ~1.3x to ~1.1x; a multi-second step
    hardly notices. `turn_s=0` switches every run. Returns each runner's wall times and this process's
    CPU times (all threads) for the same runs: on an oversubscribed machine CPU time tracks the work
    done while wall time also counts the waits for a core.
    """
    last = dict.fromkeys(runners, math.inf)
    for _ in range(warmup):
        for name, fn in runners.items():
            runs, spent = 0, 0.0
            while runs == 0 or spent < turn_s:
                start = time.perf_counter()
                fn()
                last[name] = time.perf_counter() - start
                runs, spent = runs + 1, spent + last[name]
    runs_per_turn = {name: 1 if last[name] >= turn_s else math.ceil(turn_s / max(last[name], 1e-6)) for name in runners}
    wall: dict[str, list[float]] = {name: [] for name in runners}
    cpu: dict[str, list[float]] = {name: [] for name in runners}
    done = 0
    while done < turns or min(len(times) for times in wall.values()) < repeats:
        done += 1
        for name, fn in runners.items():
            for _ in range(runs_per_turn[name]):
                start, start_cpu = time.perf_counter(), time.process_time()
                fn()
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
    return wall, cpu


def measure_peak(dtype: str, size: int | None = None, repeats: int = 5, kernels: str = "auto") -> dict[str, Any]:
    """This device's matmul FLOP/s for a `dtype` model: a jitted [n, n] x [n, n] product in the operand dtype
    the model's dots take (`Kernels.operand_dtype`; low-precision operands accumulate in float32, the
    model's fast path), median of `repeats` runs."""
    size = size or (2048 if jax.default_backend() == "cpu" else 8192)
    dt = kernels_lib.resolve(kernels).operand_dtype(dtype)
    ka, kb = jax.random.split(jax.random.key(0))
    a, b = jax.random.normal(ka, (size, size), dt), jax.random.normal(kb, (size, size), dt)
    accumulate = None if dt == jnp.float32 else jnp.float32
    matmul = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=accumulate))
    matmul(a, b).block_until_ready()
    seconds, _ = median_time(lambda: matmul(a, b).block_until_ready(), repeats)
    return {"dtype": dt.name, "size": size, "flops_per_s": 2 * size**3 / seconds}


# ---------------------------------------------------------------------------------------------
# Train step: t5x_lite and HF


def synthetic_batch(vocab_size: int, batch: int, inputs_length: int, targets_length: int, seed: int = 0) -> dict:
    """Unpacked full-length EncDec features (no padding): random ids in [2, vocab), decoder inputs are the
    targets shifted right behind the BOS id 0, every target weighted 1."""
    rng = np.random.default_rng(seed)
    inputs = rng.integers(2, vocab_size, (batch, inputs_length), dtype=np.int32)
    targets = rng.integers(2, vocab_size, (batch, targets_length), dtype=np.int32)
    decoder_inputs = np.concatenate([np.zeros((batch, 1), np.int32), targets[:, :-1]], axis=1)
    return {
        "encoder_input_tokens": inputs,
        "decoder_input_tokens": decoder_inputs,
        "decoder_target_tokens": targets,
        "decoder_loss_weights": np.ones((batch, targets_length), np.float32),
    }


def make_optimizer(name: str, learning_rate: float) -> optax.GradientTransformation:
    """AdamW (weight decay 0.01, global-norm clipping 1.0) or Adafactor with T5's defaults, at a constant rate."""
    schedule = optax.constant_schedule(learning_rate)
    if name == "adamw":
        return optimizers.adamw(schedule)
    if name == "adafactor":
        return optimizers.adafactor(schedule)
    raise UserError(f"--optimizer {name!r} is not supported; use 'adamw' or 'adafactor'.")


class T5xTrainer:
    """One device's real jitted train step (donated state) on a fixed host batch."""

    def __init__(self, config: T5Config, host_batch: dict, optimizer: str, learning_rate: float, seed: int = 0):
        model = EncoderDecoderModel(config)
        tx = make_optimizer(optimizer, learning_rate)
        mesh = partitioning.make_mesh({"data": 1}, devices=jax.devices()[:1])
        rules = partitioning.logical_axis_rules(partitioning.STANDARD_RULES)
        self.batch_sharding = partitioning.batch_sharding(mesh, rules)
        self.state, shardings, graphdef = train_state.create_train_state(model, tx, seed, mesh, rules)
        step = steps.make_train_step(
            model, graphdef, tx, optax.constant_schedule(learning_rate), shardings, self.batch_sharding
        )
        self.host_batch = host_batch
        start = time.perf_counter()
        self.step_fn = step.lower(self.state, self._device_batch()).compile()
        self.compile_s = time.perf_counter() - start
        self.loss = math.nan

    def _device_batch(self) -> dict:
        return partitioning.host_batch_to_global(self.host_batch, self.batch_sharding)

    def step(self) -> float:
        self.state, metrics = self.step_fn(self.state, self._device_batch())
        jax.block_until_ready(self.state)
        self.loss = float(metrics["loss"])
        return self.loss


def _import_hf():
    try:
        import torch
        import transformers
    except ImportError as e:
        raise UserError(
            f"--compare-hf needs PyTorch and transformers ({e}); install them with pip install -e '.[benchmark]'."
        ) from None
    return torch, transformers


def _torch_device(torch) -> str:
    if jax.default_backend() == "cpu":
        return "cpu"
    if jax.default_backend() == "gpu" and torch.cuda.is_available():
        return "cuda"
    raise UserError(
        f"--compare-hf on the {jax.default_backend()!r} backend needs a PyTorch build for that device "
        "(e.g. a CUDA build of torch on GPU); run without --compare-hf or install one."
    )


def hf_model(config: T5Config, seed: int = 0):
    """HF `T5ForConditionalGeneration` with the same shape as `config` (random weights; an untied config gets
    an `lm_head` of its own, since transformers 5 ties it to `shared` unless given a separate weight)."""
    torch, transformers = _import_hf()
    torch.manual_seed(seed)
    hf_config = transformers.T5Config(
        vocab_size=config.vocab_size, d_model=config.d_model, d_kv=config.head_dim, d_ff=config.d_ff,
        num_layers=config.num_encoder_layers, num_decoder_layers=config.num_decoder_layers,
        num_heads=config.num_heads, relative_attention_num_buckets=config.relative_attention_num_buckets,
        relative_attention_max_distance=config.relative_attention_max_distance, dropout_rate=config.dropout_rate,
        layer_norm_epsilon=config.layer_norm_epsilon, feed_forward_proj=config.feed_forward,
        tie_word_embeddings=config.tie_word_embeddings, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )
    model = transformers.T5ForConditionalGeneration(hf_config)
    if not config.tie_word_embeddings:  # own weights, initialised like ours (fan-in scaled)
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight) * config.d_model**-0.5)
    return model.to(_torch_device(torch))


def _autocast(torch, device: str, dtype: str):
    if jnp.dtype(dtype) == jnp.float32:
        return contextlib.nullcontext()
    return torch.autocast(device, dtype=getattr(torch, jnp.dtype(dtype).name))


def _torch_sync(torch, device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class HFTrainer:
    """HF T5 train step on the same batch: autocast forward + loss, backward, clip to norm 1, AdamW."""

    def __init__(self, config: T5Config, host_batch: dict, learning_rate: float, seed: int = 0):
        torch, _ = _import_hf()
        self.torch = torch
        self.model = hf_model(config, seed).train()
        self.device = next(self.model.parameters()).device.type
        self.dtype = config.dtype
        params = list(self.model.parameters())
        kwargs = {"lr": learning_rate, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}
        try:  # the fused kernel is torch's fastest AdamW where it exists
            self.optimizer = torch.optim.AdamW(params, fused=True, **kwargs)
        except (RuntimeError, ValueError):
            self.optimizer = torch.optim.AdamW(params, foreach=True, **kwargs)
        to = functools.partial(torch.as_tensor, device=self.device)
        self.inputs = {
            "input_ids": to(host_batch["encoder_input_tokens"]).long(),
            "attention_mask": to(host_batch["encoder_input_tokens"] > 0).long(),
            "labels": to(host_batch["decoder_target_tokens"]).long(),
        }
        self.compile_s = 0.0
        self.loss = math.nan

    def step(self) -> float:
        torch = self.torch
        with _autocast(torch, self.device, self.dtype):
            loss = self.model(**self.inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.loss = float(loss.detach())
        _torch_sync(torch, self.device)
        return self.loss


def bench_train(
    args: argparse.Namespace, flops: dict[str, int], peak: float
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Train-step figures for each dropout rate (t5x_lite, and HF alternating with it under --compare-hf)."""
    tokens = args.batch * (args.inputs_length + args.targets_length)
    rows, ratios = [], {}
    for rate in args.dropout:
        config = model_config(args.config, args.dtype, rate, args.attention, args.scan_layers, args.kernels)
        host_batch = synthetic_batch(config.vocab_size, args.batch, args.inputs_length, args.targets_length)

        def build(config: T5Config, host_batch: dict = host_batch) -> T5xTrainer:
            trainer = T5xTrainer(config, host_batch, args.optimizer, args.learning_rate)
            trainer.step()  # the first run is where a kernel can still fail
            return trainer

        ours, attention = with_attention_fallback(build, config)
        trainers: dict[str, Any] = {"t5x_lite": ours}
        if args.compare_hf:
            trainers["hf"] = HFTrainer(config, host_batch, args.learning_rate)
        times, cpu = time_alternating(
            {k: v.step for k, v in trainers.items()}, args.warmup, args.steps, args.turn_s, args.turns
        )
        result = {}
        for impl, trainer in trainers.items():
            step_s = statistics.median(times[impl])
            result[impl] = {
                "impl": impl, "dropout": rate, "step_s": step_s, "step_s_all": times[impl],
                "step_cpu_s": statistics.median(cpu[impl]),
                "tokens_per_s": tokens / step_s, "flops_per_s": flops["train_step"] / step_s,
                "mfu": flops["train_step"] / step_s / peak, "compile_s": trainer.compile_s, "loss": trainer.loss,
            }
            if impl == "t5x_lite":
                result[impl]["attention"] = attention
            rows.append(result[impl])
            progress(f"train {impl} dropout {rate}: {step_s:.3f} s/step, {result[impl]['tokens_per_s']:.0f} tokens/s")
        if args.compare_hf:
            ratios[str(rate)] = result["t5x_lite"]["tokens_per_s"] / result["hf"]["tokens_per_s"]
        del trainers
    return rows, ratios


# ---------------------------------------------------------------------------------------------
# Data pipeline


def bench_data(batch: int, inputs_length: int, targets_length: int, num_batches: int, warmup: int = 5) -> dict:
    """Rows/s and tokens/s of the packed span-corruption pipeline (bundled corpus), after `warmup` batches."""
    import seqio

    from t5x_lite.data import pipeline

    ds = pipeline.get_dataset(
        "bundled_span_corruption", {"inputs": inputs_length, "targets": targets_length}, batch,
        seqio.EncDecFeatureConverter, split="train", shuffle=True, seed=0,
    )
    iterator = ds.as_numpy_iterator()
    for _ in range(warmup):
        next(iterator)
    start = time.perf_counter()
    real_tokens = 0
    for _ in range(num_batches):
        features = next(iterator)
        real_tokens += int((features["encoder_segment_ids"] > 0).sum() + (features["decoder_segment_ids"] > 0).sum())
    seconds = time.perf_counter() - start
    return {
        "task": "bundled_span_corruption", "packed": True, "batches": num_batches,
        "rows_per_s": num_batches * batch / seconds,
        "tokens_per_s": num_batches * batch * (inputs_length + targets_length) / seconds,
        "fill": real_tokens / (num_batches * batch * (inputs_length + targets_length)),
    }


# ---------------------------------------------------------------------------------------------
# Kernels: the step's matmul forms alone, t5x_lite vs PyTorch


def kernel_shapes(config: T5Config, batch: int, inputs_length: int) -> dict[str, tuple[str, tuple, tuple]]:
    """The encoder's matmul forms at this shape: name -> (the einsum the model runs, lhs shape, rhs shape).

    The weight gradient is the backward form contracting over the tokens (e.g. the feed-forward's)."""
    b, s, d, h, k, ff = batch, inputs_length, config.d_model, config.num_heads, config.head_dim, config.d_ff
    return {
        "projection (q/k/v)": ("abi,imn->abmn", (b, s, d), (d, h, k)),
        "feed-forward in": ("abi,im->abm", (b, s, d), (d, ff)),
        "feed-forward out": ("abi,im->abm", (b, s, ff), (ff, d)),
        "weight gradient": ("abi,abm->im", (b, s, ff), (b, s, d)),
        "attention logits": ("bqhd,bkhd->bhqk", (b, s, h, k), (b, s, h, k)),
        "attention values": ("bhqk,bkhd->bqhd", (b, h, s, s), (b, s, h, k)),
    }


def _torch_kernel(torch, name: str, x: np.ndarray, y: np.ndarray, device: str, dtype) -> Callable[[], Any]:
    """The product HF's T5 computes for kernel `name`, on our operands in HF's layouts: `nn.Linear` with an
    [out, in] weight, autograd's grad_output^T @ input, heads-major attention on a transposed view."""
    as_tensor = functools.partial(torch.as_tensor, device=device, dtype=dtype)
    if name == "weight gradient":  # dW [d, ff] = g^T @ x over the flattened tokens
        x, y = as_tensor(x.reshape(-1, x.shape[-1])), as_tensor(y.reshape(-1, y.shape[-1]))
        return lambda: torch.mm(y.t(), x)
    if name == "attention logits":  # [b, h, q, d] @ [b, h, d, k]
        q, k = as_tensor(x.transpose(0, 2, 1, 3).copy()), as_tensor(y.transpose(0, 2, 1, 3).copy())
        return lambda: torch.matmul(q, k.transpose(3, 2))
    if name == "attention values":  # [b, h, q, k] @ [b, h, k, d]
        p, v = as_tensor(x), as_tensor(y.transpose(0, 2, 1, 3).copy())
        return lambda: torch.matmul(p, v)
    weight = as_tensor(y.reshape(y.shape[0], -1).T.copy())  # projections: nn.Linear's [out, in]
    x = as_tensor(x)
    return lambda: torch.nn.functional.linear(x, weight)


def bench_kernels(config: T5Config, batch: int, inputs_length: int, repeats: int = 7) -> list[dict[str, Any]]:
    """GFLOP/s of each matmul form of the step (`kernel_shapes`) alone, operands already in the run's dtype:
    ours (the jitted `Kernels.einsum` of the config's `KERNELS`, float32 accumulation, attention logits in float32 like the model) and HF's
    PyTorch product (under autocast for bf16, as in HF's step).
    Separates how much of a train-step gap is matmul kernels from how much is the rest of the step."""
    torch, _ = _import_hf()
    device = _torch_device(torch)
    rows = []
    for name, (spec, x_shape, y_shape) in kernel_shapes(config, batch, inputs_length).items():
        rng = np.random.default_rng(0)
        x, y = rng.standard_normal(x_shape, np.float32), rng.standard_normal(y_shape, np.float32)
        out_dtype = jnp.float32 if name == "attention logits" else None
        einsum = kernels_lib.resolve(config.kernels).einsum
        ours = jax.jit(functools.partial(einsum, spec, dtype=config.dtype, out_dtype=out_dtype))
        jx, jy = jnp.asarray(x, config.dtype), jnp.asarray(y, config.dtype)
        seconds, _ = median_time(lambda ours=ours, jx=jx, jy=jy: ours(jx, jy).block_until_ready(), repeats + 1)
        product = _torch_kernel(torch, name, x, y, device, getattr(torch, jnp.dtype(config.dtype).name))

        def theirs(product=product):
            with _autocast(torch, device, config.dtype):
                out = product()
            _torch_sync(torch, device)
            return out

        torch_seconds, _ = median_time(theirs, repeats + 1)
        x_spec, y_spec = spec.split("->")[0].split(",")
        flops = 2 * math.prod({**dict(zip(x_spec, x_shape)), **dict(zip(y_spec, y_shape))}.values())  # 2 x every index
        rows.append({"kernel": name, "einsum": spec, "lhs": list(x_shape), "rhs": list(y_shape), "flops": flops,
                     "flops_per_s": flops / seconds, "hf_flops_per_s": flops / torch_seconds,
                     "ratio_vs_hf": torch_seconds / seconds})
        progress(f"kernel {name}: {flops / seconds / 1e9:.0f} vs torch {flops / torch_seconds / 1e9:.0f} GFLOP/s")
    return rows


# ---------------------------------------------------------------------------------------------
# Decoding


class T5xDecoder:
    """Jitted `predict_batch` for one (method, length), EOS disabled so every row decodes `length` tokens."""

    def __init__(self, config: T5Config, inputs: np.ndarray, method: str, length: int, beam_size: int):
        model = EncoderDecoderModel(config)
        graphdef, params = nnx.split(model.build_network(nnx.Rngs(0)), nnx.Param)

        def predict(params, inputs):
            batch = {"encoder_input_tokens": inputs}
            return model.predict_batch(
                nnx.merge(graphdef, params), batch, max_decode_length=length,
                decode=DecodeConfig(method=method, beam_size=beam_size, eos_id=-1),
            )

        self.inputs = jnp.asarray(inputs)
        self.params = params
        start = time.perf_counter()
        self.predict = jax.jit(predict).lower(params, self.inputs).compile()
        self.compile_s = time.perf_counter() - start

    def run(self) -> np.ndarray:
        """Decodes; returns the tokens [b, length]."""
        return np.asarray(self.predict(self.params, self.inputs))


class HFDecoder:
    """HF `generate` (KV cache) for one (method, length) with EOS disabled, under autocast for bf16."""

    def __init__(self, config: T5Config, inputs: np.ndarray, method: str, length: int, beam_size: int):
        torch, _ = _import_hf()
        self.torch = torch
        self.model = hf_model(config).eval()
        self.model.generation_config.eos_token_id = None
        self.device = next(self.model.parameters()).device.type
        self.dtype = config.dtype
        self.input_ids = torch.as_tensor(inputs, device=self.device).long()
        self.kwargs = {
            "max_new_tokens": length, "min_new_tokens": length, "do_sample": False, "use_cache": True,
            "num_beams": 1 if method == "greedy" else beam_size,
        }
        self.compile_s = 0.0

    def run(self) -> np.ndarray:
        """Generates; returns the tokens [b, length] (HF's leading decoder start id dropped)."""
        torch = self.torch
        with torch.inference_mode(), _autocast(torch, self.device, self.dtype):
            out = self.model.generate(self.input_ids, attention_mask=torch.ones_like(self.input_ids), **self.kwargs)
        _torch_sync(torch, self.device)
        return out[:, 1:].cpu().numpy()


def _checked_decode(decoder: T5xDecoder | HFDecoder, impl: str, label: str, shape: tuple[int, int]) -> Timed:
    """`decoder.run` that raises unless it made `shape` tokens (EOS disabled: every row decodes the full length)."""

    def run() -> None:
        made = decoder.run().shape
        if made != shape:
            raise RuntimeError(f"{impl} {label} decoding made tokens of shape {made}, not {shape}.")

    return run


def bench_decode(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, dict[str, float]]]:
    """Greedy and beam decoding tokens/s for each length (HF alternating under --compare-hf), plus the
    marginal seconds per decode step between consecutive lengths (flat = constant per-token cost)."""
    config = model_config(args.config, args.dtype, 0.0, args.attention, args.scan_layers, args.kernels)
    batch = args.decode_batch or args.batch
    inputs = synthetic_batch(config.vocab_size, batch, args.inputs_length, 1, seed=1)["encoder_input_tokens"]
    rows, ratios = [], {}
    methods = [("greedy", "greedy")] + ([(f"beam{args.beam_size}", "beam")] if args.beam_size > 1 else [])
    for label, method in methods:
        ratios[label] = {}
        previous: dict[str, tuple[int, float]] = {}
        for length in args.decode_lengths:
            def build(config: T5Config, method=method, length=length) -> T5xDecoder:
                decoder = T5xDecoder(config, inputs, method, length, args.beam_size)
                decoder.run()
                return decoder

            decoders = {"t5x_lite": with_attention_fallback(build, config)[0]}
            if args.compare_hf:
                decoders["hf"] = HFDecoder(config, inputs, method, length, args.beam_size)
            runners = {impl: _checked_decode(decoder, impl, label, (batch, length)) for impl, decoder in decoders.items()}
            times, cpu = time_alternating(runners, max(args.warmup, 1), args.decode_repeats, args.turn_s, args.turns)
            result = {}
            for impl, decoder in decoders.items():
                seconds = statistics.median(times[impl])
                row = {
                    "impl": impl, "method": label, "length": length, "batch": batch, "s": seconds,
                    "cpu_s": statistics.median(cpu[impl]),
                    "tokens_per_s": batch * length / seconds, "ms_per_step": 1e3 * seconds / length,
                    "compile_s": decoder.compile_s,
                }
                if impl in previous:
                    prev_length, prev_s = previous[impl]
                    row["marginal_ms_per_step"] = 1e3 * (seconds - prev_s) / (length - prev_length)
                previous[impl] = (length, seconds)
                result[impl] = row
                rows.append(row)
                progress(f"decode {impl} {label} length {length}: {seconds:.3f} s, {row['tokens_per_s']:.0f} tokens/s")
            if args.compare_hf:
                ratios[label][str(length)] = result["t5x_lite"]["tokens_per_s"] / result["hf"]["tokens_per_s"]
    return rows, ratios


# ---------------------------------------------------------------------------------------------
# Report


def _si(x: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.2f}"


def format_table(results: dict[str, Any]) -> str:
    """The human-readable report of `results` (the dict printed as the final JSON line)."""
    r = results
    dots = "" if r["dot_dtype"] == r["dtype"] else f" (dots in {r['dot_dtype']}: see Kernels.operand_dtype)"
    lines = [
        (f"t5x_lite benchmark: config {r['config']}, batch {r['batch']} x {r['inputs_length']} -> "
         f"{r['targets_length']}, {r['dtype']}{dots}, {r['attention']} attention, device {r['device']}, "
         f"{r['threads']} threads, {r['date']}"),
        (f"peak matmul ({r['peak']['dtype']}, {r['peak']['size']}^2): {_si(r['peak']['flops_per_s'])}FLOP/s; "
         f"model FLOPs per train step {_si(r['flops']['train_step'])} (forward {_si(r['flops']['forward'])})"),
    ]
    if r.get("train"):
        lines += ["", (f"{'train step':<22}{'dropout':>8}{'step s':>9}{'cpu s':>8}{'tokens/s':>11}{'FLOP/s':>10}{'MFU':>7}"
                       f"{'compile s':>11}{'loss':>8}  attention")]
        notes = []
        for row in r["train"]:
            attention = row.get("attention", "")
            lines.append(
                f"{row['impl']:<22}{row['dropout']:>8.2f}{row['step_s']:>9.3f}{row['step_cpu_s']:>8.2f}{row['tokens_per_s']:>11.0f}"
                f"{_si(row['flops_per_s']):>10}{row['mfu']:>7.1%}{row['compile_s']:>11.1f}{row['loss']:>8.3f}  "
                f"{attention.split(' ')[0]}"
            )
            if " " in attention:
                notes.append(f"  attention at dropout {row['dropout']}: {attention}")
        lines += notes
        for rate, ratio in r.get("ratio_vs_hf_by_dropout", {}).items():
            lines.append(f"  t5x_lite / HF tokens/s at dropout {rate}: {ratio:.2f}x")
    if r.get("kernels"):
        lines += ["", f"{'kernel (alone)':<22}{'lhs x rhs':>34}{'GFLOP/s':>10}{'HF':>8}{'ratio':>8}"]
        for row in r["kernels"]:
            shapes = f"{'x'.join(map(str, row['lhs']))} . {'x'.join(map(str, row['rhs']))}"
            lines.append(f"{row['kernel']:<22}{shapes:>34}{row['flops_per_s'] / 1e9:>10.0f}"
                         f"{row['hf_flops_per_s'] / 1e9:>8.0f}{row['ratio_vs_hf']:>7.2f}x")
    if r.get("data"):
        d = r["data"]
        lines += ["", (f"data pipeline ({d['task']}, packed): {d['rows_per_s']:.1f} rows/s, "
                       f"{d['tokens_per_s']:.0f} tokens/s, fill {d['fill']:.0%}")]
        if "step_rows_per_s" in d:
            lines.append(f"  train step consumes {d['step_rows_per_s']:.2f} rows/s -> pipeline is "
                         f"{d['ratio_vs_step']:.1f}x the consumption")
    if r.get("decode"):
        lines += ["", (f"{'decode':<22}{'method':>8}{'length':>8}{'s':>9}{'tokens/s':>11}{'ms/step':>9}"
                       f"{'marginal':>10}{'compile s':>11}")]
        for row in r["decode"]:
            marginal = row.get("marginal_ms_per_step")
            lines.append(
                f"{row['impl']:<22}{row['method']:>8}{row['length']:>8}{row['s']:>9.3f}{row['tokens_per_s']:>11.0f}"
                f"{row['ms_per_step']:>9.2f}{'' if marginal is None else f'{marginal:.2f}':>10}"
                f"{row['compile_s']:>11.1f}"
            )
        for method, by_length in r.get("decode_ratio_vs_hf_by_method", {}).items():
            text = ", ".join(f"{length}: {ratio:.2f}x" for length, ratio in by_length.items())
            lines.append(f"  t5x_lite / HF {method} tokens/s by length: {text}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--config", default="small", help=f"model shape: {', '.join(SHAPES)}")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--inputs_length", type=int, default=512)
    parser.add_argument("--targets_length", type=int, default=114)
    parser.add_argument("--dtype", default=None, help="activation dtype (default float32 on CPU, bfloat16 elsewhere)")
    parser.add_argument("--dropout", type=float, nargs="+", default=[0.0, 0.1], help="dropout rates to time")
    parser.add_argument("--compare-hf", "--compare_hf", dest="compare_hf", action="store_true",
                        help="time HF transformers T5 (PyTorch) alternately on the same work")
    parser.add_argument("--attention", default="auto", help="auto (cuDNN fused on GPU in bf16), einsum, xla, cudnn")
    parser.add_argument("--kernels", default="auto", help="KERNELS: auto (cpu_tuned on CPU, else xla), xla, cpu_tuned")
    parser.add_argument("--scan_layers", default="auto", choices=["auto", "on", "off"],
                        help="scan each layer stack (T5Config.scan_layers); auto: on accelerators (T5-base compiles "
                             "in seconds instead of minutes there), a Python loop on CPU")
    parser.add_argument("--optimizer", default="adamw", help="adamw or adafactor (--compare-hf needs adamw)")
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--warmup", type=int, default=6,
                        help="untimed turns of each timed thing after compiling, alternating like the timed ones "
                             "(both sides share one heap, which settles only after a few rounds of both)")
    parser.add_argument("--turn_s", type=float, default=1.0,
                        help="with --compare-hf, each side runs for this long before the other's turn (0: every run)")
    parser.add_argument("--steps", type=int, default=3, help="timed train steps (median reported)")
    parser.add_argument("--turns", type=int, default=5,
                        help="at least this many turns per side for every timed thing (train steps and decodes)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for both sides (default: all cores)")
    parser.add_argument("--peak_repeats", type=int, default=10)
    parser.add_argument("--peak_size", type=int, default=None)
    parser.add_argument("--data_batches", type=int, default=50, help="timed data-pipeline batches")
    parser.add_argument("--decode_lengths", type=int, nargs="+", default=None,
                        help="new tokens per decode (default: targets_length / 4, / 2, and targets_length)")
    parser.add_argument("--decode_batch", type=int, default=None, help="decode batch size (default --batch)")
    parser.add_argument("--decode_repeats", type=int, default=2, help="timed runs per decode setting")
    parser.add_argument("--beam_size", type=int, default=4, help="beam search width (1 skips beam search)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["train", "data", "decode", "kernels"])
    args = parser.parse_args(argv)
    if args.dtype is not None:
        try:
            jnp.dtype(args.dtype)
        except TypeError:
            raise UserError(f"--dtype {args.dtype!r} is not a dtype name; use float32 or bfloat16.") from None
    if args.compare_hf and args.optimizer != "adamw":
        raise UserError(f"--compare-hf times AdamW on both sides; drop --optimizer {args.optimizer!r}.")
    if args.turn_s < 0:
        raise UserError(f"--turn_s must be >= 0 seconds, got {args.turn_s}.")
    for name in ("batch", "inputs_length", "targets_length", "steps", "turns", "data_batches", "decode_repeats", "beam_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}.")
    if args.decode_lengths is None:
        args.decode_lengths = sorted({max(args.targets_length // 4, 1), max(args.targets_length // 2, 1),
                                      args.targets_length})
    if sorted(set(args.decode_lengths)) != list(args.decode_lengths) or min(args.decode_lengths) < 1:
        raise UserError(f"--decode_lengths must be increasing positive lengths, got {args.decode_lengths}.")
    if "data" not in args.skip:
        from t5x_lite.data.preprocessors import span_corruption

        needed = span_corruption.random_spans_lengths(args.inputs_length)[1]
        if args.targets_length < needed:
            raise UserError(
                f"Span corruption of --inputs_length {args.inputs_length} makes targets of {needed} tokens; "
                f"pass --targets_length >= {needed} (T5: 512 -> 114) or --skip data."
            )
    model_config(args.config, args.dtype or "float32", 0.0, args.attention, kernels=args.kernels)  # rejects bad names early
    return args


def limit_threads(threads: int | None) -> int:
    """Pins this process to `threads` cores (XLA sizes its CPU pool from the affinity when it starts) and
    gives torch as many threads; returns the count used. Call before JAX first runs anything."""
    available = sorted(os.sched_getaffinity(0))
    threads = threads or len(available)
    if not 1 <= threads <= len(available):
        raise UserError(f"--threads {threads} must be between 1 and the {len(available)} cores available.")
    if threads < len(available):
        os.sched_setaffinity(0, available[:threads])
    with contextlib.suppress(ImportError):
        import torch

        torch.set_num_threads(threads)
    return threads


def run(args: argparse.Namespace, threads: int) -> dict[str, Any]:
    """Runs every selected benchmark and returns all figures (the final JSON line)."""
    config = model_config(args.config, args.dtype, 0.0, scan_layers=args.scan_layers, kernels=args.kernels)
    flops = model_flops(config, args.batch, args.inputs_length, args.targets_length)
    peak = measure_peak(args.dtype, args.peak_size, args.peak_repeats, args.kernels)
    progress(f"peak {peak['dtype']} matmul: {peak['flops_per_s'] / 1e9:.1f} GFLOP/s")
    results: dict[str, Any] = {
        "config": args.config, "model": {k: v for k, v in dataclasses.asdict(config).items() if k != "dropout_rate"},
        "batch": args.batch, "inputs_length": args.inputs_length, "targets_length": args.targets_length,
        "dtype": args.dtype, "dot_dtype": peak["dtype"], "optimizer": args.optimizer,
        "kernel_set": kernels_lib.resolve(args.kernels).name, "device": jax.devices()[0].device_kind,
        "attention": attention_lib.attention_impl(args.attention, jnp.dtype(args.dtype), config.head_dim),
        "backend": jax.default_backend(), "threads": threads, "date": time.strftime("%Y-%m-%d"),
        "peak": peak, "flops": flops,
    }
    if "train" not in args.skip:
        results["train"], ratios = bench_train(args, flops, peak["flops_per_s"])
        if args.compare_hf:
            results["ratio_vs_hf_by_dropout"] = ratios
            results["ratio_vs_hf"] = ratios[str(args.dropout[0])]
    if args.compare_hf and "kernels" not in args.skip:
        results["kernels"] = bench_kernels(config, args.batch, args.inputs_length)
    if "decode" not in args.skip:
        results["decode"], decode_ratios = bench_decode(args)
        if args.compare_hf:
            results["decode_ratio_vs_hf_by_method"] = decode_ratios
            results["decode_ratio_vs_hf"] = decode_ratios["greedy"][str(args.decode_lengths[-1])]
    if "data" not in args.skip:
        results["data"] = bench_data(args.batch, args.inputs_length, args.targets_length, args.data_batches)
        if results.get("train"):
            ours = results["train"][0]
            results["data"]["step_rows_per_s"] = args.batch / ours["step_s"]
            results["data"]["ratio_vs_step"] = results["data"]["rows_per_s"] / results["data"]["step_rows_per_s"]
    return results


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    threads = limit_threads(args.threads)  # before JAX starts its CPU thread pool
    if args.compare_hf:  # on a GPU, leave memory for PyTorch instead of preallocating most of it for JAX
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    host_memory.keep_freed_host_memory()  # as the CLIs do (it starts JAX); PyTorch in this process gets it too
    args.dtype = args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    args.scan_layers = args.scan_layers == "on" or (args.scan_layers == "auto" and jax.default_backend() != "cpu")
    results = run(args, threads)
    print(format_table(results))
    print(json.dumps(results), flush=True)
    return results


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        sys.exit(f"error: {e}")
