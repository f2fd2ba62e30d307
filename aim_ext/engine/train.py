"""The training loop: one epoch, evaluation on a split, and `fit` with checkpoints and exact resume."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import random
import shutil
import signal
import threading
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm.auto import tqdm

from aim_ext.cache import remove_partials, write_atomic
from aim_ext.data import eval_preprocessing
from aim_ext.engine.build import pretrained_weights
from aim_ext.engine.checkpoint import rng_state, save_atomic, set_rng_state
from aim_ext.engine.config import TrainConfig
from aim_ext.engine.distributed import World, unwrap
from aim_ext.engine.freeze import freeze_levels, keep_frozen_in_eval
from aim_ext.engine.optim import build_optimizer, build_scheduler, load_optimizer_state
from aim_ext.engine.records import flatten
from aim_ext.engine.step import (
    LOSS_KEYS,
    EagerStep,
    GraphStep,
    StepContext,
    autocast,
    build_step,
    check_step,
    use_tensor_learning_rates,
)
from aim_ext.engine.tensorboard import TENSORBOARD_FOLDER, TensorBoardLog, require_tensorboard
from aim_ext.losses import AreaSchedule, area_target
from aim_ext.metrics import classification_metrics, mask_areas
from aim_ext.models import (
    MaskingModel,
    architecture,
    is_inference_only,
    load_checkpoint,
    load_model,
    load_model_state,
    save_pretrained,
)
from aim_ext.models.saved import RUN_MODEL_FOLDER


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is untouched."""


class ResumeError(ValueError):
    """`--resume` cannot continue this run (another recipe, process count or aim-ext); nothing changed."""


class TrainingInterrupted(Exception):
    """SIGTERM or SIGINT (Ctrl-C) stopped training at a safe point; `last.pt` holds the state that
    `--resume` continues from exactly. `where`: where it stopped; `signum`: the signal's number."""

    def __init__(self, where: str, signum: int, out: Path) -> None:
        resume = f"{out / 'last.pt'} holds the state: `aim-train --resume --out {out}` continues exactly"
        super().__init__(f"{where}; {resume}")
        self.where = where
        self.signum = signum


