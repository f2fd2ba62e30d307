"""`aim-app`: explain your own photos in a browser.

    aim-app runs/demo/aim/model runs/demo/vanilla/model          # then open http://127.0.0.1:7860
    aim-app my_model --host 0.0.0.0 --port 8080                  # reachable from other machines

Each MODEL is anything `aim_ext.load_model` takes: a saved model, an aim-train run folder or a
checkpoint. Upload or paste an image, or pick an example (TuxBirds test images rendered at
start-up from the cache, when aim-demo has fetched its sources). For each model the page shows the
top classes with their probabilities, the image under each stage's mask and the merged mask, and
GradCAM of the top class (on P_T for an AIM model, on the last feature map for a vanilla one), with
an opacity slider, and each mask's active fraction. Two models are shown side by side.

The server listens on 127.0.0.1 unless --host says otherwise, and has no authentication: anyone
who can reach the port can use it. Needs the [app] extra (Gradio): pip install 'aim-ext[app]'.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from aim_ext.cli.errors import one_line_errors, positive_int, say, shown

PROG = "aim-app"
EXAMPLES = 4  # TuxBirds test images offered as examples


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "models", nargs="+", type=Path, metavar="MODEL", help="saved models, run folders or checkpoints"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=positive_int, default=7860, help="port (default 7860)")
    parser.add_argument("--top-k", type=positive_int, default=5, help="classes shown per model (default 5)")
    parser.add_argument(
        "--max-pixels",
        type=positive_int,
        default=None,
        help="refuse images with more pixels (default 50,000,000); smaller ones are resized",
    )
    parser.add_argument(
        "--device", choices=("cpu", "cuda", "auto"), default="auto", help="default auto: cuda if present"
    )
    return parser


@one_line_errors(PROG)
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home
    try:
        import gradio  # noqa: F401
    except ImportError:
        say(PROG, "needs Gradio, which the [app] extra installs: pip install 'aim-ext[app]'")
        return 2
    from aim_ext.engine.train import resolve_device
    from aim_ext.explain.live import LiveModel
    from aim_ext.models import load_model

    device = resolve_device(args.device)
    models, problems = [], []
    for path in args.models:
        try:
            models.append(LiveModel(load_model(path), _name(path), device=device))
        except (ValueError, FileNotFoundError) as error:
            problems.append(f"{shown(path)}: {error}")
            say(PROG, f"{shown(path)}: {error}")
    if not models:
        say(PROG, "no model could be loaded")
        return 2
    with tempfile.TemporaryDirectory(prefix="aim-app-") as scratch:
        examples = _examples(models[0], Path(scratch))
        page = build_page(
            models, examples=examples, problems=problems, top_k=args.top_k, max_pixels=args.max_pixels
        )
        names = ", ".join(m.name for m in models)
        print(f"{PROG}: serving {names} on http://{args.host}:{args.port}", flush=True)
        page.queue(default_concurrency_limit=8).launch(
            server_name=args.host, server_port=args.port, show_error=True, quiet=True
        )
    return 0


def build_page(
    models, *, examples: list[str], problems: list[str], top_k: int = 5, max_pixels: int | None = None
):
    """The Gradio page for ``models`` (`LiveModel`s): an upload, a paste area and the examples; per
    model, its top classes, the masked images, GradCAM and the masks' active fractions."""
    import gradio as gr

    from aim_ext.explain.live import MAX_PIXELS, open_image

    limit = max_pixels or MAX_PIXELS
    with gr.Blocks(title="aim-app") as page:
        gr.Markdown(
            "# aim-app\nUpload or paste a photo, or pick an example. Each AIM model shows what its "
            "decision can use: the image under each stage's mask and under their union (merged), and "
            "GradCAM of its top class."
        )
        if problems:
            gr.Markdown("**Not loaded:** " + "; ".join(problems), elem_id="problems")
        with gr.Row():
            upload = gr.File(label="Upload an image", type="filepath", elem_id="upload")
            pasted = gr.Image(
                label="or paste one", sources=["clipboard", "upload"], type="filepath", format="png"
            )
        if examples:
            gr.Examples(examples=[[e] for e in examples], inputs=[upload], label="Examples (TuxBirds)")
        opacity = gr.Slider(0.0, 1.0, value=0.6, step=0.05, label="Opacity of the masks and GradCAM")
        status = gr.Markdown("", elem_id="status")
        state = gr.State([])
        columns = []
        with gr.Row():
            for k, model in enumerate(models):
                with gr.Column():
                    vanilla = "\nA vanilla model: no masks; GradCAM on its last feature map."
                    gr.Markdown(f"## {model.name}" + ("" if model.is_aim else vanilla))
                    classes = gr.Label(num_top_classes=top_k, label="Top classes", elem_id=f"classes-{k}")
                    active = gr.Markdown("", elem_id=f"active-{k}")
                    masks = gr.Gallery(label="Masks", columns=4, height=280, visible=model.is_aim)
                    gradcam = gr.Image(label="GradCAM of the top class", type="numpy", height=280)
                    columns.append((classes, active, masks, gradcam))
        outputs = [status, state, *[o for column in columns for o in column]]

        def render(explanations, alpha: float) -> list:
            shown_outputs = []
            for e in explanations:
                fractions = " · ".join(f"{name} {fraction:.0%}" for name, fraction in e.active)
                shown_outputs += [
                    dict(e.top),
                    f"Active fraction of each mask: {fractions}" if fractions else "",
                    e.mask_overlays(alpha),
                    e.gradcam_overlay(alpha),
                ]
            return shown_outputs

        def explain(path: str | None, alpha: float) -> list:
            if not path:
                return [gr.skip()] * len(outputs)
            name = Path(path).name
            try:
                image = open_image(path, limit)
            except ValueError as reason:
                message = f"{name}: {reason}"
                print(f"{PROG}: {message}", file=sys.stderr, flush=True)
                return [f"**Cannot use this file.** {message}", [], *[None] * (len(outputs) - 2)]
            explanations = [m.explain(image, top_k=top_k) for m in models]
            tops = "; ".join(f"{e.model} {e.top[0][0]} {e.top[0][1]:.1%}" for e in explanations)
            print(f"{PROG}: {name}: {tops}", flush=True)
            return [f"**{name}**", explanations, *render(explanations, alpha)]

        def restyle(explanations, alpha: float) -> list:
            if not explanations:
                return [gr.skip()] * (len(outputs) - 2)
            return render(explanations, alpha)

        upload.change(explain, [upload, opacity], outputs, api_name="explain")
        pasted.change(explain, [pasted, opacity], outputs, api_name=False)
        opacity.release(restyle, [state, opacity], outputs[2:], api_name=False)
    return page


def _name(path: Path) -> str:
    """A model's name in the page: its folder's name, and the run's (runs/demo/aim/model: aim/model)."""
    parts = path.resolve().parts
    return "/".join(parts[-2:]) if path.name in ("model", "best.pt", "last.pt") else path.name


def _examples(model, folder: Path) -> list[str]:
    """A few TuxBirds-95 test images at the model's input size, rendered from the cached sources
    into ``folder``; none (and one line saying so) when the sources are not in the cache."""
    from PIL import Image

    from aim_ext.data.tuxbirds import SourcesError, TuxBirds

    size = int(model.data["input_size"][-1])
    try:
        test = TuxBirds("test", "95", image_size=size, fetch=False)
    except SourcesError:
        print(f"{PROG}: no examples: the TuxBirds sources are not in the cache (aim-demo fetches them)")
        return []
    paths = []
    for index in range(min(EXAMPLES, len(test))):
        path = folder / f"tuxbirds_test_{index}.png"
        Image.fromarray(test.render(index).image).save(path)
        paths.append(str(path))
    return paths


if __name__ == "__main__":
    sys.exit(main())
