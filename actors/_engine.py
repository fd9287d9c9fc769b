"""``spmchain engine``: run the load-test workload against an SPM from a durable store.

The engine is the process ``spmchain chaos`` starts and kills. It is safe to SIGKILL at any
moment and to run again with the same options:

1. it opens the :class:`~actors.Runtime` on the SQLite store at ``--store``, which recovers
   every chain stored and not ended (resolving their in-flight tasks against the SPM), and
   prints ``recovered R chains``;
2. it submits the chains of the workload (``--chains``/``--steps``/``--pools``/``--seed``, the
   same chains ``spmchain loadtest`` runs, ids ``lt-0000000`` …) that the store does not hold
   yet, waits until they are durable, and prints ``submitted N …``;
3. it waits until every chain it runs (the ones it submitted and the ones it recovered) has
   ended, then until the SPM lists no task on any pool (the runtime clears each task once its
   chain recorded the outcome; see ``--drain-timeout``), and prints a final ``ended …`` line.

Exit status: 0 when every chain of the workload has ended; 1 when the runtime stopped first
(a supervisor escalation: the reason is printed), the store failed while chains ran, a chain's
snapshot was quarantined (it can never end), or ``--timeout`` passed; 2 when it could not run,
as ``spmchain loadtest``: a bad option, an SPM that does not answer within
``--connect-timeout`` or serves fewer pools than ``--pools``, a store that cannot be opened or
recovered, a metrics address that cannot be served; 130 on SIGINT.
"""

from __future__ import annotations

import argparse
import random
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TextIO

from actors._chain import ENDED_SUCCESSFULLY, ENDED_WITH_FAILURE
from actors._cli import _count, _positive_float, _positive_int, _rate, add_metrics_arguments
from actors._loadtest import chain_spec, start_runtime
from actors._runtime import (
    ChainHandle,
    ChainResult,
    Runtime,
    RuntimeOptions,
    RuntimeStoppedError,
)
from actors._snapshot import SnapshotError, decode_snapshot
from actors._spec import ChainSpec
from actors._store import SnapshotReader, StoreError
from spm._client import SpmClient
from spm._errors import SpmError

__all__ = [
    "EngineConfig",
    "add_arguments",
    "run",
    "run_engine",
    "steps_fired",
    "stored_outcomes",
    "workload",
]

FAULT_KINDS = ("command", "spm_task", "poller")
"""The actor kinds ``--actor-fault-rate`` makes fail."""


def workload(chains: int, steps: int, pools: Sequence[str], seed: int) -> list[ChainSpec]:
    """The chains the engine runs: ``spmchain loadtest``'s, chain ``i`` on ``pools[i % n]``.

    Deterministic from the arguments, so every engine run (and the chaos checker) builds the
    same chains with the same ids, images and volumes."""
    rng = random.Random(seed)
    return [chain_spec(i, pools[i % len(pools)], steps, rng) for i in range(chains)]


def stored_outcomes(reader: SnapshotReader) -> tuple[dict[str, str | None], set[str]]:
    """What the store says of each chain: ``{chain id: outcome or None while live}``, and the
    ids whose snapshot does not decode or is quarantined (they are neither live nor ended)."""
    outcomes: dict[str, str | None] = {}
    broken: set[str] = set()
    for row in reader.load_all():
        if not row.ended:
            outcomes[row.chain_id] = None
            continue
        try:
            outcome = decode_snapshot(row.blob).get("outcome")
        except SnapshotError:
            broken.add(row.chain_id)
            continue
        outcomes[row.chain_id] = outcome if isinstance(outcome, str) else None
    for q in reader.quarantined():
        if q.chain_id not in outcomes:
            broken.add(q.chain_id)
    return outcomes, broken


@dataclass(slots=True)
class EngineConfig:
    spm_url: str
    store: str
    chains: int = 500
    steps: int = 5
    pools: int = 4
    seed: int = 1
    actor_fault_rate: float = 0.0
    poll_min_ms: float = 20.0
    poll_max_ms: float = 1000.0
    max_outstanding: int = 100
    command_workers: int = 1
    timeout_s: float = 3600.0
    drain_timeout_s: float = 60.0
    orphan_grace_s: float = 30.0
    metrics_port: int | None = None
    metrics_addr: str = "127.0.0.1"
    progress_s: float = 0.0
    connect_timeout_s: float = 30.0


