"""The training engine: recipe groups, exact resume, atomic and safe checkpoints, failures."""

import csv
import json
import pickle
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils.data import Dataset

import aim_ext
import aim_ext.engine.train as train_module
from aim_ext import create_model
from aim_ext.engine import ResumeError, TrainConfig, TrainingError, fit, load_config
from aim_ext.engine.optim import parameter_groups
from aim_ext.engine.step import StepContext, optimizer_step
from aim_ext.models import load_checkpoint, load_model_state


class Blobs(Dataset):
    """Two classes: a bright square on the left (0) or right (1); groups = 2 y + a random place."""

    def __init__(self, count: int, seed: int, size: int = 32) -> None:
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(count, 3, size, size, generator=g) * 0.3
        self.labels = torch.randint(0, 2, (count,), generator=g)
        for i, y in enumerate(self.labels):
            x0 = 2 if y == 0 else size // 2 + 2
            self.images[i, :, 8:20, x0 : x0 + 10] += 2.0
        self.place = torch.randint(0, 2, (count,), generator=g)
        # Python ints: loading an item reads no tensor value (test_a_training_step_reads_nothing_back).
        self.label_of = self.labels.tolist()
        self.group_of = (2 * self.labels + self.place).tolist()
        self.poison = False

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        image = self.images[i] * (float("nan") if self.poison else 1.0)
        return {"image": image, "label": self.label_of[i], "group": self.group_of[i]}


def tiny_config(tmp_path, **kw) -> TrainConfig:
    values = dict(
        model="resnet18",
        stop_stage=3,
        epochs=3,
        batch_size=8,
        num_workers=0,
        image_size=32,
        lr_backbone=1e-3,
        lr_topdown=1e-3,
        lr_mask=1e-3,
        warmup_epochs=1,
        drop_path_rate=0.0,
        area_final=0.5,
        area_duration=2,
        out=str(tmp_path / "run"),
        device="cpu",
        mask_log_every=1,
        mask_log_images=4,
    )
    values.update(kw)
    return TrainConfig(**values)


def make_model(cfg: TrainConfig):
    torch.manual_seed(cfg.seed)
    return create_model(
        cfg.model,
        num_classes=2,
        stop_stage=cfg.stop_stage,
        drop_rate=cfg.drop_rate,
        drop_path_rate=cfg.drop_path_rate,
    )


def test_parameter_groups_follow_the_recipe(tmp_path):
    cfg = tiny_config(tmp_path, lr_backbone=1e-5, lr_topdown=1e-2, lr_mask=1e-3, weight_decay_mask=0.0)
    model = make_model(cfg)
    groups = {g["name"]: g for g in parameter_groups(model, cfg)}
    assert (groups["backbone"]["lr"], groups["topdown"]["lr"], groups["mask"]["lr"]) == (1e-5, 1e-2, 1e-3)
    assert groups["mask"]["weight_decay"] == 0.0
    count = sum(len(g["params"]) for g in groups.values())
    assert count == len(list(model.parameters()))
    paper = {
        g["name"]: g
        for g in parameter_groups(model, tiny_config(tmp_path, lr_mask=None, weight_decay_mask=None))
    }
    assert (paper["mask"]["lr"], paper["mask"]["weight_decay"]) == (1e-3, 1e-3)  # the top-down group's
    mask_ids = {id(p) for p in groups["mask"]["params"]}
    assert all((id(p) in mask_ids) == (".mask_estimator." in n) for n, p in model.named_parameters())


