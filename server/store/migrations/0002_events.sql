-- Baton schema 2: what NATS needs from the store.
--
-- * events: one row per trigger event handled (its dedupe key), written after
--   the runs it started are committed and before the message is acknowledged.
--   A redelivered or republished event finds its row and starts nothing. Rows
--   older than the dedupe window are pruned; the runs an event started keep
--   deduplicating it beyond that, because their run ids derive from its key.
-- * dead_letters: events that matched a trigger but could not start a run,
--   with the error and the original message, for `baton dlq` and replay.
-- * outbox: messages to publish after the transition that produced them is
--   committed (run and step lifecycle events, dead letters). The publisher
--   deletes a row once JetStream acknowledged it; a crash in between publishes
--   it again with the same Nats-Msg-Id, which the stream dedupes.

CREATE TABLE events (
    event_key   TEXT PRIMARY KEY,
    subject     TEXT NOT NULL,
    received_at REAL NOT NULL,
    outcome     TEXT NOT NULL,
    runs        BLOB NOT NULL
) WITHOUT ROWID;

CREATE INDEX events_by_received ON events (received_at);

CREATE TABLE dead_letters (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    at          REAL NOT NULL,
    subject     TEXT NOT NULL,
    event_key   TEXT,
    workflow    TEXT,
    error       TEXT NOT NULL,
    headers     BLOB NOT NULL,
    data        BLOB NOT NULL,
    replayed_at REAL,
    replay_run  TEXT
);

CREATE TABLE outbox (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    subject TEXT NOT NULL,
    msg_id  TEXT NOT NULL,
    headers BLOB NOT NULL,
    data    BLOB NOT NULL
);
