"""One path abstraction for every file a run reads or writes: local paths and `gs://` through `etils.epath`.

`path(p)` is the way in: an `epath.Path` that works the same for `/local/x` and `gs://bucket/x`. For `gs://`
epath would use TensorFlow's GCS file system, which knows only Google's own endpoint, so this module points
epath at `TensorstoreGcs` instead: a small fsspec file system over TensorStore's GCS key-value store, the
client Orbax already writes its arrays with. Both then honour one endpoint and one set of credentials:

* credentials come from the environment, as Google's tools find them (`GOOGLE_APPLICATION_CREDENTIALS`, the file
  `gcloud auth application-default login` writes, or the metadata server of a GCE/TPU VM); nothing is stored;
* `STORAGE_EMULATOR_HOST=http://127.0.0.1:PORT` (the variable Google's storage clients use for an emulator) sends
  every `gs://` request of the process to that emulator, with no credential lookup at all.

Readers that only take a local file (TensorFlow's tf.data and checkpoints, SentencePiece, safetensors) get one
from `local_file` (a per-process copy of a remote file) and write through `staged_prefix`; files that grow by
appends (metrics.jsonl, TensorBoard events) go through `GrowingFile`, since an object has no append.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import glob as globlib
import io
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import fsspec
from etils import epath

EMULATOR_VARIABLE = "STORAGE_EMULATOR_HOST"
# TensorStore's generation of "no such key": a write conditional on it only creates (GCS: ifGenerationMatch=0).
NO_VALUE_GENERATION = b"\x02"


def is_remote(p: str | os.PathLike) -> bool:
    """Whether `p` names an object store (`gs://...`) rather than a local file."""
    return "://" in os.fspath(p)


def path(p: str | os.PathLike) -> epath.Path:
    """`p` as an `epath.Path`, with `gs://` served by `TensorstoreGcs` (see the module docstring)."""
    configure()
    return epath.Path(p)


def glob(pattern: str) -> list[str]:
    """The files and folders matching a glob pattern (`*`, `?`, `[...]`), local or gs://, sorted."""
    if not is_remote(pattern):
        return sorted(globlib.glob(pattern))
    return sorted(f"gs://{match}" for match in gcs().glob(pattern))


def absolute(p: str | os.PathLike) -> epath.Path:
    """`path(p)`, made absolute when local (Orbax needs absolute local paths)."""
    return path(p if is_remote(p) else os.path.abspath(p))


@functools.cache
def configure() -> None:
    """Once per process: `gs://` paths of epath (ours and Orbax's) go to `TensorstoreGcs`, and an emulator named by
    `STORAGE_EMULATOR_HOST` receives every GCS request of TensorStore (so of Orbax's arrays too)."""
    emulator = os.environ.get(EMULATOR_VARIABLE)
    if emulator:
        os.environ["TENSORSTORE_GCS_HTTP_URL"] = emulator if "://" in emulator else f"http://{emulator}"
        # An emulator needs no credentials: a fixed token keeps TensorStore from looking any up (and from sending
        # real ones to the emulator).
        os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")
    os.environ["EPATH_USE_TF"] = "false"  # epath's gs:// then goes through fsspec, i.e. TensorstoreGcs
    for protocol in TensorstoreGcs.protocol:
        fsspec.register_implementation(protocol, TensorstoreGcs, clobber=True)
    _orbax_without_google_cloud_storage()


def _orbax_without_google_cloud_storage() -> None:
    """Orbax asks the `google-cloud-storage` package whether a bucket has a hierarchical namespace before it lists
    or deletes steps; without that package (not a dependency) every bucket counts as flat, which is what lets
    Orbax work at all (its extra folder clean-up on such buckets is then skipped)."""
    try:
        from google.cloud import storage  # noqa: F401
    except ImportError:
        from orbax.checkpoint._src.path import gcs_utils

        gcs_utils.is_hierarchical_namespace_enabled = lambda _path: False


# ----------------------------------------------------------------------------------------- gs:// file system


def _split(p: str) -> tuple[str, str]:
    """`bucket/key` (protocol stripped) -> (bucket, key)."""
    bucket, _, key = p.partition("/")
    return bucket, key.strip("/")


def _prefix_range(prefix: str) -> Any:
    """The TensorStore key range of all keys starting with `prefix` (which ends in '/', or is empty)."""
    import tensorstore as ts

    if not prefix:
        return ts.KvStore.KeyRange()
    return ts.KvStore.KeyRange(prefix, prefix[:-1] + chr(ord(prefix[-1]) + 1))