def test_training_writes_the_run_folder(tmp_path):
    cfg = tiny_config(tmp_path, epochs=2)
    best = fit(cfg, Blobs(32, 0), Blobs(16, 1), make_model(cfg), log=lambda *_: None)
    run = tmp_path / "run"
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [0, 1]
    for key in [
        "loss",
        "final_ce",
        "aux_ce",
        "area_loss",
        "train_acc",
        "val_acc",
        "val_worst_group_acc",
        "mask_area",
        "tau",
        "lr",
    ]:
        assert key in lines[0], key
    assert lines[0]["tau"] == 1.0 and lines[1]["tau"] == 0.75  # annealing over 2 epochs to 0.5
    assert len(lines[0]["mask_area"]) == 2 and set(lines[0]["lr"]) == {"backbone", "topdown", "mask"}
    assert best["val_worst_group_acc"] == max(m["val_worst_group_acc"] for m in lines)
    assert sorted(p.name for p in (run / "masks").iterdir()) == ["epoch_0000.pt", "epoch_0001.pt"]
    assert {"best.pt", "last.pt", "config.yaml", "model"} <= {p.name for p in run.iterdir()}
    assert load_config(run / "config.yaml") == cfg
    with (run / "summary.csv").open() as handle:  # timm's per-epoch table
        table = list(csv.DictReader(handle))
    assert [int(r["epoch"]) for r in table] == [0, 1]
    assert float(table[1]["val_acc"]) == pytest.approx(lines[1]["val_acc"])
    assert float(table[0]["lr_topdown"]) == pytest.approx(lines[0]["lr"]["topdown"])
    assert float(table[1]["mask_area_1"]) == pytest.approx(lines[1]["mask_area"][1])
    saved = json.loads((run / "model" / "config.json").read_text())  # the selected model, saved
    assert (
        saved["metrics"]["val_acc"] == best["val_acc"]
        and saved["training"]["selected_epoch"] == best["epoch"]
    )
    assert saved["labels"] == ["0", "1"] and saved["input_size"] == [3, 32, 32]
    assert (saved["crop_pct"], saved["interpolation"]) == (0.875, "bilinear")  # as CUB's evaluation
    assert saved["training"]["pretrained"] is None  # the starting weights: none here
    selected = load_checkpoint(run / "best.pt")["model"]
    loaded = aim_ext.load_model(run / "model").state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in selected.items())


def test_per_stage_area_targets(tmp_path):
    """area_final_stages: each stage's tau anneals to its own value, logged per stage; a count that
    does not match the model's masked stages is refused before anything is written."""
    cfg = tiny_config(tmp_path, area_final_stages=[0.5, 0.3])
    fit(cfg, Blobs(32, 0), Blobs(16, 1), make_model(cfg), log=lambda *_: None)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["tau"] for line in lines] == [
        [1.0, 1.0],
        pytest.approx([0.75, 0.65]),
        pytest.approx([0.5, 0.3]),
    ]
    bad = tiny_config(tmp_path / "bad", area_final_stages=[0.5])
    with pytest.raises(ValueError, match="area_final_stages has 1 values; this model masks 2 stages"):
        fit(bad, Blobs(32, 0), Blobs(16, 1), make_model(bad), log=lambda *_: None)
    assert not (tmp_path / "bad" / "run").exists()
    with pytest.raises(ValueError, match="needs annealing"):
        tiny_config(tmp_path, area_final=None, area_final_stages=[0.5, 0.3])


def test_without_auxiliary_losses_the_aux_heads_are_not_computed(tmp_path):
    """aux_weight 0 (the paper's ablation): no aux head runs in training, their weights stay as
    they were, the aux loss is 0, and the rest trains."""
    cfg = tiny_config(tmp_path, epochs=1, aux_weight=0.0)
    model = make_model(cfg)
    heads = {k: v.clone() for k, v in model.aux_heads.state_dict().items()}
    others = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("stages.")}
    calls = []
    for head in model.aux_heads:
        head.register_forward_hook(lambda *_: calls.append(1))
    fit(cfg, Blobs(32, 0), Blobs(16, 1), model, log=lambda *_: None)
    assert calls == [] and all(torch.equal(model.aux_heads.state_dict()[k], v) for k, v in heads.items())
    assert any(not torch.equal(model.state_dict()[k], v) for k, v in others.items())
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert record["aux_ce"] == 0.0 and record["loss"] > 0
    model.train()
    assert model(torch.randn(2, 3, 32, 32)).aux_logits == []


