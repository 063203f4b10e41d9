-- Baton schema 4: human approvals.
--
-- One row per approval request: a step instance entered for the n-th time. The
-- link that decides it carries a signed token naming the row; the row, not the
-- token, says whether it was already decided (single use). Rows are written in
-- the same transaction as the run transition that opened or closed them.

CREATE TABLE approvals (
    id           TEXT PRIMARY KEY,  -- <run_id>:<step key>:<attempt>
    run_id       TEXT NOT NULL,
    key          TEXT NOT NULL,
    step_id      TEXT NOT NULL,
    status       TEXT NOT NULL,     -- pending | approved | rejected | expired | cancelled
    requested_at REAL NOT NULL,
    expires_at   REAL,              -- the step's approval timeout, if it has one
    decided_at   REAL,              -- when it left pending (decided, timed out, cancelled)
    decided_by   TEXT,              -- a token name, the name a link holder typed, or NULL
    decided_via  TEXT,              -- token | link | api | timeout
    comment      TEXT,
    data         BLOB NOT NULL      -- JSON: workflow, version, message, approvers, started_by, link_expires_at ...
) WITHOUT ROWID;

CREATE INDEX approvals_by_status ON approvals (status, requested_at, id);
CREATE INDEX approvals_by_run ON approvals (run_id);
