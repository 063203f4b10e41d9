-- Baton schema 1.
--
-- * runs: one row per run, rewritten on every transition. Only the columns the
--   API filters on are columns; the rest of the engine's state is `data` (JSON).
--   The upsert never rewrites created_at, so the keyset indexes
--   (..., created_at, run_id) are written once per run.
-- * An open run (status not terminal) holds its (workflow, workflow_id) in a
--   partial unique index: a second open run with the same pair is a constraint
--   error, and finishing the run frees the pair. Keep the status list in step
--   with server.store.base.TERMINAL.
-- * steps keep their rowid: get_steps orders by it (first-written order), and an
--   upsert (INSERT ... ON CONFLICT DO UPDATE) leaves it unchanged.
-- * history and timers are small rows always read by their primary key prefix,
--   so they are clustered on it (WITHOUT ROWID).

CREATE TABLE runs (
    run_id      TEXT PRIMARY KEY,
    workflow    TEXT NOT NULL,
    version     TEXT NOT NULL,
    def_hash    TEXT NOT NULL,
    workflow_id TEXT,
    status      TEXT NOT NULL,
    created_at  REAL NOT NULL,
    updated_at  REAL NOT NULL,
    finished_at REAL,
    inflight    INTEGER NOT NULL DEFAULT 0,
    data        BLOB NOT NULL
);

CREATE INDEX runs_by_created ON runs (created_at, run_id);
CREATE INDEX runs_by_workflow ON runs (workflow, created_at, run_id);
CREATE INDEX runs_by_status ON runs (status, created_at, run_id);
CREATE INDEX runs_by_workflow_id ON runs (workflow_id, created_at, run_id)
    WHERE workflow_id IS NOT NULL;
CREATE UNIQUE INDEX runs_open_workflow_id ON runs (workflow, workflow_id)
    WHERE workflow_id IS NOT NULL
      AND status NOT IN ('succeeded', 'failed', 'compensated', 'cancelled');
-- Recovery reads open runs only; this index stays as small as the open set.
CREATE INDEX runs_open ON runs (created_at, run_id)
    WHERE status NOT IN ('succeeded', 'failed', 'compensated', 'cancelled');

CREATE TABLE steps (
    run_id      TEXT NOT NULL,
    key         TEXT NOT NULL,
    step_id     TEXT NOT NULL,
    status      TEXT NOT NULL,
    attempt     INTEGER NOT NULL,
    started_at  REAL,
    finished_at REAL,
    data        BLOB NOT NULL,
    UNIQUE (run_id, key)
);

CREATE TABLE history (
    run_id TEXT NOT NULL,
    seq    INTEGER NOT NULL,
    at     REAL NOT NULL,
    type   TEXT NOT NULL,
    key    TEXT,
    data   BLOB NOT NULL,
    PRIMARY KEY (run_id, seq)
) WITHOUT ROWID;

CREATE TABLE timers (
    run_id   TEXT NOT NULL,
    timer_id TEXT NOT NULL,
    fire_at  REAL NOT NULL,
    PRIMARY KEY (run_id, timer_id)
) WITHOUT ROWID;

CREATE INDEX timers_by_fire_at ON timers (fire_at);

CREATE TABLE definitions (
    def_hash   TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    version    TEXT NOT NULL,
    source     BLOB NOT NULL,
    created_at REAL NOT NULL
);

CREATE INDEX definitions_by_name ON definitions (name, created_at);
