"""The SPM side: the client interface the runtime talks to, VDSM's task model as a simulator,
and VDSM's STOMP/JSON-RPC wire protocol (client and server).

Everything a user may import is listed here; modules starting with ``_`` are private.
"""

from spm._client import (
    SpmClient,
    TaskInfo,
    TaskResult,
    TaskState,
    TaskStatus,
    task_ended,
    task_succeeded,
)
from spm._errors import (
    BadAnswerError,
    GenericError,
    IllegalTransitionError,
    NotReadyError,
    NotSpmError,
    ResourceTimeoutError,
    SpmConnectionError,
    SpmError,
    SpmTimeoutError,
    TaskAbortedError,
    TaskNotFinishedError,
    TaskStateError,
    UnknownTaskError,
    error_for_code,
)
from spm._ledger import DuplicateEffect, LedgerEvent, LedgerObject
from spm._serve import serve_main
from spm._simulator import (
    DurationSpec,
    SimulatedSpm,
    SimulatorStats,
    TaskQueueFullError,
)
from spm._stomp_client import (
    NotConnectedError,
    RpcProtocolError,
    StompSpmClient,
    client_for_url,
    connected_pools,
)
from spm._stomp_server import SpmStompServer

__all__ = [
    "BadAnswerError",
    "DuplicateEffect",
    "DurationSpec",
    "GenericError",
    "IllegalTransitionError",
    "LedgerEvent",
    "LedgerObject",
    "NotConnectedError",
    "NotReadyError",
    "NotSpmError",
    "ResourceTimeoutError",
    "RpcProtocolError",
    "SimulatedSpm",
    "SimulatorStats",
    "SpmClient",
    "SpmConnectionError",
    "SpmError",
    "SpmStompServer",
    "SpmTimeoutError",
    "StompSpmClient",
    "TaskAbortedError",
    "TaskInfo",
    "TaskNotFinishedError",
    "TaskQueueFullError",
    "TaskResult",
    "TaskState",
    "TaskStateError",
    "TaskStatus",
    "UnknownTaskError",
    "client_for_url",
    "connected_pools",
    "error_for_code",
    "serve_main",
    "task_ended",
    "task_succeeded",
]
