"""Training on the CPU: the loss falls, kill-and-resume is exact, two gloo processes agree."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from power_retention.training import TrainConfig, checkpoint, presets, train
from power_retention.training.train import lr_lambda

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """A small folder of stdlib files: 3 groups, about 0.6 MB, some held out."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    root = tmp_path_factory.mktemp("corpus")
    for package in ("email", "json"):
        (root / package).mkdir()
        for path in sorted((stdlib / package).glob("*.py")):
            shutil.copy(path, root / package / path.name)
    for name in ("os.py", "abc.py", "argparse.py", "ast.py"):
        shutil.copy(stdlib / name, root / name)
    return str(root)


@pytest.fixture(autouse=True)
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def small(corpus: str, out: Path, **changes) -> TrainConfig:
    """A run of the tiny preset on the small corpus; one thread so that runs are bitwise
    reproducible across processes."""
    settings = dict(out=str(out), preset="power", corpus=[corpus], validation_fraction=0.3,
                    seq_len=64, batch_size=4, steps=40, lr=3e-3, warmup_steps=5, log_every=5,
                    eval_every=20, eval_batches=2, save_every=5, threads=1, progress=False)
    settings.update(changes)
    return TrainConfig(**settings)


def cli_args(cfg: TrainConfig) -> list[str]:
    """The ``train`` command line that gives ``cfg``."""
    args = ["train"]
    for key, value in cfg.to_dict().items():
        flag = "--" + key.replace("_", "-")
        if key == "progress":
            args += [] if value else ["--no-progress"]
        elif key == "overrides":
            for item in value:
                args += ["--set", item]
        elif isinstance(value, bool):
            args += [flag] if value else []
        elif isinstance(value, list):
            args += [flag, *map(str, value)]
        elif value is not None:
            args += [flag, str(value)]
    return args


def records(run: Path) -> list[dict]:
    """The metrics log without the timing fields (those differ between runs)."""
    keep = ("step", "loss", "lr", "grad_norm", "tokens", "val_loss")
    return [{k: v for k, v in json.loads(line).items() if k in keep}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def env() -> dict:
    return {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}


def test_lr_warmup_then_cosine():
    f = lr_lambda(warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(9) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(14) == pytest.approx(0.1) and f(20) == pytest.approx(0.1)


def test_tiny_power_model_loss_falls(corpus, tmp_path):
    summary = train(small(corpus, tmp_path, steps=30, save_every=30, eval_every=30))
    log = [r for r in records(tmp_path) if "loss" in r]
    assert log[0]["step"] == 5 and log[-1]["step"] == 30
    assert log[0]["loss"] > 4.5                              # about ln(320) = 5.8 at start
    assert log[-1]["loss"] < log[0]["loss"] - 1.0
    assert summary["val_loss"] < math.log(320) - 1.5
    # the final checkpoint is a transformers model folder with its tokenizer
    folder = checkpoint.latest(tmp_path)
    assert folder.name == "checkpoint-0000030"
    model = presets.load_model(folder)
    assert type(model).__name__ == "PowerRetentionForCausalLM" and model.config.deg == 2


def test_kill_and_resume_reaches_the_same_loss(corpus, tmp_path):
    reference = small(corpus, tmp_path / "reference")
    train(reference)

    killed = small(corpus, tmp_path / "killed")
    process = subprocess.Popen([sys.executable, "-m", "power_retention.cli", *cli_args(killed)],
                               env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    while process.poll() is None and time.monotonic() < deadline:
        found = checkpoint.latest(killed.out)
        if found is not None and int(found.name.split("-")[1]) >= 10:
            process.kill()
            break
        time.sleep(0.02)
    assert process.wait() == -9, process.stderr.read().decode()[-2000:]
    stopped_at = int(checkpoint.latest(killed.out).name.split("-")[1])
    assert 10 <= stopped_at < reference.steps

    with (tmp_path / "killed" / "metrics.jsonl").open("a") as log:
        log.write('{"step": 99, "lo')        # as if the kill had torn a line
    train(small(corpus, tmp_path / "killed", resume=True))
    assert records(tmp_path / "killed") == records(tmp_path / "reference")
    ours = load_file(checkpoint.latest(killed.out) / "model.safetensors")
    theirs = load_file(checkpoint.latest(reference.out) / "model.safetensors")
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_checkpoints_are_complete_and_pruned(corpus, tmp_path):
    train(small(corpus, tmp_path, preset="softmax", steps=12, save_every=4, keep=2))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["checkpoint-0000008", "checkpoint-0000012", "latest", "metrics.jsonl"]
    folder = checkpoint.latest(tmp_path)
    state = torch.load(folder / checkpoint.TRAINER_STATE, weights_only=True)
    assert state["step"] == 12 and state["scheduler"]["last_epoch"] == 12
    assert {"optimizer", "rng", "tokens"} <= set(state)
    assert checkpoint.load_train_args(folder)["preset"] == "softmax"
    assert (folder / "config.json").exists()
    assert (folder / "power_retention_tokenizer.json").exists()


def test_init_from_starts_at_the_folders_weights(corpus, tmp_path):
    train(small(corpus, tmp_path / "first", preset="softmax", steps=3))
    start = checkpoint.latest(tmp_path / "first")
    # with a learning rate of zero AdamW moves nothing (its decay is scaled by lr too)
    train(small(corpus, tmp_path / "second", preset="power", steps=1, lr=0.0,
                init_from=str(start)))
    ours = load_file(checkpoint.latest(tmp_path / "second") / "model.safetensors")
    theirs = load_file(start / "model.safetensors")
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    # the folder's config (softmax attention), not --preset's
    assert (presets.read_config(checkpoint.latest(tmp_path / "second")).to_dict()
            == presets.read_config(start).to_dict())


def test_any_transformers_config_trains(corpus, tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=128).save_pretrained(tmp_path / "c")
    summary = train(small(corpus, tmp_path / "run", config=str(tmp_path / "c"), steps=3,
                          overrides=["num_hidden_layers=2"]))
    model = presets.load_model(tmp_path / "run" / "checkpoint-0000003")
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 2
    assert math.isfinite(summary["loss"])


def test_flop_budget_sets_the_steps(corpus, tmp_path):
    from power_retention.evaluation.wsfr import train_flops_per_token

    cfg = small(corpus, tmp_path, preset="softmax", flop_budget=1e10, save_every=100)
    per_step = train_flops_per_token(presets.preset_config("softmax", "tiny"), 64) * 4 * 64
    summary = train(cfg)
    assert summary["steps"] == math.ceil(1e10 / per_step)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_gloo_processes_match_one_with_twice_the_batch(corpus, tmp_path, strategy):
    two = small(corpus, tmp_path / "two", preset="softmax", steps=10, save_every=10,
                eval_every=10, strategy=strategy)
    # its own session, so that on a timeout the launcher and both workers can be stopped
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                 "--nproc-per-node", "2", "-m", "power_retention.cli",
                                 *cli_args(two)], env=env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = launcher.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)
        raise
    assert launcher.returncode == 0, stderr[-3000:]
    assert "2 process(es) on cpu" in stdout

    train(small(corpus, tmp_path / "one", preset="softmax", steps=10, save_every=10,
                eval_every=10, batch_size=8))
    ours, theirs = records(tmp_path / "two"), records(tmp_path / "one")
    assert [r["step"] for r in ours] == [r["step"] for r in theirs]
    for a, b in zip(ours, theirs):
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-4), (key, a, b)
