-- precall schema, version 3: clone job leases, backoff after failures, voice deletion.
-- The node running a job holds a lease it renews (lease_owner, lease_until); a processing job
-- whose lease lapsed (or that never had one: jobs from before this version) is taken over by
-- the next claim or by any node's sweep. A failed job serves its failure until retry_at; its
-- attempt number doubles the backoff. voice_deleted_at marks a voice deleted at the provider;
-- checked_at, the last time the provider confirmed it exists.

ALTER TABLE clone_jobs ADD COLUMN IF NOT EXISTS lease_owner TEXT;
ALTER TABLE clone_jobs ADD COLUMN IF NOT EXISTS lease_until TIMESTAMPTZ;
ALTER TABLE clone_jobs ADD COLUMN IF NOT EXISTS attempt INTEGER NOT NULL DEFAULT 1;
ALTER TABLE clone_jobs ADD COLUMN IF NOT EXISTS permanent BOOLEAN NOT NULL DEFAULT false;
ALTER TABLE clone_jobs ADD COLUMN IF NOT EXISTS retry_at TIMESTAMPTZ;
ALTER TABLE clone_jobs ADD COLUMN IF NOT EXISTS voice_deleted_at TIMESTAMPTZ;
-- When the provider last confirmed the voice exists (GET /v1/voices/{id}).
ALTER TABLE clone_jobs ADD COLUMN IF NOT EXISTS checked_at TIMESTAMPTZ;
-- A profile's current sample set (VoiceProfile::samples_hash, written at every upsert): only
-- the newest completed job of that set speaks for the profile; older voices are unused.
ALTER TABLE voice_profiles ADD COLUMN IF NOT EXISTS samples_hash TEXT;
-- The sweep for lapsed leases reads only processing jobs.
CREATE INDEX IF NOT EXISTS clone_jobs_processing ON clone_jobs (lease_until, id)
    WHERE status = 'processing';
-- The search for unused voices reads only completed jobs with a live voice.
CREATE INDEX IF NOT EXISTS clone_jobs_live_voices ON clone_jobs (profile_id, id)
    WHERE status = 'completed' AND voice_deleted_at IS NULL;
-- Calls still on a job (waiting on it or connected to its voice): a voice with one is in use.
-- It also serves the calls waiting on a finished job, so the narrower index of version 2 goes.
CREATE INDEX IF NOT EXISTS calls_live_by_job ON calls (clone_job_id)
    WHERE status IN ('ringing', 'holding', 'connected');
DROP INDEX IF EXISTS calls_holding_by_job;
-- Jobs left processing by nodes from before leases were abandoned (nothing ran them after
-- their node stopped): fail them rather than have the first sweep run them all again at the
-- provider. A job started in the last ten minutes may still be running on a node of the old
-- version during a rolling upgrade: it stays, and is taken over like a lapsed one.
UPDATE clone_jobs SET status = 'failed', finished_at = now(),
    error = 'abandoned before clone job leases (precall upgrade)'
    WHERE status = 'processing' AND lease_until IS NULL
    AND started_at < now() - interval '10 minutes';
