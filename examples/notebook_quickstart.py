"""The Python API step by step, as in a notebook: load the quickstart checkpoint, fine-tune it on a few dozen
of the bundled QA pairs, then predict and score with the fine-tuned parameters.

    python examples/notebook_quickstart.py            # from the repository root

Without the README quickstart's checkpoint (`runs/quickstart`) it first pre-trains the quickstart briefly into
that folder (the README's command later continues that run). The last line printed is JSON, for scripts.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import t5x_lite

QUICKSTART = "runs/quickstart"
QA_DIR = Path(t5x_lite.__file__).resolve().parent / "data" / "bundled" / "qa"
REPO = Path(t5x_lite.__file__).resolve().parent.parent


def qa_pairs(split: str, count: int) -> list[tuple[str, str]]:
    """(question \\n context, answer) pairs of the bundled extractive QA set, lower-cased as UnifiedQA writes them."""
    lines = (QA_DIR / f"extractive_{split}.jsonl").read_text(encoding="utf-8").splitlines()[:count]
    records = [json.loads(line) for line in lines]
    return [(f"{r['question']} \\n {r['context']}".lower(), r["answers"][0].lower()) for r in records]


def ensure_quickstart(model_dir: str, steps: int) -> None:
    """Pre-trains the README's quickstart for `steps` steps where no checkpoint is (the command line, as there)."""
    if (Path(model_dir) / "checkpoints").is_dir():
        return
    print(f"No checkpoint in {model_dir}: pre-training the quickstart for {steps} steps first.", flush=True)
    subprocess.run([sys.executable, "-m", "t5x_lite.train", f"--gin_file={REPO / 'gin_configs' / 'quickstart.gin'}",
                    f"--gin.MODEL_DIR='{model_dir}'", f"--gin.TRAIN_STEPS={steps}", "--gin.train.eval_period=0"],
                   check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=QUICKSTART, help="a MODEL_DIR, step folder or hf:/dir to start from")
    parser.add_argument("--pretrain_steps", type=int, default=100, help="pre-training steps if there is no checkpoint")
    parser.add_argument("--examples", type=int, default=48, help="QA pairs to fine-tune on")
    parser.add_argument("--steps", type=int, default=60, help="fine-tuning steps")
    parser.add_argument("--model_dir", default="runs/notebook_qa", help="the fine-tuning run's folder")
    args = parser.parse_args()

    # 1. Load a checkpoint: a MODEL_DIR (its newest step), a step folder, or a Hugging Face folder ("hf:/...").
    if args.checkpoint == QUICKSTART:
        ensure_quickstart(args.checkpoint, args.pretrain_steps)
    model = t5x_lite.load(args.checkpoint)
    print(model)

    # 2. Predict before fine-tuning: span-corruption pre-training never asked for answers.
    questions, answers = zip(*qa_pairs("validation", 4))
    before = model.predict(list(questions))

    # 3. Fine-tune on (question, answer) pairs: the same train() loop, checkpoints and mesh as the command line.
    model.train(qa_pairs("train", args.examples), steps=args.steps, model_dir=args.model_dir, BATCH_SIZE=8)

    # 4. Predict and score with the fine-tuned parameters the model now holds.
    after = model.predict(list(questions))
    scores = model.score(list(questions), list(answers))
    for question, answer, old, new, score in zip(questions, answers, before, after, scores):
        print(f"{question[:60]}...\n  answer {answer!r}  before {old!r}  after {new!r}  log-likelihood {score:.2f}")
    print(json.dumps({"model_dir": args.model_dir, "before": before, "after": after, "scores": scores}))


if __name__ == "__main__":
    main()
