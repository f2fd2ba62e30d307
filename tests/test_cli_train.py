"""`aim-train` end to end on fixture data in the real on-disk formats, and the shipped configs."""

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch
from fixtures_data import make_cub, make_waterbirds

from aim_ext import create_model
from aim_ext.cli.train import build_parser, config_from_args, main
from aim_ext.engine import load_config

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*/*.yaml"))


def test_every_row_of_the_papers_tables_has_a_config():
    """Table 1 (ConvNeXt-T on every dataset), Table 10 (ResNet-50 and -101 on the bird datasets)
    and appendix D's no-annealing rows, all written by configs/generate.py and up to date."""
    names = {f"{p.parent.name}/{p.stem}" for p in CONFIGS}
    convnext = ["", "_aim1_25", "_aim1_35", "_aim2_25", "_aim2_35", "_aim1_noanneal", "_aim2_noanneal"]
    for dataset in (
        "cub",
        "waterbirds95",
        "waterbirds100",
        "travelingbirds",
        "hard_imagenet",
        "imagenet100",
        "imagewoof",
    ):
        assert {f"{dataset}/convnext_tiny{v}" for v in convnext} <= names, dataset
    for dataset in ("cub", "waterbirds95", "waterbirds100", "travelingbirds"):
        for backbone in ("resnet50", "resnet101"):
            assert {f"{dataset}/{backbone}{v}" for v in ("", "_aim3_25", "_aim2_25")} <= names
        assert {f"{dataset}/resnet50_aim3_noanneal", f"{dataset}/resnet50_aim2_noanneal"} <= names
    generate = runpy.run_path(str(CONFIGS[0].parents[1] / "generate.py"), run_name="configs")
    assert generate["main"](["--check"]) == 0


@pytest.mark.parametrize(
    "path", [p for p in CONFIGS if p.stem != "convnext_tiny"], ids=lambda p: f"{p.parent.name}/{p.stem}"
)
def test_an_aim_config_is_the_papers_recipe(path):
    """The recipe of Tables 4-5: no warm-up, the mask estimators in the top-down pathway's group,
    ImageNet-1k weights named; an annealed AIM run selects only once tau holds its final value."""
    cfg = load_config(path)
    assert cfg.pretrained and cfg.pretrained_tag in ("fb_in1k", "tv_in1k")
    assert cfg.warmup_epochs == 0 and cfg.lr_mask is None and cfg.weight_decay_mask is None
    assert (cfg.epochs, cfg.batch_size, cfg.lr_topdown, cfg.weight_decay) == (200, 512, 0.01, 1e-3)
    assert cfg.image_size == (299 if path.parent.name == "travelingbirds" else 224)  # appendix A.4
    assert cfg.lr_backbone == (7e-6 if cfg.model == "convnext_tiny" else 1e-3)  # Table 5
    assert cfg.randaugment == (3, 9) and cfg.label_smoothing == 0.05 and cfg.drop_path_rate == 0.3
    assert cfg.area_final is None if cfg.stop_stage is None else cfg.area_per_image
    if cfg.stop_stage is not None and cfg.area_final is not None:
        assert cfg.select_from == cfg.area_start + cfg.area_schedule_duration() == 100


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_configs_build_their_model(path):
    cfg = load_config(path)
    with torch.device("meta"):
        model = create_model(cfg.model, num_classes=2, stop_stage=cfg.stop_stage)
    assert getattr(model, "stop_stage", None) == cfg.stop_stage


def test_a_bad_value_or_a_missing_run_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:  # a flag's choices: argparse's usage error
        main(["--step", "graph", "--out", str(tmp_path / "run")])
    assert exit_.value.code == 2
    assert "argument --step: invalid choice: 'graph'" in capsys.readouterr().err
    path = tmp_path / "bad.yaml"
    path.write_text("amp: bad\n")
    assert main(["--config", str(path), "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err == "aim-train: amp must be one of none, bf16, fp16, got 'bad'\n"
    path.write_text("dataset: nope\n")
    assert main(["--config", str(path), "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.startswith("aim-train: dataset must be one of cub, folder, hard_imagenet")
    with pytest.raises(SystemExit) as exit_:
        main(["--dataset", "nope"])
    assert exit_.value.code == 2
    assert "argument --dataset: invalid choice: 'nope'" in capsys.readouterr().err
    assert main(["--resume", "--out", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("aim-train: --resume: no run to continue") and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--dataset", "cub", "--data-root", "/missing"], "aim-train: CUB-200-2011 root not found: /missing"),
        (["--model", "nonet", "--dataset", "tuxbirds95"], "aim-train: Unknown model (nonet)"),
    ],
)
def test_a_bad_dataset_or_model_is_one_line(tmp_path, capsys, flags, message):
    assert main([*flags, "--device", "cpu", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_tensorboard_logging_without_tensorboard_is_one_line(tmp_path, capsys, monkeypatch):
    for name in ("tensorboard", "torch.utils.tensorboard"):  # as if tensorboard were not installed
        monkeypatch.setitem(sys.modules, name, None)
    argv = ["--dataset", "cub", "--data-root", str(tmp_path / "cub"), "--log", "tensorboard"]
    assert main([*argv, "--device", "cpu", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("aim-train: --log tensorboard needs the tensorboard package (")
        and err.count("\n") == 1
    )
    assert err.endswith('pip install "aim-ext[tensorboard]"\n')  # before the missing data root is noticed
    assert not (tmp_path / "run").exists()


def test_per_stage_targets_on_the_command_line(tmp_path, capsys):
    path = tmp_path / "scalar.yaml"
    path.write_text("area_final_stages: 0.3\n")
    assert main(["--config", str(path), "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err == "aim-train: area_final_stages must be a list, got 0.3\n"
    args = build_parser().parse_args(["--area-final-stages", "0.25", "0.35"])
    assert config_from_args(args).area_final_stages == [0.25, 0.35]
    args = build_parser().parse_args(["--area-final-stages", "none"])
    assert config_from_args(args).area_final_stages is None
    flags = ["--dataset", "tuxbirds95", "--model", "resnet18", "--stop-stage", "3", "--image-size", "32"]
    assert (
        main([*flags, "--area-final-stages", "0.3", "--device", "cpu", "--out", str(tmp_path / "run")]) == 2
    )
    err = capsys.readouterr().err  # its last line: a fresh cache prints TuxBirds' rendering progress first
    assert (
        err.endswith("\n")
        and err.split("\n")[-2] == "aim-train: area_final_stages has 1 values; this model masks 2 stages"
    )
    assert not (tmp_path / "run").exists()


def test_flags_override_the_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: resnet50\nepochs: 10\nchannels_last: true\n")
    args = build_parser().parse_args(
        [
            "--config",
            str(path),
            "--epochs",
            "3",
            "--no-channels-last",
            "--area-final",
            "none",
            "--randaugment",
            "2",
            "5",
            "--stop-stage",
            "3",
        ]
    )
    cfg = config_from_args(args)
    assert (cfg.model, cfg.epochs, cfg.channels_last, cfg.area_final) == ("resnet50", 3, False, None)
    assert (cfg.randaugment, cfg.stop_stage) == ((2, 5), 3)


def waterbirds_flags(tmp_path) -> list[str]:
    """aim-train's data flags for a Waterbirds fixture written under tmp_path."""
    cub = make_cub(tmp_path / "CUB_200_2011")
    make_waterbirds(tmp_path / "waterbirds", cub)
    return [
        "--dataset",
        "waterbirds",
        "--data-root",
        str(tmp_path / "waterbirds"),
        "--cub-root",
        str(cub.root),
    ]


def test_aim_train_refuses_a_graph_step_on_the_cpu_in_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    argv = [*waterbirds_flags(tmp_path), "--model", "resnet18", "--stop-stage", "3", "--device", "cpu"]
    argv += ["--step", "cuda-graph", "--num-workers", "0", "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("aim-train: --step cuda-graph needs a CUDA device") and err.count("\n") == 1
    assert not out.exists()


@pytest.mark.parametrize("stop_stage", [None, 3])
def test_train_on_waterbirds_fixture(tmp_path, capsys, stop_stage):
    out = tmp_path / "run"
    flags = [
        *waterbirds_flags(tmp_path),
        "--model",
        "resnet18",
        "--image-size",
        "48",
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--num-workers",
        "0",
        "--device",
        "cpu",
        "--out",
        str(out),
        "--warmup-epochs",
        "1",
        "--lr-backbone",
        "1e-3",
        "--lr-topdown",
        "1e-3",
    ]
    if stop_stage is not None:
        flags += ["--stop-stage", str(stop_stage)]
    assert main(flags) == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed[printed.rindex("\n{\n") + 1 :])  # the JSON summary printed last
    assert 0.0 <= summary["val_worst_group_acc"] <= summary["val_acc"] <= 1.0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    assert (out / "best.pt").exists() and (out / "last.pt").exists()
    assert (out / "masks").exists() == (stop_stage is not None)
