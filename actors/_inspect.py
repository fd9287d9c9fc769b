"""``spmchain inspect``: read a snapshot store and say what every chain is doing.

What oVirt operators do with ``taskcleaner.sh``, for this runtime: which chains are live, on
which pool, at which step, waiting on which SPM task, and since when; one chain's steps with
their task ids, outcomes and timestamps; the snapshots that were quarantined because they did not
decode.

The store is opened with `actors._store_sqlite.open_readonly`: a read-only SQLite connection
that never writes the file, so inspecting a store while the engine runs on it is safe and sees
the last committed group commit. A snapshot that does not decode here is listed as undecodable
with the error, never stops the listing. Exit status: 0 when the store was read (also when the
reader of the output goes away, as with ``| head``), 1 when ``--chain`` names a chain the store
does not hold, 2 when the store cannot be opened or read (missing file, not a snapshot store,
newer store format).

Every snapshot is decoded in full (``ChainState.from_dict``, which validates the chain's spec
again), so a listing costs about a quarter of a millisecond of CPU per stored chain.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Final, TextIO

from actors._chain import ENDED_SUCCESSFULLY, ENDED_WITH_FAILURE, ChainState, StepRecord
from actors._snapshot import decode_snapshot
from actors._spec import ChainSpec, ChainSpecError, StepSpec
from actors._store import QuarantinedSnapshot, SnapshotReader, StoreError
from actors._store_sqlite import open_readonly

__all__ = [
    "EXIT_NO_CHAIN",
    "EXIT_STORE",
    "PHASES",
    "InspectError",
    "add_arguments",
    "chain_detail",
    "decode_chain",
    "inspect_store",
    "quarantine_listing",
    "run",
]

PHASES: Final = ("new", "running", "failing", "reverting", "ended")
"""A chain's phases, in the order the listing shows them."""

EXIT_NO_CHAIN: Final = 1
"""Exit status when ``--chain`` names a chain the store does not hold."""

EXIT_STORE: Final = 2
"""Exit status when the store cannot be opened or read."""

# A placeholder spec that ChainState.from_dict accepts; swapped for the stored spec when that one
# names a Command class registered only in the engine's process (see `decode_chain`).
_PLACEHOLDER_SPEC: Final = {"pool": "inspect", "command_type": "inspect",
                            "steps": [{"verb": "inspect"}]}


class InspectError(Exception):
    """The store cannot be inspected; ``exit_status`` is what the command exits with."""

    def __init__(self, message: str, exit_status: int = EXIT_STORE) -> None:
        super().__init__(message)
        self.exit_status = exit_status


# --------------------------------------------------------------------------------------------
# Decoding


def decode_chain(blob: bytes, spec: bytes | None = None) -> ChainState:
    """Decode one stored snapshot into the chain's state.

    A chain driven by a registered `Command` class (``spec.command``) decodes even though the
    class is registered only in the engine's process, not in this one: the spec is then taken
    as stored, without that check. Raises whatever decoding raises for a damaged or malformed
    blob (`SnapshotError`, KeyError, TypeError, ValueError, ...); callers report it.
    """
    payload = decode_snapshot(blob)
    if payload.get("spec") is None and spec is not None:
        payload["spec"] = spec  # kept once per chain by the store, apart from its snapshots
    try:
        return ChainState.from_dict(payload)
    except ChainSpecError as exc:
        if exc.field != "command":
            raise
    stored = payload["spec"]
    if isinstance(stored, bytes):  # the spec packed once and nested in every snapshot
        from actors._snapshot import unpack_nested

        stored = unpack_nested(stored)
    state = ChainState.from_dict({**payload, "spec": _PLACEHOLDER_SPEC})
    return replace(state, spec=_unchecked_spec(stored))


def _unchecked_spec(data: Mapping[str, Any]) -> ChainSpec:
    """The stored spec as it is, for display only (never run)."""
    steps = data.get("steps")
    return ChainSpec(
        pool=str(data["pool"]),
        command_type=str(data["command_type"]),
        params=dict(data.get("params") or {}),
        steps=None if steps is None else [StepSpec.from_dict(s) for s in steps],
        command=data.get("command"),
        deadline_s=data.get("deadline_s"),
        task_timeout_s=data.get("task_timeout_s"),
        chain_id=data.get("chain_id"),
    )


@dataclass(frozen=True, slots=True)
class _Row:
    chain_id: str
    ended_flag: bool
    updated_at: float | None
    state: ChainState | None
    error: str | None


def _decode_row(chain_id: str, blob: bytes, ended: bool, updated_at: float | None,
                spec: bytes | None = None) -> _Row:
    try:
        state = decode_chain(blob, spec)
    except Exception as exc:  # a damaged blob may fail anywhere in decoding; report, go on
        return _Row(chain_id, ended, updated_at, None, f"{type(exc).__name__}: {exc}")
    return _Row(chain_id, ended, updated_at, state, None)


