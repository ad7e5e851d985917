"""Training batches as a pure function of (seed, batch index): resuming needs only the index."""

from __future__ import annotations

import numpy as np
import torch


def sample_batch(stream: np.ndarray, batch_index: int, batch_size: int, seq_len: int,
                 seed: int, rows: slice | None = None) -> torch.Tensor:
    """Random windows ``[batch_size, seq_len]`` int64 of the token ``stream``.

    Window starts are uniform over the stream, drawn from a generator keyed by
    ``(seed, batch_index)``, so batch ``n`` is the same whatever ran before it. ``rows`` picks a
    slice of the batch (each data-parallel rank takes its own rows of one global batch).
    """
    if len(stream) < seq_len:
        raise ValueError(f"token stream has {len(stream)} tokens, fewer than seq_len={seq_len}")
    rng = np.random.default_rng([seed, batch_index])
    starts = rng.integers(0, len(stream) - seq_len + 1, size=batch_size)
    if rows is not None:
        starts = starts[rows]
    windows = np.stack([stream[s:s + seq_len] for s in starts])
    return torch.from_numpy(windows.astype(np.int64))
