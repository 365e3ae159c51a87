//! The PostgreSQL store: `tokio-postgres` with a `deadpool` pool, on the side tokio runtime.
//!
//! Atomic steps map to single statements or short transactions:
//! * `insert_call` is `INSERT … ON CONFLICT DO NOTHING`, so a retried webhook or a retransmitted
//!   INVITE on any node records the call once;
//! * `claim_clone_job` takes a transaction-scoped advisory lock on (profile, samples), so two
//!   nodes never both create a job for one sample set;
//! * `set_call_status` is one conditional `UPDATE … WHERE status = ANY(legal predecessors)
//!   RETURNING`: the call's state machine ([`precall_api::CallStatus::can_become`]) enforced in
//!   the database, so two nodes can never flip a call back and forth, and the request that made
//!   a transition knows it did.

use std::time::{Duration, SystemTime};

use deadpool_postgres::{
    GenericClient, Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime,
};
use precall_api::{
    CallId, CallStatus, CloneStatus, JobId, ProfileId, Protocol, Timestamp, VoiceId,
};
use precall_controller::{
    CallEvent, CallRecord, ClaimDecision, CloneJob, EventKind, InsertCall, JobOutcome, Lease,
    StatusChange, Store, StoreError, VoiceProfile, claim_decision,
};
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row};

use super::migrate::migrate;

/// How to reach PostgreSQL.
#[derive(Clone, Debug)]
pub struct PgStoreConfig {
    /// `postgres://user:pass@host:port/db` or key=value form (`DATABASE_URL`).
    pub url: String,
    /// Connections in the pool (`DATABASE_POOL_SIZE`).
    pub pool_size: usize,
    /// Longest wait for a connection, new or pooled.
    pub connect_timeout: Duration,
}

/// The PostgreSQL [`Store`].
///
/// Built without a connection ([`PgStore::new`]): it answers `Unavailable` until
/// [`Store::prepare`] has reached the server and applied the migrations, so a node can start
/// (and say so on `/health`) while the database is still down.
#[derive(Clone)]
pub struct PgStore {
    pool: Pool,
    ready: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// A half-open connection (the server's host gone without a FIN) is found within this: TCP
/// keepalive probes an idle connection after `KEEPALIVE_IDLE`, every `KEEPALIVE_INTERVAL`,
/// `KEEPALIVE_RETRIES` times; data unacknowledged for `TCP_USER_TIMEOUT` fails the connection.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(5);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
const KEEPALIVE_RETRIES: u32 = 3;
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(5);
/// No statement runs longer on the server than this (`statement_timeout`): a request
/// waits for the controller `CONTROL_REQUEST_TIMEOUT_MS` at most anyway.
const STATEMENT_TIMEOUT_MS: u32 = 5_000;

/// Why the store does not serve yet.
#[derive(Debug, thiserror::Error)]
#[error("waiting for PostgreSQL: not reached and migrated yet")]
struct NotReady;

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.pool.status();
        f.debug_struct("PgStore").field("size", &s.size).field("available", &s.available).finish()
    }
}

fn unavailable(e: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::Unavailable(Box::new(e))
}

/// A query's error: the database being away (the connection closed, or SQLSTATE class 08
/// "connection exception", 53 "insufficient resources" such as too many connections, and 57
/// "operator intervention", which a server shutting down or restarting sends) is
/// `Unavailable`, worth waiting out; anything else is the query's own.
fn query(e: tokio_postgres::Error) -> StoreError {
    let away = e.code().is_some_and(|c| ["08", "53", "57"].iter().any(|k| c.code().starts_with(k)));
    let io = std::error::Error::source(&e).is_some_and(|s| s.is::<std::io::Error>());
    if e.is_closed() || away || io {
        StoreError::Unavailable(Box::new(e))
    } else {
        StoreError::Query(Box::new(e))
    }
}

fn pool_err(e: PoolError) -> StoreError {
    match e {
        PoolError::Backend(e) => query(e),
        other => unavailable(other),
    }
}

