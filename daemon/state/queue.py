"""The durable job queue: one SQLite file holds everything inboxd persists.

This is the only module that writes SQL. Every other part of the daemon talks to the state
database through :class:`Queue`.

Usage -- one idiom, an async context manager around the awaited constructor::

    async with await Queue.open(state_dir / "state.db") as q:
        await q.enqueue_many(items)
        job = await q.claim(owner, lease_seconds=60)

(``__aexit__`` calls :meth:`Queue.close`; a composition root that owns the queue for the
lifetime of a task group may call ``close()`` itself in its ``finally``.)

A job's life (method: transition)::

    enqueue_many      new file identity → QUEUED; older QUEUED job of the same rel still at
                      stage NEW → SUPERSEDED
    claim             QUEUED (due) → UPLOADING, with a lease
    retry_later       UPLOADING → QUEUED later, keeping stage, ingestion fields and parts
    recover           UPLOADING of a dead process → QUEUED now, keeping the same
    mark_uploaded     UPLOADING → IMPORTING, stage COMPLETED, with the content hash delivered
    mark_unchanged    UPLOADING → DONE without a request: the same bytes as the path's last
                      delivery, only its metadata changed (``change`` = "unchanged")
    record_import     IMPORTING → DONE, or FAILED, once the import status is terminal
    mark_failed       → FAILED;   mark_superseded → SUPERSEDED (the file changed or vanished)
    requeue           FAILED → QUEUED with a fresh ingestion (``inboxd retry``)
    set_after_upload  DONE: after_upload = "archived" | "deleted" | "kept"
    prune             old DONE / FAILED / SUPERSEDED rows deleted; DONE ones go to the ledger

``stage`` (NEW → CREATING → UPLOADING → COMPLETING → COMPLETED) records how far the ingestion
got. The worker persists it *before* each side effect, so after a crash ``recover`` hands the job
back with its stage, ingestion ids and finished parts and the worker resumes instead of
starting over.

Schema (``PRAGMA user_version`` = number of migrations applied, see ``MIGRATIONS``)::

    jobs(id INTEGER PRIMARY KEY AUTOINCREMENT, rel BLOB, size, mtime_ns, inode, ctime_ns,
         state, stage,
         stream_id, remote_name, metadata JSON, upload_key, ingestion_id, remote_id, mode,
         part_size, bytes_sent, attempts, next_attempt_at, last_error, error_kind,
         import_status, import_progress, import_message, fell_back, after_upload,
         created_at, updated_at, started_at, uploaded_at, finished_at,
         lease_owner, lease_expires_at, target, target_refs, content_hash, change)
                                              UNIQUE(rel, size, mtime_ns, inode, ctime_ns)
                                              INDEX(inode, size, mtime_ns): renames
    parts(job_id → jobs ON DELETE CASCADE, part_number, digest)  PK(job_id, part_number);
                                              digest: the part's xxh3_128 (daemon.delivery.content)
    ledger(rel, size, mtime_ns, inode, ctime_ns, remote_id, finished_at, content_hash)
                                              files done, jobs pruned; INDEX(inode, size,
                                              mtime_ns): renames
    daemon(id = 1, pid, started_at, heartbeat_at, info JSON)     liveness for ``status``
    settling(rel BLOB PRIMARY KEY, size, since)                  files the watcher waits on

Conventions: times are ``time.time()`` floats; ``rel`` is stored as ``os.fsencode(rel)`` so
names that are not UTF-8 round-trip byte for byte; inodes at or above 2**63 are stored as
their two's-complement negative (SQLite integers are signed 64-bit) and converted back on read.

Why one module: the Queue is one class over one connection. Every method shares its write
lock, its transaction helpers and its error mapping, and the claim and transition methods are
read side by side to see that a job only moves forward. The schema, the models and the
failures live apart (schema.py, models.py, failures.py).
"""

# Every f-string SQL in this module interpolates module constants or fixed column names, never
# caller data; values always travel as bound parameters.
# ruff: noqa: S608

from __future__ import annotations

import heapq
import json
import os
import sqlite3
import time
from collections.abc import (
    AsyncIterator,
    Collection,
    Iterable,
    Mapping,
    Sequence,
)
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal

import aiosqlite
import anyio

from daemon.state.failures import (
    UNUSABLE_ADVICE,
    QueueError,
    create_private_file,
    make_private_dirs,
    open_error,
    sqlite_error,
    state_os_error,
    wal_has_frames,
)
from daemon.state.models import (
    DaemonInfo,
    Delivered,
    FileIdentity,
    ImportRecord,
    Job,
    JobState,
    NewJob,
    PriorDelivery,
    SettlingFile,
    Stage,
)
from daemon.state.schema import MIGRATIONS

# ---------------------------------------------------------------------------------------------
# Data model


_IMPORT_SET = (
    "UPDATE jobs SET import_status = :status, import_progress = :progress,"
    " import_message = :message, updated_at = :now"
)
_IMPORT_WHERE = " WHERE id = :job_id AND state = 'importing'"
#: ``record_import``'s statement per transition: still importing, done, failed
_IMPORT_SQL: Final[dict[str, str]] = {
    "progress": _IMPORT_SET + _IMPORT_WHERE,
    "done": _IMPORT_SET + ", state = 'done', finished_at = :now" + _IMPORT_WHERE,
    "failed": _IMPORT_SET
    + ", state = 'failed', finished_at = :now, error_kind = 'import', last_error = :error"
    + _IMPORT_WHERE,
}


def _import_params(update: ImportRecord, now: float) -> tuple[str, dict[str, Any]]:
    kind = "progress" if not update.terminal else "failed" if update.failed else "done"
    return kind, {
        "status": update.status,
        "progress": update.progress,
        "message": update.message,
        "now": now,
        "error": f"import failed: {update.message}",
        "job_id": update.job_id,
    }


# ---------------------------------------------------------------------------------------------
# Schema and migrations


_Params = Sequence[Any] | Mapping[str, Any]


# ---------------------------------------------------------------------------------------------
# Row mapping

_JOB_COLUMNS: Final = (
    "id, rel, size, mtime_ns, inode, state, stage, stream_id, remote_name, metadata, upload_key,"
    " ingestion_id, remote_id, mode, part_size, bytes_sent, attempts, next_attempt_at,"
    " last_error, error_kind, import_status, import_progress, import_message, fell_back,"
    " after_upload, created_at, updated_at, started_at, uploaded_at, finished_at,"
    " lease_owner, lease_expires_at, target, target_refs, ctime_ns, content_hash, change"
)

_INODE_WRAP: Final = 1 << 64
_INODE_MAX_SIGNED: Final = (1 << 63) - 1


def _inode_to_db(inode: int) -> int:
    # st_ino is unsigned 64-bit; some filesystems use the top bit and SQLite would overflow.
    return inode - _INODE_WRAP if inode > _INODE_MAX_SIGNED else inode


def _inode_from_db(inode: int) -> int:
    return inode + _INODE_WRAP if inode < 0 else inode


