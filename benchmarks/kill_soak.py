"""Kill `aim-train` again and again and check that every resumed run ends as an uninterrupted one.

    python benchmarks/kill_soak.py --kills 24 [--work DIR] [--seed 0]

A small AIM run on a Waterbirds fixture (tests/fixtures_data.py) is trained once without
interruption, then again in rounds: each round starts it afresh and kills it up to --per-round
times before letting it finish, each try a new `aim-train` process (`--resume` once the run folder
has its config). A try is killed in one of these ways, in turn:

- `random`: SIGKILL at a random moment of what is left to train (timed from the last run that finished);
- `step`, `last.pt`, `records`, `model`: SIGKILL at a chosen moment (tests/kill_points.py) --
  inside a training step, halfway through writing last.pt, between an epoch's records and its
  checkpoint, between the two files of model/ -- at a random occurrence;
- `sigterm`, `sigint`: that signal at a random moment likewise; the run must stop by itself at its
  next safe point, with exit status 143 or 130 (or finish, when the moment came after its last step).

At the end of each round the run folder must equal the uninterrupted run's (tests/test_faults.py's
`assert_same_run`: metrics.jsonl, summary.csv and config.yaml byte for byte, every checkpoint and
the saved model's tensors bit for bit, no other file). Prints one line per try and a summary.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from fixtures_data import make_cub, make_waterbirds  # noqa: E402
from test_faults import TRAINING, assert_same_run  # noqa: E402

EPOCHS = 4
MODES = ("sigterm", "step", "random", "last.pt", "sigint", "records", "random", "model")
# Which occurrence of each kill point to draw from: within the first epoch a try trains (3 steps),
# of its first two epochs' checkpoints and records, of model/'s two files.
OCCURRENCES = {"step": 3, "last.pt": 2, "records": 2, "model": 2}


def command(flags: list[str], out: Path, point: str | None = None, n: int = 0) -> list[str]:
    resume = ["--resume"] if (out / "config.yaml").is_file() else []
    if point is None:
        return [sys.executable, "-m", "aim_ext.cli.train", *flags, *resume, "--out", str(out)]
    script = str(ROOT / "tests" / "kill_points.py")
    return [sys.executable, script, point, str(n), *flags, *resume, "--out", str(out)]


# Exit statuses: finished; SIGKILL; stopped at a safe point by SIGTERM, SIGINT; ended by SIGTERM or
# SIGINT before training began (nothing to save yet: Python's default handlers).
EXITS = (0, -signal.SIGKILL, 128 + signal.SIGTERM, 130, -signal.SIGTERM, -signal.SIGINT)


def epochs_done(out: Path) -> int:
    records = out / "metrics.jsonl"
    return len(records.read_text().splitlines()) if records.is_file() else 0


def run(
    cmd: list[str], out: Path, after: float | None = None, send: int = signal.SIGKILL
) -> tuple[int, float, str]:
    """Run `cmd`; `after` seconds after it has (re)written the run's config.yaml (its training
    begins), send it `send`. Its exit status (minus the signal that ended it), how long it trained
    (or -1 if it did not begin) and the last line it wrote to stderr."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread in every run: the same arithmetic
    launched = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    began = None
    while proc.poll() is None:
        config = out / "config.yaml"
        if began is None and config.is_file() and config.stat().st_mtime >= launched:
            began = time.monotonic()
        if began is not None and after is not None and time.monotonic() >= began + after:
            proc.send_signal(send)
            break
        time.sleep(0.01)
    _, err = proc.communicate()
    code = proc.returncode
    if code not in EXITS:
        sys.exit(f"unexpected exit {code} of {' '.join(cmd)}:\n{err.decode()[-2000:]}")
    lines = err.decode().strip().splitlines()
    return code, -1.0 if began is None else time.monotonic() - began, lines[-1] if lines else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=24, help="kills (and signals) in all")
    parser.add_argument("--per-round", type=int, default=6, help="kills before a round may finish")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one)")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = args.work or Path(tempfile.mkdtemp(prefix="kill-soak-"))
    shutil.rmtree(work / "run", ignore_errors=True)
    shutil.rmtree(work / "reference", ignore_errors=True)
    cub = make_cub(work / "CUB_200_2011")
    make_waterbirds(work / "waterbirds", cub)
    flags = ["--dataset", "waterbirds", "--data-root", str(work / "waterbirds"), "--cub-root", str(cub.root)]
    flags += [*TRAINING, "--epochs", str(EPOCHS)]
    out = work / "run"
    code, trained, _ = run(command(flags, out), out)
    assert code == 0
    out.rename(work / "reference")
    epoch_s = trained / EPOCHS  # updated by every run that finishes: the machine's load changes
    print(f"uninterrupted run: {trained:.1f} s of training")
    kills, rounds, tries, by_mode = 0, 0, 0, {}
    while kills < args.kills:
        rounds += 1
        shutil.rmtree(out, ignore_errors=True)
        in_round = 0
        while True:
            mode = MODES[tries % len(MODES)] if in_round < args.per_round and kills < args.kills else None
            tries += 1
            done = epochs_done(out)
            if mode in (None, "random", "sigterm", "sigint"):
                # A random moment of what is left to train (model/ written at the end included).
                after = None if mode is None else rng.uniform(0.0, 1.0) * epoch_s * max(EPOCHS - done, 0.5)
                send = {"sigterm": signal.SIGTERM, "sigint": signal.SIGINT}.get(mode, signal.SIGKILL)
                code, took, said = run(command(flags, out), out, after, send)
                detail = "" if after is None else f"{after:.1f} s into training"
                if code in (128 + signal.SIGTERM, 130):
                    detail += ": " + said.split(";")[0]
            else:
                n = rng.randint(1, OCCURRENCES[mode])
                code, took, _ = run(command(flags, out, mode, n), out)
                detail = f"occurrence {n}"
            print(f"round {rounds} try {tries} (at {done} epochs): {mode or 'finish'} {detail}: exit {code}")
            if code == 0:
                if took > 0 and EPOCHS > done:
                    epoch_s = took / (EPOCHS - done)
                break
            kills += 1
            in_round += 1
            by_mode[mode] = by_mode.get(mode, 0) + 1
        assert_same_run(out, work / "reference")
        print(f"round {rounds}: equal to the uninterrupted run")
    counts = ", ".join(f"{mode} {count}" for mode, count in sorted(by_mode.items()))
    print(f"kills survived: {kills} in {rounds} rounds ({counts}); each round ended as the uninterrupted run")


if __name__ == "__main__":
    main()
