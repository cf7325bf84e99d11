"""What the sources hand the twins: Kafka messages of ``twin.raw`` and of the back channel.

These travel between the connectors, which build them, and the twins' step, which reads
them; Bytewax pickles them between workers and into recovery snapshots.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import overload

import numpy as np
import numpy.typing as npt

from schemas import deadletter
from schemas.control import Command, CommandResult, Feedback
from schemas.raw import Reason


@dataclass(frozen=True, slots=True)
class InputMessage:
    """One Kafka message of ``twin.raw``, with its coordinates."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    value: bytes

    def dead_letter(
        self, reason: Reason, detail: str, entity_id: str | None = None
    ) -> deadletter.DeadLetter:
        """The message as a dead letter, with its Kafka coordinates."""
        return deadletter.dead_letter(
            self.value,
            reason,
            detail,
            deadletter.Source(
                kind="kafka", topic=self.topic, partition=self.partition, offset=self.offset
            ),
            # The message's Kafka time, not the clock: a replay rebuilds the same letter.
            datetime.fromtimestamp(self.timestamp_ms / 1000, UTC),
            entity_id=entity_id,
        )


class MessageBatch(Sequence[InputMessage]):
    """Consecutive messages of one partition, column by column.

    The source builds these instead of one object per message (a third of the cost of
    reading a message); the step reads the columns, and an :class:`InputMessage` is
    made only for a message that becomes a dead letter.
    """

    __slots__ = ("offsets", "partition", "timestamps_ms", "topic", "values")

    def __init__(
        self,
        topic: str,
        partition: int,
        offsets: list[int],
        timestamps_ms: list[int],
        values: list[bytes],
    ) -> None:
        self.topic = topic
        self.partition = partition
        self.offsets = offsets
        self.timestamps_ms = timestamps_ms
        self.values = values

    @classmethod
    def of(cls, messages: Sequence[InputMessage]) -> MessageBatch:
        """The columns of messages given one by one (all of one partition)."""
        if isinstance(messages, MessageBatch):
            return messages
        first = messages[0] if messages else InputMessage("", 0, 0, 0, b"")
        return cls(
            first.topic,
            first.partition,
            [m.offset for m in messages],
            [m.timestamp_ms for m in messages],
            [m.value for m in messages],
        )

    def __len__(self) -> int:
        return len(self.values)

    @overload
    def __getitem__(self, index: int) -> InputMessage: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[InputMessage]: ...
    def __getitem__(self, index: int | slice) -> InputMessage | Sequence[InputMessage]:
        if isinstance(index, slice):
            return MessageBatch(
                self.topic,
                self.partition,
                self.offsets[index],
                self.timestamps_ms[index],
                self.values[index],
            )
        return InputMessage(
            self.topic,
            self.partition,
            self.offsets[index],
            self.timestamps_ms[index],
            self.values[index],
        )

    def __getstate__(self) -> tuple[str, int, list[int], list[int], list[bytes]]:
        return self.topic, self.partition, self.offsets, self.timestamps_ms, self.values

    def __setstate__(self, state: tuple[str, int, list[int], list[int], list[bytes]]) -> None:
        self.topic, self.partition, self.offsets, self.timestamps_ms, self.values = state


ControlPayload = Feedback | Command | CommandResult


@dataclass(frozen=True, slots=True)
class ControlMessage:
    """One decoded back-channel message, with its Kafka coordinates."""

    topic: str
    offset: int
    timestamp_ms: int
    message: ControlPayload


@dataclass(frozen=True, slots=True)
class ControlBatch:
    """What the back-channel source hands every raw partition's twins."""

    messages: tuple[ControlMessage, ...]
    progress_ms: int
    """Every back-channel message stamped at or before this has been read."""
    dead_letters: tuple[deadletter.DeadLetter, ...] = ()
    """Messages that did not decode; on one partition's copy only, so each is one letter."""
    reports: bool = False
    """Whether this copy reports problems (dead letters, refused commands): one copy does."""


@dataclass(frozen=True, slots=True)
class CodedStrings:
    """A column of strings as codes into its distinct ``names`` (dictionary encoding).

    Entity and sensor columns repeat a few names; coded, they become QuestDB symbol
    columns (pandas categoricals) without hashing every row.

    >>> column = CodedStrings.of(["b", "a", "b"])
    >>> column.codes.tolist(), column.names.tolist(), column.decoded().tolist()
    ([1, 0, 1], ['a', 'b'], ['b', 'a', 'b'])
    """

    codes: npt.NDArray[np.int64]
    names: npt.NDArray[np.object_]
    """Distinct: each name once."""

    @classmethod
    def of(cls, values: Sequence[str]) -> CodedStrings:
        names, codes = np.unique(np.asarray(values, dtype=object), return_inverse=True)
        return cls(codes.astype(np.int64), names)

    def __len__(self) -> int:
        return len(self.codes)

    def decoded(self) -> npt.NDArray[np.object_]:
        """The strings, one per row."""
        return self.names[self.codes]