@pytest.mark.parametrize(
    ("stop_stage", "step"),
    [(None, "eager"), (3, "eager"), pytest.param(3, "compile", marks=pytest.mark.slow)],
)
def test_resume_ends_with_the_same_weights(tmp_path, monkeypatch, stop_stage, step):
    """Bit for bit, for the eager step and (on the CPU) the compiled one: its code is the same in
    the resumed process, and nothing in a step depends on what ran before but the saved state."""
    train, val = Blobs(32, 0), Blobs(16, 1)
    # The compiled step on timm's test_resnet: ResNet's code in small blocks, which compile faster.
    model = "test_resnet" if step == "compile" else "resnet18"
    whole = tiny_config(tmp_path / "whole", model=model, stop_stage=stop_stage, step=step)
    reference = make_model(whole)
    fit(whole, train, val, reference, log=lambda *_: None)

    cut = tiny_config(tmp_path / "cut", model=model, stop_stage=stop_stage, step=step)
    original = train_module.train_one_epoch

    def interrupted(*args, **kwargs):
        if args[4] == 2:  # the epoch argument
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_one_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fit(cut, train, val, make_model(cut), log=lambda *_: None)
    monkeypatch.setattr(train_module, "train_one_epoch", original)
    resumed = make_model(cut)
    fit(cut, train, val, resumed, resume=True, log=lambda *_: None)
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    epochs = [
        json.loads(x)["epoch"] for x in (tmp_path / "cut" / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert epochs == [0, 1, 2]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, epochs=2)
    train = Blobs(32, 0)
    original = train_module.train_one_epoch
    snapshot = {}

    def poison_second_epoch(*args, **kwargs):
        if args[4] == 1:
            snapshot["last"] = (tmp_path / "run" / "last.pt").read_bytes()
            train.poison = True
        return original(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_one_epoch", poison_second_epoch)
    with pytest.raises(TrainingError, match="non-finite loss at epoch 1, step 0"):
        fit(cfg, train, Blobs(16, 1), make_model(cfg), log=lambda *_: None)
    assert (tmp_path / "run" / "last.pt").read_bytes() == snapshot["last"]


def test_resume_refuses_a_run_of_an_earlier_recipe_it_would_train_otherwise(tmp_path):
    """A last.pt without recipe_version (an earlier aim-ext): its tau ran one epoch ahead and its
    r_l was pooled; resuming mid-annealing is refused, after annealing with the pooled r_l allowed."""
    cfg = tiny_config(tmp_path, epochs=3, area_duration=2)
    original = train_module.train_one_epoch

    def stop_at(epoch):
        def run(*args, **kwargs):
            if args[4] == epoch:
                raise KeyboardInterrupt
            return original(*args, **kwargs)

        return run

    for stop, allowed in ((1, False), (2, True)):
        train_module.train_one_epoch = stop_at(stop)
        try:
            with pytest.raises(KeyboardInterrupt):
                fit(cfg, Blobs(16, 0), Blobs(8, 1), make_model(cfg), log=lambda *_: None)
        finally:
            train_module.train_one_epoch = original
        last = tmp_path / "run" / "last.pt"
        state = torch.load(last, weights_only=True)
        del state["recipe_version"], state["config"]["area_per_image"]  # as an earlier aim-ext wrote it
        torch.save(state, last)
        cfg.area_per_image = False
        if allowed:
            fit(cfg, Blobs(16, 0), Blobs(8, 1), make_model(cfg), resume=True, log=lambda *_: None)
        else:
            with pytest.raises(
                ResumeError, match="tau schedule ran one epoch ahead and annealing is not over"
            ):
                fit(cfg, Blobs(16, 0), Blobs(8, 1), make_model(cfg), resume=True, log=lambda *_: None)
            cfg.area_per_image = True
            with pytest.raises(ResumeError, match="resume with --no-area-per-image"):
                fit(cfg, Blobs(16, 0), Blobs(8, 1), make_model(cfg), resume=True, log=lambda *_: None)
        cfg.area_per_image = True


def test_resume_refuses_another_schedule(tmp_path):
    cfg = tiny_config(tmp_path, epochs=1)
    fit(cfg, Blobs(16, 0), Blobs(8, 1), make_model(cfg), log=lambda *_: None)
    cfg.epochs, cfg.batch_size = 5, 4
    with pytest.raises(ValueError, match=r"different batch_size: 8 -> 4, epochs: 1 -> 5"):
        fit(cfg, Blobs(16, 0), Blobs(8, 1), make_model(cfg), resume=True, log=lambda *_: None)


def test_resume_drops_log_lines_of_epochs_it_replays(tmp_path):
    """A crash after the metrics line but before the checkpoint must not duplicate the line."""
    cfg = tiny_config(tmp_path, epochs=2)
    fit(cfg, Blobs(16, 0), Blobs(8, 1), make_model(cfg), log=lambda *_: None)
    run = tmp_path / "run"
    state = torch.load(run / "last.pt", weights_only=True)
    state["epoch"] = 0  # as if the crash came before epoch 1's checkpoint
    torch.save(state, run / "last.pt")
    fit(cfg, Blobs(16, 0), Blobs(8, 1), make_model(cfg), resume=True, log=lambda *_: None)
    epochs = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1]


def test_a_fresh_run_leaves_nothing_of_an_earlier_one(tmp_path):
    cfg = tiny_config(tmp_path, epochs=2)
    fit(cfg, Blobs(16, 0), Blobs(8, 1), make_model(cfg), log=lambda *_: None)
    cfg.epochs = 1
    seen = []
    fit(
        cfg,
        Blobs(16, 0),
        Blobs(8, 1),
        make_model(cfg),
        # (a warning about the schedule comes before training: the folder is not touched yet)
        log=lambda line, *_: (
            line.startswith("warning:") or seen.append((tmp_path / "run" / "model").exists())
        ),
    )
    assert seen and not any(seen)  # the earlier run's saved model is gone while the new one trains
    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "masks").iterdir()) == ["epoch_0000.pt"]
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1


