"""`aim-eval` end to end: tiny vanilla and AIM runs on the Waterbirds fixture, evaluated and compared."""

import csv
import json
import math
import re
from pathlib import Path

import pytest
from fixtures_data import make_cub, make_folder, make_waterbirds
from PIL import Image

from aim_ext.cli import eval as aim_eval
from aim_ext.cli import train as aim_train

METHODS = ("gradcam", "guided_gradcam", "guided_backprop")


def _train(
    root: Path, name: str, stop_stage: int | None, dataset: str = "waterbirds", epochs: int = 2
) -> Path:
    out = root / name
    data = ["--data-root", str(root / dataset), "--dataset", dataset]
    if dataset == "waterbirds":
        data += ["--cub-root", str(root / "CUB_200_2011")]
    flags = data + [
        "--model", "resnet18", "--image-size", "48", "--epochs", str(epochs),
        "--batch-size", "4", "--num-workers", "0", "--device", "cpu", "--out", str(out),
        "--warmup-epochs", "1", "--lr-backbone", "1e-3", "--lr-topdown", "1e-3", "--mask-log-every", "1",
    ]  # fmt: skip
    if stop_stage is not None:
        flags += ["--stop-stage", str(stop_stage)]
    assert aim_train.main(flags) == 0
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval")
    cub = make_cub(root / "CUB_200_2011")
    make_waterbirds(root / "waterbirds", cub)
    return {"vanilla": _train(root, "vanilla", None), "aim": _train(root, "aim", 3), "root": root}


@pytest.fixture(scope="module")
def evaluated(runs) -> dict[str, Path]:
    for name in ("vanilla", "aim"):
        assert aim_eval.main([str(runs[name]), "--device", "cpu"]) == 0
    return {name: runs[name] / "eval_test" for name in ("vanilla", "aim")}


def _test_ids(root: Path) -> list[str]:
    with (root / "waterbirds" / "metadata.csv").open() as handle:
        return [row["img_filename"] for row in csv.DictReader(handle) if row["split"] == "2"]


def _rows(folder: Path) -> list[dict[str, str]]:
    with (folder / "per_image.csv").open() as handle:
        return list(csv.DictReader(handle))


def _check_links(report: Path) -> list[str]:
    links = re.findall(r"\]\(([^)]+)\)", report.read_text())
    assert links
    for link in links:
        assert (report.parent / link).is_file(), link
    return links


def _check_pngs(folder: Path, names: list[str]) -> None:
    for name in names:
        with Image.open(folder / name) as image:
            image.verify()
            assert image.format == "PNG"


