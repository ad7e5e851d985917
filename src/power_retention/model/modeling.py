"""The power retention causal LM, in transformers conventions, top to bottom:

norms and MLP -> time mixing (power retention, softmax, sliding window or gated linear) ->
block -> model -> causal-LM head. A layer reads and writes its slot of a
:class:`~power_retention.model.cache.PowerRetentionCache` when one is passed: prefill (several
tokens) goes through the chunked op, each generated token through
``power_retention_decode_into`` (into the cache's buffer) and, when that fills the buffer,
``power_retention_fold``.

Padding (left padding in batched generation) is the ``attention_mask``: masked positions of
power/linear layers get a zero key feature (``phi(0) = 0`` for power retention; linear attention
zeroes its positive features) and a zero log gate (no decay), so they add nothing to the state;
softmax/window layers mask them out of the keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from power_retention.ops import (
    RetentionState,
    power_retention,
    power_retention_decode_into,
    power_retention_fold,
    state_bytes,
)

from . import fused
from .cache import PowerRetentionCache, RecurrentCacheLayer
from .configuration import PowerRetentionConfig
from .linear_attention import feature_map, linear_attention
from .rope import RotaryEmbedding, apply_rope_qk

# ---------------------------------------------------------------------------------------------
# Norms and MLP
# ---------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """``x / rms(x) * weight``, computed in float32 (Llama, Mistral, Qwen)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: Tensor, residual: Tensor | None = None):
        """The norm of ``x``, or with ``residual`` of ``x + residual``, returning ``(normed, x +
        residual)``. fp32 inside (float64 stays); rounded to x's dtype, then scaled, as Llama's
        norm does. Generating on a GPU it is one kernel (``fused.rms_norm``, the add
        included)."""
        if fused.fusable(x, self.weight) and (residual is None or fused.fusable(residual)):
            return fused.rms_norm(x, self.weight, self.eps, residual)
        if residual is None:
            return self.weight * F.rms_norm(x, (x.shape[-1],), eps=self.eps)
        total = x + residual
        return self.weight * F.rms_norm(total, (x.shape[-1],), eps=self.eps), total


def make_norm(config: PowerRetentionConfig, size: int) -> nn.Module:
    if config.norm_type == "rmsnorm":
        return RMSNorm(size, config.norm_eps)
    return nn.LayerNorm(size, eps=config.norm_eps)


class MLP(nn.Module):
    """``"gated"``: ``down(act(gate(x)) * up(x))``; ``"plain"``: ``c_proj(act(c_fc(x)))``."""

    def __init__(self, config: PowerRetentionConfig):
        super().__init__()
        hidden, inner, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gated = config.mlp_type == "gated"
        if self.gated:
            self.gate_proj = nn.Linear(hidden, inner, bias=bias)
            self.up_proj = nn.Linear(hidden, inner, bias=bias)
            self.down_proj = nn.Linear(inner, hidden, bias=bias)
        else:
            self.c_fc = nn.Linear(hidden, inner, bias=bias)
            self.c_proj = nn.Linear(inner, hidden, bias=bias)
        self.act = ACT2FN[config.hidden_act]
        self.silu = config.hidden_act == "silu"

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """The MLP of ``x``, plus ``residual`` when given. Generating on a GPU it is two
        launches: gate and up with ``silu(gate) * up``, then the last product with the add."""
        if not self.gated:
            h, last = self.act(self.c_fc(x)), self.c_proj
        elif self.silu and fused.linears_fusable(x, self.gate_proj, self.up_proj):
            h, last = fused.gate_up_silu(x, self.gate_proj, self.up_proj), self.down_proj
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
            if self.silu and fused.fusable(gate, up):        # generating, beyond 64 rows
                h, last = fused.silu_mul(gate, up), self.down_proj
            else:
                h, last = self.act(gate) * up, self.down_proj
        if fused.linears_fusable(h, last) and (residual is None or (
                residual.dtype == h.dtype and fused.fusable(residual))):
            return fused.linear(h, last, residual)
        out = last(h)
        return out if residual is None else residual + out


# ---------------------------------------------------------------------------------------------
# Time mixing
# ---------------------------------------------------------------------------------------------


class GateProjection(nn.Linear):
    """``hidden -> Hk`` gate logits; initialised to weight 0 and bias ``gate_bias_init`` so every
    gate starts at ``sigmoid(gate_bias_init)`` (near 1: little decay at first)."""


