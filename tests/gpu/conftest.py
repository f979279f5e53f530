"""GPU scenarios: collected everywhere, run only on a GPU host with MPS and vLLM.

The skip is decided at collection time, before any scenario starts a daemon: a CPU machine
(no ``nvidia-smi``, no ``nvidia-cuda-mps-control`` or no importable ``vllm``) reports every
scenario as skipped with the reason. ``MPSD_GPU_FAKE=1`` runs them against the fakes of
``tests/fakes`` instead (a dry run of the scenarios' own logic).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.gpu.gpu_env import missing

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reasons = {True: missing(vllm=True), False: missing(vllm=False)}
    for item in items:
        if HERE not in Path(str(item.fspath)).resolve().parents:
            continue
        item.add_marker(pytest.mark.gpu)
        # a module that starts no vLLM engine says so with NEEDS_VLLM = False
        reason = reasons[bool(getattr(getattr(item, "module", None), "NEEDS_VLLM", True))]
        if reason is not None:
            item.add_marker(pytest.mark.skip(reason=f"GPU scenarios: {reason}"))