def _job_from_row(row: sqlite3.Row) -> Job:
    return Job(
        id=row["id"],
        identity=FileIdentity(
            rel=os.fsdecode(row["rel"]),
            size=row["size"],
            mtime_ns=row["mtime_ns"],
            inode=_inode_from_db(row["inode"]),
            ctime_ns=row["ctime_ns"],
        ),
        state=JobState(row["state"]),
        stage=Stage(row["stage"]),
        stream_id=row["stream_id"],
        remote_name=row["remote_name"],
        metadata=json.loads(row["metadata"]),
        upload_key=row["upload_key"],
        ingestion_id=row["ingestion_id"],
        remote_id=row["remote_id"],
        mode=row["mode"],
        part_size=row["part_size"],
        bytes_sent=row["bytes_sent"],
        attempts=row["attempts"],
        next_attempt_at=row["next_attempt_at"],
        last_error=row["last_error"],
        error_kind=row["error_kind"],
        import_status=row["import_status"],
        import_progress=row["import_progress"],
        import_message=row["import_message"],
        fell_back=bool(row["fell_back"]),
        after_upload=row["after_upload"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        started_at=row["started_at"],
        uploaded_at=row["uploaded_at"],
        finished_at=row["finished_at"],
        lease_owner=row["lease_owner"],
        lease_expires_at=row["lease_expires_at"],
        target=row["target"],
        target_refs=json.loads(row["target_refs"]),
        content_hash=row["content_hash"],
        change=row["change"],
        # sqlite3.Row: `in row` would search the values, not the column names
        same_path_jobs=row["same_path_jobs"] if "same_path_jobs" in row.keys() else None,  # noqa: SIM118
    )


class _Unset(Enum):
    """Marks a keyword argument that was not given, so that None can be stored."""

    TOKEN = 0


_UNSET: Final = _Unset.TOKEN

# What "start this file fresh" forgets (reset_ingestion and requeue share it). The upload key
# is kept on purpose: it tags the dataset this job made, and the upload flow re-opens that
# dataset (overwrite, same id) when it finds it aborted or failed, instead of renaming around
# its own earlier attempt. fell_back is kept: it is history, not ingestion state.
_RESET_INGESTION_SQL: Final = (
    "stage = 'new', ingestion_id = NULL, remote_id = NULL, mode = NULL, part_size = NULL,"
    " bytes_sent = 0"
)

_BUSY_TIMEOUT_MS: Final = 10_000

#: True for a row of ``jobs`` when a later job exists for the same file (path): the row is
#: then history, not the file's current outcome. Uses the jobs_identity index (rel prefix).
_HAS_NEWER: Final = (
    "EXISTS (SELECT 1 FROM jobs AS newer WHERE newer.rel = jobs.rel AND newer.id > jobs.id)"
)


#: After new jobs were added (ids above ``:max_before``): older jobs of the same path that are
#: QUEUED at stage NEW (nothing happened yet, nothing to abort) are superseded by the newest.
_SUPERSEDE_OLDER: Final = (
    "UPDATE jobs SET state = 'superseded', finished_at = :now,"
    " updated_at = :now, error_kind = 'superseded',"
    " last_error = 'file changed before its upload started; now job '"
    "   || newer.id"
    " FROM (SELECT rel, max(id) AS id FROM jobs WHERE id > :max_before"
    "       GROUP BY rel) AS newer"
    " WHERE jobs.rel = newer.rel AND jobs.id < newer.id"
    " AND jobs.state = 'queued' AND jobs.stage = 'new'"
)


# ---------------------------------------------------------------------------------------------
# The queue


@dataclass(eq=False)
class _Pending:
    """One write waiting for its group commit (see ``Queue._batched``)."""

    sql: str
    params: _Params
    returning: bool
    done: anyio.Event = field(default_factory=anyio.Event)
    result: Any = None
    error: QueueError | None = None


def _run_batch(conn: sqlite3.Connection, work: list[tuple[str, _Params, bool]]) -> list[Any]:
    """In the connection's thread: run ``work`` as one transaction; per statement its row
    count, its rows (``returning``) or its own ``sqlite3.Error``."""
    if len(work) == 1:
        sql, params, returning = work[0]
        try:
            cursor = conn.execute(sql, params)
            return [cursor.fetchall() if returning else cursor.rowcount]
        except sqlite3.Error as exc:
            return [exc]
    conn.execute("BEGIN IMMEDIATE")
    out: list[Any] = []
    try:
        for sql, params, returning in work:
            try:
                cursor = conn.execute(sql, params)
                out.append(cursor.fetchall() if returning else cursor.rowcount)
            except sqlite3.Error as exc:
                if not conn.in_transaction:
                    raise  # the error ended the transaction: nothing of the batch is kept
                out.append(exc)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            with suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        raise
    return out


class Queue:
    """The durable job queue over one aiosqlite connection.

    Operations on one instance are serialised by a lock and every write is one short
    transaction that is shielded from cancellation: a write either happens completely or not
    at all, and the connection is never left inside a transaction. Several instances (even in
    several processes) may share the file; claims stay atomic through ``BEGIN IMMEDIATE``.
    """

    def __init__(self, db: aiosqlite.Connection, path: Path, *, readonly: bool) -> None:
        """Wrap an open connection; use :meth:`open` instead."""
        self._db: aiosqlite.Connection | None = db
        self._path = path
        self._readonly = readonly
        # fast_acquire: an uncontended acquire does not yield to the event loop first (one
        # loop turn per statement saved); the statements themselves run in another thread.
        self._lock = anyio.Lock(fast_acquire=True)
        #: writes waiting for the next group commit, and whether a task is sending one
        self._pending: list[_Pending] = []
        self._sending = False
        self._delivered_any = False  # see delivered_elsewhere
        #: True when this open created the schema (a new, empty state database)
        self.created = False

    # -- lifecycle ------------------------------------------------------------------------------

    @classmethod
    async def open(cls, path: Path, *, readonly: bool = False) -> Queue:
        """Open (creating and migrating when writable) the state database at ``path``.

        ``readonly=True`` opens it with ``mode=ro`` for ``inboxd status`` and never writes; it
        works while the daemon writes (WAL lets readers and one writer run concurrently).
        Raises :class:`QueueError` for a missing (read-only), corrupt, or too-new database, or
        a full filesystem (its ``reason`` says which).
        """
        path = Path(path)
        if path.exists() and not path.is_file():
            # SQLite would only say "unable to open database file" or "disk I/O error".
            what = "a directory" if path.is_dir() else "not a regular file"
            raise QueueError(
                f"state database {path} is {what}, not a database file; move it away, or point"
                " [state] path at a file",
                reason="data",
            )
        if not readonly:
            try:
                make_private_dirs(path.parent)
                create_private_file(path)
            except OSError as exc:
                raise state_os_error(path, exc, "create state database") from exc
            return await cls._connect(path, str(path), readonly=False)
        if not path.exists():
            raise QueueError(
                f"no state database at {path}; start the daemon once, or check the state"
                " directory setting"
            )
        uri = path.resolve().as_uri()
        try:
            return await cls._connect(path, uri + "?mode=ro", readonly=True)
        except QueueError as exc:
            # A reader that may not create -shm (a group member, the folder is 0750) while no
            # daemon has the database open (no -shm to share) is the same case as below.
            cannot_make_shm = not os.access(path.parent, os.W_OK)
            if (exc.reason != "full" and not cannot_make_shm) or wal_has_frames(path):
                raise
        # A reader of a WAL database must create -shm, which a full filesystem refuses, and
        # `status` is most needed exactly then. With no WAL frames the file alone is the whole
        # database, and nothing is writing it (a writer would have made -shm already), so
        # reading it without locks or -shm (immutable) shows the same data.
        return await cls._connect(path, uri + "?mode=ro&immutable=1", readonly=True)

    @classmethod
    async def _connect(cls, path: Path, target: str, *, readonly: bool) -> Queue:
        try:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves, the sqlite3 module never
            # opens a transaction behind our back.
            db = await aiosqlite.connect(target, uri=readonly, isolation_level=None)
        except sqlite3.Error as exc:
            raise open_error(path, exc) from exc
        queue = cls(db, path, readonly=readonly)
        try:
            await queue._configure()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await db.close()
            raise
        return queue

    async def _configure(self) -> None:
        db = self._conn()
        db.row_factory = sqlite3.Row
        try:
            # The daemon's transactions are short; 10 s only matters if another process holds
            # the write lock (a migration, a `retry` from the CLI).
            await db.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
            if self._readonly:
                await db.execute("PRAGMA query_only = ON")
                # Any read fails here on a file that is not a database.
                version = await self._user_version()
            else:
                # Before anything writes: the journal mode switch and a migration would write
                # into a damaged file.
                await self._check_integrity(db)
                await self._configure_writer(db)
                version = await self._user_version()
        except sqlite3.Error as exc:
            raise open_error(self._path, exc) from exc

        known = len(MIGRATIONS)
        if version > known:
            raise QueueError(
                f"state database {self._path} was written by a newer inboxd (schema v{version},"
                f" this inboxd knows up to v{known}); upgrade inboxd or move the file away",
                reason="data",
            )
        if version < known:
            if self._readonly:
                raise QueueError(
                    f"state database {self._path} has schema v{version}, this inboxd needs"
                    f" v{known}; start the daemon once to upgrade it"
                )
            await self._migrate(known)

    async def _check_integrity(self, db: aiosqlite.Connection) -> None:
        """Refuse a database with damaged pages now, with what to do, rather than at the first
        query that meets them, hours later, mid-upload.

        quick_check reads every page (O(database size)): 0.05-0.08 s warm, 0.5-0.55 s from a
        cold cache for the 35 MiB of 100,000 jobs (bench/daemon_bench.py's database), once per
        writer open. Readers (``status``) skip it: they run often, and a damaged page they meet
        raises the same "corrupt" QueueError. quick_check(N) would not be cheaper: N caps
        the problems reported, not the pages read.
        """
        rows = await db.execute_fetchall("PRAGMA quick_check")
        problems = [str(row[0]) for row in rows]
        if problems == ["ok"]:
            return
        # Its report spans lines ("*** in database main ***\nPage 137: …"): one line here.
        said = " ".join(" ".join(problems).removeprefix("*** in database main ***").split())
        if len(said) > 160:
            said = said[:157] + "..."
        raise QueueError(
            f"state database {self._path} is corrupt (database disk image is malformed;"
            f" PRAGMA quick_check: {said}); {UNUSABLE_ADVICE}",
            reason="data",
        )

    async def _configure_writer(self, db: aiosqlite.Connection) -> None:
        rows = await db.execute_fetchall("PRAGMA journal_mode = WAL")
        mode = next(iter(rows))[0]
        if str(mode).lower() != "wal":
            # Without WAL the status reader would block the writer, and a network filesystem
            # (where WAL is refused) is not safe for SQLite at all.
            raise QueueError(
                f"state database {self._path} cannot use WAL journaling (got {mode!r}); put"
                " the state directory on a local filesystem"
            )
        # NORMAL is safe in WAL mode: a power cut may lose the last few commits but never
        # corrupts the database, and every ingestion step is safe to replay (the stage is
        # written before the side effect). It saves an fsync per commit.
        await db.execute("PRAGMA synchronous = NORMAL")
        await db.execute("PRAGMA foreign_keys = ON")
        # The enqueue batch table lives in memory: a hardened service may have no writable
        # temp directory, and the batch is bounded by what the watcher hands over.
        await db.execute("PRAGMA temp_store = MEMORY")
        await db.execute(
            "CREATE TEMP TABLE IF NOT EXISTS enqueue_batch ("
            " seq INTEGER PRIMARY KEY, rel BLOB, size INTEGER, mtime_ns INTEGER,"
            " inode INTEGER, stream_id INTEGER, remote_name TEXT, metadata TEXT,"
            " upload_key TEXT, target TEXT, ctime_ns INTEGER)"
        )

    async def _user_version(self) -> int:
        rows = await self._conn().execute_fetchall("PRAGMA user_version")
        return int(next(iter(rows))[0])

    async def _migrate(self, target: int) -> None:
        async with self._write() as db:
            # Re-read under the write lock: another process may have migrated meanwhile.
            version = await self._user_version()
            if version > target:
                raise QueueError(
                    f"state database {self._path} was written by a newer inboxd (schema"
                    f" v{version}); upgrade inboxd or move the file away",
                    reason="data",
                )
            self.created = version == 0
            try:
                for step in MIGRATIONS[version:target]:
                    await step(db)
            except sqlite3.Error as exc:
                full = sqlite_error(self._path, exc)
                if full is not None and full.reason == "full":
                    raise full from exc  # the upgrade itself is fine: it needs room
                raise QueueError(
                    f"cannot upgrade state database {self._path} from schema v{version} to"
                    f" v{target}: {exc}; the file was left unchanged, keep it and report this",
                    reason="data",
                ) from exc
            # PRAGMA cannot take a bound parameter; target is an int we computed.
            await db.execute(f"PRAGMA user_version = {int(target)}")

    async def close(self) -> None:
        """Close the connection (idempotent); the last connection checkpoints the WAL."""
        db, self._db = self._db, None
        if db is not None:
            with anyio.CancelScope(shield=True):
                await db.close()

    async def __aenter__(self) -> Queue:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def path(self) -> Path:
        """The database file."""
        return self._path

    @property
    def readonly(self) -> bool:
        """Whether this instance was opened read-only."""
        return self._readonly

    # -- plumbing -------------------------------------------------------------------------------

    def _conn(self) -> aiosqlite.Connection:
        if self._db is None:
            raise QueueError(f"state database {self._path} is closed")
        return self._db

    def _error(self, exc: sqlite3.Error) -> QueueError:
        return sqlite_error(self._path, exc) or QueueError(f"state database {self._path}: {exc}")

    def _check_writable(self) -> None:
        if self._readonly:
            raise QueueError(
                f"state database {self._path} was opened read-only; this operation writes"
            )

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[aiosqlite.Connection]:
        """One write transaction (BEGIN IMMEDIATE … COMMIT), serialised and shielded."""
        self._check_writable()
        db = self._conn()
        async with self._lock:
            # Shielded: a cancelled caller must not leave the shared connection mid-transaction
            # (the next BEGIN would fail) nor leave it unknown whether the write happened.
            with anyio.CancelScope(shield=True):
                try:
                    # IMMEDIATE takes the write lock up front, so the read-then-write inside
                    # cannot fail with SQLITE_BUSY_SNAPSHOT halfway through.
                    await db.execute("BEGIN IMMEDIATE")
                    try:
                        yield db
                        await db.execute("COMMIT")
                    except BaseException:
                        # Also after a failed COMMIT, which can leave the transaction open.
                        await self._rollback(db)
                        raise
                except sqlite3.Error as exc:
                    raise self._error(exc) from exc

    @staticmethod
    async def _rollback(db: aiosqlite.Connection) -> None:
        # ROLLBACK fails when SQLite already ended the transaction itself (it does on I/O
        # errors, a full disk, ...); the original error is the one worth raising.
        with suppress(sqlite3.Error):
            await db.execute("ROLLBACK")

    # Group commit: the one-statement writes (claims, journal entries, progress, leases) of
    # every task are queued, and one task at a time sends everything queued so far to the
    # connection's thread as ONE transaction in ONE trip (``_run_batch``). A trip costs far
    # more CPU than a statement (two thread hand-overs and a loop wake-up); with dozens of
    # files in flight, their journal entries share trips. Each caller still returns only once
    # its statement is committed, so the journal's guarantee (written before the side effect
    # it describes) is unchanged; a statement that fails fails alone (SQLite rolls back that
    # statement only), unless the transaction itself fails (a full disk), which fails all.
    # Everything happens within one trip: the write lock is never held across event-loop
    # turns, so another connection cannot starve (seen with BEGIN/UPDATE/COMMIT as three
    # awaits in the concurrent-claim test).

    async def _execute(self, sql: str, params: _Params = ()) -> int:
        """One write statement, committed on return; returns the number of rows changed."""
        changed: int = await self._batched(sql, params, returning=False)
        return changed

    async def _write_returning(self, sql: str, params: _Params = ()) -> list[sqlite3.Row]:
        """One ``UPDATE … RETURNING`` statement, committed on return; returns its rows."""
        rows: list[sqlite3.Row] = await self._batched(sql, params, returning=True)
        return rows

    async def _batched(self, sql: str, params: _Params, *, returning: bool) -> Any:
        self._check_writable()
        db = self._conn()
        item = _Pending(sql, params, returning)
        self._pending.append(item)
        # Shielded: a cancelled caller must not leave it unknown whether its write happened,
        # and the task sending a batch sends it for the others too.
        with anyio.CancelScope(shield=True):
            if not self._sending:
                self._sending = True
                try:
                    while self._pending:
                        batch, self._pending = self._pending, []
                        await self._send_batch(db, batch)
                finally:
                    self._sending = False
            await item.done.wait()
        if item.error is not None:
            raise item.error
        return item.result

    async def _send_batch(self, db: aiosqlite.Connection, batch: list[_Pending]) -> None:
        work = [(item.sql, item.params, item.returning) for item in batch]
        try:
            async with self._lock:
                # aiosqlite runs a function in its thread only through this (private) method;
                # its public calls are one statement per trip.
                results = await db._execute(_run_batch, db._conn, work)  # type: ignore[no-untyped-call]
        except sqlite3.Error as exc:
            results = [exc] * len(batch)
        except Exception as exc:  # the connection is closed: every caller hears why
            results = [exc] * len(batch)
        for item, result in zip(batch, results, strict=True):
            if isinstance(result, sqlite3.Error):
                item.error = self._error(result)
                item.error.__cause__ = result
            elif isinstance(result, Exception):
                item.error = QueueError(f"state database {self._path}: {result}")
            else:
                item.result = result
            item.done.set()

    async def _execute_alone(self, sql: str) -> None:
        """A statement that must run outside any transaction (``VACUUM``)."""
        self._check_writable()
        db = self._conn()
        async with self._lock:
            with anyio.CancelScope(shield=True):
                try:
                    await db.execute(sql)
                except sqlite3.Error as exc:
                    raise self._error(exc) from exc

    async def _fetch(self, sql: str, params: _Params = ()) -> list[sqlite3.Row]:
        db = self._conn()
        async with self._lock:
            try:
                return list(await db.execute_fetchall(sql, params))
            except sqlite3.Error as exc:
                raise self._error(exc) from exc

    async def _fetch_jobs(self, where: str, params: _Params = ()) -> list[Job]:
        rows = await self._fetch(f"SELECT {_JOB_COLUMNS} FROM jobs {where}", params)
        return [_job_from_row(row) for row in rows]

    def _expect_job(self, changed: int, job_id: int) -> None:
        if changed == 0:
            raise QueueError(f"no job {job_id} in state database {self._path}")

    # -- enqueue and claim ----------------------------------------------------------------------

    async def enqueue_many(self, items: Sequence[NewJob]) -> list[int]:
        """Create a job for each file identity not seen before; return the new ids in order.

        One transaction for the whole batch. An identity that already has a job (in any state)
        or is in the ledger is skipped. A new identity for a ``rel`` supersedes the older jobs
        of that ``rel`` that are QUEUED at stage NEW (nothing happened yet, nothing to abort);
        jobs that got further are left for the worker, which notices the change and aborts.
        """
        if not items:
            return []
        now = time.time()
        rows = [
            (
                seq,
                os.fsencode(item.identity.rel),
                item.identity.size,
                item.identity.mtime_ns,
                _inode_to_db(item.identity.inode),
                item.stream_id,
                item.remote_name,
                json.dumps(item.metadata, separators=(",", ":")),
                item.identity.upload_key(),
                item.target,
                item.identity.ctime_ns,
            )
            for seq, item in enumerate(items)
        ]
        async with self._write() as db:
            await db.execute("DELETE FROM temp.enqueue_batch")
            await db.executemany(
                "INSERT INTO temp.enqueue_batch VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows
            )
            max_before = next(iter(await db.execute_fetchall("SELECT max(id) FROM jobs")))[0]
            # ORDER BY seq: ids follow the batch order, so "newer" below means "later".
            inserted = await db.execute_fetchall(
                "INSERT INTO jobs (rel, size, mtime_ns, inode, ctime_ns, state, stage,"
                " stream_id, remote_name, metadata, upload_key, target, next_attempt_at,"
                " created_at, updated_at)"
                " SELECT b.rel, b.size, b.mtime_ns, b.inode, b.ctime_ns, 'queued', 'new',"
                " b.stream_id, b.remote_name, b.metadata, b.upload_key, b.target, :now, :now,"
                " :now FROM temp.enqueue_batch AS b"
                # A stored ctime of 0 (from before schema v3) matches any ctime.
                " WHERE NOT EXISTS (SELECT 1 FROM ledger AS l WHERE l.rel = b.rel"
                "   AND l.size = b.size AND l.mtime_ns = b.mtime_ns AND l.inode = b.inode"
                "   AND l.ctime_ns IN (b.ctime_ns, 0))"
                " AND NOT EXISTS (SELECT 1 FROM jobs AS j WHERE j.rel = b.rel"
                "   AND j.size = b.size AND j.mtime_ns = b.mtime_ns AND j.inode = b.inode"
                "   AND j.ctime_ns = 0)"
                " ORDER BY b.seq"
                " ON CONFLICT (rel, size, mtime_ns, inode, ctime_ns) DO NOTHING"
                " RETURNING id",
                {"now": now},
            )
            new_ids = sorted(row[0] for row in inserted)
            if new_ids:
                await db.execute(_SUPERSEDE_OLDER, {"now": now, "max_before": max_before or 0})
            await db.execute("DELETE FROM temp.enqueue_batch")
        return new_ids

    async def delivered_elsewhere(
        self, identities: Sequence[FileIdentity]
    ) -> dict[int, list[Delivered]]:
        """Delivered versions with the same inode, size and mtime under another path.

        For each index of ``identities`` that has no job or ledger row of its own (a file
        not seen before under this path), the DONE or IMPORTING jobs and ledger rows of other
        paths with the same ``(size, mtime_ns, inode)``, newest first. That is how a file
        renamed or moved within the inbox after its delivery is recognised. Whether its old
        path still holds it (a hard link) is for the caller to check.

        There is no index on the inode: a batch with unknown files costs one pass over the
        ``jobs_identity`` index and the ledger (~30 ms for 100,000 jobs); a batch of known
        files, or a database where nothing was delivered yet, costs index lookups only.
        """
        if not identities:
            return {}
        if not self._delivered_any:
            # Until the first delivery there is nothing to find (a first start over a full
            # inbox: 50,000 files). Once true it stays true: DONE jobs go to the ledger.
            anything = await self._fetch(
                "SELECT EXISTS (SELECT 1 FROM jobs INDEXED BY jobs_state_updated"
                "   WHERE state IN ('done', 'importing'))"
                " OR EXISTS (SELECT 1 FROM ledger)"
            )
            if not anything[0][0]:
                return {}
            self._delivered_any = True
        rows = [
            (seq, os.fsencode(i.rel), i.size, i.mtime_ns, _inode_to_db(i.inode))
            for seq, i in enumerate(identities)
        ]
        pairs: list[sqlite3.Row] = []
        ledger: list[sqlite3.Row] = []
        async with self._write() as db:  # the batch table lives on the writer's connection
            await db.execute("DELETE FROM temp.enqueue_batch")
            await db.executemany(
                "INSERT INTO temp.enqueue_batch (seq, rel, size, mtime_ns, inode)"
                " VALUES (?, ?, ?, ?, ?)",
                rows,
            )
            # Files known under their own path are no renames: index lookups drop them.
            await db.execute(
                "DELETE FROM temp.enqueue_batch AS b WHERE EXISTS (SELECT 1 FROM jobs AS j"
                "   WHERE j.rel = b.rel AND j.size = b.size AND j.mtime_ns = b.mtime_ns"
                "   AND j.inode = b.inode)"
                " OR EXISTS (SELECT 1 FROM ledger AS l WHERE l.rel = b.rel AND l.size = b.size"
                "   AND l.mtime_ns = b.mtime_ns AND l.inode = b.inode)"
            )
            left = await db.execute_fetchall("SELECT count(*) FROM temp.enqueue_batch")
            if next(iter(left))[0]:
                # One pass over the covering index; SQLite indexes the small batch on the fly.
                pairs = list(
                    await db.execute_fetchall(
                        "SELECT b.seq, j.id FROM jobs AS j INDEXED BY jobs_identity"
                        " JOIN temp.enqueue_batch AS b ON j.inode = b.inode"
                        "   AND j.size = b.size AND j.mtime_ns = b.mtime_ns AND j.rel != b.rel"
                    )
                )
                ledger = list(
                    await db.execute_fetchall(
                        "SELECT b.seq, l.rel, l.remote_id FROM ledger AS l"
                        " JOIN temp.enqueue_batch AS b ON l.inode = b.inode"
                        "   AND l.size = b.size AND l.mtime_ns = b.mtime_ns AND l.rel != b.rel"
                    )
                )
            await db.execute("DELETE FROM temp.enqueue_batch")
        found: dict[int, list[Delivered]] = {}
        if pairs:
            ids = sorted({row[1] for row in pairs}, reverse=True)
            marks = ",".join("?" * len(ids))
            jobs = {
                j.id: j
                for j in await self._fetch_jobs(f"WHERE id IN ({marks})", ids)
                if j.state in (JobState.DONE, JobState.IMPORTING)
            }
            for seq, job_id in sorted(pairs, key=lambda r: -r[1]):
                job = jobs.get(job_id)
                if job is not None:
                    found.setdefault(seq, []).append(
                        Delivered(job.identity.rel, job.remote_id, job)
                    )
        for seq, rel, remote_id in ledger:
            found.setdefault(seq, []).append(Delivered(os.fsdecode(rel), remote_id))
        return found

    async def record_renamed(self, items: Sequence[tuple[NewJob, Delivered, str]]) -> list[int]:
        """Record files that are delivered versions under a new path: ``(item, delivered,
        note)`` gets a job in the state of the delivered one (DONE, or IMPORTING: the poller
        follows the same dataset) with ``error_kind`` "renamed" and ``note`` as its message.
        Nothing is uploaded for them. Returns the new job ids."""
        if not items:
            return []
        now = time.time()
        rows = []
        for item, found, note in items:
            job, ident = found.job, item.identity
            importing = job is not None and job.state == JobState.IMPORTING
            rows.append(
                {
                    "rel": os.fsencode(ident.rel),
                    "size": ident.size,
                    "mtime_ns": ident.mtime_ns,
                    "inode": _inode_to_db(ident.inode),
                    "ctime_ns": ident.ctime_ns,
                    "state": "importing" if importing else "done",
                    "stream_id": job.stream_id if job is not None else item.stream_id,
                    "remote_name": job.remote_name if job is not None else item.remote_name,
                    "remote_id": found.remote_id,
                    "mode": job.mode if job is not None else None,
                    "metadata": json.dumps(item.metadata, separators=(",", ":")),
                    "upload_key": ident.upload_key(),
                    "target": job.target if job is not None else item.target,
                    "target_refs": json.dumps(job.target_refs if job is not None else {}),
                    "import_status": job.import_status if job is not None else None,
                    "note": note,
                    "now": now,
                    "finished_at": None if importing else now,
                }
            )
        async with self._write() as db:
            max_before = next(iter(await db.execute_fetchall("SELECT max(id) FROM jobs")))[0]
            new_ids: list[int] = []
            for row in rows:
                inserted = await db.execute_fetchall(
                    "INSERT INTO jobs (rel, size, mtime_ns, inode, ctime_ns, state, stage,"
                    " stream_id, remote_name, remote_id, mode, metadata, upload_key, target,"
                    " target_refs, bytes_sent, import_status, last_error, error_kind,"
                    " next_attempt_at, created_at, updated_at, uploaded_at, finished_at)"
                    " VALUES (:rel, :size, :mtime_ns, :inode, :ctime_ns, :state, 'completed',"
                    " :stream_id, :remote_name, :remote_id, :mode, :metadata, :upload_key,"
                    " :target, :target_refs, :size, :import_status, :note, 'renamed', :now,"
                    " :now, :now, :now, :finished_at)"
                    " ON CONFLICT (rel, size, mtime_ns, inode, ctime_ns) DO NOTHING RETURNING id",
                    row,
                )
                new_ids += [r[0] for r in inserted]
            if new_ids:
                await db.execute(_SUPERSEDE_OLDER, {"now": now, "max_before": max_before or 0})
        return new_ids

    async def claim(
        self,
        owner: str,
        lease_seconds: float,
        now: float | None = None,
        *,
        max_size: int | None = None,
    ) -> Job | None:
        """Atomically take the next due QUEUED job for ``owner``; None when nothing is due.

        Order: ``next_attempt_at``, then id; with ``max_size``, only files of at most that many
        bytes (the workers' small-file lane). The job becomes UPLOADING with a lease until
        ``now + lease_seconds``; ``attempts`` is not changed (it counts tries that failed).
        One ``UPDATE … WHERE id = (SELECT … LIMIT 1) RETURNING`` statement: SQLite makes it
        atomic across connections and processes (see ``_execute`` for why no explicit BEGIN).
        """
        now = time.time() if now is None else now
        sized = "" if max_size is None else " AND size <= :max_size"
        rows = await self._write_returning(
            "UPDATE jobs SET state = 'uploading', lease_owner = :owner,"
            " lease_expires_at = :expires, started_at = coalesce(started_at, :now),"
            " updated_at = :now"
            " WHERE id = (SELECT id FROM jobs INDEXED BY jobs_due WHERE state = 'queued'"
            f"             AND next_attempt_at <= :now{sized}"
            "             ORDER BY next_attempt_at, id LIMIT 1)"
            f" RETURNING {_JOB_COLUMNS}, (SELECT count(*) FROM jobs AS other"
            "   WHERE other.rel = jobs.rel AND other.id != jobs.id)"
            " + (SELECT count(*) FROM ledger WHERE ledger.rel = jobs.rel) AS same_path_jobs",
            {"owner": owner, "expires": now + lease_seconds, "now": now, "max_size": max_size},
        )
        return _job_from_row(rows[0]) if rows else None

    async def renew_lease(self, job_id: int, owner: str, lease_seconds: float) -> bool:
        """Extend ``owner``'s lease; False if the job is no longer UPLOADING under it."""
        now = time.time()
        changed = await self._execute(
            "UPDATE jobs SET lease_expires_at = ?, updated_at = ?"
            " WHERE id = ? AND state = 'uploading' AND lease_owner = ?",
            (now + lease_seconds, now, job_id, owner),
        )
        return changed == 1

    async def next_due_at(self) -> float | None:
        """The earliest ``next_attempt_at`` among QUEUED jobs (workers sleep until then)."""
        rows = await self._fetch(
            "SELECT min(next_attempt_at) FROM jobs INDEXED BY jobs_due WHERE state = 'queued'"
        )
        value = rows[0][0]
        return None if value is None else float(value)

    # -- progress -------------------------------------------------------------------------------

    async def save_progress(
        self,
        job_id: int,
        *,
        stage: Stage | _Unset = _UNSET,
        ingestion_id: int | _Unset | None = _UNSET,
        remote_id: int | _Unset | None = _UNSET,
        mode: str | _Unset | None = _UNSET,
        part_size: int | _Unset | None = _UNSET,
        bytes_sent: int | _Unset = _UNSET,
        fell_back: bool | _Unset = _UNSET,
        remote_name: str | _Unset = _UNSET,
        upload_key: str | _Unset = _UNSET,
        target_refs: dict[str, Any] | _Unset = _UNSET,
    ) -> None:
        """Store the given fields (only those; None is stored as NULL), committed on return.

        Call it before the side effect it describes: after a crash the stored stage says what
        may have happened.
        """
        given: dict[str, Any] = {
            "stage": stage,
            "ingestion_id": ingestion_id,
            "remote_id": remote_id,
            "mode": mode,
            "part_size": part_size,
            "bytes_sent": bytes_sent,
            "fell_back": fell_back,
            "remote_name": remote_name,
            "upload_key": upload_key,
            "target_refs": target_refs,
        }
        fields = {name: value for name, value in given.items() if value is not _UNSET}
        if "target_refs" in fields:
            fields["target_refs"] = json.dumps(fields["target_refs"], separators=(",", ":"))
        if "stage" in fields:
            fields["stage"] = str(Stage(fields["stage"]))
        if "fell_back" in fields:
            fields["fell_back"] = int(bool(fields["fell_back"]))
        fields["updated_at"] = time.time()
        # Column names come from the fixed keys above, never from the caller.
        assignments = ", ".join(f"{name} = :{name}" for name in fields)
        changed = await self._execute(
            f"UPDATE jobs SET {assignments} WHERE id = :job_id", {**fields, "job_id": job_id}
        )
        self._expect_job(changed, job_id)

    async def mark_part_done(
        self, job_id: int, part_number: int, digest: bytes | None = None
    ) -> None:
        """Record that part ``part_number`` of the current ingestion is stored, with the
        digest of the bytes sent (``daemon.delivery.content``). Idempotent; a part sent again (after
        a restart) replaces the digest."""
        await self._execute(
            "INSERT INTO parts (job_id, part_number, digest) VALUES (?, ?, ?)"
            " ON CONFLICT (job_id, part_number) DO UPDATE"
            " SET digest = coalesce(excluded.digest, digest)",
            (job_id, part_number, digest),
        )

    async def parts_done(self, job_id: int) -> set[int]:
        """The part numbers recorded for the job's current ingestion."""
        return set(await self.part_digests(job_id))

    async def part_digests(self, job_id: int) -> dict[int, bytes | None]:
        """The parts recorded for the job's current ingestion: number → digest (None for a
        part recorded by an inboxd before schema v3, which kept no digest)."""
        rows = await self._fetch(
            "SELECT part_number, digest FROM parts WHERE job_id = ?", (job_id,)
        )
        return {row[0]: row[1] for row in rows}

    async def clear_parts(self, job_id: int) -> None:
        """Forget the job's recorded parts."""
        await self._execute("DELETE FROM parts WHERE job_id = ?", (job_id,))

    async def reset_ingestion(self, job_id: int) -> Job:
        """Start the file fresh: forget ingestion fields and parts, stage NEW, new upload key.

        Returns the updated job (its ``upload_key`` is kept, see ``_RESET_INGESTION_SQL``).
        """
        async with self._write() as db:
            rows = await db.execute_fetchall(
                f"UPDATE jobs SET {_RESET_INGESTION_SQL}, updated_at = ? WHERE id = ?"
                f" RETURNING {_JOB_COLUMNS}",
                (time.time(), job_id),
            )
            await db.execute("DELETE FROM parts WHERE job_id = ?", (job_id,))
            jobs = [_job_from_row(row) for row in rows]
        if not jobs:
            raise QueueError(f"no job {job_id} in state database {self._path}")
        return jobs[0]

    # -- transitions ----------------------------------------------------------------------------

    async def retry_later(self, job_id: int, *, error: str, kind: str, delay: float) -> None:
        """Back to QUEUED after ``delay`` seconds; keeps stage, ingestion and parts to resume."""
        now = time.time()
        changed = await self._execute(
            "UPDATE jobs SET state = 'queued', attempts = attempts + 1, next_attempt_at = ?,"
            " last_error = ?, error_kind = ?, lease_owner = NULL, lease_expires_at = NULL,"
            " updated_at = ? WHERE id = ?",
            (now + delay, error, kind, now, job_id),
        )
        self._expect_job(changed, job_id)

    async def release_backoffs(self, kinds: Sequence[str]) -> int:
        """Make QUEUED jobs that wait out a backoff for one of these error ``kinds`` due now.

        After an outage: the service answers again, so the jobs it held back need not wait
        out the rest of their backoff. Returns how many jobs were made due.
        """
        now = time.time()
        marks = ", ".join("?" for _ in kinds)
        return await self._execute(
            f"UPDATE jobs SET next_attempt_at = ?, updated_at = ? WHERE state = 'queued'"
            f" AND next_attempt_at > ? AND error_kind IN ({marks})",
            (now, now, now, *kinds),
        )

    async def mark_failed(self, job_id: int, *, error: str, kind: str) -> None:
        """FAILED for good (until ``requeue``); its parts are dropped."""
        now = time.time()
        async with self._write() as db:
            async with db.execute(
                "UPDATE jobs SET state = 'failed', attempts = attempts + 1, last_error = ?,"
                " error_kind = ?, finished_at = ?, updated_at = ?, lease_owner = NULL,"
                " lease_expires_at = NULL WHERE id = ?",
                (error, kind, now, now, job_id),
            ) as cursor:
                self._expect_job(cursor.rowcount, job_id)
            await db.execute("DELETE FROM parts WHERE job_id = ?", (job_id,))

    async def mark_superseded(self, job_id: int, *, reason: str) -> None:
        """SUPERSEDED (the file changed or vanished); ``reason`` is kept in ``last_error``."""
        now = time.time()
        async with self._write() as db:
            async with db.execute(
                "UPDATE jobs SET state = 'superseded', last_error = ?, error_kind = 'superseded',"
                " finished_at = ?, updated_at = ?, lease_owner = NULL, lease_expires_at = NULL"
                " WHERE id = ?",
                (reason, now, now, job_id),
            ) as cursor:
                self._expect_job(cursor.rowcount, job_id)
            await db.execute("DELETE FROM parts WHERE job_id = ?", (job_id,))

    async def mark_uploaded(
        self,
        job_id: int,
        *,
        bytes_sent: int | None = None,
        remote_id: int | None = None,
        remote_name: str | None = None,
        target_refs: dict[str, Any] | None = None,
        parts_recorded: bool = True,
        content_hash: str | None = None,
        change: str | None = None,
    ) -> None:
        """The ingestion is completed: IMPORTING at stage COMPLETED, lease and parts dropped.

        The given outcome fields (None leaves a field as it is) are stored by the same
        statement: ``content_hash`` is the hash of the bytes delivered (``daemon.delivery.content``,
        combined from the parts' digests), kept in the ledger once the job is pruned;
        ``change`` as ``Job.change``. ``parts_recorded=False`` promises that no part was
        journalled for this job, which saves the transaction around the parts' DELETE (one
        statement instead of four trips to the database thread, on every small file).
        """
        now = time.time()
        given: dict[str, Any] = {
            "bytes_sent": bytes_sent,
            "remote_id": remote_id,
            "remote_name": remote_name,
            "target_refs": None
            if target_refs is None
            else json.dumps(target_refs, separators=(",", ":")),
            "content_hash": content_hash,
            "change": change,
        }
        fields = {name: value for name, value in given.items() if value is not None}
        # Column names come from the fixed keys above, never from the caller.
        extra = "".join(f", {name} = :{name}" for name in fields)
        sql = (
            "UPDATE jobs SET state = 'importing', stage = 'completed', uploaded_at = :now,"
            f" updated_at = :now, lease_owner = NULL, lease_expires_at = NULL{extra}"
            " WHERE id = :job_id"
        )
        params = {**fields, "now": now, "job_id": job_id}
        if not parts_recorded:
            self._expect_job(await self._execute(sql, params), job_id)
            return
        async with self._write() as db:
            async with db.execute(sql, params) as cursor:
                self._expect_job(cursor.rowcount, job_id)
            await db.execute("DELETE FROM parts WHERE job_id = ?", (job_id,))

    async def mark_unchanged(self, job_id: int, prior: PriorDelivery) -> None:
        """Delivered without an upload: the file holds the bytes of the path's last delivery
        (``prior``), only its metadata changed. Its dataset and content hash are the
        prior's; ``change`` = "unchanged". DONE, or IMPORTING while the prior's import still
        runs: the poller then ends it with that import's outcome (a failed import is not
        taken for a delivery)."""
        now = time.time()
        state = "done" if prior.imported else "importing"
        given: dict[str, Any] = {"remote_id": prior.remote_id}
        if prior.remote_name is not None:
            given["remote_name"] = prior.remote_name
        if prior.target_refs:
            given["target_refs"] = json.dumps(prior.target_refs, separators=(",", ":"))
        extra = "".join(f", {name} = :{name}" for name in given)
        async with self._write() as db:
            async with db.execute(
                "UPDATE jobs SET state = :state, stage = 'completed', change = 'unchanged',"
                " content_hash = :content_hash, import_status = NULL, import_message = NULL,"
                " last_error = NULL, error_kind = NULL, uploaded_at = :now,"
                " finished_at = CASE WHEN :state = 'done' THEN :now END, updated_at = :now,"
                f" lease_owner = NULL, lease_expires_at = NULL{extra} WHERE id = :job_id",
                {
                    **given,
                    "state": state,
                    "content_hash": prior.content_hash,
                    "now": now,
                    "job_id": job_id,
                },
            ) as cursor:
                self._expect_job(cursor.rowcount, job_id)
            await db.execute("DELETE FROM parts WHERE job_id = ?", (job_id,))

    async def set_change(self, job_id: int, change: str | None) -> None:
        """Record what the job's file is to the path's last delivery (see ``Job.change``),
        before the delivery it decides: a resumed job delivers the same way."""
        changed = await self._execute(
            "UPDATE jobs SET change = ?, updated_at = ? WHERE id = ?",
            (change, time.time(), job_id),
        )
        self._expect_job(changed, job_id)

    async def prior_delivery(
        self, rel: str, *, before: int, target: str | None = None
    ) -> PriorDelivery | None:
        """The last delivered version of ``rel`` older than job ``before``: the newest job
        uploaded or done (for ``target``, when given), else the newest ledger row."""
        key = os.fsencode(rel)
        rows = await self._fetch(
            "SELECT size, mtime_ns, inode, ctime_ns, remote_id, content_hash, remote_name,"
            " target_refs, state FROM jobs WHERE rel = :rel AND id < :before"
            " AND state IN ('importing', 'done') AND (:target IS NULL OR target = :target)"
            " ORDER BY id DESC LIMIT 1",
            {"rel": key, "before": before, "target": target},
        ) or await self._fetch(
            # The ledger keeps no name and no refs; its rows are done by definition.
            "SELECT size, mtime_ns, inode, ctime_ns, remote_id, content_hash,"
            " NULL AS remote_name, '{}' AS target_refs, 'done' AS state FROM ledger"
            " WHERE rel = ? ORDER BY finished_at DESC LIMIT 1",
            (key,),
        )
        if not rows:
            return None
        row = rows[0]
        return PriorDelivery(
            size=row["size"],
            mtime_ns=row["mtime_ns"],
            inode=_inode_from_db(row["inode"]),
            ctime_ns=row["ctime_ns"],
            remote_id=row["remote_id"],
            content_hash=row["content_hash"],
            remote_name=row["remote_name"],
            target_refs=json.loads(row["target_refs"]),
            imported=row["state"] == "done",
        )

    async def jobs_to_poll(self, limit: int = 100) -> list[Job]:
        """IMPORTING jobs, least recently updated first (each poll moves a job to the back)."""
        return await self._fetch_jobs(
            "WHERE state = 'importing' ORDER BY updated_at, id LIMIT ?", (limit,)
        )

    async def record_import(
        self,
        job_id: int,
        *,
        status: str,
        progress: float | None,
        message: str | None,
        terminal: bool,
        failed: bool,
    ) -> bool:
        """Store an import status; terminal → DONE, or FAILED (kind "import") if ``failed``.

        Returns False (and changes nothing) if the job is no longer IMPORTING, so a late or
        duplicate poll cannot move a finished or requeued job.
        """
        update = ImportRecord(job_id, status, progress, message, terminal, failed)
        kind, params = _import_params(update, time.time())
        return await self._execute(_IMPORT_SQL[kind], params) == 1

    async def record_imports(self, updates: Sequence[ImportRecord]) -> None:
        """``record_import`` for many jobs in one transaction (a poll answers for a batch)."""
        if not updates:
            return
        now = time.time()
        rows = [_import_params(u, now) for u in updates]
        async with self._write() as db:
            # One statement per kind of transition, each run over its rows at once.
            for transition, sql in _IMPORT_SQL.items():
                batch = [params for kind, params in rows if kind == transition]
                if batch:
                    await db.executemany(sql, batch)

    async def jobs_for_after_upload(self, limit: int = 100) -> list[Job]:
        """DONE jobs whose after-upload action (archive/delete/keep) is not done yet."""
        rows = await self._fetch(
            f"SELECT {_JOB_COLUMNS} FROM jobs INDEXED BY jobs_after_upload"
            " WHERE state = 'done' AND after_upload IS NULL ORDER BY finished_at, id LIMIT ?",
            (limit,),
        )
        return [_job_from_row(row) for row in rows]

    async def set_after_upload(self, job_id: int, value: str) -> None:
        """Record the after-upload action taken: "archived", "deleted" or "kept"."""
        changed = await self._execute(
            "UPDATE jobs SET after_upload = ?, updated_at = ? WHERE id = ?",
            (value, time.time(), job_id),
        )
        self._expect_job(changed, job_id)

    async def set_after_upload_many(self, outcomes: Mapping[int, str]) -> None:
        """``set_after_upload`` for many jobs in one statement per call (missing ids ignored)."""
        if not outcomes:
            return
        now = time.time()
        async with self._write() as db:
            await db.executemany(
                "UPDATE jobs SET after_upload = ?, updated_at = ? WHERE id = ?",
                [(value, now, job_id) for job_id, value in outcomes.items()],
            )

    async def recover(self, owner: str, now: float | None = None) -> list[Job]:
        """At start-up: UPLOADING jobs of other owners or with expired leases → QUEUED now.

        Stage, ingestion fields and parts are kept so the worker resumes. The job is due at
        once and keeps its place in line (``next_attempt_at`` is never moved later): an
        ingestion left open on the server should be finished before thousands of newer files,
        not after. The interrupted try counts as an attempt (a file that crashes the daemon
        must not loop unnoticed).
        Returns the recovered jobs, for logging.
        """
        now = time.time() if now is None else now
        rows = await self._write_returning(
            "UPDATE jobs SET state = 'queued', next_attempt_at = min(next_attempt_at, :now),"
            " attempts = attempts + 1, error_kind = 'interrupted',"
            " last_error = 'interrupted: ' || coalesce(lease_owner, 'unknown worker')"
            "   || ' stopped while uploading',"
            " lease_owner = NULL, lease_expires_at = NULL, updated_at = :now"
            " WHERE state = 'uploading' AND (lease_owner IS NOT :owner"
            "   OR lease_expires_at IS NULL OR lease_expires_at <= :now)"
            f" RETURNING {_JOB_COLUMNS}",
            {"owner": owner, "now": now},
        )
        return sorted((_job_from_row(row) for row in rows), key=lambda job: job.id)

    async def requeue(self, job_id: int | None = None) -> int:
        """``inboxd retry``: FAILED jobs (one, or all) back to QUEUED from scratch.

        attempts → 0; ``last_error``/``error_kind`` are cleared (the CLI reports them before it
        requeues); ingestion reset as in :meth:`reset_ingestion` (a failed job's ingestion was
        aborted), import and after-upload fields cleared. Returns how many jobs were requeued.
        """
        now = time.time()
        # A failure whose file has a newer job (the file was fixed and taken again) is history:
        # retrying it would upload the old version over the fixed one.
        where = f"state = 'failed' AND NOT {_HAS_NEWER}" + (
            "" if job_id is None else " AND id = :job_id"
        )
        async with self._write() as db:
            rows = await db.execute_fetchall(
                f"UPDATE jobs SET state = 'queued', {_RESET_INGESTION_SQL}, attempts = 0,"
                " next_attempt_at = :now, last_error = NULL, error_kind = NULL,"
                " import_status = NULL, import_progress = NULL, import_message = NULL,"
                " after_upload = NULL, started_at = NULL, uploaded_at = NULL,"
                " finished_at = NULL, lease_owner = NULL, lease_expires_at = NULL,"
                f" updated_at = :now WHERE {where} RETURNING id",
                {"now": now, "job_id": job_id},
            )
            ids = [(row[0],) for row in rows]
            await db.executemany("DELETE FROM parts WHERE job_id = ?", ids)
        return len(ids)

    # -- ledger and housekeeping ----------------------------------------------------------------

    async def prune(self, older_than_seconds: float, now: float | None = None) -> int:
        """Delete finished jobs older than the cutoff; returns how many were deleted.

        DONE jobs are copied into the ledger first, so a file kept in the inbox is never
        uploaded again. DONE jobs whose after-upload action is still pending are kept.
        """
        cutoff = (time.time() if now is None else now) - older_than_seconds
        prunable = (
            "finished_at < :cutoff AND (state IN ('failed', 'superseded')"
            " OR (state = 'done' AND after_upload IS NOT NULL))"
        )
        async with self._write() as db:
            await db.execute(
                "INSERT INTO ledger (rel, size, mtime_ns, inode, ctime_ns, remote_id,"
                " finished_at, content_hash)"
                " SELECT rel, size, mtime_ns, inode, ctime_ns, remote_id, finished_at,"
                " content_hash FROM jobs"
                f" WHERE state = 'done' AND {prunable}"
                " ON CONFLICT DO NOTHING",
                {"cutoff": cutoff},
            )
            async with db.execute(f"DELETE FROM jobs WHERE {prunable}", {"cutoff": cutoff}) as c:
                deleted = c.rowcount
        return deleted

    async def vacuum_if_worthwhile(self) -> bool:
        """VACUUM when more than a quarter of the pages are free; returns whether it ran."""
        self._check_writable()
        rows = await self._fetch("SELECT * FROM pragma_page_count(), pragma_freelist_count()")
        pages, free = rows[0][0], rows[0][1]
        if pages == 0 or free * 4 <= pages:
            return False
        await self._execute_alone("VACUUM")
        return True

    # -- lookups --------------------------------------------------------------------------------

    async def get(self, job_id: int) -> Job | None:
        """The job with this id, or None."""
        jobs = await self._fetch_jobs("WHERE id = ?", (job_id,))
        return jobs[0] if jobs else None

    async def find_by_rel(self, rel: str) -> list[Job]:
        """All jobs (every identity, every state) for this inbox-relative path, oldest first."""
        return await self._fetch_jobs("WHERE rel = ? ORDER BY id", (os.fsencode(rel),))

    async def is_archived_upload(self, rel: str, size: int, mtime_ns: int) -> bool:
        """Whether a file with this rel, size and mtime was uploaded and imported.

        True when a DONE job or a ledger row (a pruned DONE job) has that identity. The inode
        is deliberately not compared: archiving across filesystems gives the file a new one,
        while size and mtime survive (``os.replace`` / ``shutil.copy2``). Retention asks this
        before it removes anything from the archive.
        """
        key = (os.fsencode(rel), size, mtime_ns)
        # Both lookups use a (rel, size, mtime_ns, ...) index prefix: jobs_identity, ledger PK.
        rows = await self._fetch(
            "SELECT EXISTS (SELECT 1 FROM jobs WHERE rel = ? AND size = ? AND mtime_ns = ?"
            "   AND state = 'done')"
            " OR EXISTS (SELECT 1 FROM ledger WHERE rel = ? AND size = ? AND mtime_ns = ?)",
            (*key, *key),
        )
        return bool(rows[0][0])

    # -- daemon liveness and settling files -----------------------------------------------------

    async def heartbeat(self, pid: int, started_at: float, info: dict[str, Any]) -> None:
        """Record that the daemon ``pid`` is alive now, with a JSON-able ``info`` blob."""
        await self._execute(
            "INSERT INTO daemon (id, pid, started_at, heartbeat_at, info) VALUES (1, ?, ?, ?, ?)"
            " ON CONFLICT (id) DO UPDATE SET pid = excluded.pid,"
            " started_at = excluded.started_at, heartbeat_at = excluded.heartbeat_at,"
            " info = excluded.info",
            (pid, started_at, time.time(), json.dumps(info)),
        )

    async def daemon_info(self) -> DaemonInfo | None:
        """The last heartbeat, or None if no daemon has ever run on this database."""
        rows = await self._fetch("SELECT pid, started_at, heartbeat_at, info FROM daemon")
        if not rows:
            return None
        row = rows[0]
        return DaemonInfo(
            pid=row["pid"],
            started_at=row["started_at"],
            heartbeat_at=row["heartbeat_at"],
            info=json.loads(row["info"]),
        )

    async def apply_settling(self, changes: Mapping[str, tuple[int, float] | None]) -> None:
        """Record the files the watcher waits on, and forget those it stopped waiting on, in
        one transaction: rel → (size, since), or None to forget. A burst of thousands of files
        is one write, not thousands."""
        if not changes:
            return
        upserts = [(os.fsencode(r), v[0], v[1]) for r, v in changes.items() if v is not None]
        deletes = [(os.fsencode(r),) for r, v in changes.items() if v is None]
        async with self._write() as db:
            if upserts:
                await db.executemany(
                    "INSERT INTO settling (rel, size, since) VALUES (?, ?, ?)"
                    " ON CONFLICT (rel) DO UPDATE SET size = excluded.size,"
                    " since = excluded.since",
                    upserts,
                )
            if deletes:
                await db.executemany("DELETE FROM settling WHERE rel = ?", deletes)

    async def clear_all_settling(self) -> None:
        """Forget all settling files (at start-up: a previous run's entries are stale)."""
        await self._execute("DELETE FROM settling")

    async def list_settling(self, limit: int = 200) -> list[SettlingFile]:
        """Settling files, longest waiting first."""
        rows = await self._fetch(
            "SELECT rel, size, since FROM settling ORDER BY since, rel LIMIT ?", (limit,)
        )
        return [SettlingFile(os.fsdecode(row[0]), row[1], row[2]) for row in rows]

    # -- read side for status -------------------------------------------------------------------

    async def counts(self) -> dict[str, int]:
        """Jobs per state (every state present, zeros included) plus "settling"."""
        result = {str(state): 0 for state in JobState}
        for row in await self._fetch("SELECT state, count(*) FROM jobs GROUP BY state"):
            result[row[0]] = row[1]
        result["settling"] = (await self._fetch("SELECT count(*) FROM settling"))[0][0]
        return result

    async def list_jobs(
        self,
        states: Collection[JobState] | None = None,
        limit: int = 200,
        order: Literal["recent", "oldest"] = "recent",
    ) -> list[Job]:
        """Up to ``limit`` jobs in ``states`` (all when None), by last update.

        "recent" = most recently updated first, "oldest" = least recently updated first.
        """
        if order not in ("recent", "oldest"):
            raise ValueError(f"order must be 'recent' or 'oldest', not {order!r}")
        wanted = sorted({JobState(s) for s in (JobState if states is None else states)})
        direction = "DESC" if order == "recent" else "ASC"
        # One indexed query per state, merged here: each reads at most `limit` index entries,
        # whereas `state IN (...) ORDER BY` would sort every matching row.
        per_state: list[list[Job]] = []
        for state in wanted:
            per_state.append(
                await self._fetch_jobs(
                    f"WHERE state = ? ORDER BY updated_at {direction}, id {direction} LIMIT ?",
                    (str(state), limit),
                )
            )
        merged: Iterable[Job] = heapq.merge(
            *per_state, key=lambda job: (job.updated_at, job.id), reverse=order == "recent"
        )
        return list(merged)[:limit]

    async def recent_failures(self, limit: int = 20) -> list[Job]:
        """The most recently failed jobs first."""
        return await self.list_jobs([JobState.FAILED], limit=limit, order="recent")

    async def latest_jobs(
        self,
        state: JobState,
        *,
        limit: int = 50,
        order: Literal["recent", "oldest"] = "recent",
        since: float | None = None,
        rel_glob: str | None = None,
    ) -> list[Job]:
        """Up to ``limit`` jobs in ``state`` that are the newest job of their file.

        One line per file for ``status``: a job with a later job of the same path is left
        out. ``since`` keeps jobs updated at or after that time; ``rel_glob`` is a glob
        (``*``, ``?``, ``[…]``) on the inbox-relative path, ASCII letters matched in any case.
        """
        direction = "DESC" if order == "recent" else "ASC"
        where = ["state = :state", f"NOT {_HAS_NEWER}"]
        if since is not None:
            where.append("updated_at >= :since")
        if rel_glob is not None:
            where.append("lower(CAST(rel AS TEXT)) GLOB lower(:glob)")
        return await self._fetch_jobs(
            f"WHERE {' AND '.join(where)}"
            f" ORDER BY updated_at {direction}, id {direction} LIMIT :limit",
            {"state": str(state), "since": since, "glob": rel_glob, "limit": limit},
        )

    async def superseded_failures(self, limit: int = 20) -> list[tuple[Job, int]]:
        """FAILED jobs whose file has a newer job since (most recent first), with that
        newer job's id: failures that a fixed file made history."""
        rows = await self._fetch(
            f"SELECT {_JOB_COLUMNS}, (SELECT max(newer.id) FROM jobs AS newer"
            "   WHERE newer.rel = jobs.rel AND newer.id > jobs.id) AS newer_id"
            f" FROM jobs WHERE state = 'failed' AND {_HAS_NEWER}"
            " ORDER BY updated_at DESC, id DESC LIMIT ?",
            (limit,),
        )
        return [(_job_from_row(row), int(row["newer_id"])) for row in rows]

    async def count_superseded_failures(self) -> int:
        """How many FAILED jobs have a newer job of the same file (see ``superseded_failures``)."""
        rows = await self._fetch(
            f"SELECT count(*) FROM jobs WHERE state = 'failed' AND {_HAS_NEWER}"
        )
        return int(rows[0][0])

    async def newest_job_of(self, job_id: int) -> int | None:
        """The id of the newest job of the same file as ``job_id``, if newer than it."""
        rows = await self._fetch(
            "SELECT max(newer.id) FROM jobs AS j JOIN jobs AS newer"
            " ON newer.rel = j.rel AND newer.id > j.id WHERE j.id = ?",
            (job_id,),
        )
        value = rows[0][0] if rows else None
        return None if value is None else int(value)

    async def oldest_queued_at(self) -> float | None:
        """When the oldest job still QUEUED was enqueued (how far behind the daemon is)."""
        rows = await self._fetch(
            "SELECT min(created_at) FROM jobs INDEXED BY jobs_queued_created WHERE state = 'queued'"
        )
        value = rows[0][0]
        return None if value is None else float(value)

    async def set_stream_id(self, job_id: int, stream_id: int) -> None:
        """Record the stream a job's configured stream name resolved to.

        A name is looked up when the file is uploaded, not when it is queued, so that an
        unreachable server or an unknown name does not hold up the intake of other files.
        """
        changed = await self._execute(
            "UPDATE jobs SET stream_id = ?, updated_at = ? WHERE id = ?",
            (stream_id, time.time(), job_id),
        )
        self._expect_job(changed, job_id)
