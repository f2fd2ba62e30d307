"""The training step: Eq. 7's loss and its backward, gradient clipping and the AdamW update, run
one of three ways (`TrainConfig.step`, `aim-train --step`):

- "eager": operation by operation, as the Python code reaches it.
- "compile": forward, loss and backward compiled by `torch.compile` (static shapes; on CUDA
  `mode="reduce-overhead"`, which replays the compiled graphs as CUDA graphs, unless gradients
  accumulate). Clipping and the fused AdamW update stay eager: a few launches per step.
- "cuda-graph": the whole step, AdamW included, captured into one CUDA graph per batch shape and
  Gumbel-noise setting, then replayed (PyTorch's whole-network capture: static input buffers,
  warm-up on a side stream, `capturable=True`). The Gumbel noise is drawn inside the graph from
  torch's generator, so every replay draws fresh noise.

Every kind returns the step's statistics (`step_statistics`) as one vector on the device and
reads nothing back from it. Learning rates and the area target tau are tensors that the schedule
updates in place, so a compiled or captured step sees each new value without being rebuilt.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from aim_ext.engine.checkpoint import rng_state, set_rng_state
from aim_ext.engine.config import TrainConfig
from aim_ext.engine.distributed import World, unwrap
from aim_ext.losses import LossTerms, active_area, aim_loss
from aim_ext.models import AIMOutput

# The statistics vector of a step: these loss terms (each times the batch size), the number of
# correct predictions, each stage's mask area (times the batch size), then 1 if the loss was finite.
LOSS_KEYS = ("area_loss", "aux_ce", "final_ce", "loss")


class StepError(ValueError):
    """This kind of step cannot run this training; the message says why and what runs instead."""


def autocast(cfg: TrainConfig, device: torch.device, *, cache: bool = True):
    """Mixed precision on CUDA when asked for; full precision otherwise. A captured step turns the
    cast-weight cache off (PyTorch's CUDA-graph notes ask for it)."""
    if cfg.amp == "none" or device.type != "cuda":
        return nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[cfg.amp]
    return torch.autocast("cuda", dtype=dtype, cache_enabled=cache)


def check_step(
    cfg: TrainConfig, device: torch.device, world_size: int = 1, images: int | None = None
) -> None:
    """Refuse, before anything trains, a step kind this run cannot use (`images`: the size of the
    training split, when known)."""
    if cfg.step != "cuda-graph":
        return
    alternative = "use --step compile or --step eager"
    if device.type != "cuda":
        raise StepError(f"--step cuda-graph needs a CUDA device; this run is on {device.type}: {alternative}")
    if cfg.accum_steps > 1:
        raise StepError(
            f"--step cuda-graph replays one whole optimizer step per batch and cannot accumulate "
            f"gradients over {cfg.accum_steps} batches: {alternative}, or --accum-steps 1"
        )
    if cfg.amp == "fp16":
        raise StepError(
            "--step cuda-graph does not capture the fp16 grad scaler (its scale and bookkeeping "
            f"change from step to step in Python): use --amp bf16, which needs none, or {alternative}"
        )
    if world_size > 1:
        raise StepError(
            f"--step cuda-graph is not available with {world_size} processes (DistributedDataParallel "
            f"needs its own capture recipe): {alternative}"
        )
    if images is not None and images // world_size < cfg.batch_size // world_size:
        raise StepError(
            f"--step cuda-graph needs batches of one size: the training split's {images} images make "
            f"one short batch of a batch size of {cfg.batch_size}: {alternative}, or a smaller batch size"
        )


@dataclass
class StepContext:
    """What a training step works on."""

    model: nn.Module  # wrapped in DistributedDataParallel in a distributed run
    optimizer: torch.optim.Optimizer
    cfg: TrainConfig
    device: torch.device
    scaler: torch.amp.GradScaler | None = None
    world: World = field(default_factory=World)
    tau: Tensor | None = None  # the area target of this epoch, updated in place; None: no area loss


def step_statistics(terms: LossTerms, output: AIMOutput | Tensor, labels: Tensor) -> Tensor:
    """One float64 vector on the device: LOSS_KEYS times the batch size, correct predictions, each
    stage's mask area times the batch size, and 1.0 if the loss was finite (else 0.0)."""
    batch = labels.shape[0]
    logits = output.logits if isinstance(output, AIMOutput) else output
    values = [terms.area, terms.aux_ce, terms.final_ce, terms.total]  # LOSS_KEYS' order
    values = [v.detach().double() * batch for v in values]
    values.append((logits.detach().argmax(1) == labels).sum().double())
    if isinstance(output, AIMOutput):
        values += [active_area(mask.detach()).double() * batch for mask in output.masks]
    values.append(torch.isfinite(terms.total.detach()).double())
    return torch.stack(values)


def forward_backward(
    ctx: StepContext, images: Tensor, labels: Tensor, group_size: int = 1, *, autocast_cache: bool = True
) -> Tensor:
    """Forward, Eq. 7 and backward of one micro-batch (its loss divided by the accumulation group's
    size); returns `step_statistics`. A non-finite loss is not checked here (that would wait for
    the device): the statistics record it and `optimizer_step` skips the update it would cause."""
    cfg = ctx.cfg
    with autocast(cfg, ctx.device, cache=autocast_cache):
        output = ctx.model(images)
        terms = aim_loss(
            output,
            labels,
            ctx.tau,
            area_weight=cfg.area_weight,
            label_smoothing=cfg.label_smoothing,
            sum_over_batch=ctx.world.sum_over_batch(),
            aux_weight=cfg.aux_weight,
            area_per_image=cfg.area_per_image,
        )
    loss = terms.total / group_size
    (ctx.scaler.scale(loss) if ctx.scaler else loss).backward()
    return step_statistics(terms, output, labels)


def optimizer_step(ctx: StepContext) -> None:
    """Clip and update, leaving the gradients. Gradients that are not finite (from a non-finite
    loss, on any process of a distributed run) make the fused AdamW skip the update on the device
    (`found_inf`), with no read back; under fp16 the grad scaler does the same."""
    optimizer, scaler = ctx.optimizer, ctx.scaler
    if scaler:
        scaler.unscale_(optimizer)
    params = [p for p in ctx.model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if ctx.cfg.grad_clip:
        torch.nn.utils.clip_grads_with_norm_(params, ctx.cfg.grad_clip, norm)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.found_inf = (~torch.isfinite(norm)).float()
        optimizer.step()


class EagerStep:
    """`step(images, labels, group_size, closes_group)`: forward and backward of a micro-batch, and
    the update when it closes its accumulation group; returns `step_statistics`."""

    def __init__(self, ctx: StepContext) -> None:
        self.ctx = ctx

    def prepare(self, images: Tensor, labels: Tensor) -> None:
        """Nothing to build ahead of the first step."""

    def forward_backward(self, images: Tensor, labels: Tensor, group_size: int) -> Tensor:
        return forward_backward(self.ctx, images, labels, group_size)

    def __call__(
        self, images: Tensor, labels: Tensor, group_size: int = 1, closes_group: bool = True
    ) -> Tensor:
        stats = self.forward_backward(images, labels, group_size)
        if closes_group:
            optimizer_step(self.ctx)
            self.ctx.optimizer.zero_grad(set_to_none=True)
        return stats


class CompiledStep(EagerStep):
    """Forward, loss and backward through `torch.compile` with static shapes (one compilation per
    batch shape and Gumbel-noise setting); the update as in the eager step. On CUDA the compiled
    graphs are replayed as CUDA graphs (`mode="reduce-overhead"`), except under gradient
    accumulation: a replay reuses its output memory, and the gradients of one micro-batch must
    outlive the next."""

    def __init__(self, ctx: StepContext) -> None:
        super().__init__(ctx)
        self.graphs = ctx.device.type == "cuda" and ctx.cfg.accum_steps == 1

        def run(images: Tensor, labels: Tensor, group_size: int) -> Tensor:
            return forward_backward(ctx, images, labels, group_size)

        self._compiled = torch.compile(run, dynamic=False, mode="reduce-overhead" if self.graphs else None)

    def forward_backward(self, images: Tensor, labels: Tensor, group_size: int) -> Tensor:
        if self.graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs are consumed
        return self._compiled(images, labels, group_size).clone()


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    images: Tensor  # static input buffers: each replay reads the batch copied here
    labels: Tensor
    stats: Tensor  # static output, overwritten by the next replay


class GraphStep:
    """The whole step captured into a CUDA graph per (batch shape, Gumbel noise on or off), after
    `WARMUP` eager steps on a side stream that are then rolled back, so that no update of the
    warm-up reaches training; each call copies its batch into the graph's buffers and replays it.
    Only the latest graph is kept (the noise setting changes once, at `noise_off_epoch`)."""

    WARMUP = 3

    def __init__(self, ctx: StepContext) -> None:
        self.ctx = ctx
        self._graphs: dict[tuple, _Captured] = {}

    def _key(self, images: Tensor, labels: Tensor) -> tuple:
        noise = getattr(unwrap(self.ctx.model), "gumbel_noise", None)
        return (tuple(images.shape), images.dtype, images.stride(), tuple(labels.shape), noise)

    def prepare(self, images: Tensor, labels: Tensor) -> None:
        """Capture now (raising StepError if the step cannot be captured), before training starts."""
        self._graph(images, labels)

    def _graph(self, images: Tensor, labels: Tensor) -> _Captured:
        key = self._key(images, labels)
        if key not in self._graphs:
            self._graphs.clear()  # free the previous graph's memory before capturing the next
            self._graphs[key] = self._capture(images, labels)
        return self._graphs[key]

    def _capture(self, images: Tensor, labels: Tensor) -> _Captured:
        ctx = self.ctx
        static_images, static_labels = images.clone(), labels.clone()

        def whole_step() -> Tensor:
            stats = forward_backward(ctx, static_images, static_labels, autocast_cache=False)
            optimizer_step(ctx)
            return stats

        graph = torch.cuda.CUDAGraph()
        with rolled_back(unwrap(ctx.model), ctx.optimizer):
            side = torch.cuda.Stream(ctx.device)
            side.wait_stream(torch.cuda.current_stream(ctx.device))
            with torch.cuda.stream(side):  # cuDNN and cuBLAS choose their algorithms here
                for _ in range(self.WARMUP):
                    ctx.optimizer.zero_grad(set_to_none=True)
                    whole_step()
            torch.cuda.current_stream(ctx.device).wait_stream(side)
            # Gradients set to None: backward allocates them in the graph's pool, and every
            # replay writes them anew instead of adding to them.
            ctx.optimizer.zero_grad(set_to_none=True)
            previous = torch.cuda.current_stream(ctx.device)
            try:
                with torch.cuda.graph(graph):
                    stats = whole_step()
            except RuntimeError as error:
                # A capture that failed inside leaves the capture stream current and the graph
                # half-made (torch.cuda.graph's exit stops at capture_end): undo both.
                torch.cuda.set_stream(previous)
                with suppress(RuntimeError):
                    graph.reset()
                raise StepError(
                    f"--step cuda-graph cannot capture this training step ({_first_cause(error)}): "
                    "use --step compile or --step eager"
                ) from None
        return _Captured(graph, static_images, static_labels, stats)

    def __call__(
        self, images: Tensor, labels: Tensor, group_size: int = 1, closes_group: bool = True
    ) -> Tensor:
        captured = self._graph(images, labels)
        captured.images.copy_(images, non_blocking=True)
        captured.labels.copy_(labels, non_blocking=True)
        captured.graph.replay()
        return captured.stats


def _first_cause(error: BaseException) -> str:
    """The first line of the error that started a chain (a failed capture's own error comes last)."""
    while error.__context__ is not None:
        error = error.__context__
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


@contextmanager
def rolled_back(model: nn.Module, optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Whatever steps run inside leave the model's parameters and buffers, AdamW's state and the
    random generators as they were on entry, each tensor restored in place (a captured graph keeps
    their addresses). AdamW state created inside is zeroed: its state before a first step."""
    weights = {name: t.detach().clone() for name, t in model.state_dict().items()}
    moments = {
        p: {k: v.detach().clone() for k, v in optimizer.state[p].items() if isinstance(v, Tensor)}
        for group in optimizer.param_groups
        for p in group["params"]
        if p in optimizer.state
    }
    generators = rng_state()
    try:
        yield
    finally:
        with torch.no_grad():
            for name, tensor in model.state_dict().items():
                tensor.copy_(weights[name])
            for group in optimizer.param_groups:
                for p in group["params"]:
                    saved = moments.get(p, {})
                    for key, value in optimizer.state.get(p, {}).items():
                        if isinstance(value, Tensor) and key in saved:
                            value.copy_(saved[key])
                        elif isinstance(value, Tensor):
                            value.zero_()
        set_rng_state(generators)


STEPS = {"eager": EagerStep, "compile": CompiledStep, "cuda-graph": GraphStep}


def build_step(ctx: StepContext) -> EagerStep | GraphStep:
    """The step of kind `ctx.cfg.step` (checked with `check_step` first)."""
    check_step(ctx.cfg, ctx.device, ctx.world.size)
    return STEPS[ctx.cfg.step](ctx)


def use_tensor_learning_rates(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Each group's learning rate as a float32 tensor on `device`, which the schedule then fills in
    place (`torch.optim.lr_scheduler` does so for tensor rates). Call it again after loading an
    optimizer state, which brings its own values."""
    for group in optimizer.param_groups:
        lr = group["lr"]
        value = float(lr) if not isinstance(lr, Tensor) else lr.detach().to("cpu", torch.float64).item()
        group["lr"] = torch.tensor(value, dtype=torch.float32, device=device)
