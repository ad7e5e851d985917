"""Training: presets, the train loop, atomic checkpoints and torchrun data parallelism."""

from .presets import SIZES, TIME_MIXING, build_model, load_model, model_config, preset_config
from .train import TrainConfig, train

__all__ = ["SIZES", "TIME_MIXING", "TrainConfig", "build_model", "load_model", "model_config",
           "preset_config", "train"]
