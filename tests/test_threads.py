"""Concurrent callers: a model or an op called from 8 Python threads at once gives every thread the
bits that the same call gives alone (an op's own kernels: alone on one intra-op thread);
processes that load and explain one saved model at once get one answer; a process that loads a
saved model while another saves into its folder gets the old model or the new one, never a mix.

The default selection runs a few rounds of each, on one model; `AIM_EXT_SOAK=N` runs N rounds of
the threads on three models and N saves against the reader (a soak, e.g. N=40)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import devices
from mixed_masks import mixed_mask_model
from PIL import Image

import aim_ext
from aim_ext import ops
from aim_ext.cli.explain import main as aim_explain
from aim_ext.models import create_model, load_model, save_pretrained
from aim_ext.models.topdown import InferenceFeatureBranch
from aim_ext.ops import kernels_available

THREADS = 8
SOAK = int(os.environ.get("AIM_EXT_SOAK", "0"))
MODEL_ROUNDS = SOAK or 4
OP_ROUNDS = SOAK or 25
SAVES = SOAK or 8


@contextlib.contextmanager
def intra_op_threads(count: int):
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def sequential_then_together(
    call, inputs: list, rounds: int, device: str, *, lone_threads: int = 0, reset=None
) -> list:
    """`call(inputs[i])` one at a time, then on one thread per input, all released together by a
    barrier in each of ``rounds`` rounds (on the CPU with at least two intra-op threads; on CUDA
    each thread on its own stream). Returns the (thread, round) of every result that differs
    from the lone call's, and every exception. ``lone_threads``: the intra-op threads of the lone
    calls (by default those of the threaded ones); ``reset()``, if given, runs between the lone
    and the threaded calls."""
    together_threads = max(2, torch.get_num_threads())
    with intra_op_threads(lone_threads or together_threads):
        expected = [call(x) for x in inputs]
    if device == "cuda":
        torch.cuda.synchronize()
    if reset is not None:
        reset()
    barrier = threading.Barrier(len(inputs))
    failures: list = []

    def worker(i: int) -> None:
        stream = torch.cuda.Stream() if device == "cuda" else None
        try:
            for r in range(rounds):
                barrier.wait()
                with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                    got = call(inputs[i])
                if stream is not None:
                    stream.synchronize()
                if not same(got, expected[i]):
                    failures.append((i, r))
        except BaseException as error:  # reported by the test, not lost with the thread
            failures.append((i, repr(error)))
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(inputs))]
    with intra_op_threads(together_threads):
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return failures


# ---------------------------------------------------------------------------------------------
# One model, 8 threads.


SOAK_ONLY = pytest.mark.skipif(not SOAK, reason="a soak: AIM_EXT_SOAK=N runs it, N rounds")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize(
    "name,stop_stage",
    [
        ("resnet18", 3),
        pytest.param("convnext_atto", 2, marks=SOAK_ONLY),
        pytest.param("mobilenetv2_100", 3, marks=SOAK_ONLY),
    ],
)
def test_a_model_from_eight_threads_gives_each_its_lone_result(device, name, stop_stage):
    """The model, and its fused copy with dense and with sparse feature branches; masks about half
    active. What the model keeps after its first call (the composed convolutions' bias maps, the
    pooled head's weights) is forgotten before the threads start, so that they make it."""
    model = mixed_mask_model(name, stop_stage, num_classes=5, image_size=(64, 64))
    fused = aim_ext.fuse_for_inference(model).to(device)
    model = model.to(device)
    g = torch.Generator().manual_seed(1)
    inputs = [torch.randn(1, 3, 64, 64, generator=g).to(device) for _ in range(THREADS)]
    runs = [(model, "auto", True), (fused, "off", True), (fused, "on", True)]
    if device == "cuda":  # also each thread's branches on its own stream, not the shared side streams
        runs.append((fused, "off", False))
    for m, sparse, concurrent in runs:

        def predict(x, m=m):
            with torch.inference_mode():
                logits, masks = m.predict(x)
            return [logits, *masks]

        def forget(m=m):
            for module in m.modules():
                if isinstance(module, InferenceFeatureBranch):
                    module._bias_maps.clear()
            m._weights_cache.clear()

        m.sparse_inference, m.concurrent_branches = sparse, concurrent
        assert sequential_then_together(predict, inputs, MODEL_ROUNDS, device, reset=forget) == []


@pytest.mark.skipif(
    not (kernels_available()["cuda"] and torch.cuda.device_count() > 1), reason="needs two CUDA devices"
)
def test_a_thread_runs_a_model_on_a_device_that_is_not_its_current_one():
    """A thread's current CUDA device is its own (device 0 unless it sets one): the ops must run
    on their inputs' device, as one thread per GPU would call them."""
    fused = aim_ext.fuse_for_inference(mixed_mask_model("resnet18", 3, num_classes=5, image_size=(64, 64)))
    fused = fused.to("cuda:1")
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)).to("cuda:1")
    with torch.inference_mode(), torch.cuda.device(1):
        expected = fused.predict(x)
    torch.cuda.synchronize(1)
    got = []

    def on_device_0():
        with torch.inference_mode():
            got.append(fused.predict(x))
        torch.cuda.synchronize(1)

    thread = threading.Thread(target=on_device_0)
    thread.start()
    thread.join()
    assert len(got) == 1 and same(got[0], expected)


