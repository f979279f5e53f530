"""Supervision that converges: commands in combination, reloads that fail, with traffic flowing.

Each test is one of the cases that once left a model unserved for good, two groups on one GPU,
or a stop that never ended. The reconcile loop must end each in a state that says what the
processes are doing, and serve again wherever the plan can be served.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.harness import Mpsd, http, processes_mentioning, render_toml, wait_until

pytestmark = pytest.mark.timeout(150)


def reload_cli(m: Mpsd, doc: dict[str, object]) -> subprocess.CompletedProcess[str]:
    m.config_file.write_text(render_toml(doc))
    return subprocess.run([sys.executable, "-m", "mpsd", "reload", "-c", str(m.config_file)],
                          capture_output=True, text=True, timeout=120, check=False)


class Load:
    """Clients sending requests back to back until stopped; every outcome kept with its time."""

    def __init__(self, m: Mpsd, clients: int = 3) -> None:
        self.url = f"{m.url}/v1/completions"
        self.outcomes: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, daemon=True)
                         for _ in range(clients)]

    def _client(self) -> None:
        while not self._stop.is_set():
            code = http("POST", self.url, {"model": "tiny", "prompt": "hi", "max_tokens": 2},
                        timeout=20)[0]
            self.outcomes.append((time.monotonic(), code))

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)

    def since(self, t0: float) -> list[int]:
        return [code for t, code in self.outcomes if t >= t0]


def engine_states(m: Mpsd, gpu: str = "gpu0") -> dict[str, str]:
    group = next(g for g in m.status()["groups"] if g["gpu"] == gpu)
    return {e["key"]: e["state"] for e in group["engines"]}


def mps_daemons(m: Mpsd) -> list[int]:
    """Live MPS control daemons (``-f``) started for this test."""
    found = []
    for pid in processes_mentioning(str(m.workdir)):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.endswith(b"nvidia-cuda-mps-control") for a in argv) and b"-f" in argv:
            found.append(pid)
    return found


@pytest.mark.parametrize("mps", ["off", "on"])
def test_a_reload_whose_new_engine_crashes_is_rolled_back_and_the_model_serves(
        mpsd: Mpsd, mps: str) -> None:
    """1 replica; a reload changes its command to one that exits at start. ``mpsd reload``
    fails naming the engine and the rollback; the engine runs its previous plan again, the model
    is served afterwards, and the same bad reload is tried (and refused) again, never
    "unchanged"."""
    mpsd.mps, mpsd.replicas = mps, 1
    mpsd.start()
    mpsd.wait_state("gpu0", "running")
    good = mpsd.config()
    bad = mpsd.config()
    bad["gpu"][0]["engine"][0]["env"] = {"FAKE_ENGINE_FAIL_START": "1"}
    with Load(mpsd) as load:
        wait_until(lambda: load.since(0), 10, "first answers")
        out = reload_cli(mpsd, bad)
        assert out.returncode != 0, out
        assert "gpu0/tiny-0 failed to start" in out.stderr and "rolled back" in out.stderr, \
            out.stderr
        wait_until(lambda: engine_states(mpsd) == {"gpu0/tiny-0": "ready"}, 30,
                   lambda: f"rolled back and ready\n{mpsd.tail()}")
        after = time.monotonic()
        wait_until(lambda: len(load.since(after)) >= 20, 20, "answers after the rollback")
    assert set(load.since(after)) == {200}, load.since(after)
    again = reload_cli(mpsd, bad)
    assert again.returncode != 0 and "rolled back" in again.stderr, again
    assert reload_cli(mpsd, good).returncode == 0
    assert mpsd.group_state("gpu0") == "running"
    assert mpsd.terminate() == 0


def test_restart_and_a_reload_of_the_same_gpu_leave_one_group(mpsd: Mpsd) -> None:
    """``mpsd restart gpu0`` and a SIGHUP that restarts gpu0 (a new MPS setting), together:
    one MPS daemon for gpu0 at the end, the group running, and SIGTERM ends mpsd."""
    mpsd.start()
    mpsd.wait_state("gpu0", "running")
    doc = mpsd.config()
    doc["mps"]["env"] = {**doc["mps"]["env"], "FAKE_MPS_NOTE": "changed"}
    mpsd.config_file.write_text(render_toml(doc))
    restart = subprocess.Popen([sys.executable, "-m", "mpsd", "restart", "gpu0", "-c",
                                str(mpsd.config_file)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    assert mpsd.proc is not None
    mpsd.proc.send_signal(signal.SIGHUP)
    out, err = restart.communicate(timeout=60)
    assert restart.returncode == 0, (out, err)
    mpsd.wait_log("reload_done")
    wait_until(lambda: mpsd.group_state("gpu0") == "running"
               and engine_states(mpsd) == {"gpu0/tiny-0": "ready", "gpu0/tiny-1": "ready"},
               45, lambda: f"gpu0 running again\n{mpsd.tail()}")
    assert len(mps_daemons(mpsd)) == 1, mps_daemons(mpsd)
    assert not mpsd.events("group_crashed") and not mpsd.events("command_failed")
    assert mpsd.terminate() == 0


@pytest.mark.parametrize("during", ["restart", "reload"])
def test_sigterm_during_a_restart_or_a_reload_ends_mpsd_and_starts_nothing_after(
        mpsd: Mpsd, during: str) -> None:
    """A stop wins: SIGTERM while a restart or a reload is under way ends mpsd with 0 within
    its bound, and no engine is started after the stop began."""
    mpsd.engine_env = {"FAKE_ENGINE_START_DELAY_S": "0.5"}
    mpsd.start()
    mpsd.wait_state("gpu0", "running")
    if during == "restart":
        cli = ["restart", "gpu0"]
    else:
        doc = mpsd.config()
        doc["gpu"][0]["engine"][0]["env"] = {"FAKE_ENGINE_NOTE": "new"}
        mpsd.config_file.write_text(render_toml(doc))
        cli = ["reload"]
    command = subprocess.Popen([sys.executable, "-m", "mpsd", *cli, "-c",
                                str(mpsd.config_file)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    mpsd.wait_log("control_command")
    assert mpsd.proc is not None
    mpsd.proc.send_signal(signal.SIGTERM)
    assert mpsd.proc.wait(40) == 0
    command.communicate(timeout=30)
    log = mpsd.log()
    stop = next(i for i, e in enumerate(log) if e.get("event") == "signal_received"
                and e.get("signal") == "SIGTERM")
    started = [e for e in log[stop:] if e.get("event") == "engine_starting"]
    assert started == [], started


def test_engines_with_an_explicit_kv_size_start_and_recover_together(mpsd: Mpsd) -> None:
    """Every engine has ``--kv-cache-memory-bytes``: both start at once (the second process is
    started before the first is ready), at boot and after a one_for_all recovery."""
    mpsd.engine_env = {"FAKE_ENGINE_START_DELAY_S": "1.0"}
    mpsd.overrides = {"engine": {"args": ["--kv-cache-memory-bytes", "1073741824"]}}
    mpsd.start()
    mpsd.wait_state("gpu0", "running")

    def overlapped(after: int) -> bool:
        log = mpsd.log()
        starts = [i for i, e in enumerate(log) if e.get("event") == "process_started"
                  and e.get("engine")][after:after + 2]
        first_ready = next(i for i, e in enumerate(log) if i > starts[0]
                           and e.get("event") == "engine_ready")
        return len(starts) == 2 and starts[1] < first_ready

    assert overlapped(0)
    os.kill(mpsd.engine_pids()["gpu0/tiny-1"], signal.SIGKILL)
    mpsd.wait_state("gpu0", "running", after=1)
    assert overlapped(2)
    assert mpsd.terminate() == 0


def test_requests_sent_during_a_recovery_are_held_not_failed(mpsd: Mpsd) -> None:
    """One GPU, MPS on: a killed engine takes its GPU through a one_for_all recovery (engines
    ~1 s to start). Requests sent after the kill wait for the first engine back instead of an
    immediate 503: none of them fails, while /health says not ready during the gap."""
    mpsd.engine_env = {"FAKE_ENGINE_START_DELAY_S": "1.0"}
    mpsd.start()
    mpsd.wait_state("gpu0", "running")
    with Load(mpsd, clients=4) as load:
        wait_until(lambda: len(load.since(0)) >= 10, 10, "first answers")
        killed = time.monotonic()
        os.kill(mpsd.engine_pids()["gpu0/tiny-0"], signal.SIGKILL)
        mpsd.wait_state("gpu0", "recovering")
        gap = time.monotonic()
        mpsd.wait_state("gpu0", "running", after=1)
        back = time.monotonic()
        wait_until(lambda: len(load.since(back)) >= 10, 20, "answers after the recovery")
    sent_after = [code for t, code in load.outcomes if t > gap + 0.5]  # answered after sending
    assert sent_after and set(sent_after) == {200}, sent_after
    assert back > killed
    metrics = http("GET", f"{mpsd.url}/metrics")[2].decode()
    served = next(line for line in metrics.splitlines()
                  if line.startswith('mpsd_hold_seconds_count{outcome="served"}'))
    assert float(served.split()[-1]) >= 1, served
    assert "mpsd_requests_held 0.0" in metrics
