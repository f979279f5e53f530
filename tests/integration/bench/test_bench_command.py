"""``mpsd bench`` end to end on fakes: a private daemon, interleaved arms, the table and rows."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.harness import FAKE_VLLM, REPO, free_ports, render_toml

pytestmark = pytest.mark.timeout(180)


def fake_config(workdir: Path, replicas: int = 2) -> Path:
    """Two fake engines, each capped at 4 running requests of 100 tokens/s: 400 tok/s apiece."""
    (workdir / "model").mkdir()
    doc: dict[str, Any] = {
        "daemon": {"state_dir": str(workdir / "run"), "log_dir": str(workdir / "log"),
                   "log_format": "json"},
        "proxy": {"listen": f"127.0.0.1:{free_ports(1)[0]}", "unready_grace_s": 0.0},
        "mps": {"enabled": "off"},
        "defaults": {"executable": str(FAKE_VLLM), "cpu_affinity": "off",
                     "startup_timeout_s": 30, "stop_timeout_s": 2,
                     "env": {"FAKE_ENGINE_TOKEN_DELAY_S": "0.01",
                             "FAKE_ENGINE_MAX_RUNNING": "4"}},
        "gpu": [{"device": "0", "engine": [{"model": str(workdir / "model"),
                                            "served_model_name": "tiny",
                                            "replicas": replicas}]}],
    }
    path = workdir / "mpsd.toml"
    path.write_text(render_toml(doc))
    return path


def mpsd(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    env_path = f"{Path(sys.executable).parent}"
    return subprocess.run([sys.executable, "-m", "mpsd", *args], capture_output=True, text=True,
                          timeout=170, cwd=cwd, env={"PATH": env_path, "HOME": str(cwd)},
                          check=False)


def test_bench_starts_its_own_daemon_and_measures_every_arm(workdir: Path) -> None:
    config = fake_config(workdir)
    rows_file = workdir / "runs.jsonl"
    done = mpsd("bench", "-c", str(config), "--start", "--input-len", "16", "--output-len", "20",
                "--concurrency", "8", "--stream", "--arms", "direct1,mpsd,client",
                "--repeats", "2", "--warmup", "0.5", "--duration", "2",
                "--jsonl", str(rows_file))
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    header, runs = rows[0], rows[1:]
    assert header["kind"] == "bench" and header["engines"] == 2 and header["model"] == "tiny"
    # arms interleaved, the order flipped every repeat
    assert [r["arm"] for r in runs] == ["direct1", "mpsd", "client", "client", "mpsd", "direct1"]
    assert all(r["errors"] == 0 and r["requests"] > 0 for r in runs)
    by_arm = {arm: [r["output_tok_per_s"] for r in runs if r["arm"] == arm]
              for arm in ("direct1", "mpsd", "client")}
    for one, two in zip(by_arm["direct1"], by_arm["mpsd"], strict=True):
        assert 300 < one < 440  # one engine: 4 running x 100 tokens/s
        assert 1.6 < two / one < 2.4  # two engines through mpsd: twice that
    client = [r for r in runs if r["arm"] == "client"]
    assert all(min(r["per_engine"]) > 0.3 * max(r["per_engine"]) for r in client)
    assert all(r["itl_p50_s"] == pytest.approx(0.01, abs=0.004) for r in runs)
    assert re.search(r"mpsd / direct1: (1\.[6-9]|2\.[0-3])\dx \(", done.stdout), done.stdout
    assert "starting a private mpsd" in done.stderr and "ETA" in done.stderr
    assert not (workdir / "run").exists()  # the private daemon used its own directories


def test_bench_without_a_daemon_says_what_to_do(workdir: Path) -> None:
    config = fake_config(workdir)
    done = mpsd("bench", "-c", str(config), "--repeats", "1")
    assert done.returncode == 1
    assert "no mpsd answers at http://127.0.0.1:" in done.stderr
    assert "--start" in done.stderr or "-c CONFIG" in done.stderr


def test_bench_refuses_an_unknown_arm_before_starting_anything(workdir: Path) -> None:
    done = mpsd("bench", "-c", str(fake_config(workdir)), "--start", "--arms", "mpsd,fastest")
    assert done.returncode == 2
    assert "unknown fastest" in done.stderr
