"""The training step's kinds (aim_ext.engine.step): eager, compile and cuda-graph give the same
updates; schedules reach a compiled or captured step through tensors updated in place; a step kind a
run cannot use is refused before training starts."""

import copy
import dataclasses

import pytest
import torch
from test_engine import Blobs, make_model, tiny_config

from aim_ext.engine import StepError, fit
from aim_ext.engine.optim import build_optimizer, build_scheduler, load_optimizer_state
from aim_ext.engine.step import StepContext, build_step, check_step, rolled_back, use_tensor_learning_rates
from aim_ext.models import AIM, load_checkpoint

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


def _trainer(cfg, device="cpu", model=None, dtype=torch.float32):
    """A model (noise as cfg says), its fused AdamW with tensor learning rates, and the step."""
    device = torch.device(device)
    model = (model or make_model(cfg)).to(device, dtype).train()
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if isinstance(model, AIM):
        model.set_gumbel(noise=cfg.noise_off_epoch is None)
    optimizer = build_optimizer(model, cfg)
    use_tensor_learning_rates(optimizer, device)
    tau = torch.full((), 0.5, device=device) if cfg.area_final is not None else None
    return model, optimizer, build_step(StepContext(model, optimizer, cfg, device, tau=tau))


def _batches(count, batch=8, device="cpu", dtype=torch.float32):
    data = Blobs(count * batch, 3)
    images, labels = data.images.to(device, dtype), data.labels.to(device)
    return [(images[i * batch : (i + 1) * batch], labels[i * batch : (i + 1) * batch]) for i in range(count)]


def _five_steps(cfg, kind, device="cpu", dtype=torch.float64):
    """The weights and the statistics of five steps of `kind` from the same model and batches."""
    model, _, step = _trainer(dataclasses.replace(cfg, step=kind), device, dtype=dtype)
    batches = _batches(5, device=device, dtype=dtype)
    if cfg.channels_last:
        batches = [
            (images.contiguous(memory_format=torch.channels_last), labels) for images, labels in batches
        ]
    step.prepare(*batches[0])
    stats = torch.stack([step(images, labels).clone() for images, labels in batches])
    return model.state_dict(), stats


def _exact_config(tmp_path, **kw):
    """Noise off and no dropout: a step is a deterministic function of the weights and the batch."""
    return tiny_config(tmp_path, noise_off_epoch=0, drop_rate=0.0, drop_path_rate=0.0, grad_clip=1.0, **kw)


@pytest.mark.slow
@pytest.mark.parametrize("stop_stage", [None, 3])
def test_compiled_step_gives_the_eager_weights_after_five_steps(tmp_path, stop_stage):
    """In float64: AdamW turns the rounding noise of small float32 gradients into whole steps of
    the learning rate, so float32 trajectories part after a few steps whichever code is right. The
    tolerance is 1e-6 of a step of the learning rate (1e-3): biases followed by a BatchNorm have a
    gradient of rounding noise alone, which AdamW's eps turns into updates of about 1e-10."""
    # timm's test_resnet: ResNet's code (BatchNorm included) in small blocks, which compile faster.
    cfg = _exact_config(
        tmp_path, model="test_resnet", stop_stage=stop_stage, channels_last=stop_stage is not None
    )
    eager, eager_stats = _five_steps(cfg, "eager")
    compiled, compiled_stats = _five_steps(cfg, "compile")
    initial = make_model(cfg).double().state_dict()
    assert any(not torch.equal(t, initial[n]) for n, t in eager.items() if t.is_floating_point())
    for name, tensor in eager.items():
        torch.testing.assert_close(compiled[name], tensor, rtol=1e-7, atol=1e-9, msg=name)
    torch.testing.assert_close(compiled_stats, eager_stats, rtol=1e-7, atol=1e-9)


def _area_term_follows(stats, tau, stages):
    """stats' area term (times the batch) against sum_l (r_l - tau)^2 from its own mask areas."""
    batch = 8
    areas = stats[5 : 5 + stages] / batch
    return float(stats[0] / batch) == pytest.approx(float(((areas - tau) ** 2).sum()), abs=1e-6)


@pytest.mark.slow
def test_a_compiled_step_follows_tau_and_the_learning_rate_without_recompiling(tmp_path):
    """tau and the learning rates are tensors filled in place: new values reach the compiled step
    (the area term follows tau; a zero learning rate leaves the weights), and nothing recompiles."""
    from torch._dynamo.utils import counters

    # r_l over the batch: in stats; timm's test_resnet compiles faster than resnet18
    cfg = _exact_config(tmp_path, model="test_resnet", step="compile", area_per_image=False)
    model, optimizer, step = _trainer(cfg)
    (images, labels), *_ = _batches(1)
    first = step(images, labels)
    assert _area_term_follows(first, 0.5, len(model.stages))
    compiled = counters["stats"]["unique_graphs"]
    lrs = [group["lr"] for group in optimizer.param_groups]
    step.ctx.tau.fill_(0.9)
    for group in optimizer.param_groups:
        group["lr"].fill_(0.0)
    before = copy.deepcopy(model.state_dict())
    second = step(images, labels)
    assert counters["stats"]["unique_graphs"] == compiled
    assert _area_term_follows(second, 0.9, len(model.stages))
    assert [group["lr"] for group in optimizer.param_groups] == lrs  # the same tensors
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and "running" not in name:
            assert torch.equal(tensor, before[name]), name


