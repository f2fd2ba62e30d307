"""`aim-demo` end to end at a tiny size, and the counterfactual rates it reports."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from aim_ext.cli import demo
from aim_ext.cli.explain import main as explain_main
from aim_ext.cli.export import main as export_main
from aim_ext.explain.counterfactual import counterfactual_rates
from aim_ext.models import load_model


def test_counterfactual_rates_by_hand():
    pred = {
        "image": torch.tensor([1, 1, 0, 0, 1, 0]),
        "swapped": torch.tensor([1, 0, 0, 1, 1, 0]),
        "background": torch.tensor([1, 1, 1, 0, 0, 0]),
        "label": torch.tensor([1, 1, 0, 0, 1, 0]),
        "place": torch.tensor([1, 1, 1, 0, 0, 0]),
        "index": torch.arange(6),
    }
    rates = counterfactual_rates(pred)
    assert rates["num_counterfactual_images"] == 6
    assert rates["background_swap_flip_rate"] == pytest.approx(2 / 6)
    # groups: 3, 3, 1, 0, 2, 0 -> flips per group 0: 1/2, 1: 0, 2: 0, 3: 1/2
    assert rates["background_swap_flip_rate_by_group"] == {"0": 0.5, "1": 0.0, "2": 0.0, "3": 0.5}
    assert rates["background_only_waterbird_rate"] == {"land": 0.0, "water": 1.0}
    assert rates["background_only_waterbird_gap"] == 1.0


@pytest.fixture
def cache(tuxbirds_sources, mobilenet_weights, tmp_path, monkeypatch):
    """A cache of its own for the demo's rendered stores, sharing the fetched sources and weights."""
    root = tmp_path / "cache"
    root.mkdir()
    (root / "tuxbirds").symlink_to(tuxbirds_sources, target_is_directory=True)
    (root / "weights").symlink_to(mobilenet_weights.parent, target_is_directory=True)
    monkeypatch.setenv("AIM_EXT_CACHE", str(root))
    return root


def test_demo_writes_results_and_resumes(cache, tmp_path, monkeypatch, capsys):
    # The quick configuration, shrunk: 32 px, two steps per epoch, 64 test images.
    monkeypatch.setattr(demo, "QUICK", dict(demo.QUICK, image_size=32, max_steps_per_epoch=2, batch_size=16))
    monkeypatch.setattr(demo, "EVAL_MAX_IMAGES", 64)
    out = tmp_path / "demo"
    argv = ["--out", str(out), "--epochs", "2", "--device", "cpu"]
    assert demo.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    for name in ("vanilla", "aim"):
        for key in ("test_avg_acc", "test_worst_group_acc", "test_epg", "background_swap_flip_rate"):
            assert 0.0 <= results[name][key] <= 1.0, (name, key)
        assert results[name]["num_images"] == 64
    assert results["vanilla"]["stop_stage"] is None and results["aim"]["stop_stage"] == demo.STOP_STAGE
    assert 0.1 < results["test_epg_chance_level"] < 0.2
    assert len(results["aim"]["mask_sparsity"]) == 2 and "mask_sparsity" not in results["vanilla"]
    report = (out / "report.md").read_text()
    assert "test worst-group accuracy" in report and "compare/report.md" in report
    app = f"aim-app {out / 'aim' / 'model'} {out / 'vanilla' / 'model'}"
    assert report.splitlines()[-1].endswith(f"`{app}`")  # the two models it saves, side by side
    assert capsys.readouterr().out.splitlines()[-1].endswith(app)
    precision = results["aim"]["mask_precision"]
    assert list(precision) == ["stage_4", "stage_3", "merged"]
    row = next(line for line in report.splitlines() if "AIM mask precision on the bird" in line)
    assert row.endswith(", ".join(f"{v:.3f}" for v in precision.values()) + " |")
    assert (out / "compare" / "gradcam_compare.png").is_file()
    # The demo's trained models are saved models a user can pick up, with TuxBirds' class names.
    saved = load_model(out / "aim" / "model")
    assert saved.stop_stage == demo.STOP_STAGE and saved.pretrained_cfg["input_size"] == (3, 32, 32)
    assert saved.pretrained_cfg["crop_pct"] == 1.0  # TuxBirds' whole frame, as it was evaluated
    assert len(set(saved.pretrained_cfg["label_names"])) == saved.num_classes >= 2
    assert not any(name.isdigit() for name in saved.pretrained_cfg["label_names"])
    # ... and what a user does with it: explain a photo, export it, load it through torch.hub.
    photo = tmp_path / "photo.png"
    Image.new("RGB", (120, 90), (70, 130, 200)).save(photo)
    model_dir = str(out / "aim" / "model")
    capsys.readouterr()
    assert explain_main([model_dir, str(photo), "--out", str(tmp_path / "explained"), "--device", "cpu"]) == 0
    assert (tmp_path / "explained" / "000_photo.png").is_file()
    explained = capsys.readouterr().out.splitlines()
    assert export_main([model_dir, "--onnx", str(tmp_path / "m.onnx")]) == 0
    hub = torch.hub.load(
        str(Path(__file__).parents[1]), "mobilenetv2_100_aim3", source="local", pretrained=model_dir
    )
    image = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(hub(image), saved(image))
    # Run again: both trainings are finished, so nothing retrains; the results are rewritten.
    checkpoints = {n: (out / n / "last.pt").stat().st_mtime_ns for n in ("vanilla", "aim")}
    capsys.readouterr()
    assert demo.main(argv) == 0
    assert "resumed from" in capsys.readouterr().out
    assert {n: (out / n / "last.pt").stat().st_mtime_ns for n in ("vanilla", "aim")} == checkpoints
    # Another configuration in the same folder is refused, not mixed in.
    assert demo.main(["--out", str(out), "--epochs", "3", "--device", "cpu"]) == 1
    assert "cannot resume" in capsys.readouterr().err
    # The rendered stores went into the demo's cache: the three splits, nothing partial.
    stores = sorted(p.name for p in (cache / "tuxbirds-rendered").iterdir() if p.is_dir())
    assert [name.split("-r1-")[0] for name in stores] == [
        f"{s}-95-32px-seed0" for s in ("test", "train", "val")
    ]
    # The example notebook, run on this demo's models: the same classes for the photo as aim-explain.
    if importlib.util.find_spec("nbclient") is None:
        pytest.skip("the demo passed; its notebook was not run: nbclient (the test extra) is missing")
    outputs = _run_notebook(tmp_path / "notebook", out, photo)
    top = [line for line in explained[1:] if "%" in line and "active" not in line]
    assert top and "\n".join(top) in outputs["text"] and "mean EPG: AIM" in outputs["text"]
    assert outputs["images"] == 2  # the TuxBirds figure and the photo's


