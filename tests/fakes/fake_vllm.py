"""The fake ``vllm serve``: API server process lifecycle (run through the ``fake-vllm`` shim).

Why: mpsd supervises vLLM engines and proxies to them; its tests need an engine that starts in
milliseconds but keeps vLLM's process tree (an API server plus a spawned ``VLLM::EngineCore``
child in the same process group), its readiness (no ``listen()`` before ready), its deaths
(EngineCore gone -> ``/health`` 503 for ~0.5 s -> exit code **0**), its shutdown modes
(``--shutdown-timeout``) and its MPS attachment (only EngineCore is an MPS client).
See vllm.md sections 1-5, 8, 10, 11.

CLI: ``fake-vllm serve MODEL [--host H] [--port P] [--served-model-name NAME]
[--shutdown-timeout N] [--max-model-len L] [any --flag VALUE | --flag]``; unknown flags ignored.

Knobs (environment; each may be overridden per port with the suffix ``_PORT_<port>``; times
count from readiness unless stated):
  FAKE_ENGINE_EVENTS            JSON-lines events file (shared format with the MPS fake)
  FAKE_ENGINE_START_DELAY_S     EngineCore load time before listening (after MPS attach)
  FAKE_ENGINE_PHASES_S          extra seconds per start phase, ``weights=1,compile=2.5``
                                (``weights``, ``compile``, ``kv_cache``, ``cuda_graphs``),
                                each ended by vLLM's own line for it (vLLM 0.26 on a GPU; no
                                ``compile`` nor ``cuda_graphs`` line with ``--enforce-eager``)
  FAKE_ENGINE_FAIL_START=1      exit 1 during start-up, like a bad model name
  FAKE_ENGINE_CRASH_AFTER_S     EngineCore dies abruptly (exit 1) -> API server exits 0
  FAKE_ENGINE_UNHEALTHY_AFTER_S /health answers 503 from then on; the process stays up
  FAKE_ENGINE_HANG_AFTER_S      every request and /health hang from then on
  FAKE_ENGINE_IGNORE_SIGTERM=1  API server and EngineCore ignore SIGTERM (needs SIGKILL)
  FAKE_ENGINE_TOKEN_DELAY_S     seconds per generated token (default 0: as fast as possible)
  FAKE_ENGINE_MAX_RUNNING       running cap (default 128); the rest count as waiting
  FAKE_ENGINE_CANARY_FAIL=1     /health 200 but generation answers 500 (vllm #39863)
  FAKE_ENGINE_DEAD_EXIT_S       503 window after EngineCore death (default 0.5)
  FAKE_ENGINE_MPS_EXIT_DELAY_S  EngineCore's delay before exiting on an MPS fault (0.4)
  FAKE_ENGINE_IGNORE_MPS_FAULT=1 EngineCore stays attached after a fault (keeps MPS in FAULT)
  FAKE_ENGINE_ORPHAN_EXIT_S     an orphaned EngineCore exits after this long (default 120)
  FAKE_ENGINE_KV_TOKENS         KV capacity for vllm:kv_cache_usage_perc (default 262144)
  FAKE_ENGINE_CPU_BOUND=1       EngineCore spins a thread on a whole core from readiness on
                                (a CPU-bound scheduler loop: mpsd's CPU-bound diagnosis)
  FAKE_ENGINE_NAME              value of the x-fake-engine response header (default: port)
  FAKE_ENGINE_CONTROL_DIR       poll ``<dir>/<port>.cmd`` every 50 ms for one of ``crash``,
                                ``hang``, ``unhang``, ``unhealthy``, ``healthy``, ``slow <s>``,
                                ``canary_fail``, ``canary_ok``; the file is deleted once read
                                ``<dir>/<port>.start`` (opt-in, read once at start-up) arms a
                                fault for the next engine started on that port: ``fail``
                                (exit 1 at start), ``hang`` (EngineCore loads for ever) or
                                ``canary_fail``; ``VERB N`` arms the next N starts (the file
                                counts down and goes at 0), a bare ``VERB`` stays until the
                                test deletes the file
  FAKE_GPU_DIR                  opt-in shared-GPU model (fake_gpu.py): the engines of a test
                                register in ``<dir>/<device>/<pid>``; tokens then come from a
                                continuous-batching step clock whose step time depends on the
                                busy co-tenants, MPS on/off (CUDA_MPS_PIPE_DIRECTORY) and
                                CUDA_MPS_ACTIVE_THREAD_PERCENTAGE, replacing the token delay
                                and ``slow``; start-up fails like vLLM when the co-tenants'
                                --gpu-memory-utilization shares (default 0.9) exceed 1
  FAKE_GPU_CPU_S, FAKE_GPU_STEP_S, FAKE_GPU_SEQ_S, FAKE_GPU_PREFILL_S,
  FAKE_GPU_TIMESLICE_PENALTY, FAKE_GPU_MEMORY_GIB, FAKE_GPU_MODEL_GIB
                                the model's knobs: defaults and meaning in fake_gpu.py
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from tests.fakes import fakeutil
from tests.fakes.fake_gpu_clock import GpuMemoryError, SharedGpu, StepClock, register
from tests.fakes.fake_vllm_api import VERSION
from tests.fakes.fake_vllm_http import State, make_app

HERE = Path(__file__).resolve().parent
BOOL_FLAGS = frozenset({
    "enforce-eager", "trust-remote-code", "disable-log-requests", "enable-log-requests",
    "disable-log-stats", "enable-prefix-caching", "no-enable-prefix-caching",
    "enable-chunked-prefill", "no-enable-chunked-prefill", "disable-frontend-multiprocessing",
    "enable-auto-tool-choice", "disable-fastapi-docs", "enable-sleep-mode", "headless",
    "disable-uvicorn-access-log", "enable-request-id-headers", "help", "version",
    "disable-custom-all-reduce", "skip-tokenizer-init", "async-scheduling",
})


@dataclass
class Args:
    """The handful of ``vllm serve`` options the fake acts on; the rest land in ``flags``."""

    model: str = "facebook/opt-125m"
    served: str = ""
    host: str | None = None
    port: int = 8000
    shutdown_timeout: float = 0.0
    max_model_len: int = 2048
    flags: dict[str, str] = field(default_factory=dict)


def parse_args(argv: list[str]) -> Args:
    """Tolerant parser: ``--x y``, ``--x=y`` and known boolean ``--x`` forms; MODEL positional."""
    if argv and argv[0] == "serve":
        argv = argv[1:]
    args = Args()
    model: str | None = None
    i = 0
    while i < len(argv):
        token = argv[i]
        if token.startswith("--"):
            name, eq, value = token[2:].partition("=")
            name = name.replace("_", "-")
            if not eq:
                nxt = argv[i + 1] if i + 1 < len(argv) else None
                if name in BOOL_FLAGS or nxt is None or nxt.startswith("--"):
                    value = "true"
                else:
                    value, i = nxt, i + 1
            args.flags[name] = value
        elif model is None:
            model = token
        i += 1
    flags = args.flags
    args.model = model or flags.get("model", args.model)
    args.served = flags.get("served-model-name") or args.model
    args.host = flags.get("host") or None
    args.port = int(flags.get("port", "8000"))
    args.shutdown_timeout = float(flags.get("shutdown-timeout", "0"))
    args.max_model_len = int(flags.get("max-model-len", "2048"))
    return args


class UvicornAccessLog(AbstractAccessLogger):
    """uvicorn's access-log line, as ``vllm serve`` prints it for every request."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        client = f"{peer[0]}:{peer[1]}" if peer else "-"
        version = f"{request.version.major}.{request.version.minor}"
        print(f'INFO:     {client} - "{request.method} {request.path_qs} HTTP/{version}" '
              f"{response.status} {response.reason}", flush=True)


