"""Configuration of the power retention causal LM.

One configuration holds the decoder families that metamorphosis maps onto power retention
(Llama, Mistral, Qwen2, Qwen3, StarCoder2): RMSNorm or LayerNorm, gated or plain MLP, optional
biases, optional per-head q/k RMSNorm, tied or untied embeddings, RoPE with scaling. The time
mixing of every layer is chosen by ``time_mixing`` (one name, or one per layer), so hybrids and
same-backbone softmax baselines differ by one field. Everything is validated at construction.
"""

from __future__ import annotations

from transformers import PretrainedConfig
from transformers.activations import ACT2FN

TIME_MIXINGS = ("power", "softmax", "window", "linear")
MLP_TYPES = ("gated", "plain")
NORM_TYPES = ("rmsnorm", "layernorm")
# rope type -> the keys of rope_scaling it needs (besides "rope_type" or "type")
ROPE_TYPES = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor",
               "original_max_position_embeddings"),
    "yarn": ("factor",),
}
DEFAULT_DECODE_CHUNK_SIZE = 64


class PowerRetentionConfig(PretrainedConfig):
    """Decoder-only transformer whose time mixing is chosen per layer.

    Args:
        vocab_size, hidden_size, intermediate_size, num_hidden_layers: the usual sizes.
        num_attention_heads: query heads ``Hq``.
        num_key_value_heads: key/value heads ``Hk`` (GQA, ``Hq % Hk == 0``); None means ``Hq``.
        head_dim: size of a head; None means ``hidden_size // num_attention_heads`` (which must
            then divide evenly). Must be even (RoPE rotates pairs).
        hidden_act: activation of the MLP (a key of ``transformers.activations.ACT2FN``).
        mlp_type: ``"gated"`` (``down(act(gate(x)) * up(x))``: Llama, Mistral, Qwen) or
            ``"plain"`` (``c_proj(act(c_fc(x)))``: StarCoder2).
        norm_type: ``"rmsnorm"`` or ``"layernorm"`` (with bias, StarCoder2).
        norm_eps: epsilon of every norm (block norms, final norm, q/k norms).
        attention_bias: bias on the q, k and v projections (Qwen2, StarCoder2).
        attention_out_bias: bias on the output projection (StarCoder2).
        mlp_bias: bias on the MLP projections (StarCoder2).
        qk_norm: per-head RMSNorm of q and k before RoPE (Qwen3).
        tie_word_embeddings: share the input embedding and the LM head.
        rope_theta: RoPE base.
        rope_scaling: None or a dict with ``"rope_type"`` (or ``"type"``) in ``"default"``,
            ``"linear"``, ``"dynamic"`` (NTK-aware, grows with the longest position seen in the
            call), ``"llama3"``, ``"yarn"`` and that type's fields, as in transformers.
        max_position_embeddings: positions the model was trained for (used by dynamic/yarn).
        time_mixing: ``"power"`` (power retention), ``"softmax"`` (causal SDPA), ``"window"``
            (sliding-window softmax), ``"linear"`` (gated linear attention), or a list with one
            of these per layer.
        deg: even degree ``p >= 2`` of power retention.
        chunk_size: chunk size of power/linear layers in the chunked (prefill, training) path;
            None lets the op choose. Also the size at which decoding folds its buffer of recent
            tokens into the state (``64`` when None).
        sliding_window: tokens a ``"window"`` layer sees (itself included); required when a
            layer is ``"window"``.
        gate_bias_init: initial bias of the gate projection (weights start at zero), so gates
            start at ``sigmoid(gate_bias_init)`` (0.999 for 7).
        initializer_range: std of the normal initialisation of linear and embedding weights.
        use_cache, bos_token_id, eos_token_id, pad_token_id: as in transformers.
    """

    model_type = "power_retention"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, vocab_size: int = 32000, hidden_size: int = 256,
                 intermediate_size: int = 704, num_hidden_layers: int = 4,
                 num_attention_heads: int = 4, num_key_value_heads: int | None = None,
                 head_dim: int | None = None, hidden_act: str = "silu", mlp_type: str = "gated",
                 norm_type: str = "rmsnorm", norm_eps: float = 1e-6,
                 attention_bias: bool = False, attention_out_bias: bool = False,
                 mlp_bias: bool = False, qk_norm: bool = False,
                 tie_word_embeddings: bool = False, rope_theta: float = 10000.0,
                 rope_scaling: dict | None = None, max_position_embeddings: int = 4096,
                 time_mixing: str | list[str] = "power", deg: int = 2,
                 chunk_size: int | None = None, sliding_window: int | None = None,
                 gate_bias_init: float = 7.0, initializer_range: float = 0.02,
                 use_cache: bool = True, bos_token_id: int | None = None,
                 eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
                 **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = (num_attention_heads if num_key_value_heads is None
                                    else num_key_value_heads)
        self.head_dim = head_dim
        self.hidden_act = hidden_act
        self.mlp_type = mlp_type
        self.norm_type = norm_type
        self.norm_eps = norm_eps
        self.attention_bias = attention_bias
        self.attention_out_bias = attention_out_bias
        self.mlp_bias = mlp_bias
        self.qk_norm = qk_norm
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        self.max_position_embeddings = max_position_embeddings
        self.time_mixing = list(time_mixing) if isinstance(time_mixing, tuple) else time_mixing
        self.deg = deg
        self.chunk_size = chunk_size
        self.sliding_window = sliding_window
        self.gate_bias_init = gate_bias_init
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self._validate()
        if self.head_dim is None:
            self.head_dim = hidden_size // num_attention_heads
        super().__init__(tie_word_embeddings=tie_word_embeddings, bos_token_id=bos_token_id,
                         eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)

    # -- derived values ------------------------------------------------------------------------

    @property
    def layer_time_mixing(self) -> list[str]:
        """The time mixing of each layer (``time_mixing`` expanded to a list)."""
        if isinstance(self.time_mixing, str):
            return [self.time_mixing] * self.num_hidden_layers
        return list(self.time_mixing)

    @property
    def decode_chunk_size(self) -> int:
        """Buffered tokens at which decoding folds its buffer into the state."""
        return DEFAULT_DECODE_CHUNK_SIZE if self.chunk_size is None else self.chunk_size

    @property
    def rope_type(self) -> str:
        scaling = self.rope_scaling or {}
        return scaling.get("rope_type", scaling.get("type", "default"))

    # -- validation ----------------------------------------------------------------------------

    def _validate(self) -> None:
        def positive_int(name):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            positive_int(name)
        hq, hk = self.num_attention_heads, self.num_key_value_heads
        if self.head_dim is None:
            if self.hidden_size % hq:
                raise ValueError(f"num_attention_heads ({hq}) must divide hidden_size "
                                 f"({self.hidden_size}) when head_dim is not given")
            head_dim = self.hidden_size // hq
        else:
            positive_int("head_dim")
            head_dim = self.head_dim
        if head_dim % 2:
            raise ValueError(f"head_dim must be even (RoPE rotates pairs), got {head_dim}")
        if hq % hk:
            raise ValueError(f"num_attention_heads ({hq}) must be a multiple of "
                             f"num_key_value_heads ({hk})")
        if isinstance(self.deg, bool) or not isinstance(self.deg, int) or self.deg < 2 \
                or self.deg % 2:
            raise ValueError(f"deg must be an even integer >= 2, got {self.deg!r}")
        if self.chunk_size is not None:
            positive_int("chunk_size")
        if self.hidden_act not in ACT2FN:
            raise ValueError(f"hidden_act must be one of transformers' activations "
                             f"{sorted(ACT2FN)}, got {self.hidden_act!r}")
        if self.mlp_type not in MLP_TYPES:
            raise ValueError(f"mlp_type must be one of {MLP_TYPES}, got {self.mlp_type!r}")
        if self.norm_type not in NORM_TYPES:
            raise ValueError(f"norm_type must be one of {NORM_TYPES}, got {self.norm_type!r}")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be > 0, got {self.norm_eps!r}")

        kinds = self.time_mixing
        if isinstance(kinds, str):
            kinds = [kinds]
        elif isinstance(kinds, list):
            if len(kinds) != self.num_hidden_layers:
                raise ValueError(f"time_mixing lists one entry per layer: expected "
                                 f"{self.num_hidden_layers} (num_hidden_layers), got {len(kinds)}")
        else:
            raise ValueError(f"time_mixing must be a string or a list of strings, got {kinds!r}")
        unknown = sorted({k for k in kinds if k not in TIME_MIXINGS}, key=str)
        if unknown:
            raise ValueError(f"unknown time_mixing {unknown}; choose from {TIME_MIXINGS}")
        if "window" in kinds:
            if self.sliding_window is None:
                raise ValueError("time_mixing 'window' needs sliding_window (tokens per window)")
            positive_int("sliding_window")

        if self.rope_scaling is not None:
            if not isinstance(self.rope_scaling, dict):
                raise ValueError(f"rope_scaling must be None or a dict, got {self.rope_scaling!r}")
            rope_type = self.rope_type
            if rope_type not in ROPE_TYPES:
                raise ValueError(f"rope_scaling type must be one of {sorted(ROPE_TYPES)}, "
                                 f"got {rope_type!r}")
            missing = [k for k in ROPE_TYPES[rope_type] if k not in self.rope_scaling]
            if missing:
                raise ValueError(f"rope_scaling of type {rope_type!r} needs {missing}")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta must be > 0, got {self.rope_theta!r}")
