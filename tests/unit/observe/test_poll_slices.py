"""The engines' metrics are parsed and rendered on the event loop in short slices (issue 21).

A worker thread running Python holds the GIL and so the event loop that relays every request;
the poller therefore parses, aggregates and renders in steps (``parse_steps``,
``merge_and_render_steps``) driven by ``run_sliced``, with a line parser and a renderer of its
own. These tests hold that the fast parser reads exactly what ``prometheus_client``'s parser
reads (hypothesis, hostile text included: escapes, braces in values, timestamps, odd comments,
where it falls back), that the renderer writes ``generate_latest``'s bytes, and that no step
holds the loop for long while a whole round does take a while.
"""

from __future__ import annotations

import asyncio
import gc
import time
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from mpsd.observe.aggregate import NodeAggregator
from mpsd.observe.poll import (
    _Families,
    _fast_families,
    _vllm_lines,
    merge_and_render_steps,
    merge_families,
    parse_engine_metrics,
    parse_steps,
    render_families,
    run_sliced,
    run_whole,
)


def exposition(engines: int = 1, buckets: int = 30) -> str:
    """A vLLM-shaped exposition (gauges, counters with _created, histograms)."""
    out: list[str] = []
    lab = 'engine="0",model_name="m"'
    for name in ("num_requests_running", "kv_cache_usage_perc"):
        out += [f"# HELP vllm:{name} help of {name}", f"# TYPE vllm:{name} gauge",
                f"vllm:{name}{{{lab}}} 3.0"]
    out += ["# HELP vllm:prompt_tokens_total Prompt tokens.",
            "# TYPE vllm:prompt_tokens_total counter", f"vllm:prompt_tokens_total{{{lab}}} 7.0",
            "# HELP vllm:prompt_tokens_created Prompt tokens.",
            "# TYPE vllm:prompt_tokens_created gauge",
            f"vllm:prompt_tokens_created{{{lab}}} 1.7e+09"]
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds"):
        out += [f"# HELP vllm:{name} x", f"# TYPE vllm:{name} histogram"]
        out += [f'vllm:{name}_bucket{{{lab},le="{0.001 * 2 ** i:.6g}"}} {i}.0'
                for i in range(buckets)]
        out += [f'vllm:{name}_bucket{{{lab},le="+Inf"}} 99.0', f"vllm:{name}_count{{{lab}}} 99.0",
                f"vllm:{name}_sum{{{lab}}} 4.5"]
    out += ["# HELP python_gc_objects_collected_total x", "python_gc_objects_collected_total 1"]
    return "\n".join(out) + "\n"


def reference(text: str) -> list[tuple[Any, ...]]:
    return [(f.name, f.type, f.documentation, f.samples)
            for f in text_string_to_metric_families(text)]


def fast(text: str) -> list[tuple[Any, ...]]:
    out: list[Metric] = []
    run_whole(_fast_families(text, out))
    return [(f.name, f.type, f.documentation, f.samples) for f in out]


def rendered(families: tuple[Metric, ...]) -> bytes:
    registry = CollectorRegistry()
    registry.register(_Families(families))
    return generate_latest(registry)


def test_the_fast_parser_reads_what_prometheus_client_reads() -> None:
    text = _vllm_lines(exposition())
    assert fast(text) == reference(text)


names = st.sampled_from(["vllm:a", "vllm:b_total", "vllm:c", "vllm:c_bucket", "vllm:c_count",
                         "vllm:b_created", "vllm:d_sum"])
label_values = st.one_of(st.sampled_from(["0", "m", "a b", "+Inf", "0.5"]),
                         st.text(alphabet='ab"\\}{,=\n ', max_size=6))
values = st.sampled_from(["1", "1.0", "-2.5", "NaN", "+Inf", "-Inf", "1e3", "1_0", "x", "0x1"])


