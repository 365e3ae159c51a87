-- precall schema, version 1: voice profiles, clone jobs, calls and their events.
-- Applied in order at start (see control/src/store/migrate.rs); every statement is idempotent.

CREATE TABLE IF NOT EXISTS voice_profiles (
    id            TEXT PRIMARY KEY,
    number        TEXT UNIQUE,                 -- normalized dialed number; NULL = default-only
    name          TEXT NOT NULL,
    sample_urls   TEXT[] NOT NULL DEFAULT '{}',
    agent_id      TEXT,
    greeting_url  TEXT,
    hold_url      TEXT,
    first_message TEXT,
    updated_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS clone_jobs (
    id           BIGSERIAL PRIMARY KEY,
    profile_id   TEXT NOT NULL,
    samples_hash TEXT NOT NULL,
    status       TEXT NOT NULL CHECK (status IN ('processing', 'completed', 'failed')),
    voice_id     TEXT,
    error        TEXT,
    started_at   TIMESTAMPTZ NOT NULL,
    finished_at  TIMESTAMPTZ
);
CREATE INDEX IF NOT EXISTS clone_jobs_by_samples ON clone_jobs (profile_id, samples_hash, id DESC);

CREATE TABLE IF NOT EXISTS calls (
    call_id          TEXT PRIMARY KEY,
    session_id       TEXT NOT NULL DEFAULT '',
    protocol         TEXT NOT NULL CHECK (protocol IN ('twilio', 'sip')),
    caller_number    TEXT NOT NULL,
    recipient_number TEXT NOT NULL,
    profile_id       TEXT NOT NULL,
    clone_job_id     BIGINT REFERENCES clone_jobs (id),
    status           TEXT NOT NULL,
    started_at       TIMESTAMPTZ NOT NULL,
    connected_at     TIMESTAMPTZ,
    ended_at         TIMESTAMPTZ,
    failure          TEXT,
    end_reason       TEXT
);
CREATE INDEX IF NOT EXISTS calls_by_start ON calls (started_at);

CREATE TABLE IF NOT EXISTS call_events (
    id      BIGSERIAL PRIMARY KEY,
    call_id TEXT NOT NULL,
    at      TIMESTAMPTZ NOT NULL,
    kind    TEXT NOT NULL,
    detail  TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS call_events_by_call ON call_events (call_id, id);
