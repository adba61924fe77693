"""Converts between Hugging Face model directories and t5x_lite checkpoints.

Families: T5 / mT5, BERT (its head from the checkpoint: masked LM, sequence or token classification),
GPT-2, BART and ELECTRA (its head likewise: discriminator, generator, sequence or token classification;
`t5x_lite.hf.registry.supported_model_types()`).

HF -> t5x_lite (an Orbax checkpoint plus a model gin file, for repeated use without `hf:` paths):

    python tools/convert_hf.py --hf_dir=/models/flan-t5-small --out_dir=/models/flan-t5-small-t5x
    python -m t5x_lite.train --gin_file=runs/finetune.gin --gin_file=/models/flan-t5-small-t5x/model.gin \
        --gin.INITIAL_CHECKPOINT_PATH="'/models/flan-t5-small-t5x'" ...

writes OUT/checkpoints/0/state (parameters only), OUT/model.gin (the model config; with a
`spiece.model`, also `get_vocabulary.spm_path`) and copies the tokenizer files into OUT.

t5x_lite -> HF (`config.json`, `model.safetensors` and, with a vocabulary, tokenizer files):

    python tools/convert_hf.py --to_hf --gin_file=models/t5_1_1/small.gin --checkpoint=runs/my_run \
        --out_dir=/models/my_run_hf [--vocab_dir=/models/flan-t5-small | --spm_path=spiece.model]
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Sequence
from pathlib import Path

import gin
import jax
import orbax.checkpoint as ocp

from t5x_lite import cli

cli.keep_tensorflow_off_gpus()  # imports TensorFlow without its C++ start-up logs, before seqio does

import seqio

import t5x_lite.configurables  # noqa: F401  (declares the gin configurables the gin files name)
from t5x_lite import adapters, checkpoints, hf, partitioning
from t5x_lite.data import vocab
from t5x_lite.hf import vocabularies
from t5x_lite.models.base import BaseModel
from t5x_lite.training import train_state

TOKENIZER_FILES = (vocabularies.SPIECE, vocabularies.TOKENIZER_JSON, vocabularies.TOKENIZER_CONFIG,
                   vocabularies.SPECIAL_TOKENS_MAP)


def hf_to_t5x(hf_dir: str, out_dir: str) -> Path:
    """Writes the HF directory's parameters as a t5x_lite checkpoint plus `model.gin`; returns out_dir."""
    checkpoint = hf.open_checkpoint(hf_dir)
    gin_text = hf.model_gin(checkpoint.model(), str(checkpoint.path))
    params = checkpoint.params()
    out = Path(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    with ocp.CheckpointManager(out / "checkpoints", item_names=("state",)) as manager:
        manager.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave({"params": params})))
        manager.wait_until_finished()
    for name in TOKENIZER_FILES:
        if (checkpoint.path / name).is_file():
            shutil.copy(checkpoint.path / name, out / name)
    if (out / vocabularies.SPIECE).is_file():
        extra_ids = hf.load_vocabulary(str(out)).extra_ids
        gin_text += f"get_vocabulary.spm_path = {str(out / vocabularies.SPIECE)!r}\n"
        gin_text += f"get_vocabulary.extra_ids = {extra_ids}\n"
    (out / "model.gin").write_text(gin_text, encoding="utf-8")
    return out


@gin.configurable
def exported_model(model: BaseModel = gin.REQUIRED) -> BaseModel:
    """The model the gin files configure (`MODEL`)."""
    return model


def t5x_to_hf(
    gin_files: Sequence[str], checkpoint_path: str, out_dir: str, vocabulary: seqio.Vocabulary | None = None,
    bindings: Sequence[str] = (),
) -> Path:
    """Writes a t5x_lite checkpoint of the gin-configured model as a HF directory; returns out_dir."""
    cli.parse_gin(gin_files, ["DROPOUT_RATE = 0.0", "ACTIVATION_DTYPE = 'float32'", "KERNELS = 'auto'", *bindings,
                              "exported_model.model = %MODEL"])
    cli.check_config(gin_files, bindings, {"MODEL": cli.MODEL_EXAMPLE})
    model = exported_model()
    mesh = partitioning.make_mesh({"data": -1})
    if adapters.adapter_paths(train_state.network_graphdef(model)[1]):
        raise cli.UserError("The gin files attach adapters (LoRA), which a HF model has no place for; merge them "
                            "first: tools/merge_lora.py --hf_dir writes the merged model.")
    _, params = checkpoints.load_checkpoint_params(model, checkpoint_path, mesh, partitioning.logical_axis_rules())
    return hf.write_pretrained(jax.device_get(params), model, out_dir, vocabulary)


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf_dir", help="HF -> t5x_lite: the Hugging Face model directory.")
    parser.add_argument("--out_dir", required=True, help="Where to write the converted model.")
    parser.add_argument("--to_hf", action="store_true", help="Convert a t5x_lite checkpoint to a HF directory.")
    parser.add_argument("--gin_file", action="append", default=[], help="--to_hf: the model gin file(s).")
    parser.add_argument("--gin_binding", action="append", default=[], help="--to_hf: extra gin bindings.")
    parser.add_argument("--checkpoint", help="--to_hf: a MODEL_DIR, its checkpoints/ folder or a step folder.")
    parser.add_argument("--vocab_dir", help="--to_hf: a HF directory whose tokenizer to write alongside.")
    parser.add_argument("--spm_path", help="--to_hf: a SentencePiece model to write alongside (T5's 100 extra ids).")
    args = parser.parse_args(argv)
    try:
        if not args.to_hf:
            if not args.hf_dir:
                parser.error("--hf_dir is required (or --to_hf to convert the other way).")
            out = hf_to_t5x(args.hf_dir, args.out_dir)
        else:
            if not args.gin_file or not args.checkpoint:
                parser.error("--to_hf needs --gin_file (the model) and --checkpoint.")
            vocabulary = None
            if args.vocab_dir:
                vocabulary = hf.load_vocabulary(args.vocab_dir)
            elif args.spm_path:
                vocabulary = vocab.get_vocabulary(args.spm_path)
            out = t5x_to_hf(args.gin_file, args.checkpoint, args.out_dir, vocabulary, args.gin_binding)
    except (FileNotFoundError, ValueError, cli.UserError) as e:
        raise SystemExit(f"error: {e}") from e
    print(f"Wrote {out}")
    return out


if __name__ == "__main__":
    main()
