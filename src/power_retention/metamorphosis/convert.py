"""Metamorphosis: a pretrained softmax transformer becomes a power retention model.

``load_mapped`` puts the source's weights into the project's model unchanged (q/k/v/o, MLP,
norms, embeddings, RoPE); with ``time_mixing="softmax"`` it computes the source's logits, which is
how the mapping is proven. ``metamorphose`` does the same with ``time_mixing="power"``, gives each
layer a gate projection that starts with gates near 1 (zero weights, bias ``gate_bias_init``) and
can change RoPE for a longer target context; it saves an HF-loadable safetensors folder with the
source's tokenizer files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from ..data.tokenizer import TOKENIZER_FILE
from ..model import PowerRetentionConfig, PowerRetentionForCausalLM
from .families import config_fields, family_named, family_of

# files of a model folder that describe its tokenizer (copied to the converted folder)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json", TOKENIZER_FILE)
ROPE_SCALING_TYPES = ("linear", "dynamic", "yarn", "llama3")

Source = str | Path | PreTrainedModel


def read_source_config(source: Source) -> PretrainedConfig:
    """The source's transformers configuration, checked to be of a supported family."""
    if isinstance(source, PreTrainedModel):
        config = source.config
    else:
        folder = Path(source)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"source: {folder} has no config.json (expected a "
                                    "transformers model folder)")
        # the family first: a model type transformers does not know fails with our message
        fields = json.loads((folder / "config.json").read_text())
        family_named(fields.get("model_type"), fields.get("architectures"))
        config = AutoConfig.from_pretrained(folder, local_files_only=True,
                                            trust_remote_code=False)
    family_of(config)
    return config


def read_source_weights(source: Source) -> dict[str, Tensor]:
    """The source's weights by their transformers names (safetensors files only)."""
    if isinstance(source, PreTrainedModel):
        # copies: the converted model must not share storage with a source still in use
        return {k: v.detach().clone() for k, v in source.state_dict().items()}
    folder = Path(source)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        found = sorted(p.name for p in folder.iterdir() if p.is_file())
        raise FileNotFoundError(f"source: {folder} has no model.safetensors (or its index); "
                                f"only safetensors weights are read, found {found}")
    weights: dict[str, Tensor] = {}
    for shard in shards:
        weights.update(load_file(folder / shard))
    return weights


def rope_for_context(rope_type: str, factor: float, trained_context: int) -> dict:
    """``target_config`` options that stretch RoPE ``factor`` times beyond ``trained_context``:
    ``rope_scaling`` and ``max_position_embeddings``.

    ``linear`` divides every frequency (position interpolation); ``dynamic`` raises the base
    only once positions pass ``max_position_embeddings``, which therefore stays the trained
    context (NTK-aware); ``yarn`` interpolates the slow frequencies, keeps the fast ones and
    rescales attention; ``llama3`` blends the same way without the rescale.
    """
    if rope_type not in ROPE_SCALING_TYPES:
        raise ValueError(f"rope_type: expected one of {', '.join(ROPE_SCALING_TYPES)}, "
                         f"got {rope_type!r}")
    if not factor > 1:
        raise ValueError(f"rope factor: expected > 1, got {factor}")
    scaling = {"rope_type": rope_type, "factor": float(factor)}
    if rope_type in ("yarn", "llama3"):
        scaling["original_max_position_embeddings"] = int(trained_context)
    if rope_type == "llama3":
        scaling.update(low_freq_factor=1.0, high_freq_factor=4.0)
    target = trained_context if rope_type == "dynamic" else int(trained_context * factor)
    return {"rope_scaling": scaling, "max_position_embeddings": target}


def target_config(source_config: PretrainedConfig, time_mixing: str = "power", *,
                  deg: int = 2, chunk_size: int | None = None, gate_bias_init: float = 7.0,
                  rope_theta: float | None = None, rope_scaling: dict | None = None,
                  max_position_embeddings: int | None = None) -> PowerRetentionConfig:
    """The project's configuration that holds the source's weights.

    ``time_mixing="softmax"`` reproduces the source (sliding-window sources get ``"window"``);
    ``"power"`` is the metamorphosed model. ``rope_theta``, ``rope_scaling`` and
    ``max_position_embeddings`` replace the source's values (a longer target context).
    """
    fields = config_fields(source_config)
    if time_mixing == "softmax" and fields["sliding_window"] is not None:
        time_mixing = "window"
    if rope_theta is not None:
        fields["rope_theta"] = float(rope_theta)
    if rope_scaling is not None:
        fields["rope_scaling"] = rope_scaling
    if max_position_embeddings is not None:
        fields["max_position_embeddings"] = int(max_position_embeddings)
    return PowerRetentionConfig(**fields, time_mixing=time_mixing, deg=deg,
                                chunk_size=chunk_size, gate_bias_init=gate_bias_init,
                                architectures=["PowerRetentionForCausalLM"])