def log_output_handler_death() -> None:
    """What vLLM 0.32 logs on every requested stop: its engine client stops EngineCore before
    the output handler task, which then fails on the dead engine."""
    src = "async_llm.py:906"
    vlog("ERROR", "AsyncLLM output_handler failed.", src)
    vlog("ERROR", "Traceback (most recent call last):", src)
    vlog("ERROR", '  File "vllm/v1/engine/async_llm.py", line 849, in output_handler', src)
    vlog("ERROR", "    outputs = await engine_core.get_output_async()", src)
    vlog("ERROR", "vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an issue. "
         "See stack trace (above) for the root cause.", src)


def vlog(level: str, message: str, src: str = "api_server.py:1",
         proc: str = "APIServer", pid: int | None = None) -> None:
    """A vLLM-style log line: ``(APIServer pid=N) INFO 11-25 22:46:37 [src] message``."""
    stamp = time.strftime("%m-%d %H:%M:%S")
    print(f"({proc} pid={pid or os.getpid()}) {level} {stamp} [{src}] {message}", flush=True)


_PHASES = ("weights", "compile", "kv_cache", "cuda_graphs")


def phase_delays(port: int) -> dict[str, float]:
    """``FAKE_ENGINE_PHASES_S`` (``weights=1,compile=2.5``): extra seconds per start phase."""
    delays = dict.fromkeys(_PHASES, 0.0)
    for item in (fakeutil.knob("FAKE_ENGINE_PHASES_S", port) or "").split(","):
        name, _, value = item.partition("=")
        if name.strip() in delays:
            delays[name.strip()] = float(value)
    return delays


