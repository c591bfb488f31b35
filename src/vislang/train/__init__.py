"""Training built on the library: a generic loop, tasks (model + loss), optimizer/schedule, checkpoints."""

from .config import DataConfig, OptimConfig, TrainConfig, load_train_config
from .loop import train

__all__ = ["DataConfig", "OptimConfig", "TrainConfig", "load_train_config", "train"]
