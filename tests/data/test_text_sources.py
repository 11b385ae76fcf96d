"""Text from local files: read by datasets, tokenized, packed, held out, cached as Arrow and streamed by step."""

import itertools
import json

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from orchestrator.data import ByteTokenizer, batch_stream, build_training_data
from orchestrator.data.token_cache import cached_blocks
from orchestrator.spec import DataSpec, ModelSpec

DOCUMENTS = [f"document {index}: the quick brown fox jumps over {index % 7} lazy dogs" for index in range(300)]


def files_spec(tmp_path, files, **keys) -> DataSpec:
    keys = {"validation_fraction": 0.0, "block_size": 32, **keys}
    return DataSpec(source="files", files=[str(path) for path in files], cache_dir=str(tmp_path / "cache"), **keys)


def write_jsonl(path, documents, field="text"):
    path.write_text("".join(json.dumps({field: text, "id": index}) + "\n" for index, text in enumerate(documents)))
    return path


def decoded_documents(blocks) -> list[str]:
    """The whole documents in packed byte blocks (the first and last are cut by block edges and dropped)."""
    flat = blocks.flatten().tolist()
    eos = ByteTokenizer.eos_id
    texts = bytes(token if token != eos else 0 for token in flat).decode().split("\0")
    return texts[1:-1]


def test_text_jsonl_and_parquet_files_give_the_same_blocks(tmp_path):
    """The same documents as paragraphs of a text file, JSONL rows or a Parquet column pack to identical blocks."""
    text_file = tmp_path / "corpus.txt"
    text_file.write_text("\n\n".join(DOCUMENTS) + "\n")
    jsonl_file = write_jsonl(tmp_path / "corpus.jsonl", DOCUMENTS)
    parquet_file = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"body": DOCUMENTS}), parquet_file)
    blocks = [
        build_training_data(files_spec(tmp_path, [text_file]), ModelSpec()).train,
        build_training_data(files_spec(tmp_path, [jsonl_file]), ModelSpec()).train,
        build_training_data(files_spec(tmp_path, [parquet_file], text_field="body"), ModelSpec()).train,
    ]
    assert blocks[0].shape[1] == 33 and len(blocks[0]) > 100
    assert torch.equal(blocks[0], blocks[1]) and torch.equal(blocks[0], blocks[2])
    whole = decoded_documents(blocks[0])
    assert whole and set(whole) <= set(DOCUMENTS)


def test_second_build_reads_the_cache_and_a_changed_input_tokenizes_again(tmp_path):
    """A second run reuses the Arrow entry unchanged; new file contents or a new block size make a new entry."""
    corpus = write_jsonl(tmp_path / "corpus.jsonl", DOCUMENTS)
    spec = files_spec(tmp_path, [corpus])
    first = build_training_data(spec, ModelSpec())
    entries = list((tmp_path / "cache").glob("files-*/train.arrow"))
    stamp = entries[0].stat().st_mtime_ns
    second = build_training_data(spec, ModelSpec())
    assert (first.cache_hit, second.cache_hit) == (False, True)
    assert torch.equal(first.train, second.train)
    assert list((tmp_path / "cache").glob("files-*/train.arrow")) == entries and entries[0].stat().st_mtime_ns == stamp
    write_jsonl(corpus, [*DOCUMENTS, "one more document"])
    assert not build_training_data(spec, ModelSpec()).cache_hit
    assert not build_training_data(spec.model_copy(update={"block_size": 16}), ModelSpec()).cache_hit
    assert len(list((tmp_path / "cache").glob("files-*/train.arrow"))) == 3


def test_cache_builds_an_entry_once(tmp_path):
    """cached_blocks calls its build function only while the entry is missing, and returns what it wrote."""
    calls = []

    def build():
        calls.append(1)
        return {"train": torch.arange(12, dtype=torch.int32).view(3, 4).numpy()}

    first = cached_blocks(tmp_path, {"source": "test", "n": 1}, build)
    second = cached_blocks(tmp_path, {"source": "test", "n": 1}, build)
    assert len(calls) == 1 and (first.created, second.created) == (True, False)
    assert second.splits["train"].tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]


