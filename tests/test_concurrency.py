"""Concurrent top-down branches (aim_ext.models.concurrency): the same results as one stream.

On the CPU the fork and join are replaced by serial stand-ins, which checks the reordered loop
(every branch started first, the merges after, in order), with and without gradients. On CUDA
the real side streams run in inference, eager and under CUDA graph capture, against the
one-stream path; with autograd on the model keeps one stream."""

import pytest
import torch
from conftest import CUDA_REASON

import aim_ext.models.aim as aim_module
from aim_ext.losses import aim_loss
from aim_ext.models import create_model
from aim_ext.models.concurrency import can_run_concurrently
from aim_ext.ops import kernels_available

needs_cuda = pytest.mark.skipif(not kernels_available()["cuda"], reason=CUDA_REASON)


def outputs_and_grads(model, x, *, concurrent, seed=0):
    """Training-mode outputs and parameter gradients (seeded noise), or evaluation outputs."""
    model.concurrent_branches = concurrent
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    if not model.training:
        with torch.no_grad():
            logits, masks = model.predict(x)
        return [logits, *masks], []
    out = model(x)
    labels = torch.arange(x.shape[0], device=x.device) % model.num_classes
    aim_loss(out, labels, tau=0.5).total.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    # Detached, so that no autograd graph (and its gradient accumulators) outlives the step.
    outputs = [out.logits, *out.aux_logits, *out.masks, *out.mask_logits]
    return [t.detach() for t in outputs], grads


@pytest.mark.parametrize("training", [False, True])
def test_reordered_loop_matches_the_serial_one_on_cpu(monkeypatch, training):
    launched = []

    def serial_fork(jobs):
        launched.append(len(jobs))
        return [(job(), None) for job in jobs]

    monkeypatch.setattr(aim_module, "can_run_concurrently", lambda x: True)
    monkeypatch.setattr(aim_module, "fork", serial_fork)
    monkeypatch.setattr(aim_module, "join", lambda result, stream: result)
    model = create_model("resnet18", num_classes=4, stop_stage=2).train(training)
    x = torch.randn(2, 3, 75, 75)
    serial, serial_grads = outputs_and_grads(model, x, concurrent=False)
    assert launched == []
    reordered, reordered_grads = outputs_and_grads(model, x, concurrent=True)
    assert launched == [2 * len(model.stages)]
    for a, b in zip(serial + serial_grads, reordered + reordered_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_only_real_eager_cuda_tensors_run_concurrently():
    assert not can_run_concurrently(torch.zeros(1))
    seen = []

    @torch.compile(backend="eager", fullgraph=True)
    def traced(x):
        seen.append(can_run_concurrently(x))
        return x + 1

    traced(torch.zeros(2))
    assert seen == [False]


def cuda_model(name, stop_stage, dtype):
    model = create_model(name, num_classes=6, stop_stage=stop_stage).cuda()
    if dtype != torch.float32:
        model = model.to(dtype)
    return model.to(memory_format=torch.channels_last)


@needs_cuda
@pytest.mark.parametrize("name,stop_stage", [("convnext_atto", 1), ("resnet18", 2), ("mobilenetv2_100", 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_concurrent_evaluation_gives_the_same_bits(name, stop_stage, dtype):
    model = cuda_model(name, stop_stage, dtype).eval()
    x = torch.randn(3, 3, 96, 96, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert can_run_concurrently(x)
    serial, _ = outputs_and_grads(model, x, concurrent=False)
    concurrent, _ = outputs_and_grads(model, x, concurrent=True)
    for a, b in zip(serial, concurrent, strict=True):
        assert torch.equal(a, b)


@needs_cuda
def test_autograd_keeps_one_stream_and_training_mode_inference_matches():
    """While autograd records, the branches stay on one stream; a training-mode forward without
    autograd (Gumbel noise drawn in the merges, in stage order) runs concurrently, same bits."""
    model = cuda_model("convnext_atto", 1, torch.float32).train()
    x = torch.randn(4, 3, 64, 64, device="cuda")
    assert not can_run_concurrently(x)
    with torch.no_grad():
        assert can_run_concurrently(x)
        results = []
        for concurrent in (False, True):
            model.concurrent_branches = concurrent
            torch.manual_seed(0)
            out = model(x)
            results.append([out.logits, *out.aux_logits, *out.masks, *out.mask_logits])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


@needs_cuda
def test_concurrent_branches_replay_in_a_cuda_graph():
    model = cuda_model("resnet18", 2, torch.bfloat16).eval()
    static = torch.randn(1, 3, 96, 96, device="cuda", dtype=torch.bfloat16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.inference_mode(), torch.cuda.stream(side):
        for _ in range(2):
            model.predict(static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode(), torch.cuda.graph(graph):
        logits, masks = model.predict(static)
    for _ in range(3):  # fresh input each replay: the graph must compute, not replay stale data
        x = torch.randn_like(static)
        static.copy_(x)
        graph.replay()
        expected, _ = outputs_and_grads(model, x, concurrent=False)
        model.concurrent_branches = True
        torch.cuda.synchronize()
        assert all(torch.equal(a, b) for a, b in zip([logits, *masks], expected, strict=True))
