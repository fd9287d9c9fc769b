"""Run the runtime and the bare-asyncio baseline on the same workloads and print one table.

Each run is a fresh process (``sys.executable``): ``python -m actors._cli loadtest ... --json``
(the ``spmchain loadtest`` command) with the durable SQLite store (its default),
``--store memory`` and ``--store none``, and ``bench/baseline_asyncio.py`` with the same flags.
The workloads:

* ``capacity``: 10,000 chains x 5 steps on 4 pools, instant tasks, an SPM that does not bind
  (``--spm-workers 1000 --max-outstanding 2500``): what the implementation itself costs.
* ``task50``: 2,000 chains x 5 steps on 4 pools, 50 ms tasks, the SPM's default 10 workers and
  the default outstanding limit: whether the SPM's workers are kept busy.
* ``big`` (with ``--big``): 100,000 chains x 5 steps on 8 pools, capacity flags: memory at scale.

The table has, per workload and implementation, the median over ``--repeat`` runs of steps/s,
wall, peak RSS, reaction p99 (a task's end on the SPM to the next step of its chain fired) and
SPM utilization, and the median over the repeats of each runtime row's ratio to the baseline
run of the same repeat (steps/s and RSS). ``ended`` is the runs in which every chain ended
successfully with no duplicated effect, out of the runs made.

Every run has a time budget (``--timeout`` is passed on, and the process is killed when a grace
of a minute or half the budget has passed after it); a run that fails, times out or writes no
report shows as an error row, and the exit status is then 1. ``--quick`` runs small workloads
(seconds) for a smoke test.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BASELINE = os.path.join(HERE, "baseline_asyncio.py")


@dataclass(frozen=True, slots=True)
class Workload:
    name: str
    title: str
    args: tuple[str, ...]
    budget_s: float
    """Seconds a run may take before it is given up (``--timeout`` for the run itself)."""


@dataclass(frozen=True, slots=True)
class Implementation:
    key: str
    name: str
    baseline: bool
    extra: tuple[str, ...] = ()


CAPACITY_FLAGS = ("--spm-workers", "1000", "--max-outstanding", "2500")

WORKLOADS: dict[str, Workload] = {
    "capacity": Workload(
        "capacity", "10,000 chains x 5 steps, 4 pools, instant tasks, SPM not binding",
        ("--chains", "10000", "--steps", "5", "--pools", "4", *CAPACITY_FLAGS), 300.0),
    "task50": Workload(
        "task50", "2,000 chains x 5 steps, 4 pools, 50 ms tasks, 10 SPM workers a pool",
        ("--chains", "2000", "--steps", "5", "--pools", "4", "--task-ms", "50"), 300.0),
    "big": Workload(
        "big", "100,000 chains x 5 steps, 8 pools, instant tasks, SPM not binding",
        ("--chains", "100000", "--steps", "5", "--pools", "8", *CAPACITY_FLAGS), 1200.0),
}

QUICK_WORKLOADS: dict[str, Workload] = {
    "capacity": Workload(
        "capacity", "quick: 1,000 chains x 5 steps, 4 pools, instant tasks, SPM not binding",
        ("--chains", "1000", "--steps", "5", "--pools", "4", *CAPACITY_FLAGS), 60.0),
    "task50": Workload(
        "task50", "quick: 200 chains x 3 steps, 4 pools, 20 ms tasks, 10 SPM workers a pool",
        ("--chains", "200", "--steps", "3", "--pools", "4", "--task-ms", "20"), 60.0),
}

IMPLEMENTATIONS: tuple[Implementation, ...] = (
    Implementation("sqlite", "runtime, SQLite store (durable)", False),
    Implementation("sqlite-all", "runtime, SQLite store, no admission limit", False,
                   ("--admission-target-ms", "0")),
    Implementation("memory", "runtime, memory store", False, ("--store", "memory")),
    Implementation("none", "runtime, no store", False, ("--store", "none")),
    Implementation("asyncio", "bare asyncio", True),
)


@dataclass(slots=True)
class Run:
    workload: str
    implementation: str
    repeat: int
    command: list[str]
    report: dict[str, Any] | None = None
    error: str | None = None
    elapsed_s: float = 0.0


@dataclass(slots=True)
class Row:
    workload: str
    implementation: str
    runs: list[Run] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    rss_ratios: list[float] = field(default_factory=list)


def command_for(workload: Workload, impl: Implementation, json_path: str) -> list[str]:
    """The argv of one run (the loadtest through ``python -m actors._cli``, which is what the
    ``spmchain`` script runs)."""
    tail = [*workload.args, "--timeout", f"{workload.budget_s:g}", "--json", json_path]
    if impl.baseline:
        return [sys.executable, BASELINE, *tail]
    return [sys.executable, "-m", "actors._cli", "loadtest", *tail, *impl.extra]


def grace_s(workload: Workload) -> float:
    """How long a run may take past its budget (stopping a runtime with many live chains takes
    time) before its process is killed."""
    return max(60.0, workload.budget_s / 2)


def run_one(workload: Workload, impl: Implementation, repeat: int, tmpdir: str,
            verbose: bool) -> Run:
    """Run one process and read its JSON report. The process gets the workload's budget plus a
    grace (:func:`grace_s`), then is killed; a missing or unreadable report is recorded as the
    run's error."""
    slug = "".join(c if c.isalnum() else "-" for c in impl.name)
    json_path = os.path.join(tmpdir, f"{workload.name}-{slug}-{repeat}.json")
    cmd = command_for(workload, impl, json_path)
    run = Run(workload.name, impl.name, repeat, cmd)
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=workload.budget_s + grace_s(workload), check=False)
    except subprocess.TimeoutExpired:
        run.error = f"killed after {time.monotonic() - t0:.0f} s"
    else:
        try:
            with open(json_path, encoding="utf-8") as f:
                run.report = json.load(f)
        except (OSError, ValueError) as err:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-2:]
            why = "no report" if isinstance(err, FileNotFoundError) else f"bad report ({err})"
            signal_note = f" (signal {-proc.returncode})" if proc.returncode < 0 else ""
            run.error = f"exit {proc.returncode}{signal_note}, {why}: {' / '.join(tail)}"
    run.elapsed_s = time.monotonic() - t0
    if verbose:
        r = run.report or {}
        print(f"  {workload.name:<9} {impl.name:<32} #{repeat + 1}: "
              f"{r.get('steps_per_s', 0):>9,.0f} steps/s  {r.get('wall_s', 0):6.2f} s  "
              f"{run.error or ''}", file=sys.stderr, flush=True)
    return run


