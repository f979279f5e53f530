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
  requests are its engines' tokens and requests — and kept monotonic, as Prometheus requires
  of a counter: an engine that restarts (its counters start again at 0) adds its previous
  total to an offset, and one that is not scraped in a round (stopped, restarting, timed out)
  counts with its last value, so a node counter never goes down and ``rate()`` stays right;
* gauges: summed (requests running, waiting, swapped), except fractions — names ending in
  ``_perc``, ``_ratio`` or ``_rate`` (KV-cache usage, hit rates) — which are averaged over the
  engines that report them, and ``*_info`` families, whose value is always 1 and whose label
  sets are kept once each.

:class:`NodeAggregator` keeps that memory between rounds; the poller runs it on the event loop,
one round at a time, in steps that yield between families (:meth:`NodeAggregator.steps`).
"""

from __future__ import annotations

from collections.abc import Generator, Iterable

from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Sample

#: Labels that tell engines apart: what the node-level series must not carry.
ENGINE_LABELS = frozenset({"gpu", "engine", "vllm_engine"})
_FRACTION_SUFFIXES = ("_perc", "_ratio", "_rate")

_Key = tuple[str, tuple[tuple[str, str], ...]]


_MONOTONIC_TYPES = frozenset({"counter", "histogram", "summary"})


def combine_mode(family: Metric) -> str:
    """``monotonic`` (counters, histograms), ``sum``, ``mean`` or ``one`` (info families)."""
    if family.type == "info" or family.name.endswith("_info"):
        return "one"
    if family.type in _MONOTONIC_TYPES:
        return "monotonic"
    if family.type == "gauge" and family.name.endswith(_FRACTION_SUFFIXES):
        return "mean"
    return "sum"


class _Counter:
    """One engine's sample of a monotonic family: its last value and its resets so far."""

    __slots__ = ("last", "offset")

    def __init__(self, value: float) -> None:
        self.last, self.offset = value, 0.0

    def see(self, value: float) -> None:
        if value < self.last:  # the engine started again from 0
            self.offset += self.last
        self.last = value


class NodeAggregator:
    """The engines' merged families → node-level families (see the module doc)."""

    def __init__(self) -> None:
        # monotonic families: name → a template (help, type, unit) and (engine, sample) state
        self._templates: dict[str, Metric] = {}
        self._counters: dict[str, dict[tuple[str, _Key], _Counter]] = {}

    def families(self, merged: Iterable[Metric]) -> tuple[Metric, ...]:
        """One node-level family per family any engine ever had a counter in, or has now."""
        steps = self.steps(merged)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]

    def steps(self, merged: Iterable[Metric]) -> Generator[None, None, tuple[Metric, ...]]:
        """:meth:`families` one family per step (a caller on the event loop yields between)."""
        out: dict[str, Metric] = {}
        for family in merged:
            mode = combine_mode(family)
            if mode == "monotonic":
                self._remember(family)
            else:
                out[family.name] = _combine(family, mode)
            yield
        for name in self._counters:
            out[name] = self._monotonic(name)
            yield
        return tuple(out.values())

    def _remember(self, family: Metric) -> None:
        self._templates[family.name] = family
        counters = self._counters.setdefault(family.name, {})
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            key = (sample.labels.get("engine", ""), _node_key(sample))
            counter = counters.get(key)
            if counter is None:
                counters[key] = _Counter(sample.value)
            else:
                counter.see(sample.value)

    def _monotonic(self, name: str) -> Metric:
        template = self._templates[name]
        totals: dict[_Key, float] = {}
        for (_, key), counter in self._counters[name].items():
            totals[key] = totals.get(key, 0.0) + counter.offset + counter.last
        return _family(template, totals)


def _node_key(sample: Sample) -> _Key:
    return sample.name, tuple(sorted((k, v) for k, v in sample.labels.items()
                                     if k not in ENGINE_LABELS))


def _family(template: Metric, values: dict[_Key, float]) -> Metric:
    out = Metric(template.name, template.documentation, template.type, template.unit)
    for (name, labels), value in values.items():
        out.samples.append(Sample(name, dict(labels), value))
    return out


def _combine(family: Metric, mode: str) -> Metric:
    """A gauge family across engines: summed, averaged, or (info) each label set once."""
    totals: dict[_Key, float] = {}
    counts: dict[_Key, int] = {}
    for sample in family.samples:
        if sample.name.endswith("_created"):
            continue  # a creation time: no sum of those means anything
        key = _node_key(sample)
        totals[key] = sample.value if mode == "one" else totals.get(key, 0.0) + sample.value
        counts[key] = counts.get(key, 0) + 1
    if mode == "mean":
        totals = {key: total / counts[key] for key, total in totals.items()}
    return _family(family, totals)
