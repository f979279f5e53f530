"""What tune and bench write must read back as the same data, and as a valid mpsd config."""

from __future__ import annotations

import tomllib
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mpsd.bench import toml_writer
from mpsd.bench.target import load_document
from mpsd.config import parse_config
from tests.harness import REPO

scalars = st.one_of(st.booleans(), st.integers(-2**63, 2**63 - 1),
                    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))
values = st.one_of(scalars, st.lists(scalars, max_size=4),
                   st.dictionaries(st.text(min_size=1, max_size=8), scalars, max_size=3))
keys = st.text(min_size=1, max_size=10)


@given(st.dictionaries(keys, st.dictionaries(keys, values, max_size=5), max_size=4))
def test_tables_read_back_unchanged(doc: dict[str, dict[str, Any]]) -> None:
    doc = {k: {kk: vv for kk, vv in v.items() if not (isinstance(vv, dict) and vv and all(
        isinstance(x, dict) for x in vv.values()))} for k, v in doc.items()}
    assert tomllib.loads(toml_writer.dumps(doc)) == doc


def test_a_whole_config_reads_back_as_the_same_config() -> None:
    doc = load_document(REPO / "examples" / "cpu.toml")
    text = toml_writer.dumps(doc)
    assert tomllib.loads(text) == _without_none(doc)
    assert parse_config(tomllib.loads(text)) == parse_config(doc)


def _without_none(item: Any) -> Any:
    """TOML has no null: the writer leaves unset optional keys out."""
    if isinstance(item, dict):
        return {k: _without_none(v) for k, v in item.items() if v is not None}
    if isinstance(item, list):
        return [_without_none(v) for v in item]
    return item


def test_values_toml_cannot_hold_are_refused() -> None:
    with pytest.raises(ValueError, match="finite"):
        toml_writer.value(float("inf"))
    with pytest.raises(TypeError):
        toml_writer.value(object())