@pytest.mark.parametrize("name", ["vanilla", "aim"])
def test_eval_writes_csv_metrics_figures_report(runs, evaluated, name):
    out = evaluated[name]
    rows = _rows(out)
    assert [r["id"] for r in rows] == _test_ids(runs["root"])  # one row per test image, in order
    expected = {"id", "label", "prediction", "group"} | {f"epg_{m}" for m in METHODS}
    stage_columns = {"mask_area_stage_4", "mask_area_stage_3", "mask_area_merged", "object_share"}
    stage_columns |= {
        f"mask_{k}_{s}" for k in ("precision", "recall") for s in ("stage_4", "stage_3", "merged")
    }
    assert set(rows[0]) == (expected | stage_columns if name == "aim" else expected)

    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("avg_acc", "worst_group_acc", "reweighted_avg_acc"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["worst_group_acc"] <= metrics["avg_acc"]
    assert set(metrics["group_acc"]) == {"0", "1", "2", "3"}
    assert metrics["train_group_count"] == {"0": 2, "1": 2, "2": 1, "3": 1}
    assert "reweighted_avg_acc" in metrics["definitions"]
    assert metrics["num_images"] == len(rows)
    accuracy = sum(r["label"] == r["prediction"] for r in rows) / len(rows)
    assert metrics["avg_acc"] == pytest.approx(accuracy)
    for method in METHODS:
        values = [float(r[f"epg_{method}"]) for r in rows]
        assert all(0.0 <= v <= 1.0 for v in values)
        assert metrics["epg"][method] == pytest.approx(sum(values) / len(values), abs=1e-9)

    pngs = ["attributions.png"]
    if name == "aim":
        assert set(metrics["mask_sparsity"]) == {"stage_4", "stage_3"}
        for stage, value in metrics["mask_sparsity"].items():
            mean = sum(float(r[f"mask_area_{stage}"]) for r in rows) / len(rows)
            assert 0.0 <= value <= 1.0 and value == pytest.approx(mean)
        assert 0.0 <= metrics["merged_mask_area"] <= 1.0
        # The masks against the birds: the means of the per-image values (NaN: no active area).
        for kind in ("precision", "recall"):
            assert set(metrics[f"mask_{kind}"]) == {"stage_4", "stage_3", "merged"}
            for stage, value in metrics[f"mask_{kind}"].items():
                column = [float(r[f"mask_{kind}_{stage}"]) for r in rows]
                seen = [v for v in column if not math.isnan(v)]
                assert all(0.0 <= v <= 1.0 for v in seen)
                assert value == pytest.approx(sum(seen) / len(seen)) if seen else math.isnan(value)
        shares = [float(r["object_share"]) for r in rows]
        assert metrics["mask_precision_chance"] == pytest.approx(sum(shares) / len(shares))
        # The merged mask holds every stage's: it covers at least as much of the bird.
        merged = [float(r["mask_recall_merged"]) for r in rows]
        for stage in ("stage_4", "stage_3"):
            assert all(
                m >= float(r[f"mask_recall_{stage}"]) - 1e-12 for m, r in zip(merged, rows, strict=True)
            )
        pngs += ["masks.png", "mask_evolution.png"]
    else:
        assert "mask_sparsity" not in metrics and "mask_precision" not in metrics
        assert not (out / "masks.png").exists() and not (out / "mask_evolution.png").exists()
    _check_pngs(out, pngs)
    links = _check_links(out / "report.md")
    assert set(pngs) | {"per_image.csv", "metrics.json"} <= set(links)


def test_compare(runs, evaluated):
    out = runs["root"] / "compare"
    argv = ["--compare", str(runs["vanilla"]), str(runs["aim"]), "--device", "cpu", "--out", str(out)]
    assert aim_eval.main(argv + ["--attribution", "gradcam"]) == 0
    table = (out / "differences.md").read_text()
    assert "| metric | vanilla | aim | B-A |" in table
    for metric in ("avg_acc", "worst_group_acc", "reweighted_avg_acc", "epg[gradcam]"):
        assert f"| {metric} |" in table
    assert "| mask_sparsity[stage_4] | – |" in table  # the vanilla run has no masks
    a = json.loads((evaluated["vanilla"] / "metrics.json").read_text())
    b = json.loads((evaluated["aim"] / "metrics.json").read_text())
    row = next(line for line in table.splitlines() if line.startswith("| avg_acc |"))
    assert (
        row == f"| avg_acc | {a['avg_acc']:.4f} | {b['avg_acc']:.4f} | {b['avg_acc'] - a['avg_acc']:+.4f} |"
    )
    _check_pngs(out, ["gradcam_compare.png", "gradcam_and_masks.png", "epg_scatter_gradcam.png"])
    links = _check_links(out / "report.md")
    assert {"gradcam_compare.png", "gradcam_and_masks.png", "epg_scatter_gradcam.png"} <= set(links)
    assert {"A_vanilla/report.md", "B_aim/report.md"} <= set(links)
    _check_links(out / "B_aim" / "report.md")
    # The comparison's own evaluations leave the runs' full evaluations alone.
    assert "epg_guided_backprop" in _rows(evaluated["aim"])[0]


def test_target_pred_last_checkpoint_max_images(runs, tmp_path):
    out = tmp_path / "e"
    argv = [str(runs["aim"]), "--device", "cpu", "--checkpoint", "last", "--target", "pred"]
    argv += ["--attribution", "gradcam", "--max-images", "2", "--figures", "1", "--out", str(out)]
    assert aim_eval.main(argv) == 0
    rows = _rows(out)
    assert [r["id"] for r in rows] == _test_ids(runs["root"])[:2]
    assert "epg_gradcam" in rows[0] and "epg_guided_backprop" not in rows[0]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["checkpoint"].endswith("last.pt") and metrics["attribution_target"] == "pred"
    # Two test images cannot cover the four training groups: said, not silently renormalised.
    assert "reweighted_avg_acc" not in metrics
    assert any("reweighted_avg_acc" in note for note in metrics["notes"])
    _check_links(out / "report.md")


def test_errors(runs, tmp_path, capsys):
    assert aim_eval.main([str(tmp_path / "missing")]) == 1
    assert "run folder not found" in capsys.readouterr().err
    assert aim_eval.main([str(tmp_path)]) == 1
    assert "no config.yaml" in capsys.readouterr().err
    assert aim_eval.main([str(runs["aim"]), "--checkpoint", str(tmp_path / "nope.pt")]) == 1
    assert "checkpoint not found" in capsys.readouterr().err
    assert aim_eval.main([str(runs["aim"]), "--attribution", "saliency"]) == 1
    assert "unknown attribution methods" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        aim_eval.main(["--compare", str(runs["aim"])])


def test_a_saved_model_evaluates_on_a_dataset_it_is_given(runs, tmp_path, capsys):
    """aim-train's saved model (RUN/model) with --dataset: the run's numbers, without its config;
    without --dataset, or on data of another number of classes, one line."""
    root = runs["root"]
    common = ["--device", "cpu", "--attribution", "gradcam", "--max-images", "4", "--figures", "0"]
    assert aim_eval.main([str(runs["aim"]), *common, "--out", str(tmp_path / "run")]) == 0
    data = [
        "--dataset",
        "waterbirds",
        "--data-root",
        str(root / "waterbirds"),
        "--cub-root",
        str(root / "CUB_200_2011"),
    ]
    saved = runs["aim"] / "model"
    assert aim_eval.main([str(saved), *common, *data, "--out", str(tmp_path / "saved")]) == 0
    by_run, by_saved = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("run", "saved"))
    for key in ("avg_acc", "worst_group_acc", "epg"):
        assert by_saved[key] == pytest.approx(by_run[key]), key
    assert by_saved["checkpoint"].endswith("model.safetensors")
    capsys.readouterr()
    assert aim_eval.main([str(saved), *common]) == 1
    assert "is a saved model, which names no data: give --dataset" in capsys.readouterr().err
    make_folder(root / "three", classes=("cat", "dog", "owl"))
    other = ["--dataset", "folder", "--data-root", str(root / "three"), "--split", "val"]
    assert aim_eval.main([str(saved), *common, *other]) == 1
    err = capsys.readouterr().err
    assert "classifies 2 classes; folder at" in err and "has 3" in err and err.count("\n") == 1


