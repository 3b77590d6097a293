-- Initial schema for the embedded SQLite backend.
-- Times are bound from Rust as RFC 3339 text; ids are UUID v7 as 16-byte blobs; lists and maps are JSON text.

CREATE TABLE pipelines (
    name            TEXT PRIMARY KEY,
    description     TEXT,
    yaml            TEXT NOT NULL,
    definition      TEXT NOT NULL,
    next_run_number INTEGER NOT NULL DEFAULT 1,
    created_at      TEXT NOT NULL,
    updated_at      TEXT NOT NULL
);

CREATE TABLE runs (
    id          BLOB PRIMARY KEY,
    pipeline    TEXT NOT NULL,
    number      INTEGER NOT NULL,
    status      TEXT NOT NULL,
    trigger     TEXT NOT NULL,
    variables   TEXT NOT NULL DEFAULT '{}',
    created_at  TEXT NOT NULL,
    started_at  TEXT,
    finished_at TEXT,
    UNIQUE (pipeline, number)
);
CREATE INDEX runs_pipeline ON runs (pipeline, id);
CREATE INDEX runs_status ON runs (status, id);

CREATE TABLE jobs (
    id               BLOB PRIMARY KEY,
    run_id           BLOB NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    pipeline         TEXT NOT NULL,
    name             TEXT NOT NULL,
    position         INTEGER NOT NULL,
    status           TEXT NOT NULL,
    runs_on          TEXT NOT NULL DEFAULT '[]',
    needs            TEXT NOT NULL DEFAULT '[]',
    cluster          TEXT,
    environment      TEXT,
    timeout_secs     INTEGER NOT NULL,
    spec             TEXT NOT NULL,
    runner_id        BLOB,
    lease_token_hash TEXT,
    lease_expires_at TEXT,
    heartbeat_seen   BOOLEAN NOT NULL DEFAULT FALSE,
    attempt          INTEGER NOT NULL DEFAULT 0,
    cancel_requested BOOLEAN NOT NULL DEFAULT FALSE,
    exit_code        INTEGER,
    log_size         INTEGER NOT NULL DEFAULT 0,
    created_at       TEXT NOT NULL,
    queued_at        TEXT,
    started_at       TEXT,
    finished_at      TEXT
);
CREATE INDEX jobs_run ON jobs (run_id, position);
CREATE INDEX jobs_queue ON jobs (status, queued_at, id);
CREATE INDEX jobs_lease ON jobs (status, lease_expires_at);
CREATE INDEX jobs_runner ON jobs (runner_id, status);

CREATE TABLE steps (
    job_id      BLOB NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    idx         INTEGER NOT NULL,
    name        TEXT NOT NULL,
    kind        TEXT NOT NULL,
    status      TEXT NOT NULL,
    exit_code   INTEGER,
    started_at  TEXT,
    finished_at TEXT,
    log_start   INTEGER,
    log_end     INTEGER,
    PRIMARY KEY (job_id, idx)
);

CREATE TABLE log_chunks (
    job_id       BLOB NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    start_offset INTEGER NOT NULL,
    end_offset   INTEGER NOT NULL,
    data         BLOB NOT NULL,
    PRIMARY KEY (job_id, start_offset)
);

CREATE TABLE runners (
    id           BLOB PRIMARY KEY,
    name         TEXT NOT NULL,
    labels       TEXT NOT NULL DEFAULT '[]',
    pool         TEXT NOT NULL,
    version      TEXT NOT NULL DEFAULT '',
    os           TEXT NOT NULL DEFAULT '',
    arch         TEXT NOT NULL DEFAULT '',
    token_hash   TEXT NOT NULL UNIQUE,
    draining     BOOLEAN NOT NULL DEFAULT FALSE,
    created_at   TEXT NOT NULL,
    last_seen_at TEXT
);

CREATE TABLE api_tokens (
    id           BLOB PRIMARY KEY,
    name         TEXT NOT NULL,
    scope        TEXT NOT NULL,
    token_hash   TEXT NOT NULL UNIQUE,
    created_at   TEXT NOT NULL,
    expires_at   TEXT,
    revoked_at   TEXT,
    last_used_at TEXT
);

CREATE TABLE registration_tokens (
    id         BLOB PRIMARY KEY,
    pool       TEXT NOT NULL,
    token_hash TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL,
    expires_at TEXT,
    revoked_at TEXT
);

CREATE TABLE audit_events (
    id         BLOB PRIMARY KEY,
    actor      TEXT NOT NULL,
    action     TEXT NOT NULL,
    object     TEXT NOT NULL,
    detail     TEXT NOT NULL DEFAULT '{}',
    created_at TEXT NOT NULL
);
CREATE INDEX audit_events_created ON audit_events (created_at);
