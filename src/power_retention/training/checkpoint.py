"""Checkpoints written atomically, and read back to resume exactly.

Layout of a run folder::

    metrics.jsonl               one JSON object per logged step / evaluation
    checkpoint-0000100/         a transformers model folder (config.json, model.safetensors),
                                the tokenizer, train_args.json and trainer_state.pt (optimizer,
                                scheduler, every rank's RNG states, step = data position)
    latest                      the name of the newest complete checkpoint

A checkpoint is written to ``checkpoint-N.tmp``, renamed to ``checkpoint-N`` (``os.replace``),
and only then named in ``latest`` (written to ``latest.tmp`` and renamed): a run killed at any
moment leaves ``latest`` pointing at a complete checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from . import distributed

LATEST = "latest"
TRAINER_STATE = "trainer_state.pt"
TRAIN_ARGS = "train_args.json"
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def rng_state() -> dict:
    import random

    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    import random

    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save(run_dir: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
         scheduler, tokenizer, train_args: dict, ctx: distributed.Context,
         extra: dict | None = None, keep: int = 2) -> Path | None:
    """Write ``checkpoint-<step>`` (all ranks call this; rank 0 writes); returns its path there.

    Keeps the newest ``keep`` checkpoints and deletes older ones.
    """
    run_dir = Path(run_dir)
    # Collective calls: every rank takes part in gathering full (unsharded) states.
    model_state = get_model_state_dict(model, options=_FULL)
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=_FULL)
    rng_states = distributed.gather_objects(rng_state(), ctx)
    final = None
    if ctx.is_main:
        final = run_dir / f"checkpoint-{step:07d}"
        tmp = run_dir / (final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        distributed.unwrap(model).save_pretrained(tmp, state_dict=model_state)
        tokenizer.save(tmp)
        (tmp / TRAIN_ARGS).write_text(json.dumps(train_args, indent=2, sort_keys=True) + "\n")
        torch.save({"step": step, "optimizer": optimizer_state,
                    "scheduler": scheduler.state_dict(), "rng": rng_states,
                    "world_size": ctx.world_size, **(extra or {})}, tmp / TRAINER_STATE)
        if final.exists():   # a checkpoint of the same step from a run that was killed later
            shutil.rmtree(final)
        os.replace(tmp, final)
        _atomic_write_text(run_dir / LATEST, final.name + "\n")
        for old in sorted(run_dir.glob("checkpoint-*[0-9]"))[:-keep]:
            shutil.rmtree(old)
    distributed.barrier(ctx)
    return final


def latest(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run folder, or None."""
    pointer = Path(run_dir) / LATEST
    if not pointer.exists():
        return None
    return Path(run_dir) / pointer.read_text().strip()


def resolve_model_folder(path: str | Path) -> Path:
    """A run folder means its latest checkpoint; any other folder is taken as it is."""
    found = latest(path)
    return found if found is not None else Path(path)


def load_train_args(checkpoint: str | Path) -> dict:
    return json.loads((Path(checkpoint) / TRAIN_ARGS).read_text())


def load(checkpoint: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
         scheduler, ctx: distributed.Context) -> dict:
    """Restore model, optimizer, scheduler and this rank's RNG state; returns the trainer state
    (``step`` and whatever ``save`` got as ``extra``)."""
    from safetensors.torch import load_file

    checkpoint = Path(checkpoint)
    state = torch.load(checkpoint / TRAINER_STATE, map_location="cpu", weights_only=True)
    if state["world_size"] != ctx.world_size:
        raise ValueError(f"{checkpoint} was written by {state['world_size']} processes; "
                         f"resuming it exactly needs the same number, got {ctx.world_size}")
    weights = {}
    for file in sorted(checkpoint.glob("*.safetensors")):
        weights.update(load_file(file))
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True))
    set_optimizer_state_dict(model, optimizer, state["optimizer"],
                             options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"][ctx.rank])
    return state