class TensorstoreGcs(fsspec.AbstractFileSystem):
    """`gs://` as an fsspec file system over TensorStore's GCS key-value store (the driver Orbax saves arrays with).

    Folders are key prefixes; `mkdir` writes an empty `folder/` marker object as TensorFlow's GCS file system does,
    so a new empty folder exists. Object sizes and times are not known (TensorStore reports neither): `info`
    gives `size` None.
    """

    protocol = ("gs", "gcs")
    root_marker = ""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.pop("finalize_on_close", None)  # epath passes gcsfs's option
        super().__init__(*args, **kwargs)
        self._stores: dict[tuple[str, str | None], Any] = {}

    def _store(self, bucket: str) -> Any:
        """The bucket's key-value store, opened once per endpoint (a store keeps the endpoint it was opened with)."""
        endpoint = os.environ.get("TENSORSTORE_GCS_HTTP_URL")
        if (bucket, endpoint) not in self._stores:
            import tensorstore as ts

            spec = {"driver": "gcs", "bucket": bucket}
            self._stores[bucket, endpoint] = ts.KvStore.open(spec, context=ts.Context()).result()
        return self._stores[bucket, endpoint]

    def _wait(self, future: Any, what: str, target: str) -> Any:
        """The future's result; a failed request (TensorStore raises ValueError) is an OSError naming the object."""
        try:
            return future.result()
        except ValueError as e:
            raise OSError(f"{what} gs://{target} failed: {e}") from e

    def _keys(self, bucket: str, prefix: str) -> list[str]:
        """Every key starting with `prefix` (filtered here too: an emulator may ignore the listed range)."""
        keys = self._wait(self._store(bucket).list(_prefix_range(prefix)), "listing", f"{bucket}/{prefix}")
        return sorted(k.decode() for k in keys if k.decode().startswith(prefix))

    def _read(self, bucket: str, key: str, metadata_only: bool = False) -> Any:
        future = self._store(bucket).read(key, byte_range=slice(0, 0) if metadata_only else None)
        return self._wait(future, "reading", f"{bucket}/{key}")

    def _write(self, bucket: str, key: str, data: bytes | None, condition: bytes | None = None) -> Any:
        """Writes (None: deletes) one object, if `condition` is given only if its generation matches."""
        future = self._store(bucket).write(key, data, if_equal=condition)
        return self._wait(future, "writing" if data is not None else "deleting", f"{bucket}/{key}")

    def read_object(self, p: str) -> bytes:
        """The bytes of the object `p`; FileNotFoundError if there is none."""
        bucket, key = _split(self._strip_protocol(p))
        result = self._read(bucket, key)
        if result.state != "value":
            raise FileNotFoundError(f"gs://{bucket}/{key}")
        return result.value

    def write_object(self, p: str, data: bytes, exclusive: bool = False) -> bool:
        """Writes the object `p`; with `exclusive`, only if none exists (a GCS conditional write). False if one did."""
        bucket, key = _split(self._strip_protocol(p))
        stamp = self._write(bucket, key, bytes(data), NO_VALUE_GENERATION if exclusive else None)
        return not exclusive or bool(stamp.generation)

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list:
        path = self._strip_protocol(path)
        bucket, key = _split(path)
        prefix = f"{key}/" if key else ""
        entries: dict[str, dict] = {}
        for name in self._keys(bucket, prefix):
            head, sep, _ = name[len(prefix):].partition("/")
            if head:  # not the folder's own marker
                full = f"{bucket}/{prefix}{head}"
                entries[full] = {"name": full, "size": None, "type": "directory" if sep else "file"}
        if not entries:
            info = self.info(path)  # a file lists as itself; a missing path is FileNotFoundError
            if info["type"] == "file":
                entries[info["name"]] = info
        return list(entries.values()) if detail else list(entries)

    def info(self, path: str, **kwargs: Any) -> dict:
        path = self._strip_protocol(path)
        bucket, key = _split(path)
        if not key:
            return {"name": bucket, "size": None, "type": "directory"}
        if self._read(bucket, key, metadata_only=True).state == "value":
            return {"name": path, "size": None, "type": "file"}
        if self._keys(bucket, f"{key}/"):
            return {"name": path, "size": None, "type": "directory"}
        raise FileNotFoundError(f"gs://{path}")

    def mkdir(self, path: str, create_parents: bool = True, **kwargs: Any) -> None:
        bucket, key = _split(self._strip_protocol(path))
        if key and not self.isdir(path):
            self._write(bucket, f"{key}/", b"")

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        self.mkdir(path)

    def rmdir(self, path: str) -> None:
        bucket, key = _split(self._strip_protocol(path))
        self._write(bucket, f"{key}/", None)

    def rm_file(self, path: str) -> None:
        bucket, key = _split(self._strip_protocol(path))
        self._write(bucket, key, None)

    def rm(self, path: str | list, recursive: bool = False, maxdepth: int | None = None) -> None:
        for p in [path] if isinstance(path, str) else path:
            bucket, key = _split(self._strip_protocol(p))
            kind = self.info(p)["type"]  # FileNotFoundError if there is nothing
            keys = [key] if kind == "file" else self._keys(bucket, f"{key}/") if recursive else [f"{key}/"]
            store = self._store(bucket)
            for k, future in [(k, store.write(k, None)) for k in keys]:  # deleted in parallel
                self._wait(future, "deleting", f"{bucket}/{k}")

    def cp_file(self, path1: str, path2: str, **kwargs: Any) -> None:
        self.write_object(path2, self.read_object(path1))

    def open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        if "b" not in mode:
            kwargs.setdefault("encoding", "utf-8")
        return super().open(path, mode, **kwargs)

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> io.BytesIO:
        if mode == "rb":
            return io.BytesIO(self.read_object(path))
        if mode in ("wb", "ab"):
            return _ObjectWriter(self, path, self.read_object(path) if mode == "ab" and self.isfile(path) else b"")
        raise ValueError(f"mode {mode!r} is not supported for gs:// files")


