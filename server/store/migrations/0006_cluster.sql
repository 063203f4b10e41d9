-- Baton schema 6: several replicas on one database.
--
-- * runs.rev: the row's revision, bumped by every write. A replica writes a run
--   only over the revision it read, so two replicas deciding the same run cannot
--   both commit: the second gets Stale and re-reads.
-- * leases: one row per named lease (e.g. the scheduler's leader). The holder
--   renews it before expires_at; another may take it once expired. token grows
--   by one at each change of holder and fences the holder's batches: a batch of
--   a leader that lost its lease (paused, partitioned) is refused. Released
--   leases are expired, not deleted, so tokens never repeat.

ALTER TABLE runs ADD COLUMN rev INTEGER NOT NULL DEFAULT 0;

CREATE TABLE leases (
    name       TEXT PRIMARY KEY,
    holder     TEXT NOT NULL,
    token      INTEGER NOT NULL,
    expires_at REAL NOT NULL
) WITHOUT ROWID;
