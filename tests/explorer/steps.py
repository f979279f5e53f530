"""The nemesis: every fault and command a schedule can take, and how a seed picks them.

A step names what it does to the world (``kill_leader gpu0/1``) and what it is allowed to
disturb: the GPUs whose requests may fail while it acts and until that GPU serves again. Every
other GPU must not lose a request. Faults that last (a stopped engine, a squatted port, a
read-only directory) hold for the step's ``arg`` seconds: that is the fault, not a wait for
something to happen; everything the explorer waits *for* is polled with a deadline.
"""

from __future__ import annotations

import contextlib
import copy
import os
import random
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tests.explorer.world import (
    STALL_TIMEOUT_S,
    STUCK_TOKENS,
    TOKEN_DELAY_S,
    World,
    alive,
    model_of,
)
from tests.harness import http
from tests.load import engine_core

Check = Callable[[], list[str]]


@dataclass(frozen=True)
class Step:
    """One action of a schedule; ``str()`` and :meth:`parse` round-trip it for ``--plan``."""

    kind: str
    gpu: int = 0
    engine: int = 0
    arg: float = 0.0

    def __str__(self) -> str:
        text = f"{self.kind}:gpu{self.gpu}/{self.engine}"
        return f"{text}@{self.arg:g}" if self.arg else text

    @classmethod
    def parse(cls, text: str) -> Step:
        head, _, arg = text.strip().partition("@")
        kind, _, where = head.partition(":")
        gpu, _, engine = where.removeprefix("gpu").partition("/")
        return cls(kind, int(gpu or 0), int(engine or 0), float(arg or 0))


@dataclass
class Effect:
    """What a step did: GPUs it may disturb, what it saw at once, what must become true."""

    disturbs: set[int] = field(default_factory=set)
    violations: list[str] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    cleanup: list[Callable[[], None]] = field(default_factory=list)
    note: str = ""


