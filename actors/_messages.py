"""Messages between the runtime's actors (chain events live in actors._chain)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class FireRequest:
    """CommandActor → SpmTaskActor: fire ``verb`` for the chain's step or revert ``ref``.

    ``seen_at`` is when the event that led to this request was seen (``time.time()``: a task's
    end seen by the poller, a hook done, the chain started), for the reaction-latency metric
    and the pool's admission; None for a request sent again (after a restart).
    """

    chain_id: str
    ref: tuple[str, int, int]
    verb: str
    params: Mapping[str, Any]
    exclusive: tuple[str, ...]
    shared: tuple[str, ...]
    task_timeout_s: float
    seen_at: float | None = None


@dataclass(frozen=True, slots=True)
class Adopt:
    """CommandActor → SpmTaskActor: ``task_id`` (fired for ``ref``) is mine and not yet ended.

    Sent when a chain is rebuilt, or when the pool's SpmTaskActor or PollerActor restarted.
    """

    chain_id: str
    ref: tuple[str, int, int]
    task_id: str
    verb: str
    exclusive: tuple[str, ...]
    shared: tuple[str, ...]
    task_timeout_s: float


@dataclass(frozen=True, slots=True)
class Ack:
    """CommandActor → SpmTaskActor: the chain recorded the outcome of ``task_id``: clear it."""

    chain_id: str
    task_id: str


@dataclass(frozen=True, slots=True)
class Batch:
    """Several messages for one actor, handled in order as if sent one by one."""

    messages: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class Stop:
    task_id: str


@dataclass(frozen=True, slots=True)
class Discard:
    """Stop ``task_id``, revert it if it finished successfully, then clear it (an orphan).
    ``disowned``: sent by the chain that owned it (no longer wanted), not found unowned."""

    task_id: str
    reason: str
    disowned: bool = False


@dataclass(frozen=True, slots=True)
class Finished:
    """PollerActor → SpmTaskActor: these tasks finished on the SPM (their slots are free)."""

    task_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Watched:
    """One task the poller reports on: its owner, verb and when it was fired (monotonic)."""

    task_id: str
    chain_id: str | None  # None: an orphan being discarded (reported to the SpmTaskActor)
    verb: str
    fired_at: float
    timeout_s: float  # running longer than this makes it a zombie (inf: never)


@dataclass(frozen=True, slots=True)
class Watch:
    """SpmTaskActor → PollerActor: report these tasks' ends to their owners."""

    tasks: tuple[Watched, ...]


@dataclass(frozen=True, slots=True)
class Unwatch:
    """SpmTaskActor → PollerActor: these tasks were cleared; stop reporting them."""

    task_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class PollTick:
    generation: int


@dataclass(frozen=True, slots=True)
class Retry:
    """Timer → SpmTaskActor: try dispatching and clearing again after a transient error."""


@dataclass(frozen=True, slots=True)
class Settle:
    """Timer → SpmTaskActor: find out from the SPM's task list whether the fires whose answer
    was lost (a timeout, a connection dropped in flight) made a task."""


@dataclass(frozen=True, slots=True)
class Resync:
    """Runtime → a restarted SpmTaskActor: what every live chain of its pool has in flight
    (``adopts``), still wants fired (``fires``) and decided to stop (``stops``), read from the
    chains' last recorded states. One message, however many chains."""

    adopts: tuple[Adopt, ...]
    fires: tuple[FireRequest, ...]
    stops: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Begin:
    """Runtime → SpmTaskActor, its first message, sent once its ref is where the PollerActor
    finds it: watch the discards a predecessor left half done, clear and discard what recovery
    found. (Work started before that could be answered to no one: an orphan the poller saw
    end at its first poll was reported to a pool that had no SpmTaskActor yet.)"""


@dataclass(frozen=True, slots=True)
class Rewatch:
    """Runtime → SpmTaskActor: the pool's PollerActor was rebuilt; tell it every task again."""


@dataclass(frozen=True, slots=True)
class GetState:
    """ask() a CommandActor for its ChainState."""


@dataclass(frozen=True, slots=True)
class OrphanEnded:
    """PollerActor → SpmTaskActor: a discarded orphan task ended; ``succeeded`` as polled."""

    task_id: str
    succeeded: bool


@dataclass(frozen=True, slots=True)
class ChildFailed:
    """Actor → SupervisorActor (from on_failure): ``kind``/``key`` failed with ``error``."""

    kind: str
    key: str
    error: str
