"""A seqio `DataSource` over Hugging Face `datasets`: local files, `save_to_disk` folders or the cache.

Nothing is downloaded unless `allow_download=True`: by default the Hub is switched off while loading
(`datasets`' offline mode), so a dataset name that is not cached fails at once instead of fetching.
Rows become tf.data examples with one feature per column (strings, numbers, and lists of them).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from unittest import mock

import seqio
import tensorflow as tf


def _import_datasets():
    try:
        import datasets
    except ImportError as e:
        raise ImportError(
            "HuggingFaceDataSource needs the `datasets` package: pip install -e '.[hf]' (datasets==5.2.0)."
        ) from e
    return datasets


def _tensor_spec(column: str, feature: Any) -> tf.TensorSpec:
    """The tf.data spec of one `datasets` feature: a scalar Value/ClassLabel or a list of them."""
    datasets = _import_datasets()
    shape: list = []
    if isinstance(feature, (datasets.Sequence, datasets.List)) and not isinstance(feature.feature, Mapping):
        feature, shape = feature.feature, [None]
    if isinstance(feature, datasets.ClassLabel):
        return tf.TensorSpec(shape, tf.int64)
    if isinstance(feature, datasets.Value):
        dtype = feature.dtype
        if dtype in ("string", "large_string"):
            return tf.TensorSpec(shape, tf.string)
        if dtype == "bool":
            return tf.TensorSpec(shape, tf.bool)
        if dtype.startswith(("int", "uint")):
            return tf.TensorSpec(shape, tf.int64)
        if dtype.startswith("float"):
            return tf.TensorSpec(shape, tf.float32)
    raise ValueError(
        f"Column {column!r} has the feature {feature!r}, which HuggingFaceDataSource cannot turn into a tensor; "
        "pass columns=[...] naming only string, number or list-of-those columns."
    )


class HuggingFaceDataSource(seqio.DataSource):
    """Examples of a Hugging Face dataset, e.g. `HuggingFaceDataSource("json", data_files={"train": "a.jsonl"})`.

    Args:
      path: what `datasets.load_dataset` takes (a packaged builder such as "json", "csv", "text" or
        "parquet" with `data_files`, a local folder of data files, or a Hub name already in the cache),
        or a folder written by `Dataset(Dict).save_to_disk`.
      name: the dataset configuration, if it has several.
      data_files: files per split, as `load_dataset` takes them.
      splits: seqio split name -> split of the dataset (default: the dataset's own split names).
      columns: the columns to keep (default: all).
      cache_dir: the `datasets` cache to read.
      allow_download: let `datasets` reach the Hub (off: only local files and the cache are used).
    """

    def __init__(
        self,
        path: str,
        name: str | None = None,
        *,
        data_files: str | Sequence[str] | Mapping[str, str | Sequence[str]] | None = None,
        splits: Sequence[str] | Mapping[str, str] | None = None,
        columns: Sequence[str] | None = None,
        cache_dir: str | None = None,
        allow_download: bool = False,
    ):
        self._path, self._name, self._data_files = path, name, data_files
        self._cache_dir, self._allow_download = cache_dir, allow_download
        self._columns = None if columns is None else list(columns)
        if splits is None:
            splits = list(self._loaded)
        self._split_map = dict(splits) if isinstance(splits, Mapping) else {s: s for s in splits}
        super().__init__(splits=list(self._split_map))

    @functools.cached_property
    def _loaded(self):
        """The `datasets.DatasetDict` (memory-mapped Arrow tables; loaded once per source)."""
        datasets = _import_datasets()
        folder = Path(self._path).expanduser()
        if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():
            loaded = datasets.load_from_disk(str(folder))
            return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict({"train": loaded})
        offline = mock.patch.object(datasets.config, "HF_HUB_OFFLINE", not self._allow_download)
        try:
            with offline:
                return datasets.load_dataset(
                    self._path, self._name, data_files=self._data_files, cache_dir=self._cache_dir
                )
        except (ConnectionError, FileNotFoundError) as e:
            hint = "" if self._allow_download else (
                " (only local files and the datasets cache were read; allow_download=True lets `datasets` fetch it)"
            )
            raise FileNotFoundError(f"Could not load Hugging Face dataset {self._path!r}{hint}: {e}") from e

    def _split(self, split: str):
        if split not in self._split_map:
            raise ValueError(f"Split {split!r} is not one of this source's splits {list(self._split_map)}.")
        loaded = self._loaded
        hf_split = self._split_map[split]
        if hf_split not in loaded:
            raise ValueError(f"Dataset {self._path!r} has no split {hf_split!r}; it has {list(loaded)}.")
        dataset = loaded[hf_split]
        if self._columns is not None:
            missing = sorted(set(self._columns) - set(dataset.column_names))
            if missing:
                raise ValueError(f"Dataset {self._path!r} has no columns {missing}; it has {dataset.column_names}.")
            dataset = dataset.select_columns(self._columns)
        return dataset

    @property
    def supports_arbitrary_sharding(self) -> bool:
        return True

    def list_shards(self, split: str) -> Sequence[str]:
        return [f"{self._path}[{self._split_map[split]}]"]

    def num_input_examples(self, split: str) -> int:
        return len(self._split(split))

    def get_dataset(
        self,
        split: str = "train",
        shuffle: bool = True,
        seed: int | None = None,
        shard_info: seqio.ShardInfo | None = None,
        *,
        sequence_length: Mapping[str, int] | None = None,
        use_cached: bool = False,
        num_epochs: int | None = 1,
    ) -> tf.data.Dataset:
        """This process's shard of a split (contiguous rows), shuffled by `datasets` when `shuffle`."""
        del sequence_length, use_cached, num_epochs  # seqio repeats and trims after the source
        dataset = self._split(split)
        if shard_info is not None and shard_info.num_shards > 1:
            dataset = dataset.shard(shard_info.num_shards, shard_info.index, contiguous=True)
        if shuffle:
            dataset = dataset.shuffle(seed=seed)
        signature = {column: _tensor_spec(column, feature) for column, feature in dataset.features.items()}
        return tf.data.Dataset.from_generator(lambda: iter(dataset), output_signature=signature)
