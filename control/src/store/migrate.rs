//! Schema migrations: the SQL files of `migrations/`, embedded in the binary, applied in order.
//!
//! Every node runs them at start. A session advisory lock makes concurrent starts take turns,
//! and `schema_migrations` records what is applied, so running them again changes nothing.

use tokio_postgres::Client;

/// One SQL file of `migrations/`.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// Applied in increasing order.
    pub version: i32,
    /// The file name.
    pub name: &'static str,
    /// Its SQL.
    pub sql: &'static str,
}

/// All migrations, oldest first.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "0001_init.sql",
        sql: include_str!("../../../migrations/0001_init.sql"),
    },
    Migration {
        version: 2,
        name: "0002_live_call_push.sql",
        sql: include_str!("../../../migrations/0002_live_call_push.sql"),
    },
    Migration {
        version: 3,
        name: "0003_clone_leases.sql",
        sql: include_str!("../../../migrations/0003_clone_leases.sql"),
    },
    Migration {
        version: 4,
        name: "0004_one_round_trip.sql",
        sql: include_str!("../../../migrations/0004_one_round_trip.sql"),
    },
];

/// Arbitrary constant naming precall's migration lock.
const LOCK_KEY: i64 = 0x7072_6563_616c_6c01;

/// Applies the migrations not applied yet; returns how many ran.
pub(crate) async fn migrate(client: &mut Client) -> Result<usize, tokio_postgres::Error> {
    client.execute("SELECT pg_advisory_lock($1)", &[&LOCK_KEY]).await?;
    let result = apply_pending(client).await;
    // Unlock whatever happened; a failed unlock is released with the session anyway.
    let _ = client.execute("SELECT pg_advisory_unlock($1)", &[&LOCK_KEY]).await;
    result
}

async fn apply_pending(client: &mut Client) -> Result<usize, tokio_postgres::Error> {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                 version    INTEGER PRIMARY KEY,
                 name       TEXT NOT NULL,
                 applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
             )",
        )
        .await?;
    let mut ran = 0;
    for m in MIGRATIONS {
        let applied = client
            .query_opt("SELECT 1 FROM schema_migrations WHERE version = $1", &[&m.version])
            .await?
            .is_some();
        if applied {
            continue;
        }
        let tx = client.transaction().await?;
        tx.batch_execute(m.sql).await?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
            &[&m.version, &m.name],
        )
        .await?;
        tx.commit().await?;
        tracing::info!(version = m.version, name = m.name, "applied migration");
        ran += 1;
    }
    Ok(ran)
}
