"""``spmchain loadtest``: many concurrent chains against simulated (or served) SPMs.

The workload: each chain builds a snapshot chain of volumes in an image of its own — step k is
``createVolume`` of volume k (on top of volume k-1), reverted by ``deleteVolume`` — on the pool
``chain_index % pools``. At the end the simulated storage (the ledger) is checked: effects
applied twice (``duplicated_effects``) and objects left behind by chains that ended with failure
(``leftover_effects``) must both be 0.
"""

from __future__ import annotations

import os
import platform
import random
import resource
import sys
import tempfile
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from actors._runtime import ChainResult, Runtime, RuntimeOptions
from actors._spec import ChainSpec, StepSpec
from spm._client import SpmClient


@dataclass(slots=True)
class LoadtestConfig:
    chains: int = 1000
    steps: int = 5
    pools: int = 4
    task_ms: Any = 0.0          # a float, or a duration spec tuple for the simulator
    fail_rate: float = 0.0
    seed: int = 1
    spm_workers: int = 10
    spm_queue: int = 500
    max_outstanding: int = 100
    poll_min_ms: float = 20.0
    poll_max_ms: float = 1000.0
    command_workers: int = 1
    admission_target_ms: float | None = 12.0  # None: no adaptive admission limit
    max_running: int | None = None
    timeout_s: float = 600.0
    spm_url: str | None = None
    store: str | None = "temp"   # "temp" (a durable SQLite file in a temporary directory),
                                  # a path, "memory" (not durable) or None (no snapshots)
    metrics_port: int | None = None
    metrics_addr: str = "127.0.0.1"
    options: dict[str, Any] = field(default_factory=dict)


REACTION_PAIRS = 200_000
"""About how many (task of step k, step k+1 fired) pairs are kept at most for the reaction
latency: beyond, only the chains that :func:`reaction_sampled` picks are."""


def reaction_sampled(chain_id: str, every: int) -> bool:
    """Whether chain ``chain_id`` is one of the chains, one in ``every``, whose reaction
    latency is sampled. Decided by a CRC-32 of the id, the same in every process (the ``hash``
    of a str changes from one process to the next), so that runs with the same ``--seed``
    sample the same chains."""
    return zlib.crc32(chain_id.encode()) % every == 0


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def pool_ids(n: int, seed: int) -> list[str]:
    rng = random.Random(f"pools-{seed}")
    return [_uuid(rng) for _ in range(n)]


def chain_spec(index: int, pool: str, steps: int, rng: random.Random) -> ChainSpec:
    """The loadtest's chain number ``index``: ``steps`` createVolume steps in a new image."""
    sd = _uuid(rng)
    img = _uuid(rng)
    resource_name = f"image:{sd}/{img}"
    specs: list[StepSpec] = []
    prev: str | None = None
    for _k in range(steps):
        vol = _uuid(rng)
        params: dict[str, Any] = {
            "sdUUID": sd, "spUUID": pool, "imgUUID": img, "volUUID": vol,
            "size": 1 << 30,
        }
        if prev is not None:
            params["srcImgUUID"] = img
            params["srcVolUUID"] = prev
        specs.append(StepSpec(
            verb="createVolume",
            params=params,
            revert_verb="deleteVolume",
            revert_params={"sdUUID": sd, "spUUID": pool, "imgUUID": img, "volUUID": vol},
            exclusive=(resource_name,),
        ))
        prev = vol
    return ChainSpec(pool=pool, command_type="loadtest_volume_chain",
                     params={"index": index, "sdUUID": sd, "imgUUID": img}, steps=specs,
                     chain_id=f"lt-{index:07d}")


def peak_rss_mib() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024.0 if sys.platform != "darwin" else rss / (1024.0 * 1024.0)


def machine() -> dict[str, Any]:
    return {
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
    }


