"""Versioned schema migrations for both stores: version N is the N-th script of the store's list.

The applied version is kept in `schema_version` (one row). At start each store applies the scripts it has
not applied yet, each in its own transaction; a database at a version this code does not know (a newer
release migrated it) stops start-up with a message naming JOBS_DB: running old code on a newer schema
could lose or corrupt jobs. Add migrations by appending to the lists, never by editing applied ones.
"""

from __future__ import annotations

SQLITE: list[str] = [
    # 1: the schema from before page leases (a file made by an older release is at version 0 with these tables).
    """
    CREATE TABLE IF NOT EXISTS jobs (
        id TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        status TEXT NOT NULL,
        pages TEXT NOT NULL,
        pages_spec TEXT,
        password TEXT,
        callback_url TEXT,
        filename TEXT,
        doc_bytes INTEGER NOT NULL,
        result_bytes INTEGER NOT NULL DEFAULT 0,
        error TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        run_started_at REAL,
        finished_at REAL,
        expires_at REAL,
        webhook TEXT,
        webhook_attempts INTEGER NOT NULL DEFAULT 0,
        waiting TEXT,
        options TEXT
    );
    CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, created_at);
    CREATE INDEX IF NOT EXISTS jobs_by_owner ON jobs (owner, created_at);
    CREATE INDEX IF NOT EXISTS jobs_by_expiry ON jobs (expires_at);
    CREATE TABLE IF NOT EXISTS documents (
        job_id TEXT PRIMARY KEY REFERENCES jobs (id) ON DELETE CASCADE,
        data BLOB NOT NULL
    );
    CREATE TABLE IF NOT EXISTS pages (
        job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
        page INTEGER NOT NULL,
        result TEXT NOT NULL,
        finished_at REAL NOT NULL,
        PRIMARY KEY (job_id, page)
    );
    """,
    # 2: pages become the unit of work (leases), and stored pages get their commit order.
    """
    ALTER TABLE pages ADD COLUMN seq INTEGER;
    UPDATE pages SET seq = (SELECT COUNT(*) FROM pages p WHERE p.job_id = pages.job_id AND p.rowid <= pages.rowid);
    CREATE TABLE page_tasks (
        job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
        page INTEGER NOT NULL,
        state TEXT NOT NULL,
        worker TEXT,
        attempt INTEGER NOT NULL DEFAULT 0,
        lease_until REAL,
        owner TEXT NOT NULL,
        created_at REAL NOT NULL,
        PRIMARY KEY (job_id, page)
    );
    CREATE INDEX page_tasks_open ON page_tasks (created_at, job_id, page) WHERE state IN ('todo', 'leased');
    INSERT INTO page_tasks (job_id, page, state, attempt, owner, created_at)
        SELECT j.id, CAST(e.value AS INTEGER),
               CASE WHEN EXISTS (SELECT 1 FROM pages p WHERE p.job_id = j.id AND p.page = CAST(e.value AS INTEGER))
                    THEN 'done' ELSE 'todo' END,
               0, j.owner, j.created_at
        FROM jobs j, json_each(j.pages) e
        WHERE j.status IN ('queued', 'running');
    """,
]

POSTGRES: list[str] = [
    # 1: jobs, their documents, finished pages (with commit order) and page leases.
    """
    CREATE TABLE jobs (
        id TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        status TEXT NOT NULL,
        pages TEXT NOT NULL,
        pages_spec TEXT,
        password TEXT,
        callback_url TEXT,
        filename TEXT,
        doc_bytes BIGINT NOT NULL,
        result_bytes BIGINT NOT NULL DEFAULT 0,
        error TEXT,
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        run_started_at DOUBLE PRECISION,
        finished_at DOUBLE PRECISION,
        expires_at DOUBLE PRECISION,
        webhook TEXT,
        webhook_attempts INTEGER NOT NULL DEFAULT 0,
        waiting TEXT,
        options TEXT
    );
    CREATE INDEX jobs_by_status ON jobs (status, created_at);
    CREATE INDEX jobs_by_owner ON jobs (owner, created_at);
    CREATE INDEX jobs_by_expiry ON jobs (expires_at);
    CREATE INDEX jobs_by_webhook ON jobs (webhook) WHERE webhook = 'pending';
    CREATE TABLE documents (
        job_id TEXT PRIMARY KEY REFERENCES jobs (id) ON DELETE CASCADE,
        data BYTEA NOT NULL
    );
    CREATE TABLE pages (
        job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
        page INTEGER NOT NULL,
        result TEXT NOT NULL,
        finished_at DOUBLE PRECISION NOT NULL,
        seq INTEGER,
        PRIMARY KEY (job_id, page)
    );
    CREATE TABLE page_tasks (
        job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
        page INTEGER NOT NULL,
        state TEXT NOT NULL,
        worker TEXT,
        attempt INTEGER NOT NULL DEFAULT 0,
        lease_until DOUBLE PRECISION,
        owner TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (job_id, page)
    );
    CREATE INDEX page_tasks_open ON page_tasks (created_at, job_id, page) WHERE state IN ('todo', 'leased');
    """,
]

VERSION_TABLE = "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)"


def too_new(found: int, known: int, where: str) -> str:
    """The start-up refusal for a schema newer than this code."""
    return (
        f"JOBS_DB: the job store at {where} has schema version {found}, newer than this release knows "
        f"(version {known}); a newer release migrated it. Run that release (or a newer one), or point JOBS_DB "
        "at another database"
    )
