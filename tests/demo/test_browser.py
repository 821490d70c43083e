"""The demo in a real headless browser (Debian's chromium + chromedriver, driven by Selenium)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import unavailable
from tests.web.test_servers import ROOT, free_port, wait_until_up

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def demo(tmp_root: Path) -> Iterator[str]:
    port = free_port()
    log = tmp_root / "demo-browser.log"
    env = {**os.environ, "SQLA_SESSIONS_DEMO_JOB_SECONDS": "0.5"}
    env.pop("SQLA_SESSIONS_DATABASE_URL", None)
    command = [
        sys.executable, "-m", "sqla_sessions", "demo", "--port", str(port),
        "--database-url", f"sqlite:///{tmp_root / 'demo-browser.db'}",
    ]  # fmt: skip
    with log.open("wb") as handle:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)
        try:
            wait_until_up(process, port, log)
            yield f"http://127.0.0.1:{port}"
        finally:
            process.terminate()
            process.wait(15)


def browser(tmp_path: Path, name: str) -> Any:
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        unavailable("chromium and chromedriver (apt-get install chromium chromium-driver)", FileNotFoundError(CHROMIUM))
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage", "--disable-sync",
        f"--user-data-dir={tmp_path / name}", "--window-size=1000,900",
    ):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.implicitly_wait(0)
    return driver


def wait_for(driver: Any, css: str, text: str | None = None, timeout: float = 20) -> Any:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, timeout)
    if text is not None:
        wait.until(ec.text_to_be_present_in_element((By.CSS_SELECTOR, css), text))
    return wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, css)))


def login(driver: Any, base: str, name: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(base + "/")
    driver.find_element(By.ID, "name").send_keys(name)
    driver.find_element(By.ID, "login").click()
    wait_for(driver, "#user", name)


def test_the_demo_in_a_browser(demo: str, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    first = browser(tmp_path, "first")
    second = browser(tmp_path, "second")
    try:
        # Log in: the flash message shows, and the background job fills the dashboard.
        login(first, demo, "ada")
        assert "Welcome, ada" in first.find_element(By.ID, "flash").text
        board = wait_for(first, "#dashboard-ready")
        assert "open_orders" in board.text and "dramatiq worker" in board.text
        first.save_screenshot(str(tmp_path / "dashboard.png"))
        first.get(demo + "/")  # the flash survives exactly one following request
        assert not first.find_elements(By.ID, "flash")

        # The race page: 50 parallel writes from the browser, none lost.
        first.get(demo + "/race")
        first.find_element(By.ID, "race").click()
        wait_for(first, "#race-result", "50 of 50 writes kept", timeout=30)
        first.find_element(By.ID, "race-list").click()  # 50 pushes onto one list: all kept
        wait_for(first, "#race-list-result", "50 of 50 pushes kept", timeout=30)

        # Blocking: five read-modify-writes of one key, one at a time.
        first.get(demo + "/blocking")
        first.find_element(By.ID, "blocking").click()
        wait_for(first, "#counters", "blocking route: 5")

        # A second browser logs in as the same user; the first revokes it from "your devices".
        login(second, demo, "ada")
        first.get(demo + "/")
        assert len(first.find_elements(By.CSS_SELECTOR, "tr.device")) == 2
        first.find_element(By.CSS_SELECTOR, "button.revoke").click()
        wait_for(first, "#flash", "logged out")
        assert len(first.find_elements(By.CSS_SELECTOR, "tr.device")) == 1
        second.get(demo + "/")
        assert second.find_elements(By.ID, "name"), "the revoked browser must see the login form"
        first.get(demo + "/")
        assert first.find_element(By.ID, "user").text == "ada"  # the first one is still signed in
    finally:
        first.quit()
        second.quit()
