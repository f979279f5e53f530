"""The fault explorer in CI: a few seeded schedules, and each bug of the supervision issue as a
named schedule with fixed steps (its docstring says what once happened).

Each test runs one ``mpsd run`` (2 GPUs x 2 engines on the fakes, client load on both GPUs'
models) through its steps and asserts the explorer's report: every invariant held after every
step, and SIGTERM ended mpsd with 0 and no process left. A failure prints the report: steps,
violations, a log excerpt and the line that replays it.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.explorer.run import Schedule, run_schedule
from tests.explorer.steps import Step

pytestmark = pytest.mark.timeout(240)


def explore(workdir: Path, plan: str, mps: str = "on", replicas: int = 2,
            name: str = "") -> None:
    steps = [Step.parse(text) for text in plan.split(",")]
    report = run_schedule(Schedule(steps, mps=mps, name=name or plan, replicas=replicas),
                          workdir)
    print(report.text())  # the steps with their times, for the CI log
    assert report.ok, report.text()


SEEDED_BUDGET_S = 15.0  # per MPS mode: as many seeded schedules as fit, at least one


@pytest.mark.parametrize(("base", "mps"), [(100, "on"), (200, "off")])
def test_seeded_schedules(workdir: Path, base: int, mps: str) -> None:
    """Random faults and commands, 4 steps then SIGTERM per schedule, seeds base, base+1, ...
    while the time box lasts (each seed is its own reproducible schedule)."""
    started = time.monotonic()
    seed = base
    while seed == base or time.monotonic() - started < SEEDED_BUDGET_S:
        (workdir / str(seed)).mkdir()
        report = run_schedule(Schedule.seeded(seed, mps, 4), workdir / str(seed))
        print(report.text())
        assert report.ok, report.text()
        seed += 1


def test_port_squatted_during_an_mps_off_restart_touches_no_sibling(workdir: Path) -> None:
    """MPS off, an engine killed and its port bound by someone else for 3 s: the restart's
    SpawnError failed the group, SIGKILLed the healthy sibling, and mpsd exited 1."""
    explore(workdir, "squat_port:gpu0/0@3", mps="off")


def test_an_mps_off_restart_that_exits_at_start_touches_no_sibling(workdir: Path) -> None:
    """MPS off, the restarted engine exits at start once: the group recovered as a whole, the
    sibling was SIGKILLed, crash loop, exit 1."""
    explore(workdir, "spawn_fail:gpu0/0@1", mps="off")


def test_port_squatted_during_an_mps_on_recovery_is_retried(workdir: Path) -> None:
    """MPS on, a port taken between the kill and the restart: FAILED "boot failure" for a
    group that had served for hours, never retried."""
    explore(workdir, "squat_port:gpu0/0@3")


def test_a_one_replica_reload_to_a_crashing_command_rolls_back(workdir: Path) -> None:
    """SIGHUP changing a 1-replica engine to a command that crashes: "0/1 engines ready" for
    good, /health 200, the model's requests failing."""
    explore(workdir, "reload_crash:gpu0/0@1", replicas=1)


def test_a_reload_whose_engines_never_get_ready_rolls_back(workdir: Path) -> None:
    """New engines that never get ready rolled out both old engines (404 then 503), and a
    second ``mpsd reload`` said "unchanged"."""
    explore(workdir, "reload_hang:gpu0/0")


def test_restart_racing_a_sighup_that_changes_the_gpu(workdir: Path) -> None:
    """``mpsd restart gpu0`` plus a SIGHUP changing the MPS daemons: two groups for gpu0, a
    second MPS daemon, FAILED "already registered", then SIGTERM hung."""
    explore(workdir, "race_restart_reload:gpu0/0@1")


def test_sigterm_during_a_restart_exits(workdir: Path) -> None:
    """SIGTERM during ``mpsd restart`` started a group after the stop began; mpsd never
    exited."""
    explore(workdir, "restart:gpu0/0,sigterm@1")


def test_sigterm_during_a_reload_exits(workdir: Path) -> None:
    """SIGTERM during a reload likewise."""
    explore(workdir, "reload_good:gpu0/0,sigterm@0.5")


def test_a_reload_during_an_mps_off_engine_restart(workdir: Path) -> None:
    """A reload during an MPS-off engine restart recovered the whole group and left the
    rolled-in engine alive, healthy and never routed ("1/2 engines ready" for good)."""
    explore(workdir, "kill_reload:gpu0/0@0.3", mps="off")


def test_a_drained_gpu_stays_drained_across_a_reload(workdir: Path) -> None:
    """A drained GPU came back when a reload changed it (an ``[mps]`` edit restarts every
    group; an engine edit rolls its engines)."""
    explore(workdir, "drain:gpu0/0,reload_mps,reload_good:gpu0/0,restart:gpu0/0")


def test_a_long_non_streaming_answer_is_not_a_stall(workdir: Path) -> None:
    """A non-streaming answer longer than ``stall_timeout_s`` was judged a hang: both MPS
    engines SIGKILLed, the client got 502."""
    explore(workdir, "long_answer:gpu0/0")


def test_a_client_that_stops_reading_harms_no_one_else(workdir: Path) -> None:
    """A client reading nothing paused the upstream; the engine was judged hung and its GPU
    restarted (then every restarted engine was ejected again, to FAILED)."""
    explore(workdir, "stuck_reader:gpu0/0@4")


def test_a_second_mpsd_run_refuses_and_touches_nothing(workdir: Path) -> None:
    """A second ``mpsd run`` with the same config reaped the first one's engines, then died
    with a traceback."""
    explore(workdir, "second_run")


def test_a_closed_stdout_does_not_kill_mpsd(workdir: Path) -> None:
    """With its stdout's reader closed, mpsd exited 141 within 1 s, every engine healthy."""
    explore(workdir, "close_stdout,kill_leader:gpu1/0")


def test_a_hardware_xid_verdict_survives_a_reload(workdir: Path) -> None:
    """A reload restarted a group FAILED by a hardware Xid 79 (any ``[mps]`` edit touched
    every group); only ``mpsd restart`` may bring it back."""
    explore(workdir, "xid:gpu0/0@79,reload_mps,restart:gpu0/0")


def test_an_application_xid_recovers_only_its_gpu(workdir: Path) -> None:
    """Xid 13 on gpu1 recovers gpu1; gpu0 loses no request."""
    explore(workdir, "xid:gpu1/0@13")


def test_a_bad_reload_during_a_recovery_rolls_back(workdir: Path) -> None:
    """Found by the explorer (seed 1002, MPS on): a reload whose engines crash at start, landing
    while their GPU recovers from a killed engine, was applied with no rollout: ``mpsd reload``
    exited 0 ("changed gpu1"), the new engines crash-looped and the GPU ended FAILED."""
    explore(workdir, "reload_crash:gpu1/0@2")
