"""The web page in a real browser: headless Chromium (Debian's chromium + chromium-driver, driven
by selenium with the driver's path given) against the gateway (`python -m pixelrnn.web`, a subprocess) and
a real tritonserver serving tiny models (tests/deployment.py). One server, one gateway and one
browser for the module; every wait is bounded.

What the page shows is read back from its canvases (one canvas pixel per image pixel, level l of
L shown as round(l * 255 / (L - 1))) and compared with the in-process cached sampler
(export.cells.sample_cached) for the same seed, and with PixelClient.score. Screenshots of each
view go to the test's temporary directory (printed), as artifacts.

The sampler is fast (rows go out several per response; a quiet machine makes a tall image in a
second), so little is left to timing: the progressive-drawing test throttles the browser's
network; Stop, leaving the page and closing a tab are done by the page's own script at its first
row (the image must outlast only the cancel's way to the sampler, not WebDriver round trips); two
tabs press Sample in one script call.

One model ("fg") is exported with a background model, so it has an out-of-distribution detector
(fg_ood) for the page's verdict; the others have none, which the page says. The gateway's limits
(web/limits.py) are tried against the real sampler here and in depth in tests/test_web_limits.py.
"""
from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from pixelrnn.export import build_engine
from pixelrnn.runtime.images import nll_heatmap
from pixelrnn.runtime.ood import Threshold
from pixelrnn.server.launcher import free_port
from pixelrnn.training.checkpoint import save_checkpoint
from pixelrnn.training.models import build_model
from tests.deployment import (BUSY_SLACK_S, REPO, Tiny, export_models, missing, require, sampler_metrics,
                              sampler_periods, serve, stop_group, wait_for)
from tests.web_http import post_big, read_json, read_lines, request

require("tritonclient.grpc")
require("fastapi")
require("uvicorn")
webdriver = require("selenium.webdriver")
from PIL import Image  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402

from pixelrnn.client import PixelClient  # noqa: E402
from pixelrnn.export.cells import build_cell, sample_cached  # noqa: E402
from pixelrnn.runtime import rowloop  # noqa: E402
from pixelrnn.runtime.runner import OnnxRunner  # noqa: E402
from pixelrnn.web.uploads import to_levels  # noqa: E402

pytestmark = [pytest.mark.triton, pytest.mark.slow]

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")  # Debian's; nothing downloaded
WAIT_S = 60.0  # bound of any one thing the page must do: far above a busy machine's need, short of a hang
PERIODS = sampler_periods()
FREED_S = PERIODS["CANCEL_CHECK_S"] + PERIODS["METRICS_PERIOD_S"] + BUSY_SLACK_S  # cancel seen, metrics pushed
STREAM_BYTES_PER_S = 128 * 1024  # the throttled connection: the "tall" model's 3072 rows of 2 images in ~1.6 s
MODELS = [
    Tiny("bin", "pixelcnn", dict(in_channels=1, height=8, width=6, levels=2, hidden=6, layers=1), max_batch=4),
    Tiny("rgb", "gated_pixelcnn", dict(in_channels=3, height=5, width=4, levels=4, num_classes=3, hidden=6, layers=1, kernel=3),
         max_batch=8),
    Tiny("ms", "multiscale", dict(in_channels=1, height=6, width=4, levels=3, base_arch="gated_pixelcnn", hidden=6, layers=1,
                                  small_config=dict(kernel=3), big_config=dict(kernel=3))),
    # Tall and thin: thousands of rows (the page's progress and drawing over a long stream), four
    # columns keep every row cheap. How long its image takes is not relied on (the sampler sends
    # rows several per response, faster than a page draws them): the test throttles the browser.
    Tiny("tall", "gated_pixelcnn", dict(in_channels=1, height=3072, width=4, levels=4, num_classes=0, hidden=6, layers=1, kernel=3),
         seed=0),
    # Taller still, for Stop and for two tabs at once: its image (8 at once) outlasts the way from
    # a page's action at its first row to the sampler's cancel check (gateway, gRPC cancel, 0.2 s
    # polling) several times over: seen on a busy 2-core machine, 250-2400 of its 8192 rows were
    # made by then. The tests act from inside the page, not after WebDriver round trips (which a
    # busy machine stretches past the whole image). Much taller fails the export's scorer parity
    # check (float32 sums).
    Tiny("long", "gated_pixelcnn", dict(in_channels=1, height=8192, width=4, levels=4, num_classes=0, hidden=6, layers=1, kernel=3),
         seed=0),
]
# With a detector: fg_ood, from a background model, its threshold calibrated on the synthetic
# data's validation split (as tests/test_ood_served.py builds it).
DETECTED_DATA = {"name": "synthetic", "size": 6, "bits": 2, "count": 40}
DETECTED = ("gated_pixelcnn", dict(in_channels=1, height=6, width=6, levels=4, num_classes=3, hidden=6, layers=1, kernel=3))
BACKGROUND = ("pixelcnn", dict(in_channels=1, height=6, width=6, levels=4, hidden=6, layers=1))


