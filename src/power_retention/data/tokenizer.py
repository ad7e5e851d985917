"""Tokenizers: bytes by default, or any tokenizer folder that ``transformers`` can load.

The byte tokenizer maps UTF-8 bytes to ids 0..255 and has two special tokens:
``256 = <|endoftext|>`` (written before every document, so it also acts as the start token) and
``257 = <|pad|>``. Its vocabulary is 258; models round their embedding up (see the presets).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

import numpy as np

# A checkpoint folder records its tokenizer here when it is not a transformers tokenizer.
TOKENIZER_FILE = "power_retention_tokenizer.json"


class Tokenizer(Protocol):
    """What the corpus, the trainer and the evaluation need from a tokenizer."""

    vocab_size: int
    eos_token_id: int

    def encode(self, text: str) -> np.ndarray: ...

    def decode(self, ids) -> str: ...

    def save(self, folder: str | Path) -> None: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: lossless on any text, no training, no files."""

    eos_token = "<|endoftext|>"
    pad_token = "<|pad|>"

    def __init__(self) -> None:
        self.eos_token_id = 256
        self.pad_token_id = 257
        self.vocab_size = 258

    def encode(self, text: str) -> np.ndarray:
        """``text`` -> int32 ids ``[len(text.encode())]`` (no special tokens added)."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        """Ids -> text; byte runs are decoded as UTF-8 (invalid sequences become U+FFFD)."""
        parts, run = [], bytearray()
        for i in np.asarray(ids, dtype=np.int64).reshape(-1).tolist():
            if i < 256:
                run.append(i)
                continue
            parts.append(run.decode("utf-8", errors="replace"))
            run = bytearray()
            parts.append({256: self.eos_token, 257: self.pad_token}.get(i, f"<|{i}|>"))
        parts.append(run.decode("utf-8", errors="replace"))
        return "".join(parts)

    def save(self, folder: str | Path) -> None:
        Path(folder, TOKENIZER_FILE).write_text(json.dumps({"type": "bytes"}) + "\n")

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=258)"


class PretrainedTokenizer:
    """A ``transformers`` tokenizer loaded from a local folder (nothing is downloaded)."""

    def __init__(self, folder: str | Path) -> None:
        from transformers import AutoTokenizer

        self.folder = str(folder)
        self.tokenizer = AutoTokenizer.from_pretrained(self.folder, local_files_only=True)
        eos = self.tokenizer.eos_token_id
        if eos is None:
            eos = self.tokenizer.sep_token_id
        if eos is None:
            raise ValueError(f"tokenizer in {self.folder!r} has no eos_token_id or sep_token_id "
                             "to separate documents")
        self.eos_token_id = int(eos)
        self.vocab_size = len(self.tokenizer)

    def encode(self, text: str) -> np.ndarray:
        ids = self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        return np.asarray(ids, dtype=np.int32)

    def decode(self, ids) -> str:
        return self.tokenizer.decode(np.asarray(ids).reshape(-1).tolist())

    def save(self, folder: str | Path) -> None:
        self.tokenizer.save_pretrained(str(folder))

    def __repr__(self) -> str:
        return f"PretrainedTokenizer({self.folder!r}, vocab_size={self.vocab_size})"


def load_tokenizer(spec: str | Path = "bytes") -> Tokenizer:
    """``"bytes"``, a transformers tokenizer folder, or a checkpoint folder that names its own."""
    if str(spec) == "bytes":
        return ByteTokenizer()
    folder = Path(spec)
    if not folder.is_dir():
        raise ValueError(f"tokenizer must be 'bytes' or a local folder, got {str(spec)!r}")
    recorded = folder / TOKENIZER_FILE
    if recorded.exists():
        kind = json.loads(recorded.read_text()).get("type")
        if kind != "bytes":
            raise ValueError(f"{recorded}: unknown tokenizer type {kind!r}")
        return ByteTokenizer()
    return PretrainedTokenizer(folder)
