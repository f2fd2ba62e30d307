"""AIM models on timm backbones: widths, outputs, masks, and the graph tools that must see them."""

from pathlib import Path

import pytest
import torch
from conftest import CUDA_REASON, devices

import aim_ext
from aim_ext.losses import aim_loss
from aim_ext.models import AIM, AIMOutput, create_model, use_fused_epilogue
from aim_ext.ops import kernels_available


def millions(model: torch.nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


@pytest.mark.parametrize(
    "name,stop_stage,expected",
    [
        ("convnext_tiny", None, 28.0),
        ("convnext_tiny", 2, 29.9),
        ("convnext_tiny", 1, 30.7),
        ("resnet50", None, 23.9),
        ("resnet50", 3, 26.6),
        ("resnet50", 2, 27.6),
    ],
)
def test_parameter_counts_match_paper_table6(name, stop_stage, expected):
    model = create_model(name, num_classes=200, stop_stage=stop_stage)
    assert abs(millions(model) - expected) < 0.1, millions(model)


def test_vanilla_is_the_timm_model():
    model = create_model("resnet18", num_classes=7)
    assert not isinstance(model, AIM)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 7)


@pytest.mark.parametrize(
    "name,stop_stage,size",
    [("convnext_atto", 1, 64), ("resnet18", 2, 75), ("mobilenetv2_100", 3, 64), ("convnext_atto", 3, 299)],
)
def test_training_and_evaluation_outputs(name, stop_stage, size):
    model = create_model(name, num_classes=5, stop_stage=stop_stage)
    x = torch.randn(2, 3, size, size)
    feats = model.backbone(x)  # only the levels the top-down pathway reads, finest first
    assert len(feats) == len(model.stage_indices) == model.stage_indices[0] - stop_stage + 1
    expected_sizes = [tuple(feats[i - stop_stage].shape[-2:]) for i in model.stage_indices]

    out = model.train()(x)
    assert isinstance(out, AIMOutput)
    assert out.logits.shape == (2, 5)
    assert len(out.aux_logits) == len(out.masks) == len(out.mask_logits) == len(model.stage_indices)
    assert [tuple(m.shape) for m in out.masks] == [(2, 1, *s) for s in expected_sizes]
    assert all(a.shape == (2, 5) for a in out.aux_logits)
    assert all(set(m.unique().tolist()) <= {0.0, 1.0} for m in out.masks)

    model.eval()
    logits, masks = model.predict(x)
    torch.testing.assert_close(model(x), logits)
    assert [tuple(m.shape) for m in masks] == [(2, 1, *s) for s in expected_sizes]
    # Evaluation masks are deterministic: the sign of the mask logits.
    stages = model.forward_topdown(x)
    for mask, stage in zip(masks, stages, strict=True):
        assert torch.equal(mask, (stage.mask_logits >= 0).to(mask.dtype))


def test_stop_stage_out_of_range_is_a_clear_error():
    with pytest.raises(ValueError, match=r"convnext_atto has feature stages 0\.\.3.*stop_stage=4"):
        create_model("convnext_atto", num_classes=3, stop_stage=4)
    with pytest.raises(ValueError, match="stop_stage=-1"):
        create_model("resnet18", num_classes=3, stop_stage=-1)


def test_predict_requires_evaluation_mode():
    model = create_model("resnet18", num_classes=3, stop_stage=3).train()
    with pytest.raises(RuntimeError, match="model.eval"):
        model.predict(torch.randn(1, 3, 64, 64))


def test_set_gumbel_controls_noise_and_temperature():
    model = create_model("resnet18", num_classes=3, stop_stage=3).train()
    x = torch.randn(2, 3, 64, 64)
    model.set_gumbel(noise=False)
    a, b = model(x).masks[0], model(x).masks[0]
    assert torch.equal(a, b), "without noise the training mask is the sign of the logits"
    # Without noise the estimators still learn, through the straight-through gradient.
    aim_loss(model(x), torch.tensor([0, 1]), tau=0.2).total.backward()
    grad = model.stages[0].mask_estimator.to_logits.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    model.set_gumbel(noise=True, temperature=0.5)
    assert model.temperature == 0.5 and model.gumbel_noise
    with pytest.raises(ValueError, match="temperature"):
        model.set_gumbel(temperature=0)


@pytest.mark.parametrize(
    ("fused", "op", "coarse_arg"), [(True, "topdown_epilogue", 4), (False, "masked_merge", 2)]
)
def test_the_model_merges_through_one_op_per_stage(monkeypatch, fused, op, coarse_arg):
    calls = []
    original = getattr(aim_ext.models.topdown, op)

    def spy(*args, **kwargs):
        calls.append(args[coarse_arg] is None)
        return original(*args, **kwargs)

    monkeypatch.setattr(aim_ext.models.topdown, op, spy)
    model = create_model("convnext_atto", num_classes=3, stop_stage=1).eval()
    use_fused_epilogue(model, fused)
    model(torch.randn(1, 3, 64, 64))
    assert calls == [True, False, False]  # top stage alone, then two merges


