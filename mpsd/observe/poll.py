"""The slow half of mpsd's metrics: what is read every few seconds, off the request path.

Three sources are sampled on an interval and kept as one immutable :class:`Snapshot` that a
Prometheus collector re-exports at scrape time:

* each MPS group's control daemon (server status, client count) — a subprocess per command;
* NVML (memory, utilisation) — a blocking C library, so it runs on a worker thread;
* each ready engine's own ``/metrics`` — the ``vllm:*`` families, re-labelled with the ``gpu``
  and ``engine`` they came from (served on ``/metrics/engines``), and added up into node-level
  families under the same names (:mod:`mpsd.observe.aggregate`, served on ``/metrics``).
  Both are merged and rendered to exposition text once per round, so a Prometheus scrape only
  appends those bytes instead of formatting thousands of samples.

Parsing, merging and rendering are CPU-bound Python: tens of milliseconds per round for two
vLLM engines. They run **on the event loop in slices** of at most :data:`SLICE_S`
(:func:`run_sliced`), never on a worker thread: a thread running Python holds the GIL, and the
loop that relays every proxied byte then waits up to the interpreter's switch interval (5 ms)
each time it wants to run — the tail latency of every request in flight (issue 21). Sliced, a
request waits for at most one slice. The engines' text is read by a line parser that produces
what ``prometheus_client``'s does, several times faster (:func:`parse_steps`; anything it does
not expect sends the whole text to ``prometheus_client``'s parser instead, a family a step).

Nothing here runs per request, and a failure of any source only leaves its series out of the
next scrape: metrics must never take the daemon down (the poll loop shares its task group).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import aiohttp
import anyio
import anyio.lowlevel
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from mpsd import logs
from mpsd.errors import MpsCommandError
from mpsd.host.nvml import GpuSample
from mpsd.observe.aggregate import NodeAggregator
from mpsd.pool import BackendPool

_log = logs.get("mpsd.metrics")

VLLM_PREFIX = "vllm:"
# Labels mpsd adds to every re-exported engine sample; an engine's own label of the same name
# (vLLM labels everything ``engine="0"``, its engine-core index) is kept under ``vllm_<name>``.
ADDED_LABELS = ("gpu", "engine")
MAX_ENGINE_METRICS_BYTES = 8 * 1024 * 1024
SLICE_S = 0.00025  # what one slice of parsing or rendering may hold the event loop
_RENDER_SAMPLES = 16  # samples rendered per step (generate_latest: ~15-50 µs a sample)

_T = TypeVar("_T")
Steps = Generator[None, None, _T]

# ``mpsd_mps_server_status`` values: a gauge can carry only a number, so the server states of
# ``get_server_status`` map to small integers (0 = no server / daemon down / unknown).
MPS_STATUS_CODES: Mapping[str, int] = {"INITIALIZING": 1, "ACTIVE": 2, "FAULT": 3}
# With several servers on one daemon (rare), the worst state wins: FAULT, then INITIALIZING.
_MPS_SEVERITY = ("FAULT", "INITIALIZING", "ACTIVE")


class MpsLike(Protocol):
    """The part of :class:`mpsd.supervise.mps.MpsDaemon` the poller reads."""

    @property
    def pid(self) -> int | None: ...
    async def server_pids(self) -> list[int]: ...
    async def server_status(self, server: int) -> str: ...
    async def clients(self) -> set[int]: ...


class GroupPlanLike(Protocol):
    @property
    def key(self) -> str: ...
    @property
    def uuid(self) -> str: ...
    @property
    def mps(self) -> bool: ...


class GroupLike(Protocol):
    """The part of :class:`mpsd.supervise.group.GpuGroup` the poller reads."""

    @property
    def plan(self) -> GroupPlanLike: ...
    @property
    def mps(self) -> MpsLike | None: ...


@dataclass(frozen=True)
class MpsReading:
    """One group's MPS daemon as the last round saw it."""

    daemon_up: bool
    status: int  # one of MPS_STATUS_CODES' values, or 0
    clients: int | None  # None when the daemon did not answer


