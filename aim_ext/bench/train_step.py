"""The training step aim-train runs (`aim_ext.engine.step`), on a fixed batch, for timing.

Each kind of step (`TRAIN_STEPS`: eager, compile, cuda-graph) is prepared as `aim-train --step`
prepares it: fused AdamW (capturable for the captured step) with its learning rates as tensors,
the paper's loss (Eq. 7, tau 0.25, Gumbel noise on) for AIM models and smoothed cross-entropy for
vanilla ones, no gradient clipping. Reduced precision is autocast, as training runs it (weights
stay float32); float16 is refused, as `--step cuda-graph` refuses the grad scaler it needs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from aim_ext.bench.runtimes import Setting, Unavailable
from aim_ext.engine import TrainConfig
from aim_ext.engine.config import STEP_KINDS
from aim_ext.engine.optim import build_optimizer
from aim_ext.engine.step import StepContext, StepError, build_step, use_tensor_learning_rates

TRAIN_STEPS = STEP_KINDS
AMP = {torch.float32: "none", torch.bfloat16: "bf16"}


def prepare_train_step(model: nn.Module, s: Setting, kind: str) -> Callable[[], object]:
    """One training step of `kind` per call, on a fixed batch of the setting; raises Unavailable
    where this kind, dtype or device cannot run."""
    if s.dtype not in AMP:
        raise Unavailable(
            "float16 training needs the grad scaler; the training rows run float32 and bfloat16"
        )
    device = torch.device(s.device)
    cfg = TrainConfig(amp=AMP[s.dtype], channels_last=s.channels_last, step=kind, device=s.device)
    model = model.to(device).train()
    if s.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg)
    use_tensor_learning_rates(optimizer, device)
    images = s.image().float()
    labels = torch.randint(0, model.num_classes, (s.batch,), generator=torch.Generator().manual_seed(0))
    labels = labels.to(device)
    tau = torch.full((), 0.25, device=device)
    try:
        step = build_step(StepContext(model, optimizer, cfg, device, tau=tau))
        step.prepare(images, labels)
    except StepError as error:
        raise Unavailable(str(error)) from None
    return lambda: step(images, labels)
