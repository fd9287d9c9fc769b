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
    Runtime,
    RuntimeOptions,
    RuntimeStoppedError,
)
from actors._spec import (
    ChainSpec,
    ChainSpecError,
    Command,
    StepResult,
    StepSpec,
    register_command,
)
from actors._supervisor import DEFAULT_SUPERVISION, ChildSpec

__all__ = [
    "DEFAULT_SUPERVISION",
    "ENDED_SUCCESSFULLY",
    "ENDED_WITH_FAILURE",
    "ChainHandle",
    "ChainResult",
    "ChainSpec",
    "ChainSpecError",
    "ChainState",
    "ChildSpec",
    "Command",
    "FaultInjector",
    "InjectedFault",
    "PooledActor",
    "Runtime",
    "RuntimeOptions",
    "RuntimeStoppedError",
    "StepRecord",
    "StepResult",
    "StepSpec",
    "WorkerPool",
    "register_command",
]
