"""One ``mpsd run`` per state directory, with two real daemons on the fakes."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.harness import Mpsd, http


def test_a_second_mpsd_run_refuses_and_touches_nothing(mpsd: Mpsd) -> None:
    """1. A daemon serves. 2. ``mpsd run`` with the same config exits 1 at once, naming the
    first one's PID and how to stop it. 3. The first one's engines are the same processes,
    its log saw nothing, and it still answers."""
    mpsd.replicas = 1
    mpsd.start()
    mpsd.wait_state("gpu0", "running")
    assert mpsd.proc is not None
    engines = mpsd.engine_pids()
    seen = len(mpsd.log())
    second = subprocess.run([sys.executable, "-m", "mpsd", "run", "-c", str(mpsd.config_file)],
                            capture_output=True, text=True, timeout=30, check=False,
                            env={**os.environ, "MPSD_TEST_MARKER": str(mpsd.workdir)})
    assert second.returncode == 1, second.stderr
    said = second.stderr
    assert f"PID {mpsd.proc.pid}" in said and f"kill {mpsd.proc.pid}" in said, said
    assert "systemctl stop mpsd" in said and "Traceback" not in said, said
    assert not second.stdout  # no event was logged: nothing started, nothing reaped
    assert mpsd.engine_pids() == engines
    for pid in engines.values():
        os.kill(pid, 0)  # alive
    assert [e["event"] for e in mpsd.log()[seen:]
            if e["event"] in ("leftovers_reaped", "process_started", "fault_detected")] == []
    code, _, body = http("POST", f"{mpsd.url}/v1/completions",
                         {"model": "tiny", "prompt": "hi", "max_tokens": 2})
    assert code == 200, body
    assert mpsd.terminate() == 0
