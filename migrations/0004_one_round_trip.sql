-- precall schema, version 4: the controller's steps in one round trip each.
--
-- precall_inbound is an inbound call's whole first step (choose its profile, record the call
-- and its event, claim its clone job, attach the job, record that); precall_claim_job is the
-- job claim alone. Each runs as one statement, so one round trip and one commit, where the
-- step took six to eleven statements before. Both apply precall_claim_decision, the rule of
-- claim_decision in control/controller/src/store.rs said in SQL: the store suite
-- (tests/store_suite.rs) holds the in-memory store (which runs the Rust rule) and PostgreSQL
-- (which runs these) to the same cases.

-- Every call of a profile points at the same job row, and the foreign key's check locked that
-- row (FOR KEY SHARE) in each call's transaction: concurrent calls of one profile each wrote a
-- MultiXact and a WAL record to one hot row (measured, docs/PERFORMANCE.md). Jobs are never
-- deleted, so the key guarded nothing a precall node does; it goes.
ALTER TABLE calls DROP CONSTRAINT IF EXISTS calls_clone_job_id_fkey;

-- VoiceProfile::samples_hash in SQL: SHA-256 over each URL's length (8 bytes, big-endian)
-- followed by its bytes, in lower-case hex.
CREATE OR REPLACE FUNCTION precall_samples_hash(urls TEXT[]) RETURNS TEXT
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
DECLARE
    acc BYTEA := ''::BYTEA;
    u TEXT;
BEGIN
    FOREACH u IN ARRAY urls LOOP
        acc := acc || int8send(octet_length(u)::BIGINT) || convert_to(u, 'UTF8');
    END LOOP;
    RETURN encode(sha256(acc), 'hex');
END
$$;

-- Profiles saved before version 3 have no samples_hash (they protected all their voices from
-- deletion); from now on every one has it.
UPDATE voice_profiles SET samples_hash = precall_samples_hash(sample_urls)
    WHERE samples_hash IS NULL;

-- What a claim does with the newest job of a sample set ('serve', 'take_over' or 'create'):
-- claim_decision. PL/pgSQL, not SQL (here and for the hash): a SQL function that is not
-- inlined is parsed and planned at every call (measured: the parser was the top of the
-- profile), PL/pgSQL caches its plans per connection.
CREATE OR REPLACE FUNCTION precall_claim_decision(job clone_jobs, now_ TIMESTAMPTZ) RETURNS TEXT
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
BEGIN
    IF job.id IS NULL THEN
        RETURN 'create';
    ELSIF job.status = 'completed' THEN
        RETURN CASE WHEN job.voice_deleted_at IS NULL THEN 'serve' ELSE 'create' END;
    ELSIF job.status = 'processing' THEN
        RETURN CASE WHEN job.lease_until IS NULL OR job.lease_until <= now_ THEN 'take_over'
                    ELSE 'serve' END;
    -- failed: serves its failure while it backs off
    ELSIF job.retry_at > now_ THEN
        RETURN 'serve';
    END IF;
    RETURN 'create';
END
$$;

-- Store::claim_clone_job: the job serving (profile_, hash_), taken over or created (leased to
-- owner_ until until_) when none serves; created is true when this claim made or took it.
-- wait_ false (a batch of inbound calls): when another transaction holds the sample set's
-- lock, nothing is done and contended is true; the caller sends that request again alone.
-- A batch holds the locks it took until it commits, so two batches that waited for each
-- other's sample sets would deadlock.
CREATE OR REPLACE FUNCTION precall_claim_job(
    profile_ TEXT, hash_ TEXT, now_ TIMESTAMPTZ, owner_ TEXT, until_ TIMESTAMPTZ,
    wait_ BOOLEAN,
    OUT job_row clone_jobs, OUT created BOOLEAN, OUT contended BOOLEAN)
LANGUAGE plpgsql AS $$
DECLARE
    decision TEXT;
    newest BIGINT;
    key BIGINT := hashtextextended(profile_ || '/' || hash_, 0);