class EngineError(Exception):
    """The engine cannot go on; the message says why (printed). ``status`` is the exit status:
    2 when it could not run at all (the SPM, the pools, the store at start), 1 when it failed
    while chains ran."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def _say(out: TextIO, text: str) -> None:
    out.write(text + "\n")
    out.flush()


def _served_pools(url: str, wanted: int, timeout_s: float = 30.0) -> list[str]:
    """The first ``wanted`` pools the SPM at ``url`` serves, retrying while it does not
    answer (it may be starting) for up to ``timeout_s``."""
    from spm._stomp_client import connected_pools

    deadline = time.monotonic() + timeout_s
    wait = threading.Event()
    delay = 0.05
    while True:
        try:
            served = connected_pools(url, timeout=max(0.2, min(10.0, deadline - time.monotonic())))
            break
        except SpmError as exc:
            if time.monotonic() + delay > deadline:
                raise EngineError(f"the SPM at {url} does not answer: {exc}",
                                  status=2) from exc
            wait.wait(delay)
            delay = min(delay * 2, 1.0)
    if len(served) < wanted:
        raise EngineError(f"the SPM at {url} serves {len(served)} pools "
                          f"({', '.join(served) or 'none'}); --pools asks for {wanted}",
                          status=2)
    return served[:wanted]


def _uncleared(spms: Mapping[str, SpmClient]) -> int | None:
    """Tasks the SPMs still list, over all pools (None when a pool does not answer)."""
    total = 0
    for client in spms.values():
        try:
            total += len(client.getAllTasksStatuses())
        except SpmError:
            return None
    return total


def run_engine(cfg: EngineConfig, out: TextIO | None = None) -> int:
    """Run the engine (see the module's docstring); its exit status.

    Raises EngineError when it cannot start or go on (the SPM, the store, the pools; its
    ``status`` says which), ValueError for an SPM URL or a metrics address that cannot be used,
    and lets KeyboardInterrupt through after stopping the runtime.
    """
    out = out or sys.stdout
    t0 = time.monotonic()
    pools = _served_pools(cfg.spm_url, cfg.pools, cfg.connect_timeout_s)
    specs = workload(cfg.chains, cfg.steps, pools, cfg.seed)
    wanted = {s.chain_id for s in specs if s.chain_id is not None}
    from spm._stomp_client import client_for_url

    spms: dict[str, SpmClient] = {p: client_for_url(cfg.spm_url, p) for p in pools}
    rates = {k: cfg.actor_fault_rate for k in FAULT_KINDS} if cfg.actor_fault_rate else {}
    options = RuntimeOptions(
        max_outstanding=cfg.max_outstanding,
        poll_min_s=cfg.poll_min_ms / 1000.0,
        poll_max_s=cfg.poll_max_ms / 1000.0,
        command_workers=cfg.command_workers,
        fault_rates=rates,
        fault_seed=cfg.seed,
        orphan_grace_s=cfg.orphan_grace_s,
    )
    rt = Runtime(spms, options, store=cfg.store, metrics_port=cfg.metrics_port,
                 metrics_addr=cfg.metrics_addr)
    try:
        try:
            start_runtime(rt, cfg.metrics_port, cfg.metrics_addr)
        except (SpmError, StoreError) as exc:
            raise EngineError(f"recovery failed: {exc}", status=2) from exc
        return _run_started(cfg, rt, spms, specs, wanted, out, t0)
    finally:
        rt.stop()
        for client in spms.values():
            client.close()


def _run_started(cfg: EngineConfig, rt: Runtime, spms: Mapping[str, SpmClient],
                 specs: Sequence[ChainSpec], wanted: set[str], out: TextIO, t0: float) -> int:
    store = rt.store
    assert store is not None
    if rt.metrics_server is not None:
        _say(out, f"metrics at {rt.metrics_server.url}")
    _say(out, f"recovered {len(rt.recovered)} chains ({rt.quarantined} quarantined) in "
              f"{time.monotonic() - t0:.2f} s")
    try:
        outcomes, broken = stored_outcomes(store)
    except StoreError:
        if rt.stopped_reason is not None:
            return _stopped(rt.stopped_reason)
        raise
    cond = threading.Condition()
    ended = {ENDED_SUCCESSFULLY: 0, ENDED_WITH_FAILURE: 0}

    def on_end(result: ChainResult) -> None:
        with cond:
            ended[result.outcome] = ended.get(result.outcome, 0) + 1
            cond.notify_all()

    handles: list[ChainHandle] = list(rt.recovered)
    for handle in handles:
        handle.add_done_callback(on_end)
    new: list[ChainHandle] = []
    try:
        for spec in specs:
            if spec.chain_id in outcomes or spec.chain_id in broken:
                continue
            handle = rt.submit(spec)
            handle.add_done_callback(on_end)
            new.append(handle)
        rt.flush(timeout=60.0)
    except (RuntimeStoppedError, StoreError) as exc:
        if rt.stopped_reason is not None:  # escalated while submitting: the store is closed
            return _stopped(rt.stopped_reason)
        raise EngineError(f"submitting failed: {exc}") from exc
    handles.extend(new)
    _say(out, f"submitted {len(new)} chains ({len(wanted) - len(new)} already in the store, "
              f"{len(rt.recovered)} recovered)")
    deadline = t0 + cfg.timeout_s
    total = len(handles)
    shown, shown_at = -1, 0.0
    with cond:
        while sum(ended.values()) < total:
            if cfg.progress_s > 0 and time.monotonic() - shown_at >= cfg.progress_s:
                fired, shown_at = steps_fired(rt), time.monotonic()
                if fired != shown:
                    shown = fired
                    _say(out, f"progress {fired} steps fired, {sum(ended.values())} of "
                              f"{total} chains ended")
            if rt.stopped_reason is not None:
                return _stopped(rt.stopped_reason)
            if time.monotonic() > deadline:
                _say(sys.stderr, f"spmchain engine: {total - sum(ended.values())} chains did "
                                 f"not end within --timeout {cfg.timeout_s:g} s")
                return 1
            cond.wait(min(0.2, cfg.progress_s) if cfg.progress_s > 0 else 0.2)
    ran_s = time.monotonic() - t0
    uncleared = _drain(rt, spms, cfg.drain_timeout_s)
    try:
        rt.flush(timeout=60.0)
        outcomes, broken = stored_outcomes(store)
    except StoreError:
        if rt.stopped_reason is not None:
            return _stopped(rt.stopped_reason)
        raise
    ok = sum(1 for c in wanted if outcomes.get(c) == ENDED_SUCCESSFULLY)
    failed = sum(1 for c in wanted if outcomes.get(c) == ENDED_WITH_FAILURE)
    _say(out, f"ended {ok + failed} of {len(wanted)} chains: {ok} ended_successfully, "
              f"{failed} ended_with_failure; {len(broken & wanted)} quarantined; "
              f"uncleared tasks {'unknown' if uncleared is None else uncleared}; "
              f"this run ended {total} chains in {ran_s:.2f} s")
    if broken & wanted:
        _say(sys.stderr, f"spmchain engine: {len(broken & wanted)} chains of the workload have "
                         f"snapshots that do not decode and can never end: "
                         f"{', '.join(sorted(broken & wanted)[:10])}")
        return 1
    return 0 if ok + failed == len(wanted) else 1


def _stopped(reason: str) -> int:
    _say(sys.stderr, f"spmchain engine: the runtime stopped: {reason}")
    return 1


def steps_fired(rt: Runtime) -> int:
    """Steps this runtime fired so far (its ``spmchain_steps_fired_total``, over verbs)."""
    total = 0.0
    for family in rt.metrics.registry.collect():
        if family.name == "spmchain_steps_fired":
            total += sum(s.value for s in family.samples
                         if s.name == "spmchain_steps_fired_total")
    return int(total)


def _drain(rt: Runtime, spms: Mapping[str, SpmClient], timeout_s: float) -> int | None:
    """Wait (up to ``timeout_s``) until the SPMs list no task: every chain has ended, so what
    is left is being cleared (or discarded, for an orphan) by the runtime. The tasks still
    listed at the end (None when a pool did not answer)."""
    deadline = time.monotonic() + timeout_s
    wait = threading.Event()
    left = _uncleared(spms)
    while left != 0 and time.monotonic() < deadline and rt.stopped_reason is None:
        wait.wait(0.05)
        left = _uncleared(spms)
    return left


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``spmchain engine``'s options."""
    p.add_argument("--spm", metavar="URL", required=True,
                   help="the SPM at stomp://HOST:PORT (e.g. from `spmchain spm serve`)")
    p.add_argument("--store", metavar="PATH", required=True,
                   help="the SQLite snapshot store (created if missing; recovered if present)")
    p.add_argument("--chains", type=_count, default=500, help="chains of the workload "
                   "(default 500)")
    p.add_argument("--steps", type=_positive_int, default=5, help="steps a chain (default 5)")
    p.add_argument("--pools", type=_positive_int, default=4,
                   help="pools to use, the first N the SPM serves (default 4)")
    p.add_argument("--seed", type=int, default=1,
                   help="seed of the workload; give every run on one store the same (default 1)")
    p.add_argument("--actor-fault-rate", type=_rate, default=0.0, metavar="R",
                   help="fraction of messages on which command, SPM-task and poller actors "
                        "raise (default 0)")
    p.add_argument("--poll-min-ms", type=_positive_float, default=20.0,
                   help="shortest poll interval, right after activity (default 20)")
    p.add_argument("--poll-max-ms", type=_positive_float, default=1000.0,
                   help="longest poll interval, when nothing changes (default 1000)")
    p.add_argument("--max-outstanding", type=_positive_int, default=100,
                   help="tasks fired and not yet finished per pool (default 100)")
    p.add_argument("--command-workers", type=_positive_int, default=1,
                   help="threads running the CommandActors (default 1: under one "
                        "interpreter lock more threads only contend)")
    p.add_argument("--timeout", type=_positive_float, default=3600.0,
                   help="give up (exit 1) when the chains have not ended after this many "
                        "seconds (default 3600)")
    p.add_argument("--drain-timeout", type=_positive_float, default=60.0,
                   help="after the last chain ended, wait up to this many seconds for the SPM "
                        "to list no task (default 60)")
    p.add_argument("--orphan-grace-ms", type=_positive_float, default=30000.0,
                   help="how long a task on the SPM that no chain owns is left alone before "
                        "it is stopped, reverted if it succeeded, and cleared (default 30000)")
    p.add_argument("--connect-timeout", type=_positive_float, default=30.0,
                   help="how long to wait for the SPM to answer at start, s (default 30)")
    p.add_argument("--progress-ms", type=_positive_float, default=None, metavar="MS",
                   help="print a 'progress' line (steps fired, chains ended) this often while "
                        "chains run, when it changed (default: none)")
    add_metrics_arguments(p)
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO")


def run(args: argparse.Namespace) -> int:
    """``spmchain engine``: the exit status (see the module's docstring)."""
    if args.poll_max_ms < args.poll_min_ms:
        print(f"spmchain engine: --poll-max-ms ({args.poll_max_ms:g}) is below --poll-min-ms "
              f"({args.poll_min_ms:g})", file=sys.stderr)
        return 2
    if args.metrics_port is not None and not 0 <= args.metrics_port <= 65535:
        print(f"spmchain engine: --metrics-port {args.metrics_port} is not a port number",
              file=sys.stderr)
        return 2
    cfg = EngineConfig(
        spm_url=args.spm, store=args.store, chains=args.chains, steps=args.steps,
        pools=args.pools, seed=args.seed, actor_fault_rate=args.actor_fault_rate,
        poll_min_ms=args.poll_min_ms, poll_max_ms=args.poll_max_ms,
        max_outstanding=args.max_outstanding, command_workers=args.command_workers,
        timeout_s=args.timeout, drain_timeout_s=args.drain_timeout,
        orphan_grace_s=args.orphan_grace_ms / 1000.0,
        progress_s=(args.progress_ms or 0.0) / 1000.0,
        connect_timeout_s=args.connect_timeout,
        metrics_port=args.metrics_port, metrics_addr=args.metrics_addr,
    )
    try:
        return run_engine(cfg)
    except EngineError as exc:
        print(f"spmchain engine: {exc}", file=sys.stderr)
        return exc.status
    except (StoreError, SpmError) as exc:  # while chains ran
        print(f"spmchain engine: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:  # a URL that is not stomp://, a bad option reaching the runtime
        print(f"spmchain engine: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("spmchain engine: interrupted; the chains resume at the next run",
              file=sys.stderr)
        return 130

