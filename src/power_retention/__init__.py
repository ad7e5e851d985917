"""Power retention: linear-cost attention with a fixed-size state (see DESIGN.md)."""

from .ops import (
                  DecodeBuffer,
                  RetentionState,
                  attention_reference,
                  power_retention,
                  power_retention_decode,
                  power_retention_decode_into,
                  power_retention_fold,
                  recurrent_reference,
                  state_bytes,
                  sympow_dim,
                  sympow_embed,
)

__version__ = "0.1.0"

__all__ = ["DecodeBuffer", "RetentionState", "attention_reference", "power_retention",
           "power_retention_decode", "power_retention_decode_into", "power_retention_fold",
           "recurrent_reference", "state_bytes", "sympow_dim", "sympow_embed"]
