"""``spmchain spm serve``: simulated SPMs behind VDSM's wire protocol, in a process of their own.

Runs one :class:`~spm._simulator.SimulatedSpm` per pool behind a
:class:`~spm._stomp_server.SpmStompServer`, prints the address it bound on one line (so a parent
that asked for port 0 can read it), and serves until SIGTERM or SIGINT, then stops cleanly and
exits 0. With ``--state-dir`` each pool's tasks are persisted under ``DIR/<pool>``, so a
restarted server recovers them as VDSM does on SPM start; a directory another server (or
simulator) has open is refused.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType
from typing import Any

from spm._client import SpmClient
from spm._stomp_server import SpmStompServer, server_ssl_context

log = logging.getLogger("spm.serve")


def default_pool_ids(count: int) -> list[str]:
    """The pool ids ``--pools N`` serves: ``pool-0`` … ``pool-(N-1)``."""
    return [f"pool-{i}" for i in range(count)]


def _listen_address(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


def build_serve_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Add ``spm serve``'s options to ``parser`` (a new one when None) and return it."""
    if parser is None:
        parser = argparse.ArgumentParser(
            prog="spmchain spm serve",
            description="Serve simulated SPMs over VDSM's STOMP/JSON-RPC protocol.",
        )
    parser.add_argument(
        "--listen",
        type=_listen_address,
        default=("127.0.0.1", 54321),
        metavar="HOST:PORT",
        help="address to bind (default 127.0.0.1:54321; port 0 picks a free one)",
    )
    parser.add_argument(
        "--pools", type=int, default=None, metavar="N", help="serve pools pool-0 … pool-(N-1)"
    )
    parser.add_argument(
        "--pool", action="append", default=[], metavar="ID", help="serve this pool (repeatable)"
    )
    parser.add_argument(
        "--task-ms", type=float, default=0.0, help="how long each simulated task runs (ms)"
    )
    parser.add_argument(
        "--fail-rate", type=float, default=0.0, help="probability that a task's job fails"
    )
    parser.add_argument("--seed", type=int, default=None, help="seed of durations and failures")
    parser.add_argument("--workers", type=int, default=10, help="SPM worker slots (VDSM: 10)")
    parser.add_argument("--queue-size", type=int, default=500, help="SPM task queue (VDSM: 500)")
    parser.add_argument(
        "--state-dir", default=None, metavar="DIR", help="persist pool tasks under DIR/<pool>"
    )
    parser.add_argument(
        "--fsync", action="store_true",
        help="with --state-dir: sync each answer to disk before it is sent (survives an OS "
             "crash, not only a killed server)",
    )
    parser.add_argument("--tls-cert", default=None, help="server certificate (PEM): serve TLS")
    parser.add_argument("--tls-key", default=None, help="server private key (PEM)")
    parser.add_argument(
        "--tls-ca", default=None, help="CA (PEM) that client certificates must be signed by"
    )
    parser.add_argument(
        "--min-heartbeat-ms",
        type=int,
        default=1000,
        help="floor of negotiated heart-beat intervals (VDSM: 1000)",
    )
    parser.add_argument("--log-level", default="WARNING", help="logging level (default WARNING)")
    return parser


def _pools(args: argparse.Namespace) -> list[str]:
    pools: list[str] = list(args.pool)
    if args.pools is not None:
        if args.pools < 1:
            raise ValueError("--pools: at least 1")
        pools += [p for p in default_pool_ids(args.pools) if p not in pools]
    if not pools:
        pools = default_pool_ids(1)
    if len(set(pools)) != len(pools):
        raise ValueError("--pool: the same pool given twice")
    return pools