@pytest.mark.parametrize("stop_stage", [None, 3])
def test_a_fused_model_does_not_train_and_the_run_folder_stays(tmp_path, stop_stage):
    cfg = tiny_config(tmp_path, epochs=1, stop_stage=stop_stage)
    fit(cfg, Blobs(16, 0), Blobs(8, 1), make_model(cfg), log=lambda *_: None)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    fused = aim_ext.fuse_for_inference(make_model(cfg).eval())
    with pytest.raises(ValueError, match=r"\(fused for inference\) model cannot train"):
        fit(cfg, Blobs(16, 0), Blobs(8, 1), fused, log=lambda *_: None)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_collapse_is_reported(tmp_path):
    cfg = tiny_config(tmp_path, epochs=1, stop_stage=None, lr_backbone=0.0, lr_topdown=0.0)
    model = make_model(cfg)
    with torch.no_grad():
        model.get_classifier().bias.copy_(torch.tensor([1e4, 0.0]))
    messages = []
    fit(cfg, Blobs(32, 0), Blobs(16, 1), model, log=messages.append)
    assert any("every validation prediction is class 0" in m for m in messages)
    line = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert line["collapsed_to_class"] == 0


def test_checkpoints_load_safely_and_strictly(tmp_path):
    cfg = tiny_config(tmp_path, epochs=1)
    model = make_model(cfg)
    fit(cfg, Blobs(16, 0), Blobs(8, 1), model, log=lambda *_: None)
    state = load_checkpoint(tmp_path / "run" / "best.pt")
    load_model_state(make_model(cfg), state)
    with pytest.raises(ValueError, match=r"holds a resnet18\+AIM\[3\] model, not resnet18\+AIM\[2\]"):
        load_model_state(create_model("resnet18", num_classes=2, stop_stage=2), state)
    weights = dict(state["model"])
    weights.pop("head.fc.weight")
    weights["extra.weight"] = torch.zeros(1)
    with pytest.raises(
        ValueError, match=r"missing keys \['head.fc.weight'\].*unexpected keys \['extra.weight'\]"
    ):
        load_model_state(make_model(cfg), weights, source="plain.pt")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pt")


class Payload:
    def __reduce__(self):
        return (print, ("code ran while loading",))


def test_untrusted_checkpoints_do_not_run_code(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"model": Payload()}))
    with pytest.raises(ValueError, match="evil.pt is not a checkpoint aim-ext can load safely") as error:
        load_checkpoint(path)
    assert "\n" not in str(error.value) and "code ran" not in capsys.readouterr().out


def test_config_from_yaml_with_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: resnet50\nstop_stage: 3\nepochs: 10\n")
    cfg = load_config(path, {"epochs": 2, "stop_stage": None})
    assert (cfg.model, cfg.stop_stage, cfg.epochs, cfg.seed) == ("resnet50", None, 2, 0)
    path.write_text("modle: resnet50\n")
    with pytest.raises(ValueError, match="unknown training config keys: modle"):
        load_config(path)


