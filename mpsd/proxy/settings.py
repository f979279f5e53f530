"""The proxy's runtime settings derived from ``[proxy]``, at start and on every reload."""

from __future__ import annotations

import resource

from mpsd.config import ProxyConfig
from mpsd.pool import BackendPool
from mpsd.proxy.http_rules import Limits


def configure_pool(pool: BackendPool, config: ProxyConfig) -> None:
    """The proxy is the one writer of the pool's settings (at start and on reload)."""
    pool.configure(max_inflight_per_engine=config.max_inflight_per_engine,
                   eject_after_errors=config.eject_after_errors, eject_base_s=config.eject_base_s,
                   eject_max_s=config.eject_max_s)


def limits(config: ProxyConfig) -> Limits:
    return Limits(max_request_line_bytes=config.max_request_line_bytes,
                  max_header_line_bytes=config.max_header_line_bytes,
                  max_head_bytes=config.max_head_bytes, max_headers=config.max_headers,
                  max_body_bytes=config.max_body_bytes,
                  max_trailer_bytes=config.max_trailer_bytes, max_trailers=config.max_trailers)


def client_cap(config: ProxyConfig) -> int:
    """``max_client_connections``, or (0) what the file-descriptor limit leaves: half of what
    remains after ``reserved_fds`` (engines, control socket, logs, metrics), since every busy
    client connection may hold one engine connection too."""
    if config.max_client_connections:
        return config.max_client_connections
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max((soft - config.reserved_fds) // 2, 16)
