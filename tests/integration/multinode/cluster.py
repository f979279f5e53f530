"""Several ``mpsd run`` nodes on one machine behind a real cluster balancer, and steady load.

A node is an :class:`~tests.harness.Mpsd` with MPS off and its own state directory and ports;
its fake engines tag every response with ``x-fake-engine: node<i>``, so a client can tell which
node served it. :class:`HAProxy` runs the Debian ``haproxy`` binary in the foreground with
active HTTP checks on ``/health``; :class:`Load` keeps a few client threads sending
completions through it and records every outcome. Everything is bounded in time and count and
talks to 127.0.0.1 only.
"""

from __future__ import annotations

import csv
import http.client
import io
import json
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.harness import Mpsd, free_ports, wait_until

HAPROXY = shutil.which("haproxy") or (
    "/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None)
#: HAProxy's active checks: every CHECK_INTER_MS, DOWN after FALL failures, UP after RISE.
CHECK_INTER_MS = 200
FALL = 2
RISE = 2
#: How long a node keeps serving after /health turned 503: longer than FALL checks.
UNREADY_GRACE_S = 1.0
#: Each request streams this many tokens at TOKEN_DELAY_S: ~0.1 s in flight.
MAX_TOKENS = 10
TOKEN_DELAY_S = 0.01


def node(workdir: Path, index: int) -> Mpsd:
    """One node: two GPUs with one engine each, MPS off, tagged ``node<index>``."""
    path = workdir / f"node{index}"
    path.mkdir()
    m = Mpsd(path, gpus=2, replicas=1, mps="off")
    m.engine_env = {"FAKE_ENGINE_NAME": f"node{index}",
                    "FAKE_ENGINE_TOKEN_DELAY_S": str(TOKEN_DELAY_S)}
    m.overrides = {"proxy": {"unready_grace_s": UNREADY_GRACE_S}}
    return m


def start_nodes(nodes: list[Mpsd]) -> None:
    """Start every node, then wait until both GPUs of each run (the nodes load in parallel)."""
    for n in nodes:
        n.start()
    for n in nodes:
        n.wait_state("gpu0", "running")
        n.wait_state("gpu1", "running")


def haproxy_config(port: int, stats_port: int, nodes: list[Mpsd]) -> str:
    """leastconn over the nodes, active checks on /health, L7 retries on another node for
    what a node never processed: refused or reset connections, empty answers, 503."""
    servers = "\n".join(f"  server node{i} 127.0.0.1:{n.port} check" for i, n in enumerate(nodes))
    return f"""\
global
  maxconn 512
defaults
  mode http
  timeout connect 1s
  timeout client 30s
  timeout server 30s
  timeout check 1s
  retries 3
  option redispatch 1
  retry-on conn-failure empty-response 503
frontend llm
  bind 127.0.0.1:{port}
  default_backend mpsd
backend mpsd
  balance leastconn
  option httpchk GET /health
  http-check expect status 200
  default-server inter {CHECK_INTER_MS}ms fall {FALL} rise {RISE}
{servers}
listen stats
  bind 127.0.0.1:{stats_port}
  stats enable
  stats uri /stats
"""


@dataclass
class HAProxy:
    """``haproxy -db`` (foreground) over ``nodes``; :meth:`state` reads its own view."""

    workdir: Path
    nodes: list[Mpsd]
    proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.port, self.stats_port = free_ports(2)

    def start(self) -> HAProxy:
        assert HAPROXY is not None
        config = self.workdir / "haproxy.cfg"
        config.write_text(haproxy_config(self.port, self.stats_port, self.nodes))
        subprocess.run([HAPROXY, "-c", "-q", "-f", str(config)], check=True, timeout=10)
        with (self.workdir / "haproxy.log").open("wb") as log:
            self.proc = subprocess.Popen([HAPROXY, "-db", "-f", str(config)], stdout=log,
                                         stderr=subprocess.STDOUT)
        return self

    def state(self) -> dict[str, str]:
        """Server name → HAProxy's status of it (``UP``, ``DOWN``, ``UP 1/2``, ...); empty
        while HAProxy does not listen yet."""
        conn = http.client.HTTPConnection("127.0.0.1", self.stats_port, timeout=5)
        try:
            conn.request("GET", "/stats;csv")
            text = conn.getresponse().read().decode()
        except OSError:
            return {}
        finally:
            conn.close()
        rows = csv.DictReader(io.StringIO(text.lstrip("# ")))
        return {r["svname"]: r["status"] for r in rows if r["pxname"] == "mpsd"
                and r["svname"] not in ("FRONTEND", "BACKEND")}

    def wait_status(self, server: str, status: str, timeout: float = 20.0) -> float:
        """Until HAProxy shows ``server`` as ``status``; the monotonic time it was seen."""
        wait_until(lambda: self.state().get(server) == status, timeout,
                   f"haproxy: {server} {status}")
        return time.monotonic()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@dataclass(frozen=True)
class Outcome:
    started: float
    ended: float
    code: int  # 0: the connection to HAProxy failed
    node: str  # x-fake-engine of the answer, "" when none


@dataclass
class Load:
    """``clients`` threads sending streamed completions through ``port`` until stopped."""

    port: int
    clients: int = 4
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Load:
        for _ in range(self.clients):
            thread = threading.Thread(target=self._client, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def _client(self) -> None:
        body = json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": MAX_TOKENS,
                           "stream": True}).encode()
        deadline = time.monotonic() + 300  # bounded even if a test forgets to stop it
        while not self._stop.is_set() and time.monotonic() < deadline:
            started = time.monotonic()
            code, node = 0, ""
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            try:
                conn.request("POST", "/v1/completions", body,
                             {"Content-Type": "application/json"})
                response = conn.getresponse()
                data = response.read()
                code, node = response.status, response.getheader("x-fake-engine") or ""
                if code == 200 and not data.rstrip().endswith(b"data: [DONE]"):
                    code = -1  # a stream cut short is a failure too
            except (OSError, http.client.HTTPException):
                pass
            finally:
                conn.close()
            self.outcomes.append(Outcome(started, time.monotonic(), code, node))

    def count(self, since: float = 0.0) -> int:
        return sum(o.started >= since for o in self.outcomes)

    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.code != 200]

    def served_by(self, node: str, since: float = 0.0) -> list[Outcome]:
        return [o for o in self.outcomes if o.node == node and o.started >= since]
