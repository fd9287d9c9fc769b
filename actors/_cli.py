"""The ``spmchain`` command: ``loadtest``, ``spm serve``."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

_N = TypeVar("_N", int, float)


def _number(
    convert: Callable[[str], _N], what: str, check: Callable[[_N], bool], rule: str
) -> Callable[[str], _N]:
    """An argparse type: ``convert`` the text, refuse it unless ``check`` holds, saying
    ``rule``; both errors name the value given."""

    def parse(text: str) -> _N:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not check(value):
            raise argparse.ArgumentTypeError(f"must {rule}, got {value}")
        return value

    return parse


_positive_int = _number(int, "a whole number", lambda v: v >= 1, "be at least 1")
_count = _number(int, "a whole number", lambda v: v >= 0, "not be negative")
_rate = _number(float, "a number", lambda v: 0.0 <= v <= 1.0, "be within [0, 1]")
_positive_float = _number(
    float, "a number", lambda v: 0 < v < float("inf"), "be a positive, finite number"
)
_port = _number(int, "a port number", lambda v: 0 <= v <= 65535, "be within 0-65535")
_nonnegative_float = _number(
    float, "a number", lambda v: 0 <= v < float("inf"), "be a finite number, 0 or more"
)


def parse_duration_ms(text: str) -> Any:
    """``--task-ms``: ``50`` (fixed), ``uniform:10:90``, ``exponential:50``, ``normal:50:10``.

    Returns milliseconds as a float for a fixed duration, or the simulator's duration spec (in
    seconds) for a distribution.
    """
    parts = text.split(":")
    try:
        nums = [float(p) for p in parts[1:]] if len(parts) > 1 else [float(parts[0])]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--task-ms {text!r}: expected N, uniform:LO:HI, exponential:MEAN or normal:MEAN:SD "
            "(milliseconds)"
        ) from None
    if any(not math.isfinite(n) for n in nums):
        raise argparse.ArgumentTypeError(f"--task-ms {text!r}: durations must be finite")
    if any(n < 0 for n in nums):
        raise argparse.ArgumentTypeError(f"--task-ms {text!r}: durations must not be negative")
    if len(parts) == 1:
        return nums[0]
    kind = parts[0]
    arity = {"uniform": 2, "exponential": 1, "normal": 2}
    if kind not in arity or len(nums) != arity[kind]:
        raise argparse.ArgumentTypeError(
            f"--task-ms {text!r}: expected uniform:LO:HI, exponential:MEAN or normal:MEAN:SD"
        )
    if kind == "uniform" and nums[0] > nums[1]:
        raise argparse.ArgumentTypeError(f"--task-ms {text!r}: LO is above HI")
    return (kind, *[n / 1000.0 for n in nums])


def write_json(report: dict[str, Any], path: str) -> None:
    """Write ``report`` to ``path`` (through ``path.tmp``, replaced at once). Raises OSError
    when it cannot be written; nothing is left behind then."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2, sort_keys=True, default=str)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def report_path_problem(path: str) -> str | None:
    """Why a report could not be written to ``path`` (``--json``), or None: checked before a
    run, so that a run is not thrown away at its end. The directory must exist and take a new
    file (one is created and removed, as the report's temporary file will be), and ``path``
    must not be a directory."""
    if os.path.isdir(path):
        return "is a directory"
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        if os.path.exists(directory):
            return f"{directory} is not a directory"
        return f"directory {directory} does not exist"
    probe = f"{path}.tmp"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return f"{probe} is a directory" if os.path.isdir(probe) else None
    except OSError as exc:
        return f"cannot create a file in {directory}: {exc.strerror or exc}"
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)
    return None


def _add_loadtest(sub: Any) -> None:
    p = sub.add_parser(
        "loadtest",
        help="run many concurrent chains against simulated SPMs and report",
        description="Run CHAINS concurrent chains of STEPS steps each over POOLS simulated SPMs "
                    "(or the SPM at --spm) and report throughput, failures and what the storage "
                    "ledger shows (duplicated and leftover effects).",
    )
    p.add_argument("--chains", type=_count, default=1000, help="chains to run (default 1000)")
    p.add_argument("--steps", type=_positive_int, default=5, help="steps a chain (default 5)")
    p.add_argument("--pools", type=_positive_int, default=4, help="storage pools (default 4)")
    p.add_argument("--task-ms", type=parse_duration_ms, default=0.0,
                   help="task duration on the simulated SPM in ms: N, uniform:LO:HI, "
                        "exponential:MEAN, normal:MEAN:SD (default 0)")
    p.add_argument("--fail-rate", type=_rate, default=0.0,
                   help="fraction of step tasks that fail on the SPM (default 0)")
    p.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    p.add_argument("--spm-workers", type=_positive_int, default=10,
                   help="the simulated SPM's task workers per pool (default 10, as VDSM)")
    p.add_argument("--spm-queue", type=_positive_int, default=500,
                   help="the simulated SPM's task queue per pool (default 500, as VDSM)")
    p.add_argument("--max-outstanding", type=_positive_int, default=100,
                   help="tasks fired and not yet finished per pool (default 100)")
    p.add_argument("--poll-min-ms", type=_positive_float, default=20.0,
                   help="shortest poll interval, right after activity (default 20)")
    p.add_argument("--poll-max-ms", type=_positive_float, default=1000.0,
                   help="longest poll interval, when nothing changes (default 1000)")
    p.add_argument("--admission-target-ms", type=_nonnegative_float, default=12.0,
                   help="keep the runtime's own reaction delay (90th percentile) under this by "
                        "running only that many chains of a pool at once; 0: no adaptive "
                        "limit (default 12)")
    p.add_argument("--max-running", type=_positive_int, default=None,
                   help="at most this many chains of a pool running at once (default: no "
                        "fixed limit)")
    p.add_argument("--command-workers", type=_positive_int, default=1,
                   help="threads running the CommandActors (default 1: under one "
                        "interpreter lock more threads only contend)")
    p.add_argument("--spm", metavar="URL", default=None,
                   help="use the SPM at stomp://HOST:PORT or stomp+tls://HOST:PORT instead of "
                        "in-process simulators")
    p.add_argument("--store", default="temp", metavar="PATH|memory|none",
                   help="where chain snapshots go: an SQLite file (durable), 'memory' (taken, "
                        "not durable) or 'none'; default: a durable SQLite file in a temporary "
                        "directory")
    p.add_argument("--timeout", type=_positive_float, default=600.0,
                   help="give up after this many seconds (default 600)")
    p.add_argument("--json", metavar="FILE", default=None, help="write the report as JSON")
    add_metrics_arguments(p)
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO")
    p.set_defaults(subparser=p)  # errors found after parsing are said as the subcommand's


