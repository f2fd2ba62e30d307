"""The demo's AIM model under recipe or model variants, judged on the VALIDATION split only.

    python benchmarks/demo_variants.py --out runs/variants \
        --variant base \
        --variant per_image area_per_image=true \
        --variant edges mask_init=edges

Each variant trains MobileNetV2+AIM[3] with aim-demo's quick recipe (seed --seed) plus its
overrides (TrainConfig fields, values in YAML syntax), into OUT/<name> (an interrupted variant
continues), then evaluates its selected checkpoint on the validation split: average and
worst-group accuracy, GradCAM EPG, and each level's mask precision and recall on the bird against
chance. Writes OUT/variants.json and OUT/variants.md. The test split is never read: recipe
choices for the demo are made from this table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from aim_ext.cli import demo


def _variant(values: list[str]) -> tuple[str, dict]:
    name, *pairs = values
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"demo_variants: override {pair!r} is not KEY=VALUE")
        overrides[key.replace("-", "_")] = yaml.safe_load(value)
    return name, overrides


def run_variant(name: str, overrides: dict, args) -> dict:
    import dataclasses

    from aim_ext.explain.evaluate import evaluate, evaluation_metrics
    from aim_ext.explain.run import EvalOptions, open_run
    from aim_ext.models.offline_weights import mobilenet_v2_imagenet

    weights = mobilenet_v2_imagenet()
    cfg = demo.demo_config(
        "aim", full=False, seed=args.seed, out=args.out, device="cpu", weights=weights, epochs=None
    )
    cfg = dataclasses.replace(cfg, out=str(args.out / name), **overrides)
    print(f"demo_variants: {name}: training ({overrides or 'the quick recipe'})", flush=True)
    demo.train(cfg)
    options = EvalOptions(split="val", methods=("gradcam",), figures=0, counterfactuals=False, batch_size=64)
    metrics = evaluation_metrics(evaluate(open_run(args.out / name, options), options))
    return {"overrides": overrides, **{k: metrics.get(k) for k in KEYS}}


KEYS = (
    "checkpoint_epoch",
    "avg_acc",
    "worst_group_acc",
    "epg",
    "mask_sparsity",
    "mask_precision",
    "mask_recall",
    "mask_precision_chance",
)


def table(results: dict[str, dict]) -> list[str]:
    first = next(iter(results.values()))
    levels = list(first["mask_precision"])
    lines = [
        "| variant | epoch | val avg acc | val worst-group | val EPG | "
        + " | ".join(f"{lv} precision / recall" for lv in levels)
        + " |",
        "|---" * (5 + len(levels)) + "|",
    ]
    for name, r in results.items():
        cells = " | ".join(f"{r['mask_precision'][lv]:.3f} / {r['mask_recall'][lv]:.3f}" for lv in levels)
        lines.append(
            f"| {name} | {r['checkpoint_epoch']} | {r['avg_acc']:.3f} | {r['worst_group_acc']:.3f} | "
            f"{r['epg']['gradcam']:.3f} | {cells} |"
        )
    lines.append("")
    chance = first["mask_precision_chance"]
    lines.append(f"Chance precision (the bird's mean share of a validation image): {chance:.3f}.")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/variants"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--variant", nargs="+", action="append", required=True, metavar="NAME [KEY=VALUE ...]"
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    store = args.out / "variants.json"
    results = json.loads(store.read_text()) if store.exists() else {}
    for values in args.variant:
        name, overrides = _variant(values)
        results[name] = run_variant(name, overrides, args)
        store.write_text(json.dumps(results, indent=2) + "\n")
        lines = table(results)
        (args.out / "variants.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
