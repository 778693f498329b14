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


BROWSER, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"  # Debian's packages


def chromium(width: int = 1280, height: int = 820):
    """Headless Chromium through ChromeDriver (Selenium), autoplay allowed."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER
    flags = ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
             "--autoplay-policy=no-user-gesture-required",
             f"--window-size={width},{height}")  # fmt: skip
    for flag in flags:
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(DRIVER), options=options)


def wait_for(driver, expression: str, timeout: float = 120.0):
    """Waits until `expression` (JavaScript over the page's `histream` state) is truthy and
    returns its value; on a timeout, says what the page's state was."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = driver.execute_script(f"return {expression};")
        if value:
            return value
        time.sleep(0.1)
    state = driver.execute_script("return JSON.stringify(window.histream || null);")
    raise TimeoutError(f"the page never showed {expression}; its state: {state[:2000]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000/")
    parser.add_argument("--out", default="docs/player.png")
    parser.add_argument("--chunks", type=int, default=5, help="chunks to play before the shot")
    args = parser.parse_args()

    driver = chromium()
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