def succeeded(report: dict[str, Any] | None) -> bool:
    """Every chain ended successfully, none timed out, no effect applied twice."""
    return report is not None and (
        report.get("ended_successfully") == report.get("chains")
        and not report.get("timed_out")
        and report.get("duplicated_effects") in (0, None))


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def _reaction_p99(report: dict[str, Any]) -> float | None:
    r = report.get("reaction_latency_ms")
    return float(r["p99"]) if isinstance(r, dict) and "p99" in r else None


def run_all(workloads: Sequence[Workload], repeat: int, verbose: bool,
            implementations: Sequence[Implementation] = IMPLEMENTATIONS) -> list[Row]:
    """Each implementation on every workload, ``repeat`` times, interleaved (one repeat runs
    each implementation once, so a ratio compares runs made close in time). Without the
    baseline among ``implementations`` there are no ratios."""
    rows: dict[tuple[str, str], Row] = {}
    for w in workloads:
        for impl in implementations:
            rows[(w.name, impl.name)] = Row(w.name, impl.name)
    with tempfile.TemporaryDirectory(prefix="spmchain-bench-") as tmpdir:
        for i in range(repeat):
            for w in workloads:
                runs = {impl.name: run_one(w, impl, i, tmpdir, verbose) for impl in implementations}
                base = next((runs[impl.name] for impl in implementations if impl.baseline), None)
                for impl in implementations:
                    row = rows[(w.name, impl.name)]
                    run = runs[impl.name]
                    row.runs.append(run)
                    if (impl.baseline or run.report is None or base is None
                            or base.report is None):
                        continue
                    if base.report.get("steps_per_s"):
                        row.ratios.append(run.report["steps_per_s"] / base.report["steps_per_s"])
                    if base.report.get("peak_rss_mib"):
                        row.rss_ratios.append(
                            run.report["peak_rss_mib"] / base.report["peak_rss_mib"])
    return list(rows.values())


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def _cell(text: str, width: int = 60) -> str:
    """``text`` fit for one Markdown table cell: no pipes or newlines, at most ``width`` chars."""
    text = " ".join(text.replace("|", "/").split())
    return text if len(text) <= width else text[: width - 3] + "..."