class StopSignals:
    """SIGTERM and SIGINT ask training to stop at the next safe point: the end of the current
    optimizer step, or the checkpoint of an epoch that is already ending. A second signal stops at
    once (every file is written atomically, so `--resume` then continues from the last checkpoint).
    Handlers are installed only in the main thread, and the previous ones come back on exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, log: callable = print) -> None:
        self.signum: int | None = None
        self.agreed = False
        self._log = log
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *_: Any) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.signum is not None:
            self.__exit__()
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            os.kill(os.getpid(), signum)  # the previous handler: by default the end of the process
            return
        self.signum = signum
        self._log(
            f"{signal.Signals(signum).name}: stopping at the end of this step "
            f"({signal.Signals(signum).name} again stops at once)"
        )

    def requested(self, world: World, agree: bool) -> bool:
        """Whether to stop. Alone, at once; in a distributed run only where every process calls it
        with `agree` (there the processes add up their flags), so that all stop at the same step."""
        if world.size == 1:
            return self.signum is not None
        if agree and not self.agreed:
            self.agreed = world.sum([float(self.signum is not None)])[0] > 0
        return self.agreed

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "a signal to another process"


class _StoppedMidEpoch(Exception):
    """Raised by train_one_epoch at a safe point inside an epoch; `_fit` checkpoints `position`."""

    def __init__(self, position: dict[str, Any]) -> None:
        super().__init__(position)
        self.position = position


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def area_schedule(cfg: TrainConfig) -> AreaSchedule | None:
    if cfg.area_final is None:
        return None
    final = tuple(cfg.area_final_stages) if cfg.area_final_stages else cfg.area_final
    return AreaSchedule(final=final, start=cfg.area_start, duration=cfg.area_schedule_duration())


def area_targets_shape(cfg: TrainConfig, model: nn.Module) -> tuple[int, ...] | None:
    """The shape of the run's tau tensor: () for one target, (stages,) for one per stage; None
    without annealing. Raises ValueError when the per-stage targets do not match the model."""
    if cfg.area_final is None:
        return None
    if not cfg.area_final_stages:
        return ()
    stages = len(unwrap(model).stage_indices) if isinstance(unwrap(model), MaskingModel) else 0
    if len(cfg.area_final_stages) != stages:
        raise ValueError(
            f"area_final_stages has {len(cfg.area_final_stages)} values; this model masks {stages} stages"
        )
    return (stages,)


def annealing_warnings(cfg: TrainConfig) -> list[str]:
    """What a user should know before training: the run ends before tau reaches its final value,
    or selects a checkpoint before it does (dense masks may then be the ones kept)."""
    schedule = area_schedule(cfg)
    if cfg.stop_stage is None or schedule is None:
        return []
    end, last = schedule.start + schedule.duration, cfg.epochs - 1
    found = []
    if end > last:
        found.append(
            f"tau reaches its final value at epoch {end}, after the last epoch ({last}): the run ends "
            f"mid-annealing, at tau {_rounded(schedule(last))}"
        )
    if (cfg.select_from or 0) < min(end, last):
        found.append(
            f"best.pt may come from before tau holds its final value (epoch {end}), with denser masks: "
            f"--select-from {min(end, last)} selects only from then on"
        )
    return found


def _rounded(tau: float | tuple[float, ...]) -> str:
    return ", ".join(f"{t:.4g}" for t in (tau if isinstance(tau, tuple) else (tau,)))


def set_gumbel_for_epoch(model: nn.Module, cfg: TrainConfig, epoch: int) -> None:
    """The Gumbel temperature, and noise until `noise_off_epoch`."""
    if isinstance(model, MaskingModel):
        noise = cfg.noise_off_epoch is None or epoch < cfg.noise_off_epoch
        model.set_gumbel(temperature=cfg.temperature, noise=noise)


def loader(
    dataset: Dataset, cfg: TrainConfig, *, shuffle: bool, epoch: int = 0, world: World | None = None
) -> DataLoader:
    """Training batches whose order and worker seeds depend only on (seed, epoch), so that resume
    replays them. Training always draws through a DistributedSampler (a world of one included):
    each of N processes gets every N-th sample of the same permutation, so N processes with batch
    B / N see exactly the global batches of one process with batch B."""
    world = world or World()
    generator = torch.Generator()
    generator.manual_seed((cfg.seed * 1_000_003 + epoch) * 1009 + world.rank)
    sampler = None
    batch_size = cfg.batch_size
    if shuffle:
        if cfg.batch_size % world.size:
            raise ValueError(f"batch size {cfg.batch_size} does not split over {world.size} processes")
        batch_size = cfg.batch_size // world.size
        sampler = DistributedSampler(
            dataset, num_replicas=world.size, rank=world.rank, shuffle=True, seed=cfg.seed, drop_last=True
        )
        sampler.set_epoch(epoch)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=shuffle and len(dataset) // world.size > batch_size,
        num_workers=cfg.num_workers,
        generator=generator,
        persistent_workers=False,
    )


def _steps(loader_: DataLoader, cfg: TrainConfig) -> int:
    steps = len(loader_)
    return min(steps, cfg.max_steps_per_epoch) if cfg.max_steps_per_epoch else steps


def train_one_epoch(
    step: EagerStep | GraphStep,
    data: DataLoader,
    scheduler,
    cfg: TrainConfig,
    epoch: int,
    world: World | None = None,
    *,
    position: dict[str, Any] | None = None,
    stop: StopSignals | None = None,
) -> dict[str, Any]:
    """One pass over the training data with `step` (`aim_ext.engine.step`); returns the mean loss
    terms, accuracy and mask areas (over all processes of a distributed run). `position`: a
    mid-epoch checkpoint's, to continue this epoch after its `step` micro-batches exactly. `stop`:
    when it asks, raise `_StoppedMidEpoch` at the end of an optimizer step."""
    world = world or World()
    ctx = step.ctx
    model = ctx.model
    model.train()
    keep_frozen_in_eval(model)
    set_gumbel_for_epoch(unwrap(model), cfg, epoch)
    tau = area_target(area_schedule(cfg), epoch)
    if ctx.tau is not None:
        ctx.tau.copy_(torch.as_tensor(tau))  # in place: a compiled or captured step reads the new value
    steps = _steps(data, cfg)
    names = [g.get("name", str(i)) for i, g in enumerate(ctx.optimizer.param_groups)]
    lrs = {name: float(lr) for name, lr in zip(names, scheduler.get_last_lr(), strict=True)}  # epoch's first
    running = RunningStats(ctx.device)
    ctx.optimizer.zero_grad(set_to_none=True)
    batches, skip = iter(data), 0
    if position is not None:
        # The micro-batches already trained on are loaded again and dropped, which replays the
        # loader workers' random streams; then this process's generators are those of the stop.
        skip, lrs = position["step"], position["lr"]
        running.restore(position["running"][world.rank], ctx.device)
        for _ in range(skip):
            next(batches)
        set_rng_state(position["rng"][world.rank])
    bar = tqdm(batches, total=steps, initial=skip, desc=f"epoch {epoch}", leave=False, disable=None)
    for index, batch in enumerate(bar, start=skip):
        if index >= steps:
            break
        images, labels = _inputs(batch, cfg, ctx.device)
        group_start = index - index % cfg.accum_steps
        group_size = min(cfg.accum_steps, steps - group_start)  # the last group may be shorter
        closes_group = index + 1 == group_start + group_size
        # DDP all-reduces gradients only on the micro-batch that closes an accumulation group.
        sync = nullcontext() if closes_group or world.size == 1 else model.no_sync()
        with sync:
            stats = step(images, labels, group_size, closes_group)  # skips a non-finite update
        running.add(index, stats, len(labels))
        if closes_group:
            scheduler.step()  # per optimizer step, not per micro-batch
        at_log = (index + 1) % cfg.log_every == 0
        if at_log:
            totals = _checked(running.read(world), epoch)  # the only device-to-host read of the loop
            bar.set_postfix(
                loss=f"{totals['loss'] / totals['seen']:.3f}", acc=f"{totals['correct'] / totals['seen']:.3f}"
            )
        # A stop in the epoch's last step waits for its checkpoint instead.
        if stop is not None and stop.requested(world, at_log) and closes_group and index + 1 < steps:
            _checked(running.read(world), epoch)
            raise _StoppedMidEpoch(
                {"epoch": epoch, "step": index + 1, "steps": steps, "lr": lrs, "running": running.state()}
            )
    totals = _checked(running.read(world), epoch)
    seen = max(totals["seen"], 1)
    stats = {key: totals[key] / seen for key in LOSS_KEYS}
    stats["train_acc"] = totals["correct"] / seen
    stats["mask_area"] = [value / seen for value in totals["areas"]]
    stats["tau"] = tau
    stats["lr"] = lrs
    if not all(torch.isfinite(p).all() for p in unwrap(model).parameters()):
        raise TrainingError(
            f"non-finite weights after epoch {epoch}: not checkpointed; the last checkpoint is good"
        )
    return stats


def _checked(totals: dict[str, Any], epoch: int) -> dict[str, Any]:
    """`RunningStats.read`'s totals, or the error naming the first step whose loss was not finite."""
    if totals["bad_step"] >= 0:
        raise TrainingError(
            f"non-finite loss at epoch {epoch}, step {totals['bad_step']}: stopping; "
            "the last checkpoint is the last good state"
        )
    return totals


