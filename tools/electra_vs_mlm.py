"""ELECTRA's claim at equal pre-training compute: fine-tuning its discriminator scores at least as well
as fine-tuning a BERT pre-trained with masked language modelling.

    python tools/electra_vs_mlm.py --out_dir runs/electra_vs_mlm

For each seed, each run driven through gin as `python -m t5x_lite.train` drives it
(`tools/pretraining_helps.run_training`):

1. pre-train BERT tiny with MLM (`gin_configs/examples/bert_tiny_pretrain.gin`) for `--mlm_steps`;
2. pre-train ELECTRA (`gin_configs/examples/electra_tiny_pretrain.gin`: the same BERT tiny as the
   discriminator, a 1/4-wide generator, same data, batch, schedule shape and seed) for as many steps as
   the same pre-training FLOPs buy (`pretraining_flops`, counted the same way for both);
3. fine-tune each on the bundled classification task (`gin_configs/examples/bert_tiny_classify.gin`,
   Shakespeare or Milton; the encoder from the checkpoint, a fresh pooler and classifier) and read
   the validation accuracy after the last step.

FLOPs are those of the matrix products of a training step (3 x the forward pass: backward is twice
the forward), per token: 2 x the weights each token meets in every dense layer, 4 x length x width
for attention's scores and weighted sum, and the output layers at the positions they are computed
at (MLM and the generator: the 15% chosen positions; the discriminator: every position).
Prints a table and ends with one JSON line: `electra` and `mlm` (`mean`, `std`, `seeds` of the
fine-tuned score), `flops` (each pre-training's total, per step, steps), `metric` and the settings;
`OUT_DIR/results.json` holds the same.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import gin

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))

PRETRAIN_GIN = {"mlm": "examples/bert_tiny_pretrain.gin", "electra": "examples/electra_tiny_pretrain.gin"}
FINETUNE_GIN = "examples/bert_tiny_classify.gin"
TASK = "bundled_cls_single"
METRIC = f"eval/{TASK}/accuracy"
MASK_RATE = 0.15  # the MLM task's chosen fraction of the text tokens ([CLS] and [SEP] are never chosen)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default="runs/electra_vs_mlm")
    parser.add_argument("--overwrite", action="store_true", help="delete the runs of an earlier invocation in OUT_DIR first")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="RANDOM_SEED of each twin pair")
    parser.add_argument("--mlm_steps", type=int, default=300, help="MLM pre-training steps (ELECTRA's follow from the FLOPs)")
    parser.add_argument("--batch_size", type=int, default=32, help="pre-training BATCH_SIZE (both)")
    parser.add_argument("--length", type=int, default=128, help="pre-training sequence length (both)")
    parser.add_argument("--finetune_steps", type=int, default=300)
    parser.add_argument("--finetune_batch_size", type=int, default=32)
    parser.add_argument("--eval_examples", type=int, default=None, help="validation excerpts classified (default: all 666)")
    parser.add_argument("--eval_steps", type=int, default=5, help="batches of each run's validation loss")
    parser.add_argument("--gin", action="append", default=[], metavar="BINDING",
                        help="extra gin binding for both pre-training runs (repeatable)")
    parser.add_argument("--no_progress_bar", action="store_true")
    return parser.parse_args(argv)


# ------------------------------------------------------------------ FLOPs


def encoder_flops_per_token(d_model: int, heads_width: int, d_ff: int, num_layers: int, length: int, embedding_width: int) -> int:
    """Forward FLOPs per token of a BERT encoder: Q, K, V and output projections, the MLP, attention's
    scores and weighted sum over `length` positions, and the projection from narrower embeddings."""
    dense = 2 * (4 * d_model * heads_width + 2 * d_model * d_ff)
    attention = 2 * 2 * length * heads_width
    project = 2 * embedding_width * d_model if embedding_width != d_model else 0
    return num_layers * (dense + attention) + project


def _encoder(config, length: int, embedding_width: int) -> int:
    return encoder_flops_per_token(config.d_model, config.num_heads * config.head_dim, config.d_ff, config.num_layers,
                                   length, embedding_width)


def pretraining_flops(model, batch_size: int, length: int) -> int:
    """Training FLOPs of one pre-training step of `model` (`EncoderOnlyMLMModel` or `ElectraModel`):
    3 x the forward pass's matrix products (see the module docstring)."""
    from t5x_lite.models.electra import ElectraModel

    config, tokens = model.config, batch_size * length
    chosen = batch_size * round(MASK_RATE * (length - 2))
    vocab = 2 * config.vocab_size
    if isinstance(model, ElectraModel):
        generator, width = config.generator_config(), config.embedding_width
        forward = tokens * (_encoder(generator, length, width) + _encoder(config, length, width))
        forward += chosen * (2 * generator.d_model * width + width * vocab)  # generator head and logits
        forward += tokens * (2 * config.d_model * config.d_model + 2 * config.d_model)  # discriminator head
    else:
        forward = tokens * _encoder(config, length, config.d_model)
        forward += chosen * (2 * config.d_model * config.d_model + config.d_model * vocab)  # MLM head and logits
    return 3 * forward


