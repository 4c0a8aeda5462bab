"""The schema: MIGRATIONS[i] takes a database from version i to i + 1 (PRAGMA user_version), each
step a function of the connection; the code's schema version is len(MIGRATIONS)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import aiosqlite

Migration = Callable[[aiosqlite.Connection], Awaitable[None]]


async def _migrate_v1(db: aiosqlite.Connection) -> None:
    """v0 → v1: the initial schema."""
    statements = [
        # No CHECK constraints on state/stage: SQLite cannot alter a CHECK, so a new state in
        # a later version would need a full table rebuild. The enums guard the values.
        """
        CREATE TABLE jobs (
            id INTEGER PRIMARY KEY AUTOINCREMENT,  -- AUTOINCREMENT: ids never reused after prune
            rel BLOB NOT NULL,
            size INTEGER NOT NULL,
            mtime_ns INTEGER NOT NULL,
            inode INTEGER NOT NULL,
            state TEXT NOT NULL,
            stage TEXT NOT NULL,
            stream_id INTEGER NOT NULL,
            dataset_name TEXT NOT NULL,
            metadata TEXT NOT NULL,
            upload_key TEXT NOT NULL,
            ingestion_id INTEGER,
            dataset_id INTEGER,
            mode TEXT,
            part_size INTEGER,
            bytes_sent INTEGER NOT NULL DEFAULT 0,
            attempts INTEGER NOT NULL DEFAULT 0,
            next_attempt_at REAL NOT NULL,
            last_error TEXT,
            error_kind TEXT,
            import_status TEXT,
            import_progress REAL,
            import_message TEXT,
            fell_back INTEGER NOT NULL DEFAULT 0,
            after_upload TEXT,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            started_at REAL,
            uploaded_at REAL,
            finished_at REAL,
            lease_owner TEXT,
            lease_expires_at REAL
        )
        """,
        # One job per file identity; its rel prefix also serves find_by_rel and superseding.
        "CREATE UNIQUE INDEX jobs_identity ON jobs(rel, size, mtime_ns, inode)",
        # counts (covering), list_jobs/recent_failures per state, jobs_to_poll, recover.
        "CREATE INDEX jobs_state_updated ON jobs(state, updated_at, id)",
        # Partial indexes for the hot paths. Without statistics the planner prefers
        # jobs_state_updated (equality on state) and then sorts every queued row, so the queries
        # that need these name them with INDEXED BY: a schema change that breaks one fails
        # loudly instead of silently turning a claim into a full sort.
        # claim and next_due_at: the queued jobs in due order, nothing else.
        "CREATE INDEX jobs_due ON jobs(next_attempt_at, id) WHERE state = 'queued'",
        "CREATE INDEX jobs_queued_created ON jobs(created_at) WHERE state = 'queued'",
        "CREATE INDEX jobs_after_upload ON jobs(finished_at, id)"
        " WHERE state = 'done' AND after_upload IS NULL",
        # WITHOUT ROWID: the key is the row, so 50,000 parts cost one small b-tree entry each.
        """
        CREATE TABLE parts (
            job_id INTEGER NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
            part_number INTEGER NOT NULL,
            PRIMARY KEY (job_id, part_number)
        ) WITHOUT ROWID
        """,
        # The primary key is the UNIQUE(rel, size, mtime_ns, inode) that enqueue looks up.
        """
        CREATE TABLE ledger (
            rel BLOB NOT NULL,
            size INTEGER NOT NULL,
            mtime_ns INTEGER NOT NULL,
            inode INTEGER NOT NULL,
            dataset_id INTEGER,
            finished_at REAL NOT NULL,
            PRIMARY KEY (rel, size, mtime_ns, inode)
        ) WITHOUT ROWID
        """,
        """
        CREATE TABLE daemon (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            pid INTEGER NOT NULL,
            started_at REAL NOT NULL,
            heartbeat_at REAL NOT NULL,
            info TEXT NOT NULL
        )
        """,
        """
        CREATE TABLE settling (
            rel BLOB PRIMARY KEY,
            size INTEGER NOT NULL,
            since REAL NOT NULL
        ) WITHOUT ROWID
        """,
    ]
    for statement in statements:
        await db.execute(statement)


# MIGRATIONS[i] takes the schema from version i to i + 1; the code's schema version is
# len(MIGRATIONS). A v2 is one more function appended here; all pending steps and the new
# user_version are applied in a single transaction, so a failed step leaves the file untouched.
async def _migrate_v2(db: aiosqlite.Connection) -> None:
    """v1 → v2: jobs name their delivery target and keep its identifiers.

    ``target`` is the kind of service a job is delivered to (Marple DB, the older Marple API,
    the spreadsheet data service); ``target_refs`` holds that service's own identifiers
    (a source id, a share link, a data source link) as a JSON object.
    """
    await db.execute("ALTER TABLE jobs ADD COLUMN target TEXT NOT NULL DEFAULT 'marple-db'")
    await db.execute("ALTER TABLE jobs ADD COLUMN target_refs TEXT NOT NULL DEFAULT '{}'")


async def _migrate_v3(db: aiosqlite.Connection) -> None:
    """v2 → v3: ctime joins the file identity; delivered content is remembered.

    ``ctime_ns`` (jobs and ledger; 0 = unknown, for rows from before) makes an in-place
    rewrite that restores the mtime a new version. ``content_hash`` is the hash of the bytes
    a job delivered (see ``daemon.delivery.marple_db.upload``), ``parts.digest`` the hash of each
    stored part while the upload is in flight, so a delivered file that later grows by appending is
    recognised by its unchanged prefix.
    """
    await db.execute("ALTER TABLE jobs ADD COLUMN ctime_ns INTEGER NOT NULL DEFAULT 0")
    await db.execute("ALTER TABLE jobs ADD COLUMN content_hash TEXT")
    await db.execute("DROP INDEX jobs_identity")
    await db.execute(
        "CREATE UNIQUE INDEX jobs_identity ON jobs(rel, size, mtime_ns, inode, ctime_ns)"
    )
    await db.execute("ALTER TABLE parts ADD COLUMN digest BLOB")
    # The ledger's key is the identity: rebuilt with the ctime in it.
    await db.execute(
        """
        CREATE TABLE ledger_v3 (
            rel BLOB NOT NULL,
            size INTEGER NOT NULL,
            mtime_ns INTEGER NOT NULL,
            inode INTEGER NOT NULL,
            ctime_ns INTEGER NOT NULL,
            dataset_id INTEGER,
            finished_at REAL NOT NULL,
            content_hash TEXT,
            PRIMARY KEY (rel, size, mtime_ns, inode, ctime_ns)
        ) WITHOUT ROWID
        """
    )
    await db.execute(
        "INSERT INTO ledger_v3 (rel, size, mtime_ns, inode, ctime_ns, dataset_id, finished_at)"
        " SELECT rel, size, mtime_ns, inode, 0, dataset_id, finished_at FROM ledger"
    )
    await db.execute("DROP TABLE ledger")
    await db.execute("ALTER TABLE ledger_v3 RENAME TO ledger")


async def _migrate_v4(db: aiosqlite.Connection) -> None:
    """v3 → v4: a job records what it was to the path's last delivery (``change``).

    "appended" (delivered again into the same dataset), "unchanged" (the same bytes, only
    the metadata moved: nothing uploaded) or "on_server" (a dataset of the name already held
    this file: a restore over a fresh state database); NULL for a plain new file or version.

    Also indexes jobs and ledger by (inode, size, mtime_ns): a renamed or moved file is found
    by what a rename keeps (``delivered_elsewhere``), a lookup instead of a scan.
    """
    await db.execute("ALTER TABLE jobs ADD COLUMN change TEXT")
    await db.execute("CREATE INDEX jobs_inode ON jobs(inode, size, mtime_ns)")
    await db.execute("CREATE INDEX ledger_inode ON ledger(inode, size, mtime_ns)")


async def _migrate_v5(db: aiosqlite.Connection) -> None:
    """v4 → v5: the columns named for Marple DB get target-neutral names.

    ``jobs.dataset_id`` and ``ledger.dataset_id`` hold whatever id the job's target gave what
    it made (a Marple DB dataset, an older Marple API source, a data service data source):
    ``remote_id``. ``jobs.dataset_name`` is the name it was made under: ``remote_name``.

    ``ALTER TABLE … RENAME COLUMN`` (SQLite ≥ 3.25; Python 3.10 on Ubuntu 22.04 brings 3.37)
    renames in place, no table rebuild, and rewrites every index, view and trigger that names
    the column (none does today). ``stream_id`` and ``ingestion_id`` keep their names: only
    Marple DB jobs give them a meaning.
    """
    await db.execute("ALTER TABLE jobs RENAME COLUMN dataset_id TO remote_id")
    await db.execute("ALTER TABLE jobs RENAME COLUMN dataset_name TO remote_name")
    await db.execute("ALTER TABLE ledger RENAME COLUMN dataset_id TO remote_id")


MIGRATIONS: list[Migration] = [_migrate_v1, _migrate_v2, _migrate_v3, _migrate_v4, _migrate_v5]
