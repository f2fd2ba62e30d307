"""Why does a masked level pick the cells it picks? Probes of a trained AIM run on its VALIDATION split.

    python benchmarks/mask_probe.py runs/demo/aim [--images 512]

For each masked level (top first), from the run's selected model on the first N validation images:

- the mask's mean area and the share of images whose mask is empty;
- the mean mask per cell, the object's mean share per cell, and the correlation between the mask
  logits and the object's share of each cell once each cell's mean over images is removed (does
  the mask follow the object in each image, or a fixed pattern of cells?);
- the accuracy of the level's auxiliary head from each single cell of its features T_l(S_l)
  (does one cell alone carry the class, wherever the object is?);
- the validation accuracy with the level's mask as predicted, all off, and all on (does the
  decision use the level at all?).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from aim_ext.engine import build_split, data_config
from aim_ext.engine.config import load_config
from aim_ext.models import AIM, load_model


def _grid(t: torch.Tensor) -> str:
    return "\n".join("    " + " ".join(f"{v:6.2f}" for v in row) for row in t.tolist())


@torch.no_grad()
def probe(run: Path, images: int) -> None:
    cfg = load_config(run / "config.yaml")
    model = load_model(run).eval()
    if not isinstance(model, AIM) or model.mask_estimators != "every":
        raise SystemExit(f"mask_probe: probes AIM models with a mask estimator per stage; {run} is not one")
    data = build_split(cfg, "val", data_config(cfg))
    n = min(images, len(data))
    samples = [data[i] for i in range(n)]
    x = torch.stack([s["image"] for s in samples])
    objects = torch.stack([s["mask"] for s in samples]).float()[:, None]
    labels = torch.tensor([s["label"] for s in samples])
    inputs = model.stage_inputs(x)
    print(f"{run}: its selected model on {n} validation images")
    for k, (level, stage, s) in enumerate(zip(model.stage_indices, model.stages, inputs, strict=True)):
        logits = stage.mask_estimator(s)
        mask = (logits >= 0).float()
        cells = F.adaptive_avg_pool2d(objects, tuple(s.shape[-2:]))
        centred_logits, centred_cells = logits - logits.mean(0), cells - cells.mean(0)
        corr = (centred_logits * centred_cells).sum() / (centred_logits.norm() * centred_cells.norm())
        feats = stage.features(s)
        h, w = feats.shape[-2:]
        single = torch.stack(
            [
                (model.aux_heads[k](feats[:, :, i, j]).argmax(1) == labels).float().mean()
                for i in range(h)
                for j in range(w)
            ]
        ).view(h, w)
        empty = (mask.flatten(1).sum(1) == 0).float().mean()
        print(f"\nlevel {level} ({h}x{w}): mask area {mask.mean():.3f}, empty in {empty:.3f} of images")
        print(f"  mean mask per cell:\n{_grid(mask.mean(0)[0])}")
        print(f"  object's mean share per cell:\n{_grid(cells.mean(0)[0])}")
        print(f"  correlation of the logits with the object's share, per-cell means removed: {corr:.3f}")
        spread = f"min {single.min():.3f}, max {single.max():.3f}"
        print(f"  auxiliary head's accuracy from one cell ({spread}):\n{_grid(single)}")
        accuracies = []
        for fill in (None, -1e4, 1e4):  # the logits as predicted, then all off, all on
            hook = stage.mask_estimator.register_forward_hook(
                lambda _m, _i, out, v=fill: out if v is None else torch.full_like(out, v)
            )
            accuracies.append((model(x).argmax(1) == labels).float().mean().item())
            hook.remove()
        print(
            "  accuracy with the mask as predicted / all off / all on: "
            + " / ".join(f"{a:.3f}" for a in accuracies)
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--images", type=int, default=512)
    args = parser.parse_args(argv)
    probe(args.run, args.images)
    return 0


if __name__ == "__main__":
    sys.exit(main())
