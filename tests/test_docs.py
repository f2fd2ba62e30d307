"""The documentation's relative links resolve, and the README stays short."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest
from PIL import Image

from aim_ext.cli.demo import COMPARISON, DEFAULT_OUT
from aim_ext.explain.reports import GRADCAM_AND_MASKS_PNG

ROOT = Path(__file__).parents[1]
README_MAX_LINES = 220
# The README's picture is aim-demo's own output (derived from photos the repository never
# redistributes): it exists once the quick start has run, at the path the demo writes it to.
DEMO_PICTURE = (DEFAULT_OUT / COMPARISON / GRADCAM_AND_MASKS_PNG).as_posix()

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"(`+).+?\1", re.DOTALL)
# The target of an inline link or image, `](target)` or `](target "title")`: matched from the
# closing bracket, so link texts with brackets of their own ("AIM[3]") are found too.
INLINE_TARGET = re.compile(r"\]\(\s*(<[^>]*>|[^)\s]+)(?:\s+(?:\"[^\"]*\"|'[^']*'|\([^)]*\)))?\s*\)")
REFERENCE_TARGET = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)", re.MULTILINE)
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def markdown_files() -> list[Path]:
    """README.md and every page under docs/."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def link_targets(text: str) -> list[str]:
    """Every link and image target in markdown text, outside code blocks and code spans."""
    prose = INLINE_CODE.sub("", FENCE.sub("", text))
    return [t.strip("<>") for t in INLINE_TARGET.findall(prose) + REFERENCE_TARGET.findall(prose)]


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    """The relative targets in `path` that name no existing file or folder."""
    broken = []
    for target in link_targets(path.read_text()):
        if SCHEME.match(target) or target.startswith("#"):
            continue  # http(s), mailto and other URLs; anchors within the page
        if path == root / "README.md" and target == DEMO_PICTURE:
            continue  # made by aim-demo (test_readme_shows_the_demo_picture)
        relative = unquote(target.split("#", 1)[0])
        resolved = root / relative.lstrip("/") if relative.startswith("/") else path.parent / relative
        if not resolved.exists():
            broken.append(target)
    return broken


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    assert broken_links(path) == [], f"{path.relative_to(ROOT)} links to missing files"


def test_readme_shows_the_demo_picture():
    assert f"]({DEMO_PICTURE})" in (ROOT / "README.md").read_text()
    picture = ROOT / DEMO_PICTURE
    if picture.exists():  # after the quick start's aim-demo
        with Image.open(picture) as image:
            image.verify()
            assert image.format == "PNG"


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text().count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move reference material to docs/"


def test_a_broken_link_is_caught(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text("# Page\n")
    (tmp_path / "figure.png").write_bytes(b"")
    readme = tmp_path / "README.md"
    readme.write_text(
        "![A figure of AIM[3]](figure.png) [page](docs/page.md#a-section) [home](https://example.com)\n"
        "[top](#top) [mail](mailto:a@b.c) [folder](docs/) [gone](docs/missing.md#x)\n"
        '![missing image of AIM[2]](docs/images/missing.png "a title")\n'
        "`[not a link](code.md)`\n\n```\n[not a link either](fenced.md)\n```\n\n[ref]: docs/absent.md\n"
    )
    expected = ["docs/missing.md#x", "docs/images/missing.png", "docs/absent.md"]
    assert broken_links(readme, tmp_path) == expected


def test_the_license_and_the_citation_are_what_the_package_declares():
    import tomllib
    import yaml

    import aim_ext

    root = Path(__file__).parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT" and (root / "LICENSE").read_text().startswith("MIT License")
    citation = yaml.safe_load((root / "CITATION.cff").read_text())
    assert citation["cff-version"] == "1.2.0" and citation["license"] == "MIT"
    assert citation["version"] == aim_ext.__version__
    paper = citation["preferred-citation"]
    assert paper["title"].startswith("AIM: Amending Inherent Interpretability")
    assert [a["family-names"] for a in paper["authors"]] == ["Alshami", "Agnihotri", "Schiele", "Keuper"]
