-- Webhook deliveries: every request to /hooks/* is recorded with its outcome.
-- `delivery_id` is the id the sender claimed (shown, never trusted); `dedupe_key` is set only once
-- the delivery's signature was verified, so an unsigned request cannot occupy a genuine delivery's
-- id. NULL keys never conflict, so unsigned, oversized and id-less deliveries are all kept.

CREATE TABLE webhook_deliveries (
    id          UUID PRIMARY KEY,
    source      TEXT NOT NULL,
    delivery_id TEXT,
    dedupe_key  TEXT,
    event       TEXT,
    pipeline    TEXT,
    outcome     TEXT NOT NULL,
    status_code INTEGER NOT NULL DEFAULT 0,
    reason      TEXT,
    run_ids     JSONB NOT NULL DEFAULT '[]',
    received_at TIMESTAMPTZ NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL,
    UNIQUE (source, dedupe_key)
);
CREATE INDEX webhook_deliveries_source ON webhook_deliveries (source, id);
