"""The bare-asyncio baseline: the load test's chains run by one coroutine each, nothing else.

Same workload and same simulator as ``spmchain loadtest``: the chains come from
:func:`actors._loadtest.chain_spec` (``--steps`` createVolume steps in an image of their own, on
pool ``index % pools``) and the SPMs from :func:`actors._loadtest.build_spms` (one in-process
:class:`~spm._simulator.SimulatedSpm` per pool, ``--spm-workers`` workers, ``--task-ms`` per
task). What is left out is everything the runtime adds: no snapshots, no actors, no revert, no
supervision, no metrics, no recovery after a crash.

How it runs, the way a bare implementation would:

* one coroutine per chain: for each step it takes a slot of its pool's semaphore
  (``--max-outstanding``, FIFO), fires the verb (``SpmClient.fire``), and awaits the task's end;
  a step whose task did not end with ``success`` ends the chain with failure (nothing is
  reverted). A fire refused because the SPM's queue is full (405) is retried after a pause
  (10 ms doubling to 1 s); any other SPM error ends the chain with failure.
* one poller coroutine per pool: every tick one ``getAllTasksStatuses`` call, each finished
  task's future resolved and the task cleared (``clearTask``). The tick adapts as the runtime's
  does: ``--poll-min-ms`` after activity (a task fired or ended), doubling while nothing changes
  up to ``--poll-max-ms``; a fire during a long sleep brings the next poll to ``--poll-min-ms``
  from then. A failed poll is counted and the next tick comes as usual.

The report (printed, and written with ``--json FILE``) has the loadtest's keys where they mean
the same thing: ``steps_per_s``, ``wall_s``, ``peak_rss_mib``, ``ended_successfully``,
``not_ended``, ``duplicated_effects`` (from the simulators' ledgers: 0 expected),
``reaction_latency_ms`` (from a task's end on the SPM, as the simulator's ledger records it, to
the next step of its chain fired) and ``spm_utilization`` (busy worker time over workers x pools
x wall time, when tasks take time). The exit status is 0 when every chain ended successfully
with no duplicated effect, 1 otherwise (including ``--timeout`` passing).

The simulator's calls are synchronous and in-process, so they run on the event loop thread; a
bare implementation over the wire would await them instead, which costs more, not less.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from actors._cli import parse_duration_ms
from actors._loadtest import (
    LoadtestConfig,
    build_spms,
    chain_spec,
    check_ledgers,
    machine,
    peak_rss_mib,
    pool_ids,
    spm_utilization,
)
from actors._spec import ChainSpec
from spm._client import SpmClient, TaskStatus
from spm._simulator import TaskQueueFullError

logger = logging.getLogger("bench.baseline_asyncio")

RETRY_MIN_S = 0.01
RETRY_MAX_S = 1.0


class PoolPoller:
    """One pool's poller: resolves the future of each watched task when the SPM lists it
    finished, then clears the task. Errors of a poll are counted (``errors``) and logged once
    in a while; polling goes on."""

    def __init__(self, spm: SpmClient, min_s: float, max_s: float) -> None:
        self.spm = spm
        self.min_s = min_s
        self.max_s = max_s
        self.interval = min_s
        self.waiting: dict[str, asyncio.Future[TaskStatus]] = {}
        self.activity = False
        self.wake = asyncio.Event()
        self.polls = 0
        self.errors = 0
        self.clear_errors = 0
        self._logged_at = 0.0

    def watch(self, task_id: str) -> asyncio.Future[TaskStatus]:
        """The future of ``task_id``'s final status; must be called right after the fire, before
        the caller yields to the loop."""
        fut: asyncio.Future[TaskStatus] = asyncio.get_running_loop().create_future()
        self.waiting[task_id] = fut
        self.activity = True
        if self.interval > self.min_s:
            self.interval = self.min_s
            self.wake.set()
        return fut

    async def run(self) -> None:
        """Poll until cancelled."""
        while True:
            self.wake.clear()
            try:
                await asyncio.wait_for(self.wake.wait(), self.interval)
                continue  # woken from a long sleep by a fire: next poll in min_s
            except TimeoutError:
                pass
            self.poll()

    def poll(self) -> None:
        """One ``getAllTasksStatuses``; resolve and clear each finished watched task."""
        try:
            statuses = self.spm.getAllTasksStatuses()
        except Exception as err:  # noqa: BLE001 - counted and logged; polling goes on
            self.errors += 1
            now = time.monotonic()
            if now - self._logged_at > 5.0:
                self._logged_at = now
                logger.warning("pool %s: polling failed (%d so far): %s",
                               self.spm.pool, self.errors, err)
            self.interval = min(self.interval * 2, self.max_s)
            return
        self.polls += 1
        changed = self.activity
        self.activity = False
        waiting = self.waiting
        for task_id, fut in list(waiting.items()):
            st = statuses.get(task_id)
            if st is None or st["taskState"] != "finished":
                continue
            del waiting[task_id]
            changed = True
            try:
                self.spm.clearTask(task_id)
            except Exception:  # noqa: BLE001 - the outcome is known; the task stays listed
                self.clear_errors += 1
            if not fut.done():
                fut.set_result(st)
        self.interval = self.min_s if changed else min(self.interval * 2, self.max_s)


class Baseline:
    """The chains, their pools' pollers and semaphores, and what the run counted."""

    def __init__(self, spms: Mapping[str, SpmClient], max_outstanding: int, poll_min_s: float,
                 poll_max_s: float, clock: Callable[[], float]) -> None:
        self.spms = spms
        self.clock = clock
        self.pollers = {p: PoolPoller(s, poll_min_s, poll_max_s) for p, s in spms.items()}
        self.slots = {p: asyncio.Semaphore(max_outstanding) for p in spms}
        self.ok = 0
        self.failed: list[ChainSpec] = []
        self.reasons: dict[str, int] = {}
        self.steps_fired = 0
        self.fire_retries = 0
        # (task id of step k, time step k+1 was fired, on the simulator's clock)
        self.pairs: list[tuple[str, float]] = []

    async def run_chain(self, spec: ChainSpec) -> None:
        """Run one chain's steps in order; count how it ended."""
        spm = self.spms[spec.pool]
        poller = self.pollers[spec.pool]
        slots = self.slots[spec.pool]
        previous: str | None = None
        for step in spec.steps or ():
            async with slots:
                fired = await self._fire(spm, step.verb, step.params)
                if isinstance(fired, str):
                    self._fail(spec, fired)
                    return
                task_id, fired_at = fired
                fut = poller.watch(task_id)
                self.steps_fired += 1
                if previous is not None:
                    self.pairs.append((previous, fired_at))
                status = await fut
            if status["taskResult"] != "success":
                self._fail(spec, f"task {status['code']}")
                return
            previous = task_id
        self.ok += 1

    async def _fire(self, spm: SpmClient, verb: str,
                    params: Mapping[str, Any]) -> tuple[str, float] | str:
        """(task id, fired at), or why the SPM refused the verb for good."""
        pause = RETRY_MIN_S
        while True:
            fired_at = self.clock()
            try:
                return spm.fire(verb, params), fired_at
            except TaskQueueFullError:
                self.fire_retries += 1
                await asyncio.sleep(pause)
                pause = min(pause * 2, RETRY_MAX_S)
            except Exception as err:  # noqa: BLE001 - the chain ends with failure, says why
                return f"fire refused {getattr(err, 'code', 100)}"

    def _fail(self, spec: ChainSpec, reason: str) -> None:
        self.failed.append(spec)
        self.reasons[reason] = self.reasons.get(reason, 0) + 1


