"""Errors become states, never crashes (issue #10): each failure ends in a state with a reason.

Each scenario once made a group crash (``group_crashed``, serving nothing, no reason anywhere),
made ``mpsd run`` exit, or held the reload lock for good. Now: the group is FAILED (or keeps
serving) with the reason in its state, the daemon stays up, and ``mpsd reload`` says why.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.harness import FAKE_VLLM, Mpsd, http, render_toml, wait_until

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def m2(mpsd: Mpsd) -> Mpsd:
    """mpsd serving two GPUs."""
    mpsd.gpus = 2
    mpsd.start()
    mpsd.wait_state("gpu0", "running")
    mpsd.wait_state("gpu1", "running")
    return mpsd


def reload(m: Mpsd, doc: dict[str, object]) -> subprocess.CompletedProcess[str]:
    """Rewrite the config and run ``mpsd reload`` (what an operator does)."""
    m.config_file.write_text(render_toml(doc))
    return subprocess.run([sys.executable, "-m", "mpsd", "reload", "-c", str(m.config_file)],
                          capture_output=True, text=True, timeout=120, check=False)


def serves(m: Mpsd) -> bool:
    code, _, _ = http("POST", f"{m.url}/v1/completions",
                      {"model": "tiny", "prompt": "hi", "max_tokens": 2})
    return code == 200


def test_reload_with_a_typo_in_an_executable_is_refused_before_anything_stops(m2: Mpsd) -> None:
    """1. two GPUs serving  2. a reload names an executable that does not exist on gpu0
    3. ``mpsd reload`` fails naming it; no engine of either GPU was touched; mpsd serves"""
    before = {g: m2.engine_pids(g) for g in ("gpu0", "gpu1")}
    doc = m2.config()
    doc["gpu"][0]["engine"][0]["executable"] = f"{FAKE_VLLM}x"
    out = reload(m2, doc)
    assert out.returncode != 0
    assert f"{FAKE_VLLM}x" in out.stderr and "not found" in out.stderr, out.stderr
    assert "previous config keeps running" in out.stderr
    assert {g: m2.engine_pids(g) for g in ("gpu0", "gpu1")} == before
    assert not m2.events("engine_rolled_out") and serves(m2)
    assert m2.proc is not None and m2.proc.poll() is None


def test_a_rolled_in_engine_that_never_gets_ready_ends_the_reload_with_its_reason(
        mpsd: Mpsd) -> None:
    """MPS off: a reload adds an engine that stays loading past its ``startup_timeout_s``. The
    reload ends (no lock held for ever), says why, the two old engines serve on, and the next
    reload is accepted."""
    mpsd.mps = "off"
    late = mpsd.engine_port_base + 2  # the next port of gpu0's block
    mpsd.engine_env = {f"FAKE_ENGINE_START_DELAY_S_PORT_{late}": "60"}
    mpsd.start()
    mpsd.wait_state("gpu0", "running")
    doc = mpsd.config()
    engines = doc["gpu"][0]["engine"]
    engines.append({**engines[0], "name": "late", "replicas": 1, "startup_timeout_s": 4})
    out = reload(mpsd, doc)
    assert out.returncode != 0
    assert "gpu0/late-0 failed to start" in out.stderr and "not ready after 4s" in out.stderr
    assert "previous config keeps running" not in out.stderr  # it was applied, in part
    assert serves(mpsd) and mpsd.status()["groups"][0]["state"] == "running"
    engines.pop()
    assert reload(mpsd, doc).returncode == 0
    assert mpsd.terminate() == 0


def test_an_engine_slower_than_its_startup_timeout_is_a_fault_never_a_crash(
        mpsd: Mpsd) -> None:
    """gpu0's engines never get ready in time: restarts, then FAILED for the crash loop with
    the timeout as reason; gpu1 serves throughout and mpsd stays up."""
    mpsd.gpus = 2
    base = mpsd.engine_port_base
    mpsd.engine_env = {f"FAKE_ENGINE_START_DELAY_S_PORT_{p}": "60" for p in (base, base + 1)}
    mpsd.overrides = {"restart": {"max_restarts": 1}}
    doc = mpsd.config()
    doc["gpu"][0]["engine"][0]["startup_timeout_s"] = 2  # gpu1 keeps the harness's 15 s
    mpsd.config = lambda: doc  # type: ignore[method-assign]
    mpsd.start()
    mpsd.wait_state("gpu1", "running")
    mpsd.wait_state("gpu0", "failed", timeout=60)
    reason = mpsd.status()["groups"][0]["reason"]
    assert "every engine failed" in reason and "crash loop" in reason, reason
    assert "not ready after 2s" in reason, reason
    # restart intensity per engine (max_restarts 1): each engine tried twice, then FAILED
    assert [e["signal"] for e in mpsd.events("fault_detected", gpu="gpu0")] == ["startup"] * 4
    assert not mpsd.events("group_crashed") and serves(mpsd)
    assert mpsd.terminate() == 0


def test_a_log_dir_that_cannot_be_created_is_refused_before_anything_starts(
        mpsd: Mpsd) -> None:
    """The MPS daemon's log directory cannot be created: ``mpsd run`` says so and exits 78
    (a configuration problem) before it starts anything, never a crash."""
    blocker = mpsd.workdir / "not-a-dir"
    blocker.write_text("")
    mpsd.overrides = {"daemon": {"log_dir": str(blocker / "log")}}
    mpsd.start()
    assert mpsd.proc is not None and mpsd.proc.wait(30) == 78
    assert "cannot be created" in mpsd.tail(), mpsd.tail()
    assert not mpsd.events("group_crashed") and not mpsd.events("process_started")


def test_an_unwritable_pgid_registry_is_a_warning_not_an_abort(mpsd: Mpsd) -> None:
    """``state_dir/pgids`` cannot be a directory: every start and stop says so once as a
    warning, and serving and stopping work as ever."""
    (mpsd.workdir / "run").mkdir()
    (mpsd.workdir / "run" / "pgids").write_text("")
    mpsd.start()
    mpsd.wait_state("gpu0", "running")
    assert serves(mpsd)
    assert mpsd.terminate() == 0
    assert mpsd.events("pgid_registry_unwritable")
    assert mpsd.group_state("gpu0") == "stopped"


def test_mpsd_status_and_metrics_show_a_failed_groups_reason(mpsd: Mpsd) -> None:
    """Both engines of gpu0 fail at boot: gpu0 is FAILED with the reason in ``/mpsd/status``
    and the metrics while the other GPU serves."""
    mpsd.gpus = 2
    base = mpsd.engine_port_base
    mpsd.engine_env = {f"FAKE_ENGINE_FAIL_START_PORT_{p}": "1" for p in (base, base + 1)}
    mpsd.start()
    mpsd.wait_state("gpu1", "running")
    mpsd.wait_state("gpu0", "failed")
    group = mpsd.status()["groups"][0]
    assert group["state"] == "failed" and "exited with code 1" in group["reason"], group
    assert "is not a local folder" in group["reason"], group  # the engine's own last error
    assert {e["state"] for e in group["engines"]} == {"failed"}
    wait_until(lambda: serves(mpsd), 10, "gpu1 serving")
    code, _, metrics = http("GET", f"{mpsd.url}/metrics")
    assert code == 200 and b'mpsd_group_state{gpu="gpu0",state="failed"} 1.0' in metrics
    assert mpsd.terminate() == 0