@pytest.mark.parametrize("step", ["eager", pytest.param("compile", marks=pytest.mark.slow)])
def test_gradient_accumulation_matches_the_larger_batch(tmp_path, step):
    # ConvNeXt (no BatchNorm; timm's small test_convnext) without dropout: two micro-batches of 4
    # make one step of 8.
    common = dict(model="test_convnext", stop_stage=None, drop_rate=0.0, epochs=2, warmup_epochs=1)
    whole = tiny_config(tmp_path / "whole", batch_size=8, **common)
    split = tiny_config(tmp_path / "split", batch_size=4, accum_steps=2, step=step, **common)
    models = []
    for cfg in (whole, split):
        model = make_model(cfg)
        fit(cfg, Blobs(32, 0), Blobs(16, 1), model, log=lambda *_: None)
        models.append(model)
    for (name, a), b in zip(models[0].state_dict().items(), models[1].state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("stop_stage", [None, 3])
def test_frozen_levels_keep_weights_and_bn_statistics(tmp_path, stop_stage):
    cfg = tiny_config(tmp_path, stop_stage=stop_stage, epochs=1, freeze_levels=2)
    model = make_model(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fit(cfg, Blobs(32, 0), Blobs(16, 1), model, log=lambda *_: None)
    after = model.state_dict()
    prefix = "backbone." if stop_stage is not None else ""
    # resnet18's levels 0 and 1 are the stem (conv1, bn1) and layer1; layer2 on trains.
    frozen = [k for k in before if k.startswith(tuple(prefix + p for p in ("conv1", "bn1", "layer1")))]
    trained = [k for k in before if k.startswith(prefix + "layer2") and k.endswith("weight")]
    assert any("running_mean" in k for k in frozen) and len(frozen) > 10
    for key in frozen:
        assert torch.equal(before[key], after[key]), key
    assert any(not torch.equal(before[k], after[k]) for k in trained)
    names = {n for g in parameter_groups(model, cfg) for n in map(id, g["params"])}
    assert all((id(p) in names) == p.requires_grad for p in model.parameters())


def test_freeze_levels_must_leave_the_top_level(tmp_path):
    from aim_ext.engine.freeze import freeze_levels

    with pytest.raises(ValueError, match="feature levels 0..4; freezing must leave the top level"):
        freeze_levels(make_model(tiny_config(tmp_path)), 5)
    with pytest.raises(ValueError, match="freeze_levels must be >= 0"):
        tiny_config(tmp_path, freeze_levels=-1)


def test_select_from_skips_earlier_epochs(tmp_path, monkeypatch):
    # Earlier epochs score higher: without select_from, epoch 0 would be chosen.
    monkeypatch.setattr(train_module, "selection_key", lambda metrics: -metrics["epoch"])
    cfg = tiny_config(tmp_path, epochs=3, select_from=2)
    best = fit(cfg, Blobs(32, 0), Blobs(16, 1), make_model(cfg), log=lambda *_: None)
    assert best["epoch"] == 2
    assert load_checkpoint(tmp_path / "run" / "best.pt")["epoch"] == 2
    with pytest.raises(ValueError, match="select_from=3 leaves no epoch"):
        tiny_config(tmp_path, epochs=3, select_from=3)


@pytest.mark.parametrize("stop_stage", [None, 3])
def test_freeze_levels_of_mobilenet_v2_stop_at_level_2(stop_stage):
    with torch.device("meta"):
        model = create_model("mobilenetv2_100", num_classes=2, stop_stage=stop_stage)
    from aim_ext.engine.freeze import freeze_levels

    freeze_levels(model, 3)
    prefix = "backbone." if stop_stage is not None else ""
    for name, parameter in model.named_parameters():
        inside = name.startswith(prefix) and name.removeprefix(prefix).startswith(
            ("conv_stem.", "bn1.", "blocks.0.", "blocks.1.", "blocks.2.")
        )
        assert parameter.requires_grad != inside, name


class HostReads(TorchDispatchMode):
    """Counts the ops that read a tensor's values back to the host (a wait for a GPU)."""

    READS = ("_local_scalar_dense", "nonzero", "masked_select", "equal", "allclose", "_unique2", "unique_dim")

    def __init__(self) -> None:
        super().__init__()
        self.calls = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.READS:
            self.calls[name] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("stop_stage", [None, 3])
def test_a_training_step_reads_nothing_back(tmp_path, monkeypatch, stop_stage):
    """Between two reads of the running statistics (every log_every steps and at the end of the
    epoch), a step (forward, loss, backward, clipping, AdamW, the schedule) reads no value back:
    an epoch's reads, the statistics' own left out, do not grow with its number of steps."""
    epoch, read = train_module.train_one_epoch, train_module.RunningStats.read
    mode = HostReads()

    def watched_epoch(*args, **kwargs):
        with mode:
            return epoch(*args, **kwargs)

    def unwatched_read(self, world):
        with _disable_current_modes():
            return read(self, world)

    monkeypatch.setattr(train_module, "train_one_epoch", watched_epoch)
    monkeypatch.setattr(train_module.RunningStats, "read", unwatched_read)
    counts = []
    for steps in (2, 6):
        cfg = tiny_config(
            tmp_path / str(steps), epochs=1, stop_stage=stop_stage, max_steps_per_epoch=steps, log_every=100
        )
        mode.calls.clear()
        fit(cfg, Blobs(64, 0), Blobs(16, 1), make_model(cfg), log=lambda *_: None)
        counts.append(dict(mode.calls))
    assert counts[0] == counts[1]  # per epoch: the end-of-epoch weights check, one read per parameter
    assert set(counts[0]) == {"_local_scalar_dense"}
    assert counts[0]["_local_scalar_dense"] <= len(list(make_model(cfg).parameters())) + 2


def test_statistics_are_read_once_per_interval(tmp_path, monkeypatch):
    reads = []
    original = train_module.RunningStats.read

    def counted(self, world):
        reads.append(self.seen)
        return original(self, world)

    monkeypatch.setattr(train_module.RunningStats, "read", counted)
    cfg = tiny_config(tmp_path, epochs=1, max_steps_per_epoch=7, log_every=3)
    fit(cfg, Blobs(64, 0), Blobs(16, 1), make_model(cfg), log=lambda *_: None)
    assert reads == [24, 48, 56]  # after steps 3 and 6, and at the end of the epoch


def test_a_non_finite_gradient_skips_the_update_on_the_device(tmp_path):
    """optimizer_step: NaN gradients (a non-finite loss) leave the weights and AdamW's state as
    they were, without reading the flag back; finite ones update."""
    cfg = tiny_config(tmp_path, grad_clip=1.0)
    model = make_model(cfg)
    optimizer = train_module.build_optimizer(model, cfg)
    ctx = StepContext(model, optimizer, cfg, torch.device("cpu"))
    model(torch.randn(2, 3, 32, 32)).logits.sum().backward()
    optimizer_step(ctx)
    optimizer.zero_grad()
    before = [p.detach().clone() for p in model.parameters()]
    steps = [s["step"].clone() for s in optimizer.state.values()]
    model(torch.randn(2, 3, 32, 32) * float("nan")).logits.sum().backward()
    with HostReads() as mode:
        optimizer_step(ctx)
    optimizer.zero_grad()
    assert not mode.calls
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    assert all(torch.equal(a, s["step"]) for a, s in zip(steps, optimizer.state.values(), strict=True))
    model(torch.randn(2, 3, 32, 32)).logits.sum().backward()
    optimizer_step(ctx)
    assert not all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize(
    "changes,expected",
    [
        ({}, []),  # the configs' recipe: annealing ends at epoch 5 of 10, selection from there
        ({"stop_stage": None}, []),
        ({"area_final": None}, []),
        (
            {"area_duration": 12},
            ["tau reaches its final value at epoch 12, after the last epoch (9)", "--select-from 9"],
        ),
        ({"select_from": None}, ["best.pt may come from before tau holds its final value (epoch 5)"]),
        ({"select_from": 3, "area_start": 1}, ["(epoch 6), with denser masks: --select-from 6"]),
    ],
)
def test_annealing_warnings_say_when_a_run_ends_or_selects_before_tau_holds(changes, expected):
    from aim_ext.engine.train import annealing_warnings

    values = dict(stop_stage=3, epochs=10, area_final=0.25, area_duration=5, select_from=5)
    found = annealing_warnings(TrainConfig(**{**values, **changes}))
    assert len(found) == len(expected)
    for text, part in zip(found, expected, strict=True):
        assert part in text
