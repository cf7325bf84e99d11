"""The flow's recovery store: Bytewax's partitions, and a marker of the store's format.

**Where the partitions live.** A Bytewax cluster resumes from the union of the
partitions its processes find in their own stores, and when several processes hold a
copy of one partition, one of them (chosen by the processes that are present) reads
and writes it while the other copies stay as they were made: empty. A cluster whose
every process made a store of all partitions (one volume per pod) therefore resumes
right only while the same processes come back. Scaled down, it has to read the
partitions of the removed process from empty copies: in the chaos tier's recipe 14 it
then crashed at start ("Send thread panic") or started over from the beginning of the
topics without a word. So one process holds every partition: process 0, or the only
process. The others' stores hold none, only the marker. A Kubernetes StatefulSet
removes the highest ordinals when it scales down, so process 0 and the partitions stay;
a process added later makes an empty store and duplicates nothing.

**The format marker** (``twinflow-store.json``) says which twinflow layout of snapshots
the store holds. Snapshots are pickles of the flow's steps (the sources' offsets, the
twins, the windows); a twinflow that pickles them differently cannot read them, and
must say so before it starts instead of failing on the first unpickling.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bytewax import recovery

from twinflow import __version__
from twinflow.errors import ConfigError, TwinflowError

log = logging.getLogger("twinflow.run")

PARTITIONS = 4
"""Recovery partitions of a new store; any worker and process count can share them."""
STORE_FORMAT = 1
"""The layout of the snapshots the store holds, beyond the twins' own ``STATE_VERSION``.

Raise it when a change makes older snapshots unreadable outside the twins: a step id
renamed or removed, a source's resume state of another type. 1: the first marked store.
"""
MARKER = "twinflow-store.json"
# Bytewax's Rust entry point has no typed stub; this is its signature.
init_db_dir: Callable[[Path, int], None] = recovery.init_db_dir
START_OVER = (
    "outputs are idempotent, so reprocessing from the beginning of the topics rewrites "
    "the same rows"
)


@dataclass(frozen=True)
class StoreMarker:
    """What ``twinflow-store.json`` records about the store it sits in."""

    format: int
    written_by: str
    partitions: tuple[int, ...]
    """The partitions created in this store: all for process 0, none for the others."""

    def as_json(self) -> str:
        return json.dumps(
            {"format": self.format, "written_by": self.written_by, "partitions": self.partitions}
        )


def holds_partitions(process_id: int | None) -> bool:
    """Whether process ``process_id`` of a cluster (None: the only process) keeps them."""
    return not process_id


def partition_files(store: Path) -> list[str]:
    """The Bytewax partitions in ``store``, by file name."""
    return sorted(part.name for part in store.glob("part-*.sqlite3"))


def prepare_store(store: Path, process_id: int | None = None) -> None:
    """Make ``store`` ready for process ``process_id``: create it, or check and adopt it.

    Raises :class:`ConfigError` for a store others can read, :class:`TwinflowError` for
    a store of another format.
    """
    if not store.exists() and _create(store, holds_partitions(process_id)):
        return
    if store.stat().st_mode & 0o077:
        raise ConfigError(
            f"recovery store {store} is readable by others; its snapshots are pickles. "
            f"Run chmod 700 {store}"
        )
    marker = read_marker(store)
    if marker is None:
        _adopt(store, process_id)
    elif marker.format != STORE_FORMAT:
        raise TwinflowError(
            f"the recovery store {store} holds snapshots of format {marker.format} (written "
            f"by {marker.written_by}); this twinflow {__version__} reads format "
            f"{STORE_FORMAT} only. Move the store away (e.g. mv {store} {store}.old) to "
            f"start over: {START_OVER}. Or run the twinflow that wrote it."
        )
    elif holds_partitions(process_id) and not marker.partitions and not partition_files(store):
        # Processes sharing one store folder (one host) start together; another process
        # made the store first, empty, as it should for itself.
        _fill(store)


def read_marker(store: Path) -> StoreMarker | None:
    """The store's marker, or None when it has none (made by an earlier twinflow)."""
    path = store / MARKER
    try:
        data = json.loads(path.read_text())
        return StoreMarker(
            format=int(data["format"]),
            written_by=str(data.get("written_by", "an unknown twinflow")),
            partitions=tuple(int(p) for p in data.get("partitions", ())),
        )
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise TwinflowError(
            f"the recovery store's marker {path} cannot be read ({exc}). Restore it from a "
            f"backup, or move the store {store} away to start over: {START_OVER}."
        ) from None


def _marker(partitions: list[int]) -> StoreMarker:
    return StoreMarker(STORE_FORMAT, f"twinflow {__version__}", tuple(partitions))


def _write_marker(store: Path, marker: StoreMarker) -> None:
    # Written aside and renamed: a process that dies half-way leaves the old marker.
    fd, name = tempfile.mkstemp(prefix=f".{MARKER}-", dir=store)
    with os.fdopen(fd, "w") as out:
        out.write(marker.as_json() + "\n")
    Path(name).replace(store / MARKER)


def _create(store: Path, with_partitions: bool) -> bool:
    """Create the store whole; False when another process of the cluster made it first.

    Processes sharing one store folder start together and each finds no store: each
    builds one beside it and renames it into place, which only the first rename does.
    """
    store.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{store.name}-", dir=store.parent))
    try:  # mkdtemp makes it private (0700): snapshots are pickles
        if with_partitions:
            init_db_dir(building, PARTITIONS)
        _write_marker(building, _marker(list(range(PARTITIONS)) if with_partitions else []))
        building.rename(store)
    except OSError:
        if not store.is_dir():
            raise
        log.info("recovery store %s was created by another process", store)
        return False
    finally:
        shutil.rmtree(building, ignore_errors=True)
    if with_partitions:
        log.info("created recovery store %s (%d partitions)", store, PARTITIONS)
    else:
        log.info("created recovery store %s (empty: process 0 keeps the partitions)", store)
    return True


def _fill(store: Path) -> None:
    building = Path(tempfile.mkdtemp(prefix=f".{store.name}-", dir=store.parent))
    try:
        init_db_dir(building, PARTITIONS)
        for part in sorted(building.iterdir()):
            part.rename(store / part.name)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    _write_marker(store, _marker(list(range(PARTITIONS))))
    log.info("added %d partitions to recovery store %s", PARTITIONS, store)


def _adopt(store: Path, process_id: int | None) -> None:
    # The twins' own STATE_VERSION still guards what an earlier twinflow pickled.
    found = partition_files(store)
    _write_marker(store, _marker([int(name[5:].split(".")[0]) for name in found]))
    log.info("recovery store %s: marked as format %d", store, STORE_FORMAT)
    if found and not holds_partitions(process_id):
        log.warning(
            "recovery store %s of process %s holds partitions %s: an earlier twinflow gave "
            "every process of a cluster a copy of all of them. Do not scale the cluster "
            "down before it is moved to the current layout (README, Recovery in a cluster)",
            store,
            process_id,
            ", ".join(found),
        )