def table(rows: Sequence[Row]) -> str:
    """The results as one Markdown table (medians over the repeats)."""
    head = ("workload", "implementation", "steps/s", "x asyncio", "wall s", "peak RSS MiB",
            "RSS x asyncio", "reaction p99 ms", "SPM util", "ended")
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join("---:" if i > 1 else "---" for i in range(len(head))) + "|"]
    for row in rows:
        reports = [r.report for r in row.runs if r.report is not None]
        errors = [r.error for r in row.runs if r.error]
        ok = sum(1 for r in row.runs if succeeded(r.report))
        if not reports:
            lines.append(f"| {row.workload} | {row.implementation} | error |"
                         + " |" * (len(head) - 4) + f" 0/{len(row.runs)} ({_cell(errors[0])}) |")
            continue
        util = [float(r["spm_utilization"]) for r in reports
                if r.get("spm_utilization") is not None]
        p99 = [v for v in (_reaction_p99(r) for r in reports) if v is not None]
        baseline = not row.ratios and row.implementation == "bare asyncio"
        cells = [
            row.workload,
            row.implementation,
            _fmt(_median([r["steps_per_s"] for r in reports]), ",.0f"),
            "1" if baseline else _fmt(_median(row.ratios), ".2f"),
            _fmt(_median([r["wall_s"] for r in reports]), ".2f"),
            _fmt(_median([r["peak_rss_mib"] for r in reports]), ".0f"),
            "1" if baseline else _fmt(_median(row.rss_ratios), ".2f"),
            _fmt(_median(p99), ".1f"),
            _fmt(_median(util), ".1%"),
            f"{ok}/{len(row.runs)}" + (f" ({_cell(errors[0])})" if errors else ""),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    """Cores, CPU model, Python, platform and the load average (the machine may be shared)."""
    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    return {
        "cores": os.cpu_count(),
        "cpu": model,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(),
        "load_average": [round(x, 2) for x in load],
    }


def display_command(cmd: Sequence[str]) -> str:
    """A run's argv as a shell line, paths relative to the repository, without ``--json``."""
    shown: list[str] = []
    skip = False
    for i, arg in enumerate(cmd):
        if skip:
            skip = False
            continue
        if arg == "--json":
            skip = True
            continue
        if i == 0:
            shown.append("python")
        elif arg.startswith(ROOT + os.sep):
            shown.append(os.path.relpath(arg, ROOT))
        else:
            shown.append(arg)
    return shlex.join(shown)


def _frame_function(frame: str) -> str:
    """``Class.method (path/file.py:123)`` -> ``Class.method (path/file.py)``."""
    name, _, where = frame.rpartition(" (")
    if not name:
        return frame
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "lib/python3."):
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker.startswith("lib/python3."):
                path = "stdlib/" + path.split("/", 1)[-1]
    return f"{name} ({path})"


def _role(stack: Sequence[str]) -> str:
    """Which part of the process a sample belongs to: the actor or loop its thread runs."""
    for frame in stack:
        name = frame.split(" (", 1)[0]
        if name.endswith(".on_receive") or name.endswith(".on_start"):
            return name.rsplit(".", 1)[0]
        if name in ("WorkerPool._work",):
            continue
        if name.endswith("._run") and "Thread" not in name:
            return name.rsplit(".", 1)[0]
    if any(frame.startswith(("_run_module_as_main", "<module>")) for frame in stack[:3]):
        return "main thread"
    for frame in stack:
        name = frame.split(" (", 1)[0]
        if not name.startswith(("Thread.", "_run_module", "_run_code", "<module>")):
            return name
    return stack[0]


