"""``python -m tests.explorer``: run seeded schedules (or one ``--plan``) and report.

Exit status 0 when every schedule held its invariants, 1 otherwise. ``--findings FILE`` appends
each failing report to FILE as it happens, for reading while a long exploration runs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tests.explorer.run import Schedule, run_schedule
from tests.explorer.steps import Step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.explorer", description=__doc__)
    parser.add_argument("--seed", type=int, default=int(time.time()) % 100000)
    parser.add_argument("--schedules", type=int, default=1, help="seeds seed, seed+1, ...")
    parser.add_argument("--steps", type=int, default=6, help="steps before the final SIGTERM")
    parser.add_argument("--mps", choices=("on", "off", "both"), default="both")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--plan", help="fixed steps instead of a seed: 'kill_leader:gpu0/1,...'")
    parser.add_argument("--findings", type=Path, help="append failing reports to this file")
    args = parser.parse_args(argv)
    modes = ("on", "off") if args.mps == "both" else (args.mps,)
    schedules: list[Schedule] = []
    if args.plan:
        steps = [Step.parse(text) for text in args.plan.split(",") if text.strip()]
        schedules = [Schedule(steps, mps=m, name="plan", replicas=args.replicas) for m in modes]
    else:
        schedules = [Schedule.seeded(args.seed + n, m, args.steps)
                     for n in range(args.schedules) for m in modes]
    failed = 0
    for schedule in schedules:
        report = run_schedule(schedule)
        print(report.text(), flush=True)
        if not report.ok:
            failed += 1
            if args.findings:
                with args.findings.open("a") as out:
                    out.write(f"\n```\n{report.text()}\n```\n")
    print(f"{len(schedules) - failed}/{len(schedules)} schedules held", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
