"""Fixtures shared by the proxy tests: scripted engines and a client session."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from tests.proxy_helpers import ScriptedEngine


@pytest.fixture
async def engines(request: pytest.FixtureRequest) -> AsyncIterator[list[ScriptedEngine]]:
    """Scripted engines named ``a``, ``b`` (and more where a module sets ``ENGINE_NAMES``)."""
    names = getattr(request.module, "ENGINE_NAMES", ("a", "b"))
    started = [await ScriptedEngine(name).start() for name in names]
    yield started
    for engine in started:
        engine.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as client:
        yield client