@pytest.mark.parametrize("training", [False, True])
def test_fused_epilogue_gives_the_two_op_results(training):
    """The same model, the same noise: fused and unfused stages agree in outputs and gradients."""
    model = create_model("resnet18", num_classes=4, stop_stage=2).train(training)
    for stage in model.stages:
        torch.nn.init.normal_(stage.features.norm.weight)
        torch.nn.init.normal_(stage.features.norm.bias)
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([0, 3])
    results = []
    for fused in (True, False):
        use_fused_epilogue(model, fused)
        model.zero_grad()
        torch.manual_seed(1)
        output = model(x)
        if training:
            aim_loss(output, y, tau=0.3).total.backward()
        else:  # evaluation returns the logits; no gradient reaches the mask estimators
            output = AIMOutput(output, [], [], [])
            torch.nn.functional.cross_entropy(output.logits, y).backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results.append((output, grads))
    (fused_out, fused_grads), (plain_out, plain_grads) = results
    torch.testing.assert_close(fused_out.logits, plain_out.logits, rtol=1e-4, atol=1e-5)
    for a, b in zip(fused_out.masks, plain_out.masks, strict=True):
        assert torch.equal(a, b)
    assert training == bool(fused_out.masks)
    assert fused_grads.keys() == plain_grads.keys()
    for name, grad in fused_grads.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-3, atol=1e-5, msg=name)


def test_only_layernorm2d_and_exact_gelu_are_fused():
    model = create_model("resnet18", num_classes=4, stop_stage=2)
    assert all(stage.features.fusable() for stage in model.stages)
    model.stages[0].features.act = torch.nn.GELU(approximate="tanh")
    assert not model.stages[0].features.fusable()


def test_loss_trains_every_part():
    model = create_model("resnet18", num_classes=4, stop_stage=2).train()
    out = model(torch.randn(4, 3, 64, 64))
    loss = aim_loss(out, torch.tensor([0, 1, 2, 3]), tau=0.25)
    loss.total.backward()
    for name in [
        "stages.0.mask_estimator.to_logits.weight",
        "stages.2.mask_estimator.stem.weight",
        "stages.1.features.refine.weight",
        "aux_heads.2.fc.weight",
        "head.fc.weight",
        "backbone.conv1.weight",
    ]:
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_pretrained_cfg_is_the_backbones():
    model = create_model("convnext_atto", num_classes=3, stop_stage=2)
    assert model.pretrained_cfg["mean"] == create_model("convnext_atto").pretrained_cfg["mean"]
    assert model.default_cfg["input_size"] == (3, 224, 224)


@pytest.mark.parametrize("device", devices())
def test_torch_compile_fullgraph_forward(device):
    # timm's test_convnext: ConvNeXt's code in a few small blocks, which compile faster.
    model = create_model("test_convnext", num_classes=3, stop_stage=1).to(device)
    x = torch.randn(2, 3, 64, 64, device=device)
    model.eval()
    # dynamic=False: an earlier test's compile at another size would otherwise make the sizes
    # symbolic, where torch 2.14.1's inductor fails on timm's ConvNeXt (see the README)
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)
    model.train().set_gumbel(noise=True)
    out = torch.compile(model, fullgraph=True, dynamic=False)(x)
    assert isinstance(out, AIMOutput) and out.logits.shape == (2, 3)
    aim_loss(out, torch.tensor([0, 1], device=device), tau=0.5).total.backward()


@pytest.mark.skipif(not kernels_available()["cuda"], reason=CUDA_REASON)
@pytest.mark.parametrize("fused", [True, False])
def test_cuda_graph_capture_of_forward_and_training_step(fused):
    """Both ops run inside CUDA graphs: evaluation replays match eager, and a captured training
    step (forward, straight-through backward) gives eager's loss and gradients; with noise, the
    in-graph random draws change from replay to replay."""
    model = create_model("resnet18", num_classes=4, stop_stage=2).cuda()
    use_fused_epilogue(model, fused)
    x, y = torch.randn(4, 3, 64, 64, device="cuda"), torch.tensor([0, 1, 2, 3], device="cuda")

    def capture(step):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            result = step()
        return graph, result

    model.eval()
    with torch.no_grad():
        graph, logits = capture(lambda: model(x))
        graph.replay()
        torch.testing.assert_close(logits, model(x))

    model.train().set_gumbel(noise=False)
    for module in model.modules():  # keep the batch statistics out of the comparison
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = 0.0
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        output = model(x)
        loss = aim_loss(output, y, tau=0.5).total
        return (loss, output.masks[0], *torch.autograd.grad(loss, params))

    graph, captured = capture(step)
    graph.replay()
    eager = step()
    torch.testing.assert_close(captured[0], eager[0], rtol=1e-4, atol=1e-5)
    for a, b in zip(captured[2:], eager[2:], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)

    model.set_gumbel(noise=True, temperature=0.5)
    graph, captured = capture(step)
    masks = []
    for _ in range(2):
        graph.replay()
        masks.append(captured[1].clone())
    assert not torch.equal(masks[0], masks[1]), "the noise is drawn afresh at each replay"
    assert torch.isfinite(captured[0])


