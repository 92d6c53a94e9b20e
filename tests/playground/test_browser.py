"""`align playground` driven in a real headless browser (the system's Chromium, through Selenium): the
page streams two entries' answers side by side, a click records the preference, and the row it writes
trains a reward step as it is. Skipped, with the reason, where Chromium, its driver or Selenium is absent
(Debian: `apt-get install chromium chromium-driver`; CI installs them)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO_ROOT
from tests.playground.helpers import playground_registry

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
DRIVER = shutil.which("chromedriver")
MESSAGE = "What is 2 + 3?"

pytestmark = pytest.mark.skipif(CHROMIUM is None or DRIVER is None,
                                reason="no Chromium and chromedriver on PATH (apt-get install chromium chromium-driver)")


@pytest.fixture
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture
def server(tmp_path, tiny_base):
    registry = playground_registry(tmp_path / "registry", tiny_base)
    prefs = tmp_path / "prefs.jsonl"
    command = [sys.executable, "-m", "align.cli.main", "--registry", str(registry.root), "playground", "tiny/a",
               "tiny/b", "--judge", "tiny/reward", "--port", "0", "--prefs", str(prefs), "--dtype", "fp32",
               "--max-new-tokens", "16", "--temperature", "1.0", "--top-k", "40"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines, url, deadline = [], None, time.monotonic() + 180
    while url is None:
        line = proc.stdout.readline()
        assert line or proc.poll() is None, "".join(lines)
        assert time.monotonic() < deadline, "the playground did not start: " + "".join(lines)
        lines.append(line)
        if line.startswith("playground ready at "):
            url = line.split()[3]
    yield url, prefs, registry
    proc.terminate()
    proc.wait(timeout=30)


def test_the_page_streams_two_answers_and_a_click_writes_a_row_the_reward_stage_trains_on(browser, server,
                                                                                         tmp_path, tiny_base):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, prefs, _ = server
    wait = WebDriverWait(browser, 120)
    browser.get(url)
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
    columns = browser.find_elements(By.CSS_SELECTOR, ".column")
    assert [c.find_element(By.CSS_SELECTOR, "select.model").get_attribute("value") for c in columns] == \
        ["tiny/a@1", "tiny/b@1"]
    assert "judge: tiny/reward@1" in browser.find_element(By.ID, "judge-info").text
    # count how often each answer's text changes while it streams
    browser.execute_script(
        "window.updates = [0, 0]; document.querySelectorAll('.answer').forEach((e, i) => new MutationObserver("
        "() => { window.updates[i] += 1; }).observe(e, {childList: true, characterData: true, subtree: true}));")
    # a seed in column A's settings (copied to B: "same settings" is on) makes the sampled answers reproducible
    browser.find_element(By.CSS_SELECTOR, ".column details.settings summary").click()  # open the sampling panel
    browser.find_element(By.CSS_SELECTOR, ".column input[data-key=seed]").send_keys("5")
    browser.find_element(By.ID, "message").send_keys(MESSAGE)
    browser.find_element(By.ID, "send").click()
    wait.until(lambda d: all(s.get_attribute("data-done") == "1" for s in d.find_elements(By.CSS_SELECTOR, ".stats")))
    # the answers as the page holds them (a random model's text has control characters the DOM's visible
    # text drops), and as it shows them
    answers = browser.execute_script("return state.columns.map((c) => c.result.text)")
    shown = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".answer")]
    stats = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".stats")]
    assert all(answer.strip() for answer in answers) and all(shown), (answers, shown)
    assert browser.execute_script("return state.columns.map((c) => c.result.settings.seed)") == [5, 5]
    assert all(n > 2 for n in browser.execute_script("return window.updates")), "the answers did not stream"
    for line in stats:
        assert "first token" in line and "ms/token" in line and "tokens/s" in line and "judge " in line, line

    assert browser.find_element(By.ID, "vote-b").get_attribute("value") == "1"  # A against B
    browser.find_element(By.ID, "prefer-a").click()
    wait.until(lambda d: d.find_element(By.ID, "pref-count").get_attribute("data-rows") == "1")
    [row] = [json.loads(line) for line in prefs.read_text().splitlines()]
    assert row["prompt"] == [{"role": "user", "content": MESSAGE}]
    assert row["chosen_ref"] == "tiny/a@1" and row["rejected_ref"] == "tiny/b@1"
    assert row["chosen"] == answers[0] and row["rejected"] == answers[1]
    assert row["chosen_settings"]["temperature"] == 1.0 and row["chosen_settings"]["seed"] == 5

    from align.config.loading import validate_recipe
    from align.pipeline.run import run_recipe
    from align.registry.store import Registry

    raw = {"name": "from-playground", "base": str(tiny_base),
           "stages": {"reward": {"data": str(prefs), "max_steps": 1, "batch_size": 1, "eval_split": 0.0,
                                 "logging_steps": 1, "lr": 1e-3, "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}}}
    recipe = validate_recipe(raw, [], source=str(tmp_path / "r.yaml"))
    registry = Registry(tmp_path / "trained")
    entry = run_recipe(recipe, registry, runs_root=tmp_path / "runs")["reward"]
    history = [h for h in entry.manifest["history"] if "loss" in h]
    assert entry.kind == "reward" and len(history) == 1 and history[0]["loss"] > 0