def test_dataset_without_masks(runs, capsys):
    make_folder(runs["root"] / "folder")
    run = _train(runs["root"], "folder_aim", 3, dataset="folder", epochs=1)
    assert aim_eval.main([str(run), "--device", "cpu", "--split", "val", "--figures", "2"]) == 0
    out = run / "eval_val"
    rows = _rows(out)
    assert len(rows) == 2 and set(rows[0]) == {
        "id", "label", "prediction", "mask_area_stage_4", "mask_area_stage_3", "mask_area_merged"
    }  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["avg_acc"] <= 1.0
    assert "epg" not in metrics and "worst_group_acc" not in metrics and "reweighted_avg_acc" not in metrics
    assert any("no object masks: EPG not computed" in note for note in metrics["notes"])
    assert "EPG not computed" in (out / "report.md").read_text()
    _check_pngs(out, ["masks.png", "attributions.png", "mask_evolution.png"])
    _check_links(out / "report.md")
    # Runs on different data cannot be compared image by image.
    capsys.readouterr()
    assert (
        aim_eval.main(
            ["--compare", str(run), str(runs["aim"]), "--device", "cpu", "--attribution", "gradcam"]
        )
        == 1
    )
    assert "evaluate different images" in capsys.readouterr().err
    assert not (runs["aim"] / "compare_folder_aim").exists()
