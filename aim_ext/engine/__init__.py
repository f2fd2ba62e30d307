"""Training and evaluation loops, checkpoints and the training configuration."""

from aim_ext.engine.checkpoint import load_checkpoint, load_model_state, save_atomic
from aim_ext.engine.config import TrainConfig, load_config
from aim_ext.engine.train import TrainingError, fit, predict_split, split_metrics, train_one_epoch

__all__ = [
    "TrainConfig",
    "TrainingError",
    "fit",
    "load_checkpoint",
    "load_config",
    "load_model_state",
    "predict_split",
    "save_atomic",
    "split_metrics",
    "train_one_epoch",
]
