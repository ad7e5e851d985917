"""CUDA-graph decoding: one new token per sequence with the host out of the loop.

An eager decode step of a layered model launches a few hundred small kernels; on a GPU their
launch overhead, not the arithmetic, sets the time per token. A recurrent cache has fixed
shapes, so each step can be captured once and replayed: the only thing that changes between
steps is how many tokens the power layers' buffers hold (``0 .. chunk_size - 1``; the step
that fills the buffer folds it into the state). :class:`GraphedDecoder` keeps one graph per
such *phase*: the first step in a phase runs eagerly (it warms Triton's and cuBLAS's caches),
the second captures it, every later one replays it. Softmax and window layers grow their
key/value cache every step and cannot be captured: models with them decode eagerly.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .cache import PowerRetentionCache, RecurrentCacheLayer


def graphable(model) -> bool:
    """Whether :class:`GraphedDecoder` can run ``model``: a CUDA model whose layers are all
    power or linear retention (and whose RoPE does not rescale with the positions seen, which
    reads them back to the host)."""
    config = model.config
    kinds = set(config.layer_time_mixing)
    return (next(model.parameters()).is_cuda and kinds <= {"power", "linear"}
            and config.rope_type != "dynamic")


class GraphedDecoder:
    """Decode steps of ``model`` over ``cache`` (its batch fixed) through CUDA graphs.

    ``cache`` must hold at least one token per sequence (a prefill ran). The decoder switches
    its layers to in-place updates (the state tensors keep their addresses), so it stays valid
    while the cache's tensors do: build a new one after the batch's rows change.

        decoder = GraphedDecoder(model, cache)
        logits = decoder.step(tokens, positions)     # [B] each -> [B, V] float32
    """

    def __init__(self, model, cache: PowerRetentionCache):
        if not graphable(model):
            raise ValueError(
                "CUDA-graph decoding needs a model on a CUDA device whose layers are all "
                f"'power' or 'linear' (got {list(model.config.layer_time_mixing)} on "
                f"{next(model.parameters()).device}); decode eagerly instead")
        self.layers: list[RecurrentCacheLayer] = list(cache.layers)
        if any(layer.state is None for layer in self.layers):
            raise ValueError("prefill the cache before decoding with CUDA graphs (it holds no "
                             "state yet)")
        self.model, self.cache = model, cache
        rows, device = self.layers[0].state.S.shape[0], self.layers[0].state.S.device
        self.input_ids = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.position_ids = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple[int, ...], tuple[torch.cuda.CUDAGraph, Tensor, list[int]]] = {}
        self.warm: set[tuple[int, ...]] = set()
        for layer in self.layers:
            layer.in_place = True

    @property
    def rows(self) -> int:
        return self.input_ids.shape[0]

    def _forward(self) -> Tensor:
        out = self.model(input_ids=self.input_ids, position_ids=self.position_ids,
                         past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float()

    @torch.inference_mode()
    def step(self, tokens, positions) -> Tensor:
        """Feed ``tokens[i]`` at position ``positions[i]`` to row ``i``; logits ``[B, V]``."""
        tokens = torch.as_tensor(tokens, dtype=torch.long).view(self.rows, 1)
        positions = torch.as_tensor(positions, dtype=torch.long).view(self.rows, 1)
        self.input_ids.copy_(tokens, non_blocking=True)
        self.position_ids.copy_(positions, non_blocking=True)
        phase = tuple(layer.buffer_len for layer in self.layers)
        entry = self.graphs.get(phase)
        if entry is not None:
            graph, logits, after = entry
            graph.replay()
            for layer, length in zip(self.layers, after):
                layer.buffer_len = length
                layer.seen_tokens += 1
            return logits.clone()
        if phase not in self.warm:             # first visit: eager, on a side stream
            self.warm.add(phase)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                logits = self._forward()
            torch.cuda.current_stream().wait_stream(stream)
            return logits.clone()
        # second visit: capture (the Python side runs, advancing the layers' counters as an
        # eager step would; the GPU work is only recorded), then replay it once
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self._forward()
        self.graphs[phase] = (graph, logits, [layer.buffer_len for layer in self.layers])
        graph.replay()
        return logits.clone()

    def release(self) -> None:
        """Drop the graphs and give the layers back their ordinary updates."""
        self.graphs.clear()
        for layer in self.layers:
            layer.in_place = False