def _percentile(values: Sequence[float], q: float) -> float:
    i = min(len(values) - 1, max(0, round(q * (len(values) - 1))))
    return values[i]


def reaction_latency(spms: Mapping[str, SpmClient],
                     pairs: Sequence[tuple[str, float]]) -> dict[str, float] | None:
    """p50/p99/max ms from a task's end (its effect in the simulator's ledger) to the next step
    of its chain fired; None without a ledger or samples."""
    ends: dict[str, float] = {}
    for client in spms.values():
        history = getattr(client, "ledger_history", None)
        if not callable(history):
            return None
        for event in history():
            if event.action == "apply" and event.op == "create":
                ends.setdefault(event.task_id, event.at)
    values = sorted(max(0.0, fired - ends[t]) * 1000.0 for t, fired in pairs if t in ends)
    if not values:
        return None
    return {"p50": round(_percentile(values, 0.50), 3), "p99": round(_percentile(values, 0.99), 3),
            "max": round(values[-1], 3), "mean": round(statistics.fmean(values), 3),
            "samples": len(values)}


def _clock_of(spms: Mapping[str, SpmClient]) -> Callable[[], float]:
    """The clock the simulators stamp their ledgers with, so fire times compare with task ends
    (every simulator built by ``build_spms`` shares one)."""
    for client in spms.values():
        clock = getattr(client, "_clock", None)
        if callable(clock):
            return clock  # type: ignore[no-any-return]
    return time.monotonic


async def _run(cfg: LoadtestConfig, specs: Sequence[ChainSpec],
               spms: Mapping[str, SpmClient]) -> tuple[Baseline, float, bool]:
    base = Baseline(spms, cfg.max_outstanding, cfg.poll_min_ms / 1000.0,
                    cfg.poll_max_ms / 1000.0, _clock_of(spms))
    pollers = [asyncio.create_task(p.run()) for p in base.pollers.values()]
    t0 = time.perf_counter()
    chains = [asyncio.create_task(base.run_chain(s)) for s in specs]
    timed_out = False
    try:
        if chains:
            done, pending = await asyncio.wait(chains, timeout=cfg.timeout_s)
            timed_out = bool(pending)
            for t in pending:
                t.cancel()
            for t in done:
                exc = t.exception()
                if exc is not None:
                    raise exc
    finally:
        wall = time.perf_counter() - t0
        for p in pollers:
            p.cancel()
        await asyncio.gather(*pollers, *chains, return_exceptions=True)
    return base, wall, timed_out