class RunningStats:
    """The epoch's `step_statistics` summed on the device, and the first step whose loss was not
    finite: a training step reads nothing back; `read` does, once per logging interval."""

    def __init__(self, device: torch.device) -> None:
        self.sums: Tensor | None = None  # LOSS_KEYS, correct, then one area per stage
        self.bad_step = torch.full((), -1, dtype=torch.int64, device=device)
        self.seen = 0

    def add(self, step: int, stats: Tensor, batch: int) -> None:
        """`stats` may be a captured graph's output, which its next replay overwrites: it is added
        here, on the stream of the step, before that."""
        if self.sums is None:
            self.sums = torch.zeros_like(stats[:-1])
        self.sums += stats[:-1]
        finite = stats[-1] > 0
        self.bad_step = torch.where(finite | (self.bad_step >= 0), self.bad_step, step)
        self.seen += batch

    def read(self, world: World) -> dict[str, Any]:
        """The sums over every process of a distributed run, and the first bad step (-1: none)."""
        sums = [] if self.sums is None else self.sums.tolist()
        totals = world.sum([*sums, self.seen])
        n = len(LOSS_KEYS)
        out: dict[str, Any] = dict(zip(LOSS_KEYS, totals[:n] if sums else [0.0] * n, strict=True))
        out["correct"] = totals[n] if sums else 0.0
        out["areas"] = totals[n + 1 : len(sums)]
        out["seen"] = totals[len(sums)]
        bad = [b for b in world.gather(int(self.bad_step)) if b >= 0]
        out["bad_step"] = min(bad) if bad else -1
        return out

    def state(self) -> dict[str, Any]:
        """This process's sums so far, for a mid-epoch checkpoint."""
        sums = None if self.sums is None else self.sums.cpu()
        return {"sums": sums, "bad_step": int(self.bad_step), "seen": self.seen}

    def restore(self, state: dict[str, Any], device: torch.device) -> None:
        self.sums = None if state["sums"] is None else state["sums"].to(device)
        self.bad_step = torch.full((), state["bad_step"], dtype=torch.int64, device=device)
        self.seen = state["seen"]


