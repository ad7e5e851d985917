"""The power retention op: reference forms, chunked algorithm, decoding and the public API."""

from .api import (
                  power_retention,
                  power_retention_decode,
                  power_retention_decode_into,
                  power_retention_fold,
)
from .naive import attention_reference, recurrent_reference, sympow_embed
from .state import DecodeBuffer, RetentionState, state_bytes, sympow_dim

__all__ = ["DecodeBuffer", "RetentionState", "attention_reference", "power_retention",
           "power_retention_decode", "power_retention_decode_into", "power_retention_fold",
           "recurrent_reference", "state_bytes", "sympow_dim", "sympow_embed"]