BEGIN
    created := false;
    contended := false;
    -- Most calls find a serving job: read it without the lock, so that the calls of one
    -- profile do not queue on the advisory lock (measured: they did, docs/PERFORMANCE.md).
    SELECT * INTO job_row FROM clone_jobs
        WHERE profile_id = profile_ AND samples_hash = hash_ ORDER BY id DESC LIMIT 1;
    IF precall_claim_decision(job_row, now_) = 'serve' THEN
        RETURN;
    END IF;
    -- The key of the nodes before version 4 too, so that they take turns with these.
    IF wait_ THEN
        PERFORM pg_advisory_xact_lock(key);
    ELSIF NOT pg_try_advisory_xact_lock(key) THEN
        job_row := NULL;
        contended := true;
        RETURN;
    END IF;
    -- Again under the lock (a statement of its own, so a fresh snapshot): another node may
    -- have created or taken it meanwhile.
    SELECT * INTO job_row FROM clone_jobs
        WHERE profile_id = profile_ AND samples_hash = hash_ ORDER BY id DESC LIMIT 1;
    decision := precall_claim_decision(job_row, now_);
    IF decision = 'take_over' THEN
        newest := job_row.id;
        -- Conditional: a sweep (not under this lock) may have taken it first.
        UPDATE clone_jobs SET lease_owner = owner_, lease_until = until_, started_at = now_
            WHERE id = newest AND status = 'processing'
            AND (lease_until IS NULL OR lease_until <= now_)
            RETURNING * INTO job_row;
        IF FOUND THEN
            created := true;
        ELSE
            SELECT * INTO job_row FROM clone_jobs WHERE id = newest;
        END IF;
    ELSIF decision = 'create' THEN
        INSERT INTO clone_jobs (profile_id, samples_hash, status, started_at, lease_owner,
                                lease_until, attempt)
            VALUES (profile_, hash_, 'processing', now_, owner_, until_,
                    CASE WHEN job_row.status = 'failed' THEN job_row.attempt + 1 ELSE 1 END)
            RETURNING * INTO job_row;
        created := true;
    END IF;
END
$$;

-- Store::record_inbound: an inbound call's first step. The call's profile is the one number_
-- selects, else fallback_; a call already recorded (a retried webhook, a retransmitted INVITE,
-- another node) is kept as it is, with its own profile. Events: inbound (at arrived_) or
-- duplicate_inbound (at now_), then, when a waiting call gets its job, clone_started,
-- clone_reused or clone_joined with the job ('job-<id>'). The call is recorded as
-- CallRecord::inbound makes it (no job, no times but its start, no failure or end).
--
-- A new call claims its job first and is inserted with it: one write of the call row and one
-- of its events (measured: inserting and then attaching cost a second row version and its
-- index entries, docs/PERFORMANCE.md). wait_ is precall_claim_job's: false in a batch, where
-- a claim that would wait for another transaction's lock returns contended (nothing written)
-- for the caller to send again alone. No deadlock between single calls: one takes the
-- sample set's lock (the claim's slow path) before it writes a call row, and never waits for
-- it after writing one (the repeat's claim below takes the lock it may already hold: advisory
-- locks are re-entrant in a transaction); batches never wait for a lock.
CREATE OR REPLACE FUNCTION precall_inbound(
    call_id_ TEXT, session_id_ TEXT, protocol_ TEXT, caller_ TEXT, recipient_ TEXT,
    status_ TEXT, arrived_ TIMESTAMPTZ, number_ TEXT, fallback_ TEXT, now_ TIMESTAMPTZ,
    owner_ TEXT, until_ TIMESTAMPTZ, wait_ BOOLEAN,
    OUT first_seen BOOLEAN, OUT created BOOLEAN, OUT contended BOOLEAN, OUT call_row calls,
    OUT job_row clone_jobs, OUT profile_row voice_profiles)
LANGUAGE plpgsql AS $$
DECLARE
    found_row RECORD;
    claim RECORD;
    claimed BIGINT;
    claim_kind TEXT;