def _inputs(batch: dict, cfg: TrainConfig, device: torch.device) -> tuple[Tensor, Tensor]:
    images = batch["image"].to(device, non_blocking=True)
    if cfg.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, batch["label"].to(device, non_blocking=True)


@torch.no_grad()
def predict_split(
    model: nn.Module, data: Iterable, cfg: TrainConfig, device: torch.device
) -> dict[str, Tensor]:
    """Labels, predictions, groups and per-stage mask areas of every sample of a split."""
    model.eval()
    labels, preds, groups, areas = [], [], [], []
    for batch in tqdm(data, desc="evaluate", leave=False, disable=None):
        images, target = _inputs(batch, cfg, device)
        with autocast(cfg, device):
            if isinstance(model, MaskingModel):
                logits, masks = model.predict(images)
                areas.append(mask_areas(masks).cpu())
            else:
                logits = model(images)
        labels.append(target.cpu())
        preds.append(logits.argmax(1).cpu())
        if "group" in batch:
            groups.append(batch["group"])
    result = {"label": torch.cat(labels), "pred": torch.cat(preds)}
    if groups:
        result["group"] = torch.cat(groups)
    if areas:
        result["mask_area"] = torch.cat(areas)
    return result


def split_metrics(pred: dict[str, Tensor], prefix: str) -> dict[str, Any]:
    """Accuracy, per-group and worst-group accuracy where the split has groups, and mask areas,
    named `<prefix>_acc`, `<prefix>_worst_group_acc`, ..."""
    found = classification_metrics(pred["pred"], pred["label"], pred.get("group"))
    metrics: dict[str, Any] = {f"{prefix}_acc": found["avg_acc"]}
    if "group_acc" in found:
        metrics[f"{prefix}_group_acc"] = found["group_acc"]
        metrics[f"{prefix}_worst_group_acc"] = found["worst_group_acc"]
    if "mask_area" in pred:
        metrics[f"{prefix}_mask_area"] = pred["mask_area"].mean(0).tolist()
    return metrics


def collapsed_class(pred: dict[str, Tensor]) -> int | None:
    """The single class every prediction falls into, when the classifier has collapsed."""
    classes = pred["pred"].unique()
    return int(classes[0]) if len(classes) == 1 and len(pred["label"].unique()) > 1 else None


def selection_key(metrics: dict[str, Any]) -> float:
    """Model selection on validation: worst-group accuracy where there are groups, else accuracy."""
    return metrics.get("val_worst_group_acc", metrics["val_acc"])


