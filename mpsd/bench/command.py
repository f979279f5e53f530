"""``mpsd bench``: does this host's mpsd beat one engine, for this model and this traffic?

Against the daemon of the config (or ``--url``), or, with ``--start``, a private one started
from the config for the run and stopped after it. Prints one table per workload; ``--jsonl``
keeps every run, ``--plot`` draws them.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from mpsd.bench import arms, report, workloads
from mpsd.bench.progress import Progress, clock
from mpsd.bench.target import Snapshot, TargetError, Temporary, load_document, snapshot
from mpsd.config import load_config
from mpsd.errors import ConfigError, ExitCode

Row = dict[str, Any]


def add_parser(sub: Any) -> None:
    bench = sub.add_parser("bench", help="measure one engine against all engines through mpsd")
    bench.add_argument("-c", "--config", help="config file (default: $MPSD_CONFIG or "
                       "/etc/mpsd/mpsd.toml): its proxy address, or what --start runs")
    where = bench.add_mutually_exclusive_group()
    where.add_argument("--url", help="a running mpsd's proxy, e.g. http://127.0.0.1:8000")
    where.add_argument("--start", action="store_true", help="start a private mpsd from the "
                       "config for the run (its own ports and directories) and stop it after")
    bench.add_argument("--model", help="served model name (default: the only one served)")
    add_load_arguments(bench)
    bench.add_argument("--arms", default="direct1,mpsd",
                       help="comma list of direct1, mpsd, client (default: direct1,mpsd)")
    bench.add_argument("--jsonl", type=Path, help="write every run as a JSON line here")
    bench.add_argument("--plot", type=Path, help="draw a PNG here (needs mpsd[plot])")
    bench.add_argument("--api-key", default=os.environ.get("MPSD_API_KEY", ""),
                       help="bearer key for mpsd (default: $MPSD_API_KEY)")


def add_load_arguments(parser: argparse.ArgumentParser) -> None:
    """What is sent and for how long: shared by bench and tune."""
    parser.add_argument("--workload", default="",
                        help=f"comma list of built-ins: {', '.join(workloads.BUILTIN)} "
                        "(default: decode,prefill; or give --input-len ...)")
    parser.add_argument("--input-len", type=int, help="your own workload: prompt tokens")
    parser.add_argument("--output-len", type=int, default=128, help="... output tokens")
    parser.add_argument("--concurrency", type=int, default=64, help="... clients")
    parser.add_argument("--stream", action="store_true", help="... streamed")
    parser.add_argument("--rate", type=float, default=0.0,
                        help="... open loop at this many requests/s (default: closed loop)")
    parser.add_argument("--prompts", type=Path, help="... prompts from a JSONL file "
                        "({\"prompt\": ...} or {\"messages\": [...]}, optional max_tokens)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of every arm")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds not counted")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds measured")
    parser.add_argument("--num-requests", type=int, default=0,
                        help="send this many per run instead of a time window")


def chosen_workloads(args: argparse.Namespace) -> tuple[workloads.Workload, ...]:
    """The built-ins named, or the operator's own shape (and prompts file)."""
    own = args.input_len is not None or args.prompts is not None
    if own and args.workload:
        raise ValueError("give --workload or your own (--input-len / --prompts), not both")
    if not own:
        return tuple(workloads.builtin(args.workload or "decode,prefill"))
    shape = workloads.custom(args.input_len or 1, args.output_len, args.concurrency,
                             args.stream, args.rate)
    if args.prompts is None:
        return (shape,)
    try:
        text = args.prompts.read_text()
    except OSError as exc:
        raise ValueError(f"cannot read {args.prompts}: {exc.strerror}") from None
    return (workloads.from_file(shape, workloads.parse_jsonl(text, str(args.prompts),
                                                             args.output_len)),)


def _arms(text: str) -> tuple[str, ...]:
    wanted = tuple(a.strip() for a in text.split(",") if a.strip())
    unknown = [a for a in wanted if a not in arms.ARMS]
    if unknown or not wanted:
        raise ValueError(f"--arms: unknown {', '.join(unknown) or '(none)'}; "
                         f"choose from {', '.join(arms.ARMS)}")
    return wanted


def pick_model(snap: Snapshot, wanted: str | None) -> str:
    models = snap.models()
    if wanted:
        if wanted not in models:
            raise ValueError(f"no ready engine serves {wanted!r}; ready: "
                             f"{', '.join(models) or 'none'}")
        return wanted
    if len(models) != 1:
        raise ValueError(f"give --model: ready engines serve {', '.join(models) or 'nothing'}")
    return models[0]


def _proxy_url(file: str) -> str:
    proxy = load_config(file).proxy
    host = "127.0.0.1" if proxy.host in ("0.0.0.0", "::", "") else proxy.host
    return f"http://{host}:{proxy.port}"


@contextlib.contextmanager
def _target(args: argparse.Namespace, file: str, progress: Progress) -> Iterator[Snapshot]:
    if not args.start:
        yield snapshot(args.url or _proxy_url(file))
        return
    temp = Temporary(load_document(Path(file)), arms.daemon_cores(), log=progress.note)
    progress.note(f"starting a private mpsd from {file} ({temp.planned()} engines)")
    try:
        yield temp.start(timeout=3600)
    finally:
        progress.note("stopping the private mpsd")
        temp.stop()


def run(args: argparse.Namespace, file: str) -> int:
    """The ``bench`` command; the exit code."""
    try:
        chosen = chosen_workloads(args)
        wanted = _arms(args.arms)
    except ValueError as exc:
        print(f"mpsd bench: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    progress = Progress(0.0)
    try:
        with _target(args, file, progress) as snap, report.jsonl_sink(args.jsonl) as sink:
            model = pick_model(snap, args.model)
            cores = arms.loadgen_cores(snap)
            if cores.warning:
                progress.note(f"warning: {cores.warning}")
            plan = arms.Plan(chosen, wanted, args.repeats, args.warmup, args.duration,
                             args.num_requests, cores.procs, cores.cpus, args.api_key)
            progress.planned_left = plan.total_seconds()
            engines = sum(1 for e in snap.engines if e.model == model)
            progress.note(f"{model}: {engines} engines, MPS {'on' if snap.mps else 'off'}; "
                          f"load generator: {cores.procs} processes on cores "
                          f"{_cpus(cores.cpus)}; about {clock(plan.total_seconds())}")
            header: Row = {"kind": "bench", "model": model, "engines": engines, "mps": snap.mps,
                           "loadgen_cpus": list(cores.cpus), "loadgen_warning": cores.warning,
                           "workloads": [w.describe() for w in chosen]}
            _emit(sink, header)
            rows = arms.measure(snap, model, plan, progress, lambda row: _emit(sink, row))
            progress.done()
    except (TargetError, ValueError) as exc:
        progress.done()
        print(f"mpsd bench: {exc}", file=sys.stderr)
        return ExitCode.FAILURE
    except ConfigError as exc:
        print(f"mpsd: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    print(report.table(rows))
    if args.plot:
        try:
            report.plot(rows, args.plot, f"{model}: {engines} engines")
        except ImportError:
            print("mpsd bench: no plot: matplotlib is not installed (pip install 'mpsd[plot]')",
                  file=sys.stderr)
    return ExitCode.OK


def _cpus(cpus: tuple[int, ...]) -> str:
    return ",".join(map(str, cpus)) if len(cpus) <= 8 else f"{cpus[0]}..{cpus[-1]} " \
        f"({len(cpus)})"


def _emit(sink: IO[str] | None, row: Row) -> None:
    if sink is not None:
        report.write_jsonl([row], sink)
