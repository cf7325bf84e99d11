"""Snapshots store plain arrays as bytes; every array comes back equal and writable."""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np
import pytest

from flows.partition import array_from_bytes, snapshot_bytes

ARRAYS = [
    np.arange(6, dtype=np.float64),
    np.arange(12, dtype=np.int64).reshape(3, 4),
    np.array([True, False]),
    np.array(7, dtype=np.uint8),
    np.empty((0, 3)),
    np.arange(10.0)[::2],  # not contiguous: numpy's own reduction
    np.arange(6.0).reshape(2, 3).T,  # Fortran order: numpy's own reduction
    np.array([(1, 2.0)], dtype=[("a", "i4"), ("b", "f8")]),  # fields: numpy's own reduction
    np.array(["a", None], dtype=object),
    np.arange(3, dtype=">f4"),  # byte order kept
]


def _roundtrip(value: Any) -> Any:
    return pickle.loads(snapshot_bytes(value))


@pytest.mark.parametrize("array", ARRAYS, ids=lambda a: f"{a.dtype}{a.shape}")
def test_arrays_come_back_equal_with_their_dtype_shape_and_writable(array: np.ndarray) -> None:
    back = _roundtrip({"state": [array, array]})
    first, second = back["state"]
    assert first is second  # shared arrays stay shared
    assert first.dtype == array.dtype and first.shape == array.shape
    assert np.array_equal(first, array) or (array.dtype.hasobject and list(first) == list(array))
    assert first.flags.writeable


def test_plain_arrays_are_stored_as_bytes_and_rebuilt_by_a_stable_name() -> None:
    data = snapshot_bytes(np.arange(4.0))
    assert b"array_from_bytes" in data and b"_reconstruct" not in data
    assert np.array_equal(
        array_from_bytes(np.arange(4.0).tobytes(), "<f8", (2, 2)), [[0, 1], [2, 3]]
    )