def hold(w: World, seconds: float) -> None:
    """Keep a fault in place for ``seconds`` (the fault's length, chosen by the seed), watching
    that mpsd lives meanwhile."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if w.m.proc is not None and w.m.proc.poll() is not None:
            return
        time.sleep(0.05)


# -- helpers ----------------------------------------------------------------------------


def _target(w: World, s: Step) -> dict[str, object] | None:
    return w.engine(s.gpu, s.engine)


def _pid(e: dict[str, object] | None) -> int | None:
    pid = e.get("pid") if e else None
    return pid if isinstance(pid, int) else None


def _kill(pid: int | None, sig: int = signal.SIGKILL) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True


def _siblings_untouched(w: World, s: Step) -> Check:
    """MPS off is one_for_one: a fault of one engine never restarts its siblings."""
    before = {e["key"]: e["pid"] for i, e in enumerate(w.engines(s.gpu))
              if i != s.engine % max(1, w.replicas) and e.get("pid")}

    def check() -> list[str]:
        now = {e["key"]: e["pid"] for e in w.engines(s.gpu)}
        return [f"one_for_one: sibling {key} was restarted or stopped (pid {pid} -> "
                f"{now.get(key)})" for key, pid in before.items() if now.get(key) != pid]
    return check


def _engine_fault(w: World, s: Step, kills: bool = True) -> Effect:
    """A fault of one engine: its GPU disturbed, its siblings untouched with MPS off and, when
    the fault kills it, its process replaced (so that the settle waits for mpsd's reaction,
    not for a moment before it)."""
    effect = Effect(disturbs={s.gpu})
    if w.mps == "off":
        effect.checks.append(_siblings_untouched(w, s))
        e = _target(w, s)
        pid = _pid(e)
        if kills and e is not None and pid is not None:
            effect.checks.append(_replaced(w, {str(e["key"]): pid}, "the killed engine"))
    elif kills:
        effect.checks.append(_gpu_restarted(w, s.gpu))
    return effect


def _gpu_restarted(w: World, gpu: int) -> Check:
    """MPS on is one_for_all: a fault of one engine (or of the GPU's MPS) restarts every
    engine of the GPU (their shared context is poisoned)."""
    pids = {str(e["key"]): pid for e in w.engines(gpu) if (pid := _pid(e)) is not None}
    return _replaced(w, pids, f"one_for_all: gpu{gpu} after a fault")


def _replaced(w: World, pids: dict[str, int], what: str) -> Check:
    """Each engine (key: pid before) runs a new process, or its state says why not (FAILED,
    drained): a check that passes only once mpsd has reacted, not before."""
    def check() -> list[str]:
        st = w.status() or {"groups": []}
        out: list[str] = []
        for g in st["groups"]:
            explained = g.get("state") == "failed" or int(g["gpu"][3:]) in w.drained
            for e in g["engines"]:
                if e["key"] not in pids:
                    continue
                if e.get("pid") == pids[e["key"]]:
                    out.append(f"{what}: {e['key']} still runs pid {e['pid']}")
                elif e.get("pid") is None and not explained and e.get("state") != "failed":
                    out.append(f"{what}: {e['key']} runs nothing yet")
        return out
    return check


def _pids(w: World) -> dict[str, object]:
    st = w.status() or {"groups": []}
    return {e["key"]: e["pid"] for g in st["groups"] for e in g["engines"]}


def _pids_unchanged(w: World, why: str) -> Check:
    before = _pids(w)

    def check() -> list[str]:
        now = _pids(w)
        return [f"{why}: {key} pid {pid} -> {now.get(key)}" for key, pid in before.items()
                if now.get(key) != pid]
    return check


def _ready_keys(w: World) -> set[str]:
    st = w.status() or {"groups": []}
    return {e["key"] for g in st["groups"] for e in g["engines"] if e.get("ready")}


# -- engine faults ----------------------------------------------------------------------


def kill_leader(w: World, s: Step) -> Effect:
    effect = _engine_fault(w, s)
    _kill(_pid(_target(w, s)))
    return effect


def kill_core(w: World, s: Step) -> Effect:
    effect = _engine_fault(w, s)
    leader = _pid(_target(w, s))
    with contextlib.suppress(AssertionError, OSError):
        if leader is not None:
            _kill(engine_core(leader))
    return effect


def stop_cont(w: World, s: Step) -> Effect:
    """SIGSTOP the engine's whole process group for ``arg`` s (a stuck driver call), then
    SIGCONT whatever is left of it."""
    effect = _engine_fault(w, s, kills=False)
    pid = _pid(_target(w, s))
    if pid is None:
        return effect
    try:
        pgid = os.getpgid(pid)
        os.killpg(pgid, signal.SIGSTOP)
    except ProcessLookupError:
        return effect
    hold(w, s.arg)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGCONT)
    return effect


def squat_port(w: World, s: Step) -> Effect:
    """Kill the engine, then bind its port for ``arg`` s before mpsd restarts it."""
    effect = _engine_fault(w, s)
    e = _target(w, s)
    if e is None:
        return effect
    port = int(str(e["port"]))
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    _kill(_pid(e))
    deadline = time.monotonic() + 3.0
    while True:
        try:
            squatter.bind(("127.0.0.1", port))
            squatter.listen(1)
            break
        except OSError:
            if time.monotonic() > deadline:
                effect.note = f"port {port} never came free: squat missed"
                squatter.close()
                return effect
            time.sleep(0.005)
    hold(w, s.arg)
    squatter.close()
    return effect


def _start_fault(fault: str) -> Callable[[World, Step], Effect]:
    def step(w: World, s: Step) -> Effect:
        effect = _engine_fault(w, s)
        e = _target(w, s)
        if e is None:
            return effect
        w.arm_start_fault(int(str(e["port"])), fault.format(n=int(s.arg) or 1))
        effect.cleanup.append(w.disarm_start_faults)
        _kill(_pid(e))
        return effect
    step.__doc__ = f"Arm ``{fault}`` for the next start(s) of the engine, then kill it."
    return step


def canary_500(w: World, s: Step) -> Effect:
    """A running engine answers generation with 500 while /health says 200 (vllm #39863)."""
    effect = _engine_fault(w, s, kills=False)
    e = _target(w, s)
    if e is None:
        return effect
    port = int(str(e["port"]))
    w.m.control(port, "canary_fail")
    hold(w, s.arg)
    if alive(_pid(e)):
        w.m.control(port, "canary_ok")
    return effect


def kill_mps(w: World, s: Step) -> Effect:
    st = w.status() or {"groups": []}
    group = next((g for g in st["groups"] if g["gpu"] == f"gpu{s.gpu}"), None)
    mps = group.get("mps") if group else None
    pid = mps.get("pid") if isinstance(mps, dict) else None
    restarted = _gpu_restarted(w, s.gpu)
    _kill(pid)

    def replaced() -> list[str]:
        st = w.status() or {"groups": []}
        return [f"gpu{s.gpu} names MPS daemon {now} (killed {pid})" for g in st["groups"]
                if g["gpu"] == f"gpu{s.gpu}"
                and (now := (g.get("mps") or {}).get("pid")) in (pid, None)
                and g.get("state") != "failed"]
    return Effect(disturbs={s.gpu}, checks=[replaced, restarted])


def mps_fault(w: World, s: Step) -> Effect:
    effect = Effect(disturbs={s.gpu}, checks=[_gpu_restarted(w, s.gpu)])
    with contextlib.suppress(subprocess.SubprocessError, OSError):
        w.m.mps_command(f"gpu{s.gpu}", "fake_fault")
    return effect


def xid(w: World, s: Step) -> Effect:
    """NVML reports Xid ``arg`` on the GPU: 13 (an application's) recovers its group, 79
    (fallen off the bus) fails it until an operator's ``mpsd restart``."""
    code = int(s.arg) or 13
    effect = Effect(disturbs={s.gpu})
    if w.mps == "on":
        effect.checks.append(_gpu_restarted(w, s.gpu))
    w.xid(s.gpu, code)
    if code == 79:
        w.hardware_failed.add(s.gpu)
    return effect


# -- environment faults -----------------------------------------------------------------


def state_ro(w: World, s: Step) -> Effect:
    """The state directory (and the files in it) read-only for ``arg`` s while an engine of
    ``gpu`` restarts: mpsd's own bookkeeping fails, serving must not."""
    effect = _engine_fault(w, s)
    state = w.workdir / "run"
    files = [state, *(p for p in state.iterdir() if p.is_file())]
    done = subprocess.run(["chattr", "+i", *map(str, files)], capture_output=True, check=False)
    if done.returncode != 0:
        effect.note = "chattr failed: state dir stayed writable"
    _kill(_pid(_target(w, s)))
    hold(w, s.arg)
    subprocess.run(["chattr", "-i", *map(str, files)], capture_output=True, check=False)
    return effect


def close_stdout(w: World, s: Step) -> Effect:
    """mpsd's stdout reader goes away; mpsd must keep serving (and stop cleanly later)."""
    w.close_stdout()
    hold(w, 1.5)  # its debug log writes within this; death shows as "mpsd exited"
    return Effect()


# -- commands ---------------------------------------------------------------------------


def _changed(w: World, gpu: int, startup_timeout_s: float | None = None,
             **env: str) -> dict[str, object]:
    doc = copy.deepcopy(w.doc)
    engine = doc["gpu"][gpu]["engine"][0]
    engine["env"] = {**engine.get("env", {}), **env}
    if startup_timeout_s is not None:
        engine["startup_timeout_s"] = startup_timeout_s
    return doc


def _reload(w: World, via_signal: bool) -> subprocess.CompletedProcess[str] | None:
    if via_signal:
        assert w.m.proc is not None
        w.m.proc.send_signal(signal.SIGHUP)
        return None
    return w.cli("reload", timeout=90)


def _rolled(w: World, gpu: int, what: str) -> Check:
    """Every engine of ``gpu`` runs the new plan (a new process) once a reload that changed it
    is done: a SIGHUP returns at once, so this is how the settle knows it is over."""
    pids = {str(e["key"]): pid for e in w.engines(gpu) if (pid := _pid(e)) is not None}
    return _replaced(w, pids, f"{what} of gpu{gpu}")


def _mps_changed(w: World) -> dict[str, object]:
    doc = copy.deepcopy(w.doc)
    doc["mps"]["env"] = {**doc["mps"]["env"], "EXPLORER_GEN": str(next(_generation))}
    return doc


_generation = iter(range(1, 1 << 30))


def reload_good(w: World, s: Step) -> Effect:
    """A harmless change of one GPU's engines, by ``mpsd reload`` (arg 0) or SIGHUP (arg 1):
    engines roll one at a time, no request may fail."""
    effect = Effect(checks=[_rolled(w, s.gpu, "a good reload")])
    w.doc = _changed(w, s.gpu, EXPLORER_GEN=str(next(_generation)))
    w.write(w.doc)
    out = _reload(w, bool(s.arg))
    if out is not None and out.returncode != 0:
        effect.violations.append(f"good reload exited {out.returncode}: {out.stderr.strip()}")
    return effect


def reload_mps(w: World, s: Step) -> Effect:
    """An ``[mps]`` edit (the daemons' environment): every GPU's MPS daemon is replaced, so
    every GPU may be disturbed, but none that needs an operator comes back."""
    effect = Effect(disturbs=set(range(w.gpus)))
    if w.mps == "on":
        effect.checks += [_rolled(w, g, "an [mps] reload") for g in range(w.gpus)]
    w.doc = _mps_changed(w)
    w.write(w.doc)
    out = _reload(w, bool(s.arg))
    if out is not None and out.returncode != 0:
        effect.violations.append(f"[mps] reload exited {out.returncode}: {out.stderr.strip()}")
    return effect


def _bad_reload(env: dict[str, str],
                startup_timeout_s: float | None = None) -> Callable[[World, Step], Effect]:
    def step(w: World, s: Step) -> Effect:
        before = _ready_keys(w)
        effect = Effect(disturbs={s.gpu} if w.replicas == 1 else set())
        if s.arg >= 2:  # the reload lands while the GPU recovers from a killed engine
            effect.disturbs.add(s.gpu)
            _kill(_pid(_target(w, s)))
        w.write(_changed(w, s.gpu, startup_timeout_s, **env))
        out = _reload(w, int(s.arg) % 2 == 1)
        if out is not None and out.returncode == 0:
            effect.violations.append(f"bad reload exited 0: {out.stdout.strip()} "
                                     f"{out.stderr.strip()}")

        def same_ready() -> list[str]:
            now = _ready_keys(w)
            return [] if now >= before else [
                f"failed reload left fewer ready engines: {sorted(before - now)} not ready"]
        effect.checks.append(same_ready)
        effect.cleanup.append(lambda: _fix(w))
        return effect
    step.__doc__ = (f"A reload whose new engines get {env}; it must roll back and say so. "
                    "``arg``: 0 mpsd reload, 1 SIGHUP, 2 and 3 the same during a recovery.")
    return step


def _fix(w: World) -> None:
    """The operator puts the good config back (the bad one must not linger on disk for the
    next reload to find)."""
    w.write(w.doc)
    w.cli("reload", timeout=90)


def restart(w: World, s: Step) -> Effect:
    effect = Effect(disturbs={s.gpu})
    out = w.cli("restart", f"gpu{s.gpu}")
    if out.returncode != 0:
        effect.violations.append(f"mpsd restart gpu{s.gpu} exited {out.returncode}: "
                                 f"{out.stderr.strip()}")
    w.drained.discard(s.gpu)
    w.hardware_failed.discard(s.gpu)
    return effect


def drain(w: World, s: Step) -> Effect:
    effect = Effect(disturbs={s.gpu})
    out = w.cli("drain", f"gpu{s.gpu}")
    if out.returncode != 0:
        effect.violations.append(f"mpsd drain gpu{s.gpu} exited {out.returncode}: "
                                 f"{out.stderr.strip()}")
    else:
        w.drained.add(s.gpu)
    return effect


def sighup_storm(w: World, s: Step) -> Effect:
    """``arg`` SIGHUPs 20 ms apart with the config unchanged: nothing may restart."""
    effect = Effect(checks=[_pids_unchanged(w, "SIGHUP storm on an unchanged config")])
    assert w.m.proc is not None
    for _ in range(int(s.arg) or 3):
        w.m.proc.send_signal(signal.SIGHUP)
        hold(w, 0.02)
    return effect


def second_run(w: World, s: Step) -> Effect:
    """Another ``mpsd run`` on the same config must refuse at once and touch nothing; with
    ``arg`` 1 it lands while the GPU recovers from a killed engine."""
    if s.arg:
        effect = _engine_fault(w, s)
        _kill(_pid(_target(w, s)))
    else:
        effect = Effect(checks=[_pids_unchanged(w, "a second mpsd run touched engines")])
    proc = w.second_run()
    try:
        code = proc.wait(20)
        if code == 0:
            effect.violations.append("a second mpsd run exited 0")
    except subprocess.TimeoutExpired:
        effect.violations.append("a second mpsd run did not refuse within 20 s")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(20)
    if proc.poll() is not None:
        w.helpers.discard(proc.pid)
    return effect


def race_restart_reload(w: World, s: Step) -> Effect:
    """``mpsd restart gpuN`` and a SIGHUP at the same moment that changes gpuN's engines
    (arg 0) or every GPU's MPS daemon (arg 1: the group itself restarts)."""
    effect = Effect(disturbs=set(range(w.gpus)) if s.arg else {s.gpu},
                    checks=[_rolled(w, s.gpu, "a restart racing a reload")])
    result: list[subprocess.CompletedProcess[str]] = []
    thread = threading.Thread(target=lambda: result.append(w.cli("restart", f"gpu{s.gpu}")))
    thread.start()
    if s.arg:
        w.doc = _mps_changed(w)
    else:
        w.doc = _changed(w, s.gpu, EXPLORER_GEN=str(next(_generation)))
    w.write(w.doc)
    _reload(w, True)
    thread.join(90)
    w.drained.discard(s.gpu)
    w.hardware_failed.discard(s.gpu)
    if result and result[0].returncode != 0:
        effect.note = f"restart during reload exited {result[0].returncode}"
    return effect


def kill_reload(w: World, s: Step) -> Effect:
    """An engine dies and a SIGHUP that changes its GPU (both engines) lands while it
    restarts."""
    effect = Effect(disturbs={s.gpu}, checks=[_rolled(w, s.gpu, "a reload in a restart")])
    _kill(_pid(_target(w, s)))
    w.doc = _changed(w, s.gpu, EXPLORER_GEN=str(next(_generation)))
    w.write(w.doc)
    hold(w, s.arg)
    _reload(w, True)
    return effect


# -- clients ----------------------------------------------------------------------------


def stuck_reader(w: World, s: Step) -> Effect:
    """A client asks for a long stream and reads nothing for ``arg`` s: only its own request
    may suffer."""
    body = (b'{"model": "%s", "prompt": "hi", "max_tokens": %d, "stream": true}'
            % (model_of(s.gpu).encode(), STUCK_TOKENS))
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    effect = Effect(checks=[_pids_unchanged(w, "a client that stopped reading cost a restart")])
    ports = [int(e["port"]) for e in w.engines(s.gpu)]
    w.pause_load(s.gpu)  # the stuck exchange alone on its engine: nothing else sends bytes
    w.control(ports, "slow 0")  # tokens at full speed fill the socket buffers at once
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.connect(("127.0.0.1", w.m.port))
    client.sendall(head + body)
    hold(w, s.arg or STALL_TIMEOUT_S + 2)
    client.close()
    w.control(ports, f"slow {TOKEN_DELAY_S}")
    w.resume_load(s.gpu)
    return effect


def long_answer(w: World, s: Step) -> Effect:
    """A non-streaming answer that takes longer than ``stall_timeout_s``: no hang, no kill."""
    effect = Effect(checks=[_pids_unchanged(w, "a long answer cost a restart")])
    ports = [int(e["port"]) for e in w.engines(s.gpu)]
    w.pause_load(s.gpu)  # alone on an otherwise idle engine, as the issue measured it
    w.control(ports, "slow 0.06")
    code, _, body = http("POST", f"{w.m.url}/v1/completions",
                         {"model": model_of(s.gpu), "prompt": "hi", "max_tokens": 60},
                         timeout=60)
    w.control(ports, f"slow {TOKEN_DELAY_S}")
    w.resume_load(s.gpu)
    if code != 200:
        effect.violations.append(f"a {60 * 0.06:g} s non-streaming answer got {code}: "
                                 f"{body[:160]!r}")
    return effect


STEPS: dict[str, Callable[[World, Step], Effect]] = {
    "kill_leader": kill_leader,
    "kill_core": kill_core,
    "stop_cont": stop_cont,
    "squat_port": squat_port,
    "spawn_fail": _start_fault("fail {n}"),
    "start_hang": _start_fault("hang 1"),
    "canary_start": _start_fault("canary_fail {n}"),
    "canary_500": canary_500,
    "kill_mps": kill_mps,
    "mps_fault": mps_fault,
    "xid": xid,
    "state_ro": state_ro,
    "close_stdout": close_stdout,
    "reload_good": reload_good,
    "reload_mps": reload_mps,
    "reload_crash": _bad_reload({"FAKE_ENGINE_FAIL_START": "1"}),
    "reload_hang": _bad_reload({"FAKE_ENGINE_START_DELAY_S": "3600"}, startup_timeout_s=3),
    "restart": restart,
    "drain": drain,
    "sighup_storm": sighup_storm,
    "second_run": second_run,
    "race_restart_reload": race_restart_reload,
    "kill_reload": kill_reload,
    "stuck_reader": stuck_reader,
    "long_answer": long_answer,
}
MPS_ONLY = frozenset({"kill_mps", "mps_fault"})
ONCE = frozenset({"close_stdout"})  # a pipe closes once
# how often a seed picks each kind: engine faults most, slow steps least
WEIGHTS = {"kill_leader": 4, "kill_core": 4, "stop_cont": 2, "squat_port": 2, "spawn_fail": 2,
           "start_hang": 1, "canary_start": 1, "canary_500": 2, "kill_mps": 2, "mps_fault": 2,
           "xid": 2,
           "state_ro": 1, "close_stdout": 1, "reload_good": 2, "reload_mps": 1, "reload_crash": 1,
           "reload_hang": 1, "restart": 2, "drain": 1, "sighup_storm": 2, "second_run": 1,
           "race_restart_reload": 1, "kill_reload": 1, "stuck_reader": 1, "long_answer": 1}


def generate(seed: int, mps: str, steps: int, gpus: int = 2, replicas: int = 2) -> list[Step]:
    """The schedule a seed means: ``steps`` random steps, then SIGTERM (alone, or landing
    during the last step)."""
    rng = random.Random(seed)
    kinds = [k for k in STEPS if mps == "on" or k not in MPS_ONLY]
    out: list[Step] = []
    used: set[str] = set()
    while len(out) < steps:
        kind = rng.choices(kinds, weights=[WEIGHTS[k] for k in kinds])[0]
        if kind in ONCE and kind in used:
            continue
        used.add(kind)
        arg = {"stop_cont": rng.choice((0.5, 1.5, 3.0)), "squat_port": rng.choice((1.0, 3.0)),
               "spawn_fail": rng.choice((1, 2, 3)), "canary_start": 1,
               "canary_500": rng.choice((1.0, 2.0)), "state_ro": 2.0,
               "reload_good": rng.choice((0, 1)), "reload_crash": rng.choice((0, 1, 2, 3)),
               "reload_hang": rng.choice((0, 1, 2, 3)), "sighup_storm": rng.choice((3, 8)),
               "stuck_reader": rng.choice((3.0, 5.0)),
               "kill_reload": rng.choice((0.0, 0.3)),
               "race_restart_reload": rng.choice((0, 1)), "reload_mps": rng.choice((0, 1)),
               "xid": rng.choice((13, 13, 79)), "second_run": rng.choice((0, 1))}.get(kind, 0)
        out.append(Step(kind, rng.randrange(gpus), rng.randrange(replicas), float(arg)))
    out.append(Step("sigterm", arg=rng.choice((0.0, 0.0, 0.3, 1.0))))
    return out