@gin.configurable("electra_vs_mlm_model")
def _model_from_gin(model=gin.REQUIRED):
    return model


def gin_model(gin_file: str, bindings: list[str]):
    """The trainer model `gin_file` (with `bindings`) configures."""
    from t5x_lite import cli

    gin.clear_config()
    try:
        cli.parse_gin([gin_file], [*bindings, "electra_vs_mlm_model.model = %MODEL"])
        return _model_from_gin()
    finally:
        gin.clear_config()


# ------------------------------------------------------------------ runs


def final_score(model_dir: Path) -> float:
    """The fine-tuned run's last validation accuracy (percent)."""
    records = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    return [r[METRIC] for r in records if METRIC in r][-1]


def summary_stats(values: list[float]) -> dict:
    return {"mean": round(statistics.fmean(values), 2), "std": round(statistics.stdev(values), 2) if len(values) > 1 else 0.0,
            "seeds": [round(v, 2) for v in values]}


def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.time()
    out_dir = Path(args.out_dir).resolve()
    owned = [out_dir / f"{kind}_seed{seed}" for seed in args.seeds for kind in
             ("mlm_pretrain", "electra_pretrain", "mlm_finetune", "electra_finetune")]
    from pretraining_helps import claim_out_dir, run_training, set_up_runtime

    claim_out_dir(out_dir, owned, args.overwrite)
    set_up_runtime()
    progress = ["train.progress_bar = False"] if args.no_progress_bar else []
    shape = [f"BATCH_SIZE = {args.batch_size}", f"TASK_FEATURE_LENGTHS = {{'inputs': {args.length}, 'targets': {args.length}}}",
             *args.gin]
    per_step = {kind: pretraining_flops(gin_model(gin_file, shape), args.batch_size, args.length)
                for kind, gin_file in PRETRAIN_GIN.items()}
    steps = {"mlm": args.mlm_steps, "electra": max(1, round(args.mlm_steps * per_step["mlm"] / per_step["electra"]))}
    flops = {kind: {"total": per_step[kind] * steps[kind], "per_step": per_step[kind], "steps": steps[kind]} for kind in steps}
    print(f"== Equal pre-training compute: MLM {steps['mlm']} steps x {per_step['mlm']:.3g} FLOPs, ELECTRA "
          f"{steps['electra']} steps x {per_step['electra']:.3g} FLOPs", flush=True)

    scores: dict[str, list[float]] = {"electra": [], "mlm": []}
    timings: dict[str, float] = {}
    for seed in args.seeds:
        for kind in ("mlm", "electra"):
            pretrain_dir, finetune_dir = out_dir / f"{kind}_pretrain_seed{seed}", out_dir / f"{kind}_finetune_seed{seed}"
            print(f"== Seed {seed}: pre-training {kind} ({steps[kind]} steps)", flush=True)
            t0 = time.time()
            run_training([PRETRAIN_GIN[kind]], [
                f"MODEL_DIR = '{pretrain_dir}'", f"TRAIN_STEPS = {steps[kind]}", f"RANDOM_SEED = {seed}", *shape,
                f"train.eval_steps = {args.eval_steps}", f"train.eval_period = {steps[kind]}",
                f"train.checkpoint_period = {steps[kind]}", *progress,
            ])
            print(f"== Seed {seed}: fine-tuning the {kind} encoder on {TASK}", flush=True)
            run_training([FINETUNE_GIN], [
                f"MODEL_DIR = '{finetune_dir}'", f"INITIAL_CHECKPOINT_PATH = '{pretrain_dir}'", f"RANDOM_SEED = {seed}",
                f"TRAIN_STEPS = {args.finetune_steps}", f"BATCH_SIZE = {args.finetune_batch_size}",
                f"train.eval_period = {args.finetune_steps}", f"train.eval_steps = {args.eval_steps}",
                f"train.checkpoint_period = {args.finetune_steps}", f"make_evaluator.num_examples = {args.eval_examples}",
                "train.best_metric = None", *progress,
            ])
            timings[f"{kind}_seed{seed}"] = round(time.time() - t0, 1)
            scores[kind].append(final_score(finetune_dir))

    print(f"\n{'pre-training':<13} {'steps':>6} {'FLOPs':>10} {METRIC + ' (mean +- std)':>42}  seeds")
    for kind in ("electra", "mlm"):
        stats = summary_stats(scores[kind])
        print(f"{kind:<13} {steps[kind]:>6} {flops[kind]['total']:>10.3g} {stats['mean']:>33.2f} +- {stats['std']:<5.2f}  "
              f"{stats['seeds']}")
    summary = {
        "electra": summary_stats(scores["electra"]),
        "mlm": summary_stats(scores["mlm"]),
        "flops": flops,
        "metric": METRIC,
        "settings": {"seeds": args.seeds, "batch_size": args.batch_size, "length": args.length,
                     "finetune_steps": args.finetune_steps, "finetune_batch_size": args.finetune_batch_size,
                     "eval_examples": args.eval_examples, "pretrain_gin": PRETRAIN_GIN, "finetune_gin": FINETUNE_GIN,
                     "extra_gin": args.gin},
        "seconds": {**timings, "total": round(time.time() - start, 1)},
    }
    (out_dir / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