fn ts(t: SystemTime) -> Timestamp {
    Timestamp::from_system(t)
}

impl PgStore {
    /// Connects, checks the server answers, and applies pending migrations.
    pub async fn connect(cfg: &PgStoreConfig) -> Result<Self, StoreError> {
        let store = Self::new(cfg)?;
        store.prepare().await?;
        Ok(store)
    }

    /// The store over a pool that connects on first use; only a malformed URL fails here.
    pub fn new(cfg: &PgStoreConfig) -> Result<Self, StoreError> {
        let mut pg: tokio_postgres::Config = cfg.url.parse().map_err(query)?;
        pg.connect_timeout(cfg.connect_timeout);
        pg.application_name("precall");
        pg.keepalives(true)
            .keepalives_idle(KEEPALIVE_IDLE)
            .keepalives_interval(KEEPALIVE_INTERVAL)
            .keepalives_retries(KEEPALIVE_RETRIES)
            .tcp_user_timeout(TCP_USER_TIMEOUT);
        let options = pg.get_options().unwrap_or("").to_owned();
        pg.options(format!("{options} -c statement_timeout={STATEMENT_TIMEOUT_MS}").trim());
        let manager = Manager::from_config(
            pg,
            NoTls,
            ManagerConfig { recycling_method: RecyclingMethod::Fast },
        );
        let pool = Pool::builder(manager)
            .max_size(cfg.pool_size.max(1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(cfg.connect_timeout))
            .create_timeout(Some(cfg.connect_timeout))
            .recycle_timeout(Some(cfg.connect_timeout))
            .build()
            .map_err(unavailable)?;
        Ok(Self { pool, ready: Default::default() })
    }

    /// The pool's connections now: (open, in use, maximum).
    pub fn pool_use(&self) -> (usize, usize, usize) {
        let s = self.pool.status();
        (s.size, s.size.saturating_sub(s.available), s.max_size)
    }

    /// Whether [`Store::prepare`] has succeeded.
    pub fn is_ready(&self) -> bool {
        self.ready.load(std::sync::atomic::Ordering::Acquire)
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        if !self.is_ready() {
            return Err(unavailable(NotReady));
        }
        self.pool.get().await.map_err(pool_err)
    }

    /// Inserts a new processing job leased to `lease`.
    async fn create_job<C: GenericClient + Sync>(
        &self,
        client: &C,
        profile: &ProfileId,
        samples_hash: &str,
        attempt: u32,
        now: Timestamp,
        lease: &Lease,
    ) -> Result<CloneJob, StoreError> {
        let row = client
            .cached_query_one(
                &format!(
                    "INSERT INTO clone_jobs (profile_id, samples_hash, status, started_at, \
                     lease_owner, lease_until, attempt) \
                     VALUES ($1, $2, 'processing', $3, $4, $5, $6) RETURNING {JOB_COLUMNS}"
                ),
                &[
                    &profile.as_str(),
                    &samples_hash,
                    &now.to_system(),
                    &lease.owner,
                    &lease.until.to_system(),
                    &i32::try_from(attempt).unwrap_or(i32::MAX),
                ],
            )
            .await
            .map_err(query)?;
        job_from_row(&row)
    }

    /// Reads a job that must exist, on `client` (inside a transaction, or not).
    async fn job_in<C: GenericClient + Sync>(
        &self,
        client: &C,
        id: JobId,
    ) -> Result<CloneJob, StoreError> {
        let row = client
            .cached_query_opt(
                &format!("SELECT {JOB_COLUMNS} FROM clone_jobs WHERE id = $1"),
                &[&id.0],
            )
            .await
            .map_err(query)?
            .ok_or_else(|| StoreError::Missing(format!("clone {id}")))?;
        job_from_row(&row)
    }
}

const CALL_COLUMNS: &str = "call_id, session_id, protocol, caller_number, recipient_number, \
     profile_id, clone_job_id, status, started_at, connected_at, ended_at, failure, end_reason";

const JOB_COLUMNS: &str = "id, profile_id, samples_hash, status, voice_id, error, started_at, \
     finished_at, lease_owner, lease_until, attempt, permanent, retry_at, voice_deleted_at, \
     checked_at";

const PROFILE_COLUMNS: &str =
    "id, number, name, sample_urls, agent_id, greeting_url, hold_url, first_message";

fn call_from_row(row: &Row) -> Result<CallRecord, StoreError> {
    let protocol: String = row.get("protocol");
    let status: String = row.get("status");
    Ok(CallRecord {
        call_id: CallId::new(row.get::<_, String>("call_id")),
        session_id: row.get("session_id"),
        protocol: Protocol::parse(&protocol)
            .ok_or(StoreError::Corrupt { what: "calls.protocol", value: protocol })?,
        caller_number: row.get("caller_number"),
        recipient_number: row.get("recipient_number"),
        profile_id: ProfileId::new(row.get::<_, String>("profile_id")),
        clone_job_id: row.get::<_, Option<i64>>("clone_job_id").map(JobId),
        status: CallStatus::parse(&status)
            .ok_or(StoreError::Corrupt { what: "calls.status", value: status })?,
        started_at: ts(row.get("started_at")),
        connected_at: row.get::<_, Option<SystemTime>>("connected_at").map(ts),
        ended_at: row.get::<_, Option<SystemTime>>("ended_at").map(ts),
        failure: row.get("failure"),
        end_reason: row.get("end_reason"),
    })
}

fn job_from_row(row: &Row) -> Result<CloneJob, StoreError> {
    let status: String = row.get("status");
    Ok(CloneJob {
        id: JobId(row.get("id")),
        profile_id: ProfileId::new(row.get::<_, String>("profile_id")),
        samples_hash: row.get("samples_hash"),
        status: CloneStatus::parse(&status)
            .ok_or(StoreError::Corrupt { what: "clone_jobs.status", value: status })?,
        voice_id: row.get::<_, Option<String>>("voice_id").map(VoiceId::new),
        error: row.get("error"),
        started_at: ts(row.get("started_at")),
        finished_at: row.get::<_, Option<SystemTime>>("finished_at").map(ts),
        lease_owner: row.get("lease_owner"),
        lease_until: row.get::<_, Option<SystemTime>>("lease_until").map(ts),
        attempt: u32::try_from(row.get::<_, i32>("attempt")).unwrap_or(1),
        permanent: row.get("permanent"),
        retry_at: row.get::<_, Option<SystemTime>>("retry_at").map(ts),
        voice_deleted_at: row.get::<_, Option<SystemTime>>("voice_deleted_at").map(ts),
        checked_at: row.get::<_, Option<SystemTime>>("checked_at").map(ts),
    })
}

fn profile_from_row(row: &Row) -> VoiceProfile {
    VoiceProfile {
        id: ProfileId::new(row.get::<_, String>("id")),
        number: row.get("number"),
        name: row.get("name"),
        sample_urls: row.get("sample_urls"),
        agent_id: row.get("agent_id"),
        greeting_url: row.get("greeting_url"),
        hold_url: row.get("hold_url"),
        first_message: row.get("first_message"),
    }
}

/// Every statement goes through deadpool's per-connection statement cache: tokio-postgres
/// would otherwise parse and plan each SQL text anew (an extra round trip per statement).
/// Measured with `benches/twilio_load.rs`: see docs/PERFORMANCE.md.
trait Cached: GenericClient + Sync {
    async fn cached_query_opt(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, tokio_postgres::Error> {
        let stmt = self.prepare_cached(sql).await?;
        self.query_opt(&stmt, params).await
    }

    async fn cached_query_one(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Row, tokio_postgres::Error> {
        let stmt = self.prepare_cached(sql).await?;
        self.query_one(&stmt, params).await
    }

    async fn cached_query(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, tokio_postgres::Error> {
        let stmt = self.prepare_cached(sql).await?;
        self.query(&stmt, params).await
    }

    async fn cached_execute(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, tokio_postgres::Error> {
        let stmt = self.prepare_cached(sql).await?;
        self.execute(&stmt, params).await
    }
}

impl<C: GenericClient + Sync> Cached for C {}

impl Store for PgStore {
    async fn insert_call(&self, call: &CallRecord) -> Result<InsertCall, StoreError> {
        let client = self.client().await?;
        let inserted = client
            .cached_query_opt(
                "INSERT INTO calls (call_id, session_id, protocol, caller_number, \
                 recipient_number, profile_id, clone_job_id, status, started_at, failure) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
                 ON CONFLICT (call_id) DO NOTHING RETURNING call_id",
                &[
                    &call.call_id.as_str(),
                    &call.session_id,
                    &call.protocol.as_str(),
                    &call.caller_number,
                    &call.recipient_number,
                    &call.profile_id.as_str(),
                    &call.clone_job_id.map(|j| j.0),
                    &call.status.as_str(),
                    &call.started_at.to_system(),
                    &call.failure,
                ],
            )
            .await
            .map_err(query)?;
        if inserted.is_some() {
            return Ok(InsertCall::Inserted);
        }
        let row = client
            .cached_query_one(
                &format!("SELECT {CALL_COLUMNS} FROM calls WHERE call_id = $1"),
                &[&call.call_id.as_str()],
            )
            .await
            .map_err(query)?;
        Ok(InsertCall::Existing(Box::new(call_from_row(&row)?)))
    }

    async fn get_call(&self, call_id: &CallId) -> Result<Option<CallRecord>, StoreError> {
        let client = self.client().await?;
        let row = client
            .cached_query_opt(
                &format!("SELECT {CALL_COLUMNS} FROM calls WHERE call_id = $1"),
                &[&call_id.as_str()],
            )
            .await
            .map_err(query)?;
        row.as_ref().map(call_from_row).transpose()
    }

    async fn attach_job(&self, call_id: &CallId, job: JobId) -> Result<(), StoreError> {
        let n = self
            .client()
            .await?
            .cached_execute(
                "UPDATE calls SET clone_job_id = $2 WHERE call_id = $1",
                &[&call_id.as_str(), &job.0],
            )
            .await
            .map_err(query)?;
        if n == 0 { Err(StoreError::Missing(format!("call {call_id}"))) } else { Ok(()) }
    }

    async fn set_call_status(
        &self,
        call_id: &CallId,
        status: CallStatus,
        at: Timestamp,
        reason: Option<&str>,
    ) -> Result<Option<StatusChange>, StoreError> {
        // One conditional statement: the call moves only from a state that may become
        // `status` (CallStatus::can_become), so two nodes racing on one call serialise on the
        // row and the second finds nothing to change. The CASEs are apply_status's rules.
        let from: Vec<&str> = status.predecessors().iter().map(|s| s.as_str()).collect();
        let client = self.client().await?;
        let updated = client
            .cached_query_opt(
                &format!(
                    "UPDATE calls SET status = $2, \
                     connected_at = CASE WHEN $2 = 'connected' THEN COALESCE(connected_at, $3) \
                                    ELSE connected_at END, \
                     ended_at = CASE WHEN $2 = 'ended' THEN COALESCE(ended_at, $3) \
                                ELSE ended_at END, \
                     failure = CASE WHEN $2 = 'failed' THEN COALESCE(failure, $4) \
                               ELSE failure END, \
                     end_reason = CASE WHEN $2 = 'ended' THEN $4 ELSE end_reason END \
                     WHERE call_id = $1 AND status = ANY($5) RETURNING {CALL_COLUMNS}"
                ),
                &[&call_id.as_str(), &status.as_str(), &at.to_system(), &reason, &from],
            )
            .await
            .map_err(query)?;
        if let Some(row) = updated {
            return Ok(Some(StatusChange { record: call_from_row(&row)?, changed: true }));
        }
        let current = client
            .cached_query_opt(
                &format!("SELECT {CALL_COLUMNS} FROM calls WHERE call_id = $1"),
                &[&call_id.as_str()],
            )
            .await
            .map_err(query)?;
        current
            .map(|row| Ok(StatusChange { record: call_from_row(&row)?, changed: false }))
            .transpose()
    }

    async fn append_event(&self, event: &CallEvent) -> Result<(), StoreError> {
        self.client()
            .await?
            .cached_execute(
                "INSERT INTO call_events (call_id, at, kind, detail) VALUES ($1, $2, $3, $4)",
                &[
                    &event.call_id.as_str(),
                    &event.at.to_system(),
                    &event.kind.as_str(),
                    &event.detail,
                ],
            )
            .await
            .map_err(query)?;
        Ok(())
    }

    async fn call_events(&self, call_id: &CallId) -> Result<Vec<CallEvent>, StoreError> {
        let rows = self
            .client()
            .await?
            .cached_query(
                "SELECT at, kind, detail FROM call_events WHERE call_id = $1 ORDER BY id",
                &[&call_id.as_str()],
            )
            .await
            .map_err(query)?;
        rows.iter()
            .map(|row| {
                let kind: String = row.get("kind");
                Ok(CallEvent {
                    call_id: call_id.clone(),
                    at: ts(row.get("at")),
                    kind: EventKind::parse(&kind)
                        .ok_or(StoreError::Corrupt { what: "call_events.kind", value: kind })?,
                    detail: row.get("detail"),
                })
            })
            .collect()
    }

    async fn upsert_profile(&self, profile: &VoiceProfile) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(query)?;
        if let Some(number) = &profile.number {
            // A number selects one profile: the newest claim on it wins.
            tx.cached_execute(
                "UPDATE voice_profiles SET number = NULL WHERE number = $1 AND id <> $2",
                &[number, &profile.id.as_str()],
            )
            .await
            .map_err(query)?;
        }
        tx.cached_execute(
            "INSERT INTO voice_profiles (id, number, name, sample_urls, agent_id, \
             greeting_url, hold_url, first_message, samples_hash, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, now()) \
             ON CONFLICT (id) DO UPDATE SET number = EXCLUDED.number, name = EXCLUDED.name, \
             sample_urls = EXCLUDED.sample_urls, agent_id = EXCLUDED.agent_id, \
             greeting_url = EXCLUDED.greeting_url, hold_url = EXCLUDED.hold_url, \
             first_message = EXCLUDED.first_message, samples_hash = EXCLUDED.samples_hash, \
             updated_at = now()",
            &[
                &profile.id.as_str(),
                &profile.number,
                &profile.name,
                &profile.sample_urls,
                &profile.agent_id,
                &profile.greeting_url,
                &profile.hold_url,
                &profile.first_message,
                &profile.samples_hash(),
            ],
        )
        .await
        .map_err(query)?;
        tx.commit().await.map_err(query)
    }

    async fn get_profile(&self, id: &ProfileId) -> Result<Option<VoiceProfile>, StoreError> {
        let row = self
            .client()
            .await?
            .cached_query_opt(
                &format!("SELECT {PROFILE_COLUMNS} FROM voice_profiles WHERE id = $1"),
                &[&id.as_str()],
            )
            .await
            .map_err(query)?;
        Ok(row.as_ref().map(profile_from_row))
    }

    async fn profile_for_number(&self, number: &str) -> Result<Option<VoiceProfile>, StoreError> {
        let row = self
            .client()
            .await?
            .cached_query_opt(
                &format!("SELECT {PROFILE_COLUMNS} FROM voice_profiles WHERE number = $1"),
                &[&number],
            )
            .await
            .map_err(query)?;
        Ok(row.as_ref().map(profile_from_row))
    }

    async fn select_profile(
        &self,
        number: &str,
        fallback: &ProfileId,
    ) -> Result<Option<VoiceProfile>, StoreError> {
        // One round trip: the number's own profile sorts first, the fallback second.
        let row = self
            .client()
            .await?
            .cached_query_opt(
                &format!(
                    "SELECT {PROFILE_COLUMNS} FROM voice_profiles \
                     WHERE (number = $1 AND $1 <> '') OR id = $2 \
                     ORDER BY (number IS NOT DISTINCT FROM $1) DESC LIMIT 1"
                ),
                &[&number, &fallback.as_str()],
            )
            .await
            .map_err(query)?;
        Ok(row.as_ref().map(profile_from_row))
    }

    async fn claim_clone_job(
        &self,
        profile: &ProfileId,
        samples_hash: &str,
        now: Timestamp,
        lease: &Lease,
    ) -> Result<(CloneJob, bool), StoreError> {
        let newest_sql = format!(
            "SELECT {JOB_COLUMNS} FROM clone_jobs WHERE profile_id = $1 AND samples_hash = $2 \
             ORDER BY id DESC LIMIT 1"
        );
        let params: [&(dyn ToSql + Sync); 2] = [&profile.as_str(), &samples_hash];
        let mut client = self.client().await?;
        // Most calls find a serving job: read it without the lock, so that the calls of one
        // profile do not queue on the advisory lock (measured: they did, docs/PERFORMANCE.md).
        let newest = client.cached_query_opt(&newest_sql, &params).await.map_err(query)?;
        let newest = newest.as_ref().map(job_from_row).transpose()?;
        if let (Some(job), ClaimDecision::Serve) = (&newest, claim_decision(newest.as_ref(), now)) {
            return Ok((job.clone(), false));
        }
        let tx = client.transaction().await.map_err(query)?;
        let key = format!("{profile}/{samples_hash}");
        tx.cached_execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", &[&key])
            .await
            .map_err(query)?;
        // Again under the lock: another node may have created or taken it meanwhile.
        let newest = tx.cached_query_opt(&newest_sql, &params).await.map_err(query)?;
        let newest = newest.as_ref().map(job_from_row).transpose()?;
        let decision = claim_decision(newest.as_ref(), now);
        let out = match (newest, decision) {
            (Some(job), ClaimDecision::Serve) => (job, false),
            (Some(job), ClaimDecision::TakeOver) => {
                // Conditional: a sweep (not under this lock) may have taken it first.
                let taken = tx
                    .cached_query_opt(
                        &format!(
                            "UPDATE clone_jobs SET lease_owner = $2, lease_until = $3, \
                             started_at = $4 WHERE id = $1 AND status = 'processing' \
                             AND (lease_until IS NULL OR lease_until <= $4) \
                             RETURNING {JOB_COLUMNS}"
                        ),
                        &[&job.id.0, &lease.owner, &lease.until.to_system(), &now.to_system()],
                    )
                    .await
                    .map_err(query)?;
                match taken {
                    Some(row) => (job_from_row(&row)?, true),
                    None => (self.job_in(&tx, job.id).await?, false),
                }
            }
            (_, ClaimDecision::Create { attempt }) => {
                (self.create_job(&tx, profile, samples_hash, attempt, now, lease).await?, true)
            }
            // claim_decision answers Create when there is no job.
            (None, _) => (self.create_job(&tx, profile, samples_hash, 1, now, lease).await?, true),
        };
        tx.commit().await.map_err(query)?;
        Ok(out)
    }

    async fn renew_clone_lease(
        &self,
        id: JobId,
        owner: &str,
        until: Timestamp,
    ) -> Result<bool, StoreError> {
        let n = self
            .client()
            .await?
            .cached_execute(
                "UPDATE clone_jobs SET lease_until = $3 \
                 WHERE id = $1 AND status = 'processing' AND lease_owner = $2",
                &[&id.0, &owner, &until.to_system()],
            )
            .await
            .map_err(query)?;
        Ok(n == 1)
    }

    async fn release_clone_lease(&self, id: JobId, owner: &str) -> Result<bool, StoreError> {
        let n = self
            .client()
            .await?
            .cached_execute(
                "UPDATE clone_jobs SET lease_owner = NULL, lease_until = NULL \
                 WHERE id = $1 AND status = 'processing' AND lease_owner = $2",
                &[&id.0, &owner],
            )
            .await
            .map_err(query)?;
        Ok(n == 1)
    }

    async fn take_over_clone_jobs(
        &self,
        now: Timestamp,
        lease: &Lease,
        limit: usize,
    ) -> Result<Vec<CloneJob>, StoreError> {
        // SKIP LOCKED: two nodes sweeping at once split the lapsed jobs, never share one.
        let rows = self
            .client()
            .await?
            .cached_query(
                &format!(
                    "UPDATE clone_jobs SET lease_owner = $1, lease_until = $2, started_at = $3 \
                     WHERE id IN (SELECT id FROM clone_jobs WHERE status = 'processing' \
                     AND (lease_until IS NULL OR lease_until <= $3) ORDER BY id LIMIT $4 \
                     FOR UPDATE SKIP LOCKED) RETURNING {JOB_COLUMNS}"
                ),
                &[
                    &lease.owner,
                    &lease.until.to_system(),
                    &now.to_system(),
                    &i64::try_from(limit).unwrap_or(i64::MAX),
                ],
            )
            .await
            .map_err(query)?;
        let mut jobs = rows.iter().map(job_from_row).collect::<Result<Vec<_>, _>>()?;
        jobs.sort_by_key(|j| j.id);
        Ok(jobs)
    }

    async fn get_clone_job(&self, id: JobId) -> Result<Option<CloneJob>, StoreError> {
        let row = self
            .client()
            .await?
            .cached_query_opt(
                &format!("SELECT {JOB_COLUMNS} FROM clone_jobs WHERE id = $1"),
                &[&id.0],
            )
            .await
            .map_err(query)?;
        row.as_ref().map(job_from_row).transpose()
    }

    async fn finish_clone_job(
        &self,
        id: JobId,
        owner: &str,
        outcome: &JobOutcome,
        at: Timestamp,
        retry_at: Option<Timestamp>,
    ) -> Result<CloneJob, StoreError> {
        let client = self.client().await?;
        let (status, voice, error, permanent) = match outcome {
            Ok(v) => (CloneStatus::Completed, Some(v.as_str()), None, false),
            Err(e) => (CloneStatus::Failed, None, Some(e.reason.as_str()), e.permanent),
        };
        let retry_at = match outcome {
            Ok(_) => None,
            Err(_) => retry_at.map(Timestamp::to_system),
        };
        let updated = client
            .cached_query_opt(
                &format!(
                    "UPDATE clone_jobs SET status = $2, voice_id = $3, error = $4, \
                     finished_at = $5, permanent = $6, retry_at = $7, lease_owner = NULL, \
                     lease_until = NULL WHERE id = $1 AND status = 'processing' \
                     AND lease_owner = $8 RETURNING {JOB_COLUMNS}"
                ),
                &[
                    &id.0,
                    &status.as_str(),
                    &voice,
                    &error,
                    &at.to_system(),
                    &permanent,
                    &retry_at,
                    &owner,
                ],
            )
            .await
            .map_err(query)?;
        match updated {
            Some(row) => job_from_row(&row),
            None => self.job_in(&client, id).await,
        }
    }

    async fn unused_voices(&self, limit: usize) -> Result<Vec<CloneJob>, StoreError> {
        let rows = self
            .client()
            .await?
            .cached_query(
                &format!(
                    "SELECT {JOB_COLUMNS} FROM clone_jobs j \
                     WHERE j.status = 'completed' AND j.voice_id IS NOT NULL \
                     AND j.voice_deleted_at IS NULL \
                     AND NOT EXISTS (SELECT 1 FROM voice_profiles p WHERE p.id = j.profile_id \
                          AND (p.samples_hash IS NULL OR (p.samples_hash = j.samples_hash \
                          AND NOT EXISTS (SELECT 1 FROM clone_jobs n \
                               WHERE n.profile_id = j.profile_id \
                               AND n.samples_hash = j.samples_hash \
                               AND n.status = 'completed' AND n.id > j.id)))) \
                     AND NOT EXISTS (SELECT 1 FROM calls c WHERE c.clone_job_id = j.id \
                                     AND c.status IN ('ringing', 'holding', 'connected')) \
                     ORDER BY j.finished_at, j.id LIMIT $1"
                ),
                &[&i64::try_from(limit).unwrap_or(i64::MAX)],
            )
            .await
            .map_err(query)?;
        rows.iter().map(job_from_row).collect()
    }

    async fn voice_checked(&self, id: JobId, at: Timestamp) -> Result<(), StoreError> {
        self.client()
            .await?
            .cached_execute(
                "UPDATE clone_jobs SET checked_at = GREATEST(checked_at, $2) WHERE id = $1",
                &[&id.0, &at.to_system()],
            )
            .await
            .map_err(query)?;
        Ok(())
    }

    async fn voice_deleted(&self, id: JobId, at: Timestamp) -> Result<(), StoreError> {
        self.client()
            .await?
            .cached_execute(
                "UPDATE clone_jobs SET voice_deleted_at = COALESCE(voice_deleted_at, $2) \
                 WHERE id = $1",
                &[&id.0, &at.to_system()],
            )
            .await
            .map_err(query)?;
        Ok(())
    }

    async fn calls_waiting_on(&self, job: JobId) -> Result<Vec<(CallId, Protocol)>, StoreError> {
        let rows = self
            .client()
            .await?
            .cached_query(
                "SELECT call_id, protocol FROM calls WHERE clone_job_id = $1 \
                 AND status IN ('ringing', 'holding') ORDER BY call_id",
                &[&job.0],
            )
            .await
            .map_err(query)?;
        rows.iter()
            .map(|r| {
                let protocol: String = r.get(1);
                let protocol = Protocol::parse(&protocol)
                    .ok_or(StoreError::Corrupt { what: "calls.protocol", value: protocol })?;
                Ok((CallId::from(r.get::<_, String>(0)), protocol))
            })
            .collect()
    }

    async fn claim_push(&self, call_id: &CallId, at: Timestamp) -> Result<bool, StoreError> {
        let n = self
            .client()
            .await?
            .cached_execute(
                "UPDATE calls SET pushed_at = $2 WHERE call_id = $1 AND pushed_at IS NULL",
                &[&call_id.as_str(), &at.to_system()],
            )
            .await
            .map_err(query)?;
        Ok(n == 1)
    }

    async fn forget_calls(
        &self,
        ended_before: Timestamp,
        unended_before: Timestamp,
        limit: usize,
    ) -> Result<usize, StoreError> {
        // One statement: the calls and their events go together (calls_by_start finds them).
        let row = self
            .client()
            .await?
            .cached_query_one(
                "WITH gone AS (DELETE FROM calls WHERE call_id IN (\
                   SELECT call_id FROM calls \
                   WHERE (status = 'ended' AND started_at < $1) \
                      OR (status <> 'ended' AND started_at < $2) \
                   ORDER BY started_at LIMIT $3) RETURNING call_id), \
                 events AS (DELETE FROM call_events WHERE call_id IN (SELECT call_id FROM gone)) \
                 SELECT count(*) FROM gone",
                &[
                    &ended_before.to_system(),
                    &unended_before.to_system(),
                    &i64::try_from(limit).unwrap_or(i64::MAX),
                ],
            )
            .await
            .map_err(query)?;
        Ok(usize::try_from(row.get::<_, i64>(0)).unwrap_or(0))
    }

    async fn prepare(&self) -> Result<(), StoreError> {
        if self.is_ready() {
            return Ok(());
        }
        let mut client = self.pool.get().await.map_err(pool_err)?;
        // A migration may rewrite or index a large table: no statement timeout for it (and
        // a cancelled one would look like an outage and be retried for ever).
        client.batch_execute("SET statement_timeout = 0").await.map_err(query)?;
        let ran = migrate(&mut client).await.map_err(query);
        client.batch_execute("RESET statement_timeout").await.map_err(query)?;
        let ran = ran?;
        tracing::info!(migrations_applied = ran, "PostgreSQL store ready");
        self.ready.store(true, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    async fn health(&self) -> Result<(), StoreError> {
        self.client().await?.simple_query("SELECT 1").await.map_err(query)?;
        Ok(())
    }
}
