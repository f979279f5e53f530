"""What must hold after every step (once settled) and at the end.

Each check returns the violations it sees now, as sentences. ``settle`` polls them until none
is left or a bound passes: a fault may take seconds to mend (a backoff, a start-up), but a
state that is still wrong at the bound is a finding. The status contract of the supervision
rewrite (group ``state``/``desired``/``observed_generation``, engine ``state``/``reason``) is
checked where the status carries it; without it the group's state and reason explain an engine
that is not ready.
"""

from __future__ import annotations

import time
from typing import Any

from tests.explorer.steps import Check
from tests.explorer.world import Proc, World, alive, model_of
from tests.harness import http

SETTLE_S = 45.0  # a start-up timeout (5 s) and a few backoffs and restarts fit in it
EXPLAINED = frozenset({"failed"})
MOVING = frozenset({"starting", "backoff", "stopping"})


def mpsd_alive(w: World) -> list[str]:
    proc = w.m.proc
    if proc is not None and proc.poll() is not None:
        return [f"mpsd exited {proc.returncode} without being told to stop"]
    return []


def _engine_answers(port: int) -> bool:
    try:
        return http("GET", f"http://127.0.0.1:{port}/health", timeout=2)[0] == 200
    except OSError:
        return False


def _group_explains(group: dict[str, Any]) -> bool:
    return group.get("state") in EXPLAINED and bool(group.get("reason"))


def engines_accounted(w: World, st: dict[str, Any]) -> list[str]:
    """Every engine the config wants is ready (live PID, answering), or its state says why
    not: FAILED with a reason (the engine's or its group's), or its GPU drained."""
    out: list[str] = []
    groups = {g["gpu"]: g for g in st["groups"]}
    for gpu in range(w.gpus):
        group = groups.get(f"gpu{gpu}")
        if group is None:
            out.append(f"gpu{gpu} is missing from /mpsd/status")
            continue
        engines = group["engines"]
        if len(engines) != w.replicas:
            out.append(f"gpu{gpu} lists {len(engines)} engines, the config wants {w.replicas}")
        if "desired" in group and "observed_generation" in group:
            desired = group["desired"] or {}
            if desired.get("generation") != group["observed_generation"]:
                out.append(f"gpu{gpu} has not converged: desired generation "
                           f"{desired.get('generation')}, observed {group['observed_generation']}")
        for e in engines:
            out += _engine_accounted(w, gpu, group, e)
        out += _group_consistent(w, gpu, group)
    return out


def _group_consistent(w: World, gpu: int, group: dict[str, Any]) -> list[str]:
    """The rewrite's contract: DEGRADED iff some engine is FAILED and the group is not, and
    the strategy follows MPS (one_for_all on, one_for_one off)."""
    if "strategy" not in group:
        return []
    out: list[str] = []
    want = "one_for_all" if w.mps == "on" else "one_for_one"
    if group["strategy"] != want:
        out.append(f"gpu{gpu} strategy is {group['strategy']} with MPS {w.mps}")
    failed = [e["key"] for e in group["engines"] if e.get("state") == "failed"]
    state = group.get("state")
    if state == "degraded" and not failed:
        out.append(f"gpu{gpu} is degraded with no FAILED engine")
    if failed and state not in ("degraded", "failed", "stopping", "stopped"):
        out.append(f"gpu{gpu} is {state} while {failed} are FAILED (want degraded)")
    return out


def _engine_accounted(w: World, gpu: int, group: dict[str, Any], e: dict[str, Any]) -> list[str]:
    key, state = e["key"], e.get("state")
    if e["ready"]:
        if not alive(e.get("pid")):
            return [f"{key} is ready in status but its pid {e.get('pid')} is not alive"]
        if not _engine_answers(int(e["port"])):
            return [f"{key} is ready in status but does not answer /health on {e['port']}"]
        if state is not None and state != "ready":
            return [f"{key} is routable but its state is {state}"]
        return []
    if gpu in w.drained:
        return []
    if state == "failed" and e.get("reason"):
        return []
    if state is None and _group_explains(group):
        return []
    if group.get("state") == "failed" and group.get("reason"):
        return []
    return [f"{key} is not ready and nothing says why (group {group.get('state')}: "
            f"{group.get('reason')!r}; engine state {state}: {e.get('reason')!r}; "
            f"pid {e.get('pid')}; proxy: {w.backend(key)})"]


def health_matches(w: World, st: dict[str, Any]) -> list[str]:
    routable = int(st.get("routable", 0))
    code = w.health()
    if routable > 0 and code != 200:
        return [f"/health says {code} while {routable} engines are routable"]
    if routable == 0 and code == 200:
        return ["/health says 200 with no routable engine"]
    return []


