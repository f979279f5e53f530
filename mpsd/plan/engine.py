"""One engine's command line, environment and memory share, derived from its config.

Pure functions: the plan builder calls them per replica, and the MPS daemon reuses the
environment allow-list for its own child.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping
from pathlib import Path

from mpsd.config import EngineConfig, parse_size

# Environment an engine inherits from mpsd; everything else is dropped (docs/architecture.md §2).
_INHERITED_ENV = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "TZ", "TMPDIR", "TERM")


_INHERITED_PREFIXES = ("LC_",)



def memory_share(engine: EngineConfig, physical_bytes: int | None) -> float | None:
    """``--gpu-memory-utilization`` for one replica.

    Under a pinned limit CUDA reports ``free <= limit`` but ``total = physical``, and vLLM
    refuses to start unless ``free >= total * u``: so ``u = (limit - headroom) / physical``.
    """
    if not engine.pinned_memory_limit:
        return engine.gpu_memory_utilization
    if physical_bytes is None:
        return None
    usable = parse_size(engine.pinned_memory_limit) - parse_size(engine.memory_headroom)
    return max(0.01, math.floor(usable / physical_bytes * 1000) / 1000)



def engine_env(environ: Mapping[str, str], uuid: str, pipe_dir: Path | None, log_dir: Path,
               engine: EngineConfig, pinned_limit: int | None,
               substitute: Mapping[str, str]) -> dict[str, str]:
    """The engine's whole environment: an allow-list of mpsd's, the MPS variables, the config's.

    ``NOTIFY_SOCKET``, ``WATCHDOG_*`` and ``LISTEN_*`` never pass: an engine must not talk to
    systemd as if it were mpsd.
    """
    env = inherited_env(environ)
    env["CUDA_VISIBLE_DEVICES"] = uuid
    if pipe_dir is not None:
        env["CUDA_MPS_PIPE_DIRECTORY"] = str(pipe_dir)
        env["CUDA_MPS_LOG_DIRECTORY"] = str(log_dir)
        if engine.active_thread_percentage < 100:
            env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(engine.active_thread_percentage)
        if pinned_limit is not None:
            env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] = f"{uuid}={pinned_limit // 2**20}M"
    env.update(compile_cache_env(environ, engine.model))
    env.update({k: fill(v, substitute) for k, v in engine.env.items()})
    return env



#: The compile caches a vLLM start reads and writes, and each one's directory under the model's
#: cache directory. Without them a restart compiles again: vLLM's own root (torch.compile
#: artifacts, and from 0.3x inductor's and Triton's under it), Triton's kernels (``~/.triton``
#: before that), inductor's (``/tmp/torchinductor_<user>``: systemd's ``PrivateTmp=`` loses it
#: on every restart), FlashInfer's JIT modules and the CUDA driver's PTX JIT cache.
COMPILE_CACHES = {
    "VLLM_CACHE_ROOT": "vllm",
    "TRITON_CACHE_DIR": "triton",
    "TORCHINDUCTOR_CACHE_DIR": "inductor",
    "FLASHINFER_WORKSPACE_BASE": "flashinfer",
    "CUDA_CACHE_PATH": "cuda",
}


def compile_cache_env(environ: Mapping[str, str], model: str) -> dict[str, str]:
    """Where the engines of ``model`` keep their compile caches: one persistent directory per
    model, shared by its replicas and kept across faults, reloads and restarts, so that only
    the first start ever compiles.

    The directory is ``$XDG_CACHE_HOME/mpsd/<model>`` or ``~/.cache/mpsd/<model>`` of mpsd's
    own environment (under systemd and the Kubernetes DaemonSet ``HOME`` is ``/var/lib/mpsd``,
    a persistent volume). A cache variable set in mpsd's environment passes as it is (the
    config's ``env`` wins over both); without a ``HOME`` nothing is set.
    """
    root = cache_root(environ)
    if root is None:
        return {}
    directory = root / cache_name(model)
    return {var: environ.get(var) or str(directory / sub) for var, sub in COMPILE_CACHES.items()}


def cache_root(environ: Mapping[str, str]) -> Path | None:
    """``$XDG_CACHE_HOME/mpsd`` (when absolute, as the XDG spec asks), else ``~/.cache/mpsd``."""
    xdg = environ.get("XDG_CACHE_HOME", "")
    if xdg.startswith("/"):
        return Path(xdg) / "mpsd"
    home = environ.get("HOME", "")
    return Path(home) / ".cache" / "mpsd" if home.startswith("/") else None


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def cache_name(model: str) -> str:
    """A model's cache directory name: a hub id as ``org--name`` (Hugging Face's own way); a
    path as its last part and a short hash of the whole (two ``model`` dirs stay apart)."""
    if model.startswith("/"):
        digest = hashlib.sha256(model.encode()).hexdigest()[:8]
        return f"{_UNSAFE.sub('_', Path(model).name) or 'model'}-{digest}"
    return _UNSAFE.sub("_", model.replace("/", "--")).strip(".") or "model"



def inherited_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The part of mpsd's own environment a child may see (locale, PATH, HOME; never
    ``NOTIFY_SOCKET``, ``WATCHDOG_*``, ``LISTEN_*``)."""
    return {k: v for k, v in environ.items()
            if k in _INHERITED_ENV or k.startswith(_INHERITED_PREFIXES)}



#: mpsd probes /health every ``health_interval_s`` and scrapes /metrics: with uvicorn's access
#: log on, an idle engine writes a line a second to the journal. Requests are counted on mpsd's
#: own /metrics (``mpsd_requests_total``). vLLM has accepted this flag since before 0.8 (tested:
#: 0.26 on the GPU, 0.32 for CPU).
_ACCESS_LOG_OFF = "--disable-uvicorn-access-log"


def engine_argv(engine: EngineConfig, port: int, share: float | None,
                substitute: Mapping[str, str]) -> tuple[str, ...]:
    """vLLM's ``serve`` command line, or the configured command, with placeholders filled."""
    args = [fill(a, substitute) for a in engine.args]
    if engine.kind == "command":
        return tuple(fill(a, substitute) for a in engine.command) + tuple(args)
    argv = [engine.executable, "serve", engine.model, "--host", "127.0.0.1", "--port", str(port),
            "--served-model-name", engine.served_name]
    if share is not None:
        argv += ["--gpu-memory-utilization", f"{share:g}"]
    argv += ["--shutdown-timeout", str(vllm_shutdown_timeout(engine.stop_timeout_s))]
    if _ACCESS_LOG_OFF not in args:
        argv.append(_ACCESS_LOG_OFF)
    return (*argv, *args)



def vllm_shutdown_timeout(stop_timeout_s: float) -> int:
    """vLLM's own drain on SIGTERM: half of mpsd's stop budget, so its exit (drain + ~1 s)
    comes before mpsd's SIGKILL deadline. Never 0: vLLM's default 0 can hang under load."""
    return max(1, int(stop_timeout_s // 2))



def fill(text: str, substitute: Mapping[str, str]) -> str:
    """Replace ``{port}``-style placeholders; other braces (JSON in args) stay as they are."""
    for name, value in substitute.items():
        text = text.replace("{" + name + "}", value)
    return text
