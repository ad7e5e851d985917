"""Model presets: one backbone per size, five time mixings that differ only in the mixing layer.

``TIME_MIXING`` names the layer: causal softmax attention (SDPA), sliding-window softmax,
gated linear attention (``elu + 1`` features, with normaliser), power retention with ``p = 2``
and with ``p = 4``. ``power4`` uses small heads (``head_dim`` from ``SIZES``, more heads, the same
``hidden_size``), so its state ``C(d + 3, 4) x (d + 1)`` per head stays affordable: projections,
MLP, norms, embeddings and therefore the weight FLOPs are identical in all five.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

# Backbones. ``chunk_size`` (power and linear) and ``sliding_window`` (window) are set here so
# that runs and FLOP counts do not depend on defaults chosen elsewhere.
SIZES: dict[str, dict] = {
    # runs on a 2-core CPU in a minute or two (the default of ``train``)
    "tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                 num_attention_heads=4, head_dim=16, chunk_size=64, sliding_window=64,
                 small_head_dim=8),
    # GPU experiments at 8k-64k context (about 10.6M parameters besides the embeddings)
    "small": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
                  num_attention_heads=6, head_dim=64, chunk_size=128, sliding_window=512,
                  small_head_dim=16),
    # GPT-2 small class (about 85M parameters besides the embeddings)
    "base": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                 num_attention_heads=12, head_dim=64, chunk_size=256, sliding_window=1024,
                 small_head_dim=16),
}

TIME_MIXING: dict[str, dict] = {
    "softmax": dict(time_mixing="softmax"),
    "window": dict(time_mixing="window"),
    "linear": dict(time_mixing="linear"),
    "power": dict(time_mixing="power", deg=2),
    "power4": dict(time_mixing="power", deg=4, small_heads=True),
}

MAX_POSITIONS = 1 << 17


def padded_vocab(vocab_size: int, multiple: int = 64) -> int:
    """Embedding rows: the tokenizer's vocabulary rounded up (GPU-friendly matrix shapes)."""
    return -(-vocab_size // multiple) * multiple


def preset_config(preset: str, size: str = "tiny", vocab_size: int = 258,
                  eos_token_id: int | None = 256) -> PretrainedConfig:
    """The :class:`PowerRetentionConfig` of a preset and size."""
    from ..model import PowerRetentionConfig

    if preset not in TIME_MIXING:
        raise ValueError(f"preset must be one of {sorted(TIME_MIXING)}, got {preset!r}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    backbone = dict(SIZES[size])
    small_head_dim = backbone.pop("small_head_dim")
    mixing = dict(TIME_MIXING[preset])
    if mixing.pop("small_heads", False):
        width = backbone["num_attention_heads"] * backbone["head_dim"]
        backbone.update(head_dim=small_head_dim, num_attention_heads=width // small_head_dim)
    backbone["num_key_value_heads"] = backbone["num_attention_heads"]
    return PowerRetentionConfig(vocab_size=padded_vocab(vocab_size),
                                max_position_embeddings=MAX_POSITIONS,
                                bos_token_id=eos_token_id, eos_token_id=eos_token_id,
                                **backbone, **mixing)


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(config: PretrainedConfig, overrides: list[str]) -> PretrainedConfig:
    """``["key=value", ...]`` (values parsed as JSON when they can be), re-validated."""
    fields = config.to_dict()
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override must be KEY=VALUE, got {item!r}")
        if key not in fields:
            raise ValueError(f"override: {type(config).__name__} has no field {key!r}")
        fields[key] = _parse_value(value)
    if not overrides:
        return config
    return type(config).from_dict(fields)


def read_config(path: str | Path) -> PretrainedConfig:
    """Any transformers config: a model folder or a ``config.json`` file (no downloads)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(f"no transformers config at {str(path)!r}")
    fields = json.loads(path.read_text())
    model_type = fields.pop("model_type", None)
    if model_type is None:
        raise ValueError(f"{path}: config has no model_type")
    if model_type == "power_retention":
        from .. import model  # noqa: F401  (registers the model with the Auto classes)
    return AutoConfig.for_model(model_type, **fields)


def model_config(preset: str, size: str, vocab_size: int, *, eos_token_id: int | None = None,
                 config: str | Path | None = None,
                 overrides: list[str] | None = None) -> PretrainedConfig:
    """The config a run trains: a preset, or ``config`` (any transformers config) if given,
    with ``overrides`` applied; its vocabulary must hold the tokenizer's."""
    if config is not None:
        result = read_config(config)
    else:
        result = preset_config(preset, size, vocab_size, eos_token_id)
    result = apply_overrides(result, overrides or [])
    if result.vocab_size < vocab_size:
        raise ValueError(f"model vocab_size {result.vocab_size} < tokenizer's {vocab_size}")
    return result


def build_model(config: PretrainedConfig) -> PreTrainedModel:
    """A freshly initialised causal LM (float32) from its config."""
    if config.model_type == "power_retention":
        from .. import model  # noqa: F401
    return AutoModelForCausalLM.from_config(config)


def load_model(folder: str | Path, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """A trained causal LM from a local folder (a checkpoint or any transformers model), in
    ``dtype`` (default: the one it was saved in)."""
    config = read_config(folder)
    if dtype is None:
        return AutoModelForCausalLM.from_pretrained(str(folder), config=config)
    return AutoModelForCausalLM.from_pretrained(str(folder), config=config, dtype=dtype)
