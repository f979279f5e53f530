#!/usr/bin/env python3
"""Throughput on one GPU through mpsd: 1 engine vs N engines under MPS, proxy vs client balancing.

::

    benchmarks/gpu_throughput.py run --out DIR [--deadline EPOCH] [--phases mps,nomps,nocpu]
    benchmarks/gpu_throughput.py summary DIR/results.jsonl ... [--plot FILE.png] [--md FILE.md]

``run`` starts ``mpsd run`` (real ``nvidia-cuda-mps-control``, real vLLM serving
qwen2.5-0.5b with random weights) and measures, with a closed-loop load generator:

- ``direct1``: one engine of the group, loaded directly on its own port (the others sit idle;
  idle MPS clients launch no kernels);
- ``mpsd``: all N engines of the group through mpsd's proxy (least-loaded);
- ``client``: the same N engines, the load generator balancing itself (least-in-flight over the
  N engine ports) — the ceiling a proxy can reach.

Workloads: W1 = 128 prompt / 128 output tokens at concurrency 256 (decode-heavy), W2 = 1024 /
1 at concurrency 64 (prefill-heavy). Prompts are random token ids (no prefix-cache hits),
``ignore_eos`` makes every answer exactly the asked length. Within a stage the three modes run
interleaved (direct1, mpsd, client, client, mpsd, direct1, …), ``--samples`` times each, so that
drift hits every mode alike; ``summary`` reports medians, min-max and the ratios.

Phases (each its own ``mpsd run``; ``--phases`` picks and orders them):

- ``mps``: MPS on, CPU placement on (disjoint explicit core lists, mpsd on core 0); stages
  N = 2, 3, 4 by reloading ``replicas`` upwards (only the new engine starts);
- ``nomps``: MPS off (time-sliced contexts), placement on, N = 2;
- ``nocpu``: MPS on, ``cpu_affinity = "off"``, N = 2;
- ``mpsrep``: MPS on, placement on, N = 2, W1 only, mpsd and client only, 5 samples (a
  closer look at the proxy-vs-client ratio where W1 is noisy).

Every run also records mpsd's own CPU time (cores busy, proxy included) over the run.

A run that would end after ``--deadline`` is skipped (and said so in the results), so the
whole thing fits a fixed slot on a GPU host. Results: ``results.jsonl`` (one line per run,
per engine start, per skip), mpsd's logs per phase, ``summary.md``.

The GPU host needs vLLM importable (``PYTHONPATH``) and the model folders of ``.gpu/models``
(``--model``, ``--tokenizer``). ``--fake`` runs the same procedure against the fake MPS
binary and fake vLLM of ``tests/fakes`` (a dry run on a CPU machine).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
FAKES = ROOT / "tests" / "fakes"
SERVED = "qwen"
WORKLOADS = {"W1": (256, 128, 128), "W2": (64, 1024, 1)}  # concurrency, input, output
VLLM_ENV = {"VLLM_USE_FLASHINFER_SAMPLER": "0", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
            "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
PHASES: dict[str, dict[str, Any]] = {
    "mps": {"mps": "on", "cpu": True, "stages": [2, 3, 4]},
    # a repeat of N = 2 under MPS for the proxy-vs-client question alone: more samples, W1
    "mpsrep": {"mps": "on", "cpu": True, "stages": [2], "modes": ["mpsd", "client"],
               "workloads": ["W1"], "samples": 5},
    "nomps": {"mps": "off", "cpu": True, "stages": [2]},
    "nocpu": {"mps": "on", "cpu": False, "stages": [2]},
}
Row = dict[str, Any]


# -- the load generator ------------------------------------------------------------------------


@dataclass
class LoadSpec:
    urls: list[str]
    concurrency: int
    input_len: int
    output_len: int
    warmup_s: float
    duration_s: float
    procs: int = 4
    seed: int = 0
    cpus: list[int] = field(default_factory=list)


async def _client(spec: LoadSpec, users: int, seed: int, t_start: float) -> tuple[
        list[tuple[float, float, int, int, int]], list[str], int]:
    import aiohttp  # noqa: PLC0415

    rng = random.Random(seed)
    inflight = [0] * len(spec.urls)
    turn = [0]
    t_end = t_start + spec.warmup_s + spec.duration_s
    records: list[tuple[float, float, int, int, int]] = []
    errors: list[str] = []
    count = [0]

    def pick() -> int:
        low = min(inflight)
        candidates = [i for i, n in enumerate(inflight) if n == low]
        turn[0] += 1
        return candidates[turn[0] % len(candidates)]

    timeout = aiohttp.ClientTimeout(total=600)
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:

        async def user() -> None:
            while time.time() < t_end:
                target = pick()
                body = {"model": SERVED, "max_tokens": spec.output_len, "ignore_eos": True,
                        "prompt": [rng.randrange(1000, 150000) for _ in range(spec.input_len)]}
                inflight[target] += 1
                t0 = time.time()
                try:
                    async with session.post(f"{spec.urls[target]}/v1/completions",
                                            json=body) as resp:
                        data = await resp.read()
                        status = resp.status
                    if status != 200:
                        count[0] += 1
                        if len(errors) < 20:
                            errors.append(f"{status}: {data[:160].decode(errors='replace')}")
                        await asyncio.sleep(0.05)
                        continue
                    usage = json.loads(data).get("usage") or {}
                    records.append((t0, time.time(), int(usage.get("prompt_tokens", 0)),
                                    int(usage.get("completion_tokens", 0)), target))
                except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                    count[0] += 1
                    if len(errors) < 20:
                        errors.append(repr(exc)[:160])
                    await asyncio.sleep(0.05)
                finally:
                    inflight[target] -= 1

        await asyncio.sleep(max(0.0, t_start - time.time()))
        tasks = [asyncio.ensure_future(user()) for _ in range(users)]
        await asyncio.sleep(max(0.0, t_end - time.time()))
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return records, errors, count[0]


def _client_proc(spec: LoadSpec, users: int, seed: int, t_start: float, conn: Connection) -> None:
    if spec.cpus:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, spec.cpus)
    with contextlib.suppress(ImportError):
        import uvloop  # noqa: PLC0415

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    conn.send(asyncio.run(_client(spec, users, seed, t_start)))
    conn.close()


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * p / 100
    low = int(k)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (k - low)


def run_load(spec: LoadSpec) -> Row:
    """One closed-loop run; only requests that finish inside the window count."""
    procs = max(1, min(spec.procs, spec.concurrency))
    shares = [spec.concurrency // procs + (1 if i < spec.concurrency % procs else 0)
              for i in range(procs)]
    t_start = time.time() + 0.5
    ctx = mp.get_context("fork")
    pipes, children = [], []
    for i, users in enumerate(shares):
        recv, send = ctx.Pipe(duplex=False)
        child = ctx.Process(target=_client_proc,
                            args=(spec, users, spec.seed * 100 + i, t_start, send))
        child.start()
        pipes.append(recv)
        children.append(child)
    records: list[tuple[float, float, int, int, int]] = []
    errors: list[str] = []
    n_errors = 0
    for recv in pipes:
        got, errs, n = recv.recv()
        records += got
        errors += errs
        n_errors += n
    for child in children:
        child.join()
    w0 = t_start + spec.warmup_s
    w1 = w0 + spec.duration_s
    window = [r for r in records if w0 <= r[1] < w1]
    latencies = [r[1] - r[0] for r in window]
    prompt = sum(r[2] for r in window)
    completion = sum(r[3] for r in window)
    return {
        "requests": len(window), "req_per_s": len(window) / spec.duration_s,
        "output_tok_per_s": completion / spec.duration_s,
        "total_tok_per_s": (prompt + completion) / spec.duration_s,
        "lat_p50_s": percentile(latencies, 50), "lat_p99_s": percentile(latencies, 99),
        "per_url": [sum(1 for r in window if r[4] == i) for i in range(len(spec.urls))],
        "errors": n_errors, "error_samples": errors[:3], "window": [w0, w1],
    }


# -- mpsd under test ---------------------------------------------------------------------------


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + "}"
    return str(value)


def render_toml(sections: dict[str, dict[str, Any]], engines: list[dict[str, Any]]) -> str:
    lines: list[str] = []
    for name, body in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {_toml(v)}" for k, v in body.items()]
    lines += ["[[gpu]]", 'device = "0"']
    for engine in engines:
        lines.append("[[gpu.engine]]")
        lines += [f"{k} = {_toml(v)}" for k, v in engine.items()]
    return "\n".join(lines) + "\n"


def find_tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for folder in ("/usr/local/nvidia/bin", "/usr/bin"):
        candidate = Path(folder) / name
        if candidate.is_file():
            return str(candidate)
    return None


def free_port() -> int:
    import socket  # noqa: PLC0415

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def epoch(event: Row) -> float:
    stamp = str(event.get("timestamp", ""))
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp() if stamp else 0.0


class Daemon:
    """One ``mpsd run`` of a phase, its config and its JSON log."""

    def __init__(self, args: argparse.Namespace, workdir: Path, phase: str, mps: str,
                 cpu: bool, nmax: int) -> None:
        self.args = args
        self.workdir = workdir / phase
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.mps, self.cpu, self.nmax = mps, cpu, nmax
        self.port = free_port()
        # below the ephemeral range (32768-60999): the load generator's thousands of client
        # sockets must not take an engine's port before the engine binds it
        self.engine_port_base = 18100 + random.randrange(0, 40) * 10
        self.config_file = self.workdir / "mpsd.toml"
        self.log_file = self.workdir / "mpsd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.replicas = 0
        self._offset = 0
        self._partial = b""
        self.events: list[Row] = []
        usable = sorted(os.sched_getaffinity(0))
        self.client_cpus = usable[-3:] if len(usable) >= 8 else []
        engine_cores = [c for c in usable[1:] if c not in self.client_cpus]
        per = max(1, len(engine_cores) // nmax) if engine_cores else 0
        self.core_lists = [engine_cores[i * per:(i + 1) * per] for i in range(nmax)] \
            if per and len(engine_cores) >= nmax else []
        self.proxy_cpu = usable[0]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def write(self, replicas: int) -> None:
        self.replicas = replicas
        args = self.args
        env = {**VLLM_ENV, "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
        mps_env: dict[str, str] = {}
        if args.fake:
            env.update(FAKE_ENGINE_TOKEN_DELAY_S="0.002", FAKE_ENGINE_START_DELAY_S="0.5",
                       FAKE_ENGINE_MAX_RUNNING="256")
            mps_env["FAKE_MPS_EVENTS"] = str(self.workdir / "mps.jsonl")
        engine: dict[str, Any] = {
            "model": str(args.model), "served_model_name": SERVED, "replicas": replicas,
            "gpu_memory_utilization": args.gpu_util,
            "args": ["--tokenizer", str(args.tokenizer), "--load-format", "dummy",
                     "--kv-cache-memory-bytes", str(args.kv_bytes),
                     "--disable-uvicorn-access-log", *args.engine_arg],
            "env": env,
        }
        if self.cpu and self.core_lists:
            engine["cpu_affinity"] = [_cpu_list(c) for c in self.core_lists[:replicas]]
        else:
            engine["cpu_affinity"] = "off"
        sections = {
            "daemon": {"state_dir": str(self.workdir / "run"), "log_dir": str(self.workdir / "log"),
                       "log_format": "json", "log_level": "info",
                       "engine_port_base": self.engine_port_base, "metrics_interval_s": 10.0},
            "proxy": {"listen": f"127.0.0.1:{self.port}", "drain_timeout_s": 30.0},
            "mps": {"enabled": self.mps, "control_binary": args.control_binary, "env": mps_env},
            "defaults": {"executable": args.executable, "startup_timeout_s": 400,
                         "stop_timeout_s": 20},
        }
        self.config_file.write_text(render_toml(sections, [engine]))

    def start(self, replicas: int) -> None:
        self.write(replicas)
        env = dict(os.environ)
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
        env["PYTHONPATH"] = f"{ROOT}:{env['PYTHONPATH']}" if env.get("PYTHONPATH") else str(ROOT)
        pin: Callable[[], None] | None = None
        if self.cpu and self.core_lists:
            cpu = self.proxy_cpu

            def pin() -> None:
                os.sched_setaffinity(0, {cpu})

        with self.log_file.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mpsd", "run", "-c", str(self.config_file)],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                preexec_fn=pin)  # noqa: PLW1509 - only sets this child's affinity

    def log(self) -> list[Row]:
        if self.log_file.exists():
            with self.log_file.open("rb") as handle:
                handle.seek(self._offset)
                chunk = handle.read()
            self._offset += len(chunk)
            lines = (self._partial + chunk).split(b"\n")
            self._partial = lines.pop()
            for raw in lines:
                with contextlib.suppress(ValueError):
                    item = json.loads(raw)
                    if isinstance(item, dict):
                        self.events.append(item)
        return self.events

    def find(self, event: str, **match: Any) -> list[Row]:
        return [e for e in self.log() if e.get("event") == event
                and all(e.get(k) == v for k, v in match.items())]

    def wait(self, predicate: Callable[[], Any], timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"mpsd exited {self.proc.returncode} waiting for {what}")
            time.sleep(0.25)
        raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")

    def status(self) -> Row:
        with urllib.request.urlopen(f"{self.url}/mpsd/status", timeout=10) as resp:
            data: Row = json.loads(resp.read())
            return data

    def ready_ports(self) -> list[int]:
        try:
            status = self.status()
        except (OSError, ValueError):
            return []
        return [int(e["port"]) for g in status["groups"] for e in g["engines"] if e["ready"]]

    def wait_ready(self, replicas: int, timeout: float) -> list[int]:
        def ready() -> list[int] | None:
            failed = self.find("group_state", to="failed")
            if failed:
                raise RuntimeError(f"group failed: {failed[-1].get('reason')}")
            ports = self.ready_ports()
            return ports if len(ports) >= replicas else None

        ports: list[int] = self.wait(ready, timeout, f"{replicas} engines ready")
        return sorted(ports)

    def reload(self, replicas: int) -> None:
        assert self.proc is not None
        done = len(self.find("reload_done"))
        self.write(replicas)
        self.proc.send_signal(signal.SIGHUP)
        self.wait(lambda: len(self.find("reload_done")) > done, 600, "reload_done")

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(90)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait(10)

    def archive(self, dest: Path) -> None:
        with tarfile.open(dest, "w:gz") as tar:
            for path in [self.log_file, self.config_file,
                         *sorted((self.workdir / "log").rglob("*"))]:
                if path.is_file():
                    tar.add(path, arcname=f"{self.workdir.name}/{path.relative_to(self.workdir)}")


def _cpu_seconds(pid: int) -> float:
    """utime + stime of one process (all its threads), in seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_list(cores: Iterable[int]) -> str:
    ordered = sorted(cores)
    return f"{ordered[0]}-{ordered[-1]}" if ordered == list(range(ordered[0], ordered[-1] + 1)) \
        else ",".join(map(str, ordered))


