//! The PostgreSQL store: `tokio-postgres` with a `deadpool` pool, on the side tokio runtime.
//!
//! Each controller step is one round trip where SQL allows (issue 13, docs/PERFORMANCE.md):
//! * `record_inbound` is one call of the `precall_inbound` function (migration 4): profile,
//!   call record (`INSERT … ON CONFLICT DO NOTHING`, so a retried webhook or a retransmitted
//!   INVITE on any node records the call once), events and the job claim together, in one
//!   transaction;
//! * a job claim (`precall_claim_job`) reads the newest job without a lock, and only when none
//!   serves takes the sample set's transaction-scoped advisory lock, so two nodes never both
//!   create a job for one sample set;
//! * `call_view`, a status check's read, is one join;
//! * `set_call_status` and `move_call` are one conditional `UPDATE … WHERE status = ANY(legal
//!   predecessors) RETURNING` (with its event in a CTE for `move_call`): the call's state
//!   machine ([`precall_api::CallStatus::can_become`]) enforced in the database, so two nodes
//!   can never flip a call back and forth, and the request that made a transition knows it
//!   did.

use std::sync::{Arc, LazyLock};
use std::time::{Duration, SystemTime};

use deadpool_postgres::{
    GenericClient, Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime,
};
use precall_api::{
    CallId, CallStatus, CloneStatus, JobId, ProfileId, Protocol, Timestamp, VoiceId,
};
use precall_controller::{
    CallEvent, CallRecord, CallView, CloneJob, EventKind, InboundRequest, InboundStep, InsertCall,
    JobOutcome, Lease, StatusChange, Store, StoreError, VoiceProfile,
};
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row};

use super::batch::Batcher;
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
    /// Inbound calls' first steps, grouped under load (see [`Batcher`]).
    inbound: Arc<Batcher<InboundParams, InboundStep>>,
    /// Status checks' reads, grouped likewise.
    views: Arc<Batcher<String, Option<CallView>>>,
}

/// The most requests one batched statement carries.
const MOST_PER_BATCH: usize = 64;

/// An inbound request as the batch's task owns it.
struct InboundParams {
    call_id: String,
    session_id: String,
    protocol: &'static str,
    caller: String,
    recipient: String,
    status: &'static str,
    arrived: SystemTime,
    number: String,
    fallback: String,
    now: SystemTime,
    owner: String,
    until: SystemTime,
}

impl InboundParams {
    fn new(req: &InboundRequest<'_>) -> Self {
        let call = req.call;
        Self {
            call_id: call.call_id.as_str().to_owned(),
            session_id: call.session_id.clone(),
            protocol: call.protocol.as_str(),
            caller: call.caller_number.clone(),
            recipient: call.recipient_number.clone(),
            status: call.status.as_str(),
            arrived: call.started_at.to_system(),
            number: req.number.to_owned(),
            fallback: call.profile_id.as_str().to_owned(),
            now: req.now.to_system(),
            owner: req.lease.owner.clone(),
            until: req.lease.until.to_system(),
        }
    }
}

