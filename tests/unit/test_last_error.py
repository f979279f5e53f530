"""Why an engine failed, in one line: the last meaningful error line of its output."""

from __future__ import annotations

import sys
from pathlib import Path

import anyio
import pytest

from mpsd import logs
from mpsd.supervise.process import ChildProcess

# The end of what vLLM prints for `vllm serve ./no-such-model` (abridged).
NO_SUCH_MODEL = [
    "(APIServer pid=7) INFO 12-08 03:10:11 [api_server.py:1800] vLLM API server version 0.32",
    "Traceback (most recent call last):",
    '  File "huggingface_hub/utils/_validators.py", line 106, in _inner_fn',
    "    validate_repo_id(arg_value)",
    "huggingface_hub.errors.HFValidationError: Repo id must be in the form 'repo_name' or "
    "'namespace/repo_name': './no-such-model'. Use `repo_type` argument if needed.",
    "",
]
# EngineCore's cause, then the API server's pointer back at it.
ENGINE_CORE = [
    "(EngineCore_DP0 pid=9) ERROR 12-08 03:10:15 [core.py:708] EngineCore failed to start.",
    "(EngineCore_DP0 pid=9) ERROR 12-08 03:10:15 [core.py:708] Traceback (most recent call "
    "last):",
    "(EngineCore_DP0 pid=9) ERROR 12-08 03:10:15 [core.py:708] ValueError: No available "
    "memory for the cache blocks. Try increasing `gpu_memory_utilization`.",
    "(APIServer pid=7) Traceback (most recent call last):",
    "(APIServer pid=7) RuntimeError: Engine core initialization failed. See root cause above. "
    "Failed core proc(s): {'EngineCore_DP0': 1}",
]


@pytest.mark.parametrize(("lines", "cause"), [
    (NO_SUCH_MODEL, "HFValidationError: Repo id must be in the form 'repo_name' or "
                    "'namespace/repo_name': './no-such-model'. Use `repo_type` argument if "
                    "needed."),
    (ENGINE_CORE, "ValueError: No available memory for the cache blocks. Try increasing "
                  "`gpu_memory_utilization`."),
    (["INFO:     Started server process [1]", "ERROR:    [Errno 98] address already in use"],
     "ERROR:    [Errno 98] address already in use"),
    (["(APIServer pid=7) WARNING 12-08 03:10:11 [x.py:1] ulimit is low",
      "INFO: all good"], None),
])
def test_the_cause_is_the_last_meaningful_error_line(lines: list[str], cause: str | None) -> None:
    last = logs.LastError()
    for line in lines:
        last.feed(line)
    assert last.line == cause


def test_it_stays_one_bounded_line() -> None:
    last = logs.LastError()
    last.feed("OSError: " + "x" * 10_000)
    assert last.line is not None and len(last.line) == 400


@pytest.mark.anyio
async def test_a_child_process_says_why_it_exited(tmp_path: Path) -> None:
    """A real child prints a traceback and exits 1: ``last_error`` holds its cause."""
    script = tmp_path / "engine.py"
    script.write_text("import sys\nprint('starting')\nprint('Traceback (most recent call last):')\n"
                      "print('OSError: ./m is not a local folder and is not a valid model "
                      "identifier')\nsys.exit(1)\n")
    child = ChildProcess("gpu0/x-0", [sys.executable, str(script)], {}, registry=tmp_path)
    assert child.last_error is None
    await child.start()
    with anyio.fail_after(10):
        assert await child.wait() == 1
    assert child.last_error == ("OSError: ./m is not a local folder and is not a valid model "
                                "identifier")
