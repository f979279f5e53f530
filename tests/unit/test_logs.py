"""Logs for people: engine output levels, the probes' access lines, the console and journal
renderings. Rendering goes through structlog with the real processors of each format, writing to
an in-memory stream that stands in for stderr."""

from __future__ import annotations

import io
import json
import os
import sys
from collections.abc import Iterator

import pytest
import structlog

from mpsd import logs

VLLM_ERROR = ("(EngineCore pid=13239) ERROR 12-04 15:54:01 [core.py:1512] "
              "EngineCore encountered a fatal error.")


@pytest.mark.parametrize(("line", "previous", "level"), [
    ("(APIServer pid=12972) INFO 12-04 15:53:37 [api_utils.py:286] non-default args", "error",
     "info"),
    ("(Worker pid=13263) WARNING 12-04 15:53:59 [cpu_worker.py:114] libtcmalloc", "info",
     "warning"),
    (VLLM_ERROR, "info", "error"),
    ("(EngineCore pid=13239) ERROR 12-04 15:54:01 [core.py:1512] Traceback (most recent", "info",
     "error"),
    ("Traceback (most recent call last):", "error", "error"),  # continues the ERROR before
    ('  File "x.py", line 3, in f', "info", "info"),
    ("W1204 15:53:37.516000 12972 torch/_library/triton.py:53] Triton not available", "info",
     "warning"),
    ("[W1204 15:53:59.728072791 utils.cpp:68] Warning: NUMA binding", "info", "warning"),
    ("/v/lib/dispatcher.py:138: FutureWarning: `torch.distributed.reduce_op` is deprecated",
     "info", "warning"),
    ("ERROR:    Exception in ASGI application", "info", "error"),
    ("INFO:     Started server process [12972]", "warning", "info"),
])
def test_engine_line_level(line: str, previous: str, level: str) -> None:
    assert logs.engine_line_level(line, previous) == level


def test_probe_access_lines_are_recognised_and_nothing_else() -> None:
    quiet = logs.probe_access_line({"/health", "/metrics"})
    assert quiet('INFO:     127.0.0.1:42650 - "GET /health HTTP/1.1" 200 OK')
    assert quiet('(APIServer pid=1) INFO [h11.py:1] 127.0.0.1:1 - "GET /metrics HTTP/1.1" 200')
    assert quiet('127.0.0.1 [04/Dec/2026:15:54:01 +0000] "GET /health?x=1 HTTP/1.1" 503 0')
    assert not quiet('INFO:     127.0.0.1:42650 - "POST /v1/completions HTTP/1.1" 200 OK')
    assert not quiet('INFO:     127.0.0.1:42650 - "GET /healthz HTTP/1.1" 200 OK')
    assert not quiet("(APIServer pid=1) INFO 12-04 15:54:01 [api.py:1] GET /health is ready")


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    yield
    structlog.reset_defaults()


