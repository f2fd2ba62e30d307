"""aim-export: ONNX (onnxruntime and ONNX's reference evaluator), AOTInductor and TensorRT against
PyTorch. Logits within 1e-4 (fp32); masks identical except where |A| < 1e-4."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from mixed_masks import mixed_mask_model, randomise_batch_norms

import aim_ext
from aim_ext.cli.export import main as export_main
from aim_ext.export import (
    check_onnx,
    compare_outputs,
    example_image,
    export_aoti,
    export_onnx,
    output_names,
    reference_outputs,
    run_aoti,
    run_onnx_reference,
    run_onnxruntime,
    tensorrt_available,
)
from aim_ext.models import create_model, load_weights, save_pretrained

pytestmark = pytest.mark.slow


def _model(name="resnet18", stop_stage=3, num_classes=10, seed=0, image_size=(99, 99)):
    return mixed_mask_model(name, stop_stage, num_classes, image_size, seed)


def _assert_agrees(model, image, outputs, dtype="float32"):
    reference, mask_logits = reference_outputs(model, image)
    checks = compare_outputs(output_names(model), reference, outputs, mask_logits, dtype=dtype)
    assert all(c.ok for c in checks), checks
    for mask in reference[1:]:
        assert 0 < mask.float().mean() < 1, "a mask is all 0 or all 1: comparing it would prove little"
    return checks


@pytest.fixture(scope="module")
def resnet_onnx(tmp_path_factory):
    """resnet18+AIM[3] at 299 x 299 (resize ratios 10 -> 19, not 2), dynamic batch."""
    model = _model(image_size=(299, 299))
    path = export_onnx(
        model, tmp_path_factory.mktemp("onnx") / "r18.onnx", image_size=(299, 299), dynamic_batch=True
    )
    return model, path


@pytest.mark.parametrize("batch", [1, 3])
def test_onnx_matches_pytorch_in_onnxruntime(resnet_onnx, batch):
    model, path = resnet_onnx
    image = example_image(batch, (299, 299), seed=batch)
    checks = _assert_agrees(model, image, run_onnxruntime(path, image.numpy()))
    assert [c.shape for c in checks] == [(batch, 10), (batch, 1, 10, 10), (batch, 1, 19, 19)]


def test_onnx_matches_pytorch_in_the_reference_evaluator(resnet_onnx):
    model, path = resnet_onnx
    image = example_image(2, (299, 299), seed=5)
    _assert_agrees(model, image, run_onnx_reference(path, image.numpy()))


def test_onnx_is_plain_onnx_with_named_outputs_and_a_dynamic_batch(resnet_onnx):
    _, path = resnet_onnx
    proto = check_onnx(path)
    assert proto.opset_import[0].version >= 18
    assert [o.name for o in proto.graph.output] == ["logits", "mask_stage4", "mask_stage3"]
    assert [i.name for i in proto.graph.input] == ["image"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch
    ops = {n.op_type for n in proto.graph.node}
    assert {"GreaterOrEqual", "Cast", "Mul", "Resize", "Add"} <= ops
    for node in (n for n in proto.graph.node if n.op_type == "Resize"):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["mode"] == b"nearest"
        assert attrs["coordinate_transformation_mode"] == b"asymmetric"
        assert attrs["nearest_mode"] == b"floor"


def test_onnx_convnext_with_three_stages_and_odd_size(tmp_path):
    """ConvNeXt (LayerNorm everywhere, the fused epilogue in PyTorch) with AIM[1] at 104 x 104:
    stage 1 is 13 x 13 and stage 2 6 x 6, so the last merge resizes by 13/6."""
    model = _model("convnext_atto", stop_stage=1, num_classes=5, image_size=(104, 104))
    path = export_onnx(model, tmp_path / "c.onnx", image_size=(104, 104), batch_size=3)
    image = example_image(3, (104, 104), seed=3)
    checks = _assert_agrees(model, image, run_onnxruntime(path, image.numpy()))
    assert [(c.name, c.shape[-1]) for c in checks[1:]] == [
        ("mask_stage3", 3),
        ("mask_stage2", 6),
        ("mask_stage1", 13),
    ]
    _assert_agrees(model, image, run_onnx_reference(path, image.numpy()))


def test_onnx_fp16(tmp_path):
    model = _model()
    path = export_onnx(model, tmp_path / "h.onnx", image_size=(99, 99), fp16=True, dynamic_batch=True)
    proto = onnx.load(str(path))
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    image = example_image(3, (99, 99), seed=2)
    outputs = run_onnxruntime(path, image.numpy().astype(np.float16))
    assert outputs[0].dtype == np.float16
    _assert_agrees(model, image, outputs, dtype="float16")


def test_vanilla_model_exports_its_logits(tmp_path):
    model = aim_ext.create_model("resnet18", num_classes=4).eval()
    path = export_onnx(model, tmp_path / "v.onnx", image_size=(64, 64))
    image = example_image(1, (64, 64))
    outputs = run_onnxruntime(path, image.numpy())
    assert len(outputs) == 1
    _assert_agrees(model, image, outputs)


def test_aoti_package_matches_pytorch_with_a_dynamic_batch(tmp_path):
    model = _model()
    path = export_aoti(model, tmp_path / "r18.pt2", image_size=(99, 99), dynamic_batch=True)
    for batch in (1, 4):
        image = example_image(batch, (99, 99), seed=batch)
        _assert_agrees(model, image, run_aoti(path, image))
    metadata = torch._inductor.aoti_load_package(str(path)).get_metadata()
    assert metadata["aim_ext.outputs"] == "logits,mask_stage4,mask_stage3"
    assert metadata["aim_ext.image_size"] == "99,99"
    assert metadata["aim_ext.model"] == "resnet18+AIM[3]"


@pytest.mark.parametrize(
    "name,stop_stage,sparse", [("resnet18", 3, "off"), ("test_convnext", 1, "on"), ("resnet18", 2, "on")]
)
def test_fused_model_exports_with_the_pooled_head(tmp_path, name, stop_stage, sparse):
    """fuse_for_inference's model in ONNX (no P_T: no Resize in the graph; the sparse branch in
    NonZero, Gather and ScatterND) and AOTInductor, checked against the unfused model; its
    BatchNorms hold non-trivial statistics."""
    model = mixed_mask_model(name, stop_stage, 10, (99, 99), 0, prepare=randomise_batch_norms)
    fused = aim_ext.fuse_for_inference(model)
    fused.sparse_inference = sparse
    onnx_path = export_onnx(fused, tmp_path / "f.onnx", image_size=(99, 99), dynamic_batch=True)
    ops = {n.op_type for n in check_onnx(onnx_path).graph.node}
    assert "Resize" not in ops and "BatchNormalization" not in ops
    assert ("NonZero" in ops) == (sparse == "on")
    aoti_path = export_aoti(fused, tmp_path / "f.pt2", image_size=(99, 99), dynamic_batch=True)
    for batch in (1, 3):
        image = example_image(batch, (99, 99), seed=10 + batch)
        _assert_agrees(model, image, run_onnxruntime(onnx_path, image.numpy()))
        _assert_agrees(model, image, run_aoti(aoti_path, image))
    _assert_agrees(model, image, run_onnx_reference(onnx_path, image.numpy()))


def test_comparison_fails_on_a_real_mask_flip_and_allows_one_at_the_threshold():
    model = _model()
    image = example_image(2, (64, 64))
    reference, mask_logits = reference_outputs(model, image)
    names = output_names(model)
    flipped = [t.clone() for t in reference]
    far = mask_logits[0].abs().flatten().argmax()
    flipped[1].view(-1)[far] = 1 - flipped[1].view(-1)[far]
    assert not compare_outputs(names, reference, flipped, mask_logits)[1].ok
    at_threshold = [t.clone() for t in mask_logits]
    at_threshold[0].view(-1)[far] = 5e-5
    check = compare_outputs(names, reference, flipped, at_threshold)[1]
    assert check.ok and check.near_threshold == 1
    shifted = [reference[0] + 2e-4, *reference[1:]]
    assert not compare_outputs(names, reference, shifted, mask_logits)[0].ok


def test_cli_exports_a_checkpoint_and_checks_it(tmp_path, capsys):
    model = _model(num_classes=3, seed=7, image_size=(64, 64))
    torch.save({"architecture": "resnet18+AIM[3]", "model": model.state_dict()}, tmp_path / "best.pt")
    argv = ["--model", "resnet18", "--stop-stage", "3", "--num-classes", "3", "--image-size", "64"]
    code = export_main([*argv, "--checkpoint", str(tmp_path / "best.pt"), "--onnx", str(tmp_path / "m.onnx")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "float32, fused for inference, sparse branches off, outputs logits" in out
    assert "| logits | (1, 3) |" in out and "| mask_stage3 | (1, 1, 4, 4) |" in out
    loaded = load_weights(create_model("resnet18", num_classes=3, stop_stage=3), tmp_path / "best.pt").eval()
    image = example_image(1, (64, 64), seed=3)  # the export's static batch
    _assert_agrees(model, image, run_onnxruntime(tmp_path / "m.onnx", image.numpy()))
    assert torch.equal(loaded(image), model(image))


def test_cli_exports_sparse_branches_when_asked(tmp_path, capsys):
    model = _model(num_classes=3, seed=7, image_size=(64, 64))
    torch.save(model.state_dict(), tmp_path / "w.pt")
    argv = ["--model", "resnet18", "--stop-stage", "3", "--num-classes", "3", "--image-size", "64"]
    argv += ["--checkpoint", str(tmp_path / "w.pt"), "--sparse", "on", "--onnx", str(tmp_path / "s.onnx")]
    assert export_main(argv) == 0, capsys.readouterr().out
    assert "sparse branches on" in capsys.readouterr().out
    assert "NonZero" in {n.op_type for n in check_onnx(tmp_path / "s.onnx").graph.node}


def test_cli_names_the_keys_of_a_checkpoint_from_another_model(tmp_path, capsys):
    torch.save(_model("resnet18", stop_stage=4, num_classes=3).state_dict(), tmp_path / "other.pt")
    argv = [
        "--model",
        "resnet18",
        "--stop-stage",
        "3",
        "--num-classes",
        "3",
        "--onnx",
        str(tmp_path / "m.onnx"),
    ]
    assert export_main([*argv, "--checkpoint", str(tmp_path / "other.pt")]) == 1
    err = capsys.readouterr().err
    assert "missing keys" in err and "stages.1." in err
    assert not (tmp_path / "m.onnx").exists()
    assert export_main([*argv, "--checkpoint", str(tmp_path / "absent.pt")]) == 1
    assert "checkpoint not found" in capsys.readouterr().err


def test_cli_exports_a_saved_model_with_no_other_flags(tmp_path, capsys):
    """aim-export SAVED --onnx OUT: the architecture, classes and input size come from the folder."""
    model = _model(num_classes=3, seed=7, image_size=(64, 64))
    save_pretrained(model, tmp_path / "saved", labels=["a", "b", "c"], image_size=64)
    assert export_main([str(tmp_path / "saved"), "--onnx", str(tmp_path / "m.onnx")]) == 0
    out = capsys.readouterr().out
    assert "aim-export: resnet18+AIM[3], classes 3, image (64, 64)" in out
    image = example_image(1, (64, 64), seed=3)
    _assert_agrees(model, image, run_onnxruntime(tmp_path / "m.onnx", image.numpy()))
    with pytest.raises(SystemExit):  # a saved model brings its architecture: no --model as well
        export_main([str(tmp_path / "saved"), "--model", "resnet50", "--onnx", str(tmp_path / "x.onnx")])


def test_cli_refuses_a_garbage_checkpoint_in_one_line(tmp_path, capsys):
    (tmp_path / "garbage.pt").write_bytes(b"\x80\x04garbage")
    argv = ["--model", "resnet18", "--num-classes", "3", "--onnx", str(tmp_path / "m.onnx")]
    assert export_main([*argv, "--checkpoint", str(tmp_path / "garbage.pt")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("aim-export: ") and "garbage.pt is not a checkpoint aim-ext can load safely" in err
    assert err.count("\n") == 1 and not (tmp_path / "m.onnx").exists()
    assert export_main([str(tmp_path / "garbage.pt"), "--onnx", str(tmp_path / "m.onnx")]) == 1
    assert "is not a checkpoint aim-ext can load safely" in capsys.readouterr().err


def test_cli_needs_an_output():
    with pytest.raises(SystemExit) as error:
        export_main(["--model", "resnet18", "--num-classes", "3"])
    assert error.value.code == 2


@pytest.mark.skipif(
    tensorrt_available(), reason="tensorrt is installed: the missing-TensorRT message cannot show"
)
def test_cli_says_clearly_when_tensorrt_is_missing(tmp_path, capsys):
    argv = ["--model", "resnet18", "--num-classes", "3", "--tensorrt", str(tmp_path / "m.plan")]
    assert export_main(argv) == 2
    assert "TensorRT is not installed" in capsys.readouterr().err


@pytest.mark.skipif(
    not (tensorrt_available() and torch.cuda.is_available()),
    reason="needs tensorrt (pip install .[gpu]) and a CUDA device"
    f" (tensorrt importable: {tensorrt_available()}, CUDA: {torch.cuda.is_available()})",
)
@pytest.mark.parametrize("fp16", [False, True])
def test_tensorrt_engine_matches_pytorch(tmp_path, fp16):
    from aim_ext.export import TensorRTRunner, build_engine

    model = _model().cuda()
    onnx_path = export_onnx(model, tmp_path / "m.onnx", image_size=(99, 99), dynamic_batch=True, fp16=fp16)
    plan = build_engine(onnx_path, tmp_path / "m.plan", image_size=(99, 99), dynamic_batch=True)
    image = example_image(3, (99, 99)).cuda()
    outputs = TensorRTRunner(plan)(image.half() if fp16 else image)
    _assert_agrees(model, image, outputs, dtype="float16" if fp16 else "float32")


def test_aim_export_is_installed_as_a_command():
    script = Path(sys.executable).parent / "aim-export"
    assert script.exists(), f"{script} missing: reinstall the package (pip install -e .)"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--onnx" in result.stdout and "--tensorrt" in result.stdout