@st.composite
def lines(draw: Any) -> str:
    kind = draw(st.sampled_from(["sample"] * 4 + ["help", "type", "comment", "blank"]))
    name = draw(names)
    if kind == "help":
        return f"# HELP {name} " + draw(st.sampled_from(["doc", "a \\\\ b", "x\\ny", ""]))
    if kind == "type":
        return f"# TYPE {name} " + draw(st.sampled_from(["gauge", "counter", "histogram",
                                                        "summary", "untyped"]))
    if kind == "comment":
        return draw(st.sampled_from(["# just a comment", "#", "# HELP"]))
    if kind == "blank":
        return ""
    labels = draw(st.lists(st.tuples(st.sampled_from(["engine", "le", "model_name", "gpu"]),
                                     label_values), max_size=3, unique_by=lambda x: x[0]))
    text = ",".join(f'{k}="{v}"' for k, v in labels)
    stamp = draw(st.sampled_from(["", "", " 1700000000000"]))
    return f"{name}{{{text}}} {draw(values)}{stamp}" if labels else f"{name} {draw(values)}{stamp}"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(lines(), max_size=12))
def test_parse_steps_agree_with_prometheus_client_on_any_text(text_lines: list[str]) -> None:
    """Whatever the text, the poller's parse gives prometheus_client's families (relabelled),
    or fails where prometheus_client fails."""
    text = "\n".join(text_lines) + "\n"
    try:
        expected = [f for f in text_string_to_metric_families(_vllm_lines(text))
                    if f.name.startswith("vllm:")]
    except Exception:
        expected = None
    try:
        got = parse_engine_metrics(text, "gpu0", "e0")
    except Exception:
        assert expected is None, text
        return
    assert expected is not None, text
    assert [f.name for f in got] == [f.name for f in expected]
    for mine, theirs in zip(got, expected, strict=True):
        assert mine.type == theirs.type and mine.documentation == theirs.documentation
        assert [(s.name, repr(s.value), s.timestamp) for s in mine.samples] == [
            (s.name, repr(s.value), s.timestamp) for s in theirs.samples]


def test_the_renderer_writes_generate_latests_bytes() -> None:
    per_engine = [parse_engine_metrics(exposition(), "gpu0", f"e{i}") for i in range(2)]
    merged = merge_families(per_engine)
    assert render_families(merged) == rendered(merged)
    node = NodeAggregator().families(merged)
    assert render_families(node) == rendered(node)
    odd = Metric("vllm:odd", 'doc with \\ and\nnewline', "gauge")
    odd.add_sample("vllm:odd", {"model_name": 'a"b\\c\nd', "gpu": "0"}, float("nan"))
    info = Metric("vllm:cfg", "info", "info")  # not a plain kind: generate_latest writes it
    info.add_sample("vllm:cfg_info", {"k": "v"}, 1.0)
    assert render_families((odd, info)) == rendered((odd, info))


def test_no_step_holds_the_loop_for_long() -> None:
    """A round for eight engines (vLLM-sized histograms): each step of the parse and of the
    render is short, the round is not (a step is at most a family: its samples of all
    engines; the collector is off while timing, its pauses are not a step's)."""
    text = exposition()
    longest = total = 0.0
    gc.disable()
    try:
        per_engine = []
        for i in range(8):
            parse = parse_steps(text, "gpu0", f"e{i}")
            per_engine.append((yield_from := _timed(parse))[0])
            longest, total = max(longest, yield_from[1]), total + yield_from[2]
        _, most, spent = _timed(merge_and_render_steps(per_engine, NodeAggregator()))
        longest, total = max(longest, most), total + spent
    finally:
        gc.enable()
    assert longest < 0.003 and total > 5 * longest, (longest, total)


def _timed(steps: Any) -> tuple[Any, float, float]:
    """Run ``steps``: its result, its longest step and its total (thread CPU time)."""
    longest = total = 0.0
    while True:
        started = time.thread_time()
        try:
            next(steps)
        except StopIteration as done:
            return done.value, longest, total
        spent = time.thread_time() - started
        longest, total = max(longest, spent), total + spent


def test_run_sliced_lets_the_loop_run_between_slices() -> None:
    async def scenario() -> int:
        ticks = 0
        done = False

        async def ticker() -> None:
            nonlocal ticks
            while not done:
                ticks += 1
                await asyncio.sleep(0)

        task = asyncio.ensure_future(ticker())
        text = exposition(buckets=200)
        per_engine = [await run_sliced(parse_steps(text, "gpu0", f"e{i}")) for i in range(4)]
        await run_sliced(merge_and_render_steps(per_engine, NodeAggregator()))
        done = True
        await task
        return ticks

    assert asyncio.run(scenario()) > 10
