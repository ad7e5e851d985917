"""The power retention causal LM: configuration, layers, model and generation cache.

Importing this package registers ``"power_retention"`` with ``AutoConfig``, ``AutoModel`` and
``AutoModelForCausalLM``, so ``AutoModelForCausalLM.from_pretrained(folder)`` works on a saved
model.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .cache import PowerRetentionCache, RecurrentCacheLayer
from .configuration import PowerRetentionConfig
from .graphs import GraphedDecoder, graphable
from .linear_attention import feature_map, linear_attention
from .modeling import (
    PowerRetentionAttention,
    PowerRetentionBlock,
    PowerRetentionForCausalLM,
    PowerRetentionModel,
    PowerRetentionPreTrainedModel,
)
from .rope import RotaryEmbedding, apply_rope, apply_rope_qk, rope_frequencies

AutoConfig.register(PowerRetentionConfig.model_type, PowerRetentionConfig, exist_ok=True)
AutoModel.register(PowerRetentionConfig, PowerRetentionModel, exist_ok=True)
AutoModelForCausalLM.register(PowerRetentionConfig, PowerRetentionForCausalLM, exist_ok=True)

__all__ = ["GraphedDecoder", "PowerRetentionAttention", "PowerRetentionBlock",
           "PowerRetentionCache",
           "PowerRetentionConfig", "PowerRetentionForCausalLM", "PowerRetentionModel",
           "PowerRetentionPreTrainedModel", "RecurrentCacheLayer", "RotaryEmbedding",
           "apply_rope", "apply_rope_qk", "feature_map", "graphable", "linear_attention",
           "rope_frequencies"]
