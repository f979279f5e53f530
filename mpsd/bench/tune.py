"""``mpsd tune``: find how to run a model on this host's GPU, and write the ``[[gpu]]`` block.

Every setup (engines per GPU, MPS on or off, thread percentage; :mod:`mpsd.bench.search`) runs
in a private mpsd (:class:`~mpsd.bench.target.Temporary`); more engines of the same kind come by
reload, so only the new engine starts cold. Each stage measures one engine direct against all
engines through mpsd, interleaved (:mod:`mpsd.bench.arms`). Engines get a fixed KV cache and a
memory share sized for the workload (:mod:`mpsd.bench.memory`), so the recommended block is
exactly what was measured. A time budget bounds the whole run: a stage that would not fit is
skipped and said so, and the recommendation uses what was measured.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from mpsd.bench import arms, engine_block, report, search
from mpsd.bench.command import add_load_arguments, chosen_workloads
from mpsd.bench.progress import Progress, clock
from mpsd.bench.stats import Gain, gain
from mpsd.bench.target import TargetError, Temporary
from mpsd.bench.workloads import Workload
from mpsd.errors import ConfigError, ExitCode
from mpsd.plan.cpus import cpu_list

Row = dict[str, Any]
#: Until the first engine start is measured: seconds one engine takes to become ready.
FIRST_START_GUESS_S = 90.0


def add_parser(sub: Any) -> None:
    tune = sub.add_parser("tune", help="search engines per GPU, MPS and memory for a model; "
                          "print the [[gpu]] block that measured best")
    tune.add_argument("--model", required=True, help="model path or hub id (or the served name "
                      "of an engine of the base config)")
    tune.add_argument("-c", "--config", help="base config: its [daemon], [proxy], [mps], "
                      "[defaults] and the model's engine (executable, args, env) are kept")
    tune.add_argument("--gpu", default="0", help="device index or UUID (default 0)")
    tune.add_argument("--max-engines", type=int, default=4, help="engines per GPU to try up to")
    tune.add_argument("--time-budget", default="20m", help="e.g. 600s, 20m, 1h (default 20m)")
    tune.add_argument("--mps", default="on,off", help="MPS modes to try (default on,off)")
    tune.add_argument("--threads", default="100",
                      help="active thread percentages to try with MPS (default 100)")
    tune.add_argument("--max-model-len", type=int, help="context to size the KV cache for "
                      "(default: the model's)")
    tune.add_argument("--gpu-memory", help="the GPU's memory, e.g. 80G (default: from NVML)")
    tune.add_argument("--sweep", action="store_true",
                      help="measure every setup, and show what the search alone would pick")
    add_load_arguments(tune)
    tune.add_argument("--out", type=Path, help="write the recommended block here")
    tune.add_argument("--jsonl", type=Path, help="write every run and stage as JSON lines; "
                      "each private mpsd's log (engines' and MPS's output in it) is kept next "
                      "to it")
    tune.add_argument("--plot", type=Path, help="draw gain against engines (needs mpsd[plot])")


def duration(text: str) -> float:
    """``90``, ``90s``, ``20m``, ``1h`` or ``1h30m`` in seconds."""
    match = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s?)?", text.strip())
    if not text.strip() or not match:
        raise ValueError(f"--time-budget {text!r}: write e.g. 600s, 20m or 1h30m")
    hours, minutes, seconds = (int(g or 0) for g in match.groups())
    return hours * 3600 + minutes * 60 + seconds


@dataclass
class Stage:
    """One setup's outcome: its score, or why it has none."""

    setup: search.Setup
    score: search.Score | None
    note: str = ""
    per_workload: dict[str, Gain] = field(default_factory=dict)


