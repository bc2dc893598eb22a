"""Headless Debian Chromium driven by selenium through the system chromedriver, for tests that must see
what a user's browser shows (a web viewer's canvas), not what an HTTP client receives.

Loopback only: no proxy, and a host resolver that answers nothing but 127.0.0.1, so a page that
reaches for a CDN fails here instead of quietly depending on the internet. Selenium's own driver
download (Selenium Manager) never runs: both the browser and the driver are given by path.

Selenium is synchronous: from an async test call these helpers through ``asyncio.to_thread``, or the
event loop that serves the page stalls while the browser waits for it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import pytest

if TYPE_CHECKING:  # selenium is imported when a browser starts, so collecting tests needs none
    from selenium.webdriver import Chrome

CHROMEDRIVER = "/usr/bin/chromedriver"
#: The CSS pixel size of the browser window; the device scale is forced to 1 so screenshots measure
#: in the page's CSS pixels.
WINDOW = (800, 700)


def _require(path: str | None, package: str) -> str:
    if path is None or not os.access(path, os.X_OK):
        msg = f"{package} not installed (apt-get install {package}): the browser test cannot run"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return path


class PageFailed(AssertionError):
    """The page signalled an error, or never signalled at all; carries the browser's console."""


@dataclass
class Browser:
    driver: Chrome

    def open(self, url: str, *, timeout: float = 20.0) -> str:
        """Load ``url`` and wait until ``document.body.dataset.state`` leaves "loading"; return it.

        The page says when it is done, so the wait is exactly as long as the page takes (polled every
        50 ms), never a guessed sleep. Raises :class:`PageFailed` when the state never changes.
        """
        from selenium.common.exceptions import TimeoutException
        from selenium.webdriver.support.wait import WebDriverWait

        self.driver.get(url)

        def state(d: Chrome) -> str | None:
            value = d.execute_script("return document.body ? document.body.dataset.state : null")
            return cast(str, value) if value not in (None, "", "loading") else None

        try:
            return cast(str, WebDriverWait(self.driver, timeout, poll_frequency=0.05).until(state))
        except TimeoutException:
            raise PageFailed(f"{url} still loading after {timeout} s; console:\n{self.console()}") from None

    def screenshot(self, css_selector: str) -> bytes:
        """PNG of the element's box as rendered (the composited page, what a user sees)."""
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, css_selector).screenshot_as_png

    def console(self) -> str:
        """The browser console since the last call: where a page's script errors end up."""
        entries = self.driver.get_log("browser")  # type: ignore[no-untyped-call]
        return "\n".join(f"{e.get('level')}: {e.get('message')}" for e in entries) or "(empty)"


@contextmanager
def headless_chromium() -> Iterator[Browser]:
    """A fresh headless Chromium with its own throwaway profile; skip loudly when chromium,
    chromedriver or selenium is missing (fail under CI=true, where `make test` installs them)."""
    chromium = _require(shutil.which("chromium"), "chromium")
    driver_path = _require(CHROMEDRIVER if os.path.exists(CHROMEDRIVER) else shutil.which("chromedriver"),
                           "chromium-driver")
    try:
        from selenium.webdriver import Chrome, ChromeOptions, ChromeService
    except ImportError:
        msg = "selenium not installed (pip install -e '.[test]'): the browser test cannot run"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)

    with tempfile.TemporaryDirectory(prefix="duo-chromium-") as profile:
        options = ChromeOptions()
        options.binary_location = chromium
        for argument in (
            "--headless=new",
            f"--user-data-dir={profile}",
            f"--window-size={WINDOW[0]},{WINDOW[1]}",
            "--force-device-scale-factor=1",
            "--no-first-run",
            "--no-default-browser-check",
            "--no-proxy-server",
            # nothing resolves but loopback: a page that needs the internet fails loudly here
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            "--disable-default-apps",
            # containers give /dev/shm 64 MiB, which Chromium's renderer outgrows
            "--disable-dev-shm-usage",
            "--mute-audio",
        ):
            options.add_argument(argument)
        if os.geteuid() == 0:
            options.add_argument("--no-sandbox")  # Chromium refuses to run its sandbox as root
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        service = ChromeService(executable_path=driver_path)
        driver = Chrome(options=options, service=service)
        try:
            yield Browser(driver)
        finally:
            driver.quit()