# -- fixtures: server, gateway, browser -------------------------------------------------------------
def export_detected(root: Path, repository: Path) -> None:
    """fg (class-conditional) with its background model: fg_score, fg_sample, fg_background_score, fg_ood."""
    paths = {}
    for name, (arch, config), seed in (("fg", DETECTED, 1), ("bg", BACKGROUND, 2)):
        torch.manual_seed(seed)
        paths[name] = root / f"{name}.pt"
        save_checkpoint(paths[name], {"arch": arch, "config": dict(config), "model": build_model(arch, dict(config)).state_dict(),
                                      "step": 1, "data": DETECTED_DATA})
    code = build_engine.main(["--checkpoint", str(paths["fg"]), "--name", "fg", "--out", str(root / "fg_export"), "--tensorrt", "off",
                              "--max-batch", "8", "--repository", str(repository), "--background", str(paths["bg"]),
                              "--calibration-images", "0", "--ood-fpr", "0.1"])
    assert code == 0


def served_threshold(repository: Path) -> Threshold:
    """fg_ood's threshold as the export wrote it into the config (a JSON string parameter)."""
    text = (repository / "fg_ood" / "config.pbtxt").read_text()
    raw = text.split('key: "threshold" value: { string_value: ')[1].split(" }")[0]
    return Threshold.from_json(json.loads(json.loads(raw)))


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    root = tmp_path_factory.mktemp("web")
    models = export_models(root, MODELS, root / "repository")
    export_detected(root, root / "repository")
    with serve(root / "repository", root / "triton.log") as server:
        yield server, models


def get(url: str, data: bytes | None = None, content_type: str = "application/json") -> tuple[int, dict]:
    """(status, JSON body) of a gateway call."""
    request = urllib.request.Request(url, data=data, headers={"Content-Type": content_type} if data is not None else {})
    try:
        with urllib.request.urlopen(request, timeout=WAIT_S) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def gateway_process(deployed, tmp_path_factory):
    """`python -m pixelrnn.web` for the module's server (default limits): (its URL, the process)."""
    server, _ = deployed
    port = free_port()
    log = tmp_path_factory.mktemp("gateway") / "gateway.log"
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "pixelrnn.web", "--triton", server.grpc_url, "--port", str(port)], cwd=REPO,
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def up():
        try:
            return get(f"{url}/api/models")[0]
        except OSError:
            return process.poll()

    status, ok = wait_for(up, lambda s: s == 200 or (s is not None and process.poll() is not None), WAIT_S, 0.2)
    assert ok and status == 200, f"the gateway did not come up:\n{log.read_text()}"
    assert f"web page: http://localhost:{port}/" in log.read_text()
    yield url, process
    stop_group(process)
    text = log.read_text()
    assert "Traceback" not in text, f"the gateway logged a traceback:\n{text}"


@pytest.fixture(scope="module")
def gateway(gateway_process):
    return gateway_process[0]


@pytest.fixture(scope="module")
def browser():
    for path in (CHROMIUM, CHROMEDRIVER):
        if not path.exists():
            missing(f"{path} is missing (Debian packages chromium and chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,1000", "--disable-gpu"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_script_timeout(WAIT_S)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    folder = tmp_path_factory.mktemp("screenshots")
    yield folder
    print(f"web page screenshots: {folder}")


# -- driving the page ---------------------------------------------------------------------------
def wait_page(driver, ok, what: str, timeout: float = WAIT_S):
    """Poll JS expression `ok` until truthy; fail with `what` and the page's message."""
    value, done = wait_for(lambda: driver.execute_script(f"return {ok}"), bool, timeout, 0.05)
    assert done, f"{what} within {timeout:g} s; the page says: {message(driver)!r}, progress {progress(driver)!r}"
    return value


def message(driver) -> str:
    return driver.execute_script("const m = document.getElementById('message'); return m.hidden ? '' : m.textContent")


def progress(driver) -> str:
    return driver.execute_script("return document.getElementById('progress').textContent")


def open_page(driver, url: str, model: str, **fields) -> None:
    driver.get(url)
    wait_page(driver, f"document.getElementById('model').querySelector('option[value={model}]')", f"the page lists {model}")
    set_fields(driver, model=model)
    set_fields(driver, **fields)


def set_fields(driver, **fields) -> None:
    """Type into the page's inputs (id -> value) as a user would, firing input/change events."""
    for name, value in fields.items():
        driver.execute_script("const e = document.getElementById(arguments[0]); e.value = arguments[1];"
                              "e.dispatchEvent(new Event('input')); e.dispatchEvent(new Event('change'));", name, str(value))


def click(driver, button: str) -> None:
    driver.find_element(By.ID, button).click()


def wait_done(driver) -> None:
    wait_page(driver, "document.getElementById('progress').textContent.startsWith('done')", "the stream finished")


READ = """const [sel, levels, channels] = arguments;
return Array.from(document.querySelectorAll(sel)).map((c) => {
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  return [c.height, c.width, Array.from(d)];
});"""


def canvas_levels(driver, selector: str, levels: int, channels: int) -> np.ndarray:
    """The levels (N, C, H, W) shown by the canvases `selector` matches, read from their pixels."""
    images = []
    for h, w, data in driver.execute_script(READ, selector, levels, channels):
        rgba = np.asarray(data, np.float64).reshape(h, w, 4)
        assert np.all(rgba[..., 3] == 255), f"{selector}: pixels left undrawn"
        if channels == 1:
            assert np.array_equal(rgba[..., 0], rgba[..., 1]) and np.array_equal(rgba[..., 0], rgba[..., 2]), "grey drawn in colour"
        images.append(np.rint(rgba[..., :channels] * (levels - 1) / 255).transpose(2, 0, 1))  # (H, W, C) -> (C, H, W)
    return np.asarray(images, np.uint8)


def captions(driver, selector: str, key: str) -> np.ndarray:
    return np.asarray(driver.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0])).map((e) => Number(e.dataset[arguments[1]]))", selector, key))


