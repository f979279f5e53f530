#!/usr/bin/env python3
"""``mpsd tune`` for several models on a GPU host, one model per GPU at a time, in parallel.

::

    benchmarks/tune_gpu.py run --out DIR --models DIR1,DIR2 [--gpus 0,1] [--budget 9m]
                               [--tokenizer DIR] [-- more mpsd tune arguments]
    benchmarks/tune_gpu.py summary DIR [--plots DIR] [--md FILE]

``run`` writes a base config per model (real vLLM from ``PYTHONPATH``, random weights with
``--load-format dummy``, the real ``nvidia-cuda-mps-control``) and runs ``mpsd tune --sweep``
on its own GPU and its own share of the host's cores (``taskset``), so that parallel tunes do
not share cores: each tune's engines, mpsd and load generator stay inside that share.
Results per model: ``<name>.jsonl`` (every run and stage), ``<name>.toml`` (the recommended
block), ``<name>.log`` (what tune printed). ``summary`` turns them into a markdown table and a
plot per model (mpsd[plot]).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mpsd.bench import toml_writer  # noqa: E402
from mpsd.bench.tune import plot  # noqa: E402

VLLM_ENV = {"VLLM_USE_FLASHINFER_SAMPLER": "0", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
            "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}


def _control_binary() -> str:
    found = shutil.which("nvidia-cuda-mps-control")
    for candidate in (found, "/usr/local/nvidia/bin/nvidia-cuda-mps-control",
                      "/usr/bin/nvidia-cuda-mps-control"):
        if candidate and Path(candidate).is_file():
            return candidate
    raise SystemExit("nvidia-cuda-mps-control not found")


def _base(out: Path, model: Path, tokenizer: Path, shim: Path) -> Path:
    doc: dict[str, Any] = {
        "daemon": {"log_format": "json", "metrics_interval_s": 10.0},
        "proxy": {"drain_timeout_s": 10.0, "unready_grace_s": 0.0},
        "mps": {"control_binary": _control_binary()},
        "defaults": {"executable": str(shim), "startup_timeout_s": 600, "stop_timeout_s": 20},
        "gpu": [{"device": "0", "engine": [{
            "model": str(model), "served_model_name": model.name,
            "args": ["--tokenizer", str(tokenizer), "--load-format", "dummy"],
            "env": {**VLLM_ENV, "PYTHONPATH": os.environ.get("PYTHONPATH", "")}}]}],
    }
    path = out / f"{model.name}.base.toml"
    path.write_text(toml_writer.dumps(doc))
    return path


def run(args: argparse.Namespace, extra: list[str]) -> int:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    shim = out / "vllm"
    shim.write_text(f"#!{sys.executable}\nimport sys\nfrom vllm.entrypoints.cli.main import main\n"
                    "if __name__ == '__main__':\n    sys.exit(main())\n")
    shim.chmod(0o755)
    models = [Path(m) for m in args.models.split(",")]
    gpus = args.gpus.split(",")
    cores = sorted(os.sched_getaffinity(0))
    per = len(cores) // len(models)
    procs = []
    for i, model in enumerate(models):
        share = cores[i * per:(i + 1) * per]
        base = _base(out, model, args.tokenizer, shim)
        argv = ["taskset", "-c", ",".join(map(str, share)), sys.executable, "-m", "mpsd", "tune",
                "-c", str(base), "--model", str(model), "--gpu", gpus[i % len(gpus)],
                "--sweep", "--time-budget", args.budget, "--jsonl",
                str(out / f"{model.name}.jsonl"), "--out", str(out / f"{model.name}.toml"),
                *extra]
        log = (out / f"{model.name}.log").open("w")
        procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT))
    return max(p.wait() for p in procs)


def summary(args: argparse.Namespace) -> int:
    lines = ["| model | setup | gain over one engine (median, min-max) | verdict | "
             "throughput (tok/s) |", "|---|---|---|---|---|"]
    for path in sorted(args.dir.glob("*.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        stages = [r for r in rows if r.get("kind") == "stage"]
        rec = next((r for r in rows if r.get("kind") == "recommendation"), None)
        for r in stages:
            if "gain" in r:
                lines.append(f"| {path.stem} | {r['setup']} | {r['gain']:.2f} "
                             f"({r['gain_low']:.2f}-{r['gain_high']:.2f}) | {r['why']} | "
                             f"{r['throughput']:,.0f} |")
            else:
                lines.append(f"| {path.stem} | {r['setup']} | - | {r['skipped']} | - |")
        if rec:
            lines.append(f"| {path.stem} | **recommended: {rec['setup']}** | | {rec['reason']} "
                         "| |")
        if args.plots and stages:
            args.plots.mkdir(parents=True, exist_ok=True)
            plot(stages, args.plots / f"tune-{path.stem}.png", path.stem)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.md:
        args.md.write_text(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        extra = argv[argv.index("--") + 1:]
        argv = argv[:argv.index("--")]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--models", required=True, help="comma list of model directories")
    r.add_argument("--gpus", default="0", help="comma list; model i runs on GPU i mod len")
    r.add_argument("--budget", default="9m")
    r.add_argument("--tokenizer", type=Path, required=True)
    s = sub.add_parser("summary")
    s.add_argument("dir", type=Path)
    s.add_argument("--plots", type=Path)
    s.add_argument("--md", type=Path)
    args = parser.parse_args(argv)
    return run(args, extra) if args.cmd == "run" else summary(args)


if __name__ == "__main__":
    sys.exit(main())