/// The database's failure, told to every request of the batch it failed.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct BatchFailed(String);

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
        // Half the pool for each kind of batch: neither starves the other (or the rest of the
        // statements) of connections.
        let flushers = (cfg.pool_size / 2).max(1);
        Ok(Self {
            pool,
            ready: Default::default(),
            inbound: Arc::new(Batcher::new(flushers, MOST_PER_BATCH)),
            views: Arc::new(Batcher::new(flushers, MOST_PER_BATCH)),
        })
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

    /// Answers a batch of inbound requests (see [`batched`]).
    async fn inbound_batch(
        &self,
        batch: Vec<InboundParams>,
    ) -> Vec<Result<InboundStep, StoreError>> {
        batched(&batch, |i| self.inbound_one(&batch[i]), || self.inbound_many(&batch)).await
    }

    async fn inbound_one(&self, p: &InboundParams) -> Result<InboundStep, StoreError> {
        let row = self
            .client()
            .await?
            .cached_query_one(
                &INBOUND_SQL,
                &[
                    &p.call_id,
                    &p.session_id,
                    &p.protocol,
                    &p.caller,
                    &p.recipient,
                    &p.status,
                    &p.arrived,
                    &p.number,
                    &p.fallback,
                    &p.now,
                    &p.owner,
                    &p.until,
                ],
            )
            .await
            .map_err(query)?;
        // Alone, a claim waits for its lock: never contended.
        inbound_step_at(&row, 0)?.ok_or_else(|| {
            StoreError::Query(Box::new(BatchFailed("a lone inbound step was contended".into())))
        })
    }

    async fn inbound_many(
        &self,
        batch: &[InboundParams],
    ) -> Result<Vec<Result<InboundStep, StoreError>>, StoreError> {
        fn col<'a, T>(batch: &'a [InboundParams], f: impl Fn(&'a InboundParams) -> T) -> Vec<T> {
            batch.iter().map(f).collect()
        }
        let rows = self
            .client()
            .await?
            .cached_query(
                &INBOUND_MANY_SQL,
                &[
                    &col(batch, |p| p.call_id.as_str()),
                    &col(batch, |p| p.session_id.as_str()),
                    &col(batch, |p| p.protocol),
                    &col(batch, |p| p.caller.as_str()),
                    &col(batch, |p| p.recipient.as_str()),
                    &col(batch, |p| p.status),
                    &col(batch, |p| p.arrived),
                    &col(batch, |p| p.number.as_str()),
                    &col(batch, |p| p.fallback.as_str()),
                    &col(batch, |p| p.now),
                    &col(batch, |p| p.owner.as_str()),
                    &col(batch, |p| p.until),
                ],
            )
            .await
            .map_err(query)?;
        let mut out: Vec<Option<Result<InboundStep, StoreError>>> =
            batch.iter().map(|_| None).collect();
        let mut contended = Vec::new();
        for row in &rows {
            let n: i64 = row.try_get(0).map_err(query)?;
            let Some(i) = usize::try_from(n - 1).ok().filter(|i| *i < out.len()) else {
                continue;
            };
            match inbound_step_at(row, 1) {
                Ok(Some(step)) => out[i] = Some(Ok(step)),
                // Another transaction holds its sample set's lock: the batch did nothing for
                // it and is committed now, so it goes again alone, waiting for the lock.
                Ok(None) => contended.push(i),
                Err(e) => out[i] = Some(Err(e)),
            }
        }
        for i in contended {
            out[i] = Some(self.inbound_one(&batch[i]).await);
        }
        Ok(out.into_iter().map(|o| o.unwrap_or_else(|| Err(missing_answer()))).collect())
    }

    /// Answers a batch of status checks' reads (see [`batched`]).
    async fn view_batch(&self, batch: Vec<String>) -> Vec<Result<Option<CallView>, StoreError>> {
        batched(&batch, |i| self.view_one(&batch[i]), || self.view_many(&batch)).await
    }

    async fn view_one(&self, call_id: &str) -> Result<Option<CallView>, StoreError> {
        let row =
            self.client().await?.cached_query_opt(&VIEW_SQL, &[&call_id]).await.map_err(query)?;
        row.map(|row| view_at(&row, 0)).transpose()
    }

    async fn view_many(
        &self,
        batch: &[String],
    ) -> Result<Vec<Result<Option<CallView>, StoreError>>, StoreError> {
        let rows =
            self.client().await?.cached_query(&VIEW_MANY_SQL, &[&batch]).await.map_err(query)?;
        let mut found = std::collections::HashMap::with_capacity(rows.len());
        for row in &rows {
            let view = view_at(row, 0)?;
            found.insert(view.call.call_id.as_str().to_owned(), view);
        }
        // A call id asked twice in one batch gets the same answer twice.
        Ok(batch.iter().map(|id| Ok(found.get(id).cloned())).collect())
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

/// `row`'s columns from `at` on, read in the order of the column lists above. A value of an
/// unexpected type (a schema this build does not know) is a query error, never a panic.
struct Cols<'r> {
    row: &'r Row,
    at: usize,
}

impl<'r> Cols<'r> {
    fn new(row: &'r Row, at: usize) -> Self {
        Self { row, at }
    }

    fn next<T: tokio_postgres::types::FromSql<'r>>(&mut self) -> Result<T, StoreError> {
        let v = self.row.try_get(self.at).map_err(query)?;
        self.at += 1;
        Ok(v)
    }

    fn time(&mut self) -> Result<Timestamp, StoreError> {
        Ok(ts(self.next()?))
    }

    fn opt_time(&mut self) -> Result<Option<Timestamp>, StoreError> {
        Ok(self.next::<Option<SystemTime>>()?.map(ts))
    }
}

fn call_from_row(row: &Row) -> Result<CallRecord, StoreError> {
    call_at(row, 0)
}

