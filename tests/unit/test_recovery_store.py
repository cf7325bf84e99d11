"""The recovery store: where its partitions live, and the marker of its format."""

from __future__ import annotations

import functools
import json
import stat
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from twinflow import __version__
from twinflow.errors import TwinflowError, caused_by
from twinflow.recovery_store import (
    MARKER,
    PARTITIONS,
    STORE_FORMAT,
    init_db_dir,
    partition_files,
    prepare_store,
    read_marker,
)
from twinflow.runner import recovery_config
from twinflow.settings import load_settings
from twinflow.twin import IncompatibleSnapshotError

ALL = [f"part-{p}.sqlite3" for p in range(PARTITIONS)]


def _together(actions: Sequence[Callable[[], object]]) -> None:
    """Run ``actions`` in threads released at once, as processes starting together."""
    start = threading.Barrier(len(actions))
    failures: list[BaseException] = []

    def act(action: Callable[[], object]) -> None:
        start.wait()
        try:
            action()
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=act, args=(action,)) for action in actions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


def test_processes_starting_together_share_one_private_store(tmp_path: Path) -> None:
    store = tmp_path / "state" / "recovery"
    settings = load_settings()
    settings = settings.model_copy(
        update={"flow": settings.flow.model_copy(update={"recovery_dir": store})}
    )
    _together([lambda: recovery_config(settings)] * 4)
    assert partition_files(store) == ALL
    assert stat.S_IMODE(store.stat().st_mode) == 0o700
    assert [p.name for p in store.parent.iterdir()] == ["recovery"]  # nothing left behind


def test_in_a_cluster_process_0_keeps_every_partition_and_the_others_none(
    tmp_path: Path,
) -> None:
    for process_id in range(3):
        prepare_store(tmp_path / f"store-{process_id}", process_id)
    assert partition_files(tmp_path / "store-0") == ALL
    assert partition_files(tmp_path / "store-1") == partition_files(tmp_path / "store-2") == []
    for process_id in range(3):
        store = tmp_path / f"store-{process_id}"
        assert stat.S_IMODE(store.stat().st_mode) == 0o700
        marker = read_marker(store)
        assert marker is not None
        assert marker.format == STORE_FORMAT
        assert marker.written_by == f"twinflow {__version__}"
        assert marker.partitions == (tuple(range(PARTITIONS)) if process_id == 0 else ())


@pytest.mark.parametrize("round_", range(5))
def test_processes_of_a_cluster_sharing_one_folder_make_each_partition_once(
    tmp_path: Path, round_: int
) -> None:
    store = tmp_path / "recovery"
    # Whichever process creates the store first, process 0 ends up adding the partitions.
    order = [3, 1, 0, 2][round_ % 4 :] + [3, 1, 0, 2][: round_ % 4]
    _together([functools.partial(prepare_store, store, process_id) for process_id in order])
    assert partition_files(store) == ALL
    marker = read_marker(store)
    assert marker is not None and marker.partitions == tuple(range(PARTITIONS))
    assert sorted(p.name for p in store.iterdir()) == [*ALL, MARKER]
    assert [p.name for p in tmp_path.iterdir()] == ["recovery"]


def test_process_0_fills_a_shared_store_another_process_made_first(tmp_path: Path) -> None:
    store = tmp_path / "recovery"
    prepare_store(store, 1)
    assert partition_files(store) == []
    prepare_store(store, 0)
    prepare_store(store, 2)
    assert partition_files(store) == ALL
    assert sorted(p.name for p in store.iterdir()) == [*ALL, MARKER]


def test_a_process_added_later_makes_an_empty_store(tmp_path: Path) -> None:
    prepare_store(tmp_path / "store-0", 0)
    prepare_store(tmp_path / "store-3", 3)
    assert partition_files(tmp_path / "store-3") == []


def test_a_store_of_another_format_is_refused_with_the_fix_and_left_alone(
    tmp_path: Path,
) -> None:
    store = tmp_path / "recovery"
    prepare_store(store)
    foreign = json.dumps({"format": STORE_FORMAT + 1, "written_by": "twinflow 9.0.0"})
    (store / MARKER).write_text(foreign)
    with pytest.raises(TwinflowError) as refused:
        prepare_store(store)
    message = str(refused.value)
    assert f"format {STORE_FORMAT + 1}" in message and "twinflow 9.0.0" in message
    assert f"twinflow {__version__} reads format {STORE_FORMAT}" in message
    assert f"mv {store} {store}.old" in message and "idempotent" in message
    assert (store / MARKER).read_text() == foreign
    assert partition_files(store) == ALL


def test_a_store_of_an_earlier_twinflow_is_adopted_as_it_is(tmp_path: Path) -> None:
    store = tmp_path / "recovery"
    store.mkdir(mode=0o700)
    init_db_dir(store, PARTITIONS)
    before = {p.name: p.read_bytes() for p in store.iterdir()}
    prepare_store(store, 1)
    marker = read_marker(store)
    assert marker is not None
    assert marker.format == STORE_FORMAT
    assert marker.partitions == tuple(range(PARTITIONS))
    assert {p.name: p.read_bytes() for p in store.iterdir() if p.name != MARKER} == before


def test_an_unreadable_marker_stops_with_its_path(tmp_path: Path) -> None:
    store = tmp_path / "recovery"
    prepare_store(store)
    (store / MARKER).write_text("{not json")
    with pytest.raises(TwinflowError, match=rf"marker {store / MARKER} cannot be read"):
        prepare_store(store)


def test_lost_partitions_are_not_made_again(tmp_path: Path) -> None:
    # Made again they would be empty: the flow would start over without a word, where
    # Bytewax's missing-partitions error names the loss.
    store = tmp_path / "recovery"
    prepare_store(store, 0)
    (store / "part-2.sqlite3").unlink()
    prepare_store(store, 0)
    assert partition_files(store) == [name for name in ALL if name != "part-2.sqlite3"]


def test_missing_partitions_in_a_cluster_name_process_0s_store() -> None:
    from twinflow import runner

    settings = load_settings()
    message = runner._damaged(settings, 2, RuntimeError("Missing recovery partitions {2} of 4"))
    assert "this is process 2" in message
    assert "put the missing part-N.sqlite3 files" in message
    assert "-wal and -shm" in message and "into process 0's store" in message
    single = runner._damaged(settings, None, RuntimeError("Missing"))
    assert "is damaged" in single and "process 0" not in single


def test_a_resume_error_is_found_under_the_errors_bytewax_wraps_it_in() -> None:
    try:
        try:
            raise IncompatibleSnapshotError("layout 3")
        except IncompatibleSnapshotError as inner:
            raise RuntimeError("error calling StatefulBatchLogic.on_batch") from inner
    except RuntimeError as outer:
        assert str(caused_by(outer, IncompatibleSnapshotError)) == "layout 3"
        assert caused_by(outer, KeyError) is None