class _Progress:
    """A live line on a terminal, plain periodic lines otherwise."""

    def __init__(self, total: int, out: TextIO, every_s: float) -> None:
        self.total = total
        self.out = out
        self.tty = out.isatty()
        self.every_s = 0.2 if self.tty else every_s
        self.t0 = time.monotonic()
        self._shown = 0  # length of the live line on the terminal

    def show(self, done: int, failed: int, steps: int, final: bool = False) -> None:
        el = max(time.monotonic() - self.t0, 1e-9)
        rate = steps / el
        if self.tty:
            width = 30
            filled = int(width * done / max(self.total, 1))
            bar = "#" * filled + "-" * (width - filled)
            line = (f"[{bar}] {done}/{self.total} chains  {rate:,.0f} steps/s  "
                    f"{failed} failed  {el:5.1f}s")
            # Padded to the previous line's length: a shorter line leaves nothing behind.
            self.out.write("\r" + line.ljust(self._shown))
            self._shown = len(line)
            if final:
                self.out.write("\n")
        else:
            self.out.write(f"loadtest: {done}/{self.total} chains ended, {rate:,.0f} steps/s, "
                           f"{failed} failed, {el:.1f}s\n")
        self.out.flush()


def build_spms(cfg: LoadtestConfig, pools: Sequence[str]) -> dict[str, SpmClient]:
    if cfg.spm_url:
        from spm._stomp_client import client_for_url

        return {p: client_for_url(cfg.spm_url, p) for p in pools}
    from spm._simulator import SimulatedSpm

    durations = cfg.task_ms
    if isinstance(durations, int | float):
        durations = durations / 1000.0
    failure_rates = {"createVolume": cfg.fail_rate} if cfg.fail_rate else 0.0
    return {
        p: SimulatedSpm(p, workers=cfg.spm_workers, queue_size=cfg.spm_queue,
                        durations=durations, failure_rates=failure_rates,
                        seed=cfg.seed * 1000 + i, clock=time.time)
        for i, p in enumerate(pools)
    }


def start_runtime(rt: Runtime, metrics_port: int | None, metrics_addr: str) -> None:
    """Start ``rt``; when its metrics server cannot serve at ``metrics_addr:metrics_port`` (an
    address that does not resolve or is not on this host, a port in use), raise ValueError
    naming ``--metrics-addr`` and ``--metrics-port`` with both values and the cause. Other
    errors of the start (the store, the SPM) are raised as they are."""
    try:
        rt.start()
    except (OSError, ValueError) as exc:
        # The runtime starts its metrics server first: no server means it was the one.
        if metrics_port is None or rt.metrics_server is not None:
            raise
        cause = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ValueError(f"--metrics-addr {metrics_addr} --metrics-port {metrics_port}: "
                         f"cannot serve metrics there: {cause}") from exc