/// The call whose [`CALL_COLUMNS`] start at column `at`.
fn call_at(row: &Row, at: usize) -> Result<CallRecord, StoreError> {
    let mut c = Cols::new(row, at);
    let call_id = CallId::new(c.next::<String>()?);
    let session_id = c.next()?;
    let protocol: String = c.next()?;
    let protocol = Protocol::parse(&protocol)
        .ok_or(StoreError::Corrupt { what: "calls.protocol", value: protocol })?;
    let caller_number = c.next()?;
    let recipient_number = c.next()?;
    let profile_id = ProfileId::new(c.next::<String>()?);
    let clone_job_id = c.next::<Option<i64>>()?.map(JobId);
    let status: String = c.next()?;
    let status = CallStatus::parse(&status)
        .ok_or(StoreError::Corrupt { what: "calls.status", value: status })?;
    Ok(CallRecord {
        call_id,
        session_id,
        protocol,
        caller_number,
        recipient_number,
        profile_id,
        clone_job_id,
        status,
        started_at: c.time()?,
        connected_at: c.opt_time()?,
        ended_at: c.opt_time()?,
        failure: c.next()?,
        end_reason: c.next()?,
    })
}

fn job_from_row(row: &Row) -> Result<CloneJob, StoreError> {
    job_at(row, 0)
}

/// The job whose [`JOB_COLUMNS`] start at column `at`.
fn job_at(row: &Row, at: usize) -> Result<CloneJob, StoreError> {
    let mut c = Cols::new(row, at);
    let id = JobId(c.next()?);
    let profile_id = ProfileId::new(c.next::<String>()?);
    let samples_hash = c.next()?;
    let status: String = c.next()?;
    let status = CloneStatus::parse(&status)
        .ok_or(StoreError::Corrupt { what: "clone_jobs.status", value: status })?;
    Ok(CloneJob {
        id,
        profile_id,
        samples_hash,
        status,
        voice_id: c.next::<Option<String>>()?.map(VoiceId::new),
        error: c.next()?,
        started_at: c.time()?,
        finished_at: c.opt_time()?,
        lease_owner: c.next()?,
        lease_until: c.opt_time()?,
        attempt: u32::try_from(c.next::<i32>()?).unwrap_or(1),
        permanent: c.next()?,
        retry_at: c.opt_time()?,
        voice_deleted_at: c.opt_time()?,
        checked_at: c.opt_time()?,
    })
}

/// The job at column `at` of an outer join: `None` when there was none (a NULL id).
fn opt_job_at(row: &Row, at: usize) -> Result<Option<CloneJob>, StoreError> {
    let id: Option<i64> = row.try_get(at).map_err(query)?;
    id.map(|_| job_at(row, at)).transpose()
}

fn profile_from_row(row: &Row) -> Result<VoiceProfile, StoreError> {
    profile_at(row, 0)
}

/// The profile whose [`PROFILE_COLUMNS`] start at column `at`.
fn profile_at(row: &Row, at: usize) -> Result<VoiceProfile, StoreError> {
    let mut c = Cols::new(row, at);
    Ok(VoiceProfile {
        id: ProfileId::new(c.next::<String>()?),
        number: c.next()?,
        name: c.next()?,
        sample_urls: c.next()?,
        agent_id: c.next()?,
        greeting_url: c.next()?,
        hold_url: c.next()?,
        first_message: c.next()?,
    })
}

/// The profile at column `at` of an outer join: `None` when there was none.
fn opt_profile_at(row: &Row, at: usize) -> Result<Option<VoiceProfile>, StoreError> {
    let id: Option<String> = row.try_get(at).map_err(query)?;
    id.map(|_| profile_at(row, at)).transpose()
}

/// How many columns a list has.
fn width(columns: &str) -> usize {
    columns.split(',').count()
}

/// `columns` each read from `of` (`c.` or a composite such as `(r.call_row).`).
fn columns_of(of: &str, columns: &str) -> String {
    columns.split(',').map(|c| format!("{of}{}", c.trim())).collect::<Vec<_>>().join(", ")
}

/// A status check's read, the call, its job and its profile, up to its `WHERE`.
static VIEW_SELECT: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT {}, {}, {} FROM calls c LEFT JOIN clone_jobs j ON j.id = c.clone_job_id \
         LEFT JOIN voice_profiles p ON p.id = c.profile_id",
        columns_of("c.", CALL_COLUMNS),
        columns_of("j.", JOB_COLUMNS),
        columns_of("p.", PROFILE_COLUMNS),
    )
});

/// A status check's read in one statement.
static VIEW_SQL: LazyLock<String> =
    LazyLock::new(|| format!("{} WHERE c.call_id = $1", *VIEW_SELECT));

