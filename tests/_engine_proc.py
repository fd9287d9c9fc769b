"""An engine process for the crash tests: a durable Runtime over simulated SPMs, run to the end.

Run as a script::

    python tests/_engine_proc.py --store S --state-dir D --chains N --steps K --seed X \
        [--pools P] [--fail-rate F] [--task-ms M] [--run LABEL] [--timeout T]

It builds one :class:`~spm._simulator.SimulatedSpm` per pool on ``D/pool-<i>`` (in this
process: the SPM's tasks and storage survive through the state directory, and a restart of this
process is also an SPM restart, which aborts and rolls back every unfinished task as VDSM does at
SPM start), opens a durable Runtime on the SQLite store ``S``, submits those of the ``N`` chains
(:func:`chain_specs`) that the store does not hold yet, waits until every live chain has ended
and until no task is left on any SPM, then exits 0.

With ``SPMCHAIN_CRASH_AT`` in the environment the process kills itself with SIGKILL at that
write-ahead point instead (see :mod:`actors._crash`). Every task an SPM accepted is appended to
the journal ``D/fires.log`` (one line per task, written before ``fire`` returns, so it survives
the kill): ``<run> <pool> <task id> <verb> <imgUUID> <volUUID>``.

Progress goes to stdout, one ``<word> <number>`` per line, flushed: ``recovered``,
``quarantined``, ``submitted``, ``ended``, ``ended_successfully``, ``ended_with_failure``,
``uncleared``, ``spm_fired``. Exit status: 0 when every chain ended and every SPM is empty; 2
when ``--timeout`` passed first (what is missing is printed to stderr).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from actors._loadtest import chain_spec, pool_ids  # noqa: E402
from actors._runtime import ChainHandle, Runtime, RuntimeOptions  # noqa: E402
from actors._spec import ChainSpec  # noqa: E402
from spm._client import TaskInfo  # noqa: E402
from spm._simulator import SimulatedSpm  # noqa: E402

JOURNAL = "fires.log"
"""The name of the fire journal inside the state directory."""

ENGINE_OPTIONS: dict[str, Any] = {
    "poll_min_s": 0.005,
    "poll_max_s": 0.05,
    "redeliver_s": 0.1,
    "retry_min_s": 0.01,
    "retry_max_s": 0.1,
    "orphan_grace_s": 0.5,
    "recovery_timeout_s": 10.0,
}
"""RuntimeOptions of the engine: fast polling, a short grace for orphans."""


def pools_for(n: int, seed: int) -> list[str]:
    """The pool UUIDs an engine with ``--pools n --seed seed`` serves."""
    return pool_ids(n, seed)


def chain_specs(chains: int, steps: int, seed: int, pools: Sequence[str]) -> list[ChainSpec]:
    """The chains of an engine run: the same list for the same arguments in every process.

    Chain ``i`` (id ``lt-<i>``) runs on ``pools[i % len(pools)]`` and creates ``steps`` volumes
    in an image of its own, each reverted by ``deleteVolume``.
    """
    rng = random.Random(seed)
    return [chain_spec(i, pools[i % len(pools)], steps, rng) for i in range(chains)]


def state_dir_of(state_dir: str | os.PathLike[str], index: int) -> str:
    """The simulator state directory of pool number ``index``."""
    return os.path.join(os.fspath(state_dir), f"pool-{index}")


class JournaledSpm(SimulatedSpm):
    """A SimulatedSpm that appends every task it accepted to a journal file.

    The line is written with one ``write`` on an ``O_APPEND`` descriptor before :meth:`fire`
    returns, so a SIGKILL at any crash point (all of them come after ``fire`` returned, on the
    same thread) leaves it in the file. A fire the SPM refused writes nothing.
    """

    def __init__(self, pool: str, journal_fd: int, run: str, tells_params: bool = True,
                 **kwargs: Any) -> None:
        super().__init__(pool, **kwargs)
        self._journal_fd = journal_fd
        self._run = run
        self._tells_params = tells_params

    def getAllTasksInfo(self) -> dict[str, TaskInfo]:  # noqa: N802
        """As the simulator, or (``tells_params`` False) as VDSM: the verb only, no parameters
        (a task fired but not recorded then cannot be proved a chain's: it is an orphan)."""
        info = super().getAllTasksInfo()
        if self._tells_params:
            return info
        return {tid: {"id": inf["id"], "verb": inf["verb"]}  # type: ignore[typeddict-item]
                for tid, inf in info.items()}

    def fire(self, verb: str, params: Mapping[str, Any]) -> str:
        task_id = super().fire(verb, params)
        line = (f"{self._run} {self.pool} {task_id} {verb} {params.get('imgUUID', '-')} "
                f"{params.get('volUUID', '-')}\n")
        os.write(self._journal_fd, line.encode())
        return task_id


def _say(word: str, value: object) -> None:
    print(f"{word} {value}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--chains", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--pools", type=int, default=2)
    parser.add_argument("--fail-rate", type=float, default=0.0)
    parser.add_argument("--task-ms", type=float, default=0.0)
    parser.add_argument("--run", default="0")
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--vdsm-task-info", action="store_true",
                        help="getAllTasksInfo without the parameters, as VDSM")
    args = parser.parse_args(argv)

    deadline = time.monotonic() + args.timeout
    pools = pools_for(args.pools, args.seed)
    os.makedirs(args.state_dir, exist_ok=True)
    journal_fd = os.open(os.path.join(args.state_dir, JOURNAL),
                         os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    failure_rates = {"createVolume": args.fail_rate} if args.fail_rate else 0.0
    spms = {
        pool: JournaledSpm(pool, journal_fd, args.run, tells_params=not args.vdsm_task_info,
                           state_dir=state_dir_of(args.state_dir, i),
                           durations=args.task_ms / 1000.0, failure_rates=failure_rates,
                           seed=args.seed * 1000 + i)
        for i, pool in enumerate(pools)
    }
    rt = Runtime(spms, RuntimeOptions(**ENGINE_OPTIONS), store=args.store).start()
    _say("recovered", len(rt.recovered))
    _say("quarantined", rt.quarantined)
    store = rt.store
    assert store is not None
    set_aside = {q.chain_id for q in store.quarantined()}
    handles: list[ChainHandle] = list(rt.recovered)
    submitted = 0
    for spec in chain_specs(args.chains, args.steps, args.seed, pools):
        assert spec.chain_id is not None
        if spec.chain_id in set_aside or store.load(spec.chain_id) is not None:
            continue
        handles.append(rt.submit(spec))
        submitted += 1
    _say("submitted", submitted)

    outcomes = {"ended_successfully": 0, "ended_with_failure": 0}
    for handle in handles:
        try:
            result = handle.result(max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            print(f"chain {handle.chain_id} did not end within {args.timeout} s",
                  file=sys.stderr, flush=True)
            return 2
        outcomes[result.outcome] += 1
    _say("ended", sum(outcomes.values()))
    for outcome, count in outcomes.items():
        _say(outcome, count)

    # The last clears follow the chains' ends: wait until every SPM lists no task.
    pause = threading.Event()
    left: dict[str, int] = {}
    while True:
        left = {pool: len(spm.getAllTasksStatuses()) for pool, spm in spms.items()}
        if not any(left.values()) or time.monotonic() > deadline:
            break
        pause.wait(0.02)
    _say("uncleared", sum(left.values()))
    _say("spm_fired", sum(spm.stats().tasks_fired for spm in spms.values()))
    rt.stop()
    for spm in spms.values():
        spm.close()
    os.close(journal_fd)
    if any(left.values()):
        print(f"tasks left on the SPMs after {args.timeout} s: {left}", file=sys.stderr,
              flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