# -- the experiment ----------------------------------------------------------------------------


class Experiment:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out: Path = args.out
        self.out.mkdir(parents=True, exist_ok=True)
        self.results = self.out / "results.jsonl"
        self.deadline: float = args.deadline or float("inf")
        self.start_estimate_s = 90.0 if not args.fake else 5.0
        self.seq = 0

    def emit(self, row: Row) -> None:
        row = {"at": time.time(), **row}
        with self.results.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        brief = {k: row[k] for k in ("kind", "phase", "stage", "mode", "engines", "workload",
                                     "sample", "req_per_s", "output_tok_per_s",
                                     "total_tok_per_s", "errors", "reason") if k in row}
        print(json.dumps(brief), flush=True)

    def left(self) -> float:
        return self.deadline - time.time() - float(self.args.stop_margin)

    def run(self) -> None:
        workdir = Path(tempfile.mkdtemp(prefix="gb-"))
        try:
            for name in self.args.phases.split(","):
                self.phase(name, workdir)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def run_seconds(self, workload: str) -> float:
        seconds = float(self.args.warmup) + float(self.args.duration) + 1.5
        return seconds * (0.75 if workload == "W2" else 1)

    def phase(self, name: str, workdir: Path) -> None:
        spec = PHASES[name]
        stages: list[int] = [n for n in spec["stages"] if n <= self.args.max_engines]
        first = stages[0]
        samples = spec.get("samples", self.args.samples)
        workloads = spec.get("workloads", self.args.workloads)
        modes = spec.get("modes", ["direct1", "mpsd", "client"])
        runs = samples * len(modes) * sum(self.run_seconds(w) for w in workloads)
        need = first * self.start_estimate_s + runs
        if self.left() < need:
            self.emit({"kind": "skip", "phase": name, "reason":
                       f"{self.left():.0f}s left, phase needs ~{need:.0f}s"})
            return
        daemon = Daemon(self.args, workdir, name, spec["mps"], spec["cpu"], max(stages))
        t0 = time.time()
        try:
            daemon.start(first)
            ports = daemon.wait_ready(first, timeout=first * 400)
            self.startups(daemon, name, t0)
            self.emit({"kind": "phase", "phase": name, "mps": spec["mps"], "cpu": spec["cpu"],
                       "core_lists": daemon.core_lists if spec["cpu"] else None,
                       "client_cpus": daemon.client_cpus, "start_s": round(time.time() - t0, 1)})
            self.prewarm(daemon, ports)
            for n in stages:
                if n > daemon.replicas:
                    per_engine = self.engine_seconds(daemon)
                    need = per_engine + samples * len(modes) * self.run_seconds("W1")
                    if self.left() < need:
                        self.emit({"kind": "skip", "phase": name, "stage": n, "reason":
                                   f"{self.left():.0f}s left, stage needs ~{need:.0f}s"})
                        break
                    t1 = time.time()
                    daemon.reload(n)
                    ports = daemon.wait_ready(n, timeout=400)
                    self.startups(daemon, name, t1)
                self.stage(daemon, name, spec, n, ports)
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            self.emit({"kind": "error", "phase": name, "reason": str(exc)})
        finally:
            t_stop = time.time()
            code = daemon.stop()
            self.emit({"kind": "stopped", "phase": name, "exit_code": code,
                       "stop_s": round(time.time() - t_stop, 1)})
            with contextlib.suppress(OSError):
                daemon.archive(self.out / f"mpsd-{name}.tgz")

    def engine_seconds(self, daemon: Daemon) -> float:
        seconds = [float(e.get("seconds", 0)) for e in daemon.find("engine_ready")]
        return (max(seconds) + 10) if seconds else self.start_estimate_s

    def startups(self, daemon: Daemon, phase: str, since: float) -> None:
        for e in daemon.find("engine_ready"):
            if epoch(e) >= since - 1:
                self.emit({"kind": "engine_ready", "phase": phase, "engine": e.get("engine"),
                           "seconds": e.get("seconds")})

    def prewarm(self, daemon: Daemon, ports: list[int]) -> None:
        if self.args.prewarm <= 0:
            return
        conc, inp, outp = WORKLOADS["W1"]
        run_load(LoadSpec([daemon.url], conc, inp, outp, 1.0, self.args.prewarm,
                          cpus=daemon.client_cpus, seed=999))

    def stage(self, daemon: Daemon, phase: str, spec: dict[str, Any], n: int,
              ports: list[int]) -> None:
        engine_urls = [f"http://127.0.0.1:{p}" for p in ports[:n]]
        urls: dict[str, list[str]] = {"direct1": engine_urls[:1], "mpsd": [daemon.url],
                                      "client": engine_urls}
        order = list(spec.get("modes", urls))
        for sample in range(spec.get("samples", self.args.samples)):
            for workload in spec.get("workloads", self.args.workloads):
                conc, inp, outp = WORKLOADS[workload]
                for mode in (order if sample % 2 == 0 else order[::-1]):
                    if self.left() < self.run_seconds(workload):
                        self.emit({"kind": "skip", "phase": phase, "stage": n, "mode": mode,
                                   "workload": workload, "sample": sample,
                                   "reason": "deadline"})
                        continue
                    self.seq += 1
                    warmup = self.args.warmup * (0.75 if workload == "W2" else 1)
                    duration = self.args.duration * (0.75 if workload == "W2" else 1)
                    before = _cpu_seconds(daemon.proc.pid) if daemon.proc else 0.0
                    result = run_load(LoadSpec(urls[mode], conc, inp, outp, warmup, duration,
                                               procs=self.args.procs, seed=self.seq,
                                               cpus=daemon.client_cpus))
                    spent = (_cpu_seconds(daemon.proc.pid) if daemon.proc else 0.0) - before
                    # mpsd's own CPU (proxy, supervisor, MPS polling) over the whole run
                    result["mpsd_cpu_cores"] = round(spent / (warmup + duration + 0.5), 3)
                    self.emit({"kind": "run", "phase": phase, "mps": spec["mps"],
                               "cpu": spec["cpu"], "stage": n, "mode": mode,
                               "engines": 1 if mode == "direct1" else n, "workload": workload,
                               "concurrency": conc, "input_len": inp, "output_len": outp,
                               "sample": sample, **result})


