"""csrc/sources.txt: the one list of the kernels' sources, read by setup.py and CMakeLists.txt."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE_LIST = "csrc/sources.txt"
# Sources one build adds itself: setup.py the Python module, CMake the C++ test.
NOT_LISTED = {"csrc/python_module.cpp"}
NOT_LISTED_DIRS = ("csrc/test/",)


def listed() -> list[tuple[str, str]]:
    """The (kind, path) rows of the list, as setup.py and CMakeLists.txt read them."""
    rows = []
    for line in (ROOT / SOURCE_LIST).read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            kind, path = line.split()
            rows.append((kind, path))
    return rows


def test_every_source_is_listed_once() -> None:
    paths = [path for _, path in listed()]
    on_disk = {
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "csrc").rglob("*")
        if path.suffix in {".cpp", ".cu"}
    }
    on_disk = {p for p in on_disk if p not in NOT_LISTED and not p.startswith(NOT_LISTED_DIRS)}
    assert len(paths) == len(set(paths)), f"{SOURCE_LIST} lists a source twice"
    assert set(paths) == on_disk


def test_cuda_sources_are_the_cuda_kind() -> None:
    for kind, path in listed():
        assert kind in {"cpu", "cuda"}, path
        assert (kind == "cuda") == path.startswith("csrc/cuda/"), f"{path} is listed as {kind}"


def test_merge_kernels_compile_one_file_per_element_type() -> None:
    """A parallel build compiles the four element types of the merge kernels at once."""
    rows = listed()
    for dtype in ("float", "double", "half", "bfloat16"):
        assert ("cuda", f"csrc/cuda/masked_merge_kernels_{dtype}.cu") in rows


def test_both_builds_read_the_list() -> None:
    for build in ("setup.py", "CMakeLists.txt"):
        text = (ROOT / build).read_text()
        assert SOURCE_LIST in text, f"{build} does not read {SOURCE_LIST}"
        assert "csrc/cpu/" not in text and "csrc/cuda/" not in text, f"{build} names a source itself"
