"""Per-family translation of a pretrained softmax transformer onto ``PowerRetentionConfig``.

A family is recognised by ``config.model_type``. Each one says how its configuration fields read
as ours (norm, MLP, biases, q/k norm, activation, RoPE). Weight names need no translation: the
project's model uses transformers' names (``model.layers.<i>.self_attn.q_proj``, ``mlp.gate_proj``
or StarCoder2's ``mlp.c_fc``, ...). Everything not named here is rejected with an error listing
what is supported, so a family is added deliberately, with its logit-equality test.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from transformers import PretrainedConfig


class UnsupportedArchitectureError(ValueError):
    """The source model's family has no mapping onto the power retention model."""


@dataclass(frozen=True)
class Family:
    """How one transformers family reads as a ``PowerRetentionConfig``."""

    model_type: str
    architecture: str
    fields: Callable[[PretrainedConfig], dict]


def _rope(config: PretrainedConfig) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling or None) from either the transformers 5 or the older layout."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    theta = params.pop("rope_theta", None) or getattr(config, "rope_theta", None) or 10000.0
    if not params:
        params = dict(getattr(config, "rope_scaling", None) or {})
    if params.get("rope_type", params.get("type", "default")) == "default":
        return float(theta), None
    return float(theta), params


def _common(config: PretrainedConfig) -> dict:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope_theta, rope_scaling = _rope(config)
    return dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=heads,
        num_key_value_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        hidden_act=config.hidden_act,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        bos_token_id=getattr(config, "bos_token_id", None),
        eos_token_id=getattr(config, "eos_token_id", None),
        pad_token_id=getattr(config, "pad_token_id", None),
    )


def _sliding_window(config: PretrainedConfig) -> int | None:
    """The attention window of every layer, or None when attention is global.

    Mistral applies ``sliding_window`` to every layer when it is set; Qwen2/Qwen3 only when
    ``use_sliding_window`` is on, and then only from layer ``max_window_layers`` on, which this
    mapping does not model (an error says so rather than silently changing the outputs).
    """
    window = getattr(config, "sliding_window", None)
    if config.model_type == "mistral":
        return window
    layer_types = getattr(config, "layer_types", None) or []
    if getattr(config, "use_sliding_window", False) and "sliding_attention" in layer_types:
        if any(t != "sliding_attention" for t in layer_types):
            raise UnsupportedArchitectureError(
                f"{config.model_type} with sliding window on some layers only "
                f"(layer_types={layer_types}) is not supported: use it with "
                "use_sliding_window=False, as its released checkpoints are")
        return window
    return None


def _llama(config: PretrainedConfig) -> dict:
    bias = bool(getattr(config, "attention_bias", False))
    return dict(_common(config), mlp_type="gated", norm_type="rmsnorm",
                norm_eps=config.rms_norm_eps, attention_bias=bias, attention_out_bias=bias,
                mlp_bias=bool(getattr(config, "mlp_bias", False)), qk_norm=False)


def _mistral(config: PretrainedConfig) -> dict:
    return dict(_common(config), mlp_type="gated", norm_type="rmsnorm",
                norm_eps=config.rms_norm_eps, attention_bias=False, attention_out_bias=False,
                mlp_bias=False, qk_norm=False)


def _qwen2(config: PretrainedConfig) -> dict:
    # q, k and v carry a bias, the output projection does not
    return dict(_common(config), mlp_type="gated", norm_type="rmsnorm",
                norm_eps=config.rms_norm_eps, attention_bias=True, attention_out_bias=False,
                mlp_bias=False, qk_norm=False)


def _qwen3(config: PretrainedConfig) -> dict:
    # RMSNorm over each head's q and k, before RoPE
    bias = bool(getattr(config, "attention_bias", False))
    return dict(_common(config), mlp_type="gated", norm_type="rmsnorm",
                norm_eps=config.rms_norm_eps, attention_bias=bias, attention_out_bias=bias,
                mlp_bias=False, qk_norm=True)


def _starcoder2(config: PretrainedConfig) -> dict:
    # LayerNorm with bias, a plain two-matrix MLP, one use_bias switch for every linear layer
    bias = bool(getattr(config, "use_bias", True))
    return dict(_common(config), mlp_type="plain", norm_type="layernorm",
                norm_eps=config.norm_epsilon, attention_bias=bias, attention_out_bias=bias,
                mlp_bias=bias, qk_norm=False)


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("llama", "LlamaForCausalLM", _llama),
    Family("mistral", "MistralForCausalLM", _mistral),
    Family("qwen2", "Qwen2ForCausalLM", _qwen2),
    Family("qwen3", "Qwen3ForCausalLM", _qwen3),
    Family("starcoder2", "Starcoder2ForCausalLM", _starcoder2),
)}

SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(f.architecture for f in FAMILIES.values())


def family_named(model_type: str | None, architectures: list[str] | None = None) -> Family:
    """The family of a ``model_type`` (and its ``architectures``, when the config lists them),
    or an error naming the supported architectures."""
    architectures = list(architectures or [])
    family = FAMILIES.get(model_type)
    if family is None or any(a != family.architecture for a in architectures):
        given = ", ".join(architectures) or f"model_type={model_type!r}"
        raise UnsupportedArchitectureError(
            f"cannot metamorphose {given}: supported architectures are "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    return family


def family_of(config: PretrainedConfig) -> Family:
    """The family of a source configuration (see ``family_named``)."""
    return family_named(getattr(config, "model_type", None),
                        getattr(config, "architectures", None))


def config_fields(config: PretrainedConfig) -> dict:
    """``PowerRetentionConfig`` keyword arguments that hold the source's weights exactly."""
    family = family_of(config)
    fields = family.fields(config)
    fields["sliding_window"] = _sliding_window(config)
    return fields

