"""Training: the loop, its configuration, building a config's model and data, training-state
checkpoints."""

from aim_ext.engine.build import build_datasets, build_model, build_split, data_config
from aim_ext.engine.checkpoint import save_atomic
from aim_ext.engine.config import TrainConfig, load_config
from aim_ext.engine.step import StepError, build_step
from aim_ext.engine.train import (
    ResumeError,
    TrainingError,
    fit,
    predict_split,
    resolve_device,
    split_metrics,
    train_one_epoch,
)

__all__ = [
    "TrainConfig",
    "ResumeError",
    "StepError",
    "TrainingError",
    "build_datasets",
    "build_model",
    "build_step",
    "build_split",
    "data_config",
    "fit",
    "load_config",
    "predict_split",
    "resolve_device",
    "save_atomic",
    "split_metrics",
    "train_one_epoch",
]