def expected(exported, n, seed, temperature=1.0, labels=None, known=None, known_rows=0) -> np.ndarray:
    """The in-process cached sampler's images; more than the model's max batch are sampled as
    PixelClient does: one sequence per max batch, the k-th seeded seed + k."""
    cell, size = build_cell(exported.model), exported.manifest["max_batch"]
    chunks = [sample_cached(cell, min(size, n - a), seed + k, temperature, None if labels is None else labels[a:a + size],
                            None if known is None else known[a:a + size], known_rows)
              for k, a in enumerate(range(0, n, size))]
    return np.concatenate(chunks)


def sampler_events(server, model: str) -> dict[str, int]:
    found = sampler_metrics(server, f"{model}_sample")
    assert "live" in found, f"no sampler metrics for {model}_sample"
    return found


# -- the tests ----------------------------------------------------------------------------------
def test_sample_streams_rows_progressively_and_draws_the_sampler_image(deployed, gateway, browser, shots):
    server, models = deployed
    tall = models["tall"].manifest
    h = tall["shape"][1]
    open_page(browser, gateway, "tall", batch=2, seed=5, temperature=1.0)
    # The browser's network is throttled (DevTools emulation, a slow connection) so that the rows
    # arrive over a second or two whatever the sampler's speed: a page that drew rows only at the
    # end, or in one go, still shows no partial image in any frame.
    browser.set_network_conditions(offline=False, latency=0, download_throughput=STREAM_BYTES_PER_S,
                                   upload_throughput=STREAM_BYTES_PER_S)
    # Count the drawn rows of the first image at every frame the browser renders.
    browser.execute_script("""window.__rows = []; const tick = () => {
        const c = document.querySelector('#samples canvas');
        if (c) { const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                 let n = 0; for (let i = 3; i < d.length; i += 4) n += d[i] > 0; window.__rows.push(n / c.width); }
        requestAnimationFrame(tick); }; requestAnimationFrame(tick);""")
    try:
        click(browser, "sample")
        wait_page(browser, f"window.__rows.some((n) => n > {h // 4})", "a quarter of the rows drawn")
        browser.save_screenshot(str(shots / "sample_mid.png"))
        wait_done(browser)
    finally:
        browser.delete_network_conditions()
    rows = browser.execute_script("return window.__rows")
    middle = sorted({n for n in rows if 0 < n < h})
    assert len(middle) >= 3, f"the canvas did not fill progressively: drawn rows per frame {rows[:50]}..."
    nonzero = [n for n in rows if n > 0]
    assert nonzero == sorted(nonzero), "drawn rows went backwards"
    assert "rows/s" in progress(browser)
    shown = canvas_levels(browser, "#samples canvas", tall["levels"], 1)
    # The in-process sampler on the exported cells (onnxruntime: the torch cells would take minutes
    # for 3072 rows; the export checked these cells against them).
    runner = OnnxRunner.from_manifest(tall, models["tall"].export_dir)
    np.testing.assert_array_equal(shown, rowloop.sample(runner, rowloop.SampleSpec(batch=2, temperature=1.0, seed=5)))
    browser.save_screenshot(str(shots / "sample_done.png"))


