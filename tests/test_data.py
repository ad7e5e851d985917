"""The embedded corpus and the tokenizers: determinism, the split, round trips, batches."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from power_retention.data import (
    ByteTokenizer,
    Document,
    document_windows,
    encode_documents,
    is_validation,
    load_corpus,
    load_tokenizer,
    sample_batch,
    stdlib_files,
)


@pytest.fixture(scope="module")
def stdlib():
    return load_corpus("stdlib")


def test_stdlib_corpus_is_deterministic(stdlib):
    again = load_corpus("stdlib")
    assert again == stdlib
    assert [d.name for d in stdlib.train] == sorted(d.name for d in stdlib.train)
    files = stdlib_files()
    assert files == sorted(files) and len(files) > 500
    assert not any("site-packages" in p.parts or "__pycache__" in p.parts for p in files)


def test_split_is_a_fixed_hash_of_the_path():
    # sha1 of the relative path (not Python's per-process randomised hash()): the same split on
    # every machine and in every process.
    for i in range(64):
        path = f"pkg/m{i}.py"
        fraction = int(hashlib.sha1(path.encode()).hexdigest()[:16], 16) / 2**64
        assert is_validation(path, 0.3) == (fraction < 0.3)
    assert not is_validation("asyncio/events.py", 0.0) and is_validation("x.py", 0.999999)


def test_stdlib_split_and_long_documents(stdlib):
    def files(docs):
        return {line for d in docs for line in d.text.splitlines() if line.startswith("# file: ")}

    train, validation = files(stdlib.train), files(stdlib.validation)
    assert train and validation and not train & validation
    share = len(validation) / (len(train) + len(validation))
    assert 0.02 < share < 0.10    # validation_fraction = 0.05 of the files
    # packages are joined into long documents: 64k-token contexts exist (bytes = tokens)
    assert max(len(d.text) for d in stdlib.train) > 1_000_000
    assert any(len(d.text.encode()) >= 65536 for d in stdlib.validation)


def test_folder_and_file_list_corpus(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.txt").write_text("alpha")
    (tmp_path / "pkg" / "b.txt").write_text("beta")
    (tmp_path / "top.txt").write_text("top")
    (tmp_path / "blob.bin").write_bytes(b"\0\1\2")
    corpus = load_corpus(tmp_path, validation_fraction=0.0)
    assert corpus.validation == []
    assert corpus.train == [Document(".", "# file: top.txt\ntop"),
                            Document("pkg", "# file: pkg/a.txt\nalpha\n# file: pkg/b.txt\nbeta")]
    listed = load_corpus([tmp_path / "pkg" / "b.txt", tmp_path / "pkg" / "a.txt"], 0.0)
    assert listed.train == [Document(".", "# file: a.txt\nalpha\n# file: b.txt\nbeta")]
    single = load_corpus(tmp_path / "top.txt", 0.0)
    assert single.train == [Document(".", "# file: top.txt\ntop")]
    with pytest.raises(ValueError, match="corpus"):
        load_corpus(tmp_path / "missing")


def test_byte_tokenizer_round_trip(stdlib):
    tok = ByteTokenizer()
    text = stdlib.validation[0].text[:20000] + " ünïcödé → 🐍 \t\r\n"
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.max() < 256
    assert tok.decode(ids) == text
    assert tok.decode([104, 105, 256, 257]) == "hi<|endoftext|><|pad|>"


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_byte_tokenizer_round_trips_any_text(text):
    tok = ByteTokenizer()
    assert tok.decode(tok.encode(text)) == text


def test_pretrained_tokenizer_folder_round_trip(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    # a small byte-level BPE trained here on stdlib text: nothing is downloaded
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    sample = load_corpus(stdlib_files()[:20], 0.0).train[0].text
    bpe.train_from_iterator([sample], trainer)
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>").save_pretrained(tmp_path)

    tok = load_tokenizer(tmp_path)
    text = "def f(x):\n    return x ** 2  # ünï\n"
    ids = tok.encode(text)
    assert len(ids) < len(text.encode()) and tok.decode(ids) == text
    assert tok.eos_token_id == 0 and tok.vocab_size == 400
    stream = encode_documents([Document("a", "x = 1"), Document("b", "y")], tok)
    assert stream[0] == 0 and tok.decode(stream[1:]).startswith("x = 1")


def test_encode_documents_and_windows():
    tok = ByteTokenizer()
    docs = [Document("a", "abcdefgh"), Document("b", "xyz")]
    stream = encode_documents(docs, tok)
    assert stream.tolist() == [256, *b"abcdefgh", 256, *b"xyz"]
    windows = document_windows(docs, tok, length=4, count=10)
    # windows start at a document start or a multiple of the length, never cross documents
    assert windows.tolist() == [[256, *b"abc"], [*b"defg"], [256, *b"xyz"]]
    assert document_windows(docs, tok, length=4, count=2).tolist() == [[256, *b"abc"],
                                                                       [256, *b"xyz"]]
    with pytest.raises(ValueError, match="shorter context"):
        document_windows(docs, tok, length=100, count=1)


def test_batches_are_a_function_of_the_index():
    stream = np.arange(1000, dtype=np.int32)
    a = sample_batch(stream, 7, batch_size=6, seq_len=16, seed=3)
    assert a.shape == (6, 16) and a.dtype == torch.int64
    assert (a[:, 1:] - a[:, :-1] == 1).all()              # contiguous windows
    assert a.equal(sample_batch(stream, 7, 6, 16, seed=3))
    assert not a.equal(sample_batch(stream, 8, 6, 16, seed=3))
    # each rank's rows of a global batch
    halves = [sample_batch(stream, 7, 6, 16, seed=3, rows=slice(r * 3, r * 3 + 3))
              for r in (0, 1)]
    assert a.equal(torch.cat(halves))