# ---------------------------------------------------------------------------------------------
# Each op, 8 threads; the training ops with their backward.


def _r(g, *shape, scale=1.0):
    return torch.randn(*shape, generator=g) * scale


def _merge(device, seed):
    g = torch.Generator().manual_seed(seed)
    feat, logits, coarse = _r(g, 2, 16, 9, 9), _r(g, 2, 1, 9, 9), _r(g, 2, 16, 5, 5)
    noise = ops.logistic_noise(logits)
    upstream = _r(g, 2, 16, 9, 9), _r(g, 2, 1, 9, 9)
    return [t.to(device) for t in (feat, logits, coarse, noise, *upstream)]


def _with_grads(args, op):
    """``op``'s outputs and the gradients of its first three inputs for a fixed upstream gradient."""
    leaves = [t.detach().requires_grad_() for t in args[:3]]
    outs = op(*leaves, args[3])
    loss = sum((o * up).sum() for o, up in zip(outs, args[4:], strict=False))
    loss.backward()
    return [*(o.detach() for o in outs), *(t.grad for t in leaves)]


def masked_merge_case(device, seed):
    return _merge(device, seed), lambda a: _with_grads(
        a, lambda f, lg, c, n: ops.masked_merge(f, lg, c, noise=n, temperature=0.5)
    )


def topdown_epilogue_case(device, seed):
    g = torch.Generator().manual_seed(100 + seed)
    norm = [(1 + 0.1 * _r(g, 16)).to(device), (0.1 * _r(g, 16)).to(device)]
    args = _merge(device, seed) + [_r(g, 2, 16, 9, 9).to(device)]
    return args, lambda a: _with_grads(
        a, lambda f, lg, c, n: ops.topdown_epilogue(f, *norm, lg, c, noise=n, temperature=0.5)
    )


def topdown_epilogue_inference_case(device, seed):
    g = torch.Generator().manual_seed(100 + seed)
    norm = [(1 + 0.1 * _r(g, 16)).to(device), (0.1 * _r(g, 16)).to(device), _r(g, 16).to(device)]
    feat, logits, coarse = _merge(device, seed)[:3]

    def call(a):
        with torch.inference_mode():
            return ops.topdown_epilogue_inference(a[0], *norm[:2], a[1], a[2], conv_bias=norm[2])

    return [feat, logits, coarse], call


def _pooled(device, seed, c):
    g = torch.Generator().manual_seed(seed)
    d = 32
    weights = [
        _r(g, d, c, 1, 1, scale=c**-0.5),
        _r(g, d, scale=0.1),
        _r(g, d, d, 3, 3, scale=(9 * d) ** -0.5),
        _r(g, d, scale=0.1),
        1 + 0.1 * _r(g, d),
        0.1 * _r(g, d),
    ]
    pool_weight = ops.pool_weights([(5, 5), (9, 9)])[1].float()
    x, logits = _r(g, 2, c, 9, 9), _r(g, 2, 1, 9, 9) + 0.5  # about 70% of the positions active
    return [t.to(device) for t in (x, logits, pool_weight, *weights)]


