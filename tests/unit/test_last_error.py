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
    ([  # vLLM 0.32 for CPU, --max-model-len 100000 on a 2048-token model (abridged)
        "Traceback (most recent call last):",
        '  File "vllm/engine/arg_utils.py", line 1955, in create_model_config',
        "pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig",
        "  Value error, User-specified max_model_len (100000) is greater than the derived "
        "max_model_len (max_position_embeddings=2048.0)",
        "    For further information visit https://errors.pydantic.dev/2.14/v/value_error"],
     "ValidationError: 1 validation error for ModelConfig: Value error, User-specified "
     "max_model_len (100000) is greater than the derived max_model_len "
     "(max_position_embeddings=2048.0)"),
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
    output = tmp_path / "log" / "gpu0" / "x-0.log"
    child = ChildProcess("gpu0/x-0", [sys.executable, str(script)], {}, registry=tmp_path,
                         output_file=output)
    assert child.last_error is None and child.output_file == output
    for run in (1, 2):  # a restart appends to the same file, marked
        await child.start()
        with anyio.fail_after(10):
            assert await child.wait() == 1
        assert child.last_error == ("OSError: ./m is not a local folder and is not a valid "
                                    "model identifier")
        lines = output.read_text().splitlines()
        assert len(lines) == 4 * run and lines[-3:] == [
            "starting", "Traceback (most recent call last):",
            "OSError: ./m is not a local folder and is not a valid model identifier"]
        assert lines[-4].startswith("--- ") and f"mpsd started PID {child.pid}: " in lines[-4]


def test_the_output_file_is_bounded(tmp_path: Path) -> None:
    """Past its size the file moves to ``.1`` (replacing the one before): two files at most."""
    out = logs.OutputFile(tmp_path / "e-0.log", max_bytes=100)
    for i in range(30):
        out.write(f"line {i:02d} " + "x" * 20)  # 29 bytes a line
    out.close()
    current, previous = tmp_path / "e-0.log", tmp_path / "e-0.log.1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e-0.log", "e-0.log.1"]
    assert current.read_text().splitlines()[-1].startswith("line 29 ")
    assert previous.stat().st_size <= 100 + 29 and current.stat().st_size <= 100 + 29


def test_an_output_file_that_cannot_be_written_is_counted_not_raised(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    out = logs.OutputFile(tmp_path / "file" / "e-0.log")  # a file where a directory should be
    before = logs.write_errors()
    out.write("a line")
    assert logs.write_errors() == before + 1