@dataclass(frozen=True)
class Snapshot:
    """Everything one poll round produced; replaced whole, never changed but for the cache of
    :attr:`engine_text`."""

    mps: Mapping[str, MpsReading] = field(default_factory=dict)
    gpus: Mapping[str, GpuSample] = field(default_factory=dict)
    scrape_up: Mapping[tuple[str, str], bool] = field(default_factory=dict)
    engine_families: tuple[Metric, ...] = ()
    node_text: bytes = b""  # their node-level aggregates (aggregate.py) in the text format
    took_s: float = 0.0
    rendered: list[bytes] = field(default_factory=list, repr=False, compare=False)
    asked: list[bool] = field(default_factory=list, repr=False, compare=False)

    @property
    def engine_text(self) -> bytes:
        """``engine_families`` in the text format (``/metrics/engines``): rendered by the poll
        round, in slices, only while someone reads it (else at the first read, whole, then
        by the rounds after it), since few scrape it and a render is a third of a round."""
        if not self.asked:
            self.asked.append(True)
        if not self.rendered:
            self.rendered.append(render_families(self.engine_families))
        return self.rendered[0]


def mps_status_code(statuses: Iterable[str]) -> int:
    """Collapse the status of every server of one daemon into one gauge value."""
    seen = {s.strip().upper() for s in statuses}
    for name in _MPS_SEVERITY:
        if name in seen:
            return MPS_STATUS_CODES[name]
    return 0


def _vllm_lines(text: str) -> str:
    """Only the ``vllm:*`` families (and their HELP/TYPE lines): a third of the parse work."""
    keep = [line for line in text.splitlines()
            if line.startswith(VLLM_PREFIX)
            or line.startswith(("# HELP vllm:", "# TYPE vllm:"))]
    return "\n".join(keep) + "\n"


async def run_sliced(steps: Steps[_T], budget_s: float = SLICE_S) -> _T:
    """Run ``steps`` on the event loop, yielding to it every ``budget_s`` (see module doc)."""
    while True:
        deadline = time.perf_counter() + budget_s
        try:
            while time.perf_counter() < deadline:
                next(steps)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        await anyio.lowlevel.checkpoint()