/// The columns of `precall_inbound`'s answer `r`, as [`inbound_step_at`] reads them.
static STEP_COLUMNS: LazyLock<String> = LazyLock::new(|| {
    format!(
        "r.first_seen, r.created, r.contended, {}, {}, {}",
        columns_of("(r.call_row).", CALL_COLUMNS),
        columns_of("(r.job_row).", JOB_COLUMNS),
        columns_of("(r.profile_row).", PROFILE_COLUMNS),
    )
});

/// An inbound call's first step (migrations/0004_one_round_trip.sql).
static INBOUND_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT {} FROM precall_inbound($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, \
         true) r",
        *STEP_COLUMNS
    )
});

/// A job claim (migrations/0004_one_round_trip.sql).
static CLAIM_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT r.created, {} FROM precall_claim_job($1, $2, $3, $4, $5, true) r",
        columns_of("(r.job_row).", JOB_COLUMNS)
    )
});

/// The `SET` of a status change: [`precall_controller::apply_status`] in SQL ($2 status, $3
/// time, $4 reason).
const STATUS_SET: &str = "status = $2, \
     connected_at = CASE WHEN $2 = 'connected' THEN COALESCE(connected_at, $3) \
                    ELSE connected_at END, \
     ended_at = CASE WHEN $2 = 'ended' THEN COALESCE(ended_at, $3) ELSE ended_at END, \
     failure = CASE WHEN $2 = 'failed' THEN COALESCE(failure, $4) ELSE failure END, \
     end_reason = CASE WHEN $2 = 'ended' THEN $4 ELSE end_reason END";

/// Many inbound calls' first steps in one statement: `precall_inbound` for each, in order,
/// in one transaction (a later call sees what an earlier one recorded). Column 0 is the
/// request's place in the batch, from 1.
static INBOUND_MANY_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT u.n, {} \
         FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], \
                     $7::timestamptz[], $8::text[], $9::text[], $10::timestamptz[], \
                     $11::text[], $12::timestamptz[]) \
              WITH ORDINALITY AS u (call_id, session_id, protocol, caller, recipient, status, \
                                    arrived, number, fallback, now_, owner, until, n) \
         CROSS JOIN LATERAL precall_inbound(u.call_id, u.session_id, u.protocol, u.caller, \
              u.recipient, u.status, u.arrived, u.number, u.fallback, u.now_, u.owner, \
              u.until, false) AS r",
        *STEP_COLUMNS
    )
});

/// Many status checks' reads in one statement.
static VIEW_MANY_SQL: LazyLock<String> =
    LazyLock::new(|| format!("{} WHERE c.call_id = ANY($1)", *VIEW_SELECT));

/// The step whose `first_seen, created, contended, call, job, profile` columns start at
/// `at`; `None` when the step was contended (it did nothing: send it again alone).
fn inbound_step_at(row: &Row, at: usize) -> Result<Option<InboundStep>, StoreError> {
    if row.try_get::<_, bool>(at + 2).map_err(query)? {
        return Ok(None);
    }
    let job = at + 3 + width(CALL_COLUMNS);
    Ok(Some(InboundStep {
        first: row.try_get(at).map_err(query)?,
        created: row.try_get(at + 1).map_err(query)?,
        call: call_at(row, at + 3)?,
        job: opt_job_at(row, job)?,
        profile: opt_profile_at(row, job + width(JOB_COLUMNS))?,
    }))
}

/// The view whose call, job and profile columns start at `at`.
fn view_at(row: &Row, at: usize) -> Result<CallView, StoreError> {
    let job = at + width(CALL_COLUMNS);
    Ok(CallView {
        call: call_at(row, at)?,
        job: opt_job_at(row, job)?,
        profile: opt_profile_at(row, job + width(JOB_COLUMNS))?,
    })
}

/// A batched statement answered for fewer requests than it carried.
fn missing_answer() -> StoreError {
    StoreError::Query(Box::new(BatchFailed(
        "the batched statement did not answer for this request".to_owned(),
    )))
}

/// A status change from a legal predecessor ($5), and its event ($6 kind, $7 detail) when
/// it happened, in one statement.
static MOVE_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH moved AS (UPDATE calls SET {STATUS_SET} WHERE call_id = $1 AND status = ANY($5) \
         RETURNING {CALL_COLUMNS}), \
         logged AS (INSERT INTO call_events (call_id, at, kind, detail) \
         SELECT call_id, $3, $6, $7 FROM moved) \
         SELECT {CALL_COLUMNS} FROM moved"
    )
});

