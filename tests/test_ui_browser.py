"""The dashboard in a real browser: headless Chromium (Debian's package) driven by Playwright.

It starts `lorakit ui` on the embedded SmolLM2 model, fills the New run form, starts a short run of the
dates task, watches the loss curve grow while it trains and the run end as finished, then asks the base
model and the new adapter the same question side by side in the chat, and opens the adapter's heat map.
Screenshots go to $LORAKIT_SCREENSHOTS (the README's come from `LORAKIT_SCREENSHOTS=docs/img make
test-slow`) or the test's temporary directory. `make test-slow` installs Chromium and Playwright.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import free_port

pytestmark = [pytest.mark.slow, pytest.mark.integration]
ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
# Headless, and quiet on this machine's closed network (no update, sync or metrics connections).
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
FORM = {  # a run of about a minute on 2 CPU cores
    "data.train": "data/dates-train.jsonl",
    "data.eval": "data/dates-eval.jsonl",
    "data.max_length": "64",
    "data.max_eval_rows": "20",
    "lora.r": "8",
    "train.max_steps": "12",
    "train.batch_size": "4",
    "train.lr": "2e-3",
    "train.eval_every": "6",
    "train.max_new_tokens": "10",
}


@pytest.fixture
def dashboard(tmp_path):
    if not CHROMIUM.is_file():
        pytest.fail("Debian's chromium is not installed: `make test-slow` installs it (apt-get install chromium)")
    runs = tmp_path / "runs"
    subprocess.run(
        [sys.executable, str(ROOT / "examples" / "make_dates.py"), "--out", str(runs / "data"), "--train", "300",
         "--eval", "40"],
        check=True, capture_output=True,
    )  # fmt: skip
    port = free_port()
    log = open(tmp_path / "ui.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "lorakit", "ui", "--runs", str(runs), "--port", str(port)], stdout=log, stderr=log
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(url + "api/info", timeout=2) as response:
                json.loads(response.read())
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "ui.log").read_text()
            time.sleep(0.3)
    yield {"url": url, "runs": runs}
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def test_dashboard_launches_a_run_watches_it_and_chats_with_its_adapter(dashboard, tmp_path):
    from playwright.sync_api import sync_playwright

    shots = Path(os.environ.get("LORAKIT_SCREENSHOTS") or tmp_path / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.on("pageerror", lambda err: errors.append(str(err)))
        page.goto(dashboard["url"])
        page.wait_for_selector("#runs-empty:not([hidden])")

        # the form: every field of the config reference, with help; problems shown next to their field
        page.click("nav button[data-view=new]")
        page.wait_for_selector("#f-train-lr")
        assert page.locator("#form-fields .field").count() > 40
        page.fill("#f-name", "dates-tiny")
        page.fill("#f-train-lr", "-1")
        page.wait_for_selector("[data-error='train.lr']:not(:empty)")
        assert "positive" in page.inner_text("[data-error='train.lr']")
        for key, value in FORM.items():
            page.fill(f"#f-{key.replace('.', '-')}", value)
        page.wait_for_function("document.querySelector('#form-status').textContent === 'ready to start'")
        assert page.inner_text("[data-error='train.lr']") == ""
        yaml_text = page.inner_text("#form-yaml")
        assert "max_steps: 12" in yaml_text and "output_dir: dates-tiny" in yaml_text
        assert "lean_cpu_memory" not in yaml_text  # only the fields changed from their defaults
        page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(path=str(shots / "ui-new-run.png"))

        # start it: the page shows the run, its loss curve grows while it trains, and it finishes
        page.click("#start-run")
        page.wait_for_selector("#run-detail:not([hidden])")
        points = "(document.getElementById('chart-loss').data || [{x: []}])[0].x.length"
        seen_running: list[int] = []
        shot_taken = False
        deadline = time.monotonic() + 600
        while "finished" not in page.inner_text("#run-state"):
            assert time.monotonic() < deadline, page.inner_text("#run-log")
            assert "failed" not in page.inner_text("#run-state"), page.inner_text("#run-log")
            if "running" in page.inner_text("#run-state"):
                seen_running.append(page.evaluate(points))
                if not shot_taken and seen_running[-1] >= 5:
                    page.screenshot(path=str(shots / "ui-run-live.png"))
                    shot_taken = True
            page.wait_for_timeout(250)
        growth = sorted(set(seen_running) - {0})
        assert len(growth) >= 3, seen_running  # several partial curves were drawn while it trained
        assert seen_running == sorted(seen_running)
        page.wait_for_function(f"{points} === 12")
        assert (dashboard["runs"] / "dates-tiny" / "adapter_model.safetensors").is_file()
        page.wait_for_selector("#runs-table tr[data-run='dates-tiny'] .badge.finished")
        page.check("#runs-table tr[data-run='dates-tiny'] input[type=checkbox]")  # overlay on the comparison chart
        page.wait_for_function("(document.getElementById('overlay-chart').data || []).length === 2")
        page.screenshot(path=str(shots / "ui-runs.png"))

        # a `lorakit compare` output directory: its table and chart (records written by the test)
        compare = dashboard["runs"] / "methods"
        compare.mkdir()
        records = [
            {"method": "lora", "status": "ok", "trainable_percent": 3.5, "exact_match": 0.9, "peak_memory_mb": 900.0,
             "median_step_seconds": 1.5},
            {"method": "full", "status": "ok", "trainable_percent": 100.0, "exact_match": 0.8,
             "peak_memory_mb": 2000.0, "median_step_seconds": 3.0},
        ]  # fmt: skip
        (compare / "results.json").write_text(json.dumps(records))
        page.click("nav button[data-view=compare]")
        page.wait_for_selector("#compare-table tbody tr")
        assert page.locator("#compare-table tbody tr").count() == 2
        assert "90.0%" in page.inner_text("#compare-table tbody tr:first-child")
        page.wait_for_function("(document.getElementById('compare-chart').data || []).length === 4")

        # chat: the same question to the base model and the new adapter, answered side by side
        page.click("nav button[data-view=chat]")
        page.wait_for_selector("#chat-models input[value='dates-tiny']")
        for box in page.locator("#chat-models input").all():
            box.check()
        page.fill("#chat-system", "Write the date as YYYY-MM-DD.")
        page.fill("#chat-prompt", "the ninth of May 1999")
        page.click("#chat-send")
        page.wait_for_function("document.querySelectorAll('.answer[data-done]').length === 2", timeout=120_000)
        base = page.inner_text(".answer[data-model='base'] pre")
        tuned = page.inner_text(".answer[data-model='dates-tiny'] pre")
        assert base.strip() and tuned.strip() and base != tuned, (base, tuned)
        page.screenshot(path=str(shots / "ui-chat.png"))

        # the adapter: the inspect table and heat map
        page.click("nav button[data-view=adapter]")
        page.wait_for_selector("#adapter-table tbody tr")
        assert page.locator("#adapter-table tbody tr").count() == 30 * 7  # SmolLM2: 30 layers x 7 projections
        page.wait_for_selector("#adapter-heatmap .main-svg")
        page.screenshot(path=str(shots / "ui-adapter.png"))

        # delete from the page: a dismissed confirmation deletes nothing, an accepted one the whole run
        page.click("nav button[data-view=runs]")
        page.click("#runs-table tr[data-run='dates-tiny'] td:nth-child(2)")
        page.wait_for_selector("#run-delete:not([hidden])")
        page.once("dialog", lambda dialog: dialog.dismiss())
        page.click("#run-delete")
        page.wait_for_timeout(500)
        assert (dashboard["runs"] / "dates-tiny" / "adapter_model.safetensors").is_file()
        page.once("dialog", lambda dialog: dialog.accept())
        page.click("#run-delete")
        page.wait_for_selector("#runs-table tr[data-run='dates-tiny']", state="detached")
        assert not (dashboard["runs"] / "dates-tiny").exists() and page.is_hidden("#run-detail")
        page.wait_for_function("(document.getElementById('overlay-chart').data || []).length === 0 || "
                               "document.getElementById('overlay-chart').hidden")  # fmt: skip
        browser.close()
    assert errors == []
