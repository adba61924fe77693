"""Merges a LoRA run's adapters into its base: a full t5x_lite checkpoint of the same function, and optionally
the merged model as a Hugging Face directory and the adapters alone as a PEFT adapter folder.

    python tools/merge_lora.py --gin_file=examples/lora_finetune_qa.gin --checkpoint=runs/qa_lora \
        --out_dir=runs/qa_lora_merged [--hf_dir=runs/qa_lora_hf] [--peft_dir=runs/qa_lora_peft]

The gin files are the run's (they configure the model and `LoRAConfig`); the base parameters come from the
INITIAL_CHECKPOINT_PATH in the run's config.gin, as for eval and infer. OUT_DIR/checkpoints/0/state holds the
merged parameters (W + A B * alpha / rank): train, eval or infer it with the model's gin file and no LoRA.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import gin
import jax
import orbax.checkpoint as ocp

from t5x_lite import cli

cli.keep_tensorflow_off_gpus()  # imports TensorFlow without its C++ start-up logs, before seqio does

import t5x_lite.configurables  # noqa: F401  (declares the gin configurables the gin files name)
from t5x_lite import adapters, checkpoints, hf, partitioning
from t5x_lite.adapters import lora
from t5x_lite.hf import peft
from t5x_lite.models.base import BaseModel
from t5x_lite.nn import stacks
from t5x_lite.training import train_state


@gin.configurable
def merged_model(model: BaseModel = gin.REQUIRED) -> BaseModel:
    """The model the gin files configure (`MODEL`)."""
    return model


def load_run(gin_files: Sequence[str], checkpoint_path: str, bindings: Sequence[str] = ()):
    """(model, LoRAConfig, params with adapters) of the LoRA run's checkpoint, on the host."""
    cli.parse_gin(gin_files, ["DROPOUT_RATE = 0.0", "ACTIVATION_DTYPE = 'float32'", "KERNELS = 'auto'", *bindings,
                              "merged_model.model = %MODEL"])
    model = merged_model()
    config = lora.LoRAConfig()
    if not adapters.adapter_paths(train_state.network_graphdef(model)[1]):
        raise cli.UserError("The gin files attach no LoRA (add_adapters.lora = @LoRAConfig()); pass the run's gin files.")
    mesh = partitioning.make_mesh({"data": -1})
    _, params = checkpoints.load_checkpoint_params(model, checkpoint_path, mesh, partitioning.logical_axis_rules())
    return model, config, jax.device_get(params)


def unscanned(params: dict) -> dict:
    """Params in the per-layer layout (HF and PEFT files are per layer)."""
    try:
        return stacks.unstack_layer_params(params)
    except ValueError:  # already per layer
        return params


def write_checkpoint(params: dict, out_dir: str) -> Path:
    """OUT_DIR/checkpoints/0/state holding `params` only (what INITIAL_CHECKPOINT_PATH and CHECKPOINT_PATH read)."""
    out = Path(out_dir).absolute()
    with ocp.CheckpointManager(out / "checkpoints", item_names=("state",)) as manager:
        manager.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave({"params": params})))
        manager.wait_until_finished()
    return out


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gin_file", action="append", required=True, help="The LoRA run's gin file(s).")
    parser.add_argument("--gin_binding", action="append", default=[], help="Extra gin bindings (as the run's).")
    parser.add_argument("--checkpoint", required=True, help="The run's MODEL_DIR, checkpoints/ folder or a step folder.")
    parser.add_argument("--out_dir", required=True, help="Where to write the merged t5x_lite checkpoint.")
    parser.add_argument("--hf_dir", help="Also write the merged model as a Hugging Face directory here.")
    parser.add_argument("--peft_dir", help="Also write the adapters as a PEFT adapter folder here.")
    args = parser.parse_args(argv)
    try:
        model, config, params = load_run(args.gin_file, args.checkpoint, args.gin_binding)
        merged = lora.merged_params(params, config.scale)
        out = write_checkpoint(merged, args.out_dir)
        if args.hf_dir:
            print(f"Wrote {hf.write_pretrained(merged, model, args.hf_dir)}")
        if args.peft_dir:
            base = checkpoints.adapter_base_path(checkpoints.find_state_dir(args.checkpoint))
            folder = peft.save_adapter(unscanned(params), model.config, config, args.peft_dir, base)
            print(f"Wrote {folder}")
    except (FileNotFoundError, ValueError, cli.UserError) as e:
        raise SystemExit(f"error: {e}") from e
    print(f"Wrote {out}")
    return out


if __name__ == "__main__":
    main()
