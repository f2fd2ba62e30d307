"""A trained model that travels: a folder with `model.safetensors` and `config.json` (timm's layout),
saved and loaded without the data it was trained on; also the model of an aim-train run folder or
checkpoint. Nothing is executed from a file: weights come from safetensors or `weights_only` loads.

Each save writes the weights, then the config, each renamed into place whole, and names itself in
both (`weights_id`); a reader takes a config and weights of the same save, so one process loading
while another saves into the folder gets the old model or the new one, never a mix.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open
from timm.data import resolve_model_data_config
from torch import nn

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

from aim_ext.cache import write_atomic
from aim_ext.models.checkpoint import architecture, load_checkpoint, load_model_state
from aim_ext.models.factory import create_model, model_data_config
from aim_ext.models.fusion import is_inference_only
from aim_ext.models.masking import MaskingModel, timm_keywords

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "aim-ext saved model"
# Version 2 added `architecture_options` (the ablations); a model without them is still written
# as version 1, which any aim-ext reads.
FORMAT_VERSION = 2
RUN_MODEL_FOLDER = "model"  # where aim-train puts the saved model inside its run folder
WEIGHTS_ID = "weights_id"  # the save's name, in config.json and in the weights' safetensors metadata
# How long a reader waits for a save in progress to write the config that goes with its weights.
CONSISTENT_READ_S = 1.0


class ModelFileError(ValueError):
    """A saved model, run folder or checkpoint that cannot be loaded; the message says why."""


def save_pretrained(
    model: nn.Module,
    folder: str | Path,
    *,
    labels: list[str] | None = None,
    metrics: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    image_size: int | None = None,
    crop_pct: float | None = None,
    interpolation: str | None = None,
) -> Path:
    """Write `folder/model.safetensors` and `folder/config.json`: the architecture (backbone, stop
    stage, width), the classes and their names, the input size, mean and std, how an image is
    framed (`crop_pct`, the share of a resized image that is centre-cropped, and the resize's
    `interpolation`; timm's defaults for the backbone unless given), the Gumbel settings, the
    package version and, when given, the validation metrics and a training summary. Each file is
    written whole or not at all, and `load_model` reads the two of one save. Returns the folder."""
    if is_inference_only(model):
        raise ValueError("save_pretrained: save the trained model, before aim_ext.fuse_for_inference")
    num_classes = int(model.num_classes)
    if labels is not None and len(labels) != num_classes:
        raise ValueError(f"save_pretrained: {len(labels)} labels for a model of {num_classes} classes")
    name = model.backbone_name if isinstance(model, MaskingModel) else model.pretrained_cfg["architecture"]
    options = model.architecture_options() if isinstance(model, MaskingModel) else {}
    stop = getattr(model, "stop_stage", None)
    data = resolve_model_data_config(model)
    size = image_size or data["input_size"][-1]
    config: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION if options else 1,
        "architecture": architecture(model),
        "backbone": name,
        "stop_stage": stop,
        "width": getattr(model, "width", None),
        "architecture_options": options,
        "num_classes": num_classes,
        "labels": list(labels) if labels is not None else [str(i) for i in range(num_classes)],
        "input_size": [3, size, size],
        "mean": list(data["mean"]),
        "std": list(data["std"]),
        "interpolation": interpolation or data.get("interpolation", "bicubic"),
        "crop_pct": crop_pct if crop_pct is not None else data.get("crop_pct", 0.875),
        "gumbel": {"temperature": model.temperature, "noise": model.gumbel_noise}
        if stop is not None
        else None,
        "aim_ext_version": _version(),
        "metrics": metrics,
        "training": training,
    }
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().to("cpu").contiguous() for k, v in _untied(model.state_dict()).items()}
    # The save's name comes from what it holds: saving the same model twice writes the same bytes.
    content = safetensors.torch.save(weights) + json.dumps(config, default=float).encode()
    config[WEIGHTS_ID] = hashlib.sha256(content).hexdigest()[:32]
    with _one_save_at_a_time(folder):
        # The weights first: a reader that finds the new config finds its weights.
        write_atomic(
            folder / WEIGHTS_FILE, safetensors.torch.save(weights, metadata={WEIGHTS_ID: config[WEIGHTS_ID]})
        )
        write_atomic(folder / CONFIG_FILE, (json.dumps(config, indent=2, default=float) + "\n").encode())
    return folder


@contextlib.contextmanager
def _one_save_at_a_time(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (flock on the folder itself, no file added; where the
    platform has no flock, no lock), so that two saves into it leave the two files of one."""
    if fcntl is None:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def load_model(source: str | Path, *, device: str | torch.device = "cpu") -> nn.Module:
    """The model in `source`, in eval mode, with `model.pretrained_cfg` (input size, mean, std,
    label names) set. `source` is a saved-model folder, an aim-train run folder (its saved model,
    else its best checkpoint and config; never its dataset), or an aim-train checkpoint
    (`best.pt`, `last.pt`). Raises ModelFileError naming the problem."""
    path = Path(source)
    if path.is_dir() and (path / CONFIG_FILE).is_file():
        model, config = _load_saved(path)
    elif path.is_dir() and (path / RUN_MODEL_FOLDER / CONFIG_FILE).is_file():
        model, config = _load_saved(path / RUN_MODEL_FOLDER)
    elif path.is_dir() and (path / "best.pt").is_file():
        model, config = _load_checkpoint_file(path / "best.pt")
    elif path.is_file():
        model, config = _load_checkpoint_file(path)
    elif path.is_dir():
        raise ModelFileError(
            f"{path} holds no model: expected {CONFIG_FILE} and {WEIGHTS_FILE}, or an aim-train run "
            "folder with best.pt"
        )
    else:
        raise ModelFileError(f"model not found: {path}")
    model.pretrained_cfg = {**getattr(model, "pretrained_cfg", {}), **_pretrained_cfg(config)}
    if isinstance(model, MaskingModel):
        model.default_cfg = model.pretrained_cfg
    return model.to(device).eval()


def _load_saved(folder: Path) -> tuple[nn.Module, dict[str, Any]]:
    config, weights, weights_id = _read_saved(folder)
    model = _build(
        config["backbone"],
        config["stop_stage"],
        config["num_classes"],
        config.get("width"),
        config.get("architecture_options") or {},
    )
    gumbel = config.get("gumbel")
    if gumbel and isinstance(model, MaskingModel):
        model.set_gumbel(temperature=gumbel["temperature"], noise=gumbel["noise"])
    weights_path = folder / WEIGHTS_FILE
    weights = _tied(model, weights)
    _load_weights(model, {"architecture": config.get("architecture"), "model": weights}, str(weights_path))
    if not _same_save(config, weights_id):
        raise ModelFileError(
            f"{folder}: {CONFIG_FILE} and {WEIGHTS_FILE} are from different saves (an interrupted "
            "save_pretrained?): save the model again"
        )
    return model, config


def _read_saved(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], str | None]:
    """The config, the weights and the weights' `weights_id`, of one save. A save in progress
    replaces the weights first, then the config, so for a moment a reader can find new weights
    beside the old config: it reads both again until they agree or `CONSISTENT_READ_S` has passed
    (then it returns the last pair, for `_load_saved` to refuse)."""
    deadline = time.monotonic() + CONSISTENT_READ_S
    pause = 0.005
    while True:
        config = _read_config(folder)
        weights, weights_id = _read_weights(folder / WEIGHTS_FILE)
        if _same_save(config, weights_id) or time.monotonic() > deadline:
            return config, weights, weights_id
        time.sleep(pause)
        pause = min(2 * pause, 0.1)