class Tuner:
    """Runs setups in private daemons, reusing a running one when a reload gets there."""

    def __init__(self, args: argparse.Namespace, base: dict[str, Any], template: dict[str, Any],
                 chosen: tuple[Workload, ...], progress: Progress, sink: IO[str] | None) -> None:
        self.args = args
        self.base = base
        self.template = template
        self.workloads = chosen
        self.progress = progress
        self.sink = sink
        self.deadline = time.monotonic() + duration(args.time_budget)
        self.temp: Temporary | None = None
        self.current: search.Setup | None = None
        self.start_s: float | None = None  # one engine's cold start, once measured
        self.stages: list[Stage] = []
        self.rows: list[Row] = []  # the stage rows, for the plot
        self.warned = False
        self.engine_cpus = engine_cpu_lists(arms.daemon_cores(), args.max_engines)
        self.plan = arms.Plan(chosen, ("direct1", "mpsd"), args.repeats, args.warmup,
                              args.duration, args.num_requests)

    def emit(self, row: Row) -> None:
        if row.get("kind") == "stage":
            self.rows.append(row)
        if self.sink is not None:
            report.write_jsonl([row], self.sink)

    def document(self, setup: search.Setup) -> dict[str, Any]:
        engine = {**self.template, "replicas": setup.engines,
                  "active_thread_percentage": setup.threads}
        if self.engine_cpus:
            engine["cpu_affinity"] = self.engine_cpus[:setup.engines]
        doc = {k: v for k, v in self.base.items() if k != "gpu"}
        doc["mps"] = {**doc.get("mps", {}), "enabled": "on" if setup.mps else "off"}
        doc["gpu"] = [{"device": self.args.gpu, "engine": [engine]}]
        return doc

    def stage_seconds(self, setup: search.Setup) -> float:
        """Planned seconds of a stage: its measurements plus the engine starts it needs."""
        per_start = self.start_s or FIRST_START_GUESS_S
        reuse = self.current is not None and self.current.mps == setup.mps and \
            self.current.threads == setup.threads and self.current.engines < setup.engines
        starts = setup.engines - self.current.engines if reuse and self.current else \
            setup.engines
        return self.plan.total_seconds() + starts * per_start

    def measure(self, setup: search.Setup) -> search.Score | None:
        need = self.stage_seconds(setup)
        left = self.deadline - time.monotonic()
        if need > left:
            self._skip(setup, f"needs ~{clock(need)}, {clock(max(0.0, left))} of the "
                       "time budget left")
            return None
        try:
            snap = self._bring_up(setup)
            tags = {"engines_setup": setup.engines, "mps": setup.mps, "threads": setup.threads}
            self.progress.note(f"measuring {setup.text()}")
            cores = arms.loadgen_cores(snap)
            if cores.warning and not self.warned:
                self.warned = True
                self.progress.note(f"warning: {cores.warning}")
            plan = replace(self.plan, procs=cores.procs, cpus=cores.cpus)
            rows = arms.measure(snap, self.template["served_model_name"], plan,
                                self.progress, self.emit, tags)
        except (TargetError, ValueError) as exc:
            self._stop()
            self._skip(setup, f"failed: {exc}")
            return None
        per_workload = {w.name: _gain([r for r in rows if r["workload"] == w.name], w.metric)
                        for w in self.workloads}
        score = search.Score(_combined(rows, self.workloads), _throughput(rows, self.workloads))
        self.stages.append(Stage(setup, score, "", per_workload))
        self.emit({"kind": "stage", "setup": setup.text(), "engines": setup.engines,
                   "mps": setup.mps, "threads": setup.threads, "gain": score.gain.median,
                   "gain_low": score.gain.low, "gain_high": score.gain.high,
                   "noise": score.gain.noise, "why": score.gain.why,
                   "throughput": score.throughput})
        self.progress.note(f"{setup.text()}: {score.gain.text()} over one engine")
        return score

    def _skip(self, setup: search.Setup, note: str) -> None:
        self.stages.append(Stage(setup, None, note))
        self.emit({"kind": "stage", "setup": setup.text(), "engines": setup.engines,
                   "mps": setup.mps, "threads": setup.threads, "skipped": note})
        self.progress.note(f"{setup.text()}: skipped, {note}")

    def _bring_up(self, setup: search.Setup) -> Any:
        doc = self.document(setup)
        current = self.current
        t0 = time.monotonic()
        if self.temp is not None and current is not None and current.mps == setup.mps and \
                current.threads == setup.threads and current.engines < setup.engines:
            self.progress.note(f"reload: {current.engines} -> {setup.engines} engines")
            snap = self.temp.reload(doc, timeout=3600)
            added = setup.engines - current.engines
        else:
            self._stop()
            self.progress.note(f"starting a private mpsd: {setup.text()}")
            self.temp = Temporary(doc, arms.daemon_cores(), log=self.progress.note)
            snap = self.temp.start(timeout=3600)
            added = setup.engines
        self.current = setup
        per_engine = (time.monotonic() - t0) / added
        self.start_s = per_engine if self.start_s is None else max(self.start_s, per_engine)
        self.emit({"kind": "start", "setup": setup.text(), "engines_started": added,
                   "seconds": round(time.monotonic() - t0, 1)})
        return snap

    def _stop(self) -> None:
        if self.temp is not None and self.current is not None:
            keep = None
            if self.args.jsonl is not None:
                name = self.current.text().replace(", ", "-").replace(" ", "").replace("%", "")
                keep = self.args.jsonl.with_name(f"{self.args.jsonl.stem}.{name}.mpsd.log")
            self.temp.stop(keep_log=keep)
        elif self.temp is not None:
            self.temp.stop()
        self.temp, self.current = None, None

    def close(self) -> None:
        self._stop()


