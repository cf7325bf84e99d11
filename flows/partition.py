"""Each raw partition's twins, run by the worker that reads the partition.

Bytewax routes keyed state by a hash of its key, whatever worker reads the source
partition, so with a stateful step every batch crossed to another worker by chance
and two workers were slower than one. Here one source partition reads a partition of
``twin.raw``, reads its own copy of the back channel, and steps that partition's
:class:`~twinflow.twin.PartitionTwins` itself: nothing is exchanged between workers.

Its snapshot holds the raw offset, the back channel's offsets and the twins (one
pickle), taken together at the end of an epoch, so a restart, or a rescale that moves
the partition to another worker or process, resumes all three from the same point.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeAlias

import numpy as np
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition

from schemas.transport import ControlBatch, InputMessage
from twinflow import metrics
from twinflow.twin import START_OVER, IncompatibleSnapshotError, PartitionTwins, StepOutput

Batch: TypeAlias = tuple[str, Sequence[InputMessage]]
ControlItem: TypeAlias = tuple[str, ControlBatch]
Step: TypeAlias = Callable[[PartitionTwins, Sequence[InputMessage] | ControlBatch], StepOutput]


@dataclass(frozen=True, slots=True)
class PickledTwins:
    """A partition's twins as its snapshot holds them: one pickle."""

    data: bytes


@dataclass(frozen=True, slots=True)
class PartitionResume:
    """Where a partition resumes: its raw source, its back channel, its twins."""

    raw: Any
    control: Any
    twins: PickledTwins | None


def pickled(twins: PartitionTwins) -> PickledTwins:
    """One pickle of a partition's twins."""
    return PickledTwins(snapshot_bytes(twins))


def snapshot_bytes(value: object) -> bytes:
    """A pickle with plain arrays stored as bytes.

    An entity's models hold a few dozen small arrays; numpy's own reduction costs about
    2.5 µs each, which made it about 40 % of a snapshot's time.
    """
    buffer = io.BytesIO()
    _SnapshotPickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(value)
    return buffer.getvalue()


def array_from_bytes(data: bytes, dtype: str, shape: tuple[int, ...]) -> np.ndarray[Any, Any]:
    """A writable array from its bytes (how snapshots store plain arrays)."""
    return np.frombuffer(bytearray(data), dtype=dtype).reshape(shape)


class _SnapshotPickler(pickle.Pickler):
    def reducer_override(self, obj: Any) -> Any:
        if (
            type(obj) is np.ndarray
            and obj.flags.c_contiguous
            and obj.dtype.fields is None
            and not obj.dtype.hasobject
        ):
            return array_from_bytes, (obj.tobytes(), obj.dtype.str, obj.shape)
        return NotImplemented


def restored(snapshot: PickledTwins) -> PartitionTwins:
    """The twins a snapshot holds, or a clear error when this twinflow cannot read them."""
    try:
        twins = pickle.loads(snapshot.data)  # noqa: S301 - the flow's own recovery store
    except (pickle.UnpicklingError, AttributeError, ImportError) as exc:
        raise IncompatibleSnapshotError(
            f"the recovery snapshot holds twin state this twinflow cannot read ({exc}). "
            f"{START_OVER}"
        ) from exc
    if not isinstance(twins, PartitionTwins):
        raise IncompatibleSnapshotError(
            f"the recovery snapshot holds a {type(twins).__name__}, not twins. {START_OVER}"
        )
    return twins


class TwinsSource(FixedPartitionedSource[StepOutput, PartitionResume]):
    """The parts of ``raw``, each with the back channel and its twins; yields step outputs.

    ``control`` has one part whose items are keyed by raw part; each partition builds its
    own copy of it and takes the items of its own key. ``start(twins)`` makes a
    partition's twins (``None``) or readies restored ones; ``step`` runs them on a batch.
    """

    def __init__(
        self,
        raw: FixedPartitionedSource[Batch, Any],
        control: FixedPartitionedSource[ControlItem, Any] | None,
        start: Callable[[PartitionTwins | None], PartitionTwins],
        step: Step,
    ) -> None:
        self.raw = raw
        self.control = control
        self.start = start
        self.step = step

    def list_parts(self) -> list[str]:
        """The raw source's parts."""
        return self.raw.list_parts()

    def build_part(
        self, step_id: str, for_part: str, resume_state: PartitionResume | None
    ) -> TwinsPartition:
        """Open the raw part and a copy of the back channel where the snapshot left them."""
        resume = resume_state or PartitionResume(None, None, None)
        raw = self.raw.build_part(step_id, for_part, resume.raw)
        control = None
        if self.control is not None:
            (control_part,) = self.control.list_parts()
            control = self.control.build_part(step_id, control_part, resume.control)
        twins = self.start(None if resume.twins is None else restored(resume.twins))
        return TwinsPartition(for_part, raw, control, twins, self.step)


class TwinsPartition(StatefulSourcePartition[StepOutput, PartitionResume]):
    """One raw part, its copy of the back channel and its twins."""

    def __init__(
        self,
        key: str,
        raw: StatefulSourcePartition[Batch, Any],
        control: StatefulSourcePartition[ControlItem, Any] | None,
        twins: PartitionTwins,
        step: Step,
    ) -> None:
        self._key = key
        self._raw = raw
        self._control = control
        self._control_done = False
        self._twins = twins
        self._step = step

    def next_batch(self) -> list[StepOutput]:
        outs: list[StepOutput] = []
        if self._control is not None and not self._control_done:
            try:
                items = self._control.next_batch()
            except StopIteration:  # a finite testing source; Kafka never ends
                self._control_done = True
                items = []
            outs.extend(self._step(self._twins, batch) for key, batch in items if key == self._key)
        outs.extend(self._step(self._twins, batch) for _key, batch in self._raw.next_batch())
        return outs

    def next_awake(self) -> datetime | None:
        awake = self._raw.next_awake()
        if self._control is None or self._control_done or awake is None:
            return awake
        control = self._control.next_awake()
        return None if control is None else min(awake, control)

    def snapshot(self) -> PartitionResume:
        with metrics.step_seconds.labels("twins_snapshot").time():
            twins = pickled(self._twins)
        control = None if self._control is None else self._control.snapshot()
        return PartitionResume(self._raw.snapshot(), control, twins)

    def close(self) -> None:
        self._raw.close()
        if self._control is not None:
            self._control.close()