class _ObjectWriter(io.BytesIO):
    """A file being written to an object: its bytes are uploaded whole on `flush` (when changed) and on `close`."""

    def __init__(self, fs: TensorstoreGcs, path: str, initial: bytes):
        super().__init__(initial)
        self.seek(0, io.SEEK_END)
        self._fs, self._path, self._uploaded = fs, path, None

    def flush(self) -> None:
        super().flush()
        if not self.closed and self.getvalue() != self._uploaded:  # None at first: even an empty file is written
            self._uploaded = self.getvalue()
            self._fs.write_object(self._path, self._uploaded)

    def close(self) -> None:
        if not self.closed:
            self.flush()
        super().close()


def gcs() -> TensorstoreGcs:
    """The `gs://` file system (configured)."""
    configure()
    return fsspec.filesystem("gs")


# ------------------------------------------------------------------------------------- local stand-ins


@functools.cache
def _scratch() -> str:
    """A folder for this process's local copies of remote files, removed when the process ends."""
    folder = tempfile.mkdtemp(prefix="t5x_lite_storage_")
    atexit.register(shutil.rmtree, folder, True)
    return folder


@functools.cache
def local_file(p: str) -> str:
    """A local path with the content of file `p`: `p` itself when local, else a copy made once per process (for
    readers that only open local files: tf.data, SentencePiece, safetensors)."""
    if not is_remote(p):
        return p
    copy = os.path.join(tempfile.mkdtemp(dir=_scratch()), os.path.basename(p.rstrip("/")))
    with open(copy, "wb") as f:
        f.write(gcs().read_object(p))
    return copy


@contextlib.contextmanager
def staged_prefix(prefix: str, *, download: bool = False, upload: bool = False) -> Iterator[str]:
    """A local stand-in for the files named `prefix*` (e.g. a TensorFlow checkpoint: `x.index`, `x.data-...`).

    Local prefixes are yielded as they are. For a remote one the block gets a local prefix in a temporary folder;
    `download` copies the remote files there first, `upload` copies the block's files back when it succeeds.
    """
    if not is_remote(prefix):
        yield prefix
        return
    remote = path(prefix)
    with tempfile.TemporaryDirectory(dir=_scratch()) as folder:
        if download:
            for file in remote.parent.glob(f"{remote.name}*"):
                with open(os.path.join(folder, file.name), "wb") as f:
                    f.write(file.read_bytes())
        yield os.path.join(folder, remote.name)
        if upload:
            for name in sorted(os.listdir(folder)):
                with open(os.path.join(folder, name), "rb") as f:
                    (remote.parent / name).write_bytes(f.read())


def create_exclusive(p: str | os.PathLike, text: str) -> bool:
    """Creates the file `p` holding `text` unless it exists; False if it does.

    Atomic on a local or shared POSIX file system (an `O_EXCL` create) and on GCS (a write conditional on no
    object existing): of two runs exactly one succeeds.
    """
    if is_remote(p):
        return not path(p).exists() and gcs().write_object(os.fspath(p), text.encode(), exclusive=True)
    try:
        descriptor = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(descriptor, "w", encoding="utf-8") as f:
        f.write(text)
    return True


class GrowingFile:
    """A file written by appends (metrics.jsonl, TensorBoard events), kept open for a run.

    A local file is appended to. An object (gs://) has no append, so its whole content is held here and uploaded
    again at every `flush`, as TensorFlow's GCS files do; `flush` makes what was written durable either way.
    """

    def __init__(self, p: str | os.PathLike):
        self.path = path(p)
        self._remote = is_remote(p)
        if self._remote:
            self._data = bytearray(self.path.read_bytes() if self.path.exists() else b"")
            self._dirty = True
        else:
            self._file = open(p, "ab")  # noqa: SIM115  (open for the writer's lifetime)

    @property
    def size(self) -> int:
        """Bytes in the file so far."""
        return len(self._data) if self._remote else self._file.tell()

    def write(self, data: bytes) -> None:
        if self._remote:
            self._data += data
            self._dirty = True
        else:
            self._file.write(data)

    def flush(self) -> None:
        if not self._remote:
            self._file.flush()
        elif self._dirty:
            gcs().write_object(os.fspath(self.path), self._data)
            self._dirty = False

    def close(self) -> None:
        self.flush()
        if not self._remote:
            self._file.close()