def engine_cpu_lists(cores: tuple[int, ...], engines: int) -> list[str]:
    """Fixed, disjoint cores for engine 1..``engines``, after one for mpsd's proxy: an engine
    keeps its cores at every stage (the one-engine arm is the same engine on the same cores
    each time), and a reload that adds an engine leaves the others running. Empty when there
    are not enough cores for that (mpsd's own placement then decides)."""
    per = (len(cores) - 1) // engines
    if per < 1:
        return []
    return [cpu_list(cores[1 + i * per:1 + (i + 1) * per]) for i in range(engines)]


def _gain(rows: list[Row], metric: str) -> Gain:
    return gain(report.by_repeat(rows, "mpsd", metric), report.by_repeat(rows, "direct1", metric))


def _combined(rows: list[Row], chosen: tuple[Workload, ...]) -> Gain:
    """One workload: its gain. Several: per repeat, the geometric mean of their paired ratios."""
    if len(chosen) == 1:
        return _gain(rows, chosen[0].metric)
    per_repeat: list[float] = []
    repeats = sorted({int(r["repeat"]) for r in rows})
    for repeat in repeats:
        ratios = []
        for w in chosen:
            mine = [r for r in rows if r["workload"] == w.name and int(r["repeat"]) == repeat]
            arm = [float(r[w.metric]) for r in mine if r["arm"] == "mpsd"]
            base = [float(r[w.metric]) for r in mine if r["arm"] == "direct1"]
            if arm and base and base[0] > 0:
                ratios.append(arm[0] / base[0])
        if ratios:
            per_repeat.append(math.prod(ratios) ** (1 / len(ratios)))
    return gain(per_repeat, [1.0] * len(per_repeat))


