"""The retry budget (Envoy's): retries in flight stay under a share of all requests in flight.

A request whose engine failed before the client saw a byte goes to another engine; during an
outage that would double the load on the engines left, so retries are admitted only while those
in flight stay under ``retry_budget`` of all requests in flight, or ``retry_min_concurrency``.
"""

from __future__ import annotations

from mpsd.config import ProxyConfig


class RetryBudget:
    """Counts retries in flight; :meth:`admits` says whether one more may start."""

    def __init__(self, config: ProxyConfig) -> None:
        self.in_flight = 0
        self.configure(config)

    def configure(self, config: ProxyConfig) -> None:
        self._ratio = config.retry_budget
        self._minimum = config.retry_min_concurrency

    def admits(self, requests_in_flight: int) -> bool:
        return self.in_flight < max(self._minimum, self._ratio * requests_in_flight)

    def begin(self) -> None:
        self.in_flight += 1

    def end(self) -> None:
        self.in_flight -= 1
