"""The Grafana dashboard for mpsd, built with grafanalib: ``mpsd.json`` is this file's output.

    python deploy/grafana/mpsd_dashboard.py > deploy/grafana/mpsd.json

Never edit mpsd.json by hand: tests/unit/observe/test_grafana_dashboard.py fails when it differs
from what this file builds, and checks every query names only series mpsd exports or the
recording rules of deploy/prometheus record (load those rules: the per-model and per-GPU
panels read them). Rows: the node (readiness, the proxy's CPU, refusals, connections, queue,
time to first byte, event loop lag),
each GPU (state, engines ready, restarts, faults, MPS recovery phases, NVML utilisation and
memory, the CPU-bound diagnosis) and each model (requests/s by code, tokens/s, TTFT and
inter-token latency, running and waiting). A Prometheus datasource variable and instance, GPU
and model variables select what is shown.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from grafanalib._gen import DashboardEncoder
from grafanalib.core import (
    Dashboard,
    GridPos,
    Panel,
    RowPanel,
    Stat,
    Target,
    Template,
    Templating,
    Time,
    TimeSeries,
)

UID = "mpsd-host"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
INSTANCE = 'instance=~"$instance"'
GPU = f'{INSTANCE}, gpu=~"$gpu"'
MODEL = f'{INSTANCE}, model=~"$model"'
MODEL_NAME = f'{INSTANCE}, model_name=~"$model"'
WIDTH = 24  # Grafana's grid is 24 columns wide
HEIGHT = 8


@dataclass(frozen=True)
class Graph:
    """One panel: its title, what it shows and why, its queries as (expr, legend), its unit."""

    title: str
    description: str
    queries: Sequence[tuple[str, str]]
    unit: str = "short"
    stat: bool = False  # the current value as text (a state), not a time series


NODE = [
    Graph("Ready", "mpsd_ready: /health answers 200 (an engine is routable and the node is not "
          "leaving its balancer's rotation).",
          [(f"mpsd_ready{{{INSTANCE}}}", "{{instance}}")], stat=True),
    Graph("Proxy CPU", "mpsd's own process (the proxy and the supervisor): cores used.",
          [(f"rate(process_cpu_seconds_total{{{INSTANCE}}}[$__rate_interval])"
            " * on (instance, job) group_left mpsd_build_info", "{{instance}}")]),
    Graph("Front door refusals", "Requests the proxy refused itself, by reason; client "
          "connections refused over max_client_connections; clients cut for not reading their "
          "answers for send_timeout_s.",
          [(f"sum by (instance, reason) (rate(mpsd_proxy_rejected_requests_total{{{INSTANCE}}}"
            "[$__rate_interval]))", "{{instance}} {{reason}}"),
           (f"sum by (instance) (rate(mpsd_proxy_refused_connections_total{{{INSTANCE}}}"
            "[$__rate_interval]))", "{{instance}} connections refused"),
           (f"sum by (instance) (rate(mpsd_proxy_send_timeouts_total{{{INSTANCE}}}"
            "[$__rate_interval]))", "{{instance}} clients cut, not reading")], "reqps"),
    Graph("Connections, queue, retries", "Client connections open, requests waiting for a free "
          "engine, and retries on another engine per second.",
          [(f"mpsd_proxy_client_connections{{{INSTANCE}}}", "{{instance}} connections"),
           (f"mpsd_proxy_queue_depth{{{INSTANCE}}}", "{{instance}} queued"),
           (f"sum by (instance) (rate(mpsd_proxy_retries_total{{{INSTANCE}}}[$__rate_interval]))",
            "{{instance}} retries/s")]),
    Graph("Queue wait p99", "How long requests waited for a free engine slot, p99 over 5 min.",
          [(f"instance:mpsd_queue_wait_seconds:p99_5m{{{INSTANCE}}}", "{{instance}}")], "s"),
    Graph("Time to first byte p99", "Until the first byte of the engine's answer reached the "
          "proxy, per model, p99 over 5 min (mpsd's own histogram: any engine kind has it).",
          [(f"histogram_quantile(0.99, sum by (instance, model, le) (rate("
            f"mpsd_time_to_first_byte_seconds_bucket{{{INSTANCE}}}[5m])))",
            "{{instance}} {{model}}")], "s"),
    Graph("Event loop lag", "How late mpsd's event loop runs a 20 ms timer: every proxied "
          "request waits as long.",
          [(f"histogram_quantile({q}, sum by (instance, le) (rate("
            f"mpsd_event_loop_lag_seconds_bucket{{{INSTANCE}}}[$__rate_interval])))",
            f"{{{{instance}}}} p{q[2:]}") for q in ("0.50", "0.99")], "s"),
]

PER_GPU = [
    Graph("State", "Each GPU group's state (running, starting, recovering, backoff, degraded, "
          "failed, stopped).", [(f"mpsd_group_state{{{GPU}}} == 1", "{{gpu}}: {{state}}")],
          stat=True),
    Graph("Engines ready", "Routable engines per GPU.",
          [(f"sum by (instance, gpu) (mpsd_engine_ready{{{GPU}}})", "{{instance}} {{gpu}}")]),
    Graph("Restarts and faults", "Group restarts by reason and faults by signal.",
          [(f"sum by (instance, gpu, reason) (increase(mpsd_group_restarts_total{{{GPU}}}"
            "[$__rate_interval]))", "{{gpu}} restart: {{reason}}"),
           (f"sum by (instance, gpu, signal) (increase(mpsd_fault_detected_total{{{GPU}}}"
            "[$__rate_interval]))", "{{gpu}} fault: {{signal}}")]),
    Graph("Recovery time by phase (mean over 1 h)", "mps: kill engines until the MPS server is "
          "ACTIVE again or replaced; engine: start until every engine is ready.",
          [(f"sum by (instance, gpu, phase) (increase(mpsd_recovery_seconds_sum{{{GPU}}}[1h]))"
            f" / sum by (instance, gpu, phase) (increase(mpsd_recovery_seconds_count{{{GPU}}}"
            "[1h]))", "{{gpu}} {{phase}}")], "s"),
    Graph("SM utilisation (NVML)", "Fraction of NVML's sample period in which a kernel ran.",
          [(f"mpsd_gpu_utilization_ratio{{{GPU}}}", "{{instance}} {{gpu}}")], "percentunit"),
    Graph("GPU memory (NVML)", "Memory in use and in total.",
          [(f"mpsd_gpu_memory_used_bytes{{{GPU}}}", "{{gpu}} used"),
           (f"mpsd_gpu_memory_total_bytes{{{GPU}}}", "{{gpu}} total")], "bytes"),
    Graph("Waits for the engines' CPU", "The CPU-bound diagnosis: the share of the last 5 min "
          "in which every engine had a thread wanting a whole core while the GPU idled, and "
          "each engine's busiest thread (1 = a whole core). High: one more engine under MPS, "
          "or vLLM's async scheduling, is likely to pay (mpsd tune measures it).",
          [(f"mpsd_gpu_cpu_bound_ratio{{{GPU}}}", "{{gpu}} waits for CPU"),
           (f"mpsd_engine_busiest_thread_cpu_ratio{{{GPU}}}", "{{engine}} busiest thread")],
          "percentunit"),
    Graph("MPS server status", "0 none, 1 INITIALIZING, 2 ACTIVE, 3 FAULT; and MPS clients.",
          [(f"mpsd_mps_server_status{{{GPU}}}", "{{gpu}} status"),
           (f"mpsd_mps_clients{{{GPU}}}", "{{gpu}} clients")]),
    Graph("Requests/s by code", "Requests through mpsd per GPU (from the engine's key).",
          [(f"sum by (gpu, code) (instance_gpu_code:mpsd_requests:rate1m{{{GPU}}})",
            "{{gpu}} {{code}}")], "reqps"),
    Graph("Output tokens/s", "vLLM's generation tokens of the GPU's engines.",
          [(f"sum by (gpu) (instance_gpu:vllm_generation_tokens:rate1m{{{GPU}}})", "{{gpu}}")]),
    Graph("In flight", "Requests in flight through mpsd to the GPU's engines.",
          [(f"sum by (gpu) (instance_gpu:mpsd_engine_inflight:sum{{{GPU}}})", "{{gpu}}")]),
    Graph("TTFT and inter-token latency p99", "vLLM's histograms over 5 min, per GPU.",
          [(f"instance_gpu:vllm_time_to_first_token_seconds:p99_5m{{{GPU}}}", "{{gpu}} TTFT"),
           (f"instance_gpu:vllm_inter_token_latency_seconds:p99_5m{{{GPU}}}", "{{gpu}} ITL")],
          "s"),
]

PER_MODEL = [
    Graph("Requests/s by code", "Requests through mpsd per model and status code.",
          [(f"sum by (model, code) (instance_model_code:mpsd_requests:rate1m{{{MODEL}}})",
            "{{model}} {{code}}")], "reqps"),
    Graph("Tokens/s", "vLLM's prompt and output tokens per model.",
          [(f"sum by (model_name) (instance_model:vllm_generation_tokens:rate1m{{{MODEL_NAME}}})",
            "{{model_name}} output"),
           (f"sum by (model_name) (instance_model:vllm_prompt_tokens:rate1m{{{MODEL_NAME}}})",
            "{{model_name}} prompt")]),
    Graph("Time to first token", "vLLM's histogram, p50 and p99 over 5 min.",
          [(f"instance_model:vllm_time_to_first_token_seconds:p50_5m{{{MODEL_NAME}}}",
            "{{instance}} {{model_name}} p50"),
           (f"instance_model:vllm_time_to_first_token_seconds:p99_5m{{{MODEL_NAME}}}",
            "{{instance}} {{model_name}} p99")], "s"),
    Graph("Inter-token latency", "vLLM's histogram, p50 and p99 over 5 min.",
          [(f"instance_model:vllm_inter_token_latency_seconds:p50_5m{{{MODEL_NAME}}}",
            "{{instance}} {{model_name}} p50"),
           (f"instance_model:vllm_inter_token_latency_seconds:p99_5m{{{MODEL_NAME}}}",
            "{{instance}} {{model_name}} p99")], "s"),
    Graph("Running and waiting", "Requests in the engines' batches and waiting in them.",
          [(f"sum by (model_name) (instance_model:vllm_num_requests_running:sum{{{MODEL_NAME}}})",
            "{{model_name}} running"),
           (f"sum by (model_name) (instance_model:vllm_num_requests_waiting:sum{{{MODEL_NAME}}})",
            "{{model_name}} waiting")]),
    Graph("Ready engines", "Routable engines per model; 0 means its requests get 503 here.",
          [(f"sum by (model) (instance_model:mpsd_ready_engines:sum{{{MODEL}}})", "{{model}}")]),
]

ROWS = [("Node", NODE), ("Per GPU", PER_GPU), ("Per model", PER_MODEL)]


def panel(graph: Graph, grid: GridPos) -> Panel:
    targets = [Target(expr=expr, legendFormat=legend, refId=chr(ord("A") + i),
                      datasource=DATASOURCE) for i, (expr, legend) in enumerate(graph.queries)]
    if graph.stat:
        return Stat(title=graph.title, description=graph.description, dataSource=DATASOURCE,
                    targets=targets, gridPos=grid, textMode="name", graphMode="none",
                    reduceCalc="lastNotNull")
    return TimeSeries(title=graph.title, description=graph.description, dataSource=DATASOURCE,
                      targets=targets, gridPos=grid, unit=graph.unit)


def panels() -> Iterator[Panel]:
    """Rows of panels, three panels (8 columns) a line."""
    y = 0
    for title, graphs in ROWS:
        yield RowPanel(title=title, gridPos=GridPos(h=1, w=WIDTH, x=0, y=y))
        y += 1
        for i, graph in enumerate(graphs):
            yield panel(graph, GridPos(h=HEIGHT, w=WIDTH // 3, x=(i % 3) * (WIDTH // 3),
                                       y=y + (i // 3) * HEIGHT))
        y += -(-len(graphs) // 3) * HEIGHT


def variable(name: str, label: str, query: str) -> Template:
    return Template(name=name, label=label, dataSource=DATASOURCE, query=query, type="query",
                    includeAll=True, multi=True, allValue=".+", refresh=2, sort=1,
                    default="$__all")


def dashboard() -> Dashboard:
    templates = [
        Template(name="datasource", label="Prometheus", query="prometheus", type="datasource",
                 default="Prometheus"),
        variable("instance", "Host", "label_values(mpsd_build_info, instance)"),
        variable("gpu", "GPU", 'label_values(mpsd_group_state{instance=~"$instance"}, gpu)'),
        variable("model", "Model",
                 'label_values(mpsd_model_ready_engines{instance=~"$instance"}, model)'),
    ]
    return Dashboard(
        title="mpsd", uid=UID, tags=["mpsd", "vllm", "gpu"], timezone="browser",
        description="mpsd hosts: the node, each GPU and each model (deploy/grafana/"
                    "mpsd_dashboard.py builds it; docs/operations.md describes each row).",
        refresh="30s", time=Time("now-3h", "now"), templating=Templating(list=templates),
        panels=list(panels())).auto_panel_ids()


def render() -> str:
    """The dashboard's JSON, as committed in mpsd.json."""
    return json.dumps(dashboard().to_json_data(), cls=DashboardEncoder, indent=2,
                      sort_keys=True) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
