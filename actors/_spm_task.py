"""SpmTaskActor: the only writer to one pool's SPM.

It fires the verbs chains ask for, first come first served across chains, keeps at most
``max_outstanding`` tasks fired and not yet finished at the SPM, never runs two steps that
declare conflicting resources at once, and clears a task once its chain has recorded the
outcome. It knows which chain owns which task; after a restart it learns that again from the
chains (their ``Adopt`` messages) and the SPM (the poller's view).
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pykka

from actors import _chain as ch
from actors import _crash
from actors import _messages as m
from actors._pool import ThreadActor
from actors._supervisor import Supervised
from spm._errors import (
    NotReadyError,
    NotSpmError,
    SpmConnectionError,
    SpmError,
    SpmTimeoutError,
    UnknownTaskError,
)
from spm._stomp_client import NotConnectedError

if TYPE_CHECKING:

    from actors._runtime import _Core

logger = logging.getLogger(__name__)

# Refusals that say "not now" rather than "never", with nothing done: a fire stays queued and
# is tried again. (Only NotConnectedError, of the connection errors, says nothing was sent.)
_NOT_NOW = (NotSpmError, NotReadyError, NotConnectedError)
# A fire without an answer (timed out, or the connection dropped with it in flight): the SPM
# may have made the task. It is settled from the SPM's task list, never fired blindly again.
_UNKNOWN = (SpmTimeoutError, SpmConnectionError)
# An orphan's revert or clear refused for now: tried again (doing either twice is harmless).
_TRANSIENT = (NotSpmError, NotReadyError, SpmConnectionError)
# by_ref's mark of a request fired without an answer (see _UNKNOWN), until it is settled.
_UNSETTLED = ""
_SCAN_LIMIT = 1024


@dataclass(slots=True)
class _Outstanding:
    chain_id: str | None
    ref: tuple[str, int, int]
    verb: str
    exclusive: tuple[str, ...]
    shared: tuple[str, ...]
    fired_at: float
    timeout_s: float


_NEVER = float("inf")

# VDSM's AddTaskError: the SPM's own task queue is full; no task was made.
CODE_ADD_TASK_ERROR = 405


def is_queue_full(err: SpmError) -> bool:
    """The SPM refused the verb because its own task queue is full (retry later)."""
    return err.code == CODE_ADD_TASK_ERROR


class SpmTaskActor(Supervised, ThreadActor):
    kind = "spm_task"


    def __init__(self, core: _Core, pool: str) -> None:
        super().__init__()
        self.core = core
        self.pool = pool
        self.spm = core.spms[pool]
        self.max_outstanding = core.options.max_outstanding
        self.queue: deque[m.FireRequest] = deque()
        self.outstanding: dict[str, _Outstanding] = {}
        # What must outlive this actor lives in the core's per-pool record, which a restarted
        # SpmTaskActor takes over: which chain step each uncleared task was fired for (so a
        # step asked for again is never fired twice), the discards under way, the hold.
        ps = core.pool_state(pool)
        self.ps = ps
        # task id -> (chain id, ref) of every task fired (or adopted) and not yet cleared
        self.owners: dict[str, tuple[str, tuple[str, int, int]]] = ps.owners
        # (chain id, ref) -> task id, or None while queued here: a request sent twice (a
        # chain that re-sends after this actor restarted) is fired once
        self.by_ref: dict[tuple[str, tuple[str, int, int]], str | None] = ps.by_ref
        for key in [k for k, v in ps.by_ref.items() if v is None]:
            del ps.by_ref[key]  # queued in a predecessor's lost queue: asked for again
        self.discarding: dict[str, str] = ps.discarding  # task id -> "stopping" | "reverting"
        self.excl: set[str] = set()
        self.shared: Counter[str] = Counter()
        self.retry_pending = False
        self.backoff = core.options.retry_min_s
        # Discards whose revert or clear the SPM refused for now: task id -> attempts so far.
        self.orphan_retries: dict[str, int] = {}
        self.unsettled = ps.unsettled
        self.settle_pending = False
        self.settle_backoff = core.options.retry_min_s
        # Fires a predecessor sent without an answer keep their resources taken (the tasks
        # may exist) until they are settled (Begin asks for that).
        for req, _, _, _ in ps.unsettled.values():
            self._take(req.exclusive, req.shared)

    @property
    def hold(self) -> bool:
        return self.ps.hold

    @hold.setter
    def hold(self, value: bool) -> None:
        self.ps.hold = value

    # -- lifecycle -------------------------------------------------------------------------

    def _begin(self) -> None:
        # Every task a predecessor fired and did not clear, and every discard it left half
        # done, watched afresh: a Watch it sent may have been lost with a poller that failed
        # meanwhile, and a chain that never heard of its task cannot adopt it (the resync
        # that follows tells it). The ends are reported to their chains, and the discards'
        # to this actor, which reverts (if need be) and clears them.
        self._rewatch()
        # What recovery found (kept in the pool's state until done: should this actor fail
        # first, its successor does it). Tasks found on the SPM that no chain owns hold the
        # pool (``ps.hold``, set by recovery): a chain whose step was being fired when the
        # engine died may be about to fire it again, and its earlier task must be gone
        # (reverted) first. A clear that fails is tried again when the poller finds the task
        # unowned (its chain is known, see _discard).
        ps = self.ps
        if ps.unsettled:
            self._schedule_settle()
        for task_id in ps.recovery_acked:
            self._clear(task_id)
        ps.recovery_acked = []
        for task_id in ps.recovery_orphans:
            self._discard(task_id, "found on the SPM at recovery, owned by no chain")
        ps.recovery_orphans = []
        self._release_hold()

    def supervision_key(self) -> str:
        return self.pool

    # -- messages --------------------------------------------------------------------------

    def on_receive(self, message: Any) -> Any:
        self.core.faults.maybe_fail("spm_task")
        if isinstance(message, m.Batch):
            for one in message.messages:
                self._handle(one)
        elif not self._handle(message):
            return super().on_receive(message)
        self.ps.queued = len(self.queue)
        self.core.metrics.set_pool_slots(self.pool, len(self.outstanding), len(self.queue))
        return None

    def _handle(self, message: Any) -> bool:
        """Handle one message; False when it is not one of this actor's."""
        if isinstance(message, m.FireRequest):
            if self._request(message):
                self._dispatch()
        elif isinstance(message, m.Finished):
            self._finished(message.task_ids)
            self._dispatch()
        elif isinstance(message, m.Ack):
            self._clear(message.task_id)
        elif isinstance(message, m.Stop):
            self._stop_task(message.task_id)
        elif isinstance(message, m.Adopt):
            self._adopt(message)
        elif isinstance(message, m.Resync):
            self._resync(message)
        elif isinstance(message, m.Rewatch):
            self._rewatch()
        elif isinstance(message, m.Begin):
            self._begin()
        elif isinstance(message, m.Discard):
            if message.disowned:
                self.core.task_owners[message.task_id] = None  # its chain does not want it
            self._discard(message.task_id, message.reason)
        elif isinstance(message, m.OrphanEnded):
            self._orphan_ended(message.task_id, message.succeeded)
        elif isinstance(message, m.Retry):
            self.retry_pending = False
            self._dispatch()
        elif isinstance(message, m.Settle):
            self._settle()
        else:
            return False
        return True

    # -- firing ----------------------------------------------------------------------------

    def _request(self, req: m.FireRequest) -> bool:
        """A chain asks for a step (or a revert) to be fired: queued (True), unless it was
        asked for before. Then the chain is told again what became of it — the task fired for
        it, or the refusal — since it asks again only when it did not hear (a rebuilt chain
        actor, a resync): fired at most once, answered as often as asked."""
        key = (req.chain_id, req.ref)
        by_ref = self.by_ref
        if key in by_ref:
            task_id = by_ref[key]
            if task_id:  # fired (None: queued here; _UNSETTLED: answer lost, being settled)
                self._tell_chain(req.chain_id, ch.TaskFired(req.ref, task_id, time.time()))
            return False
        if self._refused_again(key):
            return False
        by_ref[key] = None
        self.queue.append(req)
        return True

    def _free(self, req: m.FireRequest) -> bool:
        excl, shared = self.excl, self.shared
        for r in req.exclusive:
            if r in excl or shared[r]:
                return False
        return all(r not in excl for r in req.shared)

    def _take(self, exclusive: tuple[str, ...], shared: tuple[str, ...]) -> None:
        self.excl.update(exclusive)
        for r in shared:
            self.shared[r] += 1

    def _release(self, exclusive: tuple[str, ...], shared: tuple[str, ...]) -> None:
        for r in exclusive:
            self.excl.discard(r)
        for r in shared:
            n = self.shared[r] - 1
            if n > 0:
                self.shared[r] = n
            else:
                del self.shared[r]

    def _next_request(self) -> m.FireRequest | None:
        q = self.queue
        head = q[0]
        if (not head.exclusive and not head.shared) or self._free(head):
            return q.popleft()
        # The head waits for a resource; the first request behind it that can go, goes (it
        # keeps FIFO among the requests that can run).
        for i, req in enumerate(q):
            if i >= _SCAN_LIMIT:
                break
            if self._free(req):
                del q[i]
                return req
        return None

    def _release_hold(self) -> None:
        if self.hold and not self.discarding and not self.ps.recovery_orphans:
            self.hold = False
            logger.info("pool %s: recovery orphans discarded; firing resumes", self.pool,
                        extra={"pool": self.pool})

    def _dispatch(self) -> None:
        if self.hold:
            return
        watch: list[m.Watched] = []
        core = self.core
        spm = self.spm
        chains = core.chains
        try:
            unsettled = self.unsettled
            while self.queue and len(self.outstanding) + len(unsettled) < self.max_outstanding:
                req = self._next_request()
                if req is None:
                    break
                if req.chain_id not in chains:
                    # Its chain ended while the request waited here (for a slot, a resource,
                    # the SPM to come back): it is not fired.
                    self.by_ref.pop((req.chain_id, req.ref), None)
                    continue
                self._take(req.exclusive, req.shared)
                _crash.reached("before_send")
                try:
                    task_id = spm.fire(req.verb, req.params)
                except SpmError as err:
                    if isinstance(err, _NOT_NOW) or is_queue_full(err):
                        self._release(req.exclusive, req.shared)
                        self.queue.appendleft(req)
                        self._schedule_retry(err)
                        break
                    if isinstance(err, _UNKNOWN):
                        self._unsettle(req, err)  # its resources stay taken
                        continue
                    self._release(req.exclusive, req.shared)
                    self.by_ref.pop((req.chain_id, req.ref), None)
                    self._tell_chain(
                        req.chain_id,
                        ch.FireRefused(req.ref, err.code, err.message, time.time()),
                    )
                    continue
                except Exception as err:  # noqa: BLE001 - a broken client fails the request
                    self._release(req.exclusive, req.shared)
                    self.by_ref.pop((req.chain_id, req.ref), None)
                    logger.exception(
                        "pool %s: firing %s for chain %s raised", self.pool, req.verb,
                        req.chain_id, extra={"chain_id": req.chain_id, "pool": self.pool},
                    )
                    self._tell_chain(
                        req.chain_id,
                        ch.FireRefused(req.ref, 100, f"{type(err).__name__}: {err}", time.time()),
                    )
                    continue
                _crash.reached("after_send")
                self.backoff = core.options.retry_min_s
                self._fired(req, task_id, time.monotonic(), watch)
        finally:
            if watch:
                core.tell_poller(self.pool, m.Watch(tuple(watch)))

    def _fired(self, req: m.FireRequest, task_id: str, now: float,
               watch: list[m.Watched], settled: bool = False) -> None:
        """``req`` made ``task_id`` (fired at ``now``): it is its chain's (to be watched), or,
        if the chain ended meanwhile, an orphan. ``settled``: found by _settle (its delay is
        not a reaction)."""
        core = self.core
        self.outstanding[task_id] = _Outstanding(
            req.chain_id, req.ref, req.verb, req.exclusive, req.shared, now, req.task_timeout_s,
        )
        key = (req.chain_id, req.ref)
        self.owners[task_id] = key
        core.task_owners[task_id] = req.chain_id
        self.by_ref[key] = task_id
        if not core.tell_chain(req.chain_id, ch.TaskFired(req.ref, task_id, time.time())):
            # It ended while the verb was on its way: the task is nobody's to keep.
            del self.owners[task_id]
            core.task_owners[task_id] = None
            self.by_ref.pop(key, None)
            self._discard(task_id, f"its chain {req.chain_id} ended as it was fired")
            return
        watch.append(m.Watched(task_id, req.chain_id, req.verb, now, req.task_timeout_s))
        if req.ref[0] == "revert":
            core.metrics.revert_fired(req.verb)
        else:
            core.metrics.step_fired(req.verb)
        if req.seen_at is not None and not settled:
            delay = max(0.0, time.time() - req.seen_at)
            if req.ref[1] > 0 or req.ref[0] == "revert":
                core.metrics.reaction(delay)  # a chain's first step reacts to nothing
            core.reaction(self.pool, delay, not self.queue)
        logger.debug(
            "pool %s: chain %s fired %s as task %s",
            self.pool,
            req.chain_id,
            req.verb,
            task_id,
            extra={"chain_id": req.chain_id, "pool": self.pool, "task_id": task_id},
        )

    # -- fires without an answer ------------------------------------------------------------

    def _unsettle(self, req: m.FireRequest, err: SpmError) -> None:
        key = (req.chain_id, req.ref)
        self.unsettled[key] = (req, err.code, err.message, time.monotonic())
        self.by_ref[key] = _UNSETTLED
        logger.warning(
            "pool %s: firing %s for chain %s got no answer (%s); whether the SPM made the "
            "task is settled from its task list", self.pool, req.verb, req.chain_id, err,
            extra={"chain_id": req.chain_id, "pool": self.pool},
        )
        self._schedule_settle()

    def _schedule_settle(self) -> None:
        if self.settle_pending:
            return
        self.settle_pending = True
        ref = self.actor_ref
        self.core.scheduler.call_later(self.settle_backoff,
                                       lambda: _tell_quietly(ref, m.Settle()))
        self.settle_backoff = min(self.settle_backoff * 2, self.core.options.retry_max_s)

    def _settle(self) -> None:
        """Each fire without an answer: the one task on the SPM that no one owns with its verb
        and parameters is its task (adopted: the chain goes on). When there is none, several,
        or the SPM does not tell parameters (VDSM), its step is refused (the chain fails it and
        reverts the others; asked for again, it is refused again) and every unowned task with
        its verb is discarded at once, the first holding the step's resources until it is
        gone: never a second task for the same step, nor a revert beside the first."""
        self.settle_pending = False
        unsettled = self.unsettled
        if not unsettled:
            return
        core = self.core
        try:
            info = self.spm.getAllTasksInfo()
        except SpmError as err:
            logger.warning("pool %s: listing the SPM's tasks to settle %d fires failed (%s); "
                           "trying again", self.pool, len(unsettled), err,
                           extra={"pool": self.pool})
            self._schedule_settle()
            return
        self.settle_backoff = core.options.retry_min_s
        owned = core.task_owners
        unowned = {tid: inf for tid, inf in info.items()
                   if tid not in owned and tid not in self.owners and tid not in self.discarding}
        watch: list[m.Watched] = []
        refused: list[tuple[m.FireRequest, str]] = []
        for key, (req, code, message, fired_at) in list(unsettled.items()):
            if req.chain_id not in core.chains:
                # Its chain ended meanwhile: a task the fire made is an orphan (the sweep).
                self._release(req.exclusive, req.shared)
                self.by_ref.pop(key, None)
                del unsettled[key]
                continue
            matches = [
                tid for tid, inf in unowned.items()
                if inf.get("verb") == req.verb and "params" in inf
                and same_params(inf["params"], req.params)  # type: ignore[typeddict-item]
            ]
            if len(matches) == 1:
                task_id = matches[0]
                del unowned[task_id]
                logger.info("pool %s: the fire of %s for chain %s made task %s", self.pool,
                            req.verb, req.chain_id, task_id,
                            extra={"chain_id": req.chain_id, "pool": self.pool,
                                   "task_id": task_id})
                del unsettled[key]
                self._fired(req, task_id, fired_at, watch, settled=True)
                continue
            event = ch.FireRefused(
                req.ref, code,
                f"{message}; whether the SPM made the task is unknown, so the step is not "
                "fired again (a task it made is discarded as an orphan)", time.time())
            self.by_ref.pop(key, None)
            self._remember_refused(key, event)
            del unsettled[key]
            refused.append((req, f"it may be the task of {req.verb} for chain {req.chain_id}, "
                                 "whose answer was lost"))
            self._tell_chain(req.chain_id, event)
        if watch:
            core.tell_poller(self.pool, m.Watch(tuple(watch)))
        for req, reason in refused:
            held = False
            for task_id, inf in list(unowned.items()):
                if inf.get("verb") != req.verb:
                    continue
                del unowned[task_id]
                if not held:
                    # It holds the step's resources until it is gone (see _orphan_ended).
                    self.outstanding[task_id] = _Outstanding(
                        None, req.ref, req.verb, req.exclusive, req.shared, time.monotonic(),
                        _NEVER)
                    held = True
                self._discard(task_id, reason)
            if not held:
                self._release(req.exclusive, req.shared)
        self._dispatch()

    def _remember_refused(self, key: tuple[str, tuple[str, int, int]],
                          event: ch.FireRefused) -> None:
        refused = self.ps.refused
        chains = self.core.chains
        for old in [k for k in refused if k[0] not in chains]:
            del refused[old]  # their chains ended
        refused[key] = event

    def _refused_again(self, key: tuple[str, tuple[str, int, int]]) -> bool:
        """A request settled as refused, asked for again: refused again (True)."""
        event = self.ps.refused.get(key)
        if event is None:
            return False
        self._tell_chain(key[0], event)
        return True

    def _schedule_retry(self, err: SpmError) -> None:
        if self.retry_pending:
            return
        logger.warning(
            "pool %s: SPM refused for now (%s); retrying in %.2f s", self.pool, err, self.backoff,
            extra={"pool": self.pool},
        )
        if self.retry_pending:
            return
        self.retry_pending = True
        ref = self.actor_ref
        self.core.scheduler.call_later(self.backoff, lambda: _tell_quietly(ref, m.Retry()))
        self.backoff = min(self.backoff * 2, self.core.options.retry_max_s)

    def _tell_chain(self, chain_id: str, event: Any) -> None:
        self.core.tell_chain(chain_id, event)

    # -- finishing and clearing ------------------------------------------------------------

    def _finished(self, task_ids: tuple[str, ...]) -> None:
        now = time.monotonic()
        metrics = self.core.metrics
        for task_id in task_ids:
            out = self.outstanding.pop(task_id, None)
            if out is None:
                continue
            self._release(out.exclusive, out.shared)
            metrics.task_ended(out.verb, now - out.fired_at)

    def _clear(self, task_id: str) -> None:
        _crash.reached("after_outcome")
        if task_id in self.outstanding:
            # The chain heard of the end before we did (a redelivery raced a restart).
            self._finished((task_id,))
            self._dispatch()
        try:
            self.spm.clearTask(task_id)
        except UnknownTaskError:
            # Already cleared (a repeated acknowledgement), or not known for now: VDSM answers
            # 401 for every task while the host is not the SPM, and lists them again after
            # spmStart. Its owner is kept, so that a task listed again is cleared as its
            # chain's, never taken for an orphan (reverted).
            owner = self.owners.pop(task_id, None)
            if owner is not None:
                self.by_ref.pop(owner, None)
            return
        except SpmError as err:
            # Left for the next report: the poller reports the task again while the SPM still
            # lists it, the chain acknowledges again, and the clear is tried again.
            logger.warning(
                "pool %s: clearing task %s failed: %s",
                self.pool,
                task_id,
                err,
                extra={"pool": self.pool, "task_id": task_id},
            )
            return
        self.core.task_owners.pop(task_id, None)
        owner = self.owners.pop(task_id, None)
        if owner is not None:
            self.by_ref.pop(owner, None)

    def _stop_task(self, task_id: str) -> None:
        try:
            self.spm.stopTask(task_id)
        except UnknownTaskError:
            pass
        except SpmError as err:
            logger.warning(
                "pool %s: stopping task %s failed: %s",
                self.pool,
                task_id,
                err,
                extra={"pool": self.pool, "task_id": task_id},
            )

    def _resync(self, msg: m.Resync) -> None:
        watch: list[m.Watched] = []
        for adopt in msg.adopts:
            watch.append(self._adopt(adopt, tell=False))
        if watch:
            self.core.tell_poller(self.pool, m.Watch(tuple(watch)))
        for task_id in msg.stops:
            self._stop_task(task_id)
        for req in msg.fires:
            self._request(req)
        self._dispatch()

    def _rewatch(self) -> None:
        now = time.monotonic()
        watch = [
            m.Watched(task_id, chain_id, "", now, self._timeout_of(task_id))
            for task_id, (chain_id, _ref) in self.owners.items()
        ]
        watch.extend(m.Watched(task_id, None, "", now, _NEVER) for task_id in self.discarding)
        if watch:
            self.core.tell_poller(self.pool, m.Watch(tuple(watch)))

    def _timeout_of(self, task_id: str) -> float:
        out = self.outstanding.get(task_id)
        return out.timeout_s if out is not None else _NEVER

    def _adopt(self, msg: m.Adopt, tell: bool = True) -> m.Watched:
        """Take ``msg.task_id`` as its chain's (after a restart); tell the poller to watch it
        (or return what to tell, to batch)."""
        self.owners[msg.task_id] = (msg.chain_id, msg.ref)
        self.core.task_owners[msg.task_id] = msg.chain_id
        self.by_ref[(msg.chain_id, msg.ref)] = msg.task_id
        now = time.monotonic()
        if msg.task_id not in self.outstanding:
            self.outstanding[msg.task_id] = _Outstanding(
                msg.chain_id, msg.ref, msg.verb, msg.exclusive, msg.shared, now,
                msg.task_timeout_s,
            )
            self._take(msg.exclusive, msg.shared)
        watched = m.Watched(msg.task_id, msg.chain_id, msg.verb, now, msg.task_timeout_s)
        if tell:
            self.core.tell_poller(self.pool, m.Watch((watched,)))
        return watched

    # -- orphans ---------------------------------------------------------------------------

    def _discard(self, task_id: str, reason: str) -> None:
        if task_id in self.discarding:
            return
        owner = self.core.task_owners.get(task_id)
        if owner is not None:
            if owner in self.core.chains:
                # Not an orphan: its live chain owns it (the poller that called it one was
                # rebuilt and had not heard of it yet). Watch it again for the chain.
                self.core.tell_poller(self.pool, m.Watch(
                    (m.Watched(task_id, owner, "", time.monotonic(), self._timeout_of(task_id)),)))
                return
            # Its chain recorded the outcome and ended before the task was cleared.
            self._clear(task_id)
            return
        logger.warning(
            "pool %s: discarding task %s: %s",
            self.pool,
            task_id,
            reason,
            extra={"pool": self.pool, "task_id": task_id},
        )
        self.core.metrics.orphan_task(self.pool)
        self.discarding[task_id] = "stopping"
        mine = self.owners.pop(task_id, None)
        if mine is not None:
            self.by_ref.pop(mine, None)
        self._stop_task(task_id)
        self.core.tell_poller(
            self.pool, m.Watch((m.Watched(task_id, None, "", time.monotonic(), _NEVER),))
        )

    def _retry_orphan(self, task_id: str, doing: str, err: SpmError) -> None:
        """The SPM refused to revert or clear a discarded task: watch it again after a backoff,
        so that the poller reports its end once more and this is tried again (the poller
        reports an orphan's end once; without this the discard, and a recovery hold on the
        pool, would never end)."""
        n = self.orphan_retries.get(task_id, 0)
        self.orphan_retries[task_id] = n + 1
        opts = self.core.options
        delay = min(opts.retry_min_s * (2 ** min(n, 30)), opts.retry_max_s)
        if n == 0 or (n & (n - 1)) == 0:  # the 1st, 2nd, 4th, 8th... failure is logged
            logger.warning(
                "pool %s: %s orphan task %s failed (%d times): %s; trying again in %.2f s",
                self.pool, doing, task_id, n + 1, err, delay,
                extra={"pool": self.pool, "task_id": task_id},
            )
        self.core.scheduler.call_later(delay, _rewatch_later(self.core, self.pool, task_id))

    def _orphan_ended(self, task_id: str, succeeded: bool) -> None:
        stage = self.discarding.get(task_id)
        if stage is None:
            return
        if succeeded and stage == "stopping":
            try:
                self.spm.revertTask(task_id)
                self.discarding[task_id] = "reverting"
                self.orphan_retries.pop(task_id, None)
                # Watch it again: its rollback ends it once more (finished/cleanSuccess).
                self.core.tell_poller(
                    self.pool, m.Watch((m.Watched(task_id, None, "", time.monotonic(), _NEVER),))
                )
                return
            except UnknownTaskError:
                pass  # gone from the SPM: nothing left to revert
            except SpmError as err:
                if isinstance(err, _TRANSIENT):
                    # Not now (the SPM is moving, unreachable): asked again, not skipped.
                    self._retry_orphan(task_id, "reverting", err)
                    return
                logger.warning(
                    "pool %s: reverting orphan task %s failed: %s",
                    self.pool,
                    task_id,
                    err,
                    extra={"pool": self.pool, "task_id": task_id},
                )
        try:
            self.spm.clearTask(task_id)
        except UnknownTaskError:
            pass
        except SpmError as err:
            self._retry_orphan(task_id, "clearing", err)
            return
        del self.discarding[task_id]
        self.orphan_retries.pop(task_id, None)
        out = self.outstanding.pop(task_id, None)
        if out is not None:
            # Its slot and its resources were held until it was gone (reverted, cleared).
            self._release(out.exclusive, out.shared)
            self._dispatch()
        self.core.task_owners.pop(task_id, None)
        if self.hold and not self.discarding:
            self._release_hold()
            self._dispatch()


def same_params(a: object, b: Mapping[str, Any]) -> bool:
    """Whether parameters an SPM reports (``a``, of any shape) are those a verb was fired with."""
    if not isinstance(a, Mapping):
        return False
    return dict(a) == dict(b)


def _rewatch_later(core: _Core, pool: str, task_id: str) -> Callable[[], None]:
    def rewatch() -> None:
        core.tell_poller(pool, m.Watch((m.Watched(task_id, None, "", time.monotonic(),
                                                  _NEVER),)))
    return rewatch


def _tell_quietly(ref: pykka.ActorRef[Any], message: Any) -> None:
    try:
        ref.tell(message)
    except pykka.ActorDeadError:
        pass