# Frames every sample of a thread passes through: left out of the inclusive listing.
_PLUMBING = ("Thread.", "_run_module_as_main ", "_run_code ", "<module> ", "main (actors/_cli",
             "_loadtest (actors/_cli", "Actor._actor_loop", "WorkerPool._work ",
             "PooledActor._run_turn ", "PooledActor._handle_envelope ",
             "Actor._handle_receive ", "GroupCommitStore._run ")


# Areas of the runtime's hot path: a sample counts for an area when any frame of its stack
# contains one of the markers (so areas may overlap).
PROFILE_AREAS: dict[str, tuple[str, ...]] = {
    "snapshot encoding (to_dict, msgpack, digest)": (
        "encode_snapshot", "ChainState.to_dict", "_digest", "packb", "ChainSpec.packed"),
    "spec validation (validate_spec, _validate_step)": (
        "_validate_step", "validate_spec", "_check_plain", "_check_params"),
    "chain state copies (dataclasses.replace, __init__)": ("replace (", "__create_fn__"),
    "message passing (tell, pooled inbox, conditions)": (
        "ActorRef.tell", "_PooledInbox.put", "Condition.", "Queue.put", "SimpleQueue"),
    "simulated SPM (SimulatedSpm)": ("SimulatedSpm.",),
    "polling (PollerActor._poll)": ("PollerActor._poll",),
    "store writer thread (GroupCommitStore)": ("GroupCommitStore._loop",),
    "metrics (prometheus_client)": ("prometheus_client",),
    "Runtime.submit (main thread)": ("Runtime.submit",),
    "after the run: ledger check, report": ("check_ledgers", "_ledger_view", "reaction_latency"),
}


