-- Baton schema 4: human approvals.
--
-- One row per approval step attempt waiting for a person. The link that decides
-- it carries a signed token naming the row; the row, not the token, says whether
-- it was already decided (single use) and until when it may be.

CREATE TABLE approvals (
    id           TEXT PRIMARY KEY,  -- <run_id>:<step key>:<attempt>
    run_id       TEXT NOT NULL,
    key          TEXT NOT NULL,
    step_id      TEXT NOT NULL,
    status       TEXT NOT NULL,     -- pending | approved | rejected | expired | cancelled
    requested_at REAL NOT NULL,
    expires_at   REAL,
    decided_at   REAL,
    decided_by   TEXT,
    comment      TEXT,
    data         BLOB NOT NULL      -- JSON: workflow, message, approvers, started_by ...
) WITHOUT ROWID;

CREATE INDEX approvals_by_status ON approvals (status, requested_at);
CREATE INDEX approvals_by_run ON approvals (run_id);