def map_state_dict(source_config: PretrainedConfig,
                   weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """The source's weights under the project's names: the same names, without RoPE frequency
    buffers (older checkpoints saved them; ours are recomputed) and without a tied LM head."""
    family_of(source_config)
    mapped = {name: tensor for name, tensor in weights.items()
              if not name.endswith("rotary_emb.inv_freq")}
    if source_config.tie_word_embeddings:
        mapped.pop("lm_head.weight", None)
    return mapped


def _new_gates(model: PowerRetentionForCausalLM, gate_names: list[str],
               dtype: torch.dtype) -> None:
    """Real gate parameters: weight 0 and bias ``gate_bias_init``, so that every gate starts at
    ``sigmoid(gate_bias_init)`` whatever the input."""
    for name in gate_names:
        module_name, _, kind = name.rpartition(".")
        module = model.get_submodule(module_name)
        shape = getattr(module, kind).shape
        value = model.config.gate_bias_init if kind == "bias" else 0.0
        setattr(module, kind, nn.Parameter(torch.full(shape, value, dtype=dtype)))


def load_mapped(source: Source, time_mixing: str = "softmax",
                dtype: torch.dtype = torch.float32, **options) -> PowerRetentionForCausalLM:
    """The project's model holding the source's weights (``options``: see ``target_config``).

    Every source weight must land on a parameter of the same shape and every parameter must be
    covered, except the new gate projections of power/linear layers; anything else is a mapping
    error and raises. The model is built on the meta device and takes the source's tensors as
    they are, so a large model is neither initialised at random nor held twice.
    """
    source_config = read_source_config(source)
    config = target_config(source_config, time_mixing, **options)
    weights = map_state_dict(source_config, read_source_weights(source))
    with torch.device("meta"):
        model = PowerRetentionForCausalLM(config)
    expected = model.state_dict()
    unknown = sorted(set(weights) - set(expected))
    if unknown:
        raise ValueError(f"mapping error: source weights with no place in the model: "
                         f"{unknown[:8]}")
    wrong = [f"{k}: {tuple(v.shape)} vs {tuple(expected[k].shape)}"
             for k, v in weights.items() if v.shape != expected[k].shape]
    if wrong:
        raise ValueError(f"mapping error: shapes differ: {wrong[:8]}")
    missing = [k for k in expected if k not in weights]
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    gates = [k for k in missing if _is_gate(k)]
    uncovered = sorted(set(missing) - set(gates) - tied)
    if uncovered:
        raise ValueError(f"mapping error: model weights the source does not give: "
                         f"{uncovered[:8]}")
    model.load_state_dict({k: v.to(dtype) for k, v in weights.items()}, strict=False,
                          assign=True)
    _new_gates(model, gates, dtype)
    if config.tie_word_embeddings:
        model.tie_weights()
    still_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()]
                  if t.is_meta]
    if still_meta:
        raise ValueError(f"mapping error: tensors left without values: {still_meta[:8]}")
    return model.eval()


def _is_gate(name: str) -> bool:
    return ".self_attn.g_proj." in name


def copy_tokenizer(source_folder: str | Path, output_dir: str | Path) -> list[str]:
    """Copy the tokenizer files of a model folder; returns the names copied."""
    copied = []
    for name in TOKENIZER_FILES:
        path = Path(source_folder) / name
        if path.is_file():
            shutil.copy2(path, Path(output_dir) / name)
            copied.append(name)
    return copied


def metamorphose(source: Source, output_dir: str | Path | None = None, *, deg: int = 2,
                 chunk_size: int | None = None, gate_bias_init: float = 7.0,
                 rope_theta: float | None = None, rope_scaling: dict | None = None,
                 max_position_embeddings: int | None = None,
                 dtype: torch.dtype = torch.float32) -> PowerRetentionForCausalLM:
    """Convert ``source`` (a model folder or a loaded model of a supported family) into a power
    retention model; with ``output_dir``, save it there (safetensors, config, tokenizer files).
    """
    model = load_mapped(source, "power", dtype=dtype, deg=deg, chunk_size=chunk_size,
                        gate_bias_init=gate_bias_init, rope_theta=rope_theta,
                        rope_scaling=rope_scaling,
                        max_position_embeddings=max_position_embeddings)
    if output_dir is not None:
        output_dir = Path(output_dir)
        model.save_pretrained(output_dir, safe_serialization=True)
        if not isinstance(source, PreTrainedModel):
            copy_tokenizer(source, output_dir)
    return model
