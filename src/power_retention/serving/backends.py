"""What the engine asks of a model: prefill one prompt, decode one token for many sequences.

The engine holds an opaque *batch* (the caches of the running sequences, in order) and asks a
backend to grow it (:meth:`join`), shrink it (:meth:`keep`) and advance it one token
(:meth:`step`). Two backends:

- :class:`SequentialBackend` serves any ``transformers`` causal LM: its batch is a list of
  per-sequence caches and a step runs them one after another (requests still join and leave
  between steps, but there is no batched arithmetic).
- :class:`RetentionBackend` serves a ``PowerRetentionForCausalLM`` (any mix of power, linear,
  softmax and window layers): the batch is one ``PowerRetentionCache`` and a step is one
  forward over all sequences. Sequences at different positions share it exactly: see its doc.
  On a GPU, a model of power/linear layers only replays CUDA graphs of the step
  (``model.graphs.GraphedDecoder``) while the batch's rows stay the same.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from power_retention.model.cache import PowerRetentionCache
from power_retention.model.graphs import GraphedDecoder, graphable
from power_retention.ops import RetentionState, sympow_dim


class Backend(Protocol):
    """The engine's view of a model."""

    name: str
    vocab_size: int
    eos_token_ids: frozenset[int]

    def sequence_bytes(self, prompt_tokens: int, max_new_tokens: int) -> int:
        """Upper bound of the cache bytes of one sequence, known before it runs."""

    def prefill(self, ids: list[int], cache: Any | None = None) -> tuple[Tensor, Any]:
        """Run a prompt, or its next piece after ``cache``; the logits after its last token
        ``[V]`` and the cache of one sequence."""

    def join(self, batch: Any | None, cache: Any) -> Any:
        """The batch with ``cache`` appended as its last sequence."""

    def keep(self, batch: Any, rows: list[int]) -> Any | None:
        """The batch reduced to ``rows`` (in that order); None when ``rows`` is empty."""

    def step(self, batch: Any, tokens: list[int], positions: list[int]) -> Tensor:
        """Feed token ``tokens[i]`` at position ``positions[i]`` to sequence ``i``; ``[B, V]``."""

    def cache_bytes(self, cache: Any) -> int:
        """Bytes held by a cache (one sequence or a batch)."""


def _eos_ids(model) -> frozenset[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = model.config.eos_token_id
    if eos is None:
        return frozenset()
    return frozenset([eos] if isinstance(eos, int) else eos)


def _dtype_bytes(model) -> int:
    return torch.empty((), dtype=next(model.parameters()).dtype).element_size()


def tensor_bytes(cache: Any) -> int:
    """Bytes of the tensors of a transformers cache (``nbytes()`` when it has one)."""
    if hasattr(cache, "nbytes"):
        return int(cache.nbytes())
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, Tensor):
                total += t.numel() * t.element_size()
    return total


