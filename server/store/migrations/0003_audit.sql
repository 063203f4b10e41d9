-- Baton schema 3: the audit log.
--
-- One row per mutating API call (who, what, when, from where, outcome) and per
-- definition or schedule change. Rows are only ever appended; `id` orders them
-- and pages them (newest first, `before_id`).

CREATE TABLE audit (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    at          REAL NOT NULL,
    actor       TEXT NOT NULL,      -- token name, anonymous, hook:<path>, approval-link, system
    action      TEXT NOT NULL,      -- the operation, e.g. start_run
    target      TEXT,               -- the run, workflow, hook ... acted on
    remote      TEXT,               -- the caller's address
    status      INTEGER,            -- the HTTP status answered
    request_id  TEXT,
    detail      BLOB                -- JSON object
);

CREATE INDEX audit_by_at ON audit (at);
