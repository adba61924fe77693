"""The path abstraction (`t5x_lite.storage`) against a local GCS emulator, and on local paths as before."""

from __future__ import annotations

import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from t5x_lite import storage


def test_gs_paths_read_write_list_and_remove_in_the_bucket(gcs_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = storage.path(gcs_dir) / "run"
    assert not run.exists()
    run.mkdir(parents=True, exist_ok=True)
    assert run.is_dir() and list(run.iterdir()) == []  # a new empty folder exists, as on a file system
    (run / "config.gin").write_text("x = 1\n")
    (run / "sub" / "a.txt").write_text("é")
    assert (run / "config.gin").read_text() == "x = 1\n" and (run / "sub" / "a.txt").read_text() == "é"
    assert sorted(p.name for p in run.iterdir()) == ["config.gin", "sub"]
    assert [p.name for p in run.glob("*.gin")] == ["config.gin"]
    assert (run / "sub").is_dir() and (run / "config.gin").is_file() and not (run / "missing").exists()
    with pytest.raises(FileNotFoundError):
        (run / "missing").read_text()
    (run / "config.gin").replace(run / "moved.gin")
    assert sorted(p.name for p in run.iterdir()) == ["moved.gin", "sub"]
    (run / "moved.gin").unlink()
    run.rmtree()
    assert not run.exists()
    assert not Path("gs:").exists()  # nothing went to a local folder named after the URL


def test_growing_file_appends_on_gcs_and_locally(gcs_dir, tmp_path):
    for folder in (gcs_dir, str(tmp_path)):
        target = f"{folder}/metrics.jsonl"
        first = storage.GrowingFile(target)
        first.write(b"1\n")
        first.flush()
        assert storage.path(target).read_bytes() == b"1\n"  # durable at each flush
        first.write(b"2\n")
        first.close()
        again = storage.GrowingFile(target)  # a resumed run appends
        again.write(b"3\n")
        again.close()
        assert storage.path(target).read_bytes() == b"1\n2\n3\n"


def test_create_exclusive_creates_once(gcs_dir, tmp_path):
    for folder in (gcs_dir, str(tmp_path)):
        lease = storage.path(folder) / ".lease.json"
        assert storage.create_exclusive(lease, "first")
        assert not storage.create_exclusive(lease, "second")
        assert lease.read_text() == "first"


def test_an_exclusive_write_only_creates(gcs_dir):
    """The conditional write behind `create_exclusive` on GCS (ifGenerationMatch=0), past its existence check: of
    two runs that both saw no lease, the second's write is refused."""
    lease = f"{gcs_dir}/.lease.json"
    assert storage.gcs().write_object(lease, b"first", exclusive=True)
    assert not storage.gcs().write_object(lease, b"second", exclusive=True)
    assert storage.path(lease).read_text() == "first"


def test_local_stand_ins_of_remote_files(gcs_dir):
    remote = storage.path(gcs_dir) / "vocab" / "spiece.model"
    remote.write_bytes(b"model bytes")
    local = storage.local_file(str(remote))
    assert not storage.is_remote(local) and Path(local).read_bytes() == b"model bytes"
    prefix = f"{gcs_dir}/ckpt/process_0-of-1"
    with storage.staged_prefix(prefix, upload=True) as local_prefix:
        Path(f"{local_prefix}.index").write_bytes(b"i")
        Path(f"{local_prefix}.data-00000-of-00001").write_bytes(b"d")
    assert sorted(p.name for p in (storage.path(gcs_dir) / "ckpt").iterdir()) == [
        "process_0-of-1.data-00000-of-00001", "process_0-of-1.index"]
    with storage.staged_prefix(prefix, download=True) as local_prefix:
        assert Path(f"{local_prefix}.index").read_bytes() == b"i"
    assert not os.path.exists(local_prefix)


def test_orbax_saves_and_restores_in_the_bucket(gcs_dir):
    directory = storage.absolute(f"{gcs_dir}/checkpoints")
    tree = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}
    options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False)
    with ocp.CheckpointManager(directory, options=options) as manager:
        manager.save(1, args=ocp.args.StandardSave(tree))
        manager.save(2, args=ocp.args.StandardSave({k: v + 1 for k, v in tree.items()}))
    with ocp.CheckpointManager(directory, options=options) as manager:
        assert manager.all_steps() == [1, 2]
        restored = manager.restore(2, args=ocp.args.StandardRestore(tree))
    np.testing.assert_array_equal(restored["w"], tree["w"] + 1)


def test_task_files_and_vocabulary_in_a_bucket(gcs_dir):
    """A text-file task, a QA file and a SentencePiece model read from gs:// as from local files."""
    from t5x_lite.data import sources, vocab

    bucket = storage.path(gcs_dir)
    (bucket / "text" / "a.txt").write_text("first line\nsecond line\n")
    (bucket / "text" / "b.txt").write_text("third line\n")
    (bucket / "qa.jsonl").write_text('{"question": "Who?", "context": "Ann did.", "answers": ["Ann"]}\n')
    (bucket / "spiece.model").write_bytes(Path(vocab.BUNDLED_SPM_PATH).read_bytes())

    source = sources.TextLineFiles({"train": f"{gcs_dir}/text/*.txt"})
    lines = [x.decode() for x in source.get_dataset("train", shuffle=False).as_numpy_iterator()]
    assert lines == ["first line", "second line", "third line"]
    sources.check_files("t", {"train": f"{gcs_dir}/text/*.txt"})
    with pytest.raises(FileNotFoundError, match="no file matches"):
        sources.check_files("t", {"train": f"{gcs_dir}/text/*.tsv"})
    assert sources.read_qa_file(f"{gcs_dir}/qa.jsonl", "extractive")[0]["answers"] == ["Ann"]
    remote = vocab.get_vocabulary(f"{gcs_dir}/spiece.model")
    assert remote.encode("to be or not") == vocab.get_vocabulary().encode("to be or not")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        vocab.get_vocabulary(f"{gcs_dir}/missing.model")
