"""Metamorphosis: a pretrained softmax transformer becomes a power retention model.

``metamorphose(folder_or_model, output_dir)`` maps the weights of a Llama, Mistral, Qwen2,
Qwen3 or StarCoder2 causal LM onto :class:`~power_retention.model.PowerRetentionForCausalLM`
(same q/k/v/o, MLP, norms, embeddings and RoPE; a new gate projection per layer with gates near 1)
and saves a transformers folder; ``finetune`` then trains it with one of the ``RECIPES``.
``load_mapped(source, "softmax")`` is the same mapping with softmax attention: it reproduces the
source's logits, which is how the mapping is checked. See docs/metamorphosis.md.
"""

from .convert import (
    copy_tokenizer,
    load_mapped,
    map_state_dict,
    metamorphose,
    read_source_config,
    read_source_weights,
    rope_for_context,
    target_config,
)
from .families import FAMILIES, SUPPORTED_ARCHITECTURES, UnsupportedArchitectureError
from .recipes import RECIPES, Recipe, attention_match_loss, distill_loss, next_token_loss

__all__ = ["FAMILIES", "RECIPES", "SUPPORTED_ARCHITECTURES", "Recipe",
           "UnsupportedArchitectureError", "attention_match_loss", "copy_tokenizer",
           "distill_loss", "load_mapped", "map_state_dict", "metamorphose", "next_token_loss",
           "read_source_config", "read_source_weights", "rope_for_context", "target_config"]
