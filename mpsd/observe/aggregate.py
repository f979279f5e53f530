"""The node as one vLLM-like endpoint: the engines' ``vllm:*`` families added up per node.

LLM-aware schedulers (the Gateway API Inference Extension's endpoint picker, llm-d, vllm-router)
scrape an endpoint's ``/metrics`` and read vLLM's own names — ``vllm:num_requests_waiting``,
``vllm:num_requests_running``, ``vllm:kv_cache_usage_perc`` — expecting one series per model,
not one per engine behind it. So the proxy's ``/metrics`` carries these aggregates, under the
same names and with every label but mpsd's ``gpu``/``engine`` (and vLLM's own engine index,
kept as ``vllm_engine``) left as the engine had it; the per-engine series move to
``/metrics/engines``. A Prometheus ``sum()`` over nodes then counts each request once.

How a family is combined:

* counters and histograms (buckets, ``_count``, ``_sum``): summed — a node's tokens and
  requests are its engines' tokens and requests. An engine that restarts or is not scraped
  makes the sum drop, which Prometheus reads as a counter reset (per-engine rates:
  ``/metrics/engines``);
* gauges: summed (requests running, waiting, swapped), except fractions — names ending in
  ``_perc``, ``_ratio`` or ``_rate`` (KV-cache usage, hit rates) — which are averaged over the
  engines that report them, and ``*_info`` families, whose value is always 1 and whose label
  sets are kept once each.

Pure functions over parsed families: the poller runs them on a worker thread once per round.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Sample

#: Labels that tell engines apart: what the node-level series must not carry.
ENGINE_LABELS = frozenset({"gpu", "engine", "vllm_engine"})
_FRACTION_SUFFIXES = ("_perc", "_ratio", "_rate")

_Key = tuple[str, tuple[tuple[str, str], ...]]


def combine_mode(family: Metric) -> str:
    """``sum``, ``mean`` or ``one`` (info families) for a family of the given name and type."""
    if family.type == "info" or family.name.endswith("_info"):
        return "one"
    if family.type == "gauge" and family.name.endswith(_FRACTION_SUFFIXES):
        return "mean"
    return "sum"


def node_families(merged: Iterable[Metric]) -> tuple[Metric, ...]:
    """One node-level family per merged (per-engine) family, without engine labels."""
    return tuple(_combine(family) for family in merged)


def _combine(family: Metric) -> Metric:
    mode = combine_mode(family)
    totals: dict[_Key, float] = {}
    counts: dict[_Key, int] = {}
    for sample in family.samples:
        if sample.name.endswith("_created"):
            continue  # a creation time: no sum of those means anything
        labels = tuple(sorted((k, v) for k, v in sample.labels.items()
                              if k not in ENGINE_LABELS))
        key = (sample.name, labels)
        if mode == "one":
            totals[key] = sample.value
        else:
            totals[key] = totals.get(key, 0.0) + sample.value
        counts[key] = counts.get(key, 0) + 1
    out = Metric(family.name, family.documentation, family.type, family.unit)
    for (name, labels), total in totals.items():
        value = total / counts[(name, labels)] if mode == "mean" else total
        out.samples.append(Sample(name, dict(labels), value))
    return out
