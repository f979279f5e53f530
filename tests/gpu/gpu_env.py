"""What the GPU scenarios need: the host's tools, the daemon under test, load, and results.

The scenarios run ``mpsd run`` against the real ``nvidia-cuda-mps-control`` and real vLLM
engines (qwen2.5-0.5b architecture with random weights, ``--load-format dummy``). Everything
host-specific comes from the environment, with defaults that fit the repository's ``.gpu/``
staging folder:

  MPSD_GPU_MODEL       model directory (default ``<repo>/.gpu/models/qwen2.5-0.5b``)
  MPSD_GPU_TOKENIZER   tokenizer directory (default ``<repo>/.gpu/models/tokenizer``)
  MPSD_GPU_OUT         where results (``scenarios.json``) and the logs archive go
  MPSD_GPU_DEADLINE    epoch seconds: optional scenarios are skipped when they would end later
  MPSD_GPU_COTENANT=0  no co-tenant next to the vLLM engines (scenario 3 is skipped)
  MPSD_GPU_EAGER=1     add ``--enforce-eager`` (faster engine starts, no CUDA graphs)
  MPSD_GPU_KV=0        no ``--kv-cache-memory-bytes``: vLLM profiles free memory, so mpsd starts
                       the engines of the GPU one after another (default: the flag, together)
  MPSD_GPU_HOLD_S      ``[proxy] recovery_hold_s`` (default: mpsd's own)
  MPSD_GPU_FAKE=1      dry run on a CPU machine: the fake MPS binary and fake vLLM of
                       ``tests/fakes`` stand in for the real ones (no GPU, no vLLM needed)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from tests.harness import FAKE_MPS, FAKE_VLLM, REPO, Event, Mpsd

FAKE = os.environ.get("MPSD_GPU_FAKE") == "1"
MODEL = Path(os.environ.get("MPSD_GPU_MODEL", REPO / ".gpu" / "models" / "qwen2.5-0.5b"))
TOKENIZER = Path(os.environ.get("MPSD_GPU_TOKENIZER", REPO / ".gpu" / "models" / "tokenizer"))
COTENANT = Path(__file__).resolve().parent / "cotenant.py"
SERVED = "qwen"
_NVIDIA_DIRS = ("/usr/local/nvidia/bin", "/usr/bin", "/usr/local/bin")

# The switches vLLM 0.26 needs on the GPU host (.gpu/env.sh). mpsd passes engines only an
# allow-list of its own environment, so PYTHONPATH (vLLM lives in a --target folder) and these
# must be in the engine's ``env``.
VLLM_ENV = {
    "VLLM_USE_FLASHINFER_SAMPLER": "0",  # flashinfer is not installed
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "PYTHONUNBUFFERED": "1",
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
}


def find_tool(name: str) -> str | None:
    """A driver tool on PATH or in the usual driver folders."""
    found = shutil.which(name)
    if found:
        return found
    for folder in _NVIDIA_DIRS:
        candidate = Path(folder) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def missing(vllm: bool = True) -> str | None:
    """Why the GPU scenarios cannot run here (``vllm``: those with vLLM engines), or None."""
    if FAKE:
        return None
    import importlib.util  # noqa: PLC0415

    if find_tool("nvidia-smi") is None:
        return "no nvidia-smi (not a GPU host)"
    if find_tool("nvidia-cuda-mps-control") is None:
        return "no nvidia-cuda-mps-control (MPS tools not installed)"
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("triton") is None:
        return "torch/triton are not importable"
    if not vllm:
        return None
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not importable"
    if not (MODEL / "config.json").is_file() or not TOKENIZER.is_dir():
        return f"model {MODEL} or tokenizer {TOKENIZER} missing (see .gpu/ staging)"
    return None


def vllm_shim(folder: Path) -> Path:
    """A ``vllm`` executable: the GPU host has vLLM's package but no console script."""
    shim = folder / "vllm"
    shim.write_text(f"#!{sys.executable}\nimport sys\n"
                    "from vllm.entrypoints.cli.main import main\n"
                    "if __name__ == '__main__':  # vLLM spawns EngineCore: guard the main module\n"
                    "    sys.exit(main())\n")
    shim.chmod(0o755)
    return shim


