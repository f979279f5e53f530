"""``mpsd tune`` on fake engines that share a fake GPU (tests/fakes/fake_gpu.py).

With the fake's CPU time per step equal to its GPU time, one engine leaves the GPU idle half the
time, and it runs at most 8 of the 16 clients' requests at once (as vLLM's API server caps a
small model's streaming): two engines under MPS serve twice as much, a third only adds
contention, MPS off costs 1.3x for time slicing. The
search must find a setup within 5 % of the best an exhaustive sweep measures, with fewer
stages, and the block it writes must be a valid mpsd config.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from mpsd.config import parse_config
from tests.harness import FAKE_MPS, FAKE_VLLM, REPO, read_jsonl, render_toml

pytestmark = pytest.mark.timeout(300)

MODEL_CONFIG = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 4096,
                "max_position_embeddings": 2048, "torch_dtype": "float32"}


def base_config(workdir: Path) -> Path:
    model = workdir / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(MODEL_CONFIG))
    (workdir / "gpu").mkdir()
    doc: dict[str, Any] = {
        "daemon": {"log_format": "json"},
        "proxy": {"unready_grace_s": 0.0},
        "mps": {"control_binary": str(FAKE_MPS), "recover_timeout_s": 3.0},
        "defaults": {"executable": str(FAKE_VLLM), "cpu_affinity": "off",
                     "startup_timeout_s": 30, "stop_timeout_s": 2,
                     "env": {"FAKE_GPU_DIR": str(workdir / "gpu"), "FAKE_GPU_CPU_S": "0.01",
                             "FAKE_GPU_STEP_S": "0.01", "FAKE_GPU_SEQ_S": "0",
                             "FAKE_GPU_PREFILL_S": "0", "FAKE_ENGINE_MAX_RUNNING": "8"}},
        "gpu": [{"device": "0", "engine": [{"model": str(model),
                                            "served_model_name": "tiny"}]}],
    }
    path = workdir / "base.toml"
    path.write_text(render_toml(doc))
    return path


def tune(workdir: Path, base: Path, name: str, *extra: str) -> list[dict[str, Any]]:
    rows = workdir / f"{name}.jsonl"
    done = subprocess.run(
        [sys.executable, "-m", "mpsd", "tune", "-c", str(base), "--model", "tiny",
         "--gpu-memory", "80G", "--max-engines", "3", "--input-len", "8", "--output-len", "40",
         "--concurrency", "16", "--repeats", "2", "--warmup", "0.5", "--duration", "1.5",
         "--jsonl", str(rows), "--out", str(workdir / f"{name}.toml"), *extra],
        capture_output=True, text=True, timeout=280, cwd=REPO, check=False,
        env={"PATH": str(Path(sys.executable).parent), "HOME": str(workdir)})
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in rows.read_text().splitlines()]


def stages(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["setup"]: r for r in rows if r["kind"] == "stage" and "gain" in r}


def test_the_search_matches_the_sweeps_best_within_five_percent(workdir: Path) -> None:
    base = base_config(workdir)
    sweep = stages(tune(workdir, base, "sweep", "--sweep"))
    assert set(sweep) == {"2 engines, MPS on", "3 engines, MPS on", "2 engines, MPS off",
                          "3 engines, MPS off"}
    # the fake GPU's shape, as measured: two engines about double (1.41 was seen with other
    # work on the 2 cores), a third adds nothing, MPS off pays for time slicing
    assert 1.2 < sweep["2 engines, MPS on"]["gain"] < 2.3
    assert sweep["3 engines, MPS on"]["gain"] < 0.9 * sweep["2 engines, MPS on"]["gain"]
    assert sweep["2 engines, MPS off"]["gain"] < 0.9 * sweep["2 engines, MPS on"]["gain"]
    best = max(r["throughput"] for r in sweep.values())

    searched = tune(workdir, base, "search")
    measured = [r for r in searched if r["kind"] == "stage"]
    assert len(measured) < len(sweep)
    rec = next(r for r in searched if r["kind"] == "recommendation")
    assert rec["engines"] == 2 and rec["mps"] is True, rec
    assert sweep[rec["setup"]]["throughput"] >= 0.95 * best

    # each private mpsd's log stays next to the JSON lines, named after its last setup, with
    # its engines' lives in it (their routine output lines go to their own files, not the log)
    kept = {k.name: k for k in workdir.glob("search.*.mpsd.log")}
    assert set(kept) == {"search.2engines-MPSoff.mpsd.log", "search.3engines-MPSon.mpsd.log"}
    for log in kept.values():
        assert any(e.get("event") == "engine_ready" for e in read_jsonl(log)), log

    block = (workdir / "search.toml").read_text()
    assert "# recommended: 2 engines, MPS on" in block
    doc = tomllib.loads(block)
    engine = parse_config(doc).gpu[0].engine[0]
    assert engine.replicas == 2 and engine.gpu_memory_utilization is not None
    assert "--kv-cache-memory-bytes" in engine.args
