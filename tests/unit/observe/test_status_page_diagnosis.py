"""The status page shows a GPU's CPU-bound diagnosis with its advice, says the share for a GPU
that is not CPU-bound, and shows nothing for a daemon that sends none (a missing value is a
dash), and each engine's state and reason where the daemon sends them — in a real headless
Chromium (the page and its helpers: test_status_page.py)."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest

from mpsd.observe.diagnosis import ADVICE
from tests.unit.observe.test_status_page import CHROMIUM, canned_status, chromium, run, serve_page

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium: apt-get install -y chromium chromium-driver")


def diagnosed(now: float) -> dict[str, Any]:
    status = canned_status(now)
    gpu0, _ = status["groups"]
    gpu0["diagnosis"] = {"cpu_bound": True, "cpu_bound_ratio": 0.83, "window_s": 300.0,
                         "samples": 30, "gpu_utilization": 0.41,
                         "engine_cpu": {"gpu0/qwen-0": 0.97, "gpu0/qwen-1": 0.95},
                         "advice": ADVICE}
    status["groups"].append({**gpu0, "gpu": "gpu2", "state": "degraded", "engines": [
        {**gpu0["engines"][0], "key": "gpu2/qwen-0", "ready": False, "state": "failed",
         "reason": "crash loop: 6 restarts in 600 s"},
        {**gpu0["engines"][1], "key": "gpu2/qwen-1", "state": "ready"}], "diagnosis": {
        "cpu_bound": False, "cpu_bound_ratio": 0.0, "window_s": 300.0, "samples": 30,
        "gpu_utilization": 0.93, "engine_cpu": {}, "advice": None}})
    return status


def test_the_page_shows_the_diagnosis_and_its_advice(tmp_path: Path) -> None:
    now = time.time()

    async def main() -> str:
        async with serve_page(lambda: diagnosed(now)) as (url, _):
            return await chromium(url, tmp_path / "profile", "--dump-dom")

    dom = run(main)
    cards = {m.group(1): m.group(0) for m in re.finditer(
        r'<section class="card group[^"]*" data-gpu="(\w+)">.*?</section>', dom, re.S)}
    assert set(cards) == {"gpu0", "gpu1", "gpu2"}
    assert 'class="diagnosis cpu-bound"' in cards["gpu0"]
    assert "waited for the engines' CPU 83 % of the last 5 min (GPU 41 % busy)" in cards["gpu0"]
    assert ADVICE in cards["gpu0"]
    assert 'class="diagnosis"' in cards["gpu2"] and "CPU 0 % of the last 5 min" in cards["gpu2"]
    assert "`mpsd tune`" not in cards["gpu2"]
    # per-engine state and the reason of one that is not ready (daemons that send them)
    assert 'class="badge state s-degraded"' in cards["gpu2"]
    assert re.search(r"gpu2/qwen-0.*?</span>failed<div class=\"why\">crash loop: 6 restarts",
                     cards["gpu2"], re.S)
    assert re.search(r"gpu2/qwen-1.*?</span>ready</td>", cards["gpu2"], re.S)
    assert "diagnosis" not in cards["gpu1"]  # an older daemon's group: nothing shown
    assert "restarts in window: <b>\u2013</b>" in cards["gpu1"]  # what it lacks is a dash