def emitted(fmt: logs.LogFormat, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The lines three typical events make in ``fmt``, on a stderr that is not a terminal."""
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)  # here: pytest swaps stderr between phases
    logs.setup(fmt)
    emit()
    return stream.getvalue().splitlines()


def emit() -> None:
    log = logs.get("mpsd.engine")
    log.info("output", line=VLLM_ERROR, name="gpu0/tiny-0", pid=7, gpu="gpu0", engine="gpu0/tiny-0")
    log.info("mpsd_ready", msg="ready: 2/2 engines - try: curl -s localhost:8000/v1/models",
             engines=2)
    log.warning("health_probe_failed", engine="gpu0/tiny-1", failures=1)


def test_console_format_reads_as_sentences(monkeypatch: pytest.MonkeyPatch) -> None:
    first, ready, probe = lines = emitted("console", monkeypatch)
    # the level is the caller's (mapped from the line); vLLM's own stamp and source are dropped
    assert first.endswith(" info  gpu0/tiny-0 | EngineCore: EngineCore encountered a fatal error.")
    assert ready.endswith(" info  ready: 2/2 engines - try: curl -s localhost:8000/v1/models  "
                          "engines=2")
    assert probe.endswith(" warn  health_probe_failed  engine=gpu0/tiny-1 failures=1")
    assert "component" not in "".join(lines)


def test_journal_format_has_priorities_and_labels(monkeypatch: pytest.MonkeyPatch) -> None:
    first, ready, probe = emitted("journal", monkeypatch)
    assert first == f"<6>gpu0/tiny-0 | {VLLM_ERROR}"
    assert ready == "<6>ready: 2/2 engines - try: curl -s localhost:8000/v1/models engines=2"
    assert probe == "<4>health_probe_failed engine=gpu0/tiny-1 failures=1"


def test_json_format_keeps_every_field(monkeypatch: pytest.MonkeyPatch) -> None:
    first, ready, _ = (json.loads(line) for line in emitted("json", monkeypatch))
    assert first["event"] == "output" and first["line"] == VLLM_ERROR and first["pid"] == 7
    assert ready["event"] == "mpsd_ready" and ready["msg"].startswith("ready: 2/2")


def test_engine_output_demotes_the_stop_traceback_only_during_a_stop() -> None:
    stopping = False
    levels = logs.EngineOutput("gpu0/e-0", {"/health"}, lambda: stopping)
    src = "(APIServer pid=7) ERROR 12-04 16:17:53 [async_llm.py:906] "
    block = [src + "AsyncLLM output_handler failed.", src + "Traceback (most recent call last):",
             src + "vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an issue."]
    after = "(APIServer pid=7) INFO 12-04 16:17:53 [launcher.py:279] engine client stopped"
    assert [levels(line, "info") for line in [*block, after]] == [
        "error", "debug", "error", "debug"]  # a traceback shows as its exception line
    stopping = True
    assert [levels(line, "info") for line in [*block, after]] == ["debug"] * 4
    assert levels(src + "something else failed", "info") == "error"
    assert levels('INFO:     127.0.0.1:1 - "GET /health HTTP/1.1" 200 OK', "info") is None


# A vLLM start on a CPU host, as the console would have shown it (abridged: 70 `Route:` lines).
START_UP = [
    ("(APIServer pid=7) INFO 12-08 03:10:11 [api_server.py:1800] vLLM API server version 0.32",
     "debug"),
    ("(APIServer pid=7) INFO 12-08 03:10:11 [utils.py:253] non-default args: {'port': 18100,",
     "debug"),
    ("    'model': '/srv/m'}", "debug"),  # the same message, continued
    ("W1208 03:10:12.516000 7 torch/_library/triton.py:53] Triton not available", "debug"),
    ("(Worker pid=9) WARNING 12-08 03:10:14 [cpu_worker.py:114] libtcmalloc is not found",
     "debug"),
    ("(APIServer pid=7) WARNING 12-08 03:10:14 [api_server.py:90] ulimit -n 1024 is low",
     "debug"),
    ("(EngineCore pid=8) WARNING 12-08 04:29:17 [cpu.py:1] Model Runner V2 requires Triton; "
     "using the V1 model runner instead.", "debug"),
    ("(Worker pid=9) WARNING 12-08 04:29:16 [cpu_worker.py:1] libiomp is not found in "
     "LD_PRELOAD. For best performance, please follow ...", "debug"),
    ("(APIServer pid=7) WARNING 12-08 04:28:57 [vllm.py:1] Enforce eager set, disabling "
     "torch.compile, CUDAGraphs, and JIT kernel warmup.", "debug"),
    ("/v/lib/dispatcher.py:138: FutureWarning: `torch.distributed.reduce_op` is deprecated",
     "debug"),
    ("  warnings.warn(", "debug"),
    ("(APIServer pid=7) INFO 12-08 03:10:20 [launcher.py:46] Route: /v1/models, Methods: GET",
     "debug"),
    ("INFO:     Application startup complete.", "debug"),
    ("(APIServer pid=7) WARNING 12-08 03:10:20 [config.py:1] max_num_seqs 256 exceeds the "
     "KV cache", "warning"),  # one a person can act on
    # a traceback shows as its exception line (and the details after it); header and frames
    # are in the engine's file; unlabelled or labelled ERROR line by line, alike
    ("(APIServer pid=7) Traceback (most recent call last):", "debug"),
    ('(APIServer pid=7)   File "vllm/entrypoints/cli/serve.py", line 1, in cmd', "debug"),
    ("(APIServer pid=7) ValueError: max_model_len 4096 exceeds the model's 2048", "error"),
    ("(EngineCore pid=8) ERROR 12-08 04:34:11 [core.py:1] Traceback (most recent call last):",
     "debug"),
    ('(EngineCore pid=8) ERROR 12-08 04:34:11 [core.py:1]   File "core.py", line 3, in run',
     "debug"),
    ("(EngineCore pid=8) ERROR 12-08 04:34:11 [core.py:1] pydantic_core._pydantic_core."
     "ValidationError: 1 validation error for ModelConfig", "error"),
    ("(EngineCore pid=8) ERROR 12-08 04:34:11 [core.py:1]   Value error, User-specified "
     "max_model_len (100000) is greater than the derived max_model_len", "error"),
]


def test_a_start_up_shows_only_what_needs_a_person() -> None:
    levels = logs.EngineOutput("gpu0/e-0", {"/health"}, lambda: False)
    got, previous = [], "info"
    for line, _ in START_UP:
        previous = levels(line, previous) or previous
        got.append(previous)
    assert got == [level for _, level in START_UP]


def test_a_stream_that_refuses_writes_costs_lines_not_the_process(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A pipe without a reader (EPIPE) and a full disk (ENOSPC): each event is dropped and
    counted; nothing raises."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    with open(write_end, "w") as pipe, open("/dev/full", "w") as full:
        for stream in (pipe, full):
            monkeypatch.setattr(sys, "stderr", stream)
            logs.setup("json")
            before = logs.write_errors()
            emit()
            assert logs.write_errors() == before + 3
    monkeypatch.undo()
    logs.setup("json")  # never leave the sink on a closed descriptor


#: A vLLM for CPU 0.32 start with torch.compile, as it printed it (trimmed to the lines that
#: matter, in order; the times are what a clock at each line says).
CPU_START = [
    (19.0, "W1208 04:56:45.388000 16766 torch/_library/triton.py:53] Triton not available"),
    (20.0, "(APIServer pid=16766) INFO 12-08 04:56:46 [api_utils.py:347]"),
    (42.0, "(EngineCore pid=17426) INFO 12-08 04:57:08 [core.py:133] Initializing a V1 LLM "
           "engine (v0.32.0) with config: model='/m/tiny-qwen2'"),
    (55.5, "(Worker pid=17641) INFO 12-08 04:57:22 [cpu_model_runner.py:68] Starting to load "
           "model /m/tiny-qwen2..."),
    (56.0, "(Worker pid=17641) INFO 12-08 04:57:22 [base_loader.py:82] Initializing model took "
           "0.271900 seconds"),
    (57.0, "(Worker pid=17641) INFO 12-08 04:57:23 [cpu_model_runner.py:87] Warming up model "
           "for the compilation..."),
    (105.0, "(Worker pid=17641) INFO 12-08 04:58:11 [cpu_model_runner.py:91] Warming up done."),
    (105.5, "(EngineCore pid=17426) INFO 12-08 04:58:11 [kv_cache_utils.py:2327] CPU KV cache "
            "size: 131,072 tokens, Maximum concurrency for 2,048 tokens per request: 64.00x"),
    (106.0, "(APIServer pid=16766) INFO 12-08 04:58:12 [entry.py:140] Starting vLLM server on "
            "http://127.0.0.1:28700"),
    (107.0, "INFO:     Application startup complete."),
    (108.0, "(APIServer pid=16766) INFO 12-08 04:58:13 [loggers.py:1] KV cache size: again"),
]


def test_start_phases_of_a_real_vllm_cpu_start() -> None:
    now = [0.0]
    phases = logs.StartPhases(clock=lambda: now[0])
    assert phases.last is None
    for at, line in CPU_START:
        now[0] = at
        phases.feed(line)
    assert phases.seconds == {"process": 20.0, "engine_core": 35.5, "weights": 0.5,
                              "compile": 49.0, "kv_cache": 0.5, "api_server": 1.5}
    now[0] = 108.25
    phases.end("ready")
    assert phases.last == "ready"
    assert phases.text().startswith("process 20.0 s, engine_core 35.5 s, weights 0.5 s")
    now[0] = 200.0
    phases.begin()  # a restart starts a fresh record
    assert phases.seconds == {} and phases.started == 200.0


def test_engine_output_feeds_the_start_phases() -> None:
    phases = logs.StartPhases()
    levels = logs.EngineOutput("gpu0/e-0", {"/health"}, lambda: False, phases)
    levels("(APIServer pid=1) INFO 12-08 04:56:46 [api_utils.py:286] non-default args", "info")
    levels("(EngineCore pid=1) INFO 12-08 04:58:11 [gpu_model_runner.py:1] Graph capturing "
           "finished in 3 secs, took 0.40 GiB", "info")
    levels("(EngineCore pid=1) INFO 12-08 04:58:11 [monitor.py:1] torch.compile takes 15.02 s "
           "in total", "info")  # vLLM compiles before it captures graphs: not this start's
    assert list(phases.seconds) == ["process", "cuda_graphs"]