def fit(
    cfg: TrainConfig,
    train_set: Dataset,
    val_set: Dataset,
    model: nn.Module,
    *,
    resume: bool = False,
    log: callable = print,
) -> dict[str, Any]:
    """Train with the recipe of `cfg`, select on validation, write the run folder; returns the best
    validation metrics. With `resume`, continue exactly where `out/last.pt` stopped. Under torchrun
    it trains with DistributedDataParallel; rank 0 evaluates and writes every file."""
    if is_inference_only(model):
        raise ValueError(
            f"fit: this {architecture(model)} model cannot train (its BatchNorms are folded); "
            "train the model before aim_ext.fuse_for_inference"
        )
    out = Path(cfg.out)
    device = resolve_device(cfg.device)
    world = World.from_env(device.type)
    try:
        if device.type == "cuda" and world.size > 1:
            device = torch.device("cuda", world.local_rank)
            torch.cuda.set_device(device)
        if not world.is_main:
            log = _silent
        check_step(cfg, device, world.size, len(train_set))  # before anything is written or trained
        if cfg.log == "tensorboard":
            require_tensorboard()
        for warning in annealing_warnings(cfg):
            log(f"warning: {warning}")
        return _fit(cfg, train_set, val_set, model, out, device, world, resume, log)
    finally:
        world.close()


def _fit(
    cfg, train_set, val_set, model, out: Path, device, world: World, resume: bool, log
) -> dict[str, Any]:
    # Every generator that rng_state() keeps, so that two runs of one config write the same last.pt.
    torch.manual_seed(cfg.seed + world.rank)
    random.seed(cfg.seed + world.rank)
    np.random.seed(cfg.seed + world.rank)
    freeze_levels(model, cfg.freeze_levels)
    if isinstance(model, MaskingModel):  # aux_weight 0: the auxiliary heads are not computed at all
        model.set_aux_heads(cfg.aux_weight != 0)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg)
    micro_batches = _steps(loader(train_set, cfg, shuffle=True, world=world), cfg)
    scheduler = build_scheduler(optimizer, cfg, math.ceil(micro_batches / cfg.accum_steps))
    scaler = torch.amp.GradScaler("cuda") if cfg.amp == "fp16" and device.type == "cuda" else None
    start, best, position = 0, {"key": -math.inf, "metrics": None}, None
    if resume and (out / "last.pt").exists():
        start, best, position = _restore(out / "last.pt", model, optimizer, scheduler, scaler, world, cfg)
        within = f", step {position['step']} of {position['steps']}" if position else ""
        log(f"resumed from {out / 'last.pt'} at epoch {start}{within}")
    use_tensor_learning_rates(optimizer, device)  # after a restore, which brings its own values
    trained = model
    if world.size > 1:
        ids = [device.index] if device.type == "cuda" else None
        trained = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    shape = area_targets_shape(cfg, model)
    tau = torch.ones(shape, device=device) if shape is not None else None
    step = build_step(StepContext(trained, optimizer, cfg, device, scaler, world, tau))
    if start < cfg.epochs:  # a step that cannot be captured fails here, before the folder changes
        _prepare_step(step, train_set, cfg, start, world)
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
        _prepare_run_folder(out, start if resume else 0)
        write_atomic(out / "config.yaml", yaml.safe_dump(_plain(cfg.to_dict()), sort_keys=False).encode())
    val_loader = loader(val_set, cfg, shuffle=False)
    fixed = _fixed_batch(val_set, cfg) if world.is_main else None
    board = TensorBoardLog(out, start) if world.is_main and cfg.log == "tensorboard" else None
    run = _RunState(model, optimizer, scheduler, scaler, cfg, device, out, log, val_loader, fixed, board)
    try:
        with StopSignals(log) as stop:
            for epoch in range(start, cfg.epochs):
                data = loader(train_set, cfg, shuffle=True, epoch=epoch, world=world)
                try:
                    stats = train_one_epoch(
                        step, data, scheduler, cfg, epoch, world, position=position, stop=stop
                    )
                except _StoppedMidEpoch as stopped:
                    _stop_mid_epoch(run, stopped.position, best, world, stop)
                position = None
                rngs = world.gather(rng_state())
                if world.is_main:
                    best = _end_of_epoch(run, epoch, stats, rngs, best)
                world.barrier()  # the other processes wait for the checkpoint
                if epoch + 1 < cfg.epochs and stop.requested(world, agree=True):
                    raise TrainingInterrupted(
                        f"stopped by {stop.name} after epoch {epoch}", stop.signum or signal.SIGTERM, out
                    )
            if world.is_main and (out / "best.pt").is_file():  # a signal now lets it finish
                _save_model(out, train_set, cfg, best)
    finally:
        if board is not None:
            board.close()
    return best["metrics"] or {}


