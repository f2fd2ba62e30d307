"""`aim-explain` and explain_images: a saved model's classes and masks for a user's own images."""

import pytest
import torch
from PIL import Image

import aim_ext
from aim_ext.cli.explain import main
from aim_ext.models import create_model, save_pretrained


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=3, stop_stage=3).eval()
    folder = tmp_path_factory.mktemp("explain") / "model"
    return save_pretrained(model, folder, labels=["heron", "gull", "duck"], image_size=64)


def _photo(path, size=(90, 70), mode="RGB"):
    Image.new(mode, size, 120 if mode == "L" else (40, 160, 90, 255)[: len(mode)]).save(path)
    return path


def test_explain_images_gives_names_masks_and_gradcam(saved):
    model = aim_ext.load_model(saved)
    images = torch.randn(2, 3, 64, 64)
    e = model.explain(images, top_k=2, gradcam=True)
    with torch.no_grad():
        assert torch.equal(e.logits, model(images))  # the evaluation logits
    assert [len(t) for t in e.top] == [2, 2] and {n for t in e.top for n, _ in t} <= {"heron", "gull", "duck"}
    assert e.top[0][0][1] == pytest.approx(float(e.probabilities[0].max()))
    assert len(e.masks) == 2 and e.merged.shape == (2, 1, 64, 64) and e.gradcam.shape == (2, 64, 64)
    fractions = e.active_fractions()
    assert fractions.shape == (2, 3) and bool((fractions[:, -1] >= fractions[:, :-1].max(dim=1).values).all())
    assert aim_ext.explain_images(model, images, top_k=2).top == e.top


def test_aim_explain_writes_a_figure_per_image_and_names_the_bad_ones(saved, tmp_path, capsys):
    good = [
        _photo(tmp_path / "bird.jpg"),
        _photo(tmp_path / "grey.png", mode="L"),
        _photo(tmp_path / "rgba.png", mode="RGBA"),
    ]
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    tiny = _photo(tmp_path / "tiny.png", size=(8, 8))
    full = (tmp_path / "bird.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(full[: len(full) // 3])
    argv = [str(saved), *map(str, good), str(tmp_path / "broken.jpg"), str(tiny), str(tmp_path / "cut.jpg")]
    argv += [
        str(tmp_path / "missing.jpg"),
        "--gradcam",
        "--top-k",
        "2",
        "--out",
        str(tmp_path / "out"),
        "--device",
        "cpu",
    ]
    assert main(argv) == 1  # some images failed; the others ran
    captured = capsys.readouterr()
    for name in ("bird.jpg", "grey.png", "rgba.png"):
        assert name in captured.out
    assert captured.out.count("active: stage 4") == 3
    err = captured.err.splitlines()
    assert any("broken.jpg: not a readable image" in line for line in err)
    assert any("tiny.png: too small (8x8 pixels" in line for line in err)
    assert any("cut.jpg: not a readable image" in line for line in err)
    assert any("missing.jpg: not found" in line for line in err) and len(err) == 4
    pngs = sorted((tmp_path / "out").glob("*.png"))
    assert [p.name for p in pngs] == ["000_bird.png", "001_grey.png", "002_rgba.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    index = (tmp_path / "out" / "index.html").read_text()
    assert all(p.name in index for p in pngs) and any(name in index for name in ("heron", "gull", "duck"))


def test_aim_explain_refuses_a_model_it_cannot_load(tmp_path, capsys):
    assert main([str(tmp_path / "nothing"), str(_photo(tmp_path / "a.jpg"))]) == 2
    assert capsys.readouterr().err == f"aim-explain: model not found: {tmp_path / 'nothing'}\n"


def test_transparent_parts_are_read_over_white(tmp_path):
    from aim_ext.explain.images import read_image

    rgba = Image.new("RGBA", (20, 20), (0, 0, 0, 0))  # transparent black: a viewer shows white
    rgba.paste((200, 40, 40, 255), (0, 0, 10, 20))  # an opaque left half
    rgba.paste((0, 0, 200, 128), (10, 0, 20, 10))  # a half-transparent blue corner
    rgba.save(tmp_path / "a.png")
    pixels = read_image(tmp_path / "a.png").load()
    assert pixels[2, 2] == (200, 40, 40) and pixels[15, 15] == (255, 255, 255)
    assert pixels[15, 5] == pytest.approx((127, 127, 227), abs=1)  # 200 * a + 255 * (1 - a), a = 128/255
    palette = Image.new("P", (20, 20), 1)
    palette.putpalette([0, 0, 0, 10, 200, 10] + [0] * 762)
    palette.paste(0, (0, 0, 20, 10))
    palette.save(tmp_path / "p.png", transparency=0)  # palette colour 0 (black) is transparent
    pixels = read_image(tmp_path / "p.png").load()
    assert pixels[5, 5] == (255, 255, 255) and pixels[5, 15] == (10, 200, 10)
    grey = Image.new("LA", (20, 20), (90, 255))
    grey.save(tmp_path / "g.png")
    assert read_image(tmp_path / "g.png").load()[0, 0] == (90, 90, 90)
