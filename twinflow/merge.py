"""One order for a raw partition and the back channel, the same on every run.

The twins of a partition read two streams: its raw messages and the back channel
(operator verdicts, commands and their delivery results), which every partition reads
whole. Taking them in arrival order would make results depend on timing: after a crash
a verdict could land a window earlier or later than the first time. So they are merged
by Kafka time: a back-channel message goes before the first raw message stamped after
it. That needs to know, before taking a raw message, every back-channel message stamped
before it, and before taking a back-channel message, every raw message stamped before
it. Each stream therefore says how far it has been read (its *progress*): a batch's
newest timestamp, or, when its source finds nothing more to read, the wall clock less
a margin (``flow.back_channel_margin_s``: what was stamped but is not readable yet,
and the hosts' clock skew). Whatever neither progress covers waits in the state, where
recovery keeps it.

The back channel is stamped by the broker (``LogAppendTime``), so its times never go
backwards. Raw messages carry their producers' times; a raw message stamped more than
the margin before it became readable (a bridge's retries during a broker outage) may be
ordered differently on a replay, relative to back-channel messages of that interval.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from schemas.transport import ControlBatch, ControlMessage

NEVER_MS = -(2**62)
ALWAYS_MS = 2**62


@dataclass(slots=True)
class RawRun:
    """Consecutive raw messages of one partition, as columns."""

    topic: str
    partition: int
    offsets: list[int] = field(default_factory=list)
    timestamps_ms: list[int] = field(default_factory=list)
    values: list[bytes] = field(default_factory=list)


@dataclass(slots=True)
class Merge:
    """The merge of one raw partition with the back channel (picklable state).

    ``gated`` false: there is no back channel, raw messages go straight through.
    ``margin_ms``: how far behind the wall clock a caught-up raw source has read all.

    >>> merge = Merge(gated=True, margin_ms=250)
    >>> merge.add_raw("raw", 0, [7, 8], [1_000, 3_000], [b"a", b"b"], now_ms=3_100)
    >>> merge.ready()  # nothing is known of the back channel yet
    []
    >>> verdict = ControlMessage("fb", 0, 2_000, None)  # type: ignore[arg-type]
    >>> merge.add_control(ControlBatch((verdict,), progress_ms=2_500))
    >>> [p.offsets if isinstance(p, RawRun) else p.offset for p in merge.ready()]
    [[7], 0]
    >>> merge.add_control(ControlBatch((), progress_ms=4_000))
    >>> [p.offsets for p in merge.ready()]  # type: ignore[union-attr]
    [[8]]
    """

    gated: bool
    margin_ms: int = 0
    raw_progress_ms: int = NEVER_MS
    control_progress_ms: int = NEVER_MS
    held: RawRun | None = None
    pending: list[ControlMessage] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.gated:
            self.control_progress_ms = ALWAYS_MS

    def add_raw(
        self,
        topic: str,
        partition: int,
        offsets: list[int],
        timestamps_ms: list[int],
        values: list[bytes],
        now_ms: int,
    ) -> None:
        """Take a raw batch; an empty one says the source has read all there is."""
        if not offsets:
            self.raw_progress_ms = max(self.raw_progress_ms, now_ms - self.margin_ms)
            return
        self.raw_progress_ms = max(self.raw_progress_ms, max(timestamps_ms))
        if self.held is None:
            self.held = RawRun(topic, partition, offsets, timestamps_ms, values)
        else:
            self.held.offsets += offsets
            self.held.timestamps_ms += timestamps_ms
            self.held.values += values

    def add_control(self, batch: ControlBatch) -> None:
        """Take a back-channel batch (its messages in stamp order)."""
        self.pending.extend(batch.messages)
        self.control_progress_ms = max(self.control_progress_ms, batch.progress_ms)

    @property
    def clock_ms(self) -> int:
        """Everything stamped at or before this has been merged or is ready to be."""
        return min(self.raw_progress_ms, self.control_progress_ms)

    def ready(self) -> list[RawRun | ControlMessage]:
        """What can be taken now, in merged order; the rest waits."""
        taken: list[RawRun | ControlMessage] = []
        held, pending = self.held, self.pending
        times = held.timestamps_ms if held is not None else []
        i = j = 0
        while True:
            event = pending[j] if j < len(pending) else None
            if i < len(times) and (event is None or times[i] <= event.timestamp_ms):
                limit = self.control_progress_ms if event is None else event.timestamp_ms
                end = i
                while end < len(times) and times[end] <= limit:
                    end += 1
                if end == i:
                    break
                assert held is not None
                taken.append(
                    RawRun(
                        held.topic,
                        held.partition,
                        held.offsets[i:end],
                        times[i:end],
                        held.values[i:end],
                    )
                )
                i = end
            elif event is not None and (
                i < len(times) or event.timestamp_ms <= self.raw_progress_ms
            ):
                taken.append(event)
                j += 1
            else:
                break
        if held is not None and i:
            self.held = (
                None
                if i == len(times)
                else RawRun(
                    held.topic, held.partition, held.offsets[i:], times[i:], held.values[i:]
                )
            )
        if j:
            del pending[:j]
        return taken