def _stop_mid_epoch(run: _RunState, position: dict, best: dict, world: World, stop: StopSignals) -> None:
    """Checkpoint the state at a safe point inside an epoch (every process's generators and running
    sums), then raise TrainingInterrupted."""
    position = {**position, "rng": world.gather(rng_state()), "running": world.gather(position["running"])}
    if world.is_main:
        state = _training_state(run, position["epoch"] - 1, best, position["rng"])
        save_atomic({**state, "position": position}, run.out / "last.pt")
    world.barrier()
    raise TrainingInterrupted(
        f"stopped by {stop.name} in epoch {position['epoch']} after step {position['step']} "
        f"of {position['steps']}",
        stop.signum or signal.SIGTERM,
        run.out,
    )


def _save_model(out: Path, train_set: Dataset, cfg: TrainConfig, best: dict) -> None:
    """The selected model as a saved-model folder (`out/model`): what load_model, aim-eval,
    aim-export and aim-explain take, with the class names and the validation metrics."""
    metrics = _plain(best["metrics"] or {})
    summary = {
        "dataset": cfg.dataset,
        "epochs": cfg.epochs,
        "selected_epoch": metrics.get("epoch"),
        "image_size": cfg.image_size,
        "pretrained": pretrained_weights(cfg),
    }
    validation = {k: v for k, v in metrics.items() if k.startswith("val_")}
    save_pretrained(
        load_model(out / "best.pt"),
        out / RUN_MODEL_FOLDER,
        labels=getattr(train_set, "classes", None),
        metrics=validation,
        training=summary,
        image_size=cfg.image_size,
        **eval_preprocessing(cfg.dataset),  # the framing of the images it was evaluated on
    )