class PowerRetentionAttention(nn.Module):
    """Drop-in for a decoder's self-attention, with the time mixing of ``layer_idx``.

    Projections ``q_proj, k_proj, v_proj`` (bias ``attention_bias``) and ``o_proj`` (bias
    ``attention_out_bias``) as in Llama-style checkpoints; optional per-head RMSNorm
    ``q_norm, k_norm`` (Qwen3); RoPE on q and k; GQA. ``"power"`` and ``"linear"`` layers add
    ``g_proj`` (one gate per KV head, ``log_gate = logsigmoid(g_proj(x))``).
    """

    def __init__(self, config: PowerRetentionConfig, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.time_mixing = config.layer_time_mixing[layer_idx]
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim, self.deg = config.head_dim, config.deg
        hidden, d, bias = config.hidden_size, config.head_dim, config.attention_bias
        self.q_proj = nn.Linear(hidden, self.num_heads * d, bias=bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * d, bias=bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * d, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * d, hidden, bias=config.attention_out_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(d, config.norm_eps)
            self.k_norm = RMSNorm(d, config.norm_eps)
        if self.time_mixing in ("power", "linear"):
            self.g_proj = GateProjection(hidden, self.num_kv_heads, bias=True)

    def state_bytes(self) -> int | None:
        """Bytes of this layer's fixed recurrent state per sequence (fp32 ``S`` and ``z``, the
        power layer's buffer of recent tokens not included); None for softmax/window layers,
        whose KV cache grows with the context (up to the window)."""
        if self.time_mixing == "power":
            return state_bytes(self.head_dim, deg=self.deg, num_kv_heads=self.num_kv_heads)
        if self.time_mixing == "linear":
            return self.num_kv_heads * self.head_dim * (self.head_dim + 1) * 4
        return None

    def forward(self, hidden_states: Tensor, position_embeddings: tuple[Tensor, Tensor],
                attention_mask: Tensor | None = None,
                past_key_values: PowerRetentionCache | None = None) -> Tensor:
        """hidden_states ``[B, n, hidden]``; ``position_embeddings`` (cos, sin) ``[B, n, d]``;
        ``attention_mask [B, past + n]`` (1 = token, 0 = padding) or None. Returns
        ``[B, n, hidden]``."""
        B, n, _ = hidden_states.shape
        q, k, v, log_gate = self._project(hidden_states, *position_embeddings)
        layer = None if past_key_values is None else past_key_values.layers[self.layer_idx]
        if self.time_mixing in ("power", "linear"):
            o = self._recurrent(q, k, v, log_gate, attention_mask, layer)
        else:
            o = self._softmax(q, k, v, attention_mask, layer)
        return self.o_proj(o.reshape(B, n, self.num_heads * self.head_dim))

    def _project(self, x: Tensor, cos: Tensor, sin: Tensor):
        """``q, k, v [B, n, H, d]`` (RoPE on q and k) and, for power and linear layers, the
        log-gates ``[B, n, Hk]`` (float32; float64 for float64 inputs), else None. A decode
        step on a GPU makes all of them in one launch (``fused.project_qkv``)."""
        B, n, _ = x.shape
        g_proj = getattr(self, "g_proj", None)
        linears = (self.q_proj, self.k_proj, self.v_proj)
        if (not self.config.qk_norm and fused.linears_fusable(x, *linears)
                and (g_proj is None or fused.linears_fusable(x, g_proj))
                and fused.qkv_supported(self.q_proj, self.num_heads, cos, x)):
            return fused.project_qkv(x, *linears, g_proj, cos, sin, self.num_heads,
                                     self.num_kv_heads)
        q = self.q_proj(x).view(B, n, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, n, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, n, self.num_kv_heads, self.head_dim)
        if self.config.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope_qk(q, k, cos, sin)
        if g_proj is None:
            return q, k, v, None
        logits = g_proj(x)                                                       # [B, n, Hk]
        if fused.fusable(logits):                                          # generating
            return q, k, v, fused.log_sigmoid(logits)
        gate_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        return q, k, v, F.logsigmoid(logits.to(gate_dtype))

    def _recurrent(self, q, k, v, log_gate, attention_mask, layer: RecurrentCacheLayer | None):
        """Power retention or gated linear attention; outputs ``[B, n, Hq, d]``."""
        B, n = q.shape[:2]
        gate_dtype = log_gate.dtype
        if self.time_mixing == "linear":
            q, k = feature_map(q), feature_map(k)
        if attention_mask is not None:
            # padding: a zero key adds nothing to the state, a zero log gate decays nothing
            token = attention_mask[:, -n:].bool()
            k = k * token[:, :, None, None].to(k.dtype)
            log_gate = torch.where(token[:, :, None], log_gate, 0.0)

        if self.time_mixing == "linear":
            initial = None if layer is None else layer.state
            o, state = linear_attention(q, k, v, log_gate, initial,
                                        chunk_size=self.config.decode_chunk_size)
            if layer is not None:
                layer.update(state, None, n)
            return o

        if layer is None:
            return power_retention(q, k, v, log_gate, deg=self.deg,
                                   chunk_size=self.config.chunk_size)
        if n == 1:   # one new token: attention over the buffer, query the state
            if layer.state is None:
                layer.appended(RetentionState.zeros(B, self.num_kv_heads, self.head_dim,
                                                    self.head_dim, self.deg, device=q.device,
                                                    dtype=gate_dtype), 0)
            state = layer.state
            slots = layer.slots(k, v)                  # the token is written into its slot
            # the bf16 copy of the state (half the bytes) only at degree 2: a degree-4 query
            # sums 52,360 features that cancel, and its rounding would reach the outputs
            read = layer.read_state() if self.deg == 2 else state
            o = power_retention_decode_into(q, k, v, log_gate, read, slots, layer.buffer_len,
                                            deg=self.deg)
            layer.appended(state)
            if layer.buffer_len == layer.buffer_capacity:    # full: fold it into the state
                out = state if layer.in_place else None
                layer.update(power_retention_fold(state, slots, deg=self.deg, out=out), None, 0)
            return o
        # several tokens (prefill, or a later piece): the chunked path from the folded state
        o, state = power_retention(q, k, v, log_gate, deg=self.deg,
                                   chunk_size=self.config.chunk_size,
                                   initial_state=self._folded_state(layer, q.shape[2]),
                                   output_final_state=True)
        layer.update(state, None, n)
        return o

    def _folded_state(self, layer: RecurrentCacheLayer, num_heads: int
                      ) -> RetentionState | None:
        """The layer's state with its buffered tokens folded in (None before any token)."""
        buffer = layer.buffer
        if buffer is None:
            return layer.state
        B, L, _, d = buffer.k.shape
        # zero queries: outputs are discarded, only the final state is wanted
        no_query = buffer.k.new_zeros(B, L, num_heads, d)
        _, state = power_retention(no_query, buffer.k, buffer.v, buffer.log_gate, deg=self.deg,
                                   initial_state=layer.state, output_final_state=True)
        return state

    def _softmax(self, q, k, v, attention_mask, layer):
        """Causal softmax attention, over a sliding window for ``"window"``; ``[B, n, Hq, d]``."""
        n = q.shape[1]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)   # [B, H, T, d]
        if layer is not None:
            k, v = layer.update(k, v)                 # cached keys and values, then the new
        L = k.shape[2]
        window = self.config.sliding_window if self.time_mixing == "window" else None
        if attention_mask is None and L == n and window is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            q_pos = torch.arange(L - n, L, device=q.device)[:, None]
            k_pos = torch.arange(L, device=q.device)[None, :]
            allowed = k_pos <= q_pos
            if window is not None:
                allowed = allowed & (q_pos - k_pos < window)
            if attention_mask is not None:
                allowed = allowed & attention_mask[:, None, None, -L:].bool()
            # a padded query sees no key; let it see itself so its row stays finite
            allowed = allowed | (k_pos == q_pos)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True)
        return o.transpose(1, 2)