def epoch(event: Event) -> float:
    """An mpsd JSON log event's time (ISO, UTC) as epoch seconds."""
    stamp = str(event.get("timestamp", ""))
    if not stamp:
        return float("nan")
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def smi(query: str, kind: str = "gpu") -> list[list[str]]:
    """``nvidia-smi --query-<kind>=<query>`` rows (empty in fake mode or on error)."""
    tool = find_tool("nvidia-smi")
    if FAKE or tool is None:
        return []
    out = subprocess.run([tool, f"--query-{kind}={query}", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, timeout=30, check=False)
    return [[c.strip() for c in line.split(",")] for line in out.stdout.splitlines()
            if line.strip()]


def gpu_memory_used_mib() -> float | None:
    rows = smi("memory.used")
    return float(rows[0][0]) if rows else None


def compute_apps() -> list[dict[str, str]]:
    return [{"pid": r[0], "name": r[1], "used_mib": r[2]}
            for r in smi("pid,process_name,used_memory", kind="compute-apps") if len(r) >= 3]


def proc_comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def proc_environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (item.partition(b"=") for item in raw.split(b"\0") if item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, _, v in pairs}


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


# -- the daemon under test ------------------------------------------------------------------


@dataclass
class GpuMpsd(Mpsd):
    """``mpsd run`` over the real MPS binary and real vLLM (or the fakes, ``MPSD_GPU_FAKE``).

    One GPU (device ``"0"``): ``replicas`` vLLM engines of qwen2.5-0.5b and, with ``cotenant``,
    one more MPS client of kind ``command`` (:mod:`tests.gpu.cotenant`).
    """

    cotenant: bool = os.environ.get("MPSD_GPU_COTENANT") != "0"
    cotenant_replicas: int = 1
    vllm: bool = True
    executable: str = ""
    _events: list[Event] = field(default_factory=list)
    _offset: int = 0
    _partial: bytes = b""

    def config(self) -> dict[str, Any]:
        control = str(FAKE_MPS) if FAKE else (find_tool("nvidia-cuda-mps-control") or "")
        env = {**VLLM_ENV, "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
        args = ["--tokenizer", str(TOKENIZER), "--load-format", "dummy",
                "--disable-uvicorn-access-log"]
        if os.environ.get("MPSD_GPU_KV") != "0":
            args += ["--kv-cache-memory-bytes", "8589934592"]
        if os.environ.get("MPSD_GPU_EAGER") == "1":
            args.append("--enforce-eager")
        mps_env: dict[str, str] = {}
        cotenant_cmd = [sys.executable, str(COTENANT), "--port", "{port}"]
        cotenant_env = {"PYTHONPATH": os.environ.get("PYTHONPATH", ""), "PYTHONUNBUFFERED": "1"}
        if FAKE:
            env.update(FAKE_ENGINE_EVENTS=str(self.engine_events),
                       FAKE_ENGINE_CONTROL_DIR=str(self.control_dir),
                       FAKE_ENGINE_TOKEN_DELAY_S="0.01", FAKE_ENGINE_START_DELAY_S="1.0")
            mps_env["FAKE_MPS_EVENTS"] = str(self.mps_events)
            cotenant_cmd.append("--fake")
            cotenant_env.update(COTENANT_FAKE_MPS=str(FAKE_MPS),
                                FAKE_ENGINE_EVENTS=str(self.engine_events))
        engines: list[dict[str, Any]] = []
        if self.vllm:
            engines.append({
                "model": str(MODEL if not FAKE else self.workdir / "model"),
                "served_model_name": SERVED, "replicas": self.replicas,
                "gpu_memory_utilization": 0.4, "args": args, "env": env,
            })
        if self.cotenant:
            engines.append({
                # a port of its own: mpsd numbers engines' ports in config order, so a
                # replica change before it would shift its port and restart it on reload
                "kind": "command", "model": "cotenant", "name": "cotenant",
                "port": self.engine_port_base + 40, "replicas": self.cotenant_replicas,
                "command": cotenant_cmd, "canary": "none", "startup_timeout_s": 120,
                "stop_timeout_s": 5, "env": cotenant_env,
            })
        doc: dict[str, Any] = {
            "daemon": {"state_dir": str(self.workdir / "run"), "log_dir": str(self.workdir / "log"),
                       "log_format": "json", "log_level": "info",
                       "engine_port_base": self.engine_port_base, "metrics_interval_s": 5.0},
            "proxy": {"listen": f"127.0.0.1:{self.port}", "drain_timeout_s": 30.0},
            "mps": {"enabled": self.mps, "control_binary": control, "recover_timeout_s": 10.0,
                    "status_interval_s": 1.0, "env": mps_env},
            "restart": {"backoff_initial_s": 1.0, "backoff_max_s": 30.0, "max_restarts": 5,
                        "window_s": 600, "stable_after_s": 300},
            "defaults": {"executable": self.executable or str(FAKE_VLLM),
                         "startup_timeout_s": 300, "stop_timeout_s": 20,
                         "health_interval_s": 2.0, "health_failures": 3, "cpu_affinity": "off"},
            "gpu": [{"device": "0", "engine": engines}],
        }
        if os.environ.get("MPSD_GPU_HOLD_S"):
            doc["proxy"]["recovery_hold_s"] = float(os.environ["MPSD_GPU_HOLD_S"])
        for section, values in self.overrides.items():
            doc.setdefault(section, {}).update(values)
        return doc

    def log(self) -> list[Event]:
        """mpsd's JSON log, read incrementally (vLLM's output makes it large)."""
        if not self.log_file.exists():
            return self._events
        with self.log_file.open("rb") as handle:
            handle.seek(self._offset)
            chunk = handle.read()
        self._offset += len(chunk)
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()
        for raw in lines:
            with contextlib.suppress(json.JSONDecodeError, UnicodeDecodeError):
                item = json.loads(raw)
                if isinstance(item, dict):
                    self._events.append(item)
        return self._events

    def start(self) -> GpuMpsd:
        super().start()
        pidfile = os.environ.get("MPSD_GPU_PIDFILE")
        if pidfile and self.proc is not None:  # lets a wrapper clean up after a killed run
            with Path(pidfile).open("a") as handle:
                handle.write(f"{self.proc.pid}\n")
        return self

    def wait_running(self, timeout: float) -> None:
        """Until gpu0 is RUNNING; fails at once when it goes FAILED or mpsd exits."""
        deadline = time.monotonic() + timeout
        while self.group_state("gpu0") != "running":
            if self.group_state("gpu0") == "failed" or (
                    self.proc is not None and self.proc.poll() is not None):
                raise AssertionError(f"gpu0 {self.group_state('gpu0')}, mpsd "
                                     f"{self.proc.poll() if self.proc else None}\n{self.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"gpu0 not running after {timeout}s\n{self.tail()}")
            time.sleep(0.2)

    def events_after(self, t: float, event: str, **match: Any) -> list[Event]:
        return [e for e in self.events(event, **match) if epoch(e) >= t]

    def reload(self, replicas: int) -> None:
        """Rewrite the config with another replica count and SIGHUP the daemon."""
        assert self.proc is not None
        self.replicas = replicas
        self.write_config()
        self.proc.send_signal(signal.SIGHUP)

    def mps_ctl(self, line: str) -> str:
        """One command to the group's MPS control daemon, as an operator would send it."""
        binary = str(FAKE_MPS) if FAKE else (find_tool("nvidia-cuda-mps-control") or "")
        env = {**os.environ, "CUDA_MPS_PIPE_DIRECTORY": str(self.workdir / "run" / "gpu0" / "pipe")}
        out = subprocess.run([binary], input=line + "\n", capture_output=True, text=True,
                             env=env, timeout=10, check=False)
        return out.stdout.strip()

    def mps_clients(self) -> dict[int, list[int]]:
        """MPS server PID → its client PIDs."""
        servers = [int(w) for w in self.mps_ctl("get_server_list").split() if w.isdigit()]
        return {s: [int(w) for w in self.mps_ctl(f"get_client_list {s}").split() if w.isdigit()]
                for s in servers}

    def wait_running_again(self, after_t: float, timeout: float) -> Event:
        """The first ``group_state → running`` logged after ``after_t``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.events_after(after_t, "group_state", gpu="gpu0", to="running")
            if found:
                return found[0]
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"mpsd exited {self.proc.returncode}\n{self.tail()}")
            time.sleep(0.2)
        raise AssertionError(f"gpu0 not running again after {timeout}s\n{self.tail()}")

    def archive(self, dest: Path) -> None:
        """mpsd's log, the config and MPS's logs in one .tgz."""
        with tarfile.open(dest, "w:gz") as tar:
            logs = sorted((self.workdir / "log").rglob("*"))
            for path in [self.log_file, self.config_file, *logs]:
                if path.is_file():
                    tar.add(path, arcname=str(path.relative_to(self.workdir)))


# -- load -----------------------------------------------------------------------------------


@dataclass
class Record:
    """One request of a load run: when it was sent and answered, and how it ended."""

    t0: float
    t1: float
    status: int  # HTTP status; 0 = transport error
    error: str = ""
    t_head: float | None = None  # the response head (a stream's first byte follows it)

    @property
    def ok(self) -> bool:
        return self.status == 200 and not self.error


class Load:
    """Closed-loop ``/v1/completions`` load through one URL, on a thread of its own."""

    def __init__(self, url: str, concurrency: int = 32, max_tokens: int = 64,
                 model: str = SERVED, pause_after_error_s: float = 0.2,
                 stream: bool = False) -> None:
        self.url = url
        self.stream = stream
        self.concurrency = concurrency
        self.max_tokens = max_tokens
        self.model = model
        self.pause = pause_after_error_s
        self.records: list[Record] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="load", daemon=True)

    def start(self) -> Load:
        self._thread.start()
        return self

    def stop(self) -> list[Record]:
        self._stop.set()
        self._thread.join(120)
        return list(self.records)

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        import aiohttp  # noqa: PLC0415

        timeout = aiohttp.ClientTimeout(total=120)
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:

            async def user(n: int) -> None:
                body = {"model": self.model, "prompt": f"User {n} asks: tell me a story.",
                        "max_tokens": self.max_tokens, "ignore_eos": True, "stream": self.stream}
                while not self._stop.is_set():
                    t0, t_head = time.time(), None
                    try:
                        async with session.post(f"{self.url}/v1/completions", json=body) as resp:
                            t_head = time.time()
                            data = await resp.read()
                            status = resp.status
                        error = "" if status == 200 else data[:300].decode(errors="replace")
                        if status == 200 and self.stream:
                            error = stream_error(data)
                    except (aiohttp.ClientError, TimeoutError) as exc:
                        status, error = 0, repr(exc)[:300]
                    self.records.append(Record(t0, time.time(), status, error, t_head))
                    if status != 200:
                        await asyncio.sleep(self.pause)

            users = [asyncio.ensure_future(user(n)) for n in range(self.concurrency)]
            await asyncio.to_thread(self._stop.wait)
            # let requests in flight finish (they are part of the record), then stop
            done, pending = await asyncio.wait(users, timeout=60)
            for task in pending:
                task.cancel()
            await asyncio.gather(*users, return_exceptions=True)
            del done


def stream_error(body: bytes) -> str:
    """Why a 200 SSE body did not end well: an error event, or no ``[DONE]`` ("" if it did)."""
    events = [line[6:] for line in body.split(b"\n") if line.startswith(b"data: ")]
    for event in events:
        if event.startswith(b'{"error"'):
            return event[:300].decode(errors="replace")
    return "" if events and events[-1].strip() == b"[DONE]" else "stream ended without [DONE]"


def summarize(records: list[Record]) -> dict[str, Any]:
    failed = [r for r in records if not r.ok]
    by_status: dict[str, int] = {}
    for r in failed:
        by_status[str(r.status)] = by_status.get(str(r.status), 0) + 1
    return {"requests": len(records), "ok": len(records) - len(failed), "failed": len(failed),
            "failed_by_status": by_status,
            "error_samples": sorted({r.error[:160] for r in failed})[:5]}


# -- results --------------------------------------------------------------------------------


class Results:
    """Scenario results, written after every change so that a cut-off run keeps what it got."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / "scenarios.json"
        self.data: dict[str, Any] = {"started": time.time(), "fake": FAKE}

    def put(self, key: str, value: Any) -> None:
        self.data[key] = value
        self.path.write_text(json.dumps(self.data, indent=1, default=_jsonable))


def _jsonable(value: Any) -> Any:
    if isinstance(value, Record):
        return asdict(value)
    if isinstance(value, Path):
        return str(value)
    return repr(value)


def deadline_left() -> float:
    """Seconds until ``MPSD_GPU_DEADLINE`` (inf when unset)."""
    raw = os.environ.get("MPSD_GPU_DEADLINE")
    return float(raw) - time.time() if raw else float("inf")


def trigger_fault(port: int) -> tuple[int, str]:
    """POST ``/fault`` to a co-tenant: its reply, or why none came (mpsd may kill it first)."""
    import http.client  # noqa: PLC0415

    from tests.harness import http as request  # noqa: PLC0415

    try:
        code, _, body = request("POST", f"http://127.0.0.1:{port}/fault", {}, timeout=60)
    except (OSError, http.client.HTTPException) as exc:
        return 0, f"no reply: {exc!r}"[:300]
    return code, body[:300].decode(errors="replace")
