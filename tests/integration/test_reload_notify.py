"""systemd integration of ``mpsd run``: the sd_notify sequence and reload by diff.

A real ``AF_UNIX`` datagram socket stands in for systemd's ``NOTIFY_SOCKET``; reload is driven
by SIGHUP (what ``ExecReload`` sends) while a client keeps requests in flight.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import Mpsd, http, render_toml, wait_until


class NotifyListener:
    """Collects every datagram mpsd sends to its NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.messages.append(self.sock.recv(65536).decode())
            except TimeoutError:
                continue

    def kinds(self) -> list[str]:
        """The first key of every message (READY, STATUS, RELOADING, ...), in order."""
        return [m.split("\n")[0].split("=")[0] for m in self.messages]

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture
def notify(workdir: Path, mpsd: Mpsd) -> Iterator[NotifyListener]:
    listener = NotifyListener(workdir / "notify.sock")
    mpsd.notify_socket = str(listener.path)
    yield listener
    listener.close()


def test_notify_sequence_for_start_reload_and_stop(mpsd: Mpsd, notify: NotifyListener) -> None:
    mpsd.start()
    wait_until(lambda: "READY" in notify.kinds(), 30, "READY=1")
    ready = next(m for m in notify.messages if m.startswith("READY=1"))
    assert "STATUS=1/1 GPUs running, 2/2 engines ready" in ready
    statuses = [m for m in notify.messages if m.startswith("STATUS=")]
    assert statuses and statuses[0].startswith("STATUS=0/1 GPUs running")
    assert notify.kinds().index("STATUS") < notify.kinds().index("READY")

    assert mpsd.proc is not None
    mpsd.proc.send_signal(signal.SIGHUP)  # an unchanged file: nothing restarts
    wait_until(lambda: notify.kinds().count("READY") == 2, 20, "READY=1 after reload")
    reloading = next(m for m in notify.messages if m.startswith("RELOADING=1"))
    assert "MONOTONIC_USEC=" in reloading
    assert mpsd.wait_log("reload_done")[0]["unchanged"] == ["gpu0"]

    assert mpsd.terminate() == 0
    assert "STOPPING" in notify.kinds()
    stop_at = notify.kinds().index("STOPPING")
    assert stop_at > notify.kinds().index("RELOADING")


def test_bad_reload_keeps_the_old_config_serving(mpsd: Mpsd, notify: NotifyListener) -> None:
    mpsd.start()
    mpsd.wait_state("gpu0", "running")
    pids = mpsd.engine_pids()
    mpsd.config_file.write_text(mpsd.config_file.read_text() + "\n[oops\n")
    assert mpsd.proc is not None
    mpsd.proc.send_signal(signal.SIGHUP)
    rejected = mpsd.wait_log("reload_rejected")
    assert "not valid TOML" in rejected[0]["error"]
    wait_until(lambda: any("reload failed, old config kept" in m for m in notify.messages), 10,
               "STATUS saying the old config is kept")
    code, _, body = http("POST", f"{mpsd.url}/v1/completions",
                         {"model": "tiny", "prompt": "hi", "max_tokens": 2})
    assert code == 200, body
    assert mpsd.engine_pids() == pids
    assert mpsd.terminate() == 0


def _load(url: str, stop: threading.Event, results: list[int]) -> None:
    body = json.dumps({"model": "tiny", "prompt": "x", "max_tokens": 8}).encode()
    while not stop.is_set():
        req = urllib.request.Request(f"{url}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                resp.read()
                results.append(resp.status)
        except Exception as exc:  # every failure counts as one
            results.append(getattr(exc, "code", 0))


def _reload_under_load(m: Mpsd, doc: dict[str, object]) -> tuple[dict[str, object], list[int]]:
    """Rewrite the config, SIGHUP, wait for the reload to finish; the load's status codes."""
    stop, results = threading.Event(), []
    worker = threading.Thread(target=_load, args=(m.url, stop, results))
    worker.start()
    try:
        wait_until(lambda: len(results) > 5, 10, "load running")
        m.config_file.write_text(render_toml(doc))
        assert m.proc is not None
        m.proc.send_signal(signal.SIGHUP)
        done = m.wait_log("reload_done", timeout=40)[0]
        seen = len(results)
        wait_until(lambda: len(results) > seen + 5, 10, "load still served after the reload")
    finally:
        stop.set()
        worker.join()
    return done, results


def test_reload_rolls_a_changed_group_while_the_other_serves(mpsd: Mpsd) -> None:
    mpsd.gpus = 2
    mpsd.start()
    mpsd.wait_state("gpu0", "running")
    mpsd.wait_state("gpu1", "running")
    gpu0, gpu1 = mpsd.engine_pids("gpu0"), mpsd.engine_pids("gpu1")
    doc = mpsd.config()
    doc["gpu"][1]["engine"][0]["args"] = ["--max-model-len", "1024"]  # gpu1's engines change
    done, results = _reload_under_load(mpsd, doc)
    assert done["rolled"] == ["gpu1"] and done["unchanged"] == ["gpu0"]
    assert results and all(code == 200 for code in results), set(results)
    assert mpsd.engine_pids("gpu0") == gpu0
    after = mpsd.engine_pids("gpu1")
    assert set(after.values()).isdisjoint(gpu1.values())  # both replaced, one at a time
    rolled = [e["event"] for e in mpsd.log() if e.get("event", "").startswith("engine_rolled")]
    assert rolled == ["engine_rolled_out", "engine_rolled_in"] * 2
    assert [e["to"] for e in mpsd.events("group_state", gpu="gpu1")] == ["starting", "running"]
    assert mpsd.terminate() == 0


def test_scale_down_stops_one_engine_safely_and_its_sibling_serves(mpsd: Mpsd) -> None:
    mpsd.start()
    mpsd.wait_state("gpu0", "running")
    before = mpsd.engine_pids()
    doc = mpsd.config()
    doc["gpu"][0]["engine"][0]["replicas"] = 1
    done, results = _reload_under_load(mpsd, doc)
    assert done["rolled"] == ["gpu0"]
    assert results and all(code == 200 for code in results), set(results)
    assert [e["engine"] for e in mpsd.events("engine_rolled_out")] == ["gpu0/tiny-1"]
    assert mpsd.events("engine_stopped", engine="gpu0/tiny-1")
    engines = mpsd.status()["groups"][0]["engines"]
    assert [(e["key"], e["pid"]) for e in engines] == [("gpu0/tiny-0", before["gpu0/tiny-0"])]
    assert mpsd.terminate() == 0
