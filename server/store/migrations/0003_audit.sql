-- Baton schema 3: the audit log.
--
-- One row per mutating API call (who, what, when, from where, outcome) and per
-- definition or schedule change. Rows are only ever appended, in the same group
-- commit as everything else. `id` orders them and pages them (newest first,
-- `before_id`); AUTOINCREMENT keeps an id from ever being issued twice, so a
-- cursor stays valid even if old rows are pruned one day.
--
-- The list filters by actor or action and pages by id: those indexes end in id,
-- so a filtered page is a range scan, not a sort.

CREATE TABLE audit (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    at          REAL NOT NULL,
    actor       TEXT NOT NULL,      -- token name, unauthenticated, hook:<path>, system
    action      TEXT NOT NULL,      -- the operation, e.g. start_run, definition.loaded
    target      TEXT,               -- the run, workflow, hook ... acted on
    remote      TEXT,               -- the caller's address
    status      INTEGER,            -- the HTTP status answered
    request_id  TEXT,
    detail      BLOB NOT NULL       -- JSON object
);

CREATE INDEX audit_by_at ON audit (at);
CREATE INDEX audit_by_actor ON audit (actor, id);
CREATE INDEX audit_by_action ON audit (action, id);