async def log_start_phases(port: int, eager: bool, core_pid: int, started: float) -> None:
    """The lines vLLM 0.26 prints as its EngineCore loads on a GPU (vllm.md section 6), each
    after its phase's ``FAKE_ENGINE_PHASES_S`` delay: what mpsd reads a start's phases from."""
    delays = phase_delays(port)

    async def line(phase: str, message: str, src: str) -> None:
        await asyncio.sleep(delays[phase])
        vlog("INFO", message, src, "EngineCore", core_pid)

    vlog("INFO", "Starting to load model ...", "gpu_model_runner.py:1", "EngineCore", core_pid)
    await line("weights", f"Loading weights took {delays['weights']:.2f} seconds",
               "default_loader.py:1")
    vlog("INFO", f"Model loading took 0.9278 GiB memory and {delays['weights']:.2f} seconds",
         "gpu_model_runner.py:1", "EngineCore", core_pid)
    if not eager:
        await line("compile", f"torch.compile takes {delays['compile']:.2f} s in total",
                   "monitor.py:1")
    await line("kv_cache", "GPU KV cache size: 699,040 tokens", "kv_cache_utils.py:1")
    if not eager:
        await line("cuda_graphs", f"Graph capturing finished in {delays['cuda_graphs']:.0f} "
                   "secs, took 0.40 GiB", "gpu_model_runner.py:1")
    vlog("INFO", "init engine (profile, create kv cache, warmup model) took "
         f"{time.monotonic() - started:.2f} seconds", "core.py:1", "EngineCore", core_pid)


def _env_subset() -> dict[str, str]:
    """CUDA_* plus the systemd variables a supervisor must strip (tests assert both)."""
    return {k: v for k, v in os.environ.items()
            if k.startswith(("CUDA_", "WATCHDOG_", "LISTEN_")) or k == "NOTIFY_SOCKET"}


