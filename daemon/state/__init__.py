"""The job state: the only SQL in the daemon. Imports no other stage.

* ``queue``: the Queue (enqueue, atomic claim with a lease, transitions, journal, ledger);
* ``schema``: the schema and its migrations;
* ``models``: files, jobs, states, stages, deliveries, imports (plain data);
* ``failures``: QueueError and the mapping of OS/SQLite errors to it.

Other stages import these names from ``daemon.state``.
"""

from __future__ import annotations

from daemon.state.failures import QueueError, QueueErrorReason, make_private_dirs, state_os_error
from daemon.state.models import (
    HEARTBEAT_SECONDS,
    DaemonInfo,
    Delivered,
    FileIdentity,
    ImportRecord,
    InboxTrouble,
    Job,
    JobState,
    NewJob,
    PriorDelivery,
    SettlingFile,
    Stage,
)
from daemon.state.queue import Queue
from daemon.state.schema import MIGRATIONS

__all__ = [
    "HEARTBEAT_SECONDS",
    "MIGRATIONS",
    "DaemonInfo",
    "Delivered",
    "FileIdentity",
    "ImportRecord",
    "InboxTrouble",
    "Job",
    "JobState",
    "NewJob",
    "PriorDelivery",
    "Queue",
    "QueueError",
    "QueueErrorReason",
    "SettlingFile",
    "Stage",
    "make_private_dirs",
    "state_os_error",
]
