"""What reaches the journal: engine output labelled, and never the access-log lines of mpsd's
own health probes and metrics scrapes (the fake engine prints uvicorn's access log, as vLLM
does unless told not to)."""

from __future__ import annotations

import json

from tests.harness import FAKE_VLLM, Mpsd, http, wait_until


def output_lines(m: Mpsd) -> list[str]:
    return [str(e["line"]) for e in m.events("output", engine="gpu0/tiny-0")]


def test_probe_access_lines_never_reach_the_log(mpsd: Mpsd) -> None:
    mpsd.mps = "off"
    mpsd.replicas = 1
    # kind = "command": mpsd cannot turn the access log off, so it filters
    mpsd.overrides = {"engine": {
        "kind": "command", "name": "tiny",
        "command": [str(FAKE_VLLM), "serve", str(mpsd.workdir / "model"), "--port", "{port}",
                    "--served-model-name", "tiny"]}}
    mpsd.start()
    mpsd.wait_state("gpu0", "running")
    wait_until(lambda: b'vllm:num_requests_running{' in http(
        "GET", f"{mpsd.url}/metrics/engines")[2], 20, "a scrape of the engine's /metrics")
    code, _, _ = http("POST", f"{mpsd.url}/v1/completions",
                      {"model": "tiny", "prompt": "hi", "max_tokens": 2})
    assert code == 200
    # the engine prints in order: once this request's line is in, every probe's line was too
    wait_until(lambda: sum('"POST /v1/completions' in line for line in output_lines(mpsd)) >= 2,
               20, "the canary's and the client's access lines")
    lines = output_lines(mpsd)
    assert not [line for line in lines if '"GET /health' in line or '"GET /metrics' in line]
    started = [e for e in mpsd.events("output", engine="gpu0/tiny-0")
               if "Application startup complete" in str(e["line"])]
    assert started and started[0]["level"] == "debug"  # routine: the engine's log, not the console
    assert mpsd.terminate() == 0


def test_start_up_says_each_phase_and_ends_with_a_request_to_try(mpsd: Mpsd) -> None:
    mpsd.start()
    ready = mpsd.wait_log("mpsd_ready")[0]
    said = [(e["event"], e.get("engine"), e.get("phase")) for e in mpsd.log()
            if e.get("event") in ("mps_daemon_starting", "engine_starting", "engine_phase",
                                  "engine_ready", "mpsd_ready")]
    e0 = "gpu0/tiny-0"
    assert said[:6] == [
        ("mps_daemon_starting", None, None), ("engine_starting", e0, None),
        ("engine_phase", e0, "loading, waiting for /health"),
        ("engine_phase", e0, "/health answered, canary request"),
        ("engine_phase", e0, "waiting for it to attach to MPS"), ("engine_ready", e0, None)]
    assert said[-1][0] == "mpsd_ready" and ("engine_ready", "gpu0/tiny-1", None) in said
    msg = str(ready["msg"])
    assert msg.startswith("ready: 2/2 engines \u2014 try: curl -s ")
    url = msg.split("curl -s ", 1)[1].split(" ", 1)[0]
    body = json.loads(msg.split(" -d ", 1)[1].strip("'"))
    code, _, _ = http("POST", url, body)
    assert code == 200
    assert mpsd.terminate() == 0


def test_a_requested_stop_logs_no_engine_error(mpsd: Mpsd) -> None:
    """vLLM logs an EngineDeadError traceback on every orderly stop (the fake does the same):
    at a stop mpsd asked for it is debug, not error (the same lines at any other time stay
    errors: tests/unit/test_logs.py)."""
    mpsd.mps = "off"
    mpsd.start()
    mpsd.wait_state("gpu0", "running")
    running = len(mpsd.log())
    assert mpsd.terminate() == 0
    stop = mpsd.log()[running:]
    outputs = [e for e in stop if e.get("event") == "output"]
    assert [e for e in outputs if "EngineDeadError" in str(e["line"])]  # vLLM did log it
    assert not [e for e in outputs if e["level"] in ("error", "warning")]
    said = {e["engine"] for e in stop if e.get("event") == "engine_stop_traceback"}
    assert said == {"gpu0/tiny-0", "gpu0/tiny-1"}


def test_start_up_fits_a_screen_at_the_default_level(mpsd: Mpsd) -> None:
    """At ``log_level = "info"`` the engines' routine start-up lines (vLLM's INFO lines,
    uvicorn's) stay out: what is left before "ready" is mpsd's own phases."""
    mpsd.overrides = {"daemon": {"log_level": "info"}}
    mpsd.start()
    mpsd.wait_log("mpsd_ready")
    log = mpsd.log()
    before = log[:[e.get("event") for e in log].index("mpsd_ready")]
    assert not [e for e in before if e["event"] == "output"], before
    # a screenful: 35 lines for MPS and two engines here (11 of them the MPS server's log)
    assert len(before) <= 40, "\n".join(f"{e['level']} {e['event']}" for e in before)
    # what the console left out is in each engine's own file, whole
    output = mpsd.workdir / "log" / "gpu0" / "tiny-0.log"
    assert "Application startup complete" in output.read_text()
    assert mpsd.terminate() == 0
