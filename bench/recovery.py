"""Recovery benchmark: how long a durable Runtime takes to recover many live chains after a crash.

Usage::

    python bench/recovery.py [--chains 10000] [--pools 4] [--steps 3] [--seed 1]
                             [--in-flight finished|aborted] [--dir DIR] [--json FILE]

Two processes, one after the other, on the same snapshot store and simulated SPM state
directories:

1. **setup** submits ``--chains`` chains (``--steps`` createVolume steps each, spread over
   ``--pools`` pools) to a durable Runtime over simulated SPMs whose clock is held still, waits
   until every chain has recorded the task id of its first step, makes the store durable and
   stops: every chain is live in the store with a task in flight on its pool's SPM. With
   ``--in-flight finished`` (the default) the SPMs' clock is then let go so those tasks finish
   while no engine runs (the engine was down while the storage work completed); with
   ``aborted`` they are left unfinished, and the SPM restart in the next process aborts and rolls
   them back (the chains then end with failure).
2. **recover**, a fresh process: restarts the SPMs from their state directories, builds a
   Runtime on the store and times ``Runtime.start()`` (loading and decoding every live snapshot,
   one ``getAllTasksInfo`` per pool, resolving each chain's in-flight task, starting the
   actors), then the time until every recovered chain ended and until every SPM is empty.

Prints one table (and the machine: cores, Python); ``--json FILE`` writes the numbers.
Nothing is asserted: this measures.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from actors._loadtest import chain_spec, machine, peak_rss_mib, pool_ids  # noqa: E402
from actors._runtime import Runtime, RuntimeOptions  # noqa: E402
from spm._clock import HeldClock  # noqa: E402
from spm._simulator import SimulatedSpm  # noqa: E402

TASK_S = 1.0
"""Virtual duration of each first-step task fired during setup (the clock is held anyway)."""

POLL: dict[str, Any] = {"poll_min_s": 0.005, "poll_max_s": 0.05, "redeliver_s": 0.5}


def _wait(what: str, pred: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while not pred():
        if time.monotonic() > deadline:
            raise SystemExit(f"recovery bench: timed out after {timeout:.0f} s waiting for {what}")
        pause.wait(0.05)


def _state_dir(root: Path, index: int) -> str:
    return str(root / "spm" / f"pool-{index}")


def setup(root: Path, chains: int, pools: int, steps: int, seed: int, in_flight: str) -> dict[
        str, Any]:
    """Phase 1: a store with ``chains`` live chains, each with its first task on an SPM."""
    t0 = time.perf_counter()
    ids = pool_ids(pools, seed)
    clock = HeldClock()
    per_pool = -(-chains // pools)
    spms = {
        pool: SimulatedSpm(pool, state_dir=_state_dir(root, i), clock=clock, durations=TASK_S,
                           queue_size=per_pool, seed=seed * 1000 + i)
        for i, pool in enumerate(ids)
    }
    options = RuntimeOptions(max_outstanding=per_pool, **POLL)
    rt = Runtime(spms, options, store=root / "snapshots.sqlite").start()
    try:
        rng = random.Random(seed)
        for i in range(chains):
            rt.submit(chain_spec(i, ids[i % pools], steps, rng))

        def recorded() -> bool:
            states = rt.chains()
            return len(states) == chains and all(
                s.steps and s.steps[0].task_id is not None for s in states)

        _wait("every chain to record its first task id", recorded, 600.0)
        rt.flush(timeout=600.0)
    finally:
        rt.stop(timeout=60.0)
    if in_flight == "finished":
        clock.release(jump=per_pool * TASK_S + 60.0)
    for spm in spms.values():
        spm.advance()
        spm.close()
    return {"setup_s": round(time.perf_counter() - t0, 3)}


def recover(root: Path, pools: int, seed: int) -> dict[str, Any]:
    """Phase 2 (a fresh process): restart the SPMs, then time Runtime.start() and the ends."""
    ids = pool_ids(pools, seed)
    t0 = time.perf_counter()
    spms = {pool: SimulatedSpm(pool, state_dir=_state_dir(root, i), seed=seed * 1000 + i + 500)
            for i, pool in enumerate(ids)}
    t_spm = time.perf_counter() - t0
    in_flight = sum(len(spm.getAllTasksStatuses()) for spm in spms.values())
    rt = Runtime(spms, RuntimeOptions(**POLL), store=root / "snapshots.sqlite")
    t1 = time.perf_counter()
    rt.start()
    t_start = time.perf_counter() - t1
    outcomes: dict[str, int] = {}
    try:
        for handle in rt.recovered:
            result = handle.result(timeout=600.0)
            outcomes[result.outcome] = outcomes.get(result.outcome, 0) + 1
        t_ended = time.perf_counter() - t1
        _wait("every SPM to be empty",
              lambda: not any(spm.getAllTasksStatuses() for spm in spms.values()), 600.0)
        t_empty = time.perf_counter() - t1
    finally:
        rt.stop(timeout=60.0)
        for spm in spms.values():
            spm.close()
    return {
        "spm_restart_s": round(t_spm, 3),
        "tasks_on_spms_at_restart": in_flight,
        "recovered": len(rt.recovered),
        "quarantined": rt.quarantined,
        "start_s": round(t_start, 3),
        "all_ended_s": round(t_ended, 3),
        "spms_empty_s": round(t_empty, 3),
        "outcomes": outcomes,
        "peak_rss_mib": round(peak_rss_mib(), 1),
    }


def _phase(argv: Sequence[str]) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"recovery bench: {' '.join(argv[:2])} failed ({proc.returncode}):\n"
                         f"{proc.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _table(report: dict[str, Any]) -> str:
    m = report["machine"]
    rows = [
        ("machine", f"{m['cores']} cores, {m['implementation']} {m['python']}"),
        ("chains (live in the store)", report["chains"]),
        ("pools / steps a chain", f"{report['pools']} / {report['steps']}"),
        ("tasks in flight at the crash", f"{report['tasks_on_spms_at_restart']} "
                                         f"({report['in_flight']})"),
        ("setup (not timed below)", f"{report['setup_s']:.2f} s"),
        ("SPM restart (state dirs)", f"{report['spm_restart_s']:.2f} s"),
        ("Runtime.start() (recovery)", f"{report['start_s']:.2f} s"),
        ("recovered / quarantined", f"{report['recovered']} / {report['quarantined']}"),
        ("start -> all chains ended", f"{report['all_ended_s']:.2f} s"),
        ("start -> SPMs empty", f"{report['spms_empty_s']:.2f} s"),
        ("outcomes", ", ".join(f"{k} {v}" for k, v in sorted(report["outcomes"].items()))),
        ("peak RSS (recovering process)", f"{report['peak_rss_mib']:.0f} MiB"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chains", type=int, default=10_000)
    parser.add_argument("--pools", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--in-flight", choices=("finished", "aborted"), default="finished")
    parser.add_argument("--dir", help="where the store and SPM state go (default: a temporary "
                        "directory, removed afterwards)")
    parser.add_argument("--json", help="also write the numbers to this file")
    parser.add_argument("--phase", choices=("setup", "recover"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.phase == "setup":
        print(json.dumps(setup(Path(args.dir), args.chains, args.pools, args.steps, args.seed,
                               args.in_flight)))
        return 0
    if args.phase == "recover":
        print(json.dumps(recover(Path(args.dir), args.pools, args.seed)))
        return 0

    tmp = None
    if args.dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="spmchain-recovery-bench-")
        root = Path(tmp.name)
    else:
        root = Path(args.dir)
        root.mkdir(parents=True, exist_ok=True)
        if any(root.iterdir()):
            raise SystemExit(f"recovery bench: {root} is not empty")
    common = ["--dir", str(root), "--pools", str(args.pools), "--seed", str(args.seed)]
    try:
        report: dict[str, Any] = {
            "chains": args.chains, "pools": args.pools, "steps": args.steps,
            "seed": args.seed, "in_flight": args.in_flight, "machine": machine(),
        }
        report.update(_phase(["--phase", "setup", *common, "--chains", str(args.chains),
                              "--steps", str(args.steps), "--in-flight", args.in_flight]))
        report.update(_phase(["--phase", "recover", *common]))
    finally:
        if tmp is not None:
            tmp.cleanup()
    print("spmchain recovery benchmark")
    print(_table(report))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2, sort_keys=True)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
