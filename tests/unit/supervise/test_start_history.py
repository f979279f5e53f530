"""An engine's previous start: kept in a file, and compared to say which phase grew."""

from __future__ import annotations

from pathlib import Path

from mpsd.supervise import starts

WARM = {"process": 8.0, "weights": 1.0, "compile": 2.0, "api_server": 1.0, "ready": 0.2}


def test_a_cold_compile_cache_is_named() -> None:
    cold = {**WARM, "compile": 27.0}
    assert starts.grown(WARM, cold) == ("compile", 2.0, 27.0)


def test_a_phase_the_previous_start_did_not_have_can_be_the_one() -> None:
    eager = {k: v for k, v in WARM.items() if k != "compile"}
    assert starts.grown(eager, {**eager, "cuda_graphs": 30.0}) == ("cuda_graphs", 0.0, 30.0)


def test_noise_and_faster_starts_say_nothing() -> None:
    assert starts.grown(WARM, {**WARM, "process": 11.0}) is None  # +3 s of 12.2 s
    assert starts.grown({"ready": 0.2}, {"ready": 1.5}) is None  # 7x, but only +1.3 s
    assert starts.grown({**WARM, "compile": 27.0}, WARM) is None


def test_the_record_survives_a_round_trip_and_a_bad_file_is_none(tmp_path: Path) -> None:
    path = tmp_path / "starts" / "gpu0" / "e-0.json"
    assert starts.load(path) is None
    starts.save(path, WARM)
    assert starts.load(path) == WARM
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind
    path.write_text("[1, 2")
    assert starts.load(path) is None
    (tmp_path / "file").write_text("")
    starts.save(tmp_path / "file" / "x.json", WARM)  # a parent that cannot be made: ignored
    assert (tmp_path / "file").is_file()
