"""Loading a model folder for generation and serving (local files only: nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import torch

from .backends import make_backend
from .tokens import TextTokenizer, load_text_tokenizer

NO_MODEL_MESSAGE = (
    "no model given: pass --model FOLDER, a folder saved by transformers' save_pretrained "
    "(config.json plus weights) holding a power retention model (a training checkpoint, a "
    "converted model) or any other causal LM. Nothing is downloaded: this command reads local "
    "folders only.")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}


class ModelLoadError(Exception):
    """The model folder is missing or unusable; the message says what to do."""


def add_model_arguments(parser, cuda_graphs: bool = True) -> None:
    """``--model``, ``--device``, ``--dtype`` and the CUDA-graph switch (on by default with
    ``cuda_graphs``: ``--no-cuda-graphs`` turns it off; off otherwise: ``--cuda-graphs``)."""
    parser.add_argument("--model", metavar="FOLDER", default=None,
                        help="model folder (transformers save_pretrained format); its tokenizer "
                             "is used when it has one, UTF-8 bytes (ids 0..255) otherwise")
    parser.add_argument("--device", default="auto",
                        help="'auto' (cuda when available, else cpu), 'cpu', 'cuda', 'cuda:1'...")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                        help="weights' dtype; 'auto': bfloat16 on a GPU, float32 on the CPU")
    if cuda_graphs:
        parser.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                            help="decode eagerly; by default a power/linear model on a GPU "
                                 "replays CUDA graphs of its decode step")
    else:
        parser.add_argument("--cuda-graphs", action="store_true",
                            help="replay CUDA graphs of the decode step (power/linear models on "
                                 "a GPU) while the running batch stays the same; pays off when "
                                 "it stays so for over ~150 steps (docs/serving.md)")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_model(folder: str | Path | None, device: str = "auto", dtype: str = "auto"):
    """``(model, tokenizer)`` from a local model folder (or a training run folder, whose latest
    checkpoint is used), the model in eval mode on ``device``."""
    if folder is None:
        raise ModelLoadError(NO_MODEL_MESSAGE)
    from power_retention.training.checkpoint import resolve_model_folder

    folder = resolve_model_folder(folder)          # a training run folder: its latest checkpoint
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{str(folder)!r} is not a model folder (no config.json there). "
                             + NO_MODEL_MESSAGE)
    from transformers import AutoModelForCausalLM

    import power_retention.model  # noqa: F401  (registers our model with the Auto classes)

    target = resolve_device(device)
    if dtype == "auto":
        torch_dtype = torch.bfloat16 if target.type == "cuda" else torch.float32
    else:
        torch_dtype = DTYPES[dtype]
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True,
                                                     dtype=torch_dtype)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot load a causal LM from {str(folder)!r}: {error}") from None
    return model.to(target).eval(), load_text_tokenizer(folder)


def load_backend(folder, device: str = "auto", dtype: str = "auto", name: str | None = None,
                 cuda_graphs: bool = True) -> tuple:
    """``(backend, tokenizer)``: the batched backend for power/linear models (see backends)."""
    model, tokenizer = load_model(folder, device, dtype)
    return make_backend(model, name or Path(folder).name, cuda_graphs), tokenizer


def check_vocabulary(backend, tokenizer: TextTokenizer) -> None:
    """The tokenizer's ids must exist in the model's embedding."""
    if tokenizer.vocab_size > backend.vocab_size:
        raise ModelLoadError(f"the tokenizer has {tokenizer.vocab_size} ids but the model's "
                             f"vocabulary is {backend.vocab_size}")