/// Answers a batch: its one request alone (`one(0)`), or all of them in one statement
/// (`many`). When that statement fails for a reason of its own (not the database being away),
/// each request is sent again alone (`one(i)`), so that only a request at fault fails; the
/// database being away fails every request of it (the controller's outage paths take over).
async fn batched<Q, T, F1, F2>(
    batch: &[Q],
    one: impl Fn(usize) -> F1,
    many: impl FnOnce() -> F2,
) -> Vec<Result<T, StoreError>>
where
    F1: std::future::Future<Output = Result<T, StoreError>>,
    F2: std::future::Future<Output = Result<Vec<Result<T, StoreError>>, StoreError>>,
{
    if batch.len() == 1 {
        return vec![one(0).await];
    }
    let e = match many().await {
        Ok(answers) => return answers,
        Err(e) => e,
    };
    if let StoreError::Unavailable(e) = &e {
        let why = e.to_string();
        return batch.iter().map(|_| Err(unavailable(BatchFailed(why.clone())))).collect();
    }
    tracing::debug!(error = %e, requests = batch.len(), "a batched statement failed: each alone");
    let mut out = Vec::with_capacity(batch.len());
    for i in 0..batch.len() {
        out.push(one(i).await);
    }
    out
}

/// A conditional status change's answer: the row it returned (`moved`), or, when it moved
/// nothing (an unknown call, or no longer a legal predecessor), where the call stands now,
/// read in a statement of its own so that a race's winner is seen.
async fn moved_or_current<C: GenericClient + Sync>(
    client: &C,
    call_id: &CallId,
    moved: Option<Row>,
) -> Result<Option<StatusChange>, StoreError> {
    if let Some(row) = moved {
        return Ok(Some(StatusChange { record: call_from_row(&row)?, changed: true }));
    }
    let current = client
        .cached_query_opt(
            &format!("SELECT {CALL_COLUMNS} FROM calls WHERE call_id = $1"),
            &[&call_id.as_str()],
        )
        .await
        .map_err(query)?;
    current.map(|row| Ok(StatusChange { record: call_from_row(&row)?, changed: false })).transpose()
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
                    "UPDATE calls SET {STATUS_SET} WHERE call_id = $1 AND status = ANY($5) \
                     RETURNING {CALL_COLUMNS}"
                ),
                &[&call_id.as_str(), &status.as_str(), &at.to_system(), &reason, &from],
            )
            .await
            .map_err(query)?;
        moved_or_current(&client, call_id, updated).await
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
        row.as_ref().map(profile_from_row).transpose()
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
        row.as_ref().map(profile_from_row).transpose()
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
        row.as_ref().map(profile_from_row).transpose()
    }

    async fn claim_clone_job(
        &self,
        profile: &ProfileId,
        samples_hash: &str,
        now: Timestamp,
        lease: &Lease,
    ) -> Result<(CloneJob, bool), StoreError> {
        // One statement: precall_claim_job reads the newest job without a lock (most calls
        // find one serving), and only otherwise takes the sample set's advisory lock, reads
        // again and takes over or creates (claim_decision).
        let row = self
            .client()
            .await?
            .cached_query_one(
                &CLAIM_SQL,
                &[
                    &profile.as_str(),
                    &samples_hash,
                    &now.to_system(),
                    &lease.owner,
                    &lease.until.to_system(),
                ],
            )
            .await
            .map_err(query)?;
        let created: bool = row.try_get(0).map_err(query)?;
        Ok((job_at(&row, 1)?, created))
    }

    async fn record_inbound(&self, req: &InboundRequest<'_>) -> Result<InboundStep, StoreError> {
        let store = self.clone();
        let run = move |batch: Vec<InboundParams>| {
            let store = store.clone();
            async move { store.inbound_batch(batch).await }
        };
        self.inbound.submit(InboundParams::new(req), run).await
    }

    async fn call_view(&self, call_id: &CallId) -> Result<Option<CallView>, StoreError> {
        let store = self.clone();
        let run = move |batch: Vec<String>| {
            let store = store.clone();
            async move { store.view_batch(batch).await }
        };
        self.views.submit(call_id.as_str().to_owned(), run).await
    }

    async fn move_call(
        &self,
        call_id: &CallId,
        status: CallStatus,
        at: Timestamp,
        reason: Option<&str>,
        kind: EventKind,
        detail: &str,
    ) -> Result<Option<StatusChange>, StoreError> {
        let from: Vec<&str> = status.predecessors().iter().map(|s| s.as_str()).collect();
        let client = self.client().await?;
        let moved = client
            .cached_query_opt(
                &MOVE_SQL,
                &[
                    &call_id.as_str(),
                    &status.as_str(),
                    &at.to_system(),
                    &reason,
                    &from,
                    &kind.as_str(),
                    &detail,
                ],
            )
            .await
            .map_err(query)?;
        moved_or_current(&client, call_id, moved).await
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