def pooled_epilogue_case(device, seed):
    x, logits, pool_weight, *w = _pooled(device, seed, 32)

    def call(a):
        with torch.inference_mode():
            return ops.pooled_epilogue(a[0], *w[4:], a[1], pool_weight, conv_bias=w[3])

    return [x, logits], call


def sparse_pooled_branch_case(device, seed):
    s, logits, pool_weight, *w = _pooled(device, seed, 24)

    def call(a):
        with torch.inference_mode():
            return ops.sparse_pooled_branch(a[0], (a[1] - 1.0), pool_weight, *w)

    return [s, logits], call


def _estimator_case(device, seed, algorithm):
    g = torch.Generator().manual_seed(seed)
    width, c = 32, 24
    convs = [_r(g, width, width, 3, 3, scale=(9 * width) ** -0.5) for _ in range(6)]
    params = [
        _r(g, width, c, 3, 3, scale=(9 * c) ** -0.5),
        _r(g, width, scale=0.5),
        convs,
        [_r(g, width, scale=0.5) for _ in convs],
        _r(g, 1, width, 1, 1, scale=width**-0.5),
        _r(g, 1, scale=0.5),
        _r(g, 1, width, scale=width**-0.5),
    ]
    params = [[t.to(device) for t in p] if isinstance(p, list) else p.to(device) for p in params]

    def call(a):
        with torch.inference_mode():
            return ops.mask_estimator(a[0], *params, algorithm=algorithm)

    return [_r(g, 1, c, 6, 6).to(device)], call


OP_CASES = {
    "masked_merge": masked_merge_case,
    "topdown_epilogue": topdown_epilogue_case,
    "topdown_epilogue_inference": topdown_epilogue_inference_case,
    "pooled_epilogue": pooled_epilogue_case,
    "sparse_pooled_branch": sparse_pooled_branch_case,
    "mask_estimator_kernel": lambda device, seed: _estimator_case(device, seed, "kernel"),
    "mask_estimator_convolutions": lambda device, seed: _estimator_case(device, seed, "convolutions"),
}


# oneDNN's 1x1 convolution to one channel, which this route of the op calls for the local logits,
# splits its sum over the channels among the intra-op threads: its bits depend on their number.
ONEDNN_CONVOLUTIONS = {"mask_estimator_convolutions"}


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("op", OP_CASES)
def test_an_op_from_eight_threads_gives_each_its_lone_result(device, op):
    """On the CPU the lone calls run on one intra-op thread: the ops' own kernels give the same
    bits whatever the number of threads."""
    cases = [OP_CASES[op](device, seed) for seed in range(THREADS)]
    call = cases[0][1]  # the same weights for every thread, as a model's; each its own inputs
    inputs = [args for args, _ in cases]
    lone = 0 if op in ONEDNN_CONVOLUTIONS else 1
    assert sequential_then_together(call, inputs, OP_ROUNDS, device, lone_threads=lone) == []


# ---------------------------------------------------------------------------------------------
# Processes.