def add_metrics_arguments(p: argparse.ArgumentParser) -> None:
    """``--metrics-port`` and ``--metrics-addr``: serve Prometheus metrics while running."""
    p.add_argument("--metrics-port", type=_port, default=None, metavar="PORT",
                   help="serve Prometheus metrics on this port while running (0: any free port)")
    p.add_argument("--metrics-addr", default="127.0.0.1", metavar="ADDR",
                   help="address for --metrics-port (default 127.0.0.1)")


# Subcommands that live in modules of their own: name -> module. Each module has
# ``add_arguments(parser)`` and ``run(args) -> int``.
_MODULE_COMMANDS = {
    "chaos": ("actors._chaos", "kill the engine at random moments and check that every chain "
                               "ended, none lost, no effect twice"),
    "engine": ("actors._engine", "run chains against an SPM from a durable store until they "
                                 "end (what chaos starts and kills)"),
    "inspect": ("actors._inspect", "read a snapshot store: chains by state, one chain's steps, "
                                   "quarantined snapshots"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spmchain",
        description="Serial execution of asynchronous SPM tasks: run chains of storage tasks "
                    "on each pool's SPM.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_loadtest(sub)
    spm = sub.add_parser("spm", help="the simulated SPM")
    spm_sub = spm.add_subparsers(dest="spm_command", metavar="SPM_COMMAND", required=True)
    serve = spm_sub.add_parser(
        "serve", help="serve simulated SPMs over VDSM's STOMP/JSON-RPC protocol",
        add_help=False,
    )
    serve.add_argument("rest", nargs=argparse.REMAINDER)
    import importlib

    for name, (module_name, help_text) in _MODULE_COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(sub_parser)
        sub_parser.set_defaults(run=module.run)
    return parser


def _loadtest(args: argparse.Namespace) -> int:
    from actors._loadtest import LoadtestConfig, run_loadtest, summary_table
    from actors._store import StoreError
    from spm._errors import SpmError

    if args.poll_max_ms < args.poll_min_ms:
        args.subparser.error(f"argument --poll-max-ms: must not be below --poll-min-ms "
                     f"({args.poll_max_ms:g} < {args.poll_min_ms:g})")

    cfg = LoadtestConfig(
        chains=args.chains, steps=args.steps, pools=args.pools, task_ms=args.task_ms,
        fail_rate=args.fail_rate, seed=args.seed, spm_workers=args.spm_workers,
        spm_queue=args.spm_queue, max_outstanding=args.max_outstanding,
        poll_min_ms=args.poll_min_ms, poll_max_ms=args.poll_max_ms,
        command_workers=args.command_workers, timeout_s=args.timeout, spm_url=args.spm,
        admission_target_ms=args.admission_target_ms or None, max_running=args.max_running,
        store=None if args.store == "none" else args.store,
        metrics_port=args.metrics_port, metrics_addr=args.metrics_addr,
    )
    if args.json:
        problem = report_path_problem(args.json)
        if problem is not None:
            print(f"spmchain loadtest: error: --json {args.json}: {problem}", file=sys.stderr)
            return 2
    try:
        report = run_loadtest(cfg)
    except (ValueError, SpmError, StoreError, OSError) as exc:
        # What the arguments lead to and the parser cannot see: an SPM that is not there,
        # fewer pools than asked, a store that cannot be opened, a metrics address that cannot
        # be served. Said in one line.
        print(f"spmchain loadtest: error: {exc}", file=sys.stderr)
        return 2
    print(summary_table(report))
    if args.json:
        try:
            write_json(report, args.json)
        except OSError as exc:  # the directory went away or filled up during the run
            print(f"spmchain loadtest: error: --json {args.json}: the report could not be "
                  f"written: {exc.strerror or exc}", file=sys.stderr)
            return 2
        print(f"report written to {args.json}")
    ok = (
        report["stopped_reason"] is None
        and report["not_ended"] == 0
        and report["duplicated_effects"] in (0, None)
        and report["leftover_effects"] in (0, None)
    )
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["spm", "serve"]:
        from spm._serve import serve_main

        return serve_main(argv[2:])
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.INFO if getattr(args, "verbose", False) else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "loadtest":
        return _loadtest(args)
    run = getattr(args, "run", None)
    if run is not None:
        return int(run(args))
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