def test_binary_grey_rgb_and_multiscale_models_show_the_sampler_images_and_scores(deployed, gateway, browser, shots):
    server, models = deployed
    cases = [("bin", dict(batch=6, seed=1, temperature=1.0), None),  # 6 > max batch 4: two sequences
             ("rgb", dict(batch=3, seed=2, temperature=0.8, label=2), 2),
             ("ms", dict(batch=2, seed=3, temperature=1.0), None)]
    for name, fields, label in cases:
        manifest = models[name].manifest
        open_page(browser, gateway, name, **fields)
        # Record how each row lands, and the canvas as it was before the first full-size row.
        browser.execute_script("""window.__puts = []; window.__before = null;
            const put = CanvasRenderingContext2D.prototype.putImageData;
            CanvasRenderingContext2D.prototype.putImageData = function (img, x, y) {
              if (this.canvas.classList.contains('sample')) {
                if (img.height === 1 && window.__before === null && this.canvas === document.querySelector('#samples canvas'))
                  window.__before = Array.from(this.getImageData(0, 0, this.canvas.width, this.canvas.height).data);
                window.__puts.push([y, img.height]);
              }
              return put.call(this, img, x, y); };""")
        click(browser, "sample")
        wait_done(browser)
        n = fields["batch"]
        c, h, w = manifest["shape"]
        want = expected(models[name], n, fields["seed"], fields["temperature"], None if label is None else np.full(n, label))
        np.testing.assert_array_equal(canvas_levels(browser, "#samples canvas", manifest["levels"], c), want)
        with PixelClient(server.grpc_url, name) as client:
            scores = client.score(want, None if label is None else np.full(n, label))
        np.testing.assert_allclose(captions(browser, "#samples figcaption", "nll"), scores.nll_nats, rtol=1e-6)
        np.testing.assert_allclose(captions(browser, "#samples figcaption", "bpd"), scores.bits_per_dim, rtol=1e-6)
        puts = browser.execute_script("return window.__puts")
        if name == "ms":  # the small image (every other row and column) first, each pixel a 2 x 2 block
            small = h // 2  # rows of the half-size image
            assert [p[1] for p in puts[:small * n]] == [2] * (small * n), f"row heights drawn: {puts}"
            before = np.asarray(browser.execute_script("return window.__before"), np.float64).reshape(h, w, 4)
            upscaled = want[0, 0, ::2, ::2].repeat(2, 0).repeat(2, 1)
            np.testing.assert_array_equal(np.rint(before[..., 0] * (manifest["levels"] - 1) / 255), upscaled)
        else:
            assert {p[1] for p in puts} == {1} and len(puts) == n * h
        browser.save_screenshot(str(shots / f"sample_{name}.png"))


def draw_stroke(driver, points) -> None:
    """Drag the mouse over the drawing canvas through these (x, y) image pixels."""
    canvas = driver.find_element(By.ID, "draw")
    rect = driver.execute_script("const r = document.getElementById('draw').getBoundingClientRect(); return [r.width, r.height]")
    h, w = driver.execute_script("const c = document.getElementById('draw'); return [c.height, c.width]")
    at = [(round((x + 0.5) * rect[0] / w - rect[0] / 2), round((y + 0.5) * rect[1] / h - rect[1] / 2)) for x, y in points]
    chain = ActionChains(driver).move_to_element_with_offset(canvas, *at[0]).click_and_hold()
    for x, y in at[1:]:
        chain = chain.move_to_element_with_offset(canvas, x, y)
    chain.release().perform()


def test_completion_keeps_the_drawn_rows_and_scores_the_drawing(deployed, gateway, browser, shots, tmp_path):
    server, models = deployed
    manifest = models["bin"].manifest
    c, h, w = manifest["shape"]
    open_page(browser, gateway, "bin", seed=4, temperature=1.0, known=4, k=3)
    draw_stroke(browser, [(1, 0), (1, 5), (4, 5)])  # an L across the kept rows and below them
    drawn = canvas_levels(browser, "#draw", 2, 1)[0]
    assert drawn[0, 0:6, 1].tolist() == [1] * 6 and drawn[0, 5, 1:5].tolist() == [1] * 4 and drawn.sum() == 9, drawn
    click(browser, "complete")
    wait_done(browser)
    done = canvas_levels(browser, "#completions canvas", 2, 1)
    assert done.shape == (3, c, h, w)
    np.testing.assert_array_equal(done[:, :, :4], np.repeat(drawn[None, :, :4], 3, axis=0))  # the kept rows exactly
    np.testing.assert_array_equal(done, expected(models["bin"], 3, 4, known=np.repeat(drawn[None], 3, axis=0), known_rows=4))
    click(browser, "score")
    wait_page(browser, "document.getElementById('draw-score').dataset.nll", "the drawing's score")
    with PixelClient(server.grpc_url, "bin") as client:
        want = client.score(drawn[None])
        completions_scored = client.score(done)
    assert float(browser.execute_script("return document.getElementById('draw-score').dataset.nll")) == pytest.approx(
        float(want.nll_nats[0]), rel=1e-6)
    np.testing.assert_allclose(captions(browser, "#completions figcaption", "nll"), completions_scored.nll_nats, rtol=1e-6)
    browser.save_screenshot(str(shots / "complete.png"))

    # An uploaded PNG of another size replaces the drawing, scaled and quantized to the model's levels.
    picture = np.zeros((16, 12), np.uint8)
    picture[2:14, 5:7] = 255  # a bar
    path = tmp_path / "bar.png"
    Image.fromarray(picture).save(path)
    browser.find_element(By.ID, "upload").send_keys(str(path))
    want_upload = to_levels(path.read_bytes(), (c, h, w), 2)
    wait_page(browser, "document.getElementById('draw').getContext('2d').getImageData(2, 3, 1, 1).data[0] > 0", "the upload drawn")
    np.testing.assert_array_equal(canvas_levels(browser, "#draw", 2, 1)[0], want_upload)
    assert message(browser) == ""