def run_baseline(cfg: LoadtestConfig) -> dict[str, Any]:
    """Run the workload of ``cfg`` on bare asyncio and return the report."""
    pools = pool_ids(cfg.pools, cfg.seed)
    spms = build_spms(LoadtestConfig(
        chains=cfg.chains, steps=cfg.steps, pools=cfg.pools, task_ms=cfg.task_ms, seed=cfg.seed,
        spm_workers=cfg.spm_workers, spm_queue=cfg.spm_queue), pools)
    rng = random.Random(cfg.seed)
    specs = [chain_spec(i, pools[i % len(pools)], cfg.steps, rng) for i in range(cfg.chains)]
    base, wall, timed_out = asyncio.run(_run(cfg, specs, spms))
    ended = base.ok + len(base.failed)
    report: dict[str, Any] = {
        "implementation": "bare asyncio",
        "chains": cfg.chains,
        "steps": cfg.steps,
        "pools": cfg.pools,
        "ended_successfully": base.ok,
        "ended_with_failure": len(base.failed),
        "not_ended": cfg.chains - ended,
        "timed_out": timed_out,
        "steps_fired": base.steps_fired,
        "wall_s": round(wall, 3),
        "steps_per_s": round(base.steps_fired / wall, 1) if wall > 0 else 0.0,
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "failure_reasons": base.reasons,
        "fire_retries_queue_full": base.fire_retries,
        "polls": sum(p.polls for p in base.pollers.values()),
        "poll_errors": sum(p.errors for p in base.pollers.values()),
        "clear_errors": sum(p.clear_errors for p in base.pollers.values()),
        "reaction_latency_ms": reaction_latency(spms, base.pairs),
        "spm_utilization": spm_utilization(spms, wall),
        "machine": machine(),
        "config": {
            "task_ms": cfg.task_ms, "seed": cfg.seed, "spm_workers": cfg.spm_workers,
            "max_outstanding": cfg.max_outstanding, "poll_min_ms": cfg.poll_min_ms,
            "poll_max_ms": cfg.poll_max_ms, "spm": "in-process simulator",
        },
    }
    report.update(check_ledgers(spms, base.failed))
    for client in spms.values():
        client.close()
    return report


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    defaults = LoadtestConfig()
    p = argparse.ArgumentParser(
        prog="baseline_asyncio.py",
        description="Run the loadtest's chains on bare asyncio (a coroutine per chain, a poller "
                    "per pool, no durability) against the same simulated SPMs, and report.")
    p.add_argument("--chains", type=int, default=defaults.chains)
    p.add_argument("--steps", type=_positive_int, default=defaults.steps)
    p.add_argument("--pools", type=_positive_int, default=defaults.pools)
    p.add_argument("--task-ms", type=parse_duration_ms, default=0.0,
                   help="task duration in ms: N, uniform:LO:HI, exponential:MEAN, normal:MEAN:SD")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--spm-workers", type=_positive_int, default=defaults.spm_workers)
    p.add_argument("--spm-queue", type=_positive_int, default=defaults.spm_queue)
    p.add_argument("--max-outstanding", type=_positive_int, default=defaults.max_outstanding,
                   help="tasks fired and not finished per pool (a semaphore per pool)")
    p.add_argument("--poll-min-ms", type=float, default=defaults.poll_min_ms)
    p.add_argument("--poll-max-ms", type=float, default=defaults.poll_max_ms)
    p.add_argument("--timeout", type=float, default=defaults.timeout_s,
                   help="give up after this many seconds (default %(default)s)")
    p.add_argument("--json", metavar="FILE", default=None, help="write the report as JSON")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfg = LoadtestConfig(
        chains=args.chains, steps=args.steps, pools=args.pools, task_ms=args.task_ms,
        seed=args.seed, spm_workers=args.spm_workers, spm_queue=args.spm_queue,
        max_outstanding=args.max_outstanding, poll_min_ms=args.poll_min_ms,
        poll_max_ms=args.poll_max_ms, timeout_s=args.timeout, store=None)
    report = run_baseline(cfg)
    r = report["reaction_latency_ms"]
    reaction = "n/a" if r is None else f"{r['p50']:.1f} / {r['p99']:.1f} ms"
    util = report["spm_utilization"]
    utilization = "n/a" if util is None else f"{util:.1%}"
    print(f"  chains              {report['chains']}\n"
          f"  ended_successfully  {report['ended_successfully']}\n"
          f"  not ended           {report['not_ended']}\n"
          f"  steps fired         {report['steps_fired']}\n"
          f"  wall                {report['wall_s']:.2f} s\n"
          f"  steps/s             {report['steps_per_s']:,.0f}\n"
          f"  peak RSS            {report['peak_rss_mib']:.0f} MiB\n"
          f"  duplicated effects  {report['duplicated_effects']}\n"
          f"  reaction p50/p99    {reaction}\n"
          f"  SPM utilization     {utilization}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2, sort_keys=True)
            f.write("\n")
    ok = (report["ended_successfully"] == cfg.chains and not report["timed_out"]
          and report["duplicated_effects"] in (0, None))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
