-- Initial schema for the PostgreSQL backend.
-- Times are TIMESTAMPTZ; ids are UUID v7; lists and maps are JSONB.

CREATE TABLE pipelines (
    name            TEXT PRIMARY KEY,
    description     TEXT,
    yaml            TEXT NOT NULL,
    definition      JSONB NOT NULL,
    next_run_number BIGINT NOT NULL DEFAULT 1,
    created_at      TIMESTAMPTZ NOT NULL,
    updated_at      TIMESTAMPTZ NOT NULL
);

CREATE TABLE runs (
    id          UUID PRIMARY KEY,
    pipeline    TEXT NOT NULL,
    number      BIGINT NOT NULL,
    status      TEXT NOT NULL,
    trigger     JSONB NOT NULL,
    variables   JSONB NOT NULL DEFAULT '{}',
    created_at  TIMESTAMPTZ NOT NULL,
    started_at  TIMESTAMPTZ,
    finished_at TIMESTAMPTZ,
    UNIQUE (pipeline, number)
);
CREATE INDEX runs_pipeline ON runs (pipeline, id);
CREATE INDEX runs_status ON runs (status, id);

CREATE TABLE jobs (
    id               UUID PRIMARY KEY,
    run_id           UUID NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    pipeline         TEXT NOT NULL,
    name             TEXT NOT NULL,
    position         INTEGER NOT NULL,
    status           TEXT NOT NULL,
    runs_on          JSONB NOT NULL DEFAULT '[]',
    needs            JSONB NOT NULL DEFAULT '[]',
    cluster          TEXT,
    environment      TEXT,
    timeout_secs     BIGINT NOT NULL,
    spec             JSONB NOT NULL,
    runner_id        UUID,
    lease_token_hash TEXT,
    lease_expires_at TIMESTAMPTZ,
    heartbeat_seen   BOOLEAN NOT NULL DEFAULT FALSE,
    attempt          BIGINT NOT NULL DEFAULT 0,
    cancel_requested BOOLEAN NOT NULL DEFAULT FALSE,
    exit_code        INTEGER,
    log_size         BIGINT NOT NULL DEFAULT 0,
    created_at       TIMESTAMPTZ NOT NULL,
    queued_at        TIMESTAMPTZ,
    started_at       TIMESTAMPTZ,
    finished_at      TIMESTAMPTZ
);
CREATE INDEX jobs_run ON jobs (run_id, position);
CREATE INDEX jobs_queue ON jobs (status, queued_at, id);
CREATE INDEX jobs_lease ON jobs (status, lease_expires_at);
CREATE INDEX jobs_runner ON jobs (runner_id, status);

CREATE TABLE steps (
    job_id      UUID NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    idx         INTEGER NOT NULL,
    name        TEXT NOT NULL,
    kind        TEXT NOT NULL,
    status      TEXT NOT NULL,
    exit_code   INTEGER,
    started_at  TIMESTAMPTZ,
    finished_at TIMESTAMPTZ,
    log_start   BIGINT,
    log_end     BIGINT,
    PRIMARY KEY (job_id, idx)
);

CREATE TABLE log_chunks (
    job_id       UUID NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    start_offset BIGINT NOT NULL,
    end_offset   BIGINT NOT NULL,
    data         BYTEA NOT NULL,
    PRIMARY KEY (job_id, start_offset)
);

CREATE TABLE runners (
    id           UUID PRIMARY KEY,
    name         TEXT NOT NULL,
    labels       JSONB NOT NULL DEFAULT '[]',
    pool         TEXT NOT NULL,
    version      TEXT NOT NULL DEFAULT '',
    os           TEXT NOT NULL DEFAULT '',
    arch         TEXT NOT NULL DEFAULT '',
    token_hash   TEXT NOT NULL UNIQUE,
    draining     BOOLEAN NOT NULL DEFAULT FALSE,
    created_at   TIMESTAMPTZ NOT NULL,
    last_seen_at TIMESTAMPTZ
);

CREATE TABLE api_tokens (
    id           UUID PRIMARY KEY,
    name         TEXT NOT NULL,
    scope        TEXT NOT NULL,
    token_hash   TEXT NOT NULL UNIQUE,
    created_at   TIMESTAMPTZ NOT NULL,
    expires_at   TIMESTAMPTZ,
    revoked_at   TIMESTAMPTZ,
    last_used_at TIMESTAMPTZ
);

CREATE TABLE registration_tokens (
    id         UUID PRIMARY KEY,
    pool       TEXT NOT NULL,
    token_hash TEXT NOT NULL UNIQUE,
    created_at TIMESTAMPTZ NOT NULL,
    expires_at TIMESTAMPTZ,
    revoked_at TIMESTAMPTZ
);

CREATE TABLE audit_events (
    id         UUID PRIMARY KEY,
    actor      TEXT NOT NULL,
    action     TEXT NOT NULL,
    object     TEXT NOT NULL,
    detail     JSONB NOT NULL DEFAULT '{}',
    created_at TIMESTAMPTZ NOT NULL
);
CREATE INDEX audit_events_created ON audit_events (created_at);