# --------------------------------------------------------------------------------------------
# What the command reports, as plain data (the JSON output; the text output renders it)


def _step_summary(rec: StepRecord | None) -> dict[str, Any] | None:
    if rec is None:
        return None
    return {"index": rec.index, "verb": rec.verb, "status": rec.status, "task_id": rec.task_id}


def _in_flight(state: ChainState) -> list[dict[str, Any]]:
    """Tasks fired or being fired and not yet ended; ``task_id`` None while being fired."""
    out = []
    for (kind, index, _attempt), task_id, rec in state.in_flight():
        verb = rec.verb if kind == "step" else rec.revert_verb
        out.append({"kind": kind, "index": index, "verb": verb, "task_id": task_id})
    return out


def _total_steps(spec: ChainSpec) -> int | None:
    return None if spec.steps is None else len(spec.steps)


def _chain_summary(row: _Row, now: float) -> dict[str, Any]:
    state = row.state
    assert state is not None
    return {
        "chain_id": row.chain_id,
        "phase": state.phase,
        "pool": state.spec.pool,
        "command_type": state.spec.command_type,
        "current_step": _step_summary(state.current),
        "steps_total": _total_steps(state.spec),
        "in_flight": _in_flight(state),
        "created_at": state.created_at,
        "age_s": round(max(0.0, now - state.created_at), 3),
        "deadline_at": state.deadline_at,
        "updated_at": row.updated_at,
        "outcome": state.outcome,
        "reason": state.reason,
        "ended_at": state.ended_at,
    }


def _undecodable(row: _Row) -> dict[str, Any]:
    return {"chain_id": row.chain_id, "ended": row.ended_flag, "updated_at": row.updated_at,
            "error": row.error}


def _quarantined(entry: QuarantinedSnapshot) -> dict[str, Any]:
    return {"chain_id": entry.chain_id, "reason": entry.reason,
            "quarantined_at": entry.quarantined_at, "size": len(entry.blob)}


def inspect_store(
    reader: SnapshotReader, state: str = "all", now: float | None = None
) -> dict[str, Any]:
    """Counts and the chains of ``state`` (``live``, ``ended`` or ``all``), grouped by phase.

    Counts always cover the whole store: ``live``, ``ended_successfully``,
    ``ended_with_failure``, ``quarantined`` and ``undecodable`` (stored snapshots that do not
    decode; they are listed under ``undecodable`` with the error, whatever ``state`` asks).
    Chains are sorted by creation time within each phase. Raises `StoreError` when the store
    cannot be read.
    """
    if state not in ("live", "ended", "all"):
        raise ValueError(f"state must be live, ended or all, not {state!r}")
    now = time.time() if now is None else now
    counts = {"live": 0, ENDED_SUCCESSFULLY: 0, ENDED_WITH_FAILURE: 0, "quarantined": 0,
              "undecodable": 0}
    by_phase: dict[str, list[tuple[float, dict[str, Any]]]] = {p: [] for p in PHASES}
    undecodable: list[dict[str, Any]] = []
    for stored in reader.load_all():
        row = _decode_row(stored.chain_id, stored.blob, stored.ended, stored.updated_at,
                          stored.spec)
        if row.state is None:
            counts["undecodable"] += 1
            undecodable.append(_undecodable(row))
            continue
        ended = row.state.ended
        if ended:
            outcome = row.state.outcome or ENDED_WITH_FAILURE
            counts[outcome] = counts.get(outcome, 0) + 1
        else:
            counts["live"] += 1
        if state == "all" or (state == "ended") == ended:
            by_phase.setdefault(row.state.phase, []).append(
                (row.state.created_at, _chain_summary(row, now))
            )
    counts["quarantined"] = reader.counts().quarantined
    chains = {
        phase: [summary for _, summary in sorted(entries, key=lambda e: (e[0], e[1]["chain_id"]))]
        for phase, entries in by_phase.items()
        if state == "all" or (phase == "ended") == (state == "ended")
    }
    return {"generated_at": now, "state": state, "counts": counts, "chains": chains,
            "undecodable": undecodable}