class Predict(torch.nn.Module):
    def __init__(self, model: AIM) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.predict(x)


def test_torch_export_predict_keeps_one_op():
    model = create_model("resnet18", num_classes=3, stop_stage=2).eval()
    x = torch.randn(2, 3, 75, 75)
    exported = torch.export.export(Predict(model), (x,))
    targets = [str(n.target) for n in exported.graph.nodes if n.op == "call_function"]
    assert targets.count("aim.topdown_epilogue.default") == 3
    logits, masks = exported.module()(x)
    ref_logits, ref_masks = model.predict(x)
    torch.testing.assert_close(logits, ref_logits)
    assert all(torch.equal(a, b) for a, b in zip(masks, ref_masks, strict=True))


@pytest.mark.parametrize(
    "name",
    [
        "convnext_atto",
        "convnext_small",
        "convnext_base",
        "resnet34",
        "resnet101",
        "resnet152",
        "mobilenetv2_100",
        "efficientnet_b0",
        "regnety_002",
    ],
)
def test_any_timm_cnn_with_features_only(name):
    """Every stop stage of each backbone builds and runs (on the meta device: shapes only)."""
    with torch.device("meta"):
        stages = len(create_model(name, num_classes=3, stop_stage=0).stage_indices)
        for stop_stage in range(stages):
            model = create_model(name, num_classes=3, stop_stage=stop_stage).eval()
            logits, masks = model.predict(torch.empty(2, 3, 96, 96))
            assert logits.shape == (2, 3) and len(masks) == stages - stop_stage
            sizes = [m.shape[-1] for m in masks]
            assert sizes == sorted(sizes), "top stage first: masks grow finer"


def test_drop_path_reaches_the_backbone():
    model = create_model("convnext_atto", num_classes=3, stop_stage=2, drop_path_rate=0.2)
    rates = [m.drop_prob for m in model.backbone.modules() if type(m).__name__ == "DropPath"]
    assert rates and max(rates) == pytest.approx(0.2)
    assert all(head.drop.p == 0.3 for head in [model.head, *model.aux_heads])


def test_readme_usage_snippet_runs():
    """The README's Use section, with a small backbone and image so that it runs quickly."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    snippet = readme.split("## Use\n\n```python\n", 1)[1].split("```", 1)[0]
    small = snippet.replace("convnext_tiny", "convnext_atto").replace("224, 224", "64, 64")
    exec(compile(small, "README.md", "exec"), {})


def test_edge_emphasised_initialisation_weights_the_periphery():
    """mask_init "edges" (appendix D.5): the same random draw, each 3x3 kernel of the mask
    estimators weighted 0.5 (centre) to 1.5 (corners) and rescaled to its former RMS; nothing else
    changes (a float64 reference)."""
    from aim_ext.engine import TrainConfig
    from aim_ext.engine.build import build_model
    from aim_ext.models.mask_estimator import edge_emphasis

    assert edge_emphasis(3)[1, 1] == 0.5 and edge_emphasis(3)[0, 0] == 1.5
    assert edge_emphasis(3)[0, 1].item() == pytest.approx(0.5 + 1 / 2**0.5)
    models = {}
    for init in ("random", "edges"):
        torch.manual_seed(0)
        models[init] = build_model(
            TrainConfig(model="resnet18", stop_stage=3, mask_init=init), 2
        ).state_dict()
    changed = 0
    for name, plain in models["random"].items():
        edged = models["edges"][name]
        if ".mask_estimator." in name and plain.dim() == 4 and plain.shape[-2:] == (3, 3):
            w = plain.double() * edge_emphasis(3)
            w = (
                w
                * plain.double().pow(2).mean((1, 2, 3), keepdim=True).sqrt()
                / w.pow(2).mean((1, 2, 3), keepdim=True).sqrt()
            )
            torch.testing.assert_close(edged.double(), w, rtol=1e-5, atol=1e-7)
            corners, centre = edged[..., ::2, ::2].abs().mean(), edged[..., 1, 1].abs().mean()
            assert 2 < corners / centre < 4, name
            changed += 1
        else:
            assert torch.equal(edged, plain), name
    assert changed == 2 * 7  # two stages, each a stem and three blocks of two 3x3 convolutions