def test_the_schedule_fills_the_learning_rate_tensors_in_place(tmp_path):
    """As fit builds them: the schedule over float rates, then the rates made tensors."""
    cfg = tiny_config(tmp_path)
    model = make_model(cfg)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch=4)
    use_tensor_learning_rates(optimizer, torch.device("cpu"))
    model(torch.randn(2, 3, 32, 32)).logits.sum().backward()
    tensors = [group["lr"] for group in optimizer.param_groups]
    values = []
    for _ in range(6):
        optimizer.step()
        scheduler.step()
        values.append([float(t) for t in tensors])
    assert all(group["lr"] is t for group, t in zip(optimizer.param_groups, tensors, strict=True))
    expected = [[pytest.approx(float(lr), rel=1e-6) for lr in scheduler.get_last_lr()]]
    assert values[-1:] == expected and values[0] != values[-1]


@pytest.mark.parametrize("with_state", [False, True])
def test_steps_rolled_back_leave_no_trace(tmp_path, with_state):
    """rolled_back (the warm-up before a capture): afterwards the model, AdamW's state and the
    random generators are as before, in the same tensors, so training goes on as if no step had run."""
    cfg = tiny_config(tmp_path)  # Gumbel noise and dropout on: the generators matter
    batches = _batches(4)
    twin_cfg = tiny_config(tmp_path / "twin")
    model, optimizer, step = _trainer(cfg)
    twin, _, twin_step = _trainer(twin_cfg, model=copy.deepcopy(model))
    if with_state:
        torch.manual_seed(4)
        step(*batches[0])
        torch.manual_seed(4)
        twin_step(*batches[0])
    addresses = [p.data_ptr() for p in model.parameters()]
    torch.manual_seed(5)
    with rolled_back(model, optimizer):
        for images, labels in batches[1:3]:
            step(images, labels)
    assert [p.data_ptr() for p in model.parameters()] == addresses
    torch.manual_seed(5)
    stats = [step(images, labels) for images, labels in batches[1:]]
    torch.manual_seed(5)
    for (images, labels), expected in zip(batches[1:], stats, strict=True):
        assert torch.equal(twin_step(images, labels), expected)
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(
    ("changes", "device", "world", "images", "message"),
    [
        ({}, "cpu", 1, None, "needs a CUDA device; this run is on cpu"),
        ({"accum_steps": 2}, "cuda", 1, None, "cannot accumulate gradients over 2 batches"),
        ({"amp": "fp16"}, "cuda", 1, None, "use --amp bf16"),
        ({}, "cuda", 2, None, "not available with 2 processes"),
        ({}, "cuda", 1, 5, "the training split's 5 images make one short batch"),
    ],
)
def test_a_step_kind_the_run_cannot_use_is_refused(tmp_path, changes, device, world, images, message):
    cfg = tiny_config(tmp_path, step="cuda-graph", **changes)
    with pytest.raises(StepError, match=message):
        check_step(cfg, torch.device(device), world, images)
    check_step(tiny_config(tmp_path, **changes), torch.device(device), world, images)  # eager runs


def test_a_run_resumed_with_another_step_kind_keeps_its_own_optimizer_options(tmp_path):
    """The checkpoint's AdamW options (an eager run's capturable=False) must not replace the
    resumed run's: a CUDA graph needs capturable=True. The moments and steps are the checkpoint's."""
    cfg = tiny_config(tmp_path, epochs=1)
    fit(cfg, Blobs(32, 0), Blobs(16, 1), make_model(cfg), log=lambda *_: None)
    saved = load_checkpoint(tmp_path / "run" / "last.pt")["optimizer"]
    graph_cfg = dataclasses.replace(cfg, step="cuda-graph")
    optimizer = build_optimizer(make_model(graph_cfg), graph_cfg)
    load_optimizer_state(optimizer, saved)
    assert all(g["capturable"] and g["fused"] for g in optimizer.param_groups)
    assert all(not g["capturable"] for g in saved["param_groups"])
    restored = [s["exp_avg"] for s in optimizer.state_dict()["state"].values()]
    assert all(torch.equal(a, s["exp_avg"]) for a, s in zip(restored, saved["state"].values(), strict=True))


def test_fit_refuses_before_writing_anything(tmp_path):
    cfg = tiny_config(tmp_path, step="cuda-graph")
    with pytest.raises(StepError, match="needs a CUDA device"):
        fit(cfg, Blobs(32, 0), Blobs(16, 1), make_model(cfg), log=lambda *_: None)
    assert not (tmp_path / "run").exists()


