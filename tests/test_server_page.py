"""The chat page at / in a real headless browser (Debian's chromium + chromedriver, driven by selenium): a real
conversation streams through it, and the memory panel shows the cache filling, the pinned system prompt and
evictions, with old messages marked as evicted while the system prompt stays in the cache.

Needs `apt install chromium chromium-driver` and `pip install selenium`; skipped without them."""
from __future__ import annotations

import shutil
import tempfile

import pytest

pytest.importorskip("fastapi")
webdriver = pytest.importorskip("selenium.webdriver")

from helpers.live_server import running_server  # noqa: E402

pytestmark = [pytest.mark.model,
              pytest.mark.skipif(not (shutil.which("chromium") and shutil.which("chromedriver")),
                                 reason="needs Debian's chromium and chromium-driver")]


@pytest.fixture()
def browser():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = shutil.which("chromium")
    profile = tempfile.mkdtemp(prefix="pymemory-chromium-")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}", "--window-size=1200,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def test_chat_page_streams_and_shows_memory(smollm2_path, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with running_server(model=smollm2_path, n_sink=4, window=124, n_threads=1, default_max_tokens=40,
                        api_key="page-key") as (url, app):
        browser.get(url + "/")
        browser.find_element(By.ID, "apikey").send_keys("page-key")
        system = browser.find_element(By.ID, "system")
        system.clear()
        system.send_keys("You are a helpful assistant. The secret password is 'tulip'.")
        wait = WebDriverWait(browser, 120)
        for i, text in enumerate(["Tell me about the sea.", "And about the mountains?", "And the rivers?",
                                  "And forests?"]):
            browser.find_element(By.ID, "input").send_keys(text + "\n")
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".assistant[data-done='1']")) == i + 1)
        assert browser.find_element(By.ID, "error").text == ""
        replies = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".assistant")]
        assert len(replies) == 4 and all(replies)
        cells = browser.find_element(By.ID, "cells").text
        used, capacity = (int(x) for x in cells.split(" / "))
        assert capacity == 128 and 0 < used <= 128
        assert int(browser.find_element(By.ID, "pinned").text) > 10  # the system prompt is pinned
        assert not browser.find_element(By.ID, "evicted").text.startswith("0 ")  # 4 x 40 tokens > 128 cells
        wait.until(lambda d: "cached" in d.find_element(By.CSS_SELECTOR, ".system").get_attribute("class"))
        first_user = browser.find_elements(By.CSS_SELECTOR, ".user")[0].get_attribute("class")
        last_reply = browser.find_elements(By.CSS_SELECTOR, ".assistant")[-1].get_attribute("class")
        assert "evicted" in first_user or "partial" in first_user  # the oldest turn has streamed out
        assert "cached" in last_reply
        assert browser.find_element(By.ID, "session").text.startswith("auto-")
