-- precall schema, version 2: the live-call push of Twilio calls (TWILIO_HOLD_MODE=poll).
-- A call is pushed on with Twilio's REST API at most once, by whichever node claims it first:
-- `UPDATE calls SET pushed_at = … WHERE call_id = … AND pushed_at IS NULL`.

ALTER TABLE calls ADD COLUMN IF NOT EXISTS pushed_at TIMESTAMPTZ;
-- The calls holding on a clone job (told at once when it finishes): few per job, no scan.
CREATE INDEX IF NOT EXISTS calls_holding_by_job ON calls (clone_job_id)
    WHERE status IN ('ringing', 'holding');
