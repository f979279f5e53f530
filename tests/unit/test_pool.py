"""BackendPool and pick(): least-in-flight, random ties, FIFO admission, exact bookkeeping."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mpsd.backend import Backend, NoCapacity, UnknownModel, pick
from mpsd.pool import BackendPool
from tests.harness import until


def _backend(key: str, model: str = "m", inflight: int = 0, routable: bool = True) -> Backend:
    return Backend(key=key, gpu=key.partition("/")[0], model=model, base_url=f"http://{key}",
                   inflight=inflight, routable=routable)


def _pool(*keys: str, model: str = "m", cap: int = 0, seed: int = 0) -> BackendPool:
    pool = BackendPool(rng=random.Random(seed))
    pool.configure(max_inflight_per_engine=cap)
    for key in keys:
        pool.add(Backend(key=key, gpu=key.partition("/")[0], model=model, base_url=f"http://{key}"))
        pool.set_routable(key, True)
    return pool


def run(coro_fn: Callable[[], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        async with asyncio.timeout(5):
            return await coro_fn()
    return asyncio.run(main())


class TestPick:
    def test_fewest_in_flight_wins(self) -> None:
        a, b = _backend("g0/a", inflight=3), _backend("g0/b", inflight=1)
        c = _backend("g1/c", inflight=2)
        assert pick([a, b, c], 0, random.Random(0)) is b

    def test_ties_are_broken_at_random_not_toward_the_first(self) -> None:
        backends = [_backend(f"g0/{i}") for i in range(4)]
        rng = random.Random(1)
        counts = Counter(pick(backends, 0, rng).key for _ in range(4000))  # type: ignore[union-attr]
        assert set(counts) == {b.key for b in backends}
        assert min(counts.values()) > 800

    @pytest.mark.parametrize(
        ("routable", "inflight", "cap", "excluded", "expected"),
        [
            ((False, True), (0, 5), 0, (), "g0/b"),          # unroutable never picked
            ((True, True), (2, 2), 2, (), None),             # both at the cap
            ((True, True), (2, 1), 2, (), "g0/b"),           # only b under the cap
            ((True, True), (0, 9), 0, ("g0/a",), "g0/b"),    # a was tried already
            ((False, False), (0, 0), 0, (), None),           # nothing ready
        ],
    )
    def test_filters(self, routable: tuple[bool, bool], inflight: tuple[int, int], cap: int,
                     excluded: tuple[str, ...], expected: str | None) -> None:
        a = _backend("g0/a", inflight=inflight[0], routable=routable[0])
        b = _backend("g0/b", inflight=inflight[1], routable=routable[1])
        exclude = {x for x in (a, b) if x.key in excluded}
        got = pick([a, b], cap, random.Random(0), exclude)
        assert (got.key if got else None) == expected

    def test_empty(self) -> None:
        assert pick([], 0, random.Random(0)) is None


class TestRegistration:
    def test_added_backends_start_unroutable(self) -> None:
        pool = BackendPool()
        pool.add(_backend("g0/a", routable=True))
        assert pool.routable_count() == 0
        pool.set_routable("g0/a", True)
        assert pool.routable_count() == 1

    def test_duplicate_key_rejected(self) -> None:
        pool = _pool("g0/a")
        with pytest.raises(ValueError, match="already registered"):
            pool.add(_backend("g0/a"))

    def test_models_is_the_sorted_union_of_registered_backends(self) -> None:
        pool = BackendPool()
        pool.add(_backend("g0/a", model="zeta"))
        pool.add(_backend("g0/b", model="alpha"))
        pool.add(_backend("g1/c", model="zeta"))
        assert pool.models() == ["alpha", "zeta"]
        pool.remove("g0/b")
        assert pool.models() == ["zeta"]
        pool.remove("nope")  # idempotent

    def test_snapshot(self) -> None:
        pool = _pool("g0/a")
        (row,) = pool.snapshot()
        assert row == {"key": "g0/a", "gpu": "g0", "model": "m", "url": "http://g0/a",
                       "routable": True, "inflight": 0, "requests": 0, "connect_failures": 0,
                       "ejected": False, "ejections": 0}

    def test_set_routable_unknown_key(self) -> None:
        with pytest.raises(KeyError):
            BackendPool().set_routable("x", True)


class TestLease:
    def test_balances_and_returns_to_zero(self) -> None:
        pool = _pool("g0/a", "g0/b", "g1/c")

        async def scenario() -> None:
            leases = [pool.lease("m") for _ in range(9)]
            got = [await lease.__aenter__() for lease in leases]
            assert Counter(b.key for b in got) == {"g0/a": 3, "g0/b": 3, "g1/c": 3}
            for lease in leases:
                await lease.__aexit__(None, None, None)
            assert [b.inflight for b in pool.backends()] == [0, 0, 0]

        run(scenario)

    def test_error_inside_lease_releases(self) -> None:
        pool = _pool("g0/a")

        async def scenario() -> None:
            with pytest.raises(RuntimeError):
                async with pool.lease("m") as backend:
                    assert backend.inflight == 1
                    raise RuntimeError("engine broke")
            assert backend.inflight == 0

        run(scenario)

    def test_unknown_model(self) -> None:
        pool = _pool("g0/a")

        async def scenario() -> None:
            with pytest.raises(UnknownModel) as info:
                async with pool.lease("other"):
                    pass
            assert info.value.known == ["m"]

        run(scenario)

    def test_model_none_means_any(self) -> None:
        pool = BackendPool()
        pool.add(_backend("g0/a", model="x"))
        pool.set_routable("g0/a", True)

        async def scenario() -> None:
            async with pool.lease(None) as backend:
                assert backend.key == "g0/a"

        run(scenario)

    def test_nothing_ready_is_503_at_once_without_wait(self) -> None:
        pool = BackendPool()
        pool.add(_backend("g0/a"))

        async def scenario() -> None:
            with pytest.raises(NoCapacity) as info:
                async with pool.lease("m"):
                    pass
            assert not info.value.ready
            assert info.value.retry_after_s > 0

        run(scenario)

    def test_unroutable_takes_effect_for_the_next_pick(self) -> None:
        pool = _pool("g0/a", "g1/b")

        async def scenario() -> None:
            pool.set_routable("g0/a", False)
            for _ in range(20):
                async with pool.lease("m") as backend:
                    assert backend.key == "g1/b"

        run(scenario)

    def test_removed_while_in_flight_still_releases_to_zero(self) -> None:
        pool = _pool("g0/a")

        async def scenario() -> None:
            async with pool.lease("m") as backend:
                pool.remove("g0/a")
            assert backend.inflight == 0
            assert pool.backends() == []

        run(scenario)


class TestQueue:
    def test_fifo_when_saturated(self) -> None:
        pool = _pool("g0/a", cap=1)
        order: list[int] = []

        async def waiter(i: int, gate: asyncio.Event) -> None:
            async with pool.lease("m", wait_s=5):
                order.append(i)
                await gate.wait()

        async def scenario() -> None:
            gates = [asyncio.Event() for _ in range(4)]
            tasks = []
            for i in range(4):
                tasks.append(asyncio.create_task(waiter(i, gates[i])))
                await asyncio.sleep(0)  # let each one queue in turn (ordering, not timing)
            for i in range(4):
                await until(lambda i=i: len(order) > i, interval_s=0)  # type: ignore[misc]
                assert pool.backends()[0].inflight == 1
                gates[i].set()
            await asyncio.gather(*tasks)
            assert order == [0, 1, 2, 3]
            assert pool.backends()[0].inflight == 0

        run(scenario)

    def test_admission_timeout_is_no_capacity_ready(self) -> None:
        pool = _pool("g0/a", cap=1)

        async def scenario() -> None:
            async with pool.lease("m"):
                with pytest.raises(NoCapacity) as info:
                    async with pool.lease("m", wait_s=0.01):
                        pass
                assert info.value.ready
                assert pool.queued() == 0
            assert pool.inflight_total() == 0

        run(scenario)

    def test_waiter_served_when_an_engine_becomes_routable(self) -> None:
        pool = BackendPool()
        pool.add(_backend("g0/a"))

        async def scenario() -> None:
            async def client() -> str:
                async with pool.lease("m", wait_s=5) as backend:
                    return backend.key

            task = asyncio.create_task(client())
            await until(lambda: pool.queued() != 0, interval_s=0)
            pool.set_routable("g0/a", True)
            assert await task == "g0/a"
            assert pool.inflight_total() == 0

        run(scenario)

    def test_raising_the_cap_serves_waiters(self) -> None:
        pool = _pool("g0/a", cap=1)

        async def scenario() -> None:
            async with pool.lease("m"):
                task = asyncio.create_task(pool.lease("m", wait_s=5).__aenter__())
                await until(lambda: pool.queued() != 0, interval_s=0)
                pool.configure(max_inflight_per_engine=2)
                backend = await task
                assert backend.inflight == 2
                pool._release(backend)  # the task's own lease object is gone; release its slot
            assert pool.inflight_total() == 0

        run(scenario)

    def test_granted_then_cancelled_gives_the_slot_back(self) -> None:
        pool = _pool("g0/a", cap=1)

        async def scenario() -> None:
            outer = pool.lease("m")
            await outer.__aenter__()

            async def client() -> None:
                async with pool.lease("m", wait_s=5):
                    raise AssertionError("must not run")

            task = asyncio.create_task(client())
            await until(lambda: pool.queued() != 0, interval_s=0)
            await outer.__aexit__(None, None, None)  # grants the slot to the waiter...
            task.cancel()                            # ...which is cancelled before it resumes
            with pytest.raises(asyncio.CancelledError):
                await task
            assert pool.inflight_total() == 0

        run(scenario)

    def test_other_model_not_blocked_by_a_saturated_one(self) -> None:
        pool = BackendPool(rng=random.Random(0))
        pool.configure(max_inflight_per_engine=1)
        for key, model in (("g0/a", "x"), ("g0/b", "y")):
            pool.add(_backend(key, model=model))
            pool.set_routable(key, True)

        async def scenario() -> None:
            async with pool.lease("x"):
                task = asyncio.create_task(pool.lease("x", wait_s=5).__aenter__())
                await until(lambda: pool.queued() != 0, interval_s=0)
                async with pool.lease("y", wait_s=5) as backend:
                    assert backend.key == "g0/b"
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            assert pool.inflight_total() == 0

        run(scenario)


class TestDrain:
    def test_idle_drain_is_immediate(self) -> None:
        pool = _pool("g0/a")
        assert run(lambda: pool.drain("g0/a", 1.0)) is True
        assert pool.routable_count() == 0

    def test_drain_waits_for_in_flight(self) -> None:
        pool = _pool("g0/a", "g0/b")

        async def scenario() -> None:
            lease = pool.lease("m")
            backend = await lease.__aenter__()
            drained = asyncio.create_task(pool.drain(backend.key, 5.0))
            await asyncio.sleep(0)
            assert not drained.done()
            assert not backend.routable
            async with pool.lease("m") as other:  # new requests go elsewhere at once
                assert other is not backend
            await lease.__aexit__(None, None, None)
            assert await drained is True

        run(scenario)

    def test_drain_timeout(self) -> None:
        pool = _pool("g0/a")

        async def scenario() -> None:
            async with pool.lease("m") as backend:
                assert await pool.drain("g0/a", 0.01) is False
                assert backend._idle == []

        run(scenario)


# -- property: any interleaving of leases, failures, cancellations and group events keeps
#    the counts exact ------------------------------------------------------------------------

_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("start"), st.sampled_from(["x", "y"]), st.sampled_from([0.0, 5.0])),
        st.tuples(st.just("finish"), st.integers(0, 30), st.sampled_from(["ok", "error"])),
        st.tuples(st.just("cancel"), st.integers(0, 30), st.just("")),
        st.tuples(st.just("routable"), st.integers(0, 3), st.booleans()),
        st.tuples(st.just("cap"), st.integers(0, 3), st.just("")),
        st.tuples(st.just("tick"), st.just(0), st.just("")),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=_OPS, seed=st.integers(0, 2**16))
def test_counts_are_exact_under_random_event_sequences(ops: list[tuple[Any, Any, Any]],
                                                      seed: int) -> None:
    pool = BackendPool(rng=random.Random(seed))
    pool.configure(max_inflight_per_engine=1)
    keys = ["g0/x0", "g0/x1", "g1/y0", "g1/y1"]
    for key in keys:
        pool.add(_backend(key, model=key[3]))
        pool.set_routable(key, True)

    holders: set[object] = set()

    async def client(model: str, wait_s: float, done: asyncio.Event, fail: list[bool]) -> None:
        me = object()
        async with pool.lease(model, wait_s=wait_s):
            holders.add(me)
            try:
                await done.wait()
                if fail[0]:
                    raise RuntimeError("upstream error")
            finally:
                holders.discard(me)

    async def scenario() -> None:
        tasks: list[tuple[asyncio.Task[None], asyncio.Event, list[bool]]] = []
        for op, arg, extra in ops:
            if op == "start":
                flag: list[bool] = [False]
                done = asyncio.Event()
                task = asyncio.create_task(client(arg, extra, done, flag))
                tasks.append((task, done, flag))
            elif op == "finish" and tasks:
                task, done, flag = tasks[arg % len(tasks)]
                flag[0] = extra == "error"
                done.set()
            elif op == "cancel" and tasks:
                tasks[arg % len(tasks)][0].cancel()
            elif op == "routable":
                pool.set_routable(keys[arg], extra)
            elif op == "cap":
                pool.configure(max_inflight_per_engine=arg)
            for _ in range(3):
                await asyncio.sleep(0)
            _check_invariants(pool, len(holders))
        for _task, done, _ in tasks:
            done.set()
        for key in keys:
            pool.set_routable(key, True)
        pool.configure(max_inflight_per_engine=0)
        await asyncio.gather(*(t for t, _, _ in tasks), return_exceptions=True)
        assert [b.inflight for b in pool.backends()] == [0, 0, 0, 0]
        assert pool.queued() == 0

    run(scenario)


def _check_invariants(pool: BackendPool, holders: int) -> None:
    assert all(b.inflight >= 0 for b in pool.backends())
    # once the loop settled, every count is exactly one client inside its lease
    assert pool.inflight_total() == holders


class TestEjection:
    """Passive health: the proxy's word on an engine, kept apart from the supervisor's."""

    def test_a_run_of_5xx_ejects_for_longer_each_time_until_a_good_answer(self) -> None:
        pool = _pool("g0/a", "g0/b")
        pool.configure(eject_after_errors=2, eject_base_s=10.0, eject_max_s=25.0)
        a = pool.get("g0/a")
        assert a is not None
        assert not pool.answered_5xx(a, 0.0, 500)
        assert pool.answered_5xx(a, 0.0, 500) and not a.routable and a.ejections == 1
        pool.readmit(9.9)
        assert not a.routable
        pool.readmit(10.0)
        assert a.routable
        assert pool.answered_5xx(a, 11.0, 502)  # the streak goes on: ejected again at once,
        assert a.ejected_until == 31.0  # for 2 x 10 s capped at 25
        pool.readmit(36.0)
        pool.answered_ok(a)
        assert a.routable and a.consecutive_5xx == 0 and a.ejections_in_row == 0

    def test_the_last_routable_engine_of_a_model_is_never_ejected_for_5xx(self) -> None:
        pool = _pool("g0/a")
        pool.configure(eject_after_errors=1, eject_base_s=10.0, eject_max_s=10.0)
        a = pool.get("g0/a")
        assert a is not None
        assert not pool.answered_5xx(a, 0.0, 500) and a.routable

    def test_a_dead_engine_stays_out_until_its_group_restarted_it(self) -> None:
        told: list[tuple[str, str]] = []
        pool = _pool("g0/a", "g0/b")
        pool.on_engine_fault = lambda b, signal, reason: told.append((b.key, signal))
        a = pool.get("g0/a")
        assert a is not None
        pool.eject(a, 0.0, "engine_dead", "its EngineCore is dead", dead=True)
        pool.readmit(1e9)
        pool.set_routable("g0/a", True)  # a health probe passing is not enough
        assert not a.routable and told == [("g0/a", "engine_dead")]
        pool.set_routable("g0/a", True, fresh=True)
        assert a.routable and a.ejections == 1

    def test_a_condemned_or_removed_engine_is_announced_to_the_proxy(self) -> None:
        """Stalls are judged per exchange by the proxy; the pool tells the proxy which engines
        are gone (ejected as dead, or removed) so that their exchanges end at once."""
        gone: list[str] = []
        pool = _pool("g0/a", "g0/b")
        pool.on_backend_gone = lambda b: gone.append(b.key)
        a, b = pool.get("g0/a"), pool.get("g0/b")
        assert a is not None and b is not None
        pool.configure(eject_after_errors=1, eject_base_s=10.0, eject_max_s=10.0)
        pool.answered_5xx(a, 0.0, 500)  # ejected for a while, not condemned
        assert not a.routable and gone == []
        pool.eject(a, 0.0, "stall", "a stream sent nothing", dead=True)
        pool.remove("g0/b")
        assert gone == ["g0/a", "g0/b"]


class TestHoldThroughRecovery:
    """A model whose engines are all on their way back holds requests; nothing else waits."""

    def test_coming_only_while_nothing_of_the_model_is_routable(self) -> None:
        pool = _pool("g0/a", "g0/b")
        pool.set_routable("g0/a", False)
        pool.set_coming("g0/a", True)
        assert not pool.coming("m")  # g0/b serves
        pool.set_routable("g0/b", False)
        assert pool.coming("m")
        pool.set_coming("g0/a", False)
        assert not pool.coming("m")

    @staticmethod
    async def held() -> tuple[BackendPool, Any, asyncio.Future[Backend]]:
        """One engine on its way back and one request held for it."""
        pool = _pool("g0/a")
        pool.set_routable("g0/a", False)
        pool.set_coming("g0/a", True)
        lease = pool.lease("m", wait_s=5.0)
        waiting = asyncio.ensure_future(lease.acquire())
        await until(lambda: pool.queued() == 1, 2.0, "held")
        return pool, lease, waiting

    def test_a_held_request_goes_to_the_first_engine_ready(self) -> None:
        async def body() -> str:
            pool, lease, waiting = await self.held()
            pool.set_routable("g0/a", True)
            backend = await waiting
            lease.release()
            return backend.key

        assert run(body) == "g0/a"

    def test_held_requests_get_their_503_once_nothing_is_coming(self) -> None:
        async def body() -> None:
            pool, lease, waiting = await self.held()
            pool.set_coming("g0/a", False)  # its engine FAILED: nothing to wait for
            with pytest.raises(NoCapacity):
                await waiting
            lease.release()
            assert pool.queued() == 0 and pool.inflight_total() == 0

        run(body)
