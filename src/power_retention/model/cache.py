"""Generation cache: fixed-size recurrent state for power/linear layers, KV for softmax layers.

:class:`PowerRetentionCache` is a ``transformers.Cache`` with one layer object per model layer:

- ``"power"`` and ``"linear"`` layers get a :class:`RecurrentCacheLayer`: the fp32
  :class:`RetentionState` plus, for power retention, a preallocated buffer of at most
  ``chunk_size`` recent ``(k, v, log_gate)`` not yet folded into the state (DESIGN.md,
  decoding) and, in bfloat16 models, a bfloat16 copy of ``S`` that decode steps read. Its
  memory is the same after 10 tokens and after a million.
- ``"softmax"`` layers get transformers' ``DynamicLayer`` (a KV cache that grows).
- ``"window"`` layers get transformers' ``DynamicSlidingWindowLayer`` (keeps the last
  ``sliding_window - 1`` tokens, all a new token needs).

``cache.nbytes()`` reports the bytes the cache holds.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer, DynamicSlidingWindowLayer

from power_retention.ops import DecodeBuffer, RetentionState

from .configuration import PowerRetentionConfig


class RecurrentCacheLayer(CacheLayerMixin):
    """One power/linear layer's cache: the state, the recent-token buffer, the tokens seen.

    ``state`` is a :class:`RetentionState` (``S [B, Hk, D, e]``, ``z [B, Hk, D]``) or None
    before the first token. The buffer lives in tensors of a fixed capacity
    (``buffer_k [B, capacity, Hk, d]``, ``buffer_v [B, capacity, Hk, e]``,
    ``buffer_log_gate [B, capacity, Hk]``) of which the first ``buffer_len`` tokens are in use.
    With ``in_place`` (set by ``GraphedDecoder``) a new state is copied into the tensors of the
    old one, so a captured CUDA graph keeps reading and writing the same memory.

    A bfloat16 buffer also gets ``read_S``, ``S`` rounded to bfloat16, made by the first decode
    step (:meth:`read_state`) and copied again whenever the state changes through this layer
    (:meth:`update`, :meth:`refresh_read_state`): a decode step then reads half the bytes of
    the float32 state, which stays the one folded into. Code that writes ``state`` directly
    calls :meth:`refresh_read_state` after.
    """

    is_sliding = False
    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, buffer_capacity: int = 0):
        super().__init__()
        self.buffer_capacity = buffer_capacity
        self.state: RetentionState | None = None
        self.buffer_k: Tensor | None = None
        self.buffer_v: Tensor | None = None
        self.buffer_log_gate: Tensor | None = None
        self.buffer_len = 0
        self.seen_tokens = 0
        self.in_place = False
        self.device: torch.device | None = None
        self.read_S: Tensor | None = None

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        """Allocate the buffer like ``key_states [B, n, Hk, d]`` / ``value_states``."""
        B, _, Hk, d = key_states.shape
        gate_dtype = torch.float64 if key_states.dtype == torch.float64 else torch.float32
        self.buffer_k = key_states.new_zeros(B, self.buffer_capacity, Hk, d)
        self.buffer_v = value_states.new_zeros(B, self.buffer_capacity, Hk, value_states.shape[-1])
        self.buffer_log_gate = key_states.new_zeros(B, self.buffer_capacity, Hk, dtype=gate_dtype)
        self.is_initialized = True

    @property
    def buffer(self) -> DecodeBuffer | None:
        """The buffered tokens (views of the first ``buffer_len`` slots), or None if empty."""
        if self.buffer_len == 0:
            return None
        n = self.buffer_len
        return DecodeBuffer(self.buffer_k[:, :n], self.buffer_v[:, :n],
                            self.buffer_log_gate[:, :n])

    def update(self, state: RetentionState, buffer: DecodeBuffer | None = None,
               num_new_tokens: int = 1) -> None:
        """Store the state and buffer after ``num_new_tokens`` more tokens."""
        if self.in_place and self.state is not None:
            if state.S is not self.state.S:
                self.state.S.copy_(state.S)
                self.state.z.copy_(state.z)
        else:
            self.state, self.device = state, state.S.device
        self.refresh_read_state()
        n = 0 if buffer is None else buffer.k.shape[1]
        if n:
            if not self.is_initialized:
                self.lazy_initialization(buffer.k, buffer.v)
            if n > self.buffer_capacity:
                raise ValueError(f"decode buffer of {n} tokens exceeds the cache's capacity "
                                 f"of {self.buffer_capacity}")
            self.buffer_k[:, :n].copy_(buffer.k)
            self.buffer_v[:, :n].copy_(buffer.v)
            self.buffer_log_gate[:, :n].copy_(buffer.log_gate)
        self.buffer_len = n
        self.seen_tokens += num_new_tokens

    def slots(self, key_states: Tensor, value_states: Tensor) -> DecodeBuffer:
        """The whole preallocated buffer (``buffer_capacity`` slots, the first ``buffer_len``
        in use), allocated like ``key_states`` on first use, for
        :func:`~power_retention.power_retention_decode_into` to write the next token into."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        return DecodeBuffer(self.buffer_k, self.buffer_v, self.buffer_log_gate)

    def appended(self, state: RetentionState, num_new_tokens: int = 1) -> None:
        """Count ``num_new_tokens`` written into the buffer's next slots (``state`` is kept
        when the layer had none yet)."""
        if self.state is None:
            self.state, self.device = state, state.S.device
        self.buffer_len += num_new_tokens
        self.seen_tokens += num_new_tokens

    def read_state(self) -> RetentionState:
        """The state a decode step reads: ``(read_S, z)`` once the buffer is bfloat16 (the copy
        made here on first use), else the state itself."""
        if self.buffer_k is None or self.buffer_k.dtype != torch.bfloat16:
            return self.state
        S = self.state.S
        if self.read_S is None or self.read_S.shape != S.shape or self.read_S.device != S.device:
            self.read_S = S.to(torch.bfloat16)
        return RetentionState(self.read_S, self.state.z)

    def refresh_read_state(self, rows: int | slice | Tensor | None = None) -> None:
        """Copy the state (``rows`` of it; all by default) into the bfloat16 copy, if any; a
        copy of another shape than the state's is dropped (the next step makes a new one)."""
        if self.read_S is None:
            return
        if self.state is None or self.read_S.shape != self.state.S.shape:
            self.read_S = None
        elif rows is None:
            self.read_S.copy_(self.state.S)
        else:
            self.read_S[rows] = self.state.S[rows]

    def get_seq_length(self) -> int:
        return self.seen_tokens

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen_tokens + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def tensors(self) -> list[Tensor]:
        """The tensors held: ``S``, ``z``, once allocated the buffer's three, then ``read_S``."""
        tensors = [] if self.state is None else [self.state.S, self.state.z]
        if self.is_initialized:
            tensors += [self.buffer_k, self.buffer_v, self.buffer_log_gate]
        if self.read_S is not None:
            tensors.append(self.read_S)
        return tensors

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def _map_batch(self, fn) -> None:
        if self.state is not None:
            self.state = RetentionState(fn(self.state.S), fn(self.state.z))
        if self.is_initialized:
            self.buffer_k, self.buffer_v = fn(self.buffer_k), fn(self.buffer_v)
            self.buffer_log_gate = fn(self.buffer_log_gate)
        if self.read_S is not None:
            self.read_S = fn(self.read_S)

    def reset(self) -> None:
        self.state, self.buffer_len, self.seen_tokens, self.read_S = None, 0, 0, None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._map_batch(lambda t: t[indices])

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a recurrent state cannot forget tokens: power and linear "
                                  "layers do not support cropping (assisted decoding)")

    def offload(self) -> None:
        self._map_batch(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        if self.device is not None:
            self._map_batch(lambda t: t.to(self.device, non_blocking=True))


class PowerRetentionCache(Cache):
    """Cache of a :class:`PowerRetentionForCausalLM`, one layer object per model layer.

    Build it with ``PowerRetentionCache(config)`` (``generate`` and ``forward(use_cache=True)``
    do so when given none); read its size with :meth:`nbytes`.
    """

    def __init__(self, config: PowerRetentionConfig):
        layers = []
        for kind in config.layer_time_mixing:
            if kind == "softmax":
                layers.append(DynamicLayer())
            elif kind == "window":
                layers.append(DynamicSlidingWindowLayer(sliding_window=config.sliding_window))
            elif kind == "power":
                layers.append(RecurrentCacheLayer(buffer_capacity=config.decode_chunk_size))
            else:   # "linear": no buffer, every token goes straight into the state
                layers.append(RecurrentCacheLayer(buffer_capacity=0))
        super().__init__(layers=layers)

    def nbytes(self) -> int:
        """Bytes of tensors held (states, buffers, keys and values), all layers and sequences."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, RecurrentCacheLayer):
                total += layer.nbytes()
            elif layer.is_initialized:
                total += sum(t.numel() * t.element_size() for t in (layer.keys, layer.values))
        return total
