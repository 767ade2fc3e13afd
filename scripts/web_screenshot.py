"""Screenshot of the web page mid-sample (README's docs/web_sample.png), from a running page:

    make web REPOSITORY=runs/demo/repository &     # or any served model; the page on :8080
    .venv/bin/python scripts/web_screenshot.py --url http://localhost:8080 --model demo --out docs/web_sample.png

Headless Chromium (Debian's chromium + chromium-driver) opens the page and starts a sample; once
--hold-at rows are drawn the page stops reading the stream for a moment (the rows wait in the
connection), the screenshot is taken, and the stream is let go on to the end.
"""
from __future__ import annotations

import argparse
import sys
import time

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

# Hold the page's stream reader once the progress bar shows `hold` rows: window.__release() resumes.
HOLD = """const hold = arguments[0], read = ReadableStreamDefaultReader.prototype.read;
ReadableStreamDefaultReader.prototype.read = function () {
  if (document.getElementById('bar').value >= hold && !window.__released)
    return new Promise((resolve) => { window.__release = () => { window.__released = true; resolve(read.call(this)); }; });
  return read.call(this);
};"""


def wait(driver, script: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while not (value := driver.execute_script(f"return {script}")):
        if time.monotonic() > deadline:
            raise TimeoutError(f"page: {script} not true after {timeout:g} s")
        time.sleep(0.05)
    return value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://localhost:8080")
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", default="docs/web_sample.png")
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hold-at", type=int, default=17, help="rows drawn when the screenshot is taken")
    args = parser.parse_args(argv)

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,720", "--hide-scrollbars"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        driver.get(args.url)
        wait(driver, f"document.querySelector('#model option[value=\"{args.model}\"]')")
        for field, value in (("model", args.model), ("batch", args.n), ("seed", args.seed)):
            driver.execute_script("const e = document.getElementById(arguments[0]); e.value = arguments[1];"
                                  "e.dispatchEvent(new Event('change'));", field, str(value))
        driver.execute_script(HOLD, args.hold_at)
        driver.find_element(By.ID, "sample").click()
        wait(driver, "typeof window.__release === 'function'")
        time.sleep(0.3)  # let the held rows' frame paint
        driver.save_screenshot(args.out)
        driver.execute_script("window.__release()")
        wait(driver, "document.getElementById('progress').textContent.startsWith('done')")
        done = driver.execute_script("return document.getElementById('progress').textContent")
        print(f"wrote {args.out} (then {done})")
    finally:
        driver.quit()
    return 0


if __name__ == "__main__":
    sys.exit(main())
