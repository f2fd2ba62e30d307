"""aim-train's training loop (`aim_ext.engine.train_one_epoch`) on synthetic data, timed.

    python benchmarks/train_loop_cpu.py [--model resnet18] [--stop-stage 3] [--batch 16] [--steps 8]
        [--step eager|compile]

Builds the model, AdamW, the schedule and the step as `aim-train` does, runs a warm-up epoch of
two steps, then times an epoch of --steps steps and prints milliseconds per step. It also runs a
checkout from before `aim_ext.engine.step` (its `train_one_epoch` took the model and optimizer),
so the same file times an older checkout side by side (alternate
`PYTHONPATH=<checkout> python benchmarks/train_loop_cpu.py` runs of both).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.data import DataLoader, Dataset

from aim_ext import create_model
from aim_ext.engine import TrainConfig, train_one_epoch
from aim_ext.engine.optim import build_optimizer, build_scheduler

try:
    from aim_ext.engine.step import StepContext, build_step, use_tensor_learning_rates
except ImportError:  # a checkout from before the step kinds
    StepContext = None


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
    parser.add_argument("--step", default="eager", choices=["eager", "compile"])
    args = parser.parse_args()
    step_kind = {} if StepContext is None else {"step": args.step}
    cfg = TrainConfig(
        model=args.model,
        stop_stage=args.stop_stage,
        batch_size=args.batch,
        epochs=10,
        device="cpu",
        num_workers=0,
        **step_kind,
    )
    torch.manual_seed(0)
    model = create_model(args.model, num_classes=10, stop_stage=args.stop_stage)
    data = Noise(args.batch * (args.steps + 2), args.image_size)
    loader = DataLoader(data, batch_size=args.batch, shuffle=False, drop_last=True)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, args.steps)
    device = torch.device("cpu")
    if StepContext is None:

        def epoch(cfg, index):
            train_one_epoch(model, loader, optimizer, scheduler, cfg, index, device)
    else:
        use_tensor_learning_rates(optimizer, device)
        step = build_step(StepContext(model, optimizer, cfg, device, tau=torch.ones(())))

        def epoch(cfg, index):
            step.ctx.cfg = cfg
            train_one_epoch(step, loader, scheduler, cfg, index)

    epoch(TrainConfig(**{**cfg.to_dict(), "max_steps_per_epoch": 2}), 0)
    start = time.perf_counter()
    epoch(TrainConfig(**{**cfg.to_dict(), "max_steps_per_epoch": args.steps}), 1)
    ms = (time.perf_counter() - start) * 1e3 / args.steps
    print(f"{args.model}+AIM[{args.stop_stage}] batch {args.batch}, {args.step}: {ms:.1f} ms per step")


if __name__ == "__main__":
    main()
