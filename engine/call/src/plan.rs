//! What the control plane hands a call: the controller's instructions with their clips made
//! ready, and, for a `connect`, where the agent is (resolved by the control plane, so a shard
//! never waits on DNS or HTTP).

use std::net::SocketAddr;
use std::sync::Arc;

use precall_api::CallInstructions;
use precall_media::EncodedClip;

/// The clips a plan needs, already fetched, decoded and G.711-encoded by the control plane
/// (shards do no HTTP and no decoding). `None` when the instructions name no such clip or it
/// could not be made ready: the call then plays without it.
#[derive(Debug, Clone, Default)]
pub struct MediaPlan {
    /// Played once, first.
    pub greeting: Option<Arc<EncodedClip>>,
    /// Looped after the greeting while the call waits (also while the agent leg opens).
    pub hold: Option<Arc<EncodedClip>>,
    /// Played before a hang-up that the shard or the controller decides.
    pub error: Option<Arc<EncodedClip>>,
}

/// Where to open the agent WebSocket: the URL to request (a signed URL for private agents,
/// used once), and the address its host resolved to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentTarget {
    /// `ws://` or `wss://` URL, path and query included.
    pub url: String,
    /// The host of the URL (TLS server name and `Host` header).
    pub host: String,
    /// Resolved address to connect to.
    pub addr: SocketAddr,
    /// `wss://`.
    pub tls: bool,
}

/// Why the control plane could not make an agent target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentUnavailable(pub String);

/// The controller's instructions for one call, with what they need made ready.
#[derive(Debug, Clone)]
pub struct ShardPlan {
    /// What to do.
    pub instructions: CallInstructions,
    /// The clips the instructions name.
    pub media: MediaPlan,
    /// For a `connect`: the agent, or why it cannot be reached.
    pub agent: Option<Result<AgentTarget, AgentUnavailable>>,
}