def _throughput(rows: list[Row], chosen: tuple[Workload, ...]) -> float:
    values = report.by_repeat([r for r in rows if r["workload"] == chosen[0].name], "mpsd",
                              chosen[0].metric)
    clean = sorted(v for v in values if not math.isnan(v))
    return clean[len(clean) // 2] if clean else math.nan


# -- the model, its engine template and its memory ---------------------------------------------


# -- the command ------------------------------------------------------------------------------


def _modes(text: str) -> list[bool]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    if not modes or any(m not in ("on", "off") for m in modes):
        raise ValueError(f"--mps {text!r}: give on, off or on,off")
    return [m == "on" for m in modes]


def _threads(text: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        values = []
    if not values or any(not 1 <= v <= 100 for v in values):
        raise ValueError(f"--threads {text!r}: give percentages 1-100, e.g. 100,50")
    return values


def _check_engines(limit: int) -> None:
    if limit < 2:
        raise ValueError("--max-engines must be at least 2 (one engine is the baseline)")


def run(args: argparse.Namespace) -> int:
    """The ``tune`` command; the exit code."""
    try:
        chosen = chosen_workloads(argparse.Namespace(**{**vars(args), "workload":
                                                        args.workload or (
                                                            "" if args.input_len or args.prompts
                                                            else "decode")}))
        modes, threads = _modes(args.mps), _threads(args.threads)
        duration(args.time_budget)
        _check_engines(args.max_engines)
        base, template = engine_block.base_template(args)
        limit, memory_text = engine_block.size_engines(args, template, chosen)
    except ValueError as exc:
        print(f"mpsd tune: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    except ConfigError as exc:
        print(f"mpsd: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    progress = Progress(0.0)
    progress.note(f"memory: {memory_text}")
    if limit < args.max_engines:
        progress.note(f"at most {limit} engines fit; trying up to {limit}")
    with report.jsonl_sink(args.jsonl) as sink:
        tuner = Tuner(args, base, template, chosen, progress, sink)
        setups = search.sweep_setups(limit, modes, threads)
        progress.planned_left = sum(tuner.plan.total_seconds() for _ in setups)
        tuner.emit({"kind": "tune", "model": template["model"], "gpu": args.gpu,
                    "memory": memory_text, "workloads": [w.describe() for w in chosen],
                    "sweep": args.sweep, "max_engines": limit, "at": datetime.now(UTC).isoformat()})
        try:
            if args.sweep:
                results: dict[search.Setup, search.Score | None] = {
                    s: tuner.measure(s) for s in setups}
                rec, order = search.replay(results, limit, modes, threads)
            else:
                results = search.search(limit, modes, threads, tuner.measure)
                rec, order = search.recommend(results), list(results)
        finally:
            tuner.close()
            progress.done()
        _report(args, tuner, rec, order, memory_text, chosen, template)
    return ExitCode.OK


def _report(args: argparse.Namespace, tuner: Tuner, rec: search.Recommendation,
            order: list[search.Setup], memory_text: str, chosen: tuple[Workload, ...],
            template: dict[str, Any]) -> None:
    print(f"{'setup':<34} {'gain over one engine':<28} {'throughput':>12}  verdict")
    for stage in tuner.stages:
        if stage.score is None:
            print(f"{stage.setup.text():<34} {'-':<28} {'-':>12}  {stage.note}")
            continue
        g = stage.score.gain
        print(f"{stage.setup.text():<34} {g.text():<28} {stage.score.throughput:>12,.0f}  "
              f"{g.why}")
        if len(stage.per_workload) > 1:  # the combined gain is their geometric mean
            for name, each in stage.per_workload.items():
                print(f"  {name:<32} {each.text():<28} {'':>12}  {each.why}")
    if args.sweep:
        print(f"\nthe search alone would have measured: "
              f"{', '.join(s.text() for s in order) or 'nothing'}")
    header = [f"mpsd tune {datetime.now(UTC):%Y-%m-%d}: {template['served_model_name']} on "
              f"GPU {args.gpu}; workloads: {'; '.join(w.describe() for w in chosen)}",
              f"recommended: {rec.setup.text()}: {rec.reason}", f"memory: {memory_text}"]
    text = engine_block.block(template, args.gpu, rec, header)
    print("\n" + text)
    tuner.emit({"kind": "recommendation", "setup": rec.setup.text(), "engines":
                rec.setup.engines, "mps": rec.setup.mps, "threads": rec.setup.threads,
                "reason": rec.reason, "block": text})
    if args.out:
        args.out.write_text(text)
    if args.plot:
        try:
            plot(tuner.rows, args.plot, template["served_model_name"])
        except ImportError:
            print("mpsd tune: no plot: matplotlib is not installed (pip install 'mpsd[plot]')",
                  file=sys.stderr)


def plot(stages: list[Row], dest: Path, title: str) -> None:
    """Gain over one engine against engines, MPS on and off, from the ``stage`` rows."""
    import matplotlib  # type: ignore[import-not-found,unused-ignore]  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # type: ignore[import-not-found,unused-ignore]  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for mps, style in ((True, "o-"), (False, "s--")):
        pts = sorted((int(r["engines"]), float(r["gain"]), float(r["gain_low"]),
                      float(r["gain_high"])) for r in stages
                     if r.get("kind") == "stage" and "gain" in r and r["mps"] == mps
                     and int(r.get("threads", 100)) == 100)
        if pts:
            ax.errorbar([1] + [p[0] for p in pts], [1.0] + [p[1] for p in pts],
                        yerr=[[0.0] + [p[1] - p[2] for p in pts],
                              [0.0] + [p[3] - p[1] for p in pts]],
                        fmt=style, capsize=3, label=f"MPS {'on' if mps else 'off'}")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xlabel("engines on one GPU")
    ax.set_ylabel("throughput / one engine (median, min-max)")
    ax.set_title(title)
    ax.set_ylim(bottom=0)
    ax.set_xticks(sorted({1, *(int(r["engines"]) for r in stages if r.get("kind") == "stage")}))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(dest, dpi=110)
    plt.close(fig)
