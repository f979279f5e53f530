"""NVML Xid events reach the right group: application Xids recover it, hardware Xids fail it.

The NVML library is the fake in ``tests/fakes/nvml`` (put first on mpsd's PYTHONPATH), so the
GPU inventory, UUID resolution and the Xid event stream are real code paths of mpsd.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.harness import FAKES, Mpsd, render_toml

UUIDS = ["GPU-11111111-2222-3333-4444-555555555555", "GPU-66666666-7777-8888-9999-000000000000"]


def fake_nvml(workdir: Path) -> Path:
    state = workdir / "nvml.json"
    write_state(state, [])
    return state


def write_state(path: Path, events: list[dict[str, object]]) -> None:
    """The fake NVML's whole state; events are appended (it remembers how many it delivered)."""
    gpus = [{"uuid": u, "name": "NVIDIA H200", "memory_total": 150_000_000_000,
             "memory_used": 1_000_000_000, "util": 10, "cpus": [0, 1]} for u in UUIDS]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"mode": "ok", "gpus": gpus, "events": events}))
    tmp.replace(path)


def test_xids_recover_or_fail_the_group_of_their_gpu(mpsd: Mpsd) -> None:
    state = fake_nvml(mpsd.workdir)
    os.environ["FAKE_NVML_STATE"] = str(state)
    os.environ["PYTHONPATH"] = f"{FAKES / 'nvml'}:{os.environ.get('PYTHONPATH', '')}"
    mpsd.gpus = 2
    mpsd.overrides = {"mps": {"enabled": "auto"}}  # NVML sees GPUs and the binary exists
    try:
        mpsd.start()
    finally:
        del os.environ["FAKE_NVML_STATE"]
        os.environ["PYTHONPATH"] = os.environ["PYTHONPATH"].split(":", 1)[1]
    mpsd.wait_state("gpu0", "running")
    mpsd.wait_state("gpu1", "running")
    assert {g["uuid"] for g in mpsd.status()["groups"]} == set(UUIDS)

    app_error = {"uuid": UUIDS[0], "xid": 13}  # an application error: recover the group
    write_state(state, [app_error])
    faults = mpsd.wait_log("fault_detected", gpu="gpu0")
    assert faults[0]["signal"] == "xid"
    mpsd.wait_state("gpu0", "running", after=1)

    write_state(state, [app_error, {"uuid": UUIDS[1], "xid": 79}])  # fallen off the bus
    mpsd.wait_state("gpu1", "failed")
    failed = mpsd.events("group_state", gpu="gpu1", to="failed")[0]
    assert "hardware Xid 79" in failed["reason"]
    assert mpsd.group_state("gpu0") == "running"

    # a reload that restarts every MPS group (a new [mps] env) keeps the verdict: gpu1 still
    # needs an operator; gpu0 restarts and serves
    doc = mpsd.config()
    doc["mps"]["env"] = {**doc["mps"]["env"], "FAKE_MPS_NOTE": "changed"}
    mpsd.config_file.write_text(render_toml(doc))
    assert subprocess.run([sys.executable, "-m", "mpsd", "reload", "-c", str(mpsd.config_file)],
                          capture_output=True, timeout=60, check=False).returncode == 0
    mpsd.wait_state("gpu0", "running", after=1)
    gpu1 = next(g for g in mpsd.status()["groups"] if g["gpu"] == "gpu1")
    assert gpu1["state"] == "failed" and "hardware Xid 79" in gpu1["reason"], gpu1
    assert not [e for e in mpsd.events("engine_starting") if e.get("gpu") == "gpu1"][2:]
    assert mpsd.terminate() == 0
