"""Training configuration: the paper's recipe as defaults, overridable from YAML and the command line."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from aim_ext.losses import AREA_WEIGHT, LABEL_SMOOTHING
from aim_ext.models.aim import HEAD_DROP_RATE

AMP_MODES = ("none", "bf16", "fp16")
# How a training step runs (aim_ext.engine.step): operation by operation, torch.compile'd, or
# captured whole into a CUDA graph and replayed.
STEP_KINDS = ("eager", "compile", "cuda-graph")


def _choice(default: str, choices: tuple[str, ...]):
    return field(default=default, metadata={"choices": choices})


@dataclass
class TrainConfig:
    """Every knob of a training run. Defaults follow the paper's recipe (appendix A.1, Tables 4 and 5)."""

    # model
    model: str = "convnext_tiny"
    stop_stage: int | None = None  # None: the vanilla backbone
    pretrained: bool = False
    pretrained_file: str | None = None
    drop_rate: float = HEAD_DROP_RATE
    drop_path_rate: float = 0.3
    freeze_levels: int = 0  # backbone feature levels below this one are frozen (0: train everything)
    # data
    dataset: str = "cub"
    data_root: str = ""
    image_size: int = 224
    randaugment: tuple[int, int] = (3, 9)
    batch_size: int = 64
    num_workers: int = 4
    skip_bad_images: bool = False
    cub_root: str | None = None  # Waterbirds / TravelingBirds: the CUB tree with segmentations
    imagenet_root: str | None = None  # Hard ImageNet: the user's ImageNet folder
    # optimisation
    epochs: int = 200
    lr_backbone: float = 7e-6
    lr_topdown: float = 1e-2
    lr_mask: float = 1e-3  # binary-Gumbel decision layers train better slower, without decay
    weight_decay: float = 1e-3
    weight_decay_mask: float = 0.0
    warmup_epochs: int = 5
    label_smoothing: float = LABEL_SMOOTHING
    accum_steps: int = 1
    grad_clip: float | None = None
    # AIM: active-area annealing (Eq. 6-7) and the binary Gumbel
    area_final: float | None = 0.25  # None: no annealing, no area loss
    area_start: int = 0
    area_duration: int | None = None  # None: half of training
    area_weight: float = AREA_WEIGHT
    aux_weight: float = 1.0  # 0: the "no auxiliary losses" ablation
    temperature: float = 1.0
    noise_off_epoch: int | None = None  # from this epoch on, train without Gumbel noise
    # run
    seed: int = 0
    amp: str = _choice("none", AMP_MODES)  # bf16 and fp16 autocast on CUDA
    step: str = _choice("eager", STEP_KINDS)
    channels_last: bool = False
    device: str = "auto"
    out: str = "runs/train"
    select_from: int | None = None  # earlier epochs are never selected (e.g. before annealing ends)
    mask_log_every: int = 5  # epochs between saved masks of the fixed validation batch
    mask_log_images: int = 8
    max_steps_per_epoch: int | None = None  # for smoke tests
    log_every: int = 20  # training steps between reads of the running statistics from the device

    def area_schedule_duration(self) -> int:
        """Annealing length in epochs: as configured, else half of training."""
        return self.area_duration if self.area_duration is not None else max(1, self.epochs // 2)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __post_init__(self) -> None:
        for item in dataclasses.fields(self):
            choices = item.metadata.get("choices")
            if choices and getattr(self, item.name) not in choices:
                raise ValueError(
                    f"{item.name} must be one of {', '.join(choices)}, got {getattr(self, item.name)!r}"
                )
        if self.log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {self.log_every}")
        if self.accum_steps < 1 or self.batch_size < 1:
            raise ValueError("batch_size and accum_steps must be >= 1")
        if self.freeze_levels < 0:
            raise ValueError(f"freeze_levels must be >= 0, got {self.freeze_levels}")
        if self.select_from is not None and not 0 <= self.select_from < self.epochs:
            raise ValueError(
                f"select_from={self.select_from} leaves no epoch to select among {self.epochs} "
                f"(choose 0..{self.epochs - 1})"
            )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from a mapping, refusing keys that are not fields (a typo must not pass silently)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown training config keys: {', '.join(unknown)}")
        values = dict(values)
        if "randaugment" in values and values["randaugment"] is not None:
            values["randaugment"] = tuple(values["randaugment"])
        return cls(**values)


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """A YAML file (if any) with command-line overrides on top."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"training config not found: {path}")
        values = yaml.safe_load(path.read_text()) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a mapping of config keys")
    values.update(overrides or {})
    return TrainConfig.from_dict(values)


def config_fields() -> list[dataclasses.Field]:
    return list(dataclasses.fields(TrainConfig))