class SequentialBackend:
    """Any transformers causal LM, one sequence per forward call."""

    def __init__(self, model, name: str = "model") -> None:
        self.model = model.eval()
        self.name = name
        self.device = next(model.parameters()).device
        self.vocab_size = int(model.config.vocab_size)
        self.eos_token_ids = _eos_ids(model)
        self.takes_logits_to_keep = "logits_to_keep" in inspect.signature(
            model.forward).parameters

    def sequence_bytes(self, prompt_tokens: int, max_new_tokens: int) -> int:
        # a KV cache: keys and values of every layer for every token
        config = self.model.config
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = (getattr(config, "head_dim", None)
                    or config.hidden_size // config.num_attention_heads)
        per_token = 2 * config.num_hidden_layers * heads * head_dim * _dtype_bytes(self.model)
        return per_token * (prompt_tokens + max_new_tokens)

    @torch.inference_mode()
    def prefill(self, ids: list[int], cache: Any | None = None) -> tuple[Tensor, Any]:
        input_ids = torch.tensor([ids], device=self.device)
        # only the last position's logits are needed, where the model can skip the others
        extra = {"logits_to_keep": 1} if self.takes_logits_to_keep else {}
        out = self.model(input_ids=input_ids, past_key_values=cache, use_cache=True, **extra)
        return out.logits[0, -1].float(), out.past_key_values

    def join(self, batch: list | None, cache: Any) -> list:
        return [*(batch or []), cache]

    def keep(self, batch: list, rows: list[int]) -> list | None:
        return [batch[i] for i in rows] or None

    @torch.inference_mode()
    def step(self, batch: list, tokens: list[int], positions: list[int]) -> Tensor:
        rows = []
        for cache, token in zip(batch, tokens):
            input_ids = torch.tensor([[token]], device=self.device)
            out = self.model(input_ids=input_ids, past_key_values=cache, use_cache=True)
            rows.append(out.logits[0, -1].float())
        return torch.stack(rows)

    def cache_bytes(self, cache: Any) -> int:
        if isinstance(cache, list):
            return sum(tensor_bytes(c) for c in cache)
        return tensor_bytes(cache)


@dataclass
class RetentionBatch:
    """The running sequences of a :class:`RetentionBackend`: one cache with a row each.

    ``mask [B, T]`` (bool; None for a model without softmax/window layers) marks which of the
    ``T`` cached positions of each row hold a token: rows are right-aligned, shorter ones
    left-padded.
    """

    cache: Any
    mask: Tensor | None = None
    decoder: Any = None                   # GraphedDecoder of these rows, built on first step

    def drop_decoder(self) -> None:
        """Forget the CUDA graphs (before the rows change: they hold the old tensors)."""
        if self.decoder is not None:
            self.decoder.release()
            self.decoder = None

    @property
    def rows(self) -> int:
        if self.mask is not None:
            return self.mask.shape[0]
        return self.cache.layers[0].state.S.shape[0]


@dataclass
class SlotBatch:
    """The running sequences of a :class:`RetentionBackend` with persistent slots: one cache of
    ``capacity`` rows whose tensors keep their addresses while sequences come and go, so the
    CUDA graphs captured over it stay valid. ``slots[i]`` is the row of the ``i``-th running
    sequence; the other rows are free (zero state and buffer; decoded along, their logits
    ignored)."""

    cache: Any
    slots: list[int]
    decoder: Any = None                   # GraphedDecoder over all rows, built on first step

    @property
    def rows(self) -> int:
        return len(self.slots)

    @property
    def capacity(self) -> int:
        return self.cache.layers[0].state.S.shape[0]

    def drop_decoder(self) -> None:
        if self.decoder is not None:
            self.decoder.release()
            self.decoder = None


class RetentionBackend:
    """A ``PowerRetentionForCausalLM``, every running sequence in one forward per step.

    The batch is one ``PowerRetentionCache`` whose rows are the running sequences; each row's
    position is passed explicitly, so the rows may be at any point of their own text.

    Power layers hold a fixed-size state plus a buffer of fewer than ``chunk_size`` recent
    tokens, one buffer length for all rows. A sequence joining with a shorter buffer is
    left-padded with zero keys, values and log gates: a zero key adds nothing to the state, the
    numerator or the denominator (``phi(0) = 0``: its weight ``(q . 0)^p`` is 0) and a zero log
    gate decays nothing (``exp(0) = 1``), so every row gets the numbers it would get alone, up to
    rounding. Linear layers hold only a state. Softmax and window layers (hybrid models) hold
    keys and values, left-padded to the longest row and masked out through ``attention_mask``.

    With ``persistent_slots`` (the default where CUDA graphs apply: power and linear layers on
    a GPU) the batch is a :class:`SlotBatch`: a sequence joins by being copied into a free row
    of a cache that keeps its tensors, and leaves by freeing its row, so the graphs of the step
    survive both. The rows double when full and halve when a quarter is used; free rows are
    decoded along (the step's cost is that of ``capacity`` rows).
    """

    def __init__(self, model, name: str = "model", cuda_graphs: bool = True,
                 persistent_slots: bool | None = None) -> None:
        self.model = model.eval()
        self.name = name
        self.cuda_graphs = cuda_graphs and graphable(model)
        config = model.config
        self.config = config
        self.kinds = list(config.layer_time_mixing)
        self.has_kv = any(k in ("softmax", "window") for k in self.kinds)
        if persistent_slots and self.has_kv:
            raise ValueError("persistent slots need a model of power and linear layers only "
                             f"(got {self.kinds}): softmax/window caches grow per row")
        self.persistent = self.cuda_graphs if persistent_slots is None else persistent_slots
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.vocab_size = int(config.vocab_size)
        self.eos_token_ids = _eos_ids(model)

    def sequence_bytes(self, prompt_tokens: int = 0, max_new_tokens: int = 0) -> int:
        """Cache bytes of one sequence: states (fp32; fp64 for a float64 model; a bfloat16
        model's power layers also keep a bfloat16 copy of ``S``) and buffers, fixed; plus, for
        softmax/window layers, keys and values of its own tokens (not the left padding it may
        get in a batch with longer sequences)."""
        config = self.config
        state_scale = 2 if self.dtype == torch.float64 else 1      # state_bytes counts fp32
        total = self.model.state_bytes() * state_scale
        item = torch.empty((), dtype=self.dtype).element_size()
        if self.dtype == torch.bfloat16:
            D = sympow_dim(config.head_dim, config.deg)
            total += self.kinds.count("power") * config.num_key_value_heads * D * (
                config.head_dim * item)
        gate_item = 8 if self.dtype == torch.float64 else 4
        per_token = config.num_key_value_heads * (2 * config.head_dim * item + gate_item)
        total += self.kinds.count("power") * config.decode_chunk_size * per_token
        tokens = prompt_tokens + max_new_tokens
        kv_per_token = 2 * config.num_key_value_heads * config.head_dim * item
        total += self.kinds.count("softmax") * tokens * kv_per_token
        if "window" in self.kinds:
            total += (self.kinds.count("window") * min(tokens, config.sliding_window)
                      * kv_per_token)
        return total

    @torch.inference_mode()
    def prefill(self, ids: list[int], cache: Any | None = None) -> tuple[Tensor, Any]:
        input_ids = torch.tensor([ids], device=self.device)
        out = self.model(input_ids=input_ids, past_key_values=cache, use_cache=True,
                         logits_to_keep=1)
        return out.logits[0, -1].float(), out.past_key_values

    @torch.inference_mode()
    def join(self, batch: RetentionBatch | SlotBatch | None, cache: Any
             ) -> RetentionBatch | SlotBatch:
        if self.persistent:
            return self._join_slot(batch, cache)
        length = cache.get_seq_length()
        mask = (torch.ones(1, length, dtype=torch.bool, device=self.device) if self.has_kv
                else None)
        if batch is None:
            return RetentionBatch(cache, mask)
        batch.drop_decoder()
        rows = batch.rows
        total = max(length, batch.cache.get_seq_length())
        for kind, into, layer in zip(self.kinds, batch.cache.layers, cache.layers):
            if kind in ("power", "linear"):
                into.state = type(into.state)(*(torch.cat([a, b]) for a, b in
                                               zip(into.state, layer.state)))
                into.refresh_read_state()
                if into.buffer_capacity:
                    self._join_buffers(into, layer, rows)
                into.seen_tokens = total
            else:
                width = max(into.keys.shape[-2], layer.keys.shape[-2])
                into.keys = torch.cat([_pad_left(into.keys, width), _pad_left(layer.keys, width)])
                into.values = torch.cat([_pad_left(into.values, width),
                                         _pad_left(layer.values, width)])
                if kind == "window":
                    into.cumulative_length = total
        if self.has_kv:
            batch.mask = torch.cat([_pad_left(batch.mask, total, 1), _pad_left(mask, total, 1)])
        return batch

    def _join_buffers(self, into, layer, rows: int) -> None:
        """Right-align both buffers at the longer length, zeros in front (see the class doc)."""
        length = max(into.buffer_len, layer.buffer_len)
        S = into.state.S                                        # [rows + 1, Hk, D, e]
        heads, d, e = S.shape[1], self.config.head_dim, S.shape[-1]
        capacity = into.buffer_capacity
        gate_dtype = torch.float64 if self.dtype == torch.float64 else torch.float32
        k = torch.zeros(rows + 1, capacity, heads, d, dtype=self.dtype, device=S.device)
        v = torch.zeros(rows + 1, capacity, heads, e, dtype=self.dtype, device=S.device)
        g = torch.zeros(rows + 1, capacity, heads, dtype=gate_dtype, device=S.device)
        for part, source in ((slice(0, rows), into), (slice(rows, rows + 1), layer)):
            n = source.buffer_len
            if n:
                k[part, length - n:length] = source.buffer_k[:, :n]
                v[part, length - n:length] = source.buffer_v[:, :n]
                g[part, length - n:length] = source.buffer_log_gate[:, :n]
        into.buffer_k, into.buffer_v, into.buffer_log_gate = k, v, g
        into.buffer_len, into.is_initialized = length, True

    @torch.inference_mode()
    def keep(self, batch: RetentionBatch | SlotBatch, rows: list[int]
             ) -> RetentionBatch | SlotBatch | None:
        if not rows:
            batch.drop_decoder()
            return None
        if isinstance(batch, SlotBatch):
            return self._keep_slots(batch, rows)
        if rows == list(range(batch.rows)):
            return batch
        batch.drop_decoder()
        batch.cache.batch_select_indices(torch.tensor(rows, device=self.device))
        if self.has_kv:
            batch.mask = batch.mask[rows]
            self._trim(batch)
        return batch

    def _trim(self, batch: RetentionBatch) -> None:
        """Drop leading positions that are padding in every remaining row."""
        used = batch.mask.any(0)
        drop = int(used.long().argmax()) if bool(used.any()) else 0
        if drop == 0:
            return
        batch.mask = batch.mask[:, drop:]
        total = batch.mask.shape[1]
        for kind, layer in zip(self.kinds, batch.cache.layers):
            if kind in ("power", "linear"):
                layer.seen_tokens = total
                continue
            excess = layer.keys.shape[-2] - total
            if excess > 0:
                layer.keys, layer.values = layer.keys[:, :, excess:], layer.values[:, :, excess:]
            if kind == "window":
                layer.cumulative_length = total

    @torch.inference_mode()
    def step(self, batch: RetentionBatch | SlotBatch, tokens: list[int], positions: list[int]
             ) -> Tensor:
        if isinstance(batch, SlotBatch):          # every row runs; free ones get token 0
            every_token, every_position = [0] * batch.capacity, [0] * batch.capacity
            for slot, token, position in zip(batch.slots, tokens, positions):
                every_token[slot], every_position[slot] = token, position
            logits = self._step_rows(batch, every_token, every_position)
            return logits[torch.tensor(batch.slots, device=logits.device)]
        return self._step_rows(batch, tokens, positions)

    def _step_rows(self, batch, tokens: list[int], positions: list[int]) -> Tensor:
        if self.cuda_graphs:
            if batch.decoder is None:
                batch.decoder = GraphedDecoder(self.model, batch.cache)
            return batch.decoder.step(tokens, positions)
        input_ids = torch.tensor(tokens, device=self.device)[:, None]
        position_ids = torch.tensor(positions, device=self.device)[:, None]
        attention_mask = None
        if self.has_kv:
            new = torch.ones(len(tokens), 1, dtype=torch.bool, device=self.device)
            attention_mask = batch.mask = torch.cat([batch.mask, new], 1)
        out = self.model(input_ids=input_ids, position_ids=position_ids,
                         attention_mask=attention_mask, past_key_values=batch.cache,
                         use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float()

    def cache_bytes(self, cache: Any) -> int:
        if isinstance(cache, (RetentionBatch, SlotBatch)):
            cache = cache.cache
        return tensor_bytes(cache)

    # -- persistent slots ------------------------------------------------------------------------

    def _join_slot(self, batch: SlotBatch | None, cache: Any) -> SlotBatch:
        if batch is None:
            batch = SlotBatch(self._empty_cache(1), [])
        if batch.rows == batch.capacity:
            batch = self._resize(batch, 2 * batch.capacity)
        slot = min(set(range(batch.capacity)) - set(batch.slots))
        for into, layer in zip(batch.cache.layers, cache.layers):
            into.state.S[slot].copy_(layer.state.S[0])
            into.state.z[slot].copy_(layer.state.z[0])
            into.refresh_read_state(slot)
            if into.buffer_capacity:
                self._put_buffer(into, layer, slot)
        batch.slots.append(slot)
        return batch

    def _put_buffer(self, into, layer, slot: int) -> None:
        """Right-align ``layer``'s buffer in row ``slot``; when it is longer than the batch's,
        every row's buffer moves right first (zeros in front, as in :meth:`_join_buffers`)."""
        length, n = into.buffer_len, layer.buffer_len
        tensors = (into.buffer_k, into.buffer_v, into.buffer_log_gate)
        if n > length:
            for t in tensors:
                t[:, n - length:n] = t[:, :length].clone()
                t[:, :n - length] = 0
            into.buffer_len = length = n
        for t, source in zip(tensors, (layer.buffer_k, layer.buffer_v, layer.buffer_log_gate)):
            t[slot] = 0
            if n:
                t[slot, length - n:length] = source[0, :n]

    def _keep_slots(self, batch: SlotBatch, rows: list[int]) -> SlotBatch:
        kept = [batch.slots[i] for i in rows]
        for slot in set(batch.slots) - set(kept):            # freed rows start clean
            for layer in batch.cache.layers:
                for t in layer.tensors():
                    t[slot] = 0
        batch.slots = kept
        if batch.capacity > 1 and 4 * batch.rows <= batch.capacity:
            batch = self._resize(batch, batch.capacity // 2)
        return batch

    def _resize(self, batch: SlotBatch, capacity: int) -> SlotBatch:
        """A new cache of ``capacity`` rows holding the running sequences in rows 0, 1, ..; the
        graphs of the old one are dropped (the new rows get their own)."""
        batch.drop_decoder()
        cache = self._empty_cache(capacity)
        index = torch.tensor(batch.slots, device=self.device)
        rows = torch.arange(batch.rows, device=self.device)
        for into, layer in zip(cache.layers, batch.cache.layers):
            for new, old in zip(into.tensors(), layer.tensors()):
                new[rows] = old[index]
            into.buffer_len = layer.buffer_len
        return SlotBatch(cache, list(range(batch.rows)))

    def _empty_cache(self, rows: int) -> PowerRetentionCache:
        """A cache of ``rows`` sequences with zero states and empty buffers, every tensor
        allocated (its addresses are what the graphs hold)."""
        config, device = self.config, self.device
        heads, d = config.num_key_value_heads, config.head_dim
        state_dtype = torch.float64 if self.dtype == torch.float64 else torch.float32
        cache = PowerRetentionCache(config)
        for kind, layer in zip(self.kinds, cache.layers):
            width = sympow_dim(d, config.deg) if kind == "power" else d     # linear: phi = x
            layer.state = RetentionState(
                torch.zeros(rows, heads, width, d, dtype=state_dtype, device=device),
                torch.zeros(rows, heads, width, dtype=state_dtype, device=device))
            layer.device = device
            if layer.buffer_capacity:
                keys = torch.zeros(rows, 1, heads, d, dtype=self.dtype, device=device)
                layer.lazy_initialization(keys, keys)
        return cache


def _pad_left(t: Tensor, length: int, dim: int = -2) -> Tensor:
    """``t`` with zeros (False) in front along ``dim`` up to ``length``."""
    missing = length - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim)


def make_backend(model, name: str = "model", cuda_graphs: bool = True
                 ) -> RetentionBackend | SequentialBackend:
    """The batched backend for the project's models (with CUDA graphs where they apply and
    ``cuda_graphs``), the sequential one for any other."""
    if getattr(model.config, "model_type", None) == "power_retention":
        return RetentionBackend(model, name, cuda_graphs)
    return SequentialBackend(model, name)