def run_whole(steps: Steps[_T]) -> _T:
    """Run ``steps`` to the end at once (tests, tools: where holding the loop does not matter)."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]


def parse_engine_metrics(text: str, gpu: str, engine: str) -> list[Metric]:
    """An engine's exposition text → its ``vllm:*`` families with ``gpu``/``engine`` added.

    Names are kept exactly as the engine exposes them (vLLM renames metrics between releases,
    e.g. ``gpu_cache_usage_perc`` → ``kv_cache_usage_perc``; whichever it has is passed on).
    All at once; the poller runs :func:`parse_steps` in slices instead.
    """
    return run_whole(parse_steps(text, gpu, engine))


def parse_steps(text: str, gpu: str, engine: str) -> Steps[list[Metric]]:
    """:func:`parse_engine_metrics` in steps of a few dozen lines or one family."""
    text = _vllm_lines(text)
    families: list[Metric] = []
    try:
        yield from _fast_families(text, families)
    except ValueError:  # a line the fast parser does not read: prometheus_client reads it all
        families = []
        for family in text_string_to_metric_families(text):
            families.append(family)
            yield
    out: list[Metric] = []
    for family in families:
        if family.name.startswith(VLLM_PREFIX):
            out.append(_relabelled(family, gpu, engine))
            yield
    return out


def _relabelled(family: Metric, gpu: str, engine: str) -> Metric:
    relabelled = Metric(family.name, family.documentation, family.type, family.unit)
    for sample in family.samples:
        labels = {(f"vllm_{k}" if k in ADDED_LABELS else k): v for k, v in sample.labels.items()}
        labels["gpu"] = gpu
        labels["engine"] = engine
        relabelled.samples.append(sample._replace(labels=labels))
    return relabelled


# The fast parser reads the plain form of the text format that vLLM (prometheus_client) writes:
# ``name{label="value",...} value``, no escapes, no timestamps. Anything else raises ValueError.
_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_SAMPLE = re.compile(r'([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{((?:[^"}\\]|"[^"\\]*")*)\})?'
                     r"[ \t]+([^ \t]+)")
_LABEL = re.compile(r'[ \t]*([a-zA-Z_][a-zA-Z0-9_]*)[ \t]*=[ \t]*"([^"\\]*)"[ \t]*(?:,|$)')
_SUFFIXES = {"counter": ("",), "gauge": ("",), "summary": ("_count", "_sum", ""),
             "histogram": ("_count", "_sum", "_bucket")}
_LINES_PER_STEP = 48


def _sample(line: str) -> Sample:
    match = _SAMPLE.match(line)
    if match is None or match.end() != len(line):
        raise ValueError(line)
    name, label_text, value = match.groups()
    labels: dict[str, str] = {}
    if label_text:
        pos = 0
        for label in _LABEL.finditer(label_text):
            if label.start() != pos:
                raise ValueError(line)
            labels[label.group(1)] = label.group(2)
            pos = label.end()
        if label_text[pos:].strip() or "__name__" in labels:
            raise ValueError(line)
    if "_" in value:
        raise ValueError(line)
    try:
        number: float = int(value)
    except ValueError:
        number = float(value)
    return Sample(name, labels, number, None)


def _family(name: str, documentation: str, kind: str, samples: list[Sample]) -> Metric:
    """As ``prometheus_client``'s parser builds it (a counter's family name without _total)."""
    if kind == "counter":
        if name.endswith("_total"):
            name = name[:-6]
        else:
            samples = [Sample(s[0] + "_total", *s[1:]) for s in samples]
    metric = Metric(name, documentation, kind)
    metric.samples = samples
    return metric


def _fast_families(text: str, out: list[Metric]) -> Steps[None]:
    """The families of ``text`` into ``out``, grouped exactly as ``prometheus_client``'s
    ``text_string_to_metric_families`` groups them; ValueError for anything unusual."""
    # one loop over the lines, kept whole on purpose: it mirrors the grouping rules of
    # prometheus_client's parser line for line
    name, documentation, kind = "", "", "untyped"
    samples: list[Sample] = []
    allowed: tuple[str, ...] = ()
    for count, raw in enumerate(text.split("\n")):
        if count % _LINES_PER_STEP == 0:
            yield
        line = raw.strip()
        if not line:
            continue
        if line[0] != "#":
            sample = _sample(line)
            if sample.name in allowed:
                samples.append(sample)
                continue
            if name:
                out.append(_family(name, documentation, kind, samples))
            name, documentation, kind, samples, allowed = "", "", "untyped", [], ()
            out.append(_family(sample.name, "", "untyped", [sample]))
            continue
        parts = line.split(None, 3)
        if len(parts) < 3 or parts[1] not in ("HELP", "TYPE"):
            if len(parts) >= 2 and parts[1] in ("HELP", "TYPE"):
                raise ValueError(line)
            continue
        candidate = parts[2]
        if _NAME.fullmatch(candidate) is None:
            raise ValueError(line)
        if candidate != name:
            if name:
                out.append(_family(name, documentation, kind, samples))
            name, samples = candidate, []
            documentation, kind, allowed = "", "untyped", (candidate,)
        if parts[1] == "HELP":
            documentation = parts[3] if len(parts) == 4 else ""
            if "\\" in documentation:
                raise ValueError(line)
        else:
            if len(parts) < 4:
                raise ValueError(line)
            kind = parts[3]
            allowed = tuple(name + suffix for suffix in _SUFFIXES.get(kind, ("",)))
    if name:
        out.append(_family(name, documentation, kind, samples))


def merge_families(per_engine: Iterable[list[Metric]]) -> tuple[Metric, ...]:
    """One family per name across engines (a name may appear once in an exposition).

    An engine whose family has another type than the first engine's (mixed vLLM versions) is
    left out of that family rather than producing an exposition Prometheus would reject.
    """
    merged: dict[str, Metric] = {}
    for families in per_engine:
        for family in families:
            into = merged.get(family.name)
            if into is None:
                into = merged[family.name] = Metric(family.name, family.documentation,
                                                    family.type, family.unit)
            elif into.type != family.type:
                continue
            into.samples.extend(family.samples)
    return tuple(merged.values())


class _Families:
    """A collector that yields fixed families: the engines' merged snapshot."""

    def __init__(self, families: tuple[Metric, ...]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


def render_families(families: tuple[Metric, ...]) -> bytes:
    """Fixed families in the text format."""
    return run_whole(render_steps(families))


def render_steps(families: tuple[Metric, ...]) -> Steps[bytes]:
    """:func:`render_families`, about :data:`_RENDER_SAMPLES` samples a step.

    The text is ``generate_latest``'s, byte for byte (a test holds that), written by
    :func:`_render_family` at a fifth of its cost; a family that one does not write (a type or
    a name it does not expect) goes to ``generate_latest`` itself."""
    parts: list[bytes] = []
    size = 0
    for family in families:
        text = _render_family(family)
        parts.append(text.encode() if text is not None else _render(family))
        size += len(family.samples)
        if size >= _RENDER_SAMPLES:
            size = 0
            yield
    return b"".join(parts)


def _render(family: Metric) -> bytes:
    registry = CollectorRegistry()
    registry.register(_Families((family,)))
    return generate_latest(registry)


_PLAIN_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_PLAIN_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_PLAIN_TYPES = frozenset({"counter", "gauge", "histogram", "summary", "untyped"})
_OM_SUFFIXES = ("_created", "_gsum", "_gcount")
_PLAIN: set[str] = set()  # sample and label names already checked (bounded below)


def _plain(name: str, pattern: re.Pattern[str]) -> bool:
    if name in _PLAIN:
        return True
    if pattern.fullmatch(name) is None:
        return False
    if len(_PLAIN) < 4096:
        _PLAIN.add(name)
    return True


def _render_family(metric: Metric) -> str | None:
    """``generate_latest``'s text for one family of the plain kinds; None for anything else."""
    kind = metric.type
    if kind not in _PLAIN_TYPES or not _plain(metric.name, _PLAIN_NAME):
        return None
    name = metric.name + "_total" if kind == "counter" else metric.name
    doc = metric.documentation.replace("\\", r"\\").replace("\n", r"\n")
    out = [f"# HELP {name} {doc}\n# TYPE {name} {kind}\n"]
    extra: dict[str, list[str]] = {}
    for sample in metric.samples:
        line = _sample_line(sample)
        if line is None:
            return None
        for suffix in _OM_SUFFIXES:
            if sample.name == metric.name + suffix:
                extra.setdefault(suffix, []).append(line)
                break
        else:
            out.append(line)
    for suffix, lines in sorted(extra.items()):
        out.append(f"# HELP {metric.name}{suffix} {doc}\n# TYPE {metric.name}{suffix} gauge\n")
        out.extend(lines)
    return "".join(out)


def _sample_line(sample: Sample) -> str | None:
    if sample.timestamp is not None or not _plain(sample.name, _PLAIN_NAME):
        return None
    value: str = floatToGoString(sample.value)  # type: ignore[no-untyped-call]
    if not sample.labels:
        return f"{sample.name} {value}\n"
    pairs = []
    for key, raw in sorted(sample.labels.items()):
        if not _plain(key, _PLAIN_LABEL):
            return None
        text = raw
        if "\\" in text or "\n" in text or '"' in text:
            text = text.replace("\\", r"\\").replace("\n", r"\n").replace('"', r'\"')
        pairs.append(f'{key}="{text}"')
    return f"{sample.name}{{{','.join(pairs)}}} {value}\n"


def merge_and_render(per_engine: list[list[Metric]], node: NodeAggregator,
                     ) -> tuple[tuple[Metric, ...], bytes, bytes]:
    """Merged families, their exposition text and their node-level aggregates' text, at once
    (one round at a time: ``node`` keeps state); the poller runs the steps in slices."""
    return run_whole(merge_and_render_steps(per_engine, node))


def merge_and_render_steps(per_engine: list[list[Metric]], node: NodeAggregator, *,
                           engines: bool = True,
                           ) -> Steps[tuple[tuple[Metric, ...], bytes, bytes]]:
    """:func:`merge_and_render` in steps; ``engines`` False: the engines' text is not rendered
    (b"")."""
    families = merge_families(per_engine)
    yield
    text = (yield from render_steps(families)) if engines else b""
    aggregated = yield from node.steps(families)
    node_text = yield from render_steps(aggregated)
    return families, text, node_text


async def fetch_metrics(session: aiohttp.ClientSession, url: str, timeout_s: float) -> str:
    """GET an engine's ``/metrics``; bounded in time and size (a sick engine must not stall
    or bloat the poller). Raises ``aiohttp.ClientError``/``TimeoutError``/``ValueError``."""
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with session.get(url, timeout=timeout) as response:
        if response.status != 200:
            raise ValueError(f"HTTP {response.status}")
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.content.iter_chunked(1 << 16):
            size += len(chunk)
            if size > MAX_ENGINE_METRICS_BYTES:
                raise ValueError(f"more than {MAX_ENGINE_METRICS_BYTES} bytes")
            chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", "replace")


class Poller:
    """Builds a :class:`Snapshot` per round and re-exports the latest one as a collector."""

    def __init__(self, pool: BackendPool, sampler: Callable[[str], GpuSample | None],
                 scrape_timeout_s: float) -> None:
        self._pool = pool
        self._sampler = sampler
        self._scrape_timeout_s = scrape_timeout_s
        self.snapshot = Snapshot()
        self.rounds = 0
        self._node = NodeAggregator()

    async def collect_once(self, groups: Iterable[GroupLike],
                           session: aiohttp.ClientSession) -> Snapshot:
        """One round over every source, concurrently; the new snapshot (also kept)."""
        started = time.monotonic()
        groups = list(groups)
        mps: dict[str, MpsReading] = {}
        gpus: dict[str, GpuSample] = {}
        scraped: dict[tuple[str, str], list[Metric] | None] = {}

        async def read_mps(group: GroupLike) -> None:
            reading = await self._read_mps(group)
            if reading is not None:
                mps[group.plan.key] = reading

        async def read_gpus() -> None:
            gpus.update(await anyio.to_thread.run_sync(self._sample_all, groups))

        async def scrape(gpu: str, engine: str, url: str) -> None:
            scraped[(gpu, engine)] = await self._scrape(session, gpu, engine, url)

        async with anyio.create_task_group() as tg:
            tg.start_soon(read_gpus)
            for group in groups:
                tg.start_soon(read_mps, group)
            for backend in self._pool.backends():
                if backend.routable:
                    tg.start_soon(scrape, backend.gpu, backend.key,
                                  backend.base_url.rstrip("/") + "/metrics")
        ok = [families for families in scraped.values() if families is not None]
        wanted = bool(self.snapshot.asked)  # /metrics/engines was read since the last round
        families, text, node_text = await run_sliced(
            merge_and_render_steps(ok, self._node, engines=wanted))
        self.snapshot = Snapshot(
            mps=mps, gpus=gpus, scrape_up={k: v is not None for k, v in scraped.items()},
            engine_families=families, node_text=node_text, took_s=time.monotonic() - started,
            rendered=[text] if wanted else [])
        self.rounds += 1
        return self.snapshot

    def _sample_all(self, groups: list[GroupLike]) -> dict[str, GpuSample]:
        """On a worker thread: NVML can block for seconds on a sick GPU."""
        out: dict[str, GpuSample] = {}
        for group in groups:
            try:
                reading = self._sampler(group.plan.uuid)
            except Exception:  # a broken sample must not cost the other sources their round
                _log.exception("metrics_gpu_sample_failed", gpu=group.plan.key)
                continue
            if reading is not None:  # no NVML (CPU host, CI) or no such GPU: leave it out
                out[group.plan.key] = reading
        return out

    async def _read_mps(self, group: GroupLike) -> MpsReading | None:
        if not group.plan.mps:
            return None
        daemon = group.mps
        if daemon is None or daemon.pid is None:
            return MpsReading(daemon_up=False, status=0, clients=None)
        try:
            servers = await daemon.server_pids()
            statuses = [await daemon.server_status(server) for server in servers]
            clients = len(await daemon.clients()) if servers else 0
        except MpsCommandError as exc:
            _log.debug("metrics_mps_read_failed", gpu=group.plan.key, error=str(exc))
            return MpsReading(daemon_up=daemon.pid is not None, status=0, clients=None)
        return MpsReading(daemon_up=True, status=mps_status_code(statuses), clients=clients)

    async def _scrape(self, session: aiohttp.ClientSession, gpu: str, engine: str,
                      url: str) -> list[Metric] | None:
        try:
            text = await fetch_metrics(session, url, self._scrape_timeout_s)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            _log.debug("metrics_engine_scrape_failed", gpu=gpu, engine=engine,
                       error=str(exc) or type(exc).__name__)
            return None
        try:
            return await run_sliced(parse_steps(text, gpu, engine))
        except Exception as exc:  # the parser raises more than ValueError on odd input
            _log.warning("metrics_engine_parse_failed", gpu=gpu, engine=engine, error=repr(exc))
            return None

    def collect(self) -> Iterator[Metric]:
        """Prometheus collector protocol: the latest MPS/NVML/scrape readings (the engines'
        own families are appended as pre-rendered text, see ``Snapshot.node_text``)."""
        snap = self.snapshot
        daemon_up = GaugeMetricFamily(
            "mpsd_mps_daemon_up", "1 while the group's MPS control daemon process runs.",
            labels=["gpu"])
        status = GaugeMetricFamily(
            "mpsd_mps_server_status",
            "MPS server status: 0 none/unknown, 1 INITIALIZING, 2 ACTIVE, 3 FAULT "
            "(the worst of the daemon's servers).", labels=["gpu"])
        clients = GaugeMetricFamily(
            "mpsd_mps_clients", "Client processes attached to the group's MPS server.",
            labels=["gpu"])
        for gpu, reading in snap.mps.items():
            daemon_up.add_metric([gpu], float(reading.daemon_up))
            status.add_metric([gpu], float(reading.status))
            if reading.clients is not None:
                clients.add_metric([gpu], float(reading.clients))
        used = GaugeMetricFamily("mpsd_gpu_memory_used_bytes", "GPU memory in use (NVML).",
                                 labels=["gpu"])
        total = GaugeMetricFamily("mpsd_gpu_memory_total_bytes", "GPU memory in total (NVML).",
                                  labels=["gpu"])
        util = GaugeMetricFamily(
            "mpsd_gpu_utilization_ratio",
            "Fraction of NVML's last sample period in which a kernel ran (0-1).", labels=["gpu"])
        for gpu, sample in snap.gpus.items():
            used.add_metric([gpu], float(sample.memory_used))
            total.add_metric([gpu], float(sample.memory_total))
            util.add_metric([gpu], sample.utilization)
        up = GaugeMetricFamily(
            "mpsd_engine_scrape_up",
            "1 when the last poll read the ready engine's own /metrics.", labels=["gpu", "engine"])
        for (gpu, engine), ok in snap.scrape_up.items():
            up.add_metric([gpu, engine], float(ok))
        took = GaugeMetricFamily("mpsd_poll_duration_seconds",
                                 "How long the last metrics poll round took.")
        took.add_metric([], snap.took_s)
        yield from (daemon_up, status, clients, used, total, util, up, took)
