-- Baton schema 5: schedules (cron and interval triggers) and their fire records.
--
-- `schedules` holds one row per schedule name: where it stands (the next nominal
-- fire, the last one handled), whether an operator paused it, and the fires held
-- back by `overlap: queue`. It is committed after the runs a fire starts; a crash
-- in between fires that tick again after the restart, and the run id the tick
-- derives finds the run already started (server/triggers/scheduler.py).
--
-- `schedule_fires` is the schedule's own history: every fire that started a run
-- or was skipped, with the reason (a calendar, the missed-fire policy, the
-- overlap policy, a pause). Pages by id per schedule, newest first; old rows are
-- pruned per schedule (settings.schedules.keep_fires).

CREATE TABLE schedules (
    name          TEXT PRIMARY KEY,
    workflow      TEXT NOT NULL,
    spec_hash     TEXT NOT NULL,     -- changes when the fire times would: next_at is recomputed
    next_at       REAL,              -- the next nominal fire; NULL once the schedule has ended
    paused        INTEGER NOT NULL DEFAULT 0,
    paused_by     TEXT,
    paused_at     REAL,
    pause_note    TEXT,
    last_fire_at  REAL,              -- nominal time of the last fire handled
    last_run_id   TEXT,              -- the run the last started fire made (overlap checks it)
    last_outcome  TEXT,
    queued        BLOB NOT NULL,     -- JSON [nominal fire times] held back by overlap: queue
    updated_at    REAL NOT NULL
);

CREATE TABLE schedule_fires (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    schedule      TEXT NOT NULL,
    scheduled_at  REAL NOT NULL,     -- the nominal fire time
    fired_at      REAL NOT NULL,     -- when Baton handled it
    outcome       TEXT NOT NULL,     -- started | skipped | queued | failed
    reason        TEXT,
    run_id        TEXT,
    missed        INTEGER NOT NULL,  -- 1: handled after Baton was down or stalled
    manual        INTEGER NOT NULL,  -- 1: `baton schedules run` / POST .../run
    count         INTEGER NOT NULL,  -- >1: one record standing for that many skipped fires
    actor         TEXT               -- who, for manual fires
);

CREATE INDEX schedule_fires_by_schedule ON schedule_fires (schedule, id);