def _read_config(folder: Path) -> dict[str, Any]:
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelFileError(f"{folder / CONFIG_FILE} is not a readable config: {error}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ModelFileError(f"{folder / CONFIG_FILE} is not an {FORMAT} config")
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise ModelFileError(
            f"{folder} was saved in format {config['format_version']}; this aim-ext reads up to "
            f"{FORMAT_VERSION}: upgrade aim-ext"
        )
    return config


def _read_weights(path: Path) -> tuple[dict[str, torch.Tensor], str | None]:
    """The tensors and the `weights_id` of one version of the file (one open: a rename over it
    meanwhile changes nothing here)."""
    if not path.is_file():
        raise ModelFileError(f"{path} is missing")
    try:
        with path.open("rb") as handle, safe_open(_utf8_name(path, handle), framework="pt") as file:
            weights = {key: file.get_tensor(key) for key in file.keys()}
            weights_id = (file.metadata() or {}).get(WEIGHTS_ID)
    except (SafetensorError, OSError) as error:
        raise ModelFileError(f"{path} is not a readable safetensors file ({error})") from None
    return weights, weights_id


def _utf8_name(path: Path, handle) -> str:
    """``path`` as safetensors can open it: its own name, or where that is not UTF-8 (which
    safetensors refuses) the name of the open file's descriptor (Linux)."""
    name = str(path)
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        fd_name = f"/proc/self/fd/{handle.fileno()}"
        return fd_name if Path(fd_name).exists() else name
    return name


def _same_save(config: dict[str, Any], weights_id: str | None) -> bool:
    """Whether weights of ``weights_id`` are those of ``config``'s save; a config without one (an
    older aim-ext's, or one written by hand) takes any weights."""
    return config.get(WEIGHTS_ID) is None or config[WEIGHTS_ID] == weights_id


def _load_checkpoint_file(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    """An aim-train checkpoint: its config names the model; its weights give the classes."""
    try:
        state = load_checkpoint(path)
    except FileNotFoundError:
        raise ModelFileError(f"model not found: {path}") from None
    except ValueError as error:  # truncated, not a torch file, or a pickle that weights_only refuses
        raise ModelFileError(str(error)) from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise ModelFileError(f"{path} is not an aim-train checkpoint (no model weights and config)")
    run = state["config"]
    name, stop = run.get("model"), run.get("stop_stage")
    defaults = {"masking": "top-down", "mask_estimators": "every"}  # the paper's AIM
    options = {k: run[k] for k, default in defaults.items() if run.get(k, default) != default}
    num_classes = _classes_in(name, stop, state["model"], path, options)
    model = _build(name, stop, num_classes, None, options)
    _load_weights(model, state, str(path))
    config = {
        "backbone": name,
        "stop_stage": stop,
        "num_classes": num_classes,
        "labels": _run_labels(path.parent, num_classes),
        "input_size": [3, run.get("image_size", 224), run.get("image_size", 224)],
        **{k: v for k, v in model_data_config(name, stop).items() if k in ("mean", "std", "interpolation")},
    }
    return model, config


def _aliases(state: dict[str, torch.Tensor]) -> list[list[str]]:
    """The names of each tensor that appears under several names (a module or parameter a model
    shares between places, as CoaT's relative position encodings), first name first."""
    groups: dict[tuple, list[str]] = {}
    for name, tensor in state.items():
        key = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.shape)
        groups.setdefault(key, []).append(name)
    return [sorted(names) for names in groups.values() if len(names) > 1]


def _untied(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with each shared tensor under its first name only (safetensors stores a tensor once)."""
    dropped = {name for names in _aliases(state) for name in names[1:]}
    return {k: v for k, v in state.items() if k not in dropped}


def _tied(model: nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`_untied` undone for ``model``: each name of a tensor it shares gets the saved one."""
    weights = dict(weights)
    for names in _aliases(model.state_dict()):
        if names[0] in weights:
            weights.update({name: weights[names[0]] for name in names[1:] if name not in weights})
    return weights


def _build(name: str, stop: int | None, num_classes: int, width: int | None, options: dict) -> nn.Module:
    extra = {"width": width} if stop is not None and width else {}
    if stop is not None:
        options = dict(options)
        extra.update(timm_keywords(options.pop("backbone_kwargs", None) or {}))
        extra.update(options)
    try:
        return create_model(name, num_classes=num_classes, stop_stage=stop, **extra)
    except (RuntimeError, ValueError, TypeError) as error:  # an unknown model, stop stage or option
        raise ModelFileError(f"cannot build {name} (stop stage {stop}): {error}") from None


def _load_weights(model: nn.Module, state: dict[str, Any], source: str) -> None:
    try:
        load_model_state(model, state, source=source)
    except (ValueError, RuntimeError) as error:  # another architecture, other keys or shapes
        raise ModelFileError(str(error).splitlines()[0]) from None


def _classes_in(
    name: str, stop: int | None, weights: dict[str, torch.Tensor], path: Path, options: dict
) -> int:
    """The number of classes of a checkpoint's weights: the rows of its classifier, the tensors
    whose first dimension follows num_classes."""
    with torch.device("meta"):
        one, two = (_build(name, stop, n, None, options).state_dict() for n in (1, 2))
    sized = [k for k in one if one[k].shape != two[k].shape and k in weights]
    if not sized:
        raise ModelFileError(f"{path}: no classifier weights of {name} found in the checkpoint")
    return int(weights[sized[0]].shape[0])


def _run_labels(folder: Path, num_classes: int) -> list[str]:
    """The class names of the run's saved model when aim-train wrote one, else the indices."""
    config = folder / RUN_MODEL_FOLDER / CONFIG_FILE
    if config.is_file():
        labels = json.loads(config.read_text()).get("labels")
        if isinstance(labels, list) and len(labels) == num_classes:
            return labels
    return [str(i) for i in range(num_classes)]


def _pretrained_cfg(config: dict[str, Any]) -> dict[str, Any]:
    """timm's pretrained_cfg keys a transform needs, and the label names."""
    return {
        "input_size": tuple(config["input_size"]),
        "mean": tuple(config["mean"]),
        "std": tuple(config["std"]),
        "interpolation": config.get("interpolation", "bicubic"),
        **({"crop_pct": config["crop_pct"], "crop_mode": "center"} if "crop_pct" in config else {}),
        "num_classes": config["num_classes"],
        "label_names": list(config["labels"]),
    }


def _version() -> str:
    """The installed aim-ext's version (its package metadata: this layer sits below the facade)."""
    try:
        return importlib.metadata.version("aim-ext")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown"