def summarize_profile(path: str, top: int = 15) -> str:
    """Aggregate a py-spy ``--format raw`` file (``frame;frame;... count`` per line, root first)
    into the top functions by self samples and by inclusive samples, and samples by thread role
    (percentages of all samples). Raises OSError when the file cannot be read and ValueError on
    a line that is not ``stack count``."""
    self_counts: dict[str, int] = {}
    incl_counts: dict[str, int] = {}
    roles: dict[str, int] = {}
    areas = dict.fromkeys(PROFILE_AREAS, 0)
    total = 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line:
                continue
            stack_text, _, count_text = line.rpartition(" ")
            try:
                count = int(count_text)
            except ValueError:
                raise ValueError(f"{path}:{lineno}: not 'stack count': {line[:80]!r}") from None
            frames = stack_text.split(";") if stack_text.strip() else ["(no Python frame)"]
            total += count
            functions = [_frame_function(fr) for fr in frames]
            leaf = functions[-1]
            self_counts[leaf] = self_counts.get(leaf, 0) + count
            for fn in set(functions):
                incl_counts[fn] = incl_counts.get(fn, 0) + count
            role = _role(frames)
            roles[role] = roles.get(role, 0) + count
            for area, markers in PROFILE_AREAS.items():
                if any(marker in stack_text for marker in markers):
                    areas[area] += count
    if total == 0:
        return f"{path}: no samples"

    def block(title: str, counts: dict[str, int], n: int) -> list[str]:
        rows = sorted(counts.items(), key=lambda kv: -kv[1])[:n]
        return [title, *(f"  {100.0 * c / total:5.1f}%  {fn}" for fn, c in rows)]

    lines = [f"{path}: {total} samples"]
    lines += block("by thread role:", roles, 10)
    lines += block("by area (overlapping):", areas, len(areas))
    lines += block(f"top {top} by self samples:", self_counts, top)
    lines += block(f"top {top} by inclusive samples (thread and actor loops left out):",
                   {fn: c for fn, c in incl_counts.items() if not fn.startswith(_PLUMBING)}, top)
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench/run.py",
        description="Run the runtime (SQLite, memory and no store) and a bare-asyncio baseline "
                    "on the same workloads, each in a fresh process, and print one table.")
    p.add_argument("--repeat", type=int, default=1, help="runs of each; the table shows medians")
    p.add_argument("--quick", action="store_true", help="small workloads (a smoke test, < 30 s)")
    p.add_argument("--big", action="store_true", help="add 100,000 chains x 5 steps on 8 pools")
    p.add_argument("--only", default=None, metavar="NAMES",
                   help="comma-separated workloads to run (capacity, task50, big)")
    p.add_argument("--impls", default=None, metavar="KEYS",
                   help="comma-separated implementations to run: "
                        + ", ".join(i.key for i in IMPLEMENTATIONS) + " (default: all)")
    p.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                   help="time budget of each run, instead of the workload's own (300 s; 1200 s "
                        "for big); a run that times out still reports what it did")
    p.add_argument("--json", metavar="FILE", default=None,
                   help="write the machine, the commands and every run's report as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no per-run lines on stderr")
    p.add_argument("--profile-summary", metavar="RAW", default=None,
                   help="only summarise a py-spy --format raw file (top functions by self and "
                        "inclusive samples) and exit")
    p.add_argument("--top", type=int, default=15, help="functions listed by --profile-summary")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.profile_summary:
        print(summarize_profile(args.profile_summary, args.top))
        return 0
    if args.repeat < 1:
        print("bench/run.py: --repeat must be at least 1", file=sys.stderr)
        return 2
    catalog = QUICK_WORKLOADS if args.quick else WORKLOADS
    names = ["capacity", "task50"] + (["big"] if args.big and not args.quick else [])
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in catalog]
        if unknown:
            print(f"bench/run.py: unknown workload(s) {', '.join(unknown)}; known: "
                  f"{', '.join(catalog)}", file=sys.stderr)
            return 2
    workloads = [catalog[n] for n in names]
    implementations = list(IMPLEMENTATIONS)
    if args.impls:
        keys = [k.strip() for k in args.impls.split(",") if k.strip()]
        by_key = {i.key: i for i in IMPLEMENTATIONS}
        unknown = [k for k in keys if k not in by_key]
        if unknown:
            print(f"bench/run.py: unknown implementation(s) {', '.join(unknown)}; known: "
                  f"{', '.join(by_key)}", file=sys.stderr)
            return 2
        implementations = [by_key[k] for k in keys]
    if args.budget is not None:
        if args.budget <= 0:
            print("bench/run.py: --budget must be positive", file=sys.stderr)
            return 2
        workloads = [dataclasses.replace(w, budget_s=args.budget) for w in workloads]
    started = datetime.datetime.now(datetime.UTC)
    before = machine()
    t0 = time.monotonic()
    rows = run_all(workloads, args.repeat, verbose=not args.quiet,
                   implementations=implementations)
    elapsed = time.monotonic() - t0
    after = machine()
    print(f"spmchain benchmark, {started:%Y-%m-%d %H:%M} UTC, {elapsed:.0f} s, "
          f"median of {args.repeat} run(s) each")
    print(f"machine: {before['cores']} cores ({before['cpu'] or 'unknown CPU'}), "
          f"{before['python']}, {before['platform']}")
    print(f"load average before/after: {before['load_average']} / {after['load_average']}")
    print()
    for w in workloads:
        print(f"- {w.name}: {w.title}")
    print()
    print(table(rows))
    print()
    print("commands (each run in a fresh process; `python -m actors._cli` is `spmchain`; "
          "each also gets --json FILE):")
    seen: set[str] = set()
    for row in rows:
        line = display_command(row.runs[0].command)
        if line not in seen:
            seen.add(line)
            print(f"  {line}")
    if args.json:
        data = {
            "started": started.isoformat(), "elapsed_s": round(elapsed, 1),
            "repeat": args.repeat, "machine": before, "load_average_after": after["load_average"],
            "runs": [{"workload": r.workload, "implementation": r.implementation,
                      "repeat": r.repeat, "command": display_command(r.command),
                      "elapsed_s": round(r.elapsed_s, 2), "error": r.error, "report": r.report}
                     for row in rows for r in row.runs],
        }
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
    ok = all(succeeded(r.report) and r.error is None for row in rows for r in row.runs)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
