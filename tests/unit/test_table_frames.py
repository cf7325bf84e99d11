"""Every table's frame encodes with the QuestDB client, NULLs and coded columns included.

The client refuses a frame whose column types it cannot tell (a SYMBOL column of only
NULLs, for one) when the sink writes it; here the encoding runs without a server.
"""

from __future__ import annotations

import re
import warnings
from typing import Any

import pytest

from connectors.questdb import TableSpec
from connectors.questdb_sink import table_frame
from schemas.transport import CodedStrings
from twinflow.tables import tables

with warnings.catch_warnings():  # the client's offline buffer lives in its older module
    warnings.simplefilter("ignore", DeprecationWarning)
    from questdb.ingress import Buffer

TS = 1_700_000_000_000
SPECS = list(tables("t_").all())


def _columns(spec: TableSpec, strings: list[Any]) -> dict[str, Any]:
    samples = {
        "TIMESTAMP": [TS, None],
        "SYMBOL": strings,
        "VARCHAR": strings,
        "DOUBLE": [1.5, None],
        "LONG": [1, 3],  # a row of only NULLs is refused, as it should be
        "INT": [2, None],
        "BOOLEAN": [True, False],
    }
    columns = {name: samples[kind] for name, kind in spec.columns}
    columns[spec.timestamp] = [TS, TS + 1]
    return columns


def _lines(spec: TableSpec, columns: dict[str, Any]) -> list[bytes]:
    batch = table_frame(spec, columns)
    buffer = Buffer(protocol_version=1)
    buffer.dataframe(
        batch.frame, table_name=spec.name, symbols=list(batch.symbols), at=spec.timestamp
    )
    return bytes(buffer).splitlines()


@pytest.mark.parametrize("strings", [[None, None], ["a", None], ["a", "b"]], ids=str)
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_every_table_encodes_with_nulls_in_any_column(spec: TableSpec, strings: list[Any]) -> None:
    lines = _lines(spec, _columns(spec, strings))
    assert len(lines) == 2
    assert lines[0].endswith(b" 1700000000000000000")
    assert lines[1].endswith(b" 1700000000001000000")
    for name, kind in spec.columns:
        if name == spec.timestamp or kind == "BOOLEAN":
            continue
        if kind in ("SYMBOL", "VARCHAR") and strings[0] is not None:
            quoted = f'"{strings[0]}"' if kind == "VARCHAR" else strings[0]
            assert re.search(rf"[ ,]{name}={quoted}[ ,]".encode(), lines[0])
        if kind == "DOUBLE":  # NaN, which QuestDB stores as NULL
            assert re.search(rf"[ ,]{name}=NaN[ ,]".encode(), lines[1])
            continue
        second_is_null = kind in ("TIMESTAMP", "INT") or (kind != "LONG" and strings[1] is None)
        assert (re.search(rf"[ ,]{name}=".encode(), lines[1]) is None) == second_is_null


def test_coded_symbols_write_the_same_lines_as_strings() -> None:
    readings = tables("t_").readings
    plain: dict[str, Any] = {
        "ts": [TS, TS + 1, TS + 2],
        "entity": ["p2", "p1", "p2"],
        "sensor": ["flow", "flow", "temp"],
        "value": [1.0, 2.0, 3.0],
        "flags": [0, 1, 0],
    }
    coded = {
        **plain,
        "entity": CodedStrings.of(plain["entity"]),
        "sensor": CodedStrings.of(plain["sensor"]),
    }
    assert _lines(readings, coded) == _lines(readings, plain)
    assert b"t_readings,entity=p2,sensor=temp value=3.0,flags=0i 1700000000002000000" in _lines(
        readings, coded
    )
