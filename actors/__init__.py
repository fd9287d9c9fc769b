"""spmchain's runtime: chains of SPM tasks run one after another on each pool's SPM.

Embed it::

    from actors import Runtime, ChainSpec, StepSpec
    from spm import SimulatedSpm

    with Runtime({"pool-1": SimulatedSpm("pool-1")}) as rt:
        handle = rt.submit(ChainSpec(pool="pool-1", command_type="createDisk", steps=[...]))
        result = handle.result(timeout=60)

Everything a user may import is listed here; modules starting with ``_`` are private.
"""

from actors._chain import (
    ENDED_SUCCESSFULLY,
    ENDED_WITH_FAILURE,
    ChainState,
    StepRecord,
)
from actors._faults import FaultInjector, InjectedFault
from actors._pool import PooledActor, WorkerPool
from actors._runtime import (
    ChainHandle,
    ChainResult,
    PoolAdmissionState,
    Runtime,
    RuntimeOptions,
    RuntimeStoppedError,
)
from actors._snapshot import (
    SCHEMA_VERSION,
    SnapshotError,
    SnapshotErrorReason,
    decode_snapshot,
    encode_snapshot,
)
from actors._spec import (
    ChainSpec,
    ChainSpecError,
    Command,
    StepResult,
    StepSpec,
    register_command,
)
from actors._store import (
    QuarantinedSnapshot,
    SnapshotCounts,
    SnapshotReader,
    SnapshotStore,
    StoredSnapshot,
    StoreError,
    StoreStats,
    StoreTimeoutError,
)
from actors._store_memory import MemoryStore
from actors._store_sqlite import SqliteStore, open_readonly
from actors._supervisor import DEFAULT_SUPERVISION, ChildSpec

__all__ = [
    "DEFAULT_SUPERVISION",
    "ENDED_SUCCESSFULLY",
    "ENDED_WITH_FAILURE",
    "SCHEMA_VERSION",
    "ChainHandle",
    "ChainResult",
    "ChainSpec",
    "ChainSpecError",
    "ChainState",
    "ChildSpec",
    "Command",
    "FaultInjector",
    "InjectedFault",
    "MemoryStore",
    "PoolAdmissionState",
    "PooledActor",
    "QuarantinedSnapshot",
    "Runtime",
    "RuntimeOptions",
    "RuntimeStoppedError",
    "SnapshotCounts",
    "SnapshotError",
    "SnapshotErrorReason",
    "SnapshotReader",
    "SnapshotStore",
    "SqliteStore",
    "StepRecord",
    "StepResult",
    "StepSpec",
    "StoreError",
    "StoreStats",
    "StoreTimeoutError",
    "StoredSnapshot",
    "WorkerPool",
    "decode_snapshot",
    "encode_snapshot",
    "open_readonly",
    "register_command",
]