def test_held_out_validation_is_disjoint_and_the_same_every_time(tmp_path):
    """validation_fraction holds out whole documents by a hash of their text: disjoint from training, stable."""
    corpus = write_jsonl(tmp_path / "corpus.jsonl", DOCUMENTS)
    data = build_training_data(files_spec(tmp_path, [corpus], validation_fraction=0.2), ModelSpec())
    train, validation = set(decoded_documents(data.train)), set(decoded_documents(data.validation))
    assert train and validation and train.isdisjoint(validation)
    assert 0.1 < len(data.validation) / (len(data.train) + len(data.validation)) < 0.3
    again = build_training_data(files_spec(tmp_path / "other", [corpus], validation_fraction=0.2), ModelSpec())
    assert not again.cache_hit and torch.equal(again.validation, data.validation)


def test_validation_files_are_the_validation_split(tmp_path):
    """With validation_files, validation holds exactly those documents and training keeps all of its own."""
    corpus = write_jsonl(tmp_path / "train.jsonl", DOCUMENTS[:200])
    held = write_jsonl(tmp_path / "validation.jsonl", DOCUMENTS[200:])
    data = build_training_data(
        files_spec(tmp_path, [corpus], validation_files=[str(held)], validation_fraction=0.5), ModelSpec()
    )
    assert set(decoded_documents(data.validation)) <= set(DOCUMENTS[200:])
    assert set(decoded_documents(data.train)) <= set(DOCUMENTS[:200])


def test_resumed_stream_over_cached_blocks_continues_with_the_next_unseen_batch(tmp_path):
    """A run that resumes at micro-batch k, reading the cache, sees what an uninterrupted run saw after k batches."""
    spec = files_spec(tmp_path, [write_jsonl(tmp_path / "corpus.jsonl", DOCUMENTS)])
    fresh, cached = build_training_data(spec, ModelSpec()), build_training_data(spec, ModelSpec())
    assert cached.cache_hit
    arguments = {"micro_batch_size": 4, "rank": 1, "world_size": 2, "seed": 3}
    uninterrupted = list(itertools.islice(batch_stream(fresh.train, **arguments), 40))
    resumed = list(itertools.islice(batch_stream(cached.train, start_step=25, **arguments), 15))
    for expected, actual in zip(uninterrupted[25:], resumed, strict=True):
        assert torch.equal(expected["input_ids"], actual["input_ids"])
        assert torch.equal(expected["labels"], actual["labels"])


def test_a_named_tokenizer_tokenizes_and_keys_the_cache(tmp_path, local_tokenizer):
    """data.tokenizer loads with AutoTokenizer; its ids and eos separate documents, in an entry of its own."""
    from transformers import AutoTokenizer

    corpus = write_jsonl(tmp_path / "corpus.jsonl", DOCUMENTS)
    data = build_training_data(files_spec(tmp_path, [corpus], tokenizer=str(local_tokenizer)), ModelSpec())
    reference = AutoTokenizer.from_pretrained(local_tokenizer)
    first = reference(DOCUMENTS[0], add_special_tokens=False)["input_ids"]
    assert data.vocab_size == len(reference) != ByteTokenizer.vocab_size
    assert data.train[0, : len(first) + 1].tolist() == [*first, reference.eos_token_id]
    assert int(data.train.max()) < data.vocab_size
    build_training_data(files_spec(tmp_path, [corpus]), ModelSpec())
    assert len(list((tmp_path / "cache").glob("files-*/train.arrow"))) == 2  # byte tokens in another entry


def test_synthetic_source_gives_validation_and_per_task_blocks():
    """The built-in corpus comes with held-out blocks and held-out blocks per task, from the same function."""
    data = build_training_data(DataSpec(num_examples=600, validation_examples=120, block_size=32), ModelSpec())
    assert data.train.shape[1] == data.validation.shape[1] == 33
    assert set(data.validation_by_task) == {"copy", "reverse", "sort", "count", "add", "brackets"}
    assert data.vocab_size == ByteTokenizer.vocab_size
