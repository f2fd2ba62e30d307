"""Training configuration: the paper's recipe as defaults, overridable from YAML and the command line."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from aim_ext.data import list_datasets
from aim_ext.losses import AREA_WEIGHT, LABEL_SMOOTHING
from aim_ext.models import MASKINGS
from aim_ext.models.aim import HEAD_DROP_RATE, MASK_ESTIMATORS

AMP_MODES = ("none", "bf16", "fp16")
# How a training step runs (aim_ext.engine.step): operation by operation, torch.compile'd, or
# captured whole into a CUDA graph and replayed.
STEP_KINDS = ("eager", "compile", "cuda-graph")
# Where the per-epoch metrics go: metrics.jsonl and summary.csv always; TensorBoard event files too.
LOG_KINDS = ("jsonl", "tensorboard")
# The mask estimators' initialisation: PyTorch's default, or edge-emphasised (appendix D.5).
MASK_INITS = ("random", "edges")


# (field, low, high) of every numeric field: a bound is inclusive unless given as ("<", value) for a
# strict one; None: unbounded. Optional fields may also be None.
_RANGES: tuple[tuple[str, Any, Any], ...] = (
    ("stop_stage", 0, None),
    ("drop_rate", 0, ("<", 1)),
    ("drop_path_rate", 0, ("<", 1)),
    ("freeze_levels", 0, None),
    ("image_size", 1, None),
    ("batch_size", 1, None),
    ("num_workers", 0, None),
    ("epochs", 1, None),
    ("lr_backbone", 0, None),
    ("lr_topdown", 0, None),
    ("lr_mask", 0, None),
    ("weight_decay", 0, None),
    ("weight_decay_mask", 0, None),
    ("warmup_epochs", 0, None),
    ("label_smoothing", 0, ("<", 1)),
    ("accum_steps", 1, None),
    ("grad_clip", ("<", 0), None),
    ("area_final", 0, 1),
    ("area_start", 0, None),
    ("area_duration", 1, None),
    ("area_weight", 0, None),
    ("aux_weight", 0, None),
    ("temperature", ("<", 0), None),
    ("noise_off_epoch", 0, None),
    ("seed", 0, 2**32 - 1),
    ("mask_log_every", 1, None),
    ("mask_log_images", 1, None),
    ("max_steps_per_epoch", 1, None),
    ("log_every", 1, None),
)


def _within(value: float, low: Any, high: Any) -> bool:
    if value != value:  # NaN
        return False
    if low is not None and (value <= low[1] if isinstance(low, tuple) else value < low):
        return False
    return high is None or (value < high[1] if isinstance(high, tuple) else value <= high)


def _describe(low: Any, high: Any) -> str:
    parts = []
    if low is not None:
        parts.append(f"> {low[1]}" if isinstance(low, tuple) else f">= {low}")
    if high is not None:
        parts.append(f"< {high[1]}" if isinstance(high, tuple) else f"<= {high}")
    return " and ".join(parts)


def _knob(default: Any, help: str, choices: tuple[str, ...] | None = None):
    """A config field with the text of its `aim-train --help` line (and its allowed values)."""
    metadata = {"help": help} if choices is None else {"help": help, "choices": choices}
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """Every knob of a training run. Defaults follow the paper's recipe (appendix A.1, Tables 4 and 5)."""

    # model
    model: str = _knob("convnext_tiny", "the timm backbone, e.g. convnext_tiny, resnet50, mobilenetv2_100")
    stop_stage: int | None = _knob(
        None, "AIM's stop stage, the lowest masked level (none: the vanilla backbone)"
    )
    pretrained: bool = _knob(False, "start from timm's ImageNet weights (fetched into the cache)")
    pretrained_tag: str | None = _knob(
        None, "timm's weight tag with --pretrained, e.g. fb_in1k (none: timm's default for the model)"
    )
    pretrained_file: str | None = _knob(None, "start from this backbone state_dict file instead")
    drop_rate: float = _knob(HEAD_DROP_RATE, "dropout before the classifier heads")
    drop_path_rate: float = _knob(0.3, "stochastic depth of the backbone's blocks")
    mask_init: str = _knob(
        "random",
        "the mask estimators' initialisation: PyTorch's random one, or edges (appendix D.5)",
        choices=MASK_INITS,
    )
    masking: str = _knob(
        "top-down",
        "where the masks act: AIM's top-down pathway, or bottom-up inside the backbone, each masked "
        "level's output masked before the next stage (the ablation of appendix D.4)",
        choices=MASKINGS,
    )
    mask_estimators: str = _knob(
        "every",
        "a mask estimator at every AIM stage, or one at the top stage whose mask the lower stages "
        "take, upsampled (appendix D.3)",
        choices=MASK_ESTIMATORS,
    )
    freeze_levels: int = _knob(0, "freeze the backbone's feature levels below this one (0: train everything)")
    # data
    dataset: str = _knob("cub", "the dataset", choices=tuple(list_datasets()))
    data_root: str = _knob("", "the dataset's folder (the TuxBirds datasets: a cache folder, or empty)")
    image_size: int = _knob(224, "square training and evaluation size in pixels")
    randaugment: tuple[int, int] = _knob(
        (3, 9), "RandAugment's number of operations and magnitude (0 0: off)"
    )
    batch_size: int = _knob(
        64, "images per micro-batch over all processes (an optimizer step: x --accum-steps)"
    )
    num_workers: int = _knob(4, "data loader processes")
    skip_bad_images: bool = _knob(False, "leave out unreadable images with a warning instead of stopping")
    cub_root: str | None = _knob(None, "Waterbirds, TravelingBirds: the CUB tree with its segmentations")
    imagenet_root: str | None = _knob(None, "Hard ImageNet: your ImageNet folder")
    # optimisation
    epochs: int = _knob(200, "training epochs")
    lr_backbone: float = _knob(7e-6, "AdamW learning rate of the backbone")
    lr_topdown: float = _knob(1e-2, "learning rate of AIM's top-down pathway and the classifier")
    lr_mask: float | None = _knob(
        None,
        "learning rate of the mask estimators (none: --lr-topdown, as in the paper, where they are "
        "part of the top-down pathway)",
    )
    weight_decay: float = _knob(1e-3, "AdamW weight decay")
    weight_decay_mask: float | None = _knob(
        None, "weight decay of the mask estimators (none: --weight-decay, as in the paper)"
    )
    warmup_epochs: int = _knob(0, "linear learning-rate warm-up before the cosine schedule (the paper: none)")
    label_smoothing: float = _knob(LABEL_SMOOTHING, "label smoothing of the classification losses")
    accum_steps: int = _knob(1, "micro-batches per optimizer step (gradient accumulation)")
    grad_clip: float | None = _knob(None, "clip the gradient norm to this value (none: no clipping)")
    # AIM: active-area annealing (Eq. 6-7) and the binary Gumbel
    area_final: float | None = _knob(
        0.25, "the active-area target tau at the end of annealing (none: no area loss)"
    )
    area_final_stages: list[float] | None = _knob(
        None, "one final tau per masked stage, top stage first (tau_l; the per-stage ablation)"
    )
    area_start: int = _knob(0, "the epoch annealing starts")
    area_duration: int | None = _knob(None, "annealing length in epochs (none: half of training)")
    area_weight: float = _knob(AREA_WEIGHT, "weight of the active-area loss (Eq. 7)")
    area_per_image: bool = _knob(
        True,
        "Eq. 6's active area r_l per image, the squared gaps to tau averaged over the batch; "
        "--no-area-per-image: r_l over the whole batch",
    )
    aux_weight: float = _knob(
        1.0,
        "weight of the auxiliary heads' losses (0: the no-auxiliary-loss ablation, heads not computed)",
    )
    temperature: float = _knob(1.0, "the binary Gumbel-softmax temperature")
    noise_off_epoch: int | None = _knob(None, "from this epoch on, train without Gumbel noise")
    # run
    seed: int = _knob(0, "seed of the new layers' weights, the data order and the Gumbel noise")
    amp: str = _knob("none", "autocast on CUDA", choices=AMP_MODES)
    step: str = _knob("eager", "how a training step runs (docs/training.md)", choices=STEP_KINDS)
    channels_last: bool = _knob(False, "train in the channels_last memory format (faster on GPUs)")
    device: str = _knob("auto", "cpu, cuda, cuda:N or auto (cuda if present)")
    out: str = _knob("runs/train", "the run folder")
    select_from: int | None = _knob(None, "select the best epoch from this one on (e.g. after annealing)")
    log: str = _knob(
        "jsonl", "jsonl: metrics.jsonl and summary.csv; tensorboard: also RUN/tensorboard", choices=LOG_KINDS
    )
    mask_log_every: int = _knob(5, "epochs between saved masks of the fixed validation batch")
    mask_log_images: int = _knob(8, "images in the fixed validation batch")
    max_steps_per_epoch: int | None = _knob(None, "stop each epoch after this many steps (smoke tests)")
    log_every: int = _knob(20, "training steps between reads of the running statistics from the device")

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
        if self.pretrained_tag and (not self.pretrained or self.pretrained_file):
            raise ValueError(
                "pretrained_tag names timm's weights: it needs pretrained and no pretrained_file"
            )
        if self.stop_stage is None and (self.mask_estimators != "every" or self.masking != "top-down"):
            raise ValueError("masking and mask_estimators apply to AIM models: set stop_stage")
        if self.mask_estimators == "top" and self.area_final_stages is not None:
            raise ValueError(
                "one mask estimator has one active-area target: area_final, not area_final_stages"
            )
        if self.masking == "bottom-up" and self.mask_estimators != "every":
            raise ValueError("bottom-up masking needs mask_estimators every (one per masked level)")
        if self.area_final_stages is not None:
            if not isinstance(self.area_final_stages, list | tuple):
                raise ValueError(f"area_final_stages must be a list, got {self.area_final_stages!r}")
            if self.area_final is None:
                raise ValueError("area_final_stages needs annealing: set area_final too")
            if not self.area_final_stages or not all(0 <= t <= 1 for t in self.area_final_stages):
                raise ValueError(f"area_final_stages must be values in [0, 1], got {self.area_final_stages}")
        self._check_ranges()
        if self.select_from is not None and not 0 <= self.select_from < self.epochs:
            raise ValueError(
                f"select_from={self.select_from} leaves no epoch to select among {self.epochs} "
                f"(choose 0..{self.epochs - 1})"
            )

    def _check_ranges(self) -> None:
        """Every number in its range: a negative epoch count or learning rate is refused, never
        trained on (nothing runs, nothing is written)."""
        for name, low, high in _RANGES:
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{name} must be a number, got {value!r}")
            if not _within(value, low, high):
                raise ValueError(f"{name} must be {_describe(low, high)}, got {value}")
        if self.randaugment is not None and (
            not isinstance(self.randaugment, tuple)
            or len(self.randaugment) != 2
            or not all(isinstance(v, int) and v >= 0 for v in self.randaugment)
        ):
            raise ValueError(f"randaugment must be two integers >= 0, got {self.randaugment!r}")

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
        try:
            values = yaml.safe_load(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError:
            raise ValueError(f"{path} is not a YAML text file (not UTF-8)") from None
        except yaml.YAMLError as error:  # truncated or not YAML: where the parser stopped
            mark = getattr(error, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
            problem = getattr(error, "problem", None) or type(error).__name__
            raise ValueError(f"{path} is not valid YAML: {problem}{where}") from None
        if values is None:
            raise ValueError(f"{path} is empty: expected a mapping of config keys")
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a mapping of config keys")
    values.update(overrides or {})
    return TrainConfig.from_dict(values)


def config_fields() -> list[dataclasses.Field]:
    return list(dataclasses.fields(TrainConfig))
