"""`aim-app` in a real browser: the server started as a user starts it, Debian's Chromium driven
headless by Selenium, the page's answer checked against `aim-explain`'s for the same file; bad
files, concurrent requests, and the refusals of the command and of its image reader."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import aim_ext
from aim_ext.cli import explain as explain_cli
from aim_ext.explain.live import LiveModel, open_image

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
LABELS = ["landbird", "waterbird"]
SIZE = 96


def _needed(available: bool, what: str) -> None:
    """Skip without ``what``, except in CI (CI=true), whose README commands install it: fail there."""
    if available:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} is missing in CI: the README's commands install it")
    pytest.skip(f"{what} is not installed")


def _has(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    """A small AIM model and its vanilla backbone, saved with TuxBirds' class names."""
    folder = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    aim = aim_ext.create_model("test_resnet", num_classes=2, stop_stage=3)
    aim_ext.save_pretrained(aim, folder / "aim", labels=LABELS, image_size=SIZE)
    vanilla = aim_ext.create_model("test_resnet", num_classes=2)
    aim_ext.save_pretrained(vanilla, folder / "vanilla", labels=LABELS, image_size=SIZE)
    return folder / "aim", folder / "vanilla"


@pytest.fixture(scope="module")
def birds(tuxbirds_sources, tmp_path_factory) -> list[Path]:
    """Eight TuxBirds test images as PNG files."""
    from aim_ext.data.tuxbirds import TuxBirds

    folder = tmp_path_factory.mktemp("birds")
    test = TuxBirds("test", "95", image_size=SIZE, fetch=False)
    paths = []
    for index in range(8):
        paths.append(folder / f"bird_{index}.png")
        Image.fromarray(test.render(index).image).save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def server(models, birds, tmp_path_factory):
    """`aim-app AIM VANILLA MISSING` on a free local port; yields (url, log path)."""
    _needed(_has("gradio"), "Gradio (the [app] extra)")
    folder = tmp_path_factory.mktemp("server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = folder / "server.log"
    command = [sys.executable, "-m", "aim_ext.cli.app", *map(str, models), str(folder / "missing")]
    with open(log, "w") as out:
        process = subprocess.Popen(
            [*command, "--port", str(port), "--device", "cpu"], stdout=out, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180
    while True:
        try:
            urllib.request.urlopen(url, timeout=5)
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"aim-app did not start: {log.read_text()}")
            time.sleep(0.5)
    yield url, log
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    _needed(_has("selenium"), "Selenium (the [test] extra)")
    _needed(Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists(), "Debian's chromium and chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    # Headless as root, and no background connections (this machine's network is closed).
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,1800",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _upload(driver, url: str, path: Path, *, expect: str) -> None:
    """Open the page, upload ``path``, and wait until the status line shows ``expect``."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#upload input[type=file]"))
    driver.find_element(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(str(path))
    WebDriverWait(driver, 120).until(lambda d: expect in d.find_element(By.ID, "status").text)


def _top_class(driver, column: int) -> str:
    """The top class the page shows for model ``column``: the Label's headline."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    element = f"classes-{column}"
    WebDriverWait(driver, 60).until(lambda d: d.find_element(By.ID, element).text.count("\n") >= 2)
    lines = [line for line in driver.find_element(By.ID, element).text.splitlines() if line.strip()]
    return lines[lines.index("Top classes") + 1]


def _explain_top(model: Path, image: Path, capsys, out: Path) -> str:
    """aim-explain's top class for the same file, read from what it prints."""
    capsys.readouterr()
    assert (
        explain_cli.main([str(model), str(image), "--out", str(out), "--device", "cpu", "--top-k", "1"]) == 0
    )
    printed = capsys.readouterr().out.splitlines()
    return printed[1].split("%", 1)[1].strip()


def test_the_page_explains_an_upload_as_aim_explain_does(server, browser, models, birds, capsys, tmp_path):
    from selenium.webdriver.common.by import By

    url, log = server
    _upload(browser, url, birds[0], expect=birds[0].name)
    assert _top_class(browser, 0) == _explain_top(models[0], birds[0], capsys, tmp_path / "aim")
    assert _top_class(browser, 1) == _explain_top(models[1], birds[0], capsys, tmp_path / "vanilla")
    active = browser.find_element(By.ID, "active-0").text
    assert active.startswith("Active fraction of each mask: stage 4 ") and "merged" in active
    problems = browser.find_element(By.ID, "problems").text
    assert "missing: model not found" in problems
    time.sleep(1)  # the images of the panels
    shot = tmp_path / "aim-app.png"
    assert browser.save_screenshot(str(shot))
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[0] > 500 and pixels.std() > 10  # a page, not a blank frame
    if os.environ.get("AIM_EXT_APP_SCREENSHOT"):
        shutil.copy(shot, os.environ["AIM_EXT_APP_SCREENSHOT"])
    assert "missing: model not found" in log.read_text()


def test_a_bad_file_gets_a_message_and_the_server_goes_on(server, browser, birds, tmp_path):
    url, log = server
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    _upload(browser, url, text, expect="Cannot use this file")
    from selenium.webdriver.common.by import By

    assert "notes.png: not a readable image" in browser.find_element(By.ID, "status").text
    assert "aim-app: notes.png: not a readable image" in log.read_text()
    _upload(browser, url, birds[1], expect=birds[1].name)  # still serving
    assert _top_class(browser, 0) in LABELS


def test_eight_requests_at_once_answer_as_one_at_a_time(server, birds):
    from gradio_client import Client, handle_file

    url, _ = server
    client = Client(url, verbose=False)

    def ask(path: Path):
        """The page's answer as values: the status, per model its Label and active fractions, and
        the bytes of its GradCAM picture."""
        status, *columns = client.predict(handle_file(str(path)), 0.6, api_name="/explain")
        answer = [status]
        for label, active, _masks, gradcam in zip(*[iter(columns)] * 4, strict=True):
            answer += [label, active, Path(gradcam).read_bytes()]
        return answer

    alone = [ask(path) for path in birds]
    with ThreadPoolExecutor(max_workers=8) as pool:
        together = list(pool.map(ask, birds))
    assert together == alone
    assert [a[0] for a in alone] == [f"**{path.name}**" for path in birds]
    assert all(len(a[1]["confidences"]) == 2 and a[2].startswith("Active fraction") for a in alone)


def test_live_model_threads_agree_with_one_call(models, birds):
    """The shared model from 8 threads: each answer equals the lone call's, GradCAM included."""
    live = LiveModel(aim_ext.load_model(models[0]), "aim")
    images = [open_image(path) for path in birds]
    alone = [live.explain(image) for image in images]
    results: list = [None] * len(images)

    def run(k: int) -> None:
        results[k] = live.explain(images[k])

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(images))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for one, many in zip(alone, results, strict=True):
        assert one.top == many.top and one.active == many.active
        np.testing.assert_array_equal(one.gradcam, many.gradcam)


def test_open_image_refusals_and_modes(tmp_path):
    big = tmp_path / "big.png"
    Image.new("RGB", (300, 200)).save(big)
    with pytest.raises(ValueError, match=r"^too large \(300x200 = 60,000 pixels; at most 50,000\)$"):
        open_image(big, max_pixels=50_000)
    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(cmyk)
    assert open_image(cmyk).mode == "RGB" and open_image(cmyk).getpixel((5, 5))[0] > 200
    deep = tmp_path / "deep.png"
    Image.fromarray(np.full((30, 40), 40000, dtype=np.uint16)).save(deep)
    assert open_image(deep).mode == "RGB"
    small = tmp_path / "small.png"
    Image.new("RGB", (8, 8)).save(small)
    with pytest.raises(ValueError, match="too small"):
        open_image(small)


def test_no_loadable_model_is_one_line_and_status_2(tmp_path, capsys):
    from aim_ext.cli.app import main

    _needed(_has("gradio"), "Gradio (the [app] extra)")
    assert main([str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"aim-app: {tmp_path / 'nothing'}: model not found: {tmp_path / 'nothing'}",
        "aim-app: no model could be loaded",
    ]


def test_without_gradio_the_command_says_what_to_install(monkeypatch, capsys, tmp_path):
    from aim_ext.cli.app import main

    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio raises ImportError
    assert main([str(tmp_path)]) == 2
    assert (
        capsys.readouterr().err
        == "aim-app: needs Gradio, which the [app] extra installs: pip install 'aim-ext[app]'\n"
    )
