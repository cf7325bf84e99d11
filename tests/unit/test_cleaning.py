from schemas.outputs import Flag
from twinflow.cleaning import SensorHistory, quality_flags
from twinflow.twin_model import SensorSpec

SPEC = SensorSpec(unit="A", range=(0, 300), max_rate=100, stuck_after_s=30)


def _flags(
    values: list[float], history: SensorHistory | None = None, start_s: int = 0
) -> list[int]:
    history = history or SensorHistory()
    return [quality_flags(SPEC, history, (start_s + i) * 1000, v) for i, v in enumerate(values)]


def test_a_lone_spike_is_flagged_and_the_signal_goes_on_clean() -> None:
    values = [100.0, 100.5, 99.8, 100.2, 100.1, 99.9, 100.3, 180.0, 100.0, 100.4, 99.7]
    flags = _flags(values)
    assert flags[7] & Flag.SPIKE
    assert not any(f & Flag.SPIKE for i, f in enumerate(flags) if i != 7)


def test_a_level_shift_becomes_the_new_normal() -> None:
    # An overload: current jumps 40 % and stays. Only its first readings look like spikes.
    values = [100.0 + 0.3 * (i % 3) for i in range(20)] + [140.0 + 0.3 * (i % 3) for i in range(40)]
    flags = _flags(values)
    spikes = [i for i, f in enumerate(flags) if f & Flag.SPIKE]
    assert spikes and max(spikes) < 20 + 6
    assert not any(f & Flag.SPIKE for f in flags[30:])


def test_rate_stuck_and_gap() -> None:
    history = SensorHistory()
    assert _flags([100.0, 100.2, 100.1, 100.3], history) == [0, 0, 0, 0]
    assert quality_flags(SPEC, history, 4000, 250.0) & Flag.RATE  # +150 A in 1 s
    stuck = [quality_flags(SPEC, history, (6 + i) * 1000, 120.0) for i in range(40)]
    assert not stuck[0] & Flag.STUCK and stuck[-1] & Flag.STUCK
    assert quality_flags(SPEC, history, 200_000, 121.0) & Flag.GAP


def test_out_of_order_readings_leave_the_history_in_order() -> None:
    history = SensorHistory()
    _flags([100.0, 100.2, 100.1, 100.3], history, start_s=10)
    before = (history.last_ts_ms, history.last_value)
    assert quality_flags(SPEC, history, 5000, 100.1) == 0
    assert (history.last_ts_ms, history.last_value) == before


def test_a_new_sampling_rate_becomes_the_typical_interval() -> None:
    history = SensorHistory()
    fast = [quality_flags(SPEC, history, i * 150, 100.0 + (i % 2)) for i in range(20)]
    assert not any(f & Flag.GAP for f in fast)
    start = 20 * 150
    slow = [quality_flags(SPEC, history, start + i * 2000, 100.0 + (i % 2)) for i in range(1, 20)]
    gaps = [i for i, f in enumerate(slow) if f & Flag.GAP]
    assert gaps and max(gaps) < 6
    assert not any(f & Flag.GAP for f in slow[6:])