def _run_notebook(folder: Path, demo_dir: Path, photo: Path) -> dict:
    """Execute examples/explain_tuxbirds.ipynb in `folder` (a kernel of this Python) with the
    demo's folder and the photo; returns its printed text and the number of pictures it drew."""
    import nbclient
    import nbformat

    folder.mkdir()
    notebook = nbformat.read(Path(__file__).parents[1] / "examples" / "explain_tuxbirds.ipynb", as_version=4)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AIM_DEMO_DIR", str(demo_dir))
        patch.setenv("AIM_PHOTO", str(photo))
        patch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
        nbclient.NotebookClient(
            notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(folder)}}
        ).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    return {
        "text": "".join(o["text"] for o in outputs if o.get("name") == "stdout"),
        "images": sum("image/png" in o.get("data", {}) for o in outputs),
    }


def test_demo_refuses_fewer_than_two_epochs(capsys):
    with pytest.raises(SystemExit):
        demo.main(["--epochs", "1"])
    assert "at least 2 epochs" in capsys.readouterr().err


def test_counterfactual_images_must_be_positive():
    from aim_ext.explain.run import EvalError, EvalOptions

    with pytest.raises(EvalError, match="counterfactual_images must be at least 1, got 0"):
        EvalOptions(counterfactual_images=0)


@pytest.mark.parametrize("second_ctrl_c", [False, True])
def test_a_stopped_demo_says_where_in_one_line(cache, tmp_path, monkeypatch, capsys, second_ctrl_c):
    """SIGTERM or Ctrl-C stops a training run at a safe point; a second Ctrl-C (or one during the
    evaluation) stops at once. Either way: one line, no traceback, and the same command continues."""
    from aim_ext.engine.train import TrainingInterrupted

    def stopped(cfg):
        if second_ctrl_c:
            raise KeyboardInterrupt
        raise TrainingInterrupted("stopped by SIGTERM in epoch 0 after step 1 of 2", 15, Path(cfg.out))

    monkeypatch.setattr(demo, "train", stopped)
    status = demo.main(["--out", str(tmp_path / "demo"), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == (130 if second_ctrl_c else 128 + 15)
    assert len(err) == 1 and err[0].startswith("aim-demo: ") and "Traceback" not in err[0], err
    assert err[0].endswith("continues" if not second_ctrl_c else "continues where the runs stopped"), err
    if not second_ctrl_c:
        assert "stopped by SIGTERM in epoch 0 after step 1 of 2" in err[0] and "--resume" not in err[0]