def processes_match(w: World, st: dict[str, Any]) -> list[str]:
    """Every process of the work dir is mpsd's (or ours), every engine process is one the
    status names, every EngineCore has its API server, one MPS daemon per GPU at most."""
    out: list[str] = []
    procs = {p.pid: p for p in w.processes()}
    engine_pids = {e["pid"] for g in st["groups"] for e in g["engines"] if e.get("pid")}
    mps_pids = {g["mps"]["pid"] for g in st["groups"] if g.get("mps") and g["mps"].get("pid")}
    for p in procs.values():
        if not w.is_ours(p, procs):
            out.append(f"orphan {p.role} pid {p.pid} (ppid {p.ppid}): {p.cmdline[:100]}")
        elif p.role == "engine" and p.pid not in engine_pids and not _helper_child(w, p, procs):
            out.append(f"engine process {p.pid} is not in /mpsd/status (leaked)")
        elif p.role == "engine-core" and procs.get(p.ppid) is None:
            out.append(f"EngineCore {p.pid} lost its API server (ppid {p.ppid})")
        elif p.role == "mps-daemon" and p.pid not in mps_pids and not _helper_child(w, p, procs):
            out.append(f"MPS daemon {p.pid} is not the one /mpsd/status names {sorted(mps_pids)}")
    return out


def _helper_child(w: World, p: Proc, procs: dict[int, Proc]) -> bool:
    """A process of a second ``mpsd run`` (whose own fate the step checks)."""
    pid = p.ppid
    while pid > 1 and pid in procs:
        if pid in w.helpers:
            return True
        pid = procs[pid].ppid
    return pid in w.helpers


def general(w: World) -> list[str]:
    dead = mpsd_alive(w)
    if dead:
        return dead
    st = w.status()
    if st is None:
        return ["/mpsd/status does not answer"]
    return (engines_accounted(w, st) + verdicts_stay(w, st) + health_matches(w, st)
            + processes_match(w, st))


def verdicts_stay(w: World, st: dict[str, Any]) -> list[str]:
    """What needs an operator stays until the operator acts (``mpsd restart``): a drained GPU
    runs no engine, a GPU failed by a hardware Xid stays FAILED, whatever reloads came."""
    out: list[str] = []
    for g in st["groups"]:
        gpu = int(g["gpu"].removeprefix("gpu"))
        if gpu in w.drained:
            out += [f"drained gpu{gpu}: {e['key']} runs again (pid {e['pid']})"
                    for e in g["engines"] if e.get("pid") or e["ready"]]
        if gpu in w.hardware_failed and g.get("state") != "failed":
            out.append(f"gpu{gpu} failed by a hardware Xid is {g.get('state')} again "
                       f"({g.get('reason')!r}) with no operator's restart")
    return out


def calm_ready_gpus(w: World) -> None:
    """A GPU whose engines all serve again ends its disturbance window."""
    st = w.status()
    if st is None:
        return
    for g in st["groups"]:
        gpu = int(g["gpu"].removeprefix("gpu"))
        if gpu < w.gpus and g["engines"] and all(e["ready"] for e in g["engines"]):
            w.calm(gpu)


def settle(w: World, checks: list[Check], bound: float = SETTLE_S) -> list[str]:
    """Poll the general invariants and ``checks`` until all hold or ``bound`` passes."""
    deadline = time.monotonic() + bound
    while True:
        found = general(w)
        if not found:
            found = [v for check in checks for v in check()]
        if not found:
            calm_ready_gpus(w)
            return []
        if time.monotonic() > deadline or mpsd_alive(w):
            return found
        time.sleep(0.2)


def requests_ok(w: World, seen: dict[int, int]) -> list[str]:
    """Requests that failed while their GPU was not disturbed (reported once each; ``seen``
    counts, per load, those already judged)."""
    out: list[str] = []
    for gpu, loads in w.loads.items():
        sent = [r for load in loads for r in load.sent[seen.get(id(load), 0):]]
        seen.update({id(load): len(load.sent) for load in loads})
        bad = [r for r in sent if not r.ok and not w.was_disturbed(gpu, r.t0, r.t1)
               and (w.stopping_at is None or r.t1 < w.stopping_at)]
        if bad:
            whats = sorted({r.what[:100] for r in bad})[:3]
            out.append(f"{len(bad)} requests to {model_of(gpu)} failed while gpu{gpu} was not "
                       f"disturbed, e.g. {whats}")
    return out


def idle(w: World) -> list[str]:
    """With the load stopped: nothing in flight or queued anywhere."""
    st = w.status()
    if st is None:
        return ["/mpsd/status does not answer"]
    out = [f"{e['key']} still has {e['inflight']} in flight"
           for g in st["groups"] for e in g["engines"] if e.get("inflight")]
    if st.get("inflight"):
        out.append(f"{st['inflight']} requests in flight with no load")
    if st.get("queued"):
        out.append(f"{st['queued']} requests queued with no load")
    return out


def log_clean(w: World) -> list[str]:
    """mpsd's log has no illegal state transition and no crashed group (its own bugs, even
    when it recovered from them)."""
    return [f"log: {e['event']} {({k: v for k, v in e.items() if k in ('gpu', 'from', 'to')})}"
            for name in ("illegal_transition", "group_crashed") for e in w.m.events(name)][:5]