@needs_cuda
def test_graph_step_gives_the_eager_weights_after_five_steps(tmp_path):
    cfg = _exact_config(tmp_path, device="cuda", channels_last=True)
    eager, eager_stats = _five_steps(cfg, "eager", "cuda")
    captured, captured_stats = _five_steps(cfg, "cuda-graph", "cuda")
    for name, tensor in eager.items():
        torch.testing.assert_close(captured[name], tensor, rtol=1e-7, atol=1e-9, msg=name)
    torch.testing.assert_close(captured_stats, eager_stats, rtol=1e-7, atol=1e-9)


@needs_cuda
@pytest.mark.parametrize("kind", [pytest.param("compile", marks=pytest.mark.slow), "cuda-graph"])
def test_bf16_steps_follow_the_eager_losses(tmp_path, kind):
    """Under bf16 autocast (float32 weights) the five losses agree with the eager step's."""
    cfg = _exact_config(tmp_path, device="cuda", channels_last=True, amp="bf16")
    _, eager_stats = _five_steps(cfg, "eager", "cuda", torch.float32)
    _, other_stats = _five_steps(cfg, kind, "cuda", torch.float32)
    torch.testing.assert_close(other_stats[:, 3], eager_stats[:, 3], rtol=3e-2, atol=1e-2)


@needs_cuda
def test_graph_replays_draw_fresh_gumbel_noise(tmp_path):
    cfg = tiny_config(
        tmp_path, device="cuda", step="cuda-graph", lr_backbone=0.0, lr_topdown=0.0, lr_mask=0.0
    )
    cfg.weight_decay = 0.0
    model, _, step = _trainer(cfg, "cuda")
    for estimator in model.modules():  # logits of 0: each position's mask is a coin toss
        if hasattr(estimator, "to_logits"):
            torch.nn.init.zeros_(estimator.to_logits.weight)
            torch.nn.init.zeros_(estimator.to_logits.bias)
    (images, labels), *_ = _batches(1, device="cuda")
    areas = torch.stack([step(images, labels)[-2].clone() for _ in range(4)])
    assert len(areas.unique()) > 1, areas


@needs_cuda
def test_a_step_with_a_host_read_cannot_be_captured(tmp_path):
    class Reads(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, images):
            if float(images.mean()) > 1e9:  # a device-to-host read
                images = images * 0
            return self.inner(images)

        def get_classifier(self):
            return self.inner.get_classifier()

    cfg = tiny_config(tmp_path, device="cuda", step="cuda-graph", stop_stage=None)
    model, _, step = _trainer(cfg, "cuda", model=Reads(make_model(cfg)))
    with pytest.raises(StepError, match="cannot capture this training step"):
        step.prepare(*_batches(1, device="cuda")[0])


@needs_cuda
def test_replays_follow_the_learning_rate_and_a_second_capture_after_the_noise_switch(tmp_path):
    """A zero learning rate filled in place reaches the replays (the weights stay); turning the
    noise off captures a second graph that trains."""
    cfg = tiny_config(tmp_path, device="cuda", step="cuda-graph")
    model, optimizer, step = _trainer(cfg, "cuda")
    batches = _batches(3, device="cuda")
    step.prepare(*batches[0])
    step(*batches[0])
    for group in optimizer.param_groups:
        group["lr"].fill_(0.0)
    before = {
        n: t.clone() for n, t in model.state_dict().items() if "running" not in n and t.is_floating_point()
    }
    step(*batches[1])
    assert all(torch.equal(model.state_dict()[n], t) for n, t in before.items())
    for group in optimizer.param_groups:
        group["lr"].fill_(1e-3)
    model.set_gumbel(noise=False)
    stats = step(*batches[2])
    assert len(step._graphs) == 1 and next(iter(step._graphs))[-1] is False
    assert bool(stats[-1]) and any(not torch.equal(model.state_dict()[n], t) for n, t in before.items())


@needs_cuda
def test_fit_with_a_captured_step_resumes_an_eager_run(tmp_path):
    """aim-train --step cuda-graph end to end: one eager epoch, then two captured ones resumed from
    its checkpoint (the resumed optimizer stays capturable), the noise switched off at epoch 2."""
    common = dict(device="cuda", epochs=3, noise_off_epoch=2, channels_last=True, amp="bf16")
    first = tiny_config(tmp_path, **common)
    with pytest.raises(KeyboardInterrupt):
        fit(first, Blobs(32, 0), Blobs(16, 1), make_model(first), log=_stop_after_epoch_0)
    resumed = dataclasses.replace(first, step="cuda-graph")
    best = fit(resumed, Blobs(32, 0), Blobs(16, 1), make_model(resumed), resume=True, log=lambda *_: None)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3 and best


def _stop_after_epoch_0(line):
    """fit's log: epoch 0's line comes after its checkpoint; stop there, as an interrupted run."""
    if line.startswith("epoch 0:"):
        raise KeyboardInterrupt
