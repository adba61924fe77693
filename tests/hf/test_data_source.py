"""HuggingFaceDataSource: local `datasets` data as a seqio source, tokenized by a HF tokenizer end to end."""

import functools
import json

import pytest
import seqio

from t5x_lite import hf
from tests.hf.tokenizer_fixtures import TEXT, wordpiece

datasets = pytest.importorskip("datasets")


@pytest.fixture
def json_files(tmp_path):
    files = {}
    for split, lines in (("train", TEXT[:40]), ("validation", TEXT[40:50])):
        path = tmp_path / f"{split}.jsonl"
        rows = [{"question": line, "answer": line.split()[0], "label": i % 3, "ids": [i, i + 1]}
                for i, line in enumerate(lines)]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        files[split] = str(path)
    return files


def rows(ds) -> list[dict]:
    return [{k: (v.decode() if isinstance(v, bytes) else v.tolist() if hasattr(v, "tolist") else v)
             for k, v in x.items()} for x in ds.as_numpy_iterator()]


def test_local_json_files_as_a_seqio_source(json_files):
    source = hf.HuggingFaceDataSource("json", data_files=json_files)
    assert list(source.splits) == ["train", "validation"]
    assert source.num_input_examples("train") == 40
    examples = rows(source.get_dataset("train", shuffle=False))
    assert [e["question"] for e in examples] == TEXT[:40]
    assert examples[4]["label"] == 1 and examples[4]["ids"] == [4, 5]
    # Shards are contiguous and together hold every row once.
    shards = [rows(source.get_dataset("train", shuffle=False, shard_info=seqio.ShardInfo(i, 3))) for i in range(3)]
    assert [e for shard in shards for e in shard] == examples
    # Shuffling is a seeded permutation.
    shuffled = rows(source.get_dataset("train", shuffle=True, seed=7))
    assert shuffled == rows(source.get_dataset("train", shuffle=True, seed=7)) and shuffled != examples
    assert sorted(e["question"] for e in shuffled) == sorted(TEXT[:40])


def test_save_to_disk_folder_and_split_mapping(json_files, tmp_path):
    datasets.load_dataset("json", data_files=json_files).save_to_disk(tmp_path / "saved")
    source = hf.HuggingFaceDataSource(str(tmp_path / "saved"), splits={"train": "train", "eval": "validation"},
                                      columns=["question"])
    assert list(source.splits) == ["train", "eval"]
    assert rows(source.get_dataset("eval", shuffle=False)) == [{"question": q} for q in TEXT[40:50]]
    with pytest.raises(ValueError, match=r"no columns \['nope'\]"):
        hf.HuggingFaceDataSource(str(tmp_path / "saved"), columns=["nope"]).get_dataset("train")


def test_uncached_hub_dataset_fails_without_downloading(tmp_path):
    with pytest.raises(FileNotFoundError, match="only local files and the datasets cache were read; allow_download"):
        hf.HuggingFaceDataSource("someone/not-a-cached-dataset", cache_dir=str(tmp_path))


def test_task_reads_hf_data_with_a_hf_tokenizer(json_files, tmp_path):
    vocab = hf.TokenizersVocabulary(wordpiece(tmp_path / "tokenizer.json"), eos_token="[SEP]", pad_token="[PAD]")
    task = seqio.Task(
        "test_hf_source_and_tokenizer",
        hf.HuggingFaceDataSource("json", data_files=json_files, columns=["question", "answer"]),
        output_features={k: seqio.Feature(vocab, add_eos=True) for k in ("inputs", "targets")},
        preprocessors=[
            functools.partial(seqio.preprocessors.rekey, key_map={"inputs": "question", "targets": "answer"}),
            seqio.preprocessors.tokenize,
            seqio.preprocessors.append_eos_after_trim,
        ],
    )
    examples = list(task.get_dataset({"inputs": 64, "targets": 8}, split="validation", shuffle=False)
                    .as_numpy_iterator())
    assert len(examples) == 10
    for example, line in zip(examples, TEXT[40:50]):
        expected = vocab.tokenizer.encode(line, add_special_tokens=False).ids[:63] + [vocab.eos_id]
        assert example["inputs"].tolist() == expected
        assert example["inputs_pretokenized"].decode() == line
        assert vocab.decode(example["targets"].tolist()) == vocab.tokenizer.decode(
            vocab.tokenizer.encode(line.split()[0]).ids
        )