# ---------------------------------------------------------------------------------------------
# Block, model, causal LM
# ---------------------------------------------------------------------------------------------


class PowerRetentionBlock(GradientCheckpointingLayer):
    """Pre-norm residual block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, config: PowerRetentionConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = make_norm(config, config.hidden_size)
        self.self_attn = PowerRetentionAttention(config, layer_idx)
        self.post_attention_layernorm = make_norm(config, config.hidden_size)
        self.mlp = MLP(config)

    def forward(self, hidden_states: Tensor, position_embeddings: tuple[Tensor, Tensor],
                attention_mask: Tensor | None = None,
                past_key_values: PowerRetentionCache | None = None) -> Tensor:
        attended = self.self_attn(self.input_layernorm(hidden_states), position_embeddings,
                                  attention_mask, past_key_values)
        if isinstance(self.post_attention_layernorm, RMSNorm):     # the add inside the norm
            normed, hidden_states = self.post_attention_layernorm(attended, hidden_states)
        else:
            hidden_states = hidden_states + attended
            normed = self.post_attention_layernorm(hidden_states)
        return self.mlp(normed, hidden_states)


class PowerRetentionPreTrainedModel(PreTrainedModel):
    config_class = PowerRetentionConfig
    config: PowerRetentionConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["PowerRetentionBlock"]
    _is_stateful = True                   # the cache cannot be rolled back (no assisted decoding)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, GateProjection):
            init.zeros_(module.weight)
            init.constant_(module.bias, self.config.gate_bias_init)
        else:
            super()._init_weights(module)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # generate must not build a DynamicCache: forward builds a PowerRetentionCache
        return False


class PowerRetentionModel(PowerRetentionPreTrainedModel):
    """Embedding, blocks and final norm; returns the last hidden states and the cache."""

    def __init__(self, config: PowerRetentionConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         config.pad_token_id)
        self.layers = nn.ModuleList(PowerRetentionBlock(config, i)
                                    for i in range(config.num_hidden_layers))
        self.norm = make_norm(config, config.hidden_size)
        self.rotary_emb = RotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None,
                past_key_values: PowerRetentionCache | None = None,
                inputs_embeds: Tensor | None = None, use_cache: bool | None = None,
                **kwargs) -> BaseModelOutputWithPast:
        """input_ids ``[B, n]`` (or inputs_embeds ``[B, n, hidden]``); attention_mask
        ``[B, past + n]`` covering the cached tokens too; position_ids ``[B, n]`` (derived
        from the mask, or counted from the cache, when None)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        B, n = inputs_embeds.shape[:2]
        if use_cache is None:   # by default a cache in evaluation, none in training
            use_cache = self.config.use_cache and not self.training
        if self.gradient_checkpointing and self.training:
            use_cache = False              # a checkpointed layer would update the cache twice
        if use_cache and past_key_values is None:
            past_key_values = PowerRetentionCache(self.config)
        if not use_cache:
            past_key_values = None
        if past_key_values is not None and not isinstance(past_key_values, PowerRetentionCache):
            raise TypeError(f"past_key_values must be a PowerRetentionCache, got "
                            f"{type(past_key_values).__name__}")
        past = 0 if past_key_values is None else past_key_values.get_seq_length()
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape != (B, past + n):
                raise ValueError(f"attention_mask must be [batch, cached + new tokens] = "
                                 f"[{B}, {past + n}], got {list(attention_mask.shape)}")
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -n:]
            else:
                position_ids = torch.arange(past, past + n, device=inputs_embeds.device)
                position_ids = position_ids[None].expand(B, n)

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(position_ids, hidden_states.dtype)
        for block in self.layers:
            hidden_states = block(hidden_states, position_embeddings, attention_mask,
                                  past_key_values=past_key_values)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states),
                                       past_key_values=past_key_values)


