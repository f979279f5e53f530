"""The engine ``mpsd tune`` measures and recommends: taken from the operator's base config,
sized for the GPU and the workload (:mod:`mpsd.bench.memory`), and written back as a ``[[gpu]]``
block that mpsd's own config loader accepts. Apart from the search, so that what is measured and
what is written come from one template.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Any

from mpsd.bench import memory, search, toml_writer
from mpsd.bench.target import load_document
from mpsd.bench.workloads import Workload
from mpsd.config import MAX_TOTAL_MEMORY_SHARE, EngineConfig, parse_config, parse_size


def base_template(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """The base config's sections and the engine template for ``--model``."""
    file = args.config or os.environ.get("MPSD_CONFIG")
    doc = load_document(Path(file)) if file else {}
    engines = [e for g in doc.get("gpu", []) for e in g.get("engine", [])]
    found = next((e for e in engines if args.model in (e.get("model"), e.get(
        "served_model_name"), Path(str(e.get("model"))).name)), None)
    model = args.model
    if Path(model).is_dir():
        model = str(Path(model).resolve())
    template: dict[str, Any] = dict(found) if found else {"model": model}
    for key in ("replicas", "cpu_affinity", "port", "name", "gpu_memory_utilization",
                "pinned_memory_limit"):
        template.pop(key, None)
    template["served_model_name"] = template.get("served_model_name") or \
        Path(str(template["model"])).name
    return {k: v for k, v in doc.items() if k != "gpu"}, template


def _gpu_bytes(args: argparse.Namespace) -> tuple[int | None, str]:
    if args.gpu_memory:
        return parse_size(args.gpu_memory), f"{args.gpu_memory} (--gpu-memory)"
    from mpsd.host import nvml  # noqa: PLC0415 - NVML only where a GPU is looked at

    inventory = nvml.probe_inventory()
    info = inventory.resolve(args.gpu) if inventory else None
    if info is None:
        return None, "no NVML GPU found for --gpu"
    return info.memory_total, f"{info.name}, {info.memory_total / memory.GIB:.0f} GiB"


def size_engines(args: argparse.Namespace, template: dict[str, Any],
                 chosen: tuple[Workload, ...]) -> tuple[int, str]:
    """Set the template's KV cache and memory share; return the engine limit and why."""
    config_json = Path(str(template["model"])) / "config.json"
    gpu_bytes, gpu_text = _gpu_bytes(args)
    cap = MAX_TOTAL_MEMORY_SHARE
    if gpu_bytes is None or not config_json.is_file():
        share = math.floor(cap / args.max_engines * 100) / 100
        template["gpu_memory_utilization"] = share
        why = "no config.json" if gpu_bytes is not None else gpu_text
        return args.max_engines, f"{why}: an even split, {share:.2f} of the GPU per engine"
    shape = memory.shape(json.loads(config_json.read_text()))
    max_len = args.max_model_len or min(shape.max_positions, 32768)
    at_once = max(w.concurrency * max(w.input_len + w.output_len, 1) for w in chosen)
    sized = memory.engine_memory(shape, gpu_bytes, at_once, max_len, cap)
    args_list = _without(list(template.get("args", [])), "--kv-cache-memory-bytes")
    args_list += ["--kv-cache-memory-bytes", str(sized.kv_bytes)]
    if args.max_model_len:
        args_list = [*_without(args_list, "--max-model-len"), "--max-model-len",
                     str(args.max_model_len)]
    template["args"] = args_list
    template["gpu_memory_utilization"] = sized.share
    if sized.fits < 1:
        raise ValueError(f"one engine does not fit {gpu_text}: {sized.text(shape)}")
    return min(args.max_engines, sized.fits), f"{gpu_text}: {sized.text(shape)}"


def _without(argv: list[str], flag: str) -> list[str]:
    out: list[str] = []
    skip = False
    for item in argv:
        if skip:
            skip = False
            continue
        if item == flag:
            skip = True
            continue
        if not item.startswith(f"{flag}="):
            out.append(item)
    return out


def block(template: dict[str, Any], device: str, rec: search.Recommendation,
          header: list[str]) -> str:
    """The recommended ``[[gpu]]`` block, checked by mpsd's own config loader; keys left at
    their defaults are left out, so the block reads like one an operator writes."""
    engine = {**template, "replicas": rec.setup.engines,
              "active_thread_percentage": rec.setup.threads}
    fields = EngineConfig.model_fields
    engine = {k: v for k, v in engine.items()
              if k not in fields or fields[k].is_required() or v != fields[k].get_default(
                  call_default_factory=True)}
    doc: dict[str, Any] = {"gpu": [{"device": device, "engine": [engine]}]}
    parse_config(json.loads(json.dumps(doc)), "<tune>")
    lines = [f"# {line}" for line in header]
    lines.append(f"# needs [mps] enabled = \"{'on' if rec.setup.mps else 'off'}\"")
    return "\n".join(lines) + "\n" + toml_writer.dumps(doc)
