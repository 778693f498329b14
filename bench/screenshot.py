"""The README's picture of the web player: headless Chromium opens a running server's page,
starts a session, changes its prompt mid-stream and saves a screenshot while it plays.

    histream serve &            # the toy preset by default
    python -m bench.screenshot --url http://127.0.0.1:8000/ --out docs/player.png
"""

from __future__ import annotations

import argparse
import time

FIRST = "a large red circle moving slowly left on a dark blue background"
SECOND = "a large yellow circle moving slowly left on a dark blue background"


def wait_for(driver, expression: str, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = driver.execute_script(f"return {expression};")
        if value:
            return value
        time.sleep(0.1)
    raise TimeoutError(f"the page never showed {expression}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000/")
    parser.add_argument("--out", default="docs/player.png")
    parser.add_argument("--chunks", type=int, default=5, help="chunks to play before the shot")
    args = parser.parse_args()

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--window-size=1280,820",
                 "--autoplay-policy=no-user-gesture-required"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        driver.get(args.url)
        wait_for(driver, "window.histream && histream.status === 'idle'")
        for field, value in (("prompt", FIRST), ("new-prompt", SECOND), ("transition", "3")):
            element = driver.find_element("id", field)
            element.clear()
            element.send_keys(value)
        driver.find_element("id", "start").click()
        wait_for(driver, "histream.chunks.length >= 2")
        driver.find_element("id", "change").click()
        wait_for(driver, f"histream.chunks.length >= {args.chunks}")
        driver.save_screenshot(args.out)
        driver.find_element("id", "stop").click()
        wait_for(driver, "histream.status === 'ended'")
        print(f"wrote {args.out}")
    finally:
        driver.quit()


if __name__ == "__main__":
    main()