# At a row the page shows (the progress line matching a pattern), the page itself does what a
# user would (a MutationObserver on the progress line): press Stop, leave the page, or close its
# tab (a tab a script opened may close itself). Driven from the test, the action would come after
# WebDriver round trips, which a busy machine stretches past the sampler's whole image. Every text
# the line took is looked at: the page may handle several lines of the stream before the observer runs.
AT_ROW = """const action = arguments[0], pattern = new RegExp(arguments[1]), progress = document.getElementById('progress');
window.__acted = null;
const seen = new MutationObserver((records) => {
  const hit = records.flatMap((r) => Array.from(r.addedNodes, (n) => n.textContent)).find((t) => pattern.test(t));
  if (!hit) return;
  seen.disconnect();
  window.__acted = hit;
  if (action === 'stop') document.getElementById('stop').click();
  else if (action === 'leave') location.assign('about:blank');
  else window.close();
});
seen.observe(progress, {childList: true, characterData: true, subtree: true});"""


def sample_and_act_at_first_row(driver, url, action: str) -> None:
    open_page(driver, url, "long", batch=8, seed=9)
    driver.execute_script(AT_ROW, action, "^row [1-9]")
    click(driver, "sample")


def open_tab(driver) -> tuple[str, str]:
    """A new tab opened by the current page's script (window.__tab there): (this handle, the new one)."""
    first, known = driver.current_window_handle, set(driver.window_handles)
    driver.execute_script("window.__tab = window.open('about:blank', '_blank')")
    handles, ok = wait_for(lambda: set(driver.window_handles) - known, bool, WAIT_S)
    assert ok, "no tab opened"
    return first, handles.pop()


def test_stop_and_leaving_the_page_cancel_the_sequence(deployed, gateway, browser):
    server, models = deployed
    h = models["long"].manifest["shape"][1]
    before, idle = wait_for(lambda: sampler_events(server, "long"), lambda m: m["live"] == 0, FREED_S)
    assert idle, f"sequences still live before the test: {before}"

    def freed(count):
        metrics, ok = wait_for(lambda: sampler_events(server, "long"),
                               lambda m: m["live"] == 0 and m.get("cancelled", 0) >= before.get("cancelled", 0) + count, FREED_S)
        assert ok, f"the sequence was not cancelled and freed within {FREED_S:g} s: {metrics} (before {before})"
        # Started, then cancelled mid-image: never completed.
        assert metrics["started"] == before["started"] + count, (before, metrics)
        assert metrics.get("completed", 0) == before.get("completed", 0), "the image was finished, not cancelled"

    sample_and_act_at_first_row(browser, gateway, "stop")
    acted = wait_page(browser, "window.__acted", "Stop pressed at the first row")
    assert int(acted.split()[1]) < h, f"the page had the whole image before Stop: {acted!r}"
    assert message(browser) == "stopped: the server cancelled the sequence", (message(browser), progress(browser))
    freed(1)

    sample_and_act_at_first_row(browser, gateway, "leave")  # the tab leaves the page: the browser drops the stream
    _, left = wait_for(lambda: browser.current_url, lambda u: u == "about:blank", WAIT_S)
    assert left, f"the page did not leave: {browser.current_url}"
    freed(2)

    open_page(browser, gateway, "long")  # back from about:blank: the tab is opened by the page's script
    first, tab = open_tab(browser)
    browser.switch_to.window(tab)
    try:
        sample_and_act_at_first_row(browser, gateway, "close")  # the tab closes itself
        _, closed = wait_for(lambda: browser.window_handles, lambda handles: tab not in handles, WAIT_S)
        assert closed, "the tab did not close"
    finally:
        if tab in browser.window_handles:
            browser.close()
        browser.switch_to.window(first)
    freed(3)


def test_stop_after_the_last_row_does_not_claim_a_cancel(deployed, gateway, browser):
    # Stop pressed once every row is on the page, before the scores' line: the sequence had
    # completed on the server, and the page says so instead of "cancelled".
    server, models = deployed
    h = models["bin"].manifest["shape"][1]
    before = sampler_events(server, "bin")
    open_page(browser, gateway, "bin", batch=2, seed=8)
    browser.execute_script(AT_ROW, "stop", f"^row {h} / {h}")
    click(browser, "sample")
    wait_page(browser, "window.__acted", "Stop pressed at the last row")
    assert message(browser) == "stopped: the images were already complete; their scores were not waited for", message(browser)
    after, ok = wait_for(lambda: sampler_events(server, "bin"), lambda m: m.get("completed", 0) > before.get("completed", 0), FREED_S)
    assert ok and after.get("cancelled", 0) == before.get("cancelled", 0), (before, after)