def _prepare_step(
    step: EagerStep | GraphStep, train_set: Dataset, cfg: TrainConfig, epoch: int, world: World
) -> None:
    """Build the step ahead of training where its kind does (a CUDA graph is captured here, so a
    step that cannot be captured fails before the first update), on a batch of zeros of the
    training batches' shape. Reading the example image leaves every random generator as it was."""
    generators = rng_state()
    shape = train_set[0]["image"].shape
    set_rng_state(generators)
    ctx = step.ctx
    ctx.model.train()
    keep_frozen_in_eval(ctx.model)
    set_gumbel_for_epoch(unwrap(ctx.model), cfg, epoch)
    images = torch.zeros(cfg.batch_size // world.size, *shape, device=ctx.device)
    if cfg.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    step.prepare(images, torch.zeros(len(images), dtype=torch.int64, device=ctx.device))


def _prepare_run_folder(out: Path, start: int) -> None:
    """A fresh run (start 0) leaves nothing of an earlier run in the folder; a resumed one keeps
    the metrics of the epochs before `start` only (a crash after the log line, before the
    checkpoint, would otherwise leave a duplicate). Either way the temporary files of writes that
    a killed run left half done go."""
    for folder in (out, out / "masks", out / RUN_MODEL_FOLDER):
        remove_partials(folder)
    metrics = out / "metrics.jsonl"
    if start == 0:
        metrics.unlink(missing_ok=True)
        (out / "summary.csv").unlink(missing_ok=True)
        for name in ("best.pt", "last.pt"):
            (out / name).unlink(missing_ok=True)
        for snapshot in (out / "masks").glob("epoch_*.pt"):
            snapshot.unlink()
        shutil.rmtree(out / RUN_MODEL_FOLDER, ignore_errors=True)
        shutil.rmtree(out / TENSORBOARD_FOLDER, ignore_errors=True)
        return
    if metrics.exists():
        kept = [line for line in metrics.read_text().splitlines() if json.loads(line)["epoch"] < start]
        write_atomic(metrics, "".join(line + "\n" for line in kept).encode())


@dataclass
class _RunState:
    """What rank 0 needs at the end of every epoch."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    cfg: TrainConfig
    device: torch.device
    out: Path
    log: Any
    val_loader: DataLoader
    fixed: Tensor | None
    board: TensorBoardLog | None = None


def _end_of_epoch(run: _RunState, epoch: int, stats: dict, rngs: list, best: dict) -> dict:
    """Validate, log, select and checkpoint (rank 0); returns the best record so far."""
    model, cfg = run.model, run.cfg
    device, out, log = run.device, run.out, run.log
    val = predict_split(model, run.val_loader, cfg, device)
    metrics = {"epoch": epoch, **stats, **split_metrics(val, "val")}
    collapsed = collapsed_class(val)
    if collapsed is not None:
        metrics["collapsed_to_class"] = collapsed
        log(
            f"warning: epoch {epoch}: every validation prediction is class {collapsed} "
            "(the classifier collapsed; a lower learning rate usually helps)"
        )
    key = selection_key(metrics)
    selectable = cfg.select_from is None or epoch >= cfg.select_from
    is_best = selectable and key > best["key"]
    if is_best:
        best = {"key": key, "metrics": metrics}
    masks = _log_masks(model, run.fixed, cfg, epoch, device, out)
    state = _training_state(run, epoch, best, rngs)
    # The records first, then the checkpoints: a run that stops between them resumes before this
    # epoch, and the resumed run drops the epoch's records (metrics.jsonl) or purges them (TensorBoard).
    # metrics.jsonl is rewritten whole, atomically: a kill never leaves half a line.
    records = out / "metrics.jsonl"
    earlier = records.read_text() if records.exists() else ""
    write_atomic(records, (earlier + json.dumps(_plain(metrics)) + "\n").encode())
    _write_summary(out)
    if run.board is not None:
        run.board.epoch(epoch, _plain(metrics))
        if masks is not None:
            run.board.masks(epoch, run.fixed, masks)
    if is_best:
        save_atomic({k: state[k] for k in ("architecture", "model", "epoch", "config")}, out / "best.pt")
    save_atomic(state, out / "last.pt")
    log(
        f"epoch {epoch}: loss {stats['loss']:.4f} train acc {stats['train_acc']:.3f} "
        f"val acc {metrics['val_acc']:.3f}"
        + (
            f" val worst-group {metrics['val_worst_group_acc']:.3f}"
            if "val_worst_group_acc" in metrics
            else ""
        )
        + (" (best)" if is_best else "")
    )
    return best


def _training_state(run: _RunState, epoch: int, best: dict, rngs: list) -> dict[str, Any]:
    """What `last.pt` holds after `epoch` (the last whole epoch trained)."""
    return {
        "architecture": architecture(run.model),
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict() if run.scaler else None,
        "epoch": epoch,
        "best": _plain(best),
        "rng": rngs,  # one state per process
        "config": _plain(run.cfg.to_dict()),
        "recipe_version": RECIPE_VERSION,
    }


def _write_summary(out: Path) -> None:
    """`summary.csv`, timm's per-epoch table, rewritten from metrics.jsonl (so a resumed run's is
    right too): one row per epoch, one column per number, lists and mappings spread out
    (`mask_area_0`, `lr_backbone`, `val_group_acc_3`)."""
    rows = [flatten(json.loads(line)) for line in (out / "metrics.jsonl").read_text().splitlines()]
    columns = list(dict.fromkeys(key for row in rows for key in row))
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(out / "summary.csv", table.getvalue().encode())


def _silent(*_: Any) -> None:
    pass


# Keys a resumed run must share with the run it continues: they fix the data order, the schedule
# and the model (the number of epochs shapes the cosine schedule too).
RESUME_KEYS = (
    "model",
    "stop_stage",
    "masking",
    "mask_estimators",
    "dataset",
    "data_root",
    "image_size",
    "batch_size",
    "accum_steps",
    "seed",
    "epochs",
    "warmup_epochs",
    "lr_backbone",
    "lr_topdown",
    "lr_mask",
    "weight_decay",
    "weight_decay_mask",
    "area_final",
    "area_start",
    "area_duration",
    "area_final_stages",
    "area_per_image",
    "freeze_levels",
    "select_from",
    "max_steps_per_epoch",
)


# Checkpoints written since the paper's tau schedule (1.0 at the start epoch) and the per-image
# area loss carry this; an older run resumes only where the newer code trains it as it did.
RECIPE_VERSION = 2


def _check_older_run(path: Path, state: dict, cfg: TrainConfig, start: int) -> None:
    """Refuse to resume a run written before RECIPE_VERSION where today's code would train it
    otherwise: tau one epoch behind while annealing, r_l per image, or the aux heads left out."""
    if state.get("recipe_version", 1) >= RECIPE_VERSION:
        return
    reasons = []
    if cfg.area_final is not None and start < cfg.area_start + cfg.area_schedule_duration():
        reasons.append("its tau schedule ran one epoch ahead and annealing is not over")
    if cfg.area_final is not None and cfg.area_per_image:
        reasons.append("it took r_l over the batch (resume with --no-area-per-image)")
    if cfg.aux_weight == 0:
        reasons.append("its optimizer still holds the auxiliary heads")
    if reasons:
        raise ResumeError(f"cannot resume {path}, written by an earlier aim-ext: " + "; ".join(reasons))


def _check_resume_config(path: Path, saved: dict, cfg: TrainConfig) -> None:
    current = _plain(cfg.to_dict())
    changed = [k for k in RESUME_KEYS if k in saved and saved[k] != current[k]]
    if "aux_weight" in saved and (saved["aux_weight"] == 0) != (current["aux_weight"] == 0):
        changed.append("aux_weight")  # 0 leaves the auxiliary heads out of the optimizer
    if changed:
        details = ", ".join(f"{k}: {saved[k]!r} -> {current[k]!r}" for k in changed)
        raise ResumeError(f"cannot resume {path} with a different {details}; start a new run instead")


def _restore(
    path: Path, model, optimizer, scheduler, scaler, world: World, cfg: TrainConfig
) -> tuple[int, dict, dict | None]:
    """Load `last.pt`; returns the epoch to start at, the best record so far and, for a checkpoint
    written inside an epoch, its position there (else None)."""
    try:
        state = load_checkpoint(path)
    except ValueError as error:  # empty, truncated or not a checkpoint: nothing to continue from
        raise ResumeError(f"--resume: {error}") from None
    _check_resume_config(path, state.get("config", {}), cfg)
    _check_older_run(path, state, cfg, state["epoch"] + 1)
    load_model_state(model, state, source=str(path))
    load_optimizer_state(optimizer, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    rngs = state["rng"]
    if len(rngs) != world.size:
        raise ResumeError(
            f"{path} was written by {len(rngs)} processes; resume it with as many, not {world.size}"
        )
    set_rng_state(rngs[world.rank])
    # _plain kept a key of -inf (nothing selected yet) as the string "-inf".
    best = {**state["best"], "key": float(state["best"]["key"])}
    return state["epoch"] + 1, best, state.get("position")


def _fixed_batch(val_set: Dataset, cfg: TrainConfig) -> Tensor | None:
    """The same few validation images every time, for the mask-evolution figure."""
    count = min(cfg.mask_log_images, len(val_set))
    return torch.stack([val_set[i]["image"] for i in range(count)]) if count else None


@torch.no_grad()
def _log_masks(model: nn.Module, fixed: Tensor | None, cfg, epoch: int, device, out: Path) -> list | None:
    """Save the fixed batch's masks every `mask_log_every` epochs and at the last; returns them
    (None in the other epochs)."""
    last = epoch == cfg.epochs - 1
    if not isinstance(model, MaskingModel) or fixed is None or (epoch % cfg.mask_log_every and not last):
        return None
    # predict() must not disturb the training RNG: evaluation masks draw no noise.
    model.eval()
    _, masks = model.predict(fixed.to(device))
    masks = [m.cpu() for m in masks]
    save_atomic({"epoch": epoch, "masks": masks}, out / "masks" / f"epoch_{epoch:04d}.pt")
    return masks


def _plain(value: Any) -> Any:
    """JSON/YAML-friendly copy: tuples to lists, tensors to numbers, non-finite floats kept as strings."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Tensor):
        return value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
