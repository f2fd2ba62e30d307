"""`aim-train`: train a vanilla backbone or its AIM variant with the paper's recipe.

    aim-train --config configs/waterbirds95/convnext_tiny_aim2_25.yaml --data-root DATA --out runs/x
    aim-train --model resnet50 --stop-stage 3 --dataset cub --data-root CUB_200_2011 --epochs 100
    aim-train --config ... --amp bf16 --channels-last --step cuda-graph    # a GPU's fastest step

Every key of `aim_ext.engine.TrainConfig` is a flag (`--lr-mask 1e-3`, `--no-channels-last`); flags
override the YAML file. `--resume` continues the run in `--out` where it stopped.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from aim_ext.cli.errors import one_line_errors, say
from aim_ext.engine.build import build_datasets, build_model, data_config
from aim_ext.engine.config import TrainConfig, config_fields, load_config
from aim_ext.engine.tensorboard import TensorBoardUnavailable, require_tensorboard
from aim_ext.engine.train import area_targets_shape


def _optional(kind):
    def parse(text: str):
        return None if text.lower() == "none" else kind(text)

    parse.__name__ = kind.__name__
    return parse


_TYPES = {"int": int, "float": float, "str": str}


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, with the field's help and default; absent flags leave the
    YAML/default value alone, and optional values take 'none' to unset them."""
    for field in config_fields():
        flag = "--" + field.name.replace("_", "-")
        kind = str(field.type).replace(" ", "")
        text = field.metadata["help"]
        if kind == "bool":
            parser.add_argument(
                flag,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=f"{text} (default {'on' if field.default else 'off'})",
            )
        elif kind == "tuple[int,int]":
            parser.add_argument(
                flag,
                type=int,
                nargs=2,
                default=argparse.SUPPRESS,
                metavar=("OPS", "MAGNITUDE"),
                help=f"{text} (default {' '.join(map(str, field.default))})",
            )
        elif kind == "list[float]|None":
            parser.add_argument(
                flag,
                type=_optional(float),
                nargs="+",
                default=argparse.SUPPRESS,
                help=f"{text} (default none)",
            )
        elif kind.endswith("|None"):
            parser.add_argument(
                flag,
                type=_optional(_TYPES[kind[: -len("|None")]]),
                default=argparse.SUPPRESS,
                help=f"{text} (default {str(field.default).lower()})",
            )
        else:
            parser.add_argument(
                flag,
                type=_TYPES[kind],
                choices=field.metadata.get("choices"),
                default=argparse.SUPPRESS,
                help=f"{text} (default {field.default!r})"
                if kind == "str"
                else f"{text} (default {field.default})",
            )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aim-train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", type=Path, help="YAML file of training config keys")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    add_config_flags(parser)
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The YAML file (with --resume: the run's own config.yaml, unless --config is given) under the
    flags that were given."""
    overrides = {f.name: getattr(args, f.name) for f in config_fields() if hasattr(args, f.name)}
    for name, value in overrides.items():  # a list flag given 'none' unsets it
        if isinstance(value, list) and None in value:
            if len(value) > 1:
                raise ValueError(f"--{name.replace('_', '-')}: 'none' or numbers, not both")
            overrides[name] = None
    base = args.config
    if getattr(args, "resume", False) and base is None:
        saved = Path(overrides.get("out", TrainConfig.out)) / "config.yaml"
        if not saved.is_file():
            raise FileNotFoundError(f"--resume: no run to continue, {saved} does not exist")
        base = saved
    return load_config(base, overrides)


@one_line_errors("aim-train")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from aim_ext.engine import ResumeError, StepError, TrainingError, fit
    from aim_ext.engine.train import TrainingInterrupted

    try:
        cfg = config_from_args(args)
    except (ValueError, FileNotFoundError) as error:  # a bad value or a missing run: one line
        say("aim-train", error)
        return 2
    if cfg.log == "tensorboard":
        try:  # before the datasets are fetched or rendered
            require_tensorboard()
        except TensorBoardUnavailable as error:
            say("aim-train", error)
            return 2
    try:  # an unknown dataset or model, a missing data root or index file: one line
        train, val = build_datasets(cfg, data_config(cfg))
        torch.manual_seed(
            cfg.seed
        )  # the new layers' initial weights follow the seed (the same on every rank)
        model = build_model(cfg, train.num_classes)
        area_targets_shape(cfg, model)  # per-stage targets that do not fit the model
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        say("aim-train", error)
        return 2
    try:
        best = fit(cfg, train, val, model, resume=args.resume)
    except (StepError, ResumeError) as error:  # refused before training: a step kind this run
        # cannot use, or a run --resume cannot continue
        say("aim-train", error)
        return 2
    except TrainingError as error:
        say("aim-train", error)
        return 1
    except TrainingInterrupted as error:  # SIGTERM or Ctrl-C, at a safe point
        say("aim-train", error)
        return 128 + error.signum
    except KeyboardInterrupt:  # a second Ctrl-C
        print(f"aim-train: stopped at once; `aim-train --resume --out {cfg.out}` continues", file=sys.stderr)
        return 130
    summary = {k: v for k, v in best.items() if k.startswith("val_") or k == "epoch"}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
