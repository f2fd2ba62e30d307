"""A training config made real: its model, the data config the model expects, its dataset splits.

Training, evaluation and the demo build through these functions alone, so a run is evaluated with
exactly the model and data it was trained with.
"""

from __future__ import annotations

from typing import Any

import timm
from torch import nn

from aim_ext.data import MaskedImageDataset, build_dataset
from aim_ext.engine.config import TrainConfig
from aim_ext.models import MaskingModel, create_model, model_data_config
from aim_ext.models.mask_estimator import emphasise_edges
from aim_ext.models.pretrained import load_backbone_weights


def data_config(cfg: TrainConfig) -> dict[str, Any]:
    """The input size and normalisation of the config's model (timm's data config), without
    building its weights."""
    return model_data_config(cfg.model, cfg.stop_stage)


def pretrained_weights(cfg: TrainConfig) -> str | None:
    """The weights a run starts from, by name: timm's `model.tag` (the config's tag, else timm's
    default for the model), a local file, or None (random initialisation)."""
    if cfg.pretrained_file:
        return f"file:{cfg.pretrained_file}"
    if not cfg.pretrained:
        return None
    name, named_tag = timm.models.split_model_name_tag(cfg.model)
    tag = cfg.pretrained_tag or named_tag or timm.models.get_pretrained_cfg(name).tag
    return f"timm:{name}.{tag}"


def architecture_options(cfg: TrainConfig) -> dict[str, Any]:
    """The config's departures from the paper's AIM architecture (an ablation), as `create_model`
    keywords: what `AIM.architecture_options` reports of the model built."""
    options: dict[str, Any] = {}
    if cfg.masking != "top-down":
        options["masking"] = cfg.masking
    if cfg.mask_estimators != "every":
        options["mask_estimators"] = cfg.mask_estimators
    return options


def build_model(cfg: TrainConfig, num_classes: int) -> nn.Module:
    """The model of a config, with pretrained backbone weights from timm or a local file."""
    hub = cfg.pretrained and not cfg.pretrained_file  # a local file replaces the hub
    extra = {"pretrained_cfg": cfg.pretrained_tag} if hub and cfg.pretrained_tag else {}
    if cfg.stop_stage is not None:
        extra.update(architecture_options(cfg))
    model = create_model(
        cfg.model,
        num_classes=num_classes,
        pretrained=hub,
        **extra,
        stop_stage=cfg.stop_stage,
        drop_rate=cfg.drop_rate,
        drop_path_rate=cfg.drop_path_rate,
    )
    if cfg.pretrained_file:
        load_backbone_weights(model, cfg.pretrained_file)
    if cfg.mask_init == "edges" and isinstance(model, MaskingModel):
        for estimator in model.mask_estimator_modules():
            emphasise_edges(estimator)
    return model


def build_split(
    cfg: TrainConfig, split: str, data: dict[str, Any], *, train: bool = False, prerender: bool = True
) -> MaskedImageDataset:
    """One split of the run's dataset, normalised with ``data``'s mean and std, augmented when
    ``train``. ``prerender=False`` leaves a generated dataset unrendered: enough to read its labels
    and groups."""
    options: dict[str, Any] = {"skip_bad_images": cfg.skip_bad_images}
    for option in ("cub_root", "imagenet_root"):
        if getattr(cfg, option):
            options[option] = getattr(cfg, option)
    if train:
        options["randaugment"] = cfg.randaugment
    return build_dataset(
        cfg.dataset,
        cfg.data_root,
        split,
        train=train,
        image_size=cfg.image_size,
        mean=data["mean"],
        std=data["std"],
        prerender=prerender,
        **options,
    )


def build_datasets(cfg: TrainConfig, data: dict[str, Any]) -> tuple[MaskedImageDataset, MaskedImageDataset]:
    """Train and validation splits with the recipe's transforms."""
    return build_split(cfg, "train", data, train=True), build_split(cfg, "val", data)