class PowerRetentionForCausalLM(PowerRetentionPreTrainedModel, GenerationMixin):
    """:class:`PowerRetentionModel` plus the LM head; ``generate`` works as for any causal LM
    and keeps a :class:`PowerRetentionCache` (constant size for power/linear/window layers)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: PowerRetentionConfig):
        super().__init__(config)
        self.model = PowerRetentionModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def state_bytes(self) -> int:
        """Bytes of fixed recurrent state per sequence, all power/linear layers together."""
        sizes = [block.self_attn.state_bytes() for block in self.model.layers]
        return sum(s for s in sizes if s is not None)

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None,
                past_key_values: PowerRetentionCache | None = None,
                inputs_embeds: Tensor | None = None, labels: Tensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int = 0,
                num_items_in_batch: int | Tensor | None = None,
                **kwargs) -> CausalLMOutputWithPast:
        """As :meth:`PowerRetentionModel.forward`; ``labels [B, n]`` (-100 = ignored) are the
        input ids themselves (shifted here), giving the mean next-token cross-entropy (summed
        and divided by ``num_items_in_batch`` when given). ``logits_to_keep > 0`` computes only
        the last that many positions' logits."""
        out = self.model(input_ids, attention_mask, position_ids, past_key_values,
                         inputs_embeds, use_cache)
        hidden_states = out.last_hidden_state
        if logits_to_keep:
            hidden_states = hidden_states[:, -logits_to_keep:]
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            targets = labels[:, 1:].reshape(-1).to(logits.device)
            predictions = logits[:, :-1].reshape(-1, logits.shape[-1])
            if predictions.element_size() < 4:         # half precision: the loss in float32
                predictions = predictions.float()
            if num_items_in_batch is None:
                loss = F.cross_entropy(predictions, targets, ignore_index=-100)
            else:
                loss = F.cross_entropy(predictions, targets, ignore_index=-100,
                                       reduction="sum") / num_items_in_batch
        return CausalLMOutputWithPast(loss=loss, logits=logits,
                                      past_key_values=out.past_key_values)