def _check_options(args: argparse.Namespace) -> None:
    """Raise ValueError naming the first option whose value the simulators would refuse."""
    if args.workers < 1:
        raise ValueError(f"--workers: at least 1, got {args.workers}")
    if args.queue_size < 0:
        raise ValueError(f"--queue-size: at least 0, got {args.queue_size}")
    if not (math.isfinite(args.task_ms) and args.task_ms >= 0):
        raise ValueError(f"--task-ms: a number of milliseconds >= 0, got {args.task_ms:g}")
    if not 0 <= args.fail_rate <= 1:
        raise ValueError(f"--fail-rate: a probability within [0, 1], got {args.fail_rate:g}")
    if args.min_heartbeat_ms < 0:
        raise ValueError(f"--min-heartbeat-ms: at least 0, got {args.min_heartbeat_ms}")


def _simulators(args: argparse.Namespace, pools: Sequence[str]) -> dict[str, SpmClient]:
    """One simulator per pool. Raises ValueError naming ``--state-dir`` when a pool's
    directory cannot be made or used, or another simulator has it open (the simulators made by
    then are closed, letting go of their directories)."""
    from spm._simulator import SimulatedSpm

    spms: dict[str, SpmClient] = {}
    for index, pool in enumerate(pools):
        options: dict[str, Any] = {
            "workers": args.workers,
            "queue_size": args.queue_size,
            "durations": args.task_ms / 1000.0,
            "failure_rates": args.fail_rate,
            "seed": None if args.seed is None else args.seed + index,
        }
        if args.state_dir is None:
            spms[pool] = SimulatedSpm(pool, **options)
            continue
        state_dir = os.path.join(args.state_dir, pool)
        try:
            os.makedirs(state_dir, exist_ok=True)
            spms[pool] = SimulatedSpm(pool, **options, state_dir=state_dir, fsync=args.fsync)
        except (OSError, ValueError) as exc:
            _close_all(spms)
            if isinstance(exc, OSError) and exc.strerror:
                where = exc.filename if exc.filename not in (None, state_dir) else None
                reason = exc.strerror + (f" ({where})" if where else "")
            else:
                reason = str(exc).removeprefix("state_dir").lstrip(": ")
            raise ValueError(f"--state-dir: {state_dir}: {reason}") from None
    return spms


def serve_main(argv: list[str]) -> int:
    """Run ``spmchain spm serve`` with ``argv`` (options only); the process exit status.

    Returns 2 for bad options (a value out of range, a ``--state-dir`` that cannot be used;
    one line on stderr names the option), 1 when the address cannot be bound or the TLS files
    cannot be loaded, 0 after a clean stop on SIGTERM/SIGINT. Signal handlers are installed
    only when called from the main thread, once the options were accepted.
    """
    parser = build_serve_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0) if isinstance(exc.code, int) else 2
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.WARNING),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        pools = _pools(args)
        _check_options(args)
    except ValueError as exc:
        print(f"spmchain spm serve: {exc}", file=sys.stderr)
        return 2
    if (args.tls_cert is None) != (args.tls_key is None) or (
        args.tls_ca is not None and args.tls_cert is None
    ):
        print("spmchain spm serve: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    try:
        ssl_context = (
            server_ssl_context(args.tls_cert, args.tls_key, args.tls_ca)
            if args.tls_cert is not None
            else None
        )
    except OSError as exc:
        print(f"spmchain spm serve: cannot load TLS files: {exc}", file=sys.stderr)
        return 1
    try:
        spms = _simulators(args, pools)
    except ValueError as exc:
        print(f"spmchain spm serve: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    host, port = args.listen
    server = SpmStompServer(spms, host, port, ssl_context, min_heartbeat_ms=args.min_heartbeat_ms)
    try:
        server.start()
    except OSError as exc:
        print(f"spmchain spm serve: cannot listen on {host}:{port}: {exc}", file=sys.stderr)
        _close_all(spms)
        return 1
    print(f"listening on {server.url} pools {','.join(pools)}", flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        server.stop()
        _close_all(spms)
    return 0


def _close_all(spms: dict[str, SpmClient]) -> None:
    for spm in spms.values():
        try:
            spm.close()
        except Exception:
            log.exception("closing the SPM of a pool failed")


if __name__ == "__main__":
    sys.exit(serve_main(sys.argv[1:]))