def chain_detail(reader: SnapshotReader, chain_id: str, now: float | None = None) -> dict[str, Any]:
    """Everything one chain's snapshot says: its spec, each step and revert, why it ended.

    A chain whose snapshot was quarantined is reported with ``quarantined`` (its entries) and
    ``state`` None; a snapshot that does not decode with ``error``. Raises `InspectError`
    (exit status 1) when the store holds no such chain, `StoreError` when it cannot be read.
    """
    now = time.time() if now is None else now
    blob = reader.load(chain_id)
    quarantined = [_quarantined(q) for q in reader.quarantined() if q.chain_id == chain_id]
    if blob is None:
        if quarantined:
            return {"chain_id": chain_id, "state": None, "error": None,
                    "quarantined": quarantined}
        raise InspectError(f"the store holds no chain {chain_id!r}", EXIT_NO_CHAIN)
    row = _decode_row(chain_id, blob, False, None, reader.load_spec(chain_id))
    if row.state is None:
        return {"chain_id": chain_id, "state": None, "error": row.error,
                "quarantined": quarantined}
    st = row.state
    spec = st.spec
    return {
        "chain_id": chain_id,
        "error": None,
        "quarantined": quarantined,
        "state": {
            "phase": st.phase,
            "spec": {
                "pool": spec.pool,
                "command_type": spec.command_type,
                "command": spec.command,
                "steps_total": _total_steps(spec),
                "params": dict(spec.params),
                "deadline_s": spec.deadline_s,
                "task_timeout_s": spec.task_timeout_s,
            },
            "created_at": st.created_at,
            "age_s": round(max(0.0, now - st.created_at), 3),
            "deadline_at": st.deadline_at,
            "task_timeout_s": st.task_timeout_s,
            "hook": st.hook,
            "cancel_reason": st.cancel_reason,
            "reason": st.reason,
            "outcome": st.outcome,
            "ended_at": st.ended_at,
            "revert_queue": list(st.revert_queue),
            "notes": list(st.notes),
            "in_flight": _in_flight(st),
            "steps": [rec.to_dict() for rec in st.steps],
        },
    }


def quarantine_listing(reader: SnapshotReader) -> dict[str, Any]:
    """Every quarantined snapshot, oldest first, with its reason and time. StoreError if the
    store cannot be read."""
    entries = [_quarantined(q) for q in reader.quarantined()]
    return {"count": len(entries), "quarantined": entries}


# --------------------------------------------------------------------------------------------
# Text output


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    if not math.isfinite(ts):
        return str(ts)
    moment = datetime.datetime.fromtimestamp(ts, tz=datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes} min"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h"


def _task_list(in_flight: Iterable[Mapping[str, Any]]) -> str:
    parts = []
    for t in in_flight:
        tid = t["task_id"] or "(being fired)"
        parts.append(f"{tid} ({t['kind']} {t['index']} {t['verb']})")
    return ", ".join(parts) or "none"


def _write_counts(out: TextIO, counts: Mapping[str, int]) -> None:
    out.write(
        f"chains: {counts['live']} live, {counts[ENDED_SUCCESSFULLY]} ended_successfully, "
        f"{counts[ENDED_WITH_FAILURE]} ended_with_failure; "
        f"{counts['quarantined']} quarantined"
    )
    if counts.get("undecodable"):
        out.write(f", {counts['undecodable']} undecodable")
    out.write("\n")


def _write_listing(out: TextIO, report: Mapping[str, Any]) -> None:
    _write_counts(out, report["counts"])
    for phase, chains in report["chains"].items():
        if not chains:
            continue
        out.write(f"\n{phase} ({len(chains)})\n")
        for c in chains:
            if phase == "ended":
                reason = f": {c['reason']}" if c["reason"] else ""
                out.write(f"  {c['chain_id']}  pool {c['pool']}  {c['command_type']}  "
                          f"{c['outcome']}{reason}  ended {_when(c['ended_at'])}\n")
                continue
            step = c["current_step"]
            total = f" ({c['steps_total']} steps)" if c["steps_total"] is not None else ""
            where = ("no step fired yet" if step is None else
                     f"step {step['index']} {step['verb']} {step['status']}") + total
            out.write(f"  {c['chain_id']}  pool {c['pool']}  {c['command_type']}  {where}  "
                      f"age {_duration(c['age_s'])}\n")
            out.write(f"      in flight: {_task_list(c['in_flight'])}\n")
            if c["reason"]:
                out.write(f"      failing because: {c['reason']}\n")
    if report["undecodable"]:
        out.write(f"\nundecodable ({len(report['undecodable'])})\n")
        for u in report["undecodable"]:
            out.write(f"  {u['chain_id']}  {'ended' if u['ended'] else 'live'}  "
                      f"updated {_when(u['updated_at'])}  {u['error']}\n")