def _take_command(path: Path) -> str | None:
    """Read and delete a control file; None if absent or still empty (being written)."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text:
        path.unlink(missing_ok=True)
    return text or None


def _take_start_fault(port: int) -> str | None:
    """The fault armed in ``<control dir>/<port>.start`` for this start-up, counting it down.

    Why a file read at start: a fault explorer arms a fault for the *next* process on a port
    (the restart mpsd is about to make), which no environment knob of the config can do."""
    control_dir = os.environ.get("FAKE_ENGINE_CONTROL_DIR")
    if not control_dir:
        return None
    path = Path(control_dir) / f"{port}.start"
    try:
        words = path.read_text().split()
    except OSError:
        return None
    if not words:
        return None
    if len(words) > 1 and words[1].isdigit():
        left = int(words[1]) - 1
        if left > 0:
            tmp = path.with_name(f".{port}.start.tmp")
            tmp.write_text(f"{words[0]} {left}")
            tmp.rename(path)
        else:
            path.unlink(missing_ok=True)
    fakeutil.EventLog("FAKE_ENGINE_EVENTS", f"engine:{port}").emit("start_fault", fault=words[0])
    return words[0]


class ApiServer:
    """The API server process: EngineCore child, HTTP listener, knobs, signals, exit code."""

    def __init__(self, args: Args) -> None:
        self.args = args
        port = args.port
        self.ev = fakeutil.EventLog("FAKE_ENGINE_EVENTS", f"engine:{port}")
        self.st = State(
            served=args.served, root=args.model, max_model_len=args.max_model_len,
            max_running=int(fakeutil.knob_float("FAKE_ENGINE_MAX_RUNNING", 128, port) or 128),
            token_delay=fakeutil.knob_float("FAKE_ENGINE_TOKEN_DELAY_S", 0.0, port) or 0.0,
            ev=self.ev, engine_name=fakeutil.knob("FAKE_ENGINE_NAME", port) or str(port))
        self.st.canary_fail = fakeutil.knob_bool("FAKE_ENGINE_CANARY_FAIL", port)
        self.core: asyncio.subprocess.Process | None = None
        self.core_dead = asyncio.Event()
        self.stop = asyncio.Event()
        self.mps = False
        self.gpu: SharedGpu | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _knob(self, name: str) -> float | None:
        return fakeutil.knob_float(name, None, self.args.port)

    async def run(self) -> int:
        """Start, serve, and return the process exit code."""
        a = self.args
        vlog("INFO", f"vLLM API server version {VERSION}")
        vlog("INFO", f"non-default args: {a.flags!r}", "utils.py:1")
        env = _env_subset()
        self.ev.emit("start", argv=sys.argv, model=a.model, served_model_name=a.served,
                     host=a.host, port=a.port, ppid=os.getppid(), pgid=os.getpgid(0),
                     has_notify_socket="NOTIFY_SOCKET" in env,
                     has_watchdog=any(k.startswith("WATCHDOG_") for k in env))
        self.ev.emit("env", env=env)
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._on_signal, signal.SIGTERM)
        loop.add_signal_handler(signal.SIGINT, self._on_signal, signal.SIGINT)
        armed = _take_start_fault(a.port)
        if armed == "hang":  # EngineCore inherits a load that never ends
            os.environ[f"FAKE_ENGINE_START_DELAY_S_PORT_{a.port}"] = "86400"
        self.st.canary_fail = self.st.canary_fail or armed == "canary_fail"
        if armed == "fail" or fakeutil.knob_bool("FAKE_ENGINE_FAIL_START", a.port):
            print(f"OSError: {a.model} is not a local folder and is not a valid model "
                  "identifier listed on 'https://huggingface.co/models'", file=sys.stderr,
                  flush=True)
            return self._exit(1, "fail_start")
        if not self._join_gpu():
            return self._exit(1, "gpu_memory")
        started = time.monotonic()
        if not await self._start_core():
            if self.stop.is_set():
                await self._stop_core()
                return self._exit(0, "sigterm_during_startup")
            vlog("ERROR", "RuntimeError: Engine core initialization failed. See root cause "
                 "above. Failed core proc(s): {'EngineCore_DP0': 1}", "core_client.py:1")
            return self._exit(1, "engine_core_init_failed")
        assert self.core is not None
        await log_start_phases(a.port, "enforce-eager" in a.flags, self.core.pid, started)
        access: dict[str, Any] = {"access_log": None}
        if "disable-uvicorn-access-log" not in a.flags:  # vLLM's default: a line per request
            access = {"access_log": logging.getLogger("uvicorn.access"),
                      "access_log_class": UvicornAccessLog}
        runner = web.AppRunner(make_app(self.st), handler_cancellation=True, **access)
        await runner.setup()
        handler = runner.server
        assert handler is not None
        try:
            server = await loop.create_server(handler, a.host, a.port, backlog=1024)
        except OSError as exc:
            vlog("ERROR", f"OSError: [Errno {exc.errno}] {exc.strerror}")
            await self._stop_core()
            await runner.cleanup()
            return self._exit(1, "bind_failed")
        vlog("INFO", f"Starting vLLM API server 0 on http://{a.host or '0.0.0.0'}:{a.port}",
             "launcher.py:1")
        vlog("INFO", f"Started server process [{os.getpid()}]")
        vlog("INFO", "Application startup complete.")
        self.ev.emit("ready", host=a.host, port=a.port, mps=self.mps)
        self._arm_knobs()
        stop_task = self._spawn(self.stop.wait())
        dead_task = self._spawn(self.core_dead.wait())
        await asyncio.wait([stop_task, dead_task], return_when=asyncio.FIRST_COMPLETED)
        if self.core_dead.is_set() and not self.stop.is_set():
            await self._engine_died()  # keeps listening: /health answers 503 meanwhile
            server.close()
        else:
            server.close()  # SIGTERM: stop listening at once, then drain or abort
            await self._drain_or_abort()
        await self._stop_core()
        if not self.st.dead:
            log_output_handler_death()
        await runner.cleanup()
        vlog("INFO", "Shutting down")
        vlog("INFO", "Application shutdown complete.")
        return self._exit(0, "engine_dead" if self.st.dead else "shutdown")

    def _exit(self, code: int, reason: str) -> int:
        if self.gpu is not None:
            self.gpu.close()
        self.ev.emit("exit", code=code, reason=reason)
        return code

    def _join_gpu(self) -> bool:
        """FAKE_GPU_DIR: register on the shared fake GPU, or fail start-up like vLLM does when
        the memory shares do not fit (False)."""
        try:
            self.gpu = register(self.args.port, self.args.flags)
        except GpuMemoryError as exc:
            print(f"ValueError: {exc}", file=sys.stderr, flush=True)
            vlog("ERROR", "RuntimeError: Engine core initialization failed. See root cause "
                 "above. Failed core proc(s): {'EngineCore_DP0': 1}", "core_client.py:1")
            self.ev.emit("gpu_memory_refused", message=str(exc))
            return False
        if self.gpu is not None:
            cfg = self.gpu.cfg
            self.st.gpu = StepClock(self.gpu)
            self.ev.emit("gpu_register", device=cfg.device, util=self.gpu.registry.entry["util"],
                         mps=cfg.mps, pct=cfg.pct, path=str(self.gpu.registry.path))
        return True

    def _on_signal(self, sig: int) -> None:
        ignored = sig == signal.SIGTERM and fakeutil.knob_bool(
            "FAKE_ENGINE_IGNORE_SIGTERM", self.args.port)
        self.ev.emit("sigterm" if sig == signal.SIGTERM else "sigint", ignored=ignored,
                     inflight=len(self.st.inflight))
        if not ignored:
            self.stop.set()

    async def _start_core(self) -> bool:
        """Spawn EngineCore and wait for its ready line (False: it died or we were stopped)."""
        self.core = await asyncio.create_subprocess_exec(
            sys.executable, str(HERE / "fake_engine_core.py"), str(self.args.port),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.ev.emit("engine_core_start", core_pid=self.core.pid)
        if self.gpu is not None:  # an orphaned EngineCore keeps holding the memory
            with contextlib.suppress(OSError):
                self.gpu.registry.write(core_pid=self.core.pid)
        self._spawn(self._watch_core(self.core))
        assert self.core.stdout is not None
        line_task = self._spawn(self.core.stdout.readline())
        stop_task = self._spawn(self.stop.wait())
        await asyncio.wait([line_task, stop_task], return_when=asyncio.FIRST_COMPLETED)
        stop_task.cancel()
        if not line_task.done() or not line_task.result():
            line_task.cancel()
            return False
        ready = json.loads(line_task.result())
        self.mps = bool(ready.get("mps"))
        if self.mps:
            self.st.on_busy = self._notify_busy
        return True

    async def _watch_core(self, core: asyncio.subprocess.Process) -> None:
        code = await core.wait()
        self.ev.emit("engine_core_exit", core_pid=core.pid, code=code)
        self.core_dead.set()

    def _send_core(self, command: bytes) -> None:
        core = self.core
        if core is not None and core.stdin is not None and core.returncode is None:
            with contextlib.suppress(OSError, RuntimeError):
                core.stdin.write(command)

    def _notify_busy(self, busy: bool) -> None:
        self._send_core(b"busy\n" if busy else b"idle\n")

    async def _stop_core(self) -> None:
        """Ask EngineCore to exit (it says goodbye to MPS), then force it after 5 s."""
        core = self.core
        if core is None or core.returncode is not None:
            return
        self._send_core(b"exit\n")
        try:
            await asyncio.wait_for(core.wait(), 5.0)
        except TimeoutError:
            vlog("WARNING", "force killing remaining processes", "utils.py:1")
            core.kill()
            await core.wait()

    async def _engine_died(self) -> None:
        """EngineCore is gone: fail in-flight requests, 503 for a moment, then exit 0."""
        self.st.dead = True
        vlog("ERROR", "Engine core proc EngineCore_DP0 died unexpectedly, shutting down "
             "client.", "core_client.py:1")
        vlog("ERROR", "vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an "
             "issue. See stack trace (above) for the root cause.", "async_llm.py:1")
        count = self.st.fail_all("error")
        self.ev.emit("engine_dead", failed=count)
        await asyncio.sleep(fakeutil.knob_float("FAKE_ENGINE_DEAD_EXIT_S", 0.5,
                                                self.args.port) or 0.0)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.st.idle.wait(), 2.0)

    async def _drain_or_abort(self) -> None:
        """SIGTERM: stop listening, drain up to --shutdown-timeout or abort at once."""
        st = self.st
        count = len(st.inflight)
        timeout = self.args.shutdown_timeout
        if count and timeout > 0:
            vlog("INFO", f"draining in-flight requests count={count} timeout={timeout:g}s")
            self.ev.emit("drain", inflight=count, timeout=timeout)
            idle = self._spawn(st.idle.wait())
            dead = self._spawn(self.core_dead.wait())
            await asyncio.wait([idle, dead], timeout=timeout,
                               return_when=asyncio.FIRST_COMPLETED)
            idle.cancel()
            dead.cancel()
            if st.inflight:
                self.ev.emit("drain_timeout", inflight=len(st.inflight))
                st.fail_all("error")
        elif count:
            vlog("INFO", f"aborting in-flight requests count={count}", "core.py:1")
            self.ev.emit("abort_all", inflight=count)
            st.fail_all("abort")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(st.idle.wait(), 5.0)

    def _arm_knobs(self) -> None:
        """Time-based knobs count from readiness; the control-file poller runs off the hot path."""
        loop = asyncio.get_running_loop()
        actions = {"FAKE_ENGINE_CRASH_AFTER_S": "crash",
                   "FAKE_ENGINE_UNHEALTHY_AFTER_S": "unhealthy",
                   "FAKE_ENGINE_HANG_AFTER_S": "hang"}
        for name, command in actions.items():
            delay = self._knob(name)
            if delay is not None:
                loop.call_later(delay, self.apply, command, "knob")
        control_dir = os.environ.get("FAKE_ENGINE_CONTROL_DIR")
        if control_dir:
            self._spawn(self._poll_control(Path(control_dir) / f"{self.args.port}.cmd"))

    async def _poll_control(self, path: Path) -> None:
        while True:
            command = _take_command(path)
            if command is not None:
                self.apply(command, "control_file")
            await asyncio.sleep(0.05)

    def apply(self, command: str, source: str) -> None:
        """Change behaviour of the running engine (knob timers and the control file)."""
        words = command.split()
        verb = words[0] if words else ""
        self.ev.emit("control", command=command, source=source)
        st = self.st
        if verb == "crash":
            self._send_core(b"crash\n")
        elif verb == "hang":
            st.hang = True
        elif verb == "unhang":
            st.hang = False
            st.never.set()
            st.never = asyncio.Event()
        elif verb in ("unhealthy", "healthy"):
            st.unhealthy = verb == "unhealthy"
        elif verb == "slow" and len(words) == 2:
            st.token_delay = float(words[1])
        elif verb in ("canary_fail", "canary_ok"):
            st.canary_fail = verb == "canary_fail"
        else:
            vlog("WARNING", f"fake-vllm: unknown control command {command!r}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fake-vllm`` shim."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if "help" in args.flags or "version" in args.flags:
        print(VERSION if "version" in args.flags else __doc__)
        return 0
    with contextlib.suppress(AttributeError, ValueError):
        sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    return asyncio.run(ApiServer(args).run())


if __name__ == "__main__":
    sys.exit(main())
