"""Logging never kills mpsd: a log stream whose reader went away costs log lines, not the
daemon (exit 141 on SIGPIPE/EPIPE was what happened before)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.harness import Mpsd, http, wait_until


def log_write_errors(m: Mpsd) -> float:
    code, _, body = http("GET", f"{m.url}/metrics")
    assert code == 200
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == "mpsd_log_write_errors_total":
                return sample.value
    raise AssertionError("no mpsd_log_write_errors_total on /metrics")


def test_mpsd_serves_on_after_the_reader_of_its_output_went_away(mpsd: Mpsd) -> None:
    """1. mpsd's stdout and stderr are one pipe, read until it is ready. 2. The reading end
    closes. 3. mpsd keeps answering, drops its log lines and counts them. 4. SIGTERM still
    ends it with 0 (no exit 120 from a final flush of a broken stream)."""
    mpsd.replicas = 1
    mpsd.write_config()
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    env = {**os.environ, "MPSD_TEST_MARKER": str(mpsd.workdir),
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    env.pop("NOTIFY_SOCKET", None)
    mpsd.proc = subprocess.Popen(
        [sys.executable, "-m", "mpsd", "run", "-c", str(mpsd.config_file)],
        stdout=write_end, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    os.close(write_end)
    said = bytearray()

    def read_until_ready() -> bool:
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(read_end, 1 << 16):
                said.extend(chunk)
        return b'"event": "mpsd_ready"' in said

    wait_until(read_until_ready, 30, lambda: said[-3000:].decode(errors="replace"))
    os.close(read_end)
    dropped = log_write_errors(mpsd)  # each request and probe logs at debug: lines keep coming
    for _ in range(20):
        code, _, body = http("POST", f"{mpsd.url}/v1/completions",
                             {"model": "tiny", "prompt": "hi", "max_tokens": 2})
        assert code == 200, body
    wait_until(lambda: log_write_errors(mpsd) > dropped, 10, "dropped lines counted")
    assert mpsd.proc.poll() is None
    assert mpsd.terminate() == 0