# -- summary -----------------------------------------------------------------------------------


def load_rows(paths: list[Path]) -> list[Row]:
    rows: list[Row] = []
    for path in paths:
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                rows.append(json.loads(line))
    return rows


def _metric(workload: str) -> str:
    return "output_tok_per_s" if workload == "W1" else "total_tok_per_s"


def summarize(rows: list[Row]) -> tuple[str, list[Row]]:
    """A markdown report and the table rows (medians per phase, stage, workload, mode)."""
    runs = [r for r in rows if r.get("kind") == "run"]
    groups: dict[tuple[str, int, str, str], list[Row]] = defaultdict(list)
    for r in runs:
        groups[(r["phase"], r["stage"], r["workload"], r["mode"])].append(r)
    table: list[Row] = []
    for (phase, stage, workload, mode), items in sorted(groups.items()):
        metric = _metric(workload)
        values = [float(r[metric]) for r in items]
        table.append({"phase": phase, "stage": stage, "workload": workload, "mode": mode,
                      "engines": items[0]["engines"], "n": len(values),
                      "median": statistics.median(values), "min": min(values),
                      "max": max(values), "metric": metric,
                      "req_per_s": statistics.median(float(r["req_per_s"]) for r in items),
                      "p50": statistics.median(float(r["lat_p50_s"]) for r in items),
                      "p99": statistics.median(float(r["lat_p99_s"]) for r in items),
                      "errors": sum(int(r["errors"]) for r in items),
                      "mpsd_cpu": statistics.median(
                          [float(r.get("mpsd_cpu_cores", 0.0)) for r in items])})
    index = {(t["phase"], t["stage"], t["workload"], t["mode"]): t for t in table}
    lines = ["| phase | N | workload | mode | engines | samples | median tok/s | min-max | "
             "spread | req/s | p50 s | p99 s | errors | mpsd CPU (cores) | vs direct1 | "
             "mpsd / client |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for t in table:
        base = index.get((t["phase"], t["stage"], t["workload"], "direct1"))
        client = index.get((t["phase"], t["stage"], t["workload"], "client"))
        vs1 = f"{t['median'] / base['median']:.2f}x" if base and base["median"] else "-"
        ratio = (f"{t['median'] / client['median']:.3f}"
                 if t["mode"] == "mpsd" and client and client["median"] else "")
        spread = (t["max"] - t["min"]) / t["median"] * 100 if t["median"] else 0
        unit = "out" if t["metric"] == "output_tok_per_s" else "total"
        lines.append(
            f"| {t['phase']} | {t['stage']} | {t['workload']} | {t['mode']} | {t['engines']} | "
            f"{t['n']} | {t['median']:,.0f} {unit} | {t['min']:,.0f}-{t['max']:,.0f} | "
            f"{spread:.1f}% | {t['req_per_s']:.1f} | {t['p50']:.3f} | {t['p99']:.3f} | "
            f"{t['errors']} | {t['mpsd_cpu']:.2f} | {vs1} | {ratio} |")
    paired = _paired_ratios(runs)
    lines += ["", "Paired mpsd / client ratios (same phase, N, workload, sample):", "",
              "| phase | N | workload | ratios | median |", "|---|---|---|---|---|"]
    for (phase, stage, workload), ratios in sorted(paired.items()):
        lines.append(f"| {phase} | {stage} | {workload} | "
                     f"{', '.join(f'{x:.3f}' for x in ratios)} | {statistics.median(ratios):.3f} |")
    starts = [r for r in rows if r.get("kind") == "engine_ready"]
    if starts:
        secs = [float(r["seconds"]) for r in starts]
        lines += ["", f"Engine starts (to ready, through mpsd): {len(secs)}, median "
                  f"{statistics.median(secs):.1f} s, min {min(secs):.1f} s, max {max(secs):.1f} s"]
    skips = [r for r in rows if r.get("kind") in ("skip", "error")]
    if skips:
        lines += ["", "Skipped or failed:", ""]
        lines += [f"- {r['kind']} {r.get('phase')} {r.get('stage', '')} {r.get('mode', '')} "
                  f"{r.get('workload', '')}: {r.get('reason')}" for r in skips]
    return "\n".join(lines) + "\n", table


def _paired_ratios(runs: list[Row]) -> dict[tuple[str, int, str], list[float]]:
    by: dict[tuple[str, int, str, int], dict[str, float]] = defaultdict(dict)
    for r in runs:
        by[(r["phase"], r["stage"], r["workload"], r["sample"])][r["mode"]] = float(
            r[_metric(r["workload"])])
    out: dict[tuple[str, int, str], list[float]] = defaultdict(list)
    for (phase, stage, workload, _), modes in sorted(by.items()):
        if modes.get("mpsd") and modes.get("client"):
            out[(phase, stage, workload)].append(modes["mpsd"] / modes["client"])
    return out


def plot(table: list[Row], dest: Path) -> None:
    import matplotlib  # type: ignore[import-not-found,unused-ignore]  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # type: ignore[import-not-found,unused-ignore]  # noqa: PLC0415

    workloads = sorted({t["workload"] for t in table})
    fig, axes = plt.subplots(1, len(workloads), figsize=(6 * len(workloads), 4.5), squeeze=False)
    styles = {("mps", "mpsd"): ("mpsd, MPS", "o-"), ("mps", "client"): ("client-balanced, MPS",
                                                                        "s--"),
              ("nomps", "mpsd"): ("mpsd, MPS off", "^-"),
              ("nomps", "client"): ("client-balanced, MPS off", "v--"),
              ("nocpu", "mpsd"): ("mpsd, MPS, no CPU placement", "D-"),
              ("nocpu", "client"): ("client-balanced, MPS, no CPU placement", "d--")}
    for ax, workload in zip(axes[0], workloads, strict=True):
        rows = [t for t in table if t["workload"] == workload]
        singles = [t for t in rows if t["mode"] == "direct1"]
        for (phase, mode), (label, style) in styles.items():
            pts = sorted((t["engines"], t["median"], t["min"], t["max"]) for t in rows
                         if t["phase"] == phase and t["mode"] == mode)
            if not pts:
                continue
            base = statistics.median(t["median"] for t in singles if t["phase"] == phase) \
                if any(t["phase"] == phase for t in singles) else None
            xs = ([1] if base else []) + [p[0] for p in pts]
            ys = ([base] if base else []) + [p[1] for p in pts]
            ax.plot(xs, ys, style, label=label)
            ax.vlines([p[0] for p in pts], [p[2] for p in pts], [p[3] for p in pts],
                      colors="grey", linewidth=1)
        conc, inp, outp = WORKLOADS[workload]
        metric = "output tok/s" if workload == "W1" else "total (prompt + output) tok/s"
        ax.set_title(f"{workload}: {inp} in / {outp} out, concurrency {conc}")
        ax.set_xlabel("engines on one GPU (N = 1: one engine, loaded directly)")
        ax.set_ylabel(f"{metric} (median; bars: min-max)")
        ax.set_xticks(sorted({1, *(t["engines"] for t in rows)}))
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(dest, dpi=110)


# -- command line ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run")
    run.add_argument("--out", type=Path, required=True)
    run.add_argument("--deadline", type=float, default=0.0, help="epoch seconds")
    run.add_argument("--stop-margin", type=float, default=45.0,
                     help="seconds kept before the deadline for stopping the last phase")
    run.add_argument("--phases", default="mps,nomps,nocpu")
    run.add_argument("--max-engines", type=int, default=4)
    run.add_argument("--workloads", type=lambda s: s.split(","), default=["W1", "W2"])
    run.add_argument("--samples", type=int, default=3)
    run.add_argument("--warmup", type=float, default=4.0, help="W2 uses 3/4 of it")
    run.add_argument("--duration", type=float, default=12.0, help="W2 uses 3/4 of it")
    run.add_argument("--prewarm", type=float, default=6.0)
    run.add_argument("--procs", type=int, default=4)
    run.add_argument("--gpu-util", type=float, default=0.2)
    run.add_argument("--kv-bytes", type=int, default=8 << 30)
    run.add_argument("--model", type=Path, default=ROOT / ".gpu" / "models" / "qwen2.5-0.5b")
    run.add_argument("--tokenizer", type=Path, default=ROOT / ".gpu" / "models" / "tokenizer")
    run.add_argument("--engine-arg", action="append", default=[])
    run.add_argument("--executable", default="")
    run.add_argument("--control-binary", default="")
    run.add_argument("--fake", action="store_true", help="fake MPS and fake vLLM (CPU dry run)")
    summary = sub.add_parser("summary")
    summary.add_argument("results", type=Path, nargs="+")
    summary.add_argument("--plot", type=Path)
    summary.add_argument("--md", type=Path)
    args = parser.parse_args(argv)

    if args.cmd == "summary":
        text, table = summarize(load_rows(args.results))
        print(text)
        if args.md:
            args.md.write_text(text)
        if args.plot and table:
            try:
                plot(table, args.plot)
            except ImportError as exc:
                print(f"no plot: {exc}", file=sys.stderr)
        return 0
    if args.fake:
        args.control_binary = str(FAKES / "nvidia-cuda-mps-control")
        args.executable = str(FAKES / "fake-vllm")
        args.model = Path(tempfile.mkdtemp(prefix="gb-model-"))
    else:
        args.control_binary = args.control_binary or find_tool("nvidia-cuda-mps-control") or ""
        if not args.executable:
            shim = args.out / "vllm"
            args.out.mkdir(parents=True, exist_ok=True)
            shim.write_text(f"#!{sys.executable}\nimport sys\n"
                            "from vllm.entrypoints.cli.main import main\n"
                            "if __name__ == '__main__':\n    sys.exit(main())\n")
            shim.chmod(0o755)
            args.executable = str(shim)
    experiment = Experiment(args)
    experiment.run()
    text, _ = summarize(load_rows([experiment.results]))
    (args.out / "summary.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