def test_tabs_sampling_at_once_share_the_samplers_cell_calls(deployed, gateway, browser):
    server, models = deployed
    # Two tabs, the second opened by the first's script; the first presses both Sample buttons in
    # one go, as two users would at the same moment: both streams (separate requests, separate
    # sequences) are live together for most of the 8192-row image, whatever the machine's load.
    model = models["long"]
    h = model.manifest["shape"][1]
    before = sampler_events(server, "long")
    open_page(browser, gateway, "long", batch=1, seed=11)
    first, second = open_tab(browser)
    try:
        browser.switch_to.window(second)
        open_page(browser, gateway, "long", batch=2, seed=12)
        browser.switch_to.window(first)
        browser.execute_script("window.__tab.document.getElementById('sample').click(); document.getElementById('sample').click()")
        shown = {}
        for handle, n in ((first, 1), (second, 2)):
            browser.switch_to.window(handle)
            wait_done(browser)
            shown[n] = canvas_levels(browser, "#samples canvas", model.manifest["levels"], 1)
    finally:
        if second in browser.window_handles:
            browser.switch_to.window(second)
            browser.close()
        browser.switch_to.window(first)
    runner = OnnxRunner.from_manifest(model.manifest, model.export_dir)
    for n, seed in ((1, 11), (2, 12)):
        np.testing.assert_array_equal(shown[n], rowloop.sample(runner, rowloop.SampleSpec(batch=n, temperature=1.0, seed=seed)))
    # Both sequences ran at the same time: fewer cell calls than rows streamed (one call per row
    # step serves every live sequence). The metrics are pushed periodically: wait for all rows.
    after, ok = wait_for(lambda: sampler_events(server, "long"), lambda m: m["rows"] - before["rows"] >= 2 * h, FREED_S)
    assert ok and after["rows"] - before["rows"] == 2 * h, (before, after)
    assert after["calls"] - before["calls"] < 2 * h, f"no row step served both tabs: {before} -> {after}"
    assert after["cell_seconds"] > before["cell_seconds"], (before, after)  # pixelrnn_sampler_cell_seconds_total


def heatmap_pixels(driver) -> np.ndarray:
    h, w, data = driver.execute_script(READ, "#heatmap", 0, 0)[0]
    return np.asarray(data, np.int64).reshape(h, w, 4)


def test_score_draws_the_per_pixel_heatmap_and_the_detectors_verdict(deployed, gateway, browser, shots, tmp_path):
    server, models = deployed
    # A model with a detector: an uploaded picture, scored as class 1.
    picture = np.zeros((12, 12), np.uint8)
    picture[2:10, 3:5], picture[8:10, 3:10] = 255, 170  # an L in two greys
    path = tmp_path / "l.png"
    Image.fromarray(picture).save(path)
    drawn = to_levels(path.read_bytes(), (1, 6, 6), 4)
    open_page(browser, gateway, "fg", label=1)
    browser.find_element(By.ID, "upload").send_keys(str(path))
    wait_page(browser, "document.getElementById('draw').getContext('2d').getImageData(1, 1, 1, 1).data[0] > 0", "the upload drawn")
    click(browser, "score")
    wait_page(browser, "document.getElementById('verdict').dataset.verdict", "the verdict")
    with PixelClient(server.grpc_url, "fg") as client:
        scores = client.score(drawn[None], [1], per_pixel=True)
        verdict = client.ood(drawn[None])
    # The heatmap canvas holds runtime/images.py's colouring of the served per-pixel NLL (to
    # rounding: JS rounds halves up, numpy to even).
    shown = heatmap_pixels(browser)
    want = nll_heatmap(scores.pixel_nll)[0]  # (H, W, 3)
    assert np.all(shown[..., 3] == 255) and np.abs(shown[..., :3] - want).max() <= 1, (shown[..., 0], want[..., 0])
    assert len(np.unique(want.reshape(-1, 3), axis=0)) > 3, "a flat heatmap proves nothing: pick another picture"
    top = float(browser.execute_script("return document.getElementById('heatmap').dataset.top"))
    assert top == pytest.approx(float(scores.pixel_nll[0].sum(0).max()), rel=1e-6)
    assert float(browser.execute_script("return document.getElementById('draw-score').dataset.nll")) == pytest.approx(
        float(scores.nll_nats[0]), rel=1e-6)
    box = browser.execute_script("const d = document.getElementById('verdict'); return [{...d.dataset}, d.textContent]")
    data, text = box
    assert data["verdict"] == ("out" if verdict.ood[0] else "in"), (data, verdict)
    for key, value in (("nll", verdict.nll_nats), ("backgroundNll", verdict.background_nll_nats), ("llr", verdict.llr),
                       ("complexity", verdict.complexity)):
        assert float(data[key]) == pytest.approx(float(value[0]), rel=1e-6), key
    threshold = served_threshold(server.repository)
    assert float(data["threshold"]) == pytest.approx(threshold.value, rel=1e-9)
    for words in ("NLL under the model", "background model", "likelihood ratio", "complexity score", "threshold (llr)",
                  f"{threshold.calibration_images} validation images", "fg_ood"):
        assert words in text, (words, text)
    assert message(browser) == ""
    browser.save_screenshot(str(shots / "score_heatmap_verdict.png"))

    # An edit makes them stale: they go.
    draw_stroke(browser, [(0, 0), (0, 1)])
    assert browser.execute_script("return document.getElementById('analysis').hidden")

    # A model without a detector: the heatmap all the same, and the page says plainly there is no verdict.
    open_page(browser, gateway, "bin")
    draw_stroke(browser, [(1, 1), (1, 6)])
    bin_drawn = canvas_levels(browser, "#draw", 2, 1)[0]
    click(browser, "score")
    wait_page(browser, "document.getElementById('verdict').dataset.verdict === 'none'", "the no-detector note")
    text = browser.execute_script("return document.getElementById('verdict').textContent")
    assert "'bin' has no out-of-distribution detector" in text and "bin_ood" in text, text
    assert message(browser) == "", message(browser)  # not an error
    with PixelClient(server.grpc_url, "bin") as client:
        want = nll_heatmap(client.score(bin_drawn[None], per_pixel=True).pixel_nll)[0]
    assert np.abs(heatmap_pixels(browser)[..., :3] - want).max() <= 1
    browser.save_screenshot(str(shots / "score_no_detector.png"))

    # The gateway itself: the same answers as JSON.
    got, answer = get(f"{gateway}/api/ood", json.dumps({"model": "bin", "images": [bin_drawn.tolist()]}).encode())
    assert got == 200 and answer["detector"] is None and "bin_ood" in answer["message"]
    got, answer = get(f"{gateway}/api/ood", json.dumps({"model": "fg", "images": [drawn.tolist()]}).encode())
    assert got == 200 and answer["detector"] == "fg_ood" and answer["ood"] == verdict.ood.tolist()
    assert answer["threshold"] == {"score": threshold.score, "value": threshold.value,
                                   "false_positive_rate": threshold.false_positive_rate,
                                   "calibration_images": threshold.calibration_images}
    got, answer = get(f"{gateway}/api/ood", json.dumps({"model": "fg", "images": [[[[9] * 6] * 6]]}).encode())
    assert got == 400 and "levels" in answer["error"], answer