def _write_detail(out: TextIO, detail: Mapping[str, Any]) -> None:
    out.write(f"chain {detail['chain_id']}\n")
    for q in detail["quarantined"]:
        out.write(f"  quarantined {_when(q['quarantined_at'])}: {q['reason']}\n")
    if detail["error"] is not None:
        out.write(f"  snapshot does not decode: {detail['error']}\n")
    st = detail["state"]
    if st is None:
        return
    spec = st["spec"]
    driver = (f"command {spec['command']}" if spec["command"] is not None
              else f"{spec['steps_total']} steps")
    out.write(f"  pool {spec['pool']}  command_type {spec['command_type']}  {driver}\n")
    if spec["params"]:
        out.write(f"  params {json.dumps(spec['params'], sort_keys=True, default=str)}\n")
    out.write(f"  phase {st['phase']}  created {_when(st['created_at'])} "
              f"(age {_duration(st['age_s'])})  deadline {_when(st['deadline_at'])}  "
              f"task timeout {st['task_timeout_s']:g} s\n")
    if st["outcome"] is not None:
        out.write(f"  outcome {st['outcome']}  ended {_when(st['ended_at'])}\n")
    if st["reason"]:
        out.write(f"  reason {st['reason']}\n")
    if st["cancel_reason"]:
        out.write(f"  cancelled: {st['cancel_reason']}\n")
    if st["hook"]:
        out.write(f"  running hook {st['hook']}\n")
    for note in st["notes"]:
        out.write(f"  note: {note}\n")
    if st["phase"] != "ended":
        out.write(f"  in flight: {_task_list(st['in_flight'])}\n")
    out.write("  steps:\n")
    for s in st["steps"]:
        result = f"  code {s['code']} {s['message']}" if s["code"] else ""
        out.write(f"    {s['index']}  {s['verb']}  {s['status']}  task {s['task_id'] or '-'}"
                  f"{result}\n")
        out.write(f"       submitted {_when(s['submitted_at'])}  fired {_when(s['fired_at'])}  "
                  f"ended {_when(s['ended_at'])}\n")
        if s["revert_status"] is not None:
            code = f"  code {s['revert_code']} {s['revert_message']}" if s["revert_code"] else ""
            out.write(f"       revert {s['revert_verb']}  {s['revert_status']}  task "
                      f"{s['revert_task_id'] or '-'}  attempts {s['revert_attempts']}{code}\n")
            if s["old_revert_task_ids"]:
                out.write(f"       earlier revert tasks: {', '.join(s['old_revert_task_ids'])}\n")
    if not st["steps"]:
        out.write("    (none fired yet)\n")


def _write_quarantine(out: TextIO, listing: Mapping[str, Any]) -> None:
    out.write(f"quarantined snapshots: {listing['count']}\n")
    for q in listing["quarantined"]:
        out.write(f"  {q['chain_id']}  {_when(q['quarantined_at'])}  {q['size']} bytes  "
                  f"{q['reason']}\n")


# --------------------------------------------------------------------------------------------
# The command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``spmchain inspect``."""
    parser.add_argument("--store", required=True, metavar="PATH",
                        help="the SQLite snapshot store to read (read-only; safe while the "
                             "engine runs on it)")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--chain", metavar="ID", default=None,
                      help="show one chain: its spec, every step and revert with task ids, "
                           "codes and timestamps, and why it ended")
    what.add_argument("--quarantined", action="store_true",
                      help="list the quarantined snapshots with their reason and time")
    parser.add_argument("--state", choices=("live", "ended", "all"), default="all",
                        help="which chains the listing shows (default all; counts always "
                             "cover the whole store)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON document instead of text, for scripts")


def run(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run ``spmchain inspect``; returns the exit status.

    Writes the report to ``out`` (stdout) and an error to ``err`` (stderr): 2 when the store
    cannot be opened or read, 1 when ``--chain`` names no stored chain, else 0.
    """
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    try:
        reader = open_readonly(args.store)
    except StoreError as exc:
        err.write(f"spmchain inspect: {exc}\n")
        return EXIT_STORE
    try:
        with reader:
            report: dict[str, Any]
            render: Callable[[TextIO, Mapping[str, Any]], None]
            if args.chain is not None:
                report = chain_detail(reader, args.chain)
                render = _write_detail
            elif args.quarantined:
                report = quarantine_listing(reader)
                render = _write_quarantine
            else:
                report = inspect_store(reader, args.state)
                render = _write_listing
    except InspectError as exc:
        err.write(f"spmchain inspect: {exc}\n")
        return exc.exit_status
    except StoreError as exc:
        err.write(f"spmchain inspect: {exc}\n")
        return EXIT_STORE
    report = {"store": str(args.store), **report}
    try:
        if args.json:
            json.dump(report, out, indent=2, sort_keys=False, default=str)
            out.write("\n")
        else:
            out.write(f"store {args.store}\n")
            render(out, report)
        out.flush()
    except BrokenPipeError:
        # The reader went away (``spmchain inspect | head``): stop quietly, and keep the
        # interpreter from complaining again when it flushes stdout at exit.
        if out is sys.stdout:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
    return 0
