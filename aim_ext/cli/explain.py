"""`aim-explain`: a trained model's top classes and masks for your own images, as text and PNGs.

    aim-explain runs/demo/aim/model photo.jpg                 # prints; writes explanations/
    aim-explain runs/demo/aim/model *.jpg --gradcam --top-k 3 --out my_explanations

MODEL is a saved model (aim_ext.save_pretrained, e.g. an aim-train run's model/), a run folder or a
checkpoint. Each image (JPEG, PNG, any size; grayscale becomes RGB, transparent parts are shown over
white) is resized and cropped as the model's config says. Per image it prints the top classes with
probabilities and the active fraction of each stage's mask and of the merged mask, and writes a PNG
(the image, each stage's mask, the merged mask over the image, GradCAM with --gradcam); index.html
shows them all.
An image that cannot be read is named and skipped; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import html
import os
import sys
from pathlib import Path

from aim_ext.cache import write_atomic
from aim_ext.cli.errors import one_line_errors, positive_int, printable, say, shown, writable_folder


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aim-explain", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", type=Path, help="a saved model, an aim-train run folder or checkpoint")
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="JPEG or PNG files")
    parser.add_argument("--out", type=Path, default=Path("explanations"), help="default explanations/")
    parser.add_argument("--gradcam", action="store_true", help="add GradCAM of the top class on P_T")
    parser.add_argument(
        "--top-k", type=positive_int, default=5, help="classes to print per image (default 5)"
    )
    parser.add_argument(
        "--device", choices=("cpu", "cuda", "auto"), default="auto", help="default auto: cuda if present"
    )
    return parser


@one_line_errors("aim-explain")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from timm.data import create_transform, resolve_data_config

    from aim_ext.engine.train import resolve_device
    from aim_ext.explain.images import explain_images, explanation_figure, read_image
    from aim_ext.models import load_model

    try:
        model = load_model(args.model)
    except (ValueError, FileNotFoundError) as error:
        say("aim-explain", error)
        return 2
    device = resolve_device(args.device)
    model.to(device)
    data = resolve_data_config({}, model=model)
    transform = create_transform(**data)
    writable_folder(args.out)
    rows, failed = [], 0
    for path in args.images:
        try:
            image = read_image(path)
        except ValueError as reason:
            print(f"aim-explain: {shown(path)}: {reason}", file=sys.stderr)
            failed += 1
            continue
        batch = transform(image).unsqueeze(0).to(device)
        explanation = explain_images(model, batch, top_k=args.top_k, gradcam=args.gradcam)
        fractions = explanation.active_fractions()[0].tolist()
        names = [*explanation.stage_names, "merged"] if explanation.masks else []
        print(shown(path))
        for label, probability in explanation.top[0]:
            print(f"  {probability:6.1%}  {printable(label)}")
        if names:
            print("  active: " + ", ".join(f"{n} {f:.0%}" for n, f in zip(names, fractions, strict=True)))
        figure = args.out / f"{len(rows):03d}_{_utf8(path.stem)}.png"
        explanation_figure(
            batch.cpu(), explanation, 0, figure, mean=data["mean"], std=data["std"], title=shown(path.name)
        )
        rows.append((path, figure, explanation.top[0], dict(zip(names, fractions, strict=True))))
    if rows:
        index = _write_index(args.out, rows)
        print(f"wrote {len(rows)} figure(s) and {shown(index)}")
    return 1 if failed else 0


def _write_index(out: Path, rows) -> Path:
    """A contact sheet: one row per image, its figure and its top classes."""
    cells = []
    for path, figure, top, fractions in rows:
        classes = "<br>".join(f"{html.escape(printable(label))} {p:.1%}" for label, p in top)
        active = ", ".join(f"{html.escape(n)} {f:.0%}" for n, f in fractions.items())
        cells.append(
            f"<tr><td><img src='{html.escape(figure.name)}' height='220'></td>"
            f"<td><b>{html.escape(shown(path.name))}</b><br>{classes}<br><small>{active}</small></td></tr>"
        )
    page = (
        "<!doctype html><meta charset='utf-8'><title>aim-explain</title>"
        "<table>" + "".join(cells) + "</table>\n"
    )
    return write_atomic(out / "index.html", page.encode())


def _utf8(name: str) -> str:
    """A file name's bytes that are not UTF-8 as U+FFFD, so that index.html can link the figure."""
    return os.fsencode(name).decode("utf-8", "replace")


if __name__ == "__main__":
    sys.exit(main())