def gateway_status(process) -> dict[str, int]:
    """Threads and resident memory (bytes) of the gateway process, from /proc."""
    text = Path(f"/proc/{process.pid}/status").read_text()
    return {"threads": int(re.search(r"^Threads:\s+(\d+)", text, re.M).group(1)),
            "rss": int(re.search(r"^VmRSS:\s+(\d+) kB", text, re.M).group(1)) * 1024}


FLOOD = 300  # streams one address opens at once (as reported: 3,936 of 3,938 sampler images, 695 threads)
PER_CLIENT, THREADS = 4, 8  # the gateway's defaults (web/limits.py)
THREADS_PER_STREAM = 6  # measured 4-5 with gRPC's own pool counted in; the gateway idle: 3-4, with the flood: 25-28
RSS_BOUND = 16 * 1024 * 1024  # measured +0-2 MiB on a 32 MB body; unbounded, +254 MB


def test_one_address_flooding_streams_is_capped_and_another_still_samples(deployed, gateway_process):
    server, models = deployed
    url, process = gateway_process
    port = int(url.rsplit(":", 1)[1])
    long_n = 8
    _, idle = wait_for(lambda: sampler_events(server, "long"), lambda m: m["live"] == 0, FREED_S)
    assert idle
    before, base = sampler_events(server, "long"), gateway_status(process)

    async def scenario():
        body = json.dumps({"model": "long", "n": long_n, "seed": 1}).encode()
        flood = await asyncio.wait_for(asyncio.gather(*(request(port, "/api/sample", body) for _ in range(FLOOD))), WAIT_S)
        statuses = [s for s, *_ in flood]
        assert (statuses.count(200), statuses.count(429)) == (PER_CLIENT, FLOOD - PER_CLIENT), statuses
        refused = next(f for f in flood if f[0] == 429)
        assert refused[1]["retry-after"].isdigit() and "sample streams open" in (await read_json(refused[2], refused[1]))["error"]
        during = gateway_status(process)
        print(f"gateway threads: {base['threads']} idle, {during['threads']} with the flood")
        assert during["threads"] <= base["threads"] + PER_CLIENT * THREADS_PER_STREAM + THREADS, (base, during)

        # Another address: its 1-image sample streams to the end beside the flood's streams.
        started = time.monotonic()
        status, _, reader, writer = await request(port, "/api/sample", json.dumps({"model": "bin", "n": 1, "seed": 3}).encode(),
                                                  source="127.0.0.2")
        assert status == 200
        lines = await asyncio.wait_for(read_lines(reader), WAIT_S)
        print(f"another address's 1-image sample beside the flood: {time.monotonic() - started:.2f} s")
        assert [x["type"] for x in lines] == ["start"] + ["row"] * models["bin"].manifest["shape"][1] + ["done"]
        writer.close()
        for *_, writer in flood:
            writer.close()

    asyncio.run(scenario())
    # The sampler saw the flood's first few streams only, and freed them (metrics are pushed periodically: wait).
    after, freed = wait_for(lambda: sampler_events(server, "long"),
                            lambda m: m["live"] == 0 and m["started"] - before["started"] >= PER_CLIENT, FREED_S)
    assert freed and after["started"] - before["started"] == PER_CLIENT, (before, after)
    # ...and the slots came back: the same address samples again.
    got = urllib.request.urlopen(urllib.request.Request(f"{url}/api/sample", data=json.dumps({"model": "bin", "n": 1}).encode(),
                                                        headers={"Content-Type": "application/json"}), timeout=WAIT_S)
    assert json.loads(got.read().decode().splitlines()[-1])["type"] == "done"


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_32_mb_json_body_is_refused_and_the_gateway_stays_small(gateway_process, chunked):
    url, process = gateway_process
    port = int(url.rsplit(":", 1)[1])
    size = 32 * 1000 * 1000
    asyncio.run(asyncio.wait_for(post_big(port, "/api/score", size, chunked), WAIT_S))  # warm
    before = gateway_status(process)["rss"]
    status, answer, after = asyncio.run(asyncio.wait_for(post_big(port, "/api/score", size, chunked), WAIT_S))
    grown = gateway_status(process)["rss"] - before
    print(f"32 MB body ({'chunked' if chunked else 'declared'}): gateway RSS {grown / 2**20:+.1f} MiB")
    assert status == 413 and ("at most 1 MiB" in answer["error"] or "larger than 1 MiB" in answer["error"]), answer
    assert after == 200 and grown < RSS_BOUND


