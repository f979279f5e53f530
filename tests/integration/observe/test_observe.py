"""What an operator sees: /metrics after traffic and a fault, and ``mpsd status``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from http.client import HTTPConnection

from prometheus_client.parser import text_string_to_metric_families

from tests.harness import REPO, Mpsd, http, wait_until

Samples = dict[str, list[tuple[dict[str, str], float]]]


def scrape(m: Mpsd, path: str = "/metrics") -> Samples:
    code, _, body = http("GET", f"{m.url}{path}")
    assert code == 200
    out: Samples = defaultdict(list)
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            out[sample.name].append((sample.labels, sample.value))
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return sum(v for lab, v in samples.get(name, []) if all(lab.get(k) == x
                                                            for k, x in labels.items()))


def cli(m: Mpsd, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mpsd", *args, "-c", str(m.config_file)],
                          capture_output=True, text=True, timeout=60, check=False)


def test_metrics_and_status_after_traffic_and_a_fault(mpsd: Mpsd) -> None:
    mpsd.start()
    mpsd.wait_state("gpu0", "running")
    for i in range(10):
        code, _, _ = http("POST", f"{mpsd.url}/v1/completions",
                          {"model": "tiny", "prompt": "hi", "max_tokens": 4, "stream": i % 2 == 0})
        assert code == 200
    code, _, _ = http("POST", f"{mpsd.url}/v1/completions", {"model": "nope", "prompt": "x"})
    assert code == 404

    mpsd.mps_command("gpu0", "fake_fault")
    mpsd.wait_state("gpu0", "running", after=1)

    def scraped_from_both() -> Samples | None:
        s = scrape(mpsd, "/metrics/engines")
        engines = {lab["engine"] for lab, _ in s.get("vllm:num_requests_running", [])}
        return s if engines == {"gpu0/tiny-0", "gpu0/tiny-1"} else None

    per_engine = wait_until(scraped_from_both, 20, "both engines' vllm:* metrics re-exported")
    samples = scrape(mpsd)
    # the node as one vLLM endpoint: one series per model, no engine labels
    assert [lab for lab, _ in samples["vllm:num_requests_running"]] == [{"model_name": "tiny"}]
    assert not [name for name in per_engine if not name.startswith("vllm:")]
    assert value(samples, "mpsd_requests_total", model="tiny", code="200") == 10
    assert value(samples, "mpsd_request_duration_seconds_count", model="tiny") == 10
    assert value(samples, "mpsd_time_to_first_byte_seconds_count", model="tiny") == 10
    assert value(samples, "mpsd_requests_total", code="404") == 1
    assert value(samples, "mpsd_fault_detected_total", gpu="gpu0") >= 1
    assert value(samples, "mpsd_recovery_seconds_count", gpu="gpu0", phase="mps") == 1
    assert value(samples, "mpsd_recovery_seconds_count", gpu="gpu0", phase="engine") == 1
    assert value(samples, "mpsd_group_state", gpu="gpu0", state="running") == 1
    assert value(samples, "mpsd_group_state", gpu="gpu0", state="recovering") == 0
    assert value(samples, "mpsd_group_restarts_total", gpu="gpu0") >= 1
    assert value(samples, "mpsd_engine_ready", gpu="gpu0") == 2
    assert value(samples, "mpsd_engine_inflight", gpu="gpu0") == 0
    wait_until(lambda: value(scrape(mpsd), "mpsd_mps_server_status", gpu="gpu0") == 2, 20,
               "MPS server ACTIVE on /metrics")

    text = cli(mpsd, "status")
    assert text.returncode == 0, text.stderr
    assert "gpu0" in text.stdout and "running" in text.stdout
    status = json.loads(cli(mpsd, "status", "--json").stdout)
    history = status["groups"][0]["history"]
    assert history and history[-1]["signal"] in {"mps_log", "mps_status", "engine_exit"}
    assert history[-1]["signal"] in text.stdout
    assert mpsd.terminate() == 0


def test_status_cli_without_a_daemon_says_so(mpsd: Mpsd) -> None:
    mpsd.write_config()
    out = cli(mpsd, "status")
    assert out.returncode == 1
    assert "not running" in out.stderr
    assert f"state_dir of {mpsd.config_file} (given with -c)" in out.stderr


def test_status_finds_a_daemon_with_relative_paths_from_anywhere(mpsd: Mpsd) -> None:
    """`mpsd run` and `mpsd status` in different directories agree on a relative state_dir:
    both take it from the config file's directory."""
    mpsd.mps = "off"
    mpsd.overrides = {"daemon": {"state_dir": "run", "log_dir": "log"}}
    mpsd.start()  # in the repository
    mpsd.wait_state("gpu0", "running")
    env = {**os.environ, "MPSD_CONFIG": str(mpsd.config_file), "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "mpsd", "status"], capture_output=True,
                         text=True, timeout=60, check=False, env=env, cwd="/")
    assert out.returncode == 0, out.stderr
    assert "gpu0/tiny-0" in out.stdout
    assert (mpsd.workdir / "run" / "control.sock").is_socket()
    assert mpsd.terminate() == 0


def test_an_engine_restarting_alone_shows_in_the_reason_and_the_metrics(mpsd: Mpsd) -> None:
    mpsd.mps = "off"
    mpsd.overrides = {"restart": {"backoff_initial_s": 2.0, "backoff_max_s": 2.0}}
    mpsd.start()
    mpsd.wait_state("gpu0", "running")
    ports = mpsd.engine_ports()

    def reason() -> str:
        return str(mpsd.status()["groups"][0]["reason"])

    assert reason() == "2/2 engines ready"
    mpsd.control(ports[0], "crash")
    restarting = wait_until(lambda: "backoff" in (r := reason()) and r, 20, "restart reason")
    assert restarting.startswith("1/2 engines ready; gpu0/tiny-0 backoff ("), restarting
    assert mpsd.status()["groups"][0]["state"] == "running"  # its sibling serves on
    wait_until(lambda: reason() == "2/2 engines ready", 30, "the reason after the restart")
    samples = scrape(mpsd)
    assert value(samples, "mpsd_group_restarts_total", gpu="gpu0") == 1
    assert value(samples, "mpsd_engine_restarts_total", engine="gpu0/tiny-0") == 1
    assert value(samples, "mpsd_engine_restarts_total", engine="gpu0/tiny-1") == 0

    conn = HTTPConnection("127.0.0.1", mpsd.port, timeout=10)
    conn.request("GET", "/mpsd")
    resp = conn.getresponse()
    assert (resp.status, resp.getheader("Location")) == (308, "mpsd/")
    conn.close()
    assert mpsd.terminate() == 0
