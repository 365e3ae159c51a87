//! Store implementations of the control plane. The in-memory store lives with the controller
//! (`precall_controller::MemoryStore`); PostgreSQL lives here because it needs tokio.

mod batch;
mod migrate;
mod postgres;

pub use migrate::{MIGRATIONS, Migration};
pub use postgres::{PgStore, PgStoreConfig};
