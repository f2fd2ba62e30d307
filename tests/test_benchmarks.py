"""The benchmark scripts run (tiny sizes, CPU): they must not rot between GPU sessions."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_ops  # noqa: E402
import profile_overhead  # noqa: E402


def test_bench_ops_writes_every_case(tmp_path):
    out = tmp_path / "rows.json"
    argv = [
        "--device",
        "cpu",
        "--shapes",
        "2,8,9,7,4,3",
        "--repeats",
        "2",
        "--no-compile",
        "--json",
        str(out),
    ]
    assert bench_ops.main(argv) == 0
    data = json.loads(out.read_text())
    expected = [(op, case) for op in bench_ops.OPS for case in bench_ops.CASES]
    assert [(r["op"], r["case"]) for r in data["rows"]] == expected
    for row in data["rows"]:
        assert set(row["ms"]) == {"eager", "kernel"} and all(t > 0 for t in row["ms"].values())
        assert row["bytes"] > 0 and row["kernel_gbs"] > 0


def test_profile_overhead_tables_give_kernel_time_and_launches():
    long_name = "void cutlass::Kernel<" + "x" * 100 + ">"
    rows = [
        ("vanilla m", 2.0, [("gemm", 500.0), ("add", 250.0)]),
        ("stage 3: T convolutions", 0.5, [("conv", 100.0), (long_name, 50.0)]),
        ("head", 0.25, [("linear", 25.0)]),
    ]
    table = profile_overhead.inference_table(rows, base=2.0)
    assert table[:2] == ["| part | ms | kernels | kernel ms | / vanilla ms |", "|---|---|---|---|---|"]
    assert table[2] == "| vanilla m | 2.0000 | 2 | 0.7500 | 1.000 |"
    assert table[-1] == "| top-down parts summed (one stream) | 0.7500 | 3 | 0.1750 | 0.375 |"
    listed = profile_overhead.launch_lists(rows[1:2])
    assert listed[0] == "#### stage 3: T convolutions: 2 kernels, 0.1500 ms"
    assert listed[4] == "| 1 | `conv` | 100.0 |"
    name = profile_overhead.short_name(long_name)
    assert len(name) == profile_overhead.KERNEL_NAME_WIDTH and name.endswith("...")
    assert listed[5] == f"| 2 | `{name}` | 50.0 |" and listed[-1] == ""


def test_demo_seeds_tables_nested_metrics_and_what_a_model_lacks():
    import demo_seeds

    def seed(acc: float, precision: float, shifted: bool) -> dict:
        aim = {"test_avg_acc": acc, "mask_precision": {"stage_4": precision, "stage_3": 0.5, "merged": 0.4}}
        aim["mask_precision_chance"] = 0.15
        if shifted:
            aim["shifted_centre"] = {"avg_acc": acc - 0.1, "epg": {"gradcam": 0.3}}
        return {
            "vanilla": {"test_avg_acc": acc - 0.05},
            "aim": aim,
            "wall_time_s": 1.0,
            "test_epg_chance_level": 0.16,
        }

    summary, lines = demo_seeds.summarise({0: seed(0.9, 0.2, True), 1: seed(0.8, 0.4, False)})
    assert summary["metrics"]["mask_precision.stage_4"]["aim"]["mean"] == 0.30000000000000004
    assert summary["metrics"]["test_avg_acc"]["vanilla"]["values"] == [0.85, 0.75]
    row = next(line for line in lines if line.startswith("| mask precision, level 4 |"))
    assert row == "| mask precision, level 4 | – | 0.300 ± 0.141 |"
    assert "| 1 | aim | 0.800 |" in "\n".join(lines)
    shifted = next(line for line in lines if line.startswith("| shifted-centre test average accuracy |"))
    assert shifted == "| shifted-centre test average accuracy | – | 0.800 ± 0.000 (1 seeds) |"
    assert (
        "Chance levels (test split): EPG of a uniform map 0.160; mask precision of a random mask"
        in "\n".join(lines)
    )
