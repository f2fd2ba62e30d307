"""aim-train's eager training loop (`aim_ext.engine.train_one_epoch`) on synthetic data, timed.

    python benchmarks/train_loop_cpu.py [--model resnet18] [--stop-stage 3] [--batch 16] [--steps 8]

Builds the model, AdamW and the schedule as `aim-train` does, runs a warm-up epoch of two steps,
then times an epoch of --steps steps and prints milliseconds per step. It uses only what
`train_one_epoch` has long taken, so the same file times an older checkout side by side
(alternate `PYTHONPATH=<checkout> python benchmarks/train_loop_cpu.py` runs of both).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.data import DataLoader, Dataset

from aim_ext import create_model
from aim_ext.engine import TrainConfig, train_one_epoch
from aim_ext.engine.optim import build_optimizer, build_scheduler


class Noise(Dataset):
    def __init__(self, count: int, size: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(count, 3, size, size, generator=g)
        self.labels = torch.randint(0, 10, (count,), generator=g).tolist()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "label": self.labels[i], "group": 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--stop-stage", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    args = parser.parse_args()
    cfg = TrainConfig(
        model=args.model,
        stop_stage=args.stop_stage,
        batch_size=args.batch,
        epochs=10,
        device="cpu",
        num_workers=0,
    )
    torch.manual_seed(0)
    model = create_model(args.model, num_classes=10, stop_stage=args.stop_stage)
    data = Noise(args.batch * (args.steps + 2), args.image_size)
    loader = DataLoader(data, batch_size=args.batch, shuffle=False, drop_last=True)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, args.steps)
    device = torch.device("cpu")
    warm = TrainConfig(**{**cfg.to_dict(), "max_steps_per_epoch": 2})
    train_one_epoch(model, loader, optimizer, scheduler, warm, 0, device)
    timed = TrainConfig(**{**cfg.to_dict(), "max_steps_per_epoch": args.steps})
    start = time.perf_counter()
    train_one_epoch(model, loader, optimizer, scheduler, timed, 1, device)
    ms = (time.perf_counter() - start) * 1e3 / args.steps
    print(f"{args.model}+AIM[{args.stop_stage}] batch {args.batch}: {ms:.1f} ms per step")


if __name__ == "__main__":
    main()
