"""The recovery store is created whole once, however many processes start together."""

from __future__ import annotations

import stat
import threading
from pathlib import Path

from twinflow.errors import caused_by
from twinflow.runner import RECOVERY_PARTITIONS, recovery_config
from twinflow.settings import load_settings
from twinflow.twin import IncompatibleSnapshotError


def test_processes_starting_together_share_one_private_store(tmp_path: Path) -> None:
    store = tmp_path / "state" / "recovery"
    settings = load_settings()
    settings = settings.model_copy(
        update={"flow": settings.flow.model_copy(update={"recovery_dir": store})}
    )
    start = threading.Barrier(4)
    failures: list[BaseException] = []

    def open_store() -> None:
        start.wait()
        try:
            assert recovery_config(settings) is not None
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=open_store) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert len(list(store.glob("part-*.sqlite3"))) == RECOVERY_PARTITIONS
    assert stat.S_IMODE(store.stat().st_mode) == 0o700
    assert [p.name for p in store.parent.iterdir()] == ["recovery"]  # nothing left behind


def test_a_resume_error_is_found_under_the_errors_bytewax_wraps_it_in() -> None:
    try:
        try:
            raise IncompatibleSnapshotError("layout 3")
        except IncompatibleSnapshotError as inner:
            raise RuntimeError("error calling StatefulBatchLogic.on_batch") from inner
    except RuntimeError as outer:
        assert str(caused_by(outer, IncompatibleSnapshotError)) == "layout 3"
        assert caused_by(outer, KeyError) is None
