"""The benchmark scripts run (tiny sizes, CPU): they must not rot between GPU sessions."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_ops  # noqa: E402


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
