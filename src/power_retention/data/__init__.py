"""Data: the embedded corpus (Python's standard library source) and tokenizers."""

from .batches import sample_batch
from .corpus import (
    Corpus,
    Document,
    document_windows,
    encode_documents,
    is_validation,
    load_corpus,
    stdlib_files,
)
from .tokenizer import ByteTokenizer, PretrainedTokenizer, Tokenizer, load_tokenizer

__all__ = ["ByteTokenizer", "Corpus", "Document", "PretrainedTokenizer", "Tokenizer",
           "document_windows", "encode_documents", "is_validation", "load_corpus",
           "load_tokenizer", "sample_batch", "stdlib_files"]