BEGIN
    created := false;
    contended := false;
    -- One statement: the profile (the number's own sorts first, the fallback second), the
    -- newest job of its samples (hashed here from the URLs, as the Rust side hashes them),
    -- and whether the call is recorded already.
    SELECT p AS profile_row, j AS job_row, p_hash,
           EXISTS (SELECT 1 FROM calls WHERE call_id = call_id_) AS seen
        INTO found_row
        FROM (SELECT 1) AS one
        LEFT JOIN LATERAL (
            SELECT * FROM voice_profiles
            WHERE (number = number_ AND number_ <> '') OR id = fallback_
            ORDER BY (number IS NOT DISTINCT FROM number_) DESC LIMIT 1) AS p ON true
        LEFT JOIN LATERAL (SELECT precall_samples_hash(p.sample_urls) AS p_hash) AS h ON true
        LEFT JOIN LATERAL (
            SELECT * FROM clone_jobs
            WHERE profile_id = p.id AND samples_hash = h.p_hash
            ORDER BY id DESC LIMIT 1) AS j ON true;
    profile_row := found_row.profile_row;
    first_seen := NOT found_row.seen;

    IF first_seen THEN
        IF profile_row.id IS NOT NULL AND status_ IN ('ringing', 'holding') THEN
            job_row := found_row.job_row;
            -- The fast path of precall_claim_job, read above: most calls find a serving job.
            IF precall_claim_decision(job_row, now_) <> 'serve' THEN
                SELECT * INTO claim FROM precall_claim_job(
                    profile_row.id, found_row.p_hash, now_, owner_, until_, wait_);
                IF claim.contended THEN
                    contended := true;
                    job_row := NULL;
                    RETURN;
                END IF;
                job_row := claim.job_row;
                created := claim.created;
            END IF;
        END IF;
        -- One statement: the call with its job, and its events.
        WITH recorded AS (
            INSERT INTO calls (call_id, session_id, protocol, caller_number, recipient_number,
                               profile_id, clone_job_id, status, started_at)
            VALUES (call_id_, session_id_, protocol_, caller_, recipient_,
                    COALESCE(profile_row.id, fallback_), job_row.id, status_, arrived_)
            ON CONFLICT (call_id) DO NOTHING
            RETURNING *),
        logged AS (
            INSERT INTO call_events (call_id, at, kind, detail)
            SELECT r.call_id, e.at, e.kind, e.detail
            FROM recorded AS r CROSS JOIN LATERAL (VALUES
                (1, arrived_, 'inbound', r.profile_id),
                (2, now_,
                 CASE WHEN created THEN 'clone_started'
                      WHEN job_row.status = 'completed' THEN 'clone_reused'
                      ELSE 'clone_joined' END,
                 'job-' || job_row.id)) AS e (n, at, kind, detail)
            WHERE e.n = 1 OR job_row.id IS NOT NULL
            ORDER BY e.n)
        SELECT * INTO call_row FROM recorded;
        first_seen := FOUND;
        IF first_seen THEN
            RETURN;
        END IF;
        -- Another request recorded the call meanwhile: answered below as a repeat.
    END IF;

    -- A repeat.
    claimed := CASE WHEN created THEN job_row.id END;
    SELECT * INTO call_row FROM calls WHERE call_id = call_id_;
    IF profile_row.id IS DISTINCT FROM call_row.profile_id THEN
        SELECT * INTO profile_row FROM voice_profiles WHERE id = call_row.profile_id;
    END IF;
    job_row := NULL;
    created := false;
    claim_kind := NULL;
    IF call_row.clone_job_id IS NOT NULL THEN
        SELECT * INTO job_row FROM clone_jobs WHERE id = call_row.clone_job_id;
        -- This request lost the race to record the call after it made or took over the job
        -- the call waits on: it runs it. (A job made for nothing is run by a sweep once its
        -- lease lapses.)
        created := job_row.id = claimed;
    -- Only a call still waiting claims a clone: a retried webhook for a call that failed or
    -- connected meanwhile starts nothing.
    ELSIF profile_row.id IS NOT NULL AND call_row.status IN ('ringing', 'holding') THEN
        SELECT * INTO claim FROM precall_claim_job(
            profile_row.id, precall_samples_hash(profile_row.sample_urls), now_, owner_,
            until_, wait_);
        IF claim.contended THEN
            contended := true;
            RETURN;
        END IF;
        job_row := claim.job_row;
        created := claim.created OR job_row.id = claimed;
        UPDATE calls SET clone_job_id = job_row.id WHERE call_id = call_id_
            RETURNING * INTO call_row;
        claim_kind := CASE WHEN created THEN 'clone_started'
                           WHEN job_row.status = 'completed' THEN 'clone_reused'
                           ELSE 'clone_joined' END;
    END IF;
    INSERT INTO call_events (call_id, at, kind, detail)
        SELECT call_id_, now_, e.kind, e.detail
        FROM (VALUES (1, 'duplicate_inbound', ''), (2, claim_kind, 'job-' || job_row.id))
             AS e (n, kind, detail)
        WHERE e.n = 1 OR claim_kind IS NOT NULL
        ORDER BY e.n;
    created := COALESCE(created, false);
END
$$;