def test_bad_input_gets_a_message_on_the_page_and_a_4xx_from_the_gateway(deployed, gateway, browser, tmp_path):
    # The gateway: one-line JSON errors, never a stack trace.
    cases = [
        ("POST", "/api/sample", {"model": "nope", "n": 1}, 404, "unknown model"),
        ("POST", "/api/sample", {"model": "rgb", "n": 1, "temperature": 99, "label": 0}, 422, "temperature"),
        ("POST", "/api/sample", {"model": "rgb", "n": 1, "temperature": -1, "label": 0}, 422, "temperature"),
        ("POST", "/api/sample", {"model": "rgb", "n": 1, "label": 3}, 400, "labels must be in [0, 3)"),
        ("POST", "/api/sample", {"model": "bin", "n": 17}, 422, "n:"),
        ("POST", "/api/sample", {"model": "bin", "n": 1, "label": 1}, 400, "not class-conditional"),
        ("POST", "/api/sample", {"model": "bin", "n": 1, "known_rows": 3, "image": [[[0] * 6] * 8] * 2}, 400, "image must be"),
        ("POST", "/api/score", {"model": "bin", "images": [[[[2] * 6] * 8]]}, 400, "levels"),
    ]
    for method, path, body, status, text in cases:
        got, answer = get(gateway + path, json.dumps(body).encode())
        assert (got, text in answer.get("error", "")) == (status, True), (path, body, got, answer)
    got, answer = get(f"{gateway}/api/upload?model=bin", b"hello, not a picture", "application/octet-stream")
    assert got == 400 and "not a PNG" in answer["error"]
    got, answer = get(f"{gateway}/api/upload?model=bin", b"\x89PNG\r\n\x1a\n" + bytes(3 * 1024 * 1024), "application/octet-stream")
    assert got == 413 and "at most" in answer["error"]
    got, answer = get(f"{gateway}/api/upload?model=bin", b"\x89PNG\r\n\x1a\n broken", "application/octet-stream")
    assert got == 400 and "cannot be read" in answer["error"]

    # The page: each refusal shows as its message, and the page goes on working.
    open_page(browser, gateway, "rgb", batch=1, temperature=-1, label=0)
    click(browser, "sample")
    wait_page(browser, "document.getElementById('message').className === 'error'", "an error message")
    assert "temperature" in message(browser)
    set_fields(browser, temperature=1.0, label=7)
    click(browser, "sample")
    wait_page(browser, "document.getElementById('message').textContent.includes('labels must be')", "the label message")
    set_fields(browser, label=1, batch=40)
    click(browser, "sample")
    wait_page(browser, "document.getElementById('message').textContent.includes('n:')", "the batch message")
    not_png = tmp_path / "notes.png"
    not_png.write_text("not a picture")
    browser.find_element(By.ID, "upload").send_keys(str(not_png))
    wait_page(browser, "document.getElementById('message').textContent.includes('not a PNG')", "the upload message")
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(3 * 1024 * 1024))
    browser.find_element(By.ID, "upload").send_keys(str(big))
    wait_page(browser, "document.getElementById('message').textContent.includes('at most')", "the size message")
    set_fields(browser, batch=2)
    click(browser, "sample")
    wait_done(browser)
    assert message(browser) == ""


def test_the_page_reports_a_lost_server_and_recovers_when_it_returns(deployed, gateway, browser, shots):
    server, models = deployed
    open_page(browser, gateway, "bin", batch=2, seed=6)
    server.stop()
    try:
        click(browser, "sample")
        wait_page(browser, "document.getElementById('message').textContent.includes('not reachable')", "the lost server")
        got, answer = get(f"{gateway}/api/models")
        assert got == 503 and "not reachable" in answer["error"]
        browser.save_screenshot(str(shots / "server_gone.png"))
    finally:
        server.start()  # the same ports: the page's next look at the model list finds it again
    wait_page(browser, "document.getElementById('message').hidden", "the page recovered", WAIT_S)
    click(browser, "sample")
    wait_done(browser)
    np.testing.assert_array_equal(canvas_levels(browser, "#samples canvas", 2, 1), expected(models["bin"], 2, 6))
