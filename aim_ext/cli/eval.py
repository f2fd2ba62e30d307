"""`aim-eval`: evaluate a training run (accuracies, EPG, mask sparsity, figures, report.md), or compare two.

    aim-eval runs/wb95_aim                      # writes runs/wb95_aim/eval_test/report.md
    aim-eval runs/wb95_aim --split val --attribution gradcam --target pred --max-images 200
    aim-eval --compare runs/wb95_vanilla runs/wb95_aim   # writes runs/wb95_aim/compare_wb95_vanilla/
    aim-eval runs/demo/aim/model --dataset tuxbirds100   # a saved model on any dataset
    aim-eval runs/cub_aim --shifted-centre 0.15 0.25     # also off-centre crops: centre_bias.md

A saved model (aim_ext.save_pretrained, e.g. an aim-train run's model/) brings no dataset: name one
with --dataset. Writes report.md, metrics.json and the figures into --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from aim_ext.cli.errors import non_negative_int, one_line_errors, positive_int, say, shown, writable_folder


def _deviation(text: str) -> float:
    value = float(text)
    if not 0 < value <= 0.5:
        raise argparse.ArgumentTypeError(f"a deviation is a share of the crop's side in (0, 0.5], got {text}")
    return value


def _methods(text: str) -> tuple[str, ...]:
    return tuple(m.strip() for m in text.split(",") if m.strip())


def build_parser() -> argparse.ArgumentParser:
    """The aim-eval command line; the work is done by `aim_ext.explain` (`run`, `evaluate`, `reports`)."""
    from aim_ext.data import list_datasets

    parser = argparse.ArgumentParser(
        prog="aim-eval",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "runs",
        nargs="+",
        type=Path,
        metavar="RUN",
        help="run folder(s) written by aim-train, or saved models (aim_ext.save_pretrained; with --dataset)",
    )
    parser.add_argument(
        "--dataset",
        choices=list_datasets(),
        help="evaluate on this dataset instead of the run's (required for a saved model)",
    )
    parser.add_argument("--data-root", help="with --dataset: its root folder")
    parser.add_argument("--cub-root", help="with --dataset waterbirds or travelingbirds: the CUB tree")
    parser.add_argument("--compare", action="store_true", help="compare two runs: --compare RUN_A RUN_B")
    parser.add_argument(
        "--checkpoint", default="best", help="best, last, or a checkpoint file (default best)"
    )
    parser.add_argument("--split", choices=("test", "val"), default="test", help="default test")
    parser.add_argument(
        "--shifted-centre",
        type=_deviation,
        nargs="+",
        metavar="DEV",
        help="also evaluate crops whose centre is the object's moved by DEV x the crop side (the "
        "paper's centre-bias test, appendix A.6); writes OUT/shifted_centre_DEV/ and OUT/centre_bias.md",
    )
    parser.add_argument(
        "--attribution",
        type=_methods,
        help="comma-separated: gradcam,guided_gradcam,guided_backprop (default all)",
    )
    parser.add_argument(
        "--target", choices=("label", "pred"), default="label", help="class to attribute (default label)"
    )
    parser.add_argument("--batch-size", type=positive_int, default=32, help="images per batch (default 32)")
    parser.add_argument(
        "--max-images", type=positive_int, help="evaluate only the first N images of the split"
    )
    parser.add_argument(
        "--figures", type=non_negative_int, default=4, help="images per figure (0: no figures)"
    )
    parser.add_argument(
        "--device", choices=("cpu", "cuda", "auto"), default="auto", help="default auto: cuda if present"
    )
    parser.add_argument(
        "--num-workers", type=non_negative_int, help="data loader workers (default: the run's)"
    )
    parser.add_argument(
        "--no-counterfactuals",
        dest="counterfactuals",
        action="store_false",
        help="TuxBirds: skip the background-swap and background-only rates",
    )
    parser.add_argument(
        "--counterfactual-images",
        type=positive_int,
        help="TuxBirds: counterfactual rates on the first N images only",
    )
    parser.add_argument(
        "--out", type=Path, help="output folder (default RUN/eval_<split>, RUN_B/compare_<A>)"
    )
    return parser


@one_line_errors("aim-eval")
def main(argv: list[str] | None = None) -> int:
    """Run aim-eval; 0 on success, 1 with a message when a run cannot be evaluated."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.compare and len(args.runs) != 2:
        parser.error(f"--compare takes two runs, got {len(args.runs)}")
    if not args.compare and len(args.runs) != 1:
        parser.error(f"evaluate one run at a time (or two with --compare), got {len(args.runs)}")
    if args.compare and args.shifted_centre:
        parser.error("--shifted-centre evaluates one run: run it on each of the two")
    if args.out is not None:
        writable_folder(args.out)  # before the evaluation, not after it
    from aim_ext.explain.centre_bias import evaluate_centre_bias
    from aim_ext.explain.reports import compare_runs, evaluate_run
    from aim_ext.explain.run import EvalError, EvalOptions

    try:
        options = EvalOptions(
            checkpoint=args.checkpoint,
            split=args.split,
            **({"methods": args.attribution} if args.attribution is not None else {}),
            target=args.target,
            batch_size=args.batch_size,
            max_images=args.max_images,
            figures=args.figures,
            device=args.device,
            num_workers=args.num_workers,
            counterfactuals=args.counterfactuals,
            counterfactual_images=args.counterfactual_images,
            dataset=args.dataset,
            data_root=args.data_root,
            cub_root=args.cub_root,
        )
        if args.compare:
            _, _, report = compare_runs(*args.runs, options, out=args.out)
            print(f"comparison report: {shown(report)}")
        else:
            evaluation, report = evaluate_run(args.runs[0], options, out=args.out)
            summary = {k: v for k, v in evaluation.metrics.items() if k not in ("definitions", "notes")}
            print(json.dumps(summary, indent=2))
            print(f"report: {shown(report)}")
            if args.shifted_centre:
                centre = evaluate_centre_bias(evaluation, args.shifted_centre, report.parent)
                print(f"centre bias: {shown(centre)}")
    except (EvalError, FileNotFoundError) as error:
        say("aim-eval", error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
