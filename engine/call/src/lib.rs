//! precall's call flow, sans-IO: what happens to one call from the controller's plan to its
//! last frame, and the agent bridge it leads to.
//!
//! Nothing here opens a socket, spawns, sleeps or reads the clock: the shard (or a test with
//! a fake clock) passes `(now, input)` in and drains actions, frames and the next deadline out
//! (see [`CallFlow`] for the order). The crate depends on no runtime, so that stays a fact.
//!
//! Files, one concern each: [`flow`] (phases, timers, playout, the switch-over from hold to the
//! agent, endings), [`agent`] (the ElevenLabs Agents messages), [`convert`] (G.711 ↔ the agent's
//! audio format), [`reorder`] (the caller's RTP on its way to the agent), [`plan`] (what the
//! control plane hands a call).
#![forbid(unsafe_code)]

pub mod agent;
pub mod convert;
pub mod flow;
pub mod plan;
pub mod reorder;
pub mod twilio;

pub use agent::AgentFormat;
pub use flow::{
    Action, CallFlow, CallInfo, FlowConfig, FlowStats, Frame, Latencies, Phase, reason, refusal,
};
pub use plan::{AgentTarget, AgentUnavailable, MediaPlan, ShardPlan};
