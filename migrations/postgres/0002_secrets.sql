-- The secret store. Values are encrypted with XChaCha20-Poly1305 under a key from configuration;
-- the plaintext is never stored. `pipeline` is '' for a global secret, else the pipeline it is for.

CREATE TABLE secrets (
    name       TEXT NOT NULL,
    pipeline   TEXT NOT NULL DEFAULT '',
    nonce      BYTEA NOT NULL,
    ciphertext BYTEA NOT NULL,
    created_at TIMESTAMPTZ NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (name, pipeline)
);

-- One row: a known plaintext encrypted with the key, written when the first secret is stored,
-- so that a server started with another key (or none) refuses to start.
CREATE TABLE secret_keycheck (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    nonce      BYTEA NOT NULL,
    ciphertext BYTEA NOT NULL,
    created_at TIMESTAMPTZ NOT NULL
);
