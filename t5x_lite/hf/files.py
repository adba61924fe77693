"""Reading and writing the files of a Hugging Face model directory, without PyTorch where possible.

A directory holds `config.json` and the weights as `model.safetensors`, sharded safetensors with
`model.safetensors.index.json`, or (older checkpoints) `pytorch_model.bin`, possibly sharded with
`pytorch_model.bin.index.json`. Safetensors are read with the `safetensors` package's numpy loader
(bfloat16, which numpy lacks, through `ml_dtypes`); `.bin` files need PyTorch. The directory may be local or
gs://: weight files in a bucket are read from a local copy (`storage.local_file`; safetensors maps local files).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator, Mapping

import ml_dtypes
import numpy as np
from etils import epath
from safetensors import safe_open
from safetensors.numpy import save_file

from t5x_lite import storage

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PYTORCH_BIN = "pytorch_model.bin"
PYTORCH_BIN_INDEX = "pytorch_model.bin.index.json"
WEIGHT_FILES = (SAFETENSORS, SAFETENSORS_INDEX, PYTORCH_BIN, PYTORCH_BIN_INDEX)


def model_dir(path: str | os.PathLike) -> epath.Path:
    """The directory as an `epath.Path`; a missing directory or `config.json` is a `FileNotFoundError`."""
    folder = storage.path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"Hugging Face model directory {str(path)!r} does not exist.")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{str(path)!r} has no config.json, so it is not a Hugging Face model directory; pass the folder "
            "that holds config.json and the weights (e.g. a `save_pretrained` output or a hub snapshot)."
        )
    return folder


def read_config(path: str | os.PathLike) -> dict:
    """The parsed `config.json` of a model directory."""
    return json.loads((model_dir(path) / "config.json").read_text(encoding="utf-8"))


def _local(file: epath.Path) -> str:
    """A local path with the content of a weight file (the file itself when local)."""
    return storage.local_file(str(file))


def _read_bfloat16(file: epath.Path, name: str) -> np.ndarray:
    """One BF16 tensor of a safetensors file as float32, read from the file's header offsets."""
    with open(_local(file), "rb") as f:
        (header_size,) = struct.unpack("<Q", f.read(8))
        entry = json.loads(f.read(header_size))[name]
        start, end = entry["data_offsets"]
        f.seek(8 + header_size + start)
        data = f.read(end - start)
    return np.frombuffer(data, ml_dtypes.bfloat16).reshape(entry["shape"]).astype(np.float32)


class Weights(Mapping):
    """The checkpoint's tensors by Hugging Face name, read lazily (one at a time) as numpy arrays.

    Half-precision tensors are returned as float32 (t5x_lite keeps parameters in float32).
    """

    def __init__(self, path: str | os.PathLike):
        self.folder = model_dir(path)
        self._files: dict[str, epath.Path] = {}  # tensor name -> file holding it
        self._torch_cache: dict[epath.Path, dict] = {}
        found = next((name for name in WEIGHT_FILES if (self.folder / name).is_file()), None)  # in that preference
        if found is None:
            raise FileNotFoundError(f"{str(path)!r} has no weights: expected one of {', '.join(WEIGHT_FILES)}.")
        add = {SAFETENSORS: self._add_safetensors, PYTORCH_BIN: self._add_torch}.get(found, self._add_index)  # an index
        add(self.folder / found)

    def _add_safetensors(self, file: epath.Path) -> None:
        with safe_open(_local(file), framework="numpy") as f:
            self._files.update(dict.fromkeys(f.keys(), file))

    def _add_torch(self, file: epath.Path) -> None:
        self._files.update({name: file for name in self._torch_state_dict(file)})

    def _add_index(self, index: epath.Path) -> None:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        for name, shard in weight_map.items():
            file = index.parent / shard
            if not file.is_file():
                raise FileNotFoundError(f"{index} names shard {shard!r} for {name!r}, but {file} does not exist.")
            self._files[name] = file

    def _torch_state_dict(self, file: epath.Path) -> dict:
        if file not in self._torch_cache:
            try:
                import torch
            except ImportError as e:
                raise ImportError(
                    f"{file} is a PyTorch pickle; reading it needs PyTorch: pip install torch==2.13.0 "
                    "(the CPU wheel), or convert the checkpoint to model.safetensors first."
                ) from e
            self._torch_cache[file] = torch.load(_local(file), map_location="cpu", weights_only=True)
        return self._torch_cache[file]

    def __getitem__(self, name: str) -> np.ndarray:
        file = self._files[name]
        if file.suffix != ".safetensors":
            return self._torch_state_dict(file)[name].float().numpy()
        with safe_open(_local(file), framework="numpy") as f:
            if f.get_slice(name).get_dtype() == "BF16":
                return _read_bfloat16(file, name)
            array = f.get_tensor(name)
        return array.astype(np.float32) if array.dtype == np.float16 else array

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


def write_model(path: str | os.PathLike, config: Mapping, tensors: Mapping[str, np.ndarray]) -> epath.Path:
    """Writes `config.json` and `model.safetensors` (float32, contiguous) into `path` (created; local or gs://)."""
    folder = storage.path(path).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    arrays = {name: np.ascontiguousarray(value, dtype=np.float32) for name, value in tensors.items()}
    with storage.staged_prefix(str(folder / SAFETENSORS), upload=True) as local:  # safetensors writes local files
        save_file(arrays, local, metadata={"format": "pt"})
    return folder