_LOAD_AND_EXPLAIN = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import torch
    import aim_ext
    from aim_ext.cli.explain import main

    folder, image, x, ready, count, out = sys.argv[1:]
    Path(ready, Path(out).name).touch()
    while len(list(Path(ready).iterdir())) < int(count):  # imported: start the loads together
        time.sleep(0.005)
    model = aim_ext.load_model(folder)
    with torch.no_grad():
        torch.save(model(torch.load(x)), out + ".pt")
    sys.exit(main([folder, image, "--top-k", "3", "--out", out, "--device", "cpu"]))
    """
)


def _photo(path: Path) -> Path:
    pixels = torch.randint(0, 256, (70, 90, 3), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    Image.fromarray(pixels.numpy()).save(path)
    return path


def _child(*args) -> subprocess.Popen:
    """A Python process with one intra-op thread, running ``args``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PYTEST_XDIST_WORKER", None)
    command = [sys.executable, "-c", *map(str, args)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_processes_load_and_explain_one_saved_model_at_once(tmp_path, capsys):
    """Child processes and this one, all released together, each load the model, compute its
    logits and run aim-explain: the same bits and the same report as one process alone."""
    torch.manual_seed(0)
    folder = save_pretrained(
        create_model("resnet18", num_classes=3, stop_stage=3, width=32),
        tmp_path / "m",
        labels=["heron", "gull", "duck"],
        image_size=64,
    )
    x = tmp_path / "x.pt"
    torch.save(torch.randn(2, 3, 64, 64), x)
    image = _photo(tmp_path / "bird.png")

    def load_and_explain(out: Path) -> tuple[torch.Tensor, list[str]]:
        with torch.no_grad():
            logits = load_model(folder)(torch.load(x))
        assert (
            aim_explain([str(folder), str(image), "--top-k", "3", "--out", str(out), "--device", "cpu"]) == 0
        )
        return logits, capsys.readouterr().out.splitlines()[:-1]  # the last line names `out`

    ready = tmp_path / "ready"
    ready.mkdir()
    count = max(SOAK // 50, 3)  # this process and the children
    with intra_op_threads(1):
        expected = load_and_explain(tmp_path / "alone")
        children = [
            _child(_LOAD_AND_EXPLAIN, folder, image, x, ready, count, tmp_path / f"out{i}")
            for i in range(count - 1)
        ]
        (ready / "this").touch()
        while len(list(ready.iterdir())) < count and all(c.poll() is None for c in children):
            time.sleep(0.005)
        assert same(load_and_explain(tmp_path / "this"), expected)
    for i, child in enumerate(children):
        stdout, stderr = child.communicate(timeout=300)
        assert child.returncode == 0, stderr
        assert same((torch.load(tmp_path / f"out{i}.pt"), stdout.splitlines()[:-1]), expected)


_SAVER = textwrap.dedent(
    """
    import sys
    import torch
    import aim_ext

    folder, saves, first = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(aim_ext.create_model("mobilenetv2_050", num_classes=3, stop_stage=3, width=32))
    # The two models as they are saved, for the reader to compare with (no other save goes there).
    for k, model in enumerate(models):
        aim_ext.save_pretrained(model, f"{folder}_{'ab'[k]}")
    for k in range(first, first + saves):
        aim_ext.save_pretrained(models[k % 2], folder, labels=[f"{'ab'[k % 2]}{i}" for i in range(3)])
        print(k, flush=True)
    """
)


def test_a_reader_sees_the_old_or_the_new_model_while_another_process_saves(tmp_path):
    """A process saves model A, then B, A, B, ... (the same architecture: a mix would load without
    an error) into one folder while this one loads it again and again; in a soak a second process
    saves B, A, B, ... into the same folder at the same time."""
    folder = tmp_path / "m"
    savers = [_child(_SAVER, folder, SAVES, first) for first in ((0, 1) if SOAK else (0,))]
    for saver in savers:
        assert saver.stdout.readline().strip().isdigit(), saver.stderr.read()
    # A and B as the saving process made them.
    states = [load_model(f"{folder}_{name}").state_dict() for name in "ab"]
    seen = {"a": 0, "b": 0}
    while True:
        done = all(saver.poll() is not None for saver in savers)
        model = load_model(folder)
        which = model.pretrained_cfg["label_names"][0][0]
        state = model.state_dict()
        assert all(torch.equal(state[k], v) for k, v in states["ab".index(which)].items()), f"a mix: {which}"
        seen[which] += 1
        if done:
            break
    for saver in savers:
        assert saver.returncode == 0, saver.stderr.read()
    assert sum(seen.values()) >= 2, seen
    print(f"{len(savers)} process(es) saving {SAVES} times each; loads: {seen}")


def test_config_and_weights_of_different_saves_are_refused(tmp_path, monkeypatch):
    """What an interrupted save leaves (the new weights beside the old config) is no model."""
    monkeypatch.setattr("aim_ext.models.saved.CONSISTENT_READ_S", 0.05)
    model = create_model("mobilenetv2_050", num_classes=2, stop_stage=3, width=32)
    a = save_pretrained(model, tmp_path / "a")
    b = save_pretrained(model, tmp_path / "b", metrics={"val_acc": 0.5})  # another save: another name
    (a / "model.safetensors").write_bytes((b / "model.safetensors").read_bytes())
    with pytest.raises(aim_ext.models.ModelFileError, match="from different saves"):
        load_model(a)
    config = json.loads((a / "config.json").read_text())
    del config["weights_id"]  # a config by hand, or by an aim-ext before weights_id: any weights
    (a / "config.json").write_text(json.dumps(config))
    load_model(a)
