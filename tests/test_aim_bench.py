"""aim-bench: the quick CPU run end to end (rows, ratios, files), and its parts."""

from __future__ import annotations

import json
import math

import pytest
import torch

from aim_ext.bench.cost import gmacs, parameters_m
from aim_ext.bench.report import add_ratios
from aim_ext.bench.runtimes import RUNTIMES, Setting
from aim_ext.bench.timing import Timing, time_interleaved
from aim_ext.bench.train_step import prepare_train_step
from aim_ext.bench.variants import Variant
from aim_ext.cli.bench import main as bench_main
from aim_ext.models import InferenceMaskEstimator, create_model, save_pretrained


@pytest.mark.slow
def test_quick_cpu_run_writes_every_row_with_ratios(tmp_path, capsys):
    # The quick preset's rows, at a smaller size and with fewer calls: what is checked is the rows.
    small = ["--image-size", "64", "--num-classes", "10", "--train-batch", "2"]
    small += ["--warmup", "1", "--rounds", "2", "--per-round", "1"]
    assert bench_main(["--device", "cpu", "--quick", *small, "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    rows, env = results["rows"], results["env"]
    assert env["device"] == "cpu" and env["card"].startswith("CPU") and env["versions"]["torch"]
    inference = [r for r in rows if r["kind"] == "inference"]
    train = [r for r in rows if r["kind"] == "train"]
    assert {(r["model"], r["runtime"]) for r in inference} == {
        (m, rt)
        for m in (
            "convnext_tiny",
            "convnext_tiny+AIM[2]",
            "resnet50",
            "resnet50+AIM[3]",
            "mobilenetv2_100",
            "mobilenetv2_100+AIM[3]",
        )
        for rt in ("eager", "onnxruntime")
    }
    assert len(train) == 6
    assert all(r["status"] == "ok" for r in rows), [r["status"] for r in rows]
    by_key = {(r["kind"], r["model"], r["runtime"]): r for r in rows}
    for r in rows:
        assert r["p25_ms"] <= r["median_ms"] <= r["p75_ms"]
        assert r["throughput_img_s"] == pytest.approx(r["batch"] * 1e3 / r["median_ms"])
        if r["variant"] == "vanilla":
            assert r["overhead_ratio"] is None
        else:
            base = by_key[(r["kind"], r["family"], r["runtime"])]
            assert r["overhead_ratio"] == pytest.approx(r["median_ms"] / base["median_ms"])
            assert r["params_m"] > base["params_m"] and r["gmacs"] > base["gmacs"]
    markdown = (tmp_path / "results.md").read_text()
    assert "| resnet50+AIM[3] | onnxruntime | 1 | float32 |" in markdown
    assert (tmp_path / "overhead.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wrote" in capsys.readouterr().out


def test_runtimes_that_cannot_run_here_are_rows_with_the_reason(tmp_path):
    argv = ["--device", "cpu", "--quick", "--no-train", "--families", "mobilenetv2_100", "--image-size", "64"]
    assert bench_main([*argv, "--runtimes", "cudagraphs,eager", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    graphs = [r for r in rows if r["runtime"] == "cudagraphs"]
    assert len(graphs) == 2 and all(
        r["status"] == "unavailable: needs a CUDA device (CUDA graphs)" for r in graphs
    )
    assert all(r["status"] == "ok" for r in rows if r["runtime"] == "eager")


def test_training_rows_time_the_step_kinds_aim_train_runs(tmp_path):
    """The eager step trains (its statistics: the loss term of a real step); the captured step is a
    row that says why it cannot run on a CPU; float16 training is a row with its reason."""
    argv = ["--device", "cpu", "--quick", "--runtimes", "", "--families", "mobilenetv2_100"]
    argv += ["--image-size", "32", "--train-batch", "2", "--rounds", "1", "--per-round", "1"]
    argv += ["--train-runtimes", "eager,cuda-graph", "--dtypes", "float32,float16"]
    assert bench_main([*argv, "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    status = {(r["runtime"], r["dtype"], r["variant"]): r["status"] for r in rows}
    assert len(rows) == 8 and {r["kind"] for r in rows} == {"train"}
    assert status[("eager", "float32", "vanilla")] == status[("eager", "float32", "AIM[3]")] == "ok"
    assert status[("cuda-graph", "float32", "AIM[3]")] == (
        "unavailable: --step cuda-graph needs a CUDA device; this run is on cpu: "
        "use --step compile or --step eager"
    )
    assert status[("eager", "float16", "vanilla")].startswith(
        "unavailable: float16 training needs the grad scaler"
    )
    eager = [r for r in rows if r["status"] == "ok"]
    assert all(r["ratio_to_fastest_vanilla"] for r in eager)
    step = prepare_train_step(
        create_model("mobilenetv2_100", num_classes=3, stop_stage=3), _setting(tmp_path), "eager"
    )
    stats = step()
    assert stats.dtype == torch.float64 and bool(stats[-1]) and float(stats[3]) > 0  # a finite loss


@pytest.mark.parametrize("sparse,branch,estimator", [("on", "sparse", "kernel"), ("off", "dense", "modules")])
def test_fused_rows_say_which_evaluation_path_ran(tmp_path, sparse, branch, estimator):
    argv = ["--device", "cpu", "--quick", "--no-train", "--families", "resnet50", "--image-size", "64"]
    argv += ["--runtimes", "eager", "--fuse", "--sparse", sparse, "--rounds", "1", "--per-round", "1"]
    assert bench_main([*argv, "--estimator", estimator, "--out", str(tmp_path)]) == 0
    assert InferenceMaskEstimator.algorithm == "auto"  # the switch is undone
    results = json.loads((tmp_path / "results.json").read_text())
    vanilla, aim = results["rows"]
    assert vanilla["fused"] and aim["fused"] and vanilla["evaluation_path"] is None
    assert aim["evaluation_path"] == f"pooled: s4 {branch}, s3 {branch}"
    assert all(0.05 < a < 0.6 for a in aim["mask_active"]), aim["mask_active"]  # calibrated to 25%
    assert results["env"]["sparse"] == sparse and results["env"]["fused"]
    assert results["env"]["estimator"] == estimator
    assert f"pooled: s4 {branch}, s3 {branch} |" in (tmp_path / "results.md").read_text()


def _setting(tmp_path):
    return Setting("cpu", torch.float32, 2, (32, 32), False, tmp_path)


def test_unknown_names_are_refused():
    with pytest.raises(SystemExit, match="unknown runtime warp; known: eager"):
        bench_main(["--device", "cpu", "--runtimes", "warp"])
    with pytest.raises(SystemExit, match="unknown training runtime graph; known: eager, compile, cuda-graph"):
        bench_main(["--device", "cpu", "--train-runtimes", "graph"])
    with pytest.raises(SystemExit, match="--estimator kernel sets how fused mask estimators run; add --fuse"):
        bench_main(["--device", "cpu", "--estimator", "kernel"])


def test_ratios_divide_by_the_vanilla_row_of_the_same_comparison():
    def row(model, variant, runtime, ms, kind="inference", batch=1):
        return {
            "kind": kind,
            "family": "f",
            "model": model,
            "variant": variant,
            "runtime": runtime,
            "batch": batch,
            "dtype": "float32",
            "status": "ok",
            "median_ms": ms,
        }

    rows = [
        row("f", "vanilla", "eager", 10.0),
        row("f+AIM[2]", "AIM[2]", "eager", 12.0),
        row("f", "vanilla", "compile", 5.0),
        row("f+AIM[2]", "AIM[2]", "compile", 8.0),
        row("f+AIM[2]", "AIM[2]", "eager", 30.0, batch=32),  # no vanilla row at batch 32
        row("f", "vanilla", "eager", 20.0, kind="train"),
        row("f", "vanilla", "compile", 16.0, kind="train"),
        row("f+AIM[2]", "AIM[2]", "compile", 40.0, kind="train"),
    ]
    add_ratios(rows)
    assert [r["overhead_ratio"] for r in rows] == [None, 1.2, None, 1.6, None, None, None, 2.5]
    assert rows[-1]["ratio_to_fastest_vanilla"] == 2.5 and rows[5]["ratio_to_fastest_vanilla"] == 1.25


def test_timing_statistics_and_interleaving():
    t = Timing.of([4.0, 1.0, 3.0, 2.0, 100.0])
    assert t.median_ms == 3.0 and t.p25_ms <= 2.0 and t.p75_ms >= 4.0 and t.calls == 5
    order = []
    timings = time_interleaved(
        [lambda: order.append("a"), lambda: order.append("b")], "cpu", warmup=1, rounds=2, per_round=2
    )
    assert order == ["a", "b", "a", "a", "b", "b", "a", "a", "b", "b"]
    assert [t.calls for t in timings] == [4, 4]


def test_parameters_and_macs_match_the_papers_table_6():
    """Table 6 (200 classes): ConvNeXt-T 4.5 GFLOPs (multiply-adds), +AIM[2] 4.6, +AIM[1] 5.2;
    ResNet-50 4.1, +AIM[3] 4.4, +AIM[2] 5.1."""
    table = {
        ("convnext_tiny", None): 4.5,
        ("convnext_tiny", 2): 4.6,
        ("convnext_tiny", 1): 5.2,
        ("resnet50", None): 4.1,
        ("resnet50", 3): 4.4,
        ("resnet50", 2): 5.1,
    }
    for (backbone, stop), expected in table.items():
        model = Variant(backbone, stop).build(200)
        assert gmacs(model, (224, 224)) == pytest.approx(expected, abs=0.1), (backbone, stop)
    assert parameters_m(Variant("convnext_tiny", 2).build(200)) == pytest.approx(29.9, abs=0.1)


@pytest.mark.slow
def test_compiled_runtimes_run_the_evaluation_model(tmp_path):
    """torch.compile and AOTInductor rows on the CPU: each prepared call returns the evaluation
    graph's outputs (logits and masks) as the eager model computes them."""
    model = create_model("test_resnet", num_classes=4, stop_stage=3).eval()  # timm's small ResNet
    s = Setting("cpu", torch.float32, 2, (64, 64), True, tmp_path)
    with torch.inference_mode():
        expected = RUNTIMES["eager"](model, "test_resnet+AIM[3]", s)()
    for runtime in ("compile", "aoti"):
        got = RUNTIMES[runtime](model, "test_resnet+AIM[3]", s)()
        assert len(got) == len(expected) == 1 + len(model.stages), runtime
        for a, b in zip(got, expected, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=runtime)


@pytest.mark.slow
def test_compiled_training_step_runs_and_learns(tmp_path):
    """The compiled training row's step (torch.compile, the AIM loss, AdamW) lowers the loss,
    also when an earlier row compiled the same code at another size (ConvNeXt, whose symbolic
    spatial sizes inductor cannot compile with gradients: each row compiles static)."""
    torch.manual_seed(0)
    # timm's test_convnext: ConvNeXt's code in a few small blocks, which compile faster.
    earlier = Setting("cpu", torch.float32, 2, (32, 32), False, tmp_path)
    prepare_train_step(create_model("test_convnext", num_classes=3, stop_stage=2), earlier, "compile")()
    s = Setting("cpu", torch.float32, 4, (48, 48), False, tmp_path)
    step = prepare_train_step(create_model("test_convnext", num_classes=3, stop_stage=2), s, "compile")
    losses = [float(step()[3]) for _ in range(6)]  # the statistics' loss term
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], losses


def test_a_trained_model_is_timed_against_its_backbone(tmp_path):
    """--model: the saved model's own weights, masks (not calibrated), classes and input size,
    beside a new vanilla model of its backbone with as many classes."""
    from aim_ext.export import example_image
    from aim_ext.models import load_model, save_pretrained

    torch.manual_seed(0)
    folder = save_pretrained(
        create_model("mobilenetv2_100", num_classes=3, stop_stage=3), tmp_path / "model", image_size=48
    )
    argv = ["--model", str(folder), "--device", "cpu", "--quick", "--runtimes", "eager"]
    argv += ["--train-runtimes", "eager", "--train-batch", "2", "--rounds", "1", "--per-round", "1"]
    assert bench_main([*argv, "--out", str(tmp_path / "bench")]) == 0
    rows = json.loads((tmp_path / "bench" / "results.json").read_text())["rows"]
    assert [(r["kind"], r["model"]) for r in rows] == [
        ("inference", "mobilenetv2_100"),
        ("inference", "mobilenetv2_100+AIM[3] (trained)"),
        ("train", "mobilenetv2_100"),
        ("train", "mobilenetv2_100+AIM[3] (trained)"),
    ]
    assert all(r["status"] == "ok" and r["image_size"] == [48, 48] for r in rows)
    vanilla, aim = rows[:2]
    assert aim["overhead_ratio"] == pytest.approx(aim["median_ms"] / vanilla["median_ms"])
    trained = load_model(folder)
    assert aim["params_m"] == pytest.approx(parameters_m(trained))
    assert vanilla["params_m"] == pytest.approx(parameters_m(create_model("mobilenetv2_100", num_classes=3)))
    with torch.no_grad():
        masks = trained.predict(example_image(1, (48, 48)))[1]
    assert aim["mask_active"] == [round(float(m.mean()), 3) for m in masks]  # its own, not calibrated


def test_a_bad_trained_model_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match=f"^aim-bench: model not found: {tmp_path / 'none'}$"):
        bench_main(["--model", str(tmp_path / "none"), "--device", "cpu"])
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="^aim-bench: .*garbage.pt") as error:
        bench_main(["--model", str(tmp_path / "garbage.pt"), "--device", "cpu"])
    assert "\n" not in str(error.value)
    bottom_up = create_model("resnet18", num_classes=2, stop_stage=3, masking="bottom-up")
    save_pretrained(bottom_up, tmp_path / "bottom_up")
    with pytest.raises(SystemExit, match="is bottom-up masking \\(an ablation\\); it times AIM models$"):
        bench_main(["--model", str(tmp_path / "bottom_up"), "--device", "cpu"])
    for flag, value in (("--families", "resnet50"), ("--stop-stages", "vanilla")):
        with pytest.raises(SystemExit, match=f"--model times one trained model; leave out {flag}"):
            bench_main(["--model", str(tmp_path / "none"), flag, value, "--device", "cpu"])
