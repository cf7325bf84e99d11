"""SeriesCleaning must give exactly the flags of quality_flags applied one by one."""

import itertools
import pickle
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pytest

from schemas.outputs import Flag
from twinflow.cleaning import SensorHistory, SeriesCleaning, batch_parameters, quality_flags
from twinflow.twin_model import SensorSpec

SEEDS = range(200)


@dataclass
class Stream:
    specs: list[SensorSpec]
    series: npt.NDArray[np.int64]
    ts_ms: npt.NDArray[np.int64]
    values: npt.NDArray[np.float64]

    def __len__(self) -> int:
        return len(self.series)

    def parameters(
        self, part: slice
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64], npt.NDArray[np.float64]]:
        table = [batch_parameters(spec) for spec in self.specs]
        codes = self.series[part]
        return (
            np.array([table[c][0] for c in codes], np.float64),
            np.array([table[c][1] for c in codes], np.int64),
            np.array([table[c][2] for c in codes], np.float64),
        )


def _stream(seed: int) -> Stream:
    """Interleaved series: walks, spikes, stuck runs, gaps, late and equal timestamps."""
    rng = np.random.default_rng(seed)
    n_series = int(rng.integers(1, 10))
    n = int(rng.integers(1, 400))
    specs = []
    for _ in range(n_series):
        low = float(rng.uniform(-100, 100))
        specs.append(
            SensorSpec(
                unit="u",
                range=(low, low + float(rng.choice([1.0, 10.0, 250.0]))),
                max_rate=float(rng.choice([0.5, 2.0, 10.0, 1000.0])),
                stuck_after_s=float(rng.choice([0.0025, 0.5, 1.5, 3.0, 30.0])),
            )
        )
    # Codes need not follow appearance order; a few series only start mid-way.
    codes = rng.permutation(n_series)
    appears = np.sort(rng.integers(0, max(n, 1), n_series))
    appears[0] = 0
    # Some seeds start at 0 ms or before, where `unchanged_since or last_ts` misreads 0.
    start = int(rng.choice([0, -3000, 1_700_000_000_000]))
    step = rng.choice([100, 250, 1000], n_series)
    ts = np.full(n_series, start) + rng.integers(-2, 3, n_series) * 50
    value = rng.uniform(-10, 10, n_series).round(1)
    level = rng.choice([0.0, 0.1, 0.5, 5.0])  # walk step; 0 makes everything stuck
    out_series, out_ts, out_values = [], [], []
    for i in range(n):
        active = np.flatnonzero(appears <= i)
        k = int(rng.choice(active))
        roll = rng.random()
        if roll < 0.05:
            ts_k = int(ts[k] - rng.integers(0, 4) * step[k])  # late, or equal to the newest
        else:
            if roll < 0.1:
                ts[k] += int(rng.integers(3, 20)) * step[k]  # a gap
            elif roll < 0.13:
                step[k] = rng.choice([100, 250, 1000])  # a new sampling rate
                ts[k] += step[k]
            else:
                ts[k] += step[k] + int(rng.integers(-1, 2)) * (step[k] // 10)
            ts_k = int(ts[k])
        r = rng.random()
        if r < 0.4:
            v = value[k]  # unchanged: stuck runs
        elif r < 0.45:
            v = value[k] + float(rng.choice([-1, 1])) * float(rng.uniform(5, 50))  # spike
        else:
            value[k] = round(value[k] + float(rng.normal(0, 1)) * level, 1)
            v = value[k]
        out_series.append(int(codes[k]))
        out_ts.append(ts_k)
        out_values.append(float(v))
    return Stream(
        [specs[int(np.flatnonzero(codes == c)[0])] for c in range(n_series)],
        np.array(out_series, np.int64),
        np.array(out_ts, np.int64),
        np.array(out_values, np.float64),
    )


def _oracle(stream: Stream) -> list[int]:
    histories: dict[int, SensorHistory] = {}
    return [
        quality_flags(stream.specs[c], histories.setdefault(c, SensorHistory()), t, v)
        for c, t, v in zip(
            stream.series.tolist(), stream.ts_ms.tolist(), stream.values.tolist(), strict=True
        )
    ]


def _batch(cleaning: SeriesCleaning, stream: Stream, part: slice = slice(None)) -> list[int]:
    flags = cleaning.flags(
        stream.series[part], stream.ts_ms[part], stream.values[part], *stream.parameters(part)
    )
    assert flags.dtype == np.int64
    return flags.tolist()


@pytest.mark.parametrize("seed", SEEDS)
def test_one_call_gives_the_scalar_flags(seed: int) -> None:
    stream = _stream(seed)
    assert _batch(SeriesCleaning(), stream) == _oracle(stream)


@pytest.mark.parametrize("seed", SEEDS)
def test_calls_split_anywhere_give_the_same_flags(seed: int) -> None:
    stream = _stream(seed)
    rng = np.random.default_rng(10_000 + seed)
    cuts = sorted(set(rng.integers(0, len(stream) + 1, int(rng.integers(1, 12))).tolist()))
    bounds = [0, *cuts, len(stream)]
    cleaning = SeriesCleaning()
    flags = [
        f for a, b in itertools.pairwise(bounds) for f in _batch(cleaning, stream, slice(a, b))
    ]
    assert flags == _oracle(stream)


@pytest.mark.parametrize("seed", range(0, 200, 7))
def test_one_reading_per_call_gives_the_same_flags(seed: int) -> None:
    stream = _stream(seed)
    cleaning = SeriesCleaning()
    flags = [f for i in range(len(stream)) for f in _batch(cleaning, stream, slice(i, i + 1))]
    assert flags == _oracle(stream)


@pytest.mark.parametrize("seed", range(0, 200, 5))
def test_a_pickled_state_goes_on_the_same(seed: int) -> None:
    stream = _stream(seed)
    middle = len(stream) // 2
    cleaning = SeriesCleaning()
    head = _batch(cleaning, stream, slice(0, middle))
    restored = pickle.loads(pickle.dumps(cleaning))
    tail = _batch(restored, stream, slice(middle, None))
    assert head + tail == _oracle(stream)
    assert _batch(cleaning, stream, slice(middle, None)) == tail  # the original is untouched


def test_the_streams_exercise_every_rule() -> None:
    seen = 0
    for seed in SEEDS:
        for flags in _oracle(_stream(seed)):
            seen |= flags
    assert seen == Flag.RATE | Flag.STUCK | Flag.SPIKE | Flag.GAP


def _arrays(
    series: list[int], ts: list[int], values: list[float], spec: SensorSpec
) -> tuple[npt.NDArray[np.int64], ...]:
    max_rate, stuck_after_ms, floor = batch_parameters(spec)
    n = len(series)
    return (
        np.array(series, np.int64),
        np.array(ts, np.int64),
        np.array(values, np.float64),
        np.full(n, max_rate),
        np.full(n, stuck_after_ms, np.int64),
        np.full(n, floor),
    )


SPEC = SensorSpec(unit="A", range=(0, 300), max_rate=100, stuck_after_s=3)


def test_empty_arrays() -> None:
    cleaning = SeriesCleaning()
    flags = cleaning.flags(*_arrays([], [], [], SPEC))
    assert flags.shape == (0,) and flags.dtype == np.int64
    assert cleaning.size == 0


def test_a_single_reading_and_the_first_of_a_series() -> None:
    cleaning = SeriesCleaning()
    assert cleaning.flags(*_arrays([0], [1000], [5.0], SPEC)).tolist() == [0]
    # A new, higher code grows the state; its first reading is judged by nothing.
    assert cleaning.flags(*_arrays([7, 0], [0, 2000], [250.0, 5.0], SPEC)).tolist() == [0, 0]
    assert cleaning.size >= 8
    # Its second one is judged against the first only.
    assert cleaning.flags(*_arrays([7], [500], [5.0], SPEC)).tolist() == [int(Flag.RATE)]


def test_a_run_starting_at_0_ms_is_judged_like_the_scalar_rule() -> None:
    # `unchanged_since or last_ts` reads a run start of 0 ms as "none".
    ts = [0, 1000, 2000, 3000, 4000, 5000]
    history = SensorHistory()
    expected = [quality_flags(SPEC, history, t, 1.0) for t in ts]
    assert expected == [0, 0, 0, 0, int(Flag.STUCK), int(Flag.STUCK)]
    for split in range(len(ts) + 1):
        cleaning = SeriesCleaning()
        head = cleaning.flags(*_arrays([0] * split, ts[:split], [1.0] * split, SPEC))
        rest = len(ts) - split
        tail = cleaning.flags(*_arrays([0] * rest, ts[split:], [1.0] * rest, SPEC))
        assert head.tolist() + tail.tolist() == expected


def test_fractional_stuck_seconds_round_up() -> None:
    spec = SensorSpec(unit="A", range=(0, 300), max_rate=100, stuck_after_s=0.0015)
    assert batch_parameters(spec)[1] == 2
    ts = [0, 10, 11, 12, 13]
    history = SensorHistory()
    expected = [quality_flags(spec, history, t, 1.0) for t in ts]
    assert SeriesCleaning().flags(*_arrays([0] * 5, ts, [1.0] * 5, spec)).tolist() == expected


def test_timestamps_too_spread_for_one_lift() -> None:
    # Far-apart series take the rank path of the grouped running max.
    series = [0, 1, 0, 1, 0, 1]
    ts = [-(2**61), 2**61, -(2**61) + 5, 2**61 - 5, -(2**61) + 3, 2**61 + 1]
    values = [1.0, 2.0, 1.0, 2.0, 1.0, 2.0]
    histories = [SensorHistory(), SensorHistory()]
    expected = [
        quality_flags(SPEC, histories[c], t, v) for c, t, v in zip(series, ts, values, strict=True)
    ]
    assert SeriesCleaning().flags(*_arrays(series, ts, values, SPEC)).tolist() == expected


def test_the_sorting_network_sorts_everything() -> None:
    # 0-1 principle: a comparator network sorting every 0/1 input sorts every input.
    from twinflow.cleaning import _NETWORK_10

    for bits in range(2**10):
        x = [(bits >> i) & 1 for i in range(10)]
        for i, j in _NETWORK_10:
            if x[i] > x[j]:
                x[i], x[j] = x[j], x[i]
        assert x == sorted(x)


def test_negative_codes_are_refused() -> None:
    with pytest.raises(ValueError, match="series codes"):
        SeriesCleaning().flags(*_arrays([-1], [0], [1.0], SPEC))
