"""One training step (forward, loss, backward, AdamW step) of a model, eager or compiled.

AIM models use the paper's loss (Eq. 7, tau 0.25, Gumbel noise on); vanilla models smoothed
cross-entropy. Reduced precision is autocast here, as training runs it (weights stay float32).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from aim_ext.bench.runtimes import Setting, Unavailable, compile_static
from aim_ext.losses import aim_loss


def prepare_train_step(model: nn.Module, s: Setting, *, compiled: bool) -> Callable[[], object]:
    if s.dtype == torch.float16 and s.device != "cuda":
        raise Unavailable("float16 autocast training runs on CUDA only")
    model = model.to(s.device).train()
    if s.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = s.image().float()
    labels = torch.randint(0, model.num_classes, (s.batch,), generator=torch.Generator().manual_seed(0))
    labels = labels.to(s.device)
    forward = compile_static(model) if compiled else model
    autocast = (
        torch.autocast(s.device, dtype=s.dtype) if s.dtype != torch.float32 else contextlib.nullcontext()
    )

    def step():
        with autocast:
            loss = aim_loss(forward(images), labels, tau=0.25).total
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    return step
