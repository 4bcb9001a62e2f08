"""Versioned schema migrations for both stores: version N is the N-th script of the store's list.

The applied version is kept in `schema_version` (one row). At start each store applies the scripts it has
not applied yet, each in its own transaction; a database at a version this code does not know (a newer
release migrated it) stops start-up with a message naming JOBS_DB: running old code on a newer schema
could lose or corrupt jobs. Add migrations by appending to the lists, never by editing applied ones.
"""

from __future__ import annotations

# 4, the same SQL on both (SQLite reads DOUBLE PRECISION as REAL): fair claiming between owners across processes
# and replicas (base.TURNS): open and leased pages by owner, and when each owner was last served.
_FAIR_CLAIMS = """
    CREATE TABLE owner_turns (
        owner TEXT PRIMARY KEY,
        served_at DOUBLE PRECISION NOT NULL
    );
    INSERT INTO owner_turns (owner, served_at) SELECT DISTINCT owner, 0 FROM page_tasks;
    CREATE INDEX page_tasks_open_by_owner ON page_tasks (owner, created_at, job_id, page)
        WHERE state IN ('todo', 'leased');
    CREATE INDEX page_tasks_leased_by_owner ON page_tasks (owner, lease_until) WHERE state = 'leased';
    DROP INDEX page_tasks_open;
"""

# 5, the same SQL on both: Idempotency-Key on job submissions, one job per (owner, key), and what the key was
# first used for.
_IDEMPOTENCY_KEYS = """
    ALTER TABLE jobs ADD COLUMN idempotency_key TEXT;
    ALTER TABLE jobs ADD COLUMN request_sha256 TEXT;
    CREATE UNIQUE INDEX jobs_by_idempotency_key ON jobs (owner, idempotency_key) WHERE idempotency_key IS NOT NULL;
"""

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
    # 3: the webhook outbox (app/jobs/outbox.py): one row per finished job to deliver, leased.
    """
    CREATE TABLE IF NOT EXISTS webhook_outbox (
        job_id TEXT PRIMARY KEY REFERENCES jobs (id) ON DELETE CASCADE,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_at REAL DEFAULT 0,  -- NULL once delivered or given up: the row stays
        lease_owner TEXT,
        lease_until REAL NOT NULL DEFAULT 0
    );
    CREATE INDEX IF NOT EXISTS webhook_outbox_due ON webhook_outbox (next_at);
    """,
    _FAIR_CLAIMS,  # 4
    _IDEMPOTENCY_KEYS,  # 5
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
    # 2: a page's fenced completion in one round trip (the hot path: one call per page). Each statement of a
    # plpgsql function takes a fresh snapshot, so the page order (`seq`) is read after the job row is locked.
    """
    CREATE FUNCTION lightonocr_complete_page(
        p_job TEXT, p_page INTEGER, p_worker TEXT, p_attempt INTEGER, p_result TEXT, p_now DOUBLE PRECISION
    ) RETURNS TABLE (accepted BOOLEAN, job_done BOOLEAN) LANGUAGE plpgsql AS $$
    DECLARE
        v_seq INTEGER;
        v_inserted INTEGER;
        v_left INTEGER;
    BEGIN
        PERFORM 1 FROM jobs WHERE id = p_job FOR UPDATE;
        IF NOT FOUND THEN
            RETURN QUERY SELECT false, false;
            RETURN;
        END IF;
        UPDATE page_tasks SET state = 'done', lease_until = NULL
            WHERE job_id = p_job AND page = p_page AND worker = p_worker AND attempt = p_attempt AND state = 'leased';
        IF NOT FOUND THEN
            RETURN QUERY SELECT false, false;
            RETURN;
        END IF;
        SELECT COALESCE(MAX(seq), 0) + 1 INTO v_seq FROM pages WHERE job_id = p_job;
        INSERT INTO pages (job_id, page, result, finished_at, seq) VALUES (p_job, p_page, p_result, p_now, v_seq)
            ON CONFLICT DO NOTHING;
        GET DIAGNOSTICS v_inserted = ROW_COUNT;
        UPDATE jobs SET result_bytes = result_bytes + CASE WHEN v_inserted > 0 THEN length(p_result) ELSE 0 END,
            updated_at = p_now, waiting = NULL,
            status = CASE WHEN status = 'queued' THEN 'running' ELSE status END,
            run_started_at = COALESCE(run_started_at, p_now)
            WHERE id = p_job;
        SELECT COUNT(*) INTO v_left FROM page_tasks WHERE job_id = p_job AND state <> 'done';
        PERFORM pg_notify('lightonocr_jobs', p_job);
        RETURN QUERY SELECT true, v_left = 0;
    END
    $$;
    """,
    # 3: the webhook outbox (app/jobs/outbox.py) and per-key limits shared by replicas (app/jobs/limits.py).
    # IF NOT EXISTS: databases used before this migration existed got these tables from the code itself.
    """
    CREATE TABLE IF NOT EXISTS webhook_outbox (
        job_id TEXT PRIMARY KEY REFERENCES jobs (id) ON DELETE CASCADE,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_at DOUBLE PRECISION DEFAULT 0,  -- NULL once delivered or given up: the row stays
        lease_owner TEXT,
        lease_until DOUBLE PRECISION NOT NULL DEFAULT 0
    );
    CREATE INDEX IF NOT EXISTS webhook_outbox_due ON webhook_outbox (next_at);
    CREATE TABLE IF NOT EXISTS key_rate (
        client TEXT PRIMARY KEY,
        tokens DOUBLE PRECISION NOT NULL,
        updated DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE IF NOT EXISTS key_inflight (
        replica TEXT NOT NULL,
        client TEXT NOT NULL,
        pages INTEGER NOT NULL,
        lease_until DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (replica, client)
    );
    CREATE INDEX IF NOT EXISTS key_inflight_by_client ON key_inflight (client, lease_until);
    """,
    _FAIR_CLAIMS,  # 4
    _IDEMPOTENCY_KEYS,  # 5
]

VERSION_TABLE = "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)"


def too_new(found: int, known: int, where: str) -> str:
    """The start-up refusal for a schema newer than this code."""
    return (
        f"JOBS_DB: the job store at {where} has schema version {found}, newer than this release knows "
        f"(version {known}); a newer release migrated it. Run that release (or a newer one), or point JOBS_DB "
        "at another database"
    )