def run_loadtest(
    cfg: LoadtestConfig,
    out: TextIO | None = None,
    progress_every_s: float = 2.0,
    on_runtime: Callable[[Runtime], None] | None = None,
) -> dict[str, Any]:
    """Run the load test and return its report (what ``--json`` writes).

    The run ends when every chain has ended, when ``cfg.timeout_s`` passes (``timed_out``), or
    as soon as the runtime stops by itself, a supervisor escalation (``stopped_reason`` says
    why; None otherwise). Raises ValueError, SpmError, StoreError or OSError when it cannot
    start (nothing runs then)."""
    out = out or sys.stdout
    if cfg.spm_url:
        from spm._stomp_client import connected_pools

        served = connected_pools(cfg.spm_url)
        if len(served) < cfg.pools:
            raise ValueError(f"--spm {cfg.spm_url} serves {len(served)} pools "
                             f"({', '.join(served) or 'none'}); --pools asks for {cfg.pools}")
        pools = served[: cfg.pools]
    else:
        pools = pool_ids(cfg.pools, cfg.seed)
    spms = build_spms(cfg, pools)
    options = RuntimeOptions(**{
        "max_outstanding": cfg.max_outstanding,
        "poll_min_s": cfg.poll_min_ms / 1000.0,
        "poll_max_s": cfg.poll_max_ms / 1000.0,
        "command_workers": cfg.command_workers,
        "admission_target_s": (cfg.admission_target_ms / 1000.0
                               if cfg.admission_target_ms is not None else None),
        "max_running": cfg.max_running,
        **cfg.options,  # RuntimeOptions fields given directly win
    })
    rng = random.Random(cfg.seed)
    lock = threading.Lock()
    all_done = threading.Event()
    counts = {"ok": 0, "failed": 0}
    failed_chains: list[ChainSpec] = []
    reasons: dict[str, int] = {}

    # Reaction latency: from step k's task ending on the SPM to step k+1 fired. The pairs
    # (task of step k, fired time of step k+1) are collected here; the end times come from
    # the simulator's ledger at the end. At most ~REACTION_PAIRS pairs are kept (one chain in
    # sample_every).
    pairs: list[tuple[str, float]] = []
    sample_every = max(1, (cfg.chains * max(cfg.steps - 1, 1)) // REACTION_PAIRS)

    def on_end(result: ChainResult) -> None:
        steps = result.state.steps
        if result.succeeded and reaction_sampled(result.chain_id, sample_every):
            for k in range(len(steps) - 1):
                task_id, fired = steps[k].task_id, steps[k + 1].fired_at
                if task_id is not None and fired is not None:
                    pairs.append((task_id, fired))
        with lock:
            if result.succeeded:
                counts["ok"] += 1
            else:
                counts["failed"] += 1
                failed_chains.append(result.state.spec)
                key = (result.reason or "").split(":")[0]
                reasons[key] = reasons.get(key, 0) + 1
            if counts["ok"] + counts["failed"] == cfg.chains:
                all_done.set()

    progress = _Progress(cfg.chains, out, progress_every_s)
    tmpdir = None
    store: str | None = cfg.store
    if store == "none":
        store = None  # as the CLI's --store none (not a file named "none")
    if store == "temp":
        tmpdir = tempfile.TemporaryDirectory(prefix="spmchain-loadtest-")
        store = os.path.join(tmpdir.name, "snapshots.sqlite")
    rt = Runtime(spms, options, store=store, metrics_port=cfg.metrics_port,
                 metrics_addr=cfg.metrics_addr)
    rt.add_done_callback(on_end)
    try:
        start_runtime(rt, cfg.metrics_port, cfg.metrics_addr)
    except BaseException:
        for client in spms.values():
            client.close()
        if tmpdir is not None:
            tmpdir.cleanup()
        raise
    steps_before = _steps_fired(rt)
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    timed_out = False
    try:
        if rt.metrics_server is not None:
            out.write(f"loadtest: metrics at {rt.metrics_server.url}\n")
            out.flush()
        if on_runtime is not None:
            on_runtime(rt)
        # Specs are made as they are submitted: the runtime holds each live chain's own.
        for i in range(cfg.chains):
            spec = chain_spec(i, pools[i % len(pools)], cfg.steps, rng)
            rt.submit(spec)
        if cfg.chains == 0:
            all_done.set()
        deadline = time.monotonic() + cfg.timeout_s
        next_show = time.monotonic() + progress.every_s
        # Chains running and waiting, sampled every 0.1 s (what admission let run).
        running_samples: list[int] = []
        waiting_samples: list[int] = []
        while not all_done.wait(0.1):
            if rt.stopped_reason is not None:  # the supervisor escalated: nothing more ends
                break
            adm = rt.admission().values()
            running_samples.append(sum(a.running for a in adm))
            waiting_samples.append(sum(a.waiting for a in adm))
            now = time.monotonic()
            if now >= next_show:
                next_show = now + progress.every_s
                progress.show(counts["ok"] + counts["failed"], counts["failed"],
                              _steps_fired(rt) - steps_before)
            if now > deadline:
                timed_out = True
                break
        wall = time.perf_counter() - t0
        stopped_reason = rt.stopped_reason  # before this run's own stop says "runtime stopped"
        usage1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu_s = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
        commit_s = _sample_sum(rt, "spmchain_snapshot_commit_seconds")
        steps = _steps_fired(rt) - steps_before
        progress.show(counts["ok"] + counts["failed"], counts["failed"], steps, final=True)
        live = len(rt.chains())
        store_stats = rt.store.stats() if rt.store is not None else None
    finally:
        rt.stop()
    if tmpdir is not None:
        tmpdir.cleanup()
    report: dict[str, Any] = {
        "chains": cfg.chains,
        "steps": cfg.steps,
        "pools": cfg.pools,
        "ended_successfully": counts["ok"],
        "ended_with_failure": counts["failed"],
        "not_ended": cfg.chains - counts["ok"] - counts["failed"],
        "timed_out": timed_out,
        "stopped_reason": stopped_reason,
        "steps_fired": steps,
        "reverts_fired": _reverts_fired(rt),
        "wall_s": round(wall, 3),
        "steps_per_s": round(steps / wall, 1) if wall > 0 else 0.0,
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "failure_reasons": reasons,
        "live_chains_at_end": live,
        "store": cfg.store if cfg.store != "temp" else "sqlite (temporary file)",
        "store_commits": store_stats.commits if store_stats else 0,
        "machine": machine(),
        "config": {
            "task_ms": cfg.task_ms, "fail_rate": cfg.fail_rate, "seed": cfg.seed,
            "spm_workers": cfg.spm_workers, "max_outstanding": cfg.max_outstanding,
            "poll_min_ms": cfg.poll_min_ms, "poll_max_ms": cfg.poll_max_ms,
            "admission_target_ms": cfg.admission_target_ms, "max_running": cfg.max_running,
            "spm": cfg.spm_url or "in-process simulator",
        },
    }
    report["admission"] = {
        "target_ms": cfg.admission_target_ms,
        "max_running": cfg.max_running,
        "running_mean": (round(sum(running_samples) / len(running_samples), 1)
                         if running_samples else None),
        "running_max": max(running_samples, default=None),
        "waiting_share": (round(sum(1 for w in waiting_samples if w) / len(waiting_samples), 3)
                          if waiting_samples else None),
    }
    report.update(check_ledgers(spms, failed_chains))
    report["reaction_latency_ms"] = reaction_latency(spms, pairs)
    report["spm_utilization"] = spm_utilization(spms, wall)
    report["cpu_utilization"] = round(cpu_s / wall, 3) if wall > 0 else None
    report["store_busy"] = round(commit_s / wall, 3) if wall > 0 else None
    report["bounded_by"] = bounded_by(report, cfg)
    for client in spms.values():
        client.close()
    return report


def _sample_sum(rt: Runtime, name: str) -> float:
    """``<name>_sum`` of a histogram in the runtime's registry (0 when absent)."""
    total = 0.0
    for family in rt.metrics.registry.collect():
        if family.name == name:
            total += sum(s.value for s in family.samples if s.name == f"{name}_sum")
    return total


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    i = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[i]


def reaction_latency(
    spms: Mapping[str, SpmClient], pairs: Sequence[tuple[str, float]]
) -> dict[str, Any] | None:
    """p50/p99/max ms from a task's end on the SPM (the simulator's record of its effect) to
    the next step of its chain fired; None when the SPM tells no end times (a remote SPM)."""
    ends: dict[str, float] = {}
    for client in spms.values():
        history = getattr(client, "ledger_history", None)
        if not callable(history):
            return None
        for event in history():
            if event.action == "apply" and event.op == "create" and event.verb == "createVolume":
                ends.setdefault(event.task_id, event.at)
    values = sorted(
        max(0.0, fired - ends[task_id]) * 1000.0 for task_id, fired in pairs if task_id in ends
    )
    if not values:
        return None
    return {
        "p50": round(_percentile(values, 0.50), 3),
        "p99": round(_percentile(values, 0.99), 3),
        "max": round(values[-1], 3),
        "samples": len(values),
    }


def spm_utilization(spms: Mapping[str, SpmClient], wall_s: float) -> float | None:
    """Busy worker time over workers x pools x wall time (in-process simulators only)."""
    busy = 0.0
    capacity = 0.0
    for client in spms.values():
        stats = getattr(client, "stats", None)
        if not callable(stats):
            return None
        s = stats()
        busy += s.worker_busy_seconds
        capacity += s.workers * wall_s
    if capacity <= 0 or busy <= 0:
        return None
    return round(min(1.0, busy / capacity), 4)


def bounded_by(report: Mapping[str, Any], cfg: LoadtestConfig) -> str:
    """What most likely limited the run's throughput, with the evidence."""
    util = report.get("spm_utilization")
    cpu = report.get("cpu_utilization") or 0.0
    store = report.get("store_busy") or 0.0
    reaction = report.get("reaction_latency_ms") or {}
    if util is not None and util >= 0.9:
        return f"SPM workers ({util:.0%} busy)"
    p50 = reaction.get("p50")
    adm = report.get("admission") or {}
    if (adm.get("waiting_share") or 0.0) >= 0.5 and adm.get("running_mean") is not None:
        why = (f"keeping the runtime's own reaction delay under {adm['target_ms']:g} ms"
               if adm.get("target_ms") else f"--max-running {adm.get('max_running')}")
        polled = (f"; each step waits for a poll: reaction p50 {p50:.1f} ms against a "
                  f"{cfg.poll_min_ms:g} ms minimum poll interval" if p50 is not None else "")
        return (f"admission (about {adm['running_mean']:.0f} chains running at once while "
                f"others waited, {why}; CPU {cpu:.2f} cores{polled})")
    if cpu >= 0.85:
        extra = f"; the store's commits took {store:.0%} of the wall time" if store else ""
        return f"CPU (the process used {cpu:.2f} cores of {os.cpu_count()}{extra})"
    if store >= 0.5:
        return f"snapshot store (committing {store:.0%} of the wall time)"
    if p50 is not None and p50 >= 0.5 * cfg.poll_min_ms:
        return (f"polling (reaction p50 {p50:.1f} ms against a {cfg.poll_min_ms:g} ms "
                "minimum poll interval)")
    return f"outstanding limit or latency (CPU {cpu:.2f} cores, SPM {util or 0:.0%} busy)"


def _counter_total(rt: Runtime, name: str) -> int:
    """The sum over labels of counter ``name`` (without ``_total``) in the runtime's registry."""
    total = 0.0
    for family in rt.metrics.registry.collect():
        if family.name == name:
            total += sum(s.value for s in family.samples if s.name == f"{name}_total")
    return int(total)


def _steps_fired(rt: Runtime) -> int:
    return _counter_total(rt, "spmchain_steps_fired")


def _reverts_fired(rt: Runtime) -> int:
    return _counter_total(rt, "spmchain_reverts_fired")


def check_ledgers(spms: Mapping[str, SpmClient], failed: Sequence[ChainSpec]) -> dict[str, Any]:
    """Effects applied twice, and objects left by chains that ended with failure."""
    duplicated = 0
    objects: list[Any] = []
    for client in spms.values():
        ledger = _ledger_view(client)
        if ledger is None:
            return {"duplicated_effects": None, "leftover_effects": None}
        dup, objs = ledger
        duplicated += dup
        objects.extend(objs)
    failed_images = {(s.params["sdUUID"], s.params["imgUUID"]) for s in failed}
    leftover = sum(1 for o in objects if (o[0], o[1]) in failed_images)
    return {"duplicated_effects": duplicated, "leftover_effects": leftover}


def _ledger_view(client: SpmClient) -> tuple[int, list[tuple[str, str]]] | None:
    """(duplicated effects, [(sd, img) of each object]) from a simulator, local or served."""
    ledger_of = getattr(client, "ledger_summary", None)
    if callable(ledger_of):
        summary = ledger_of()
        return int(summary["duplicated_effects"]), [
            (o["sd_uuid"], o["img_uuid"]) for o in summary["objects"]
        ]
    objects = getattr(client, "objects", None)
    duplicated = getattr(client, "duplicated_effects", None)
    if not (callable(objects) and callable(duplicated)):
        return None
    return int(duplicated()), [(o.sd_uuid, o.img_uuid) for o in objects()]


def _fmt_reaction(r: Mapping[str, Any] | None) -> str:
    if not r:
        return "n/a"
    return f"{r['p50']:.1f} / {r['p99']:.1f} / {r['max']:.1f} ms"


def _fmt_running(adm: Mapping[str, Any] | None) -> str:
    if not adm or adm.get("running_mean") is None:
        return "n/a"
    return (f"{adm['running_mean']:.0f} on average, {adm['running_max']} at most; chains waited "
            f"{adm['waiting_share']:.0%} of the time")


def _fmt_share(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1%}"


def summary_table(report: dict[str, Any]) -> str:
    rows = [
        ("chains", report["chains"]),
        ("ended_successfully", report["ended_successfully"]),
        ("ended_with_failure", report["ended_with_failure"]),
        ("not ended", report["not_ended"]),
        *([("runtime stopped", report["stopped_reason"])]
          if report.get("stopped_reason") else []),
        ("steps fired", report["steps_fired"]),
        ("reverts fired", report["reverts_fired"]),
        ("wall", f"{report['wall_s']:.2f} s"),
        ("steps/s", f"{report['steps_per_s']:,.0f}"),
        ("peak RSS", f"{report['peak_rss_mib']:.0f} MiB"),
        ("duplicated effects", report["duplicated_effects"]),
        ("leftover effects", report["leftover_effects"]),
        ("reaction p50/p99/max", _fmt_reaction(report.get("reaction_latency_ms"))),
        ("SPM utilization", _fmt_share(report.get("spm_utilization"))),
        ("running at once", _fmt_running(report.get("admission"))),
        ("CPU", f"{report.get('cpu_utilization') or 0:.2f} cores"),
        ("store commits", report.get("store_commits", 0)),
        ("bounded by", report.get("bounded_by", "")),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)
