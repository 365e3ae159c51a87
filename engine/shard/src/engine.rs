//! The engine handle: starts the shards, reaches them, reads their health, stops them.

use std::{net::SocketAddr, sync::Arc};

use crossbeam_channel::Receiver;
use glommio::{
    BuilderErrorKind, CpuSet, ExecutorJoinHandle, GlommioError, LocalExecutorBuilder, Placement,
};
use precall_api::CallId;
use precall_call::FlowConfig;

use crate::{
    EngineConfig, EngineError, SendError, ShardHealth, ShardMsg,
    control::ShardControl,
    health::ShardStats,
    inbox::{INBOX_CAPACITY, InboxSender, inbox},
    routing::rtp_port_slice,
    shard::{self, CallSettings, Reporter, ShardParams, StartReport},
};

/// The running shards. Dropping it without [`Engine::shutdown`] stops and joins them too, but
/// discards their errors.
#[derive(Debug)]
pub struct Engine {
    shards: Vec<ShardHandle>,
    sip_addr: Option<SocketAddr>,
    media_streams_addr: Option<SocketAddr>,
}

#[derive(Debug)]
struct ShardHandle {
    index: usize,
    inbox: InboxSender,
    stats: Arc<ShardStats>,
    /// `None` once joined.
    thread: Option<ExecutorJoinHandle<()>>,
}

type Reports = Receiver<(usize, StartReport)>;

impl Engine {
    /// Starts `cfg.shards` glommio executors, each binding its own SIP socket on `cfg.sip`, and
    /// returns once every shard has reported that it runs. On the first failure the shards
    /// already started are stopped and joined, and that failure is returned.
    ///
    /// Shards ask `control` for the plan of each SIP call (see [`ShardControl`]).
    pub fn start(cfg: EngineConfig, control: Arc<dyn ShardControl>) -> Result<Engine, EngineError> {
        cfg.validate()?;
        let cpus = if cfg.pin_cores { Some(online_cpus()?) } else { None };
        let (report_tx, reports) = crossbeam_channel::bounded(cfg.shards);
        let mut engine = Engine {
            shards: Vec::with_capacity(cfg.shards),
            sip_addr: None,
            media_streams_addr: None,
        };
        // Every inbox exists before any shard starts: each shard gets all senders, to forward
        // datagrams to the shard that owns their Call-ID.
        let (senders, receivers): (Vec<_>, Vec<_>) =
            (0..cfg.shards).map(|_| inbox(INBOX_CAPACITY)).unzip();
        let mut receivers: Vec<_> = receivers.into_iter().map(Some).collect();
        let extra_ca = match &cfg.agent_tls_ca_file {
            Some(path) => Some(std::fs::read(path).map_err(|e| EngineError::AgentTls {
                reason: format!("cannot read AGENT_TLS_CA_FILE {}: {e}", path.display()),
            })?),
            None => None,
        };
        let agent_tls = crate::agent_leg::tls_config(extra_ca.as_deref())
            .map_err(|reason| EngineError::AgentTls { reason })?;
        let settings = CallSettings {
            advertised_ip: cfg.advertised_ip,
            sip_trusted: cfg.sip_trusted.clone(),
            sip_force_rport: cfg.sip_force_rport,
            sip_digest: cfg.sip_digest.clone(),
            flow: FlowConfig {
                rtp_timeout: cfg.rtp_timeout,
                plan_timeout: cfg.plan_timeout,
                agent_connect_timeout: cfg.agent_connect_timeout,
                agent_first_audio_timeout: cfg.agent_first_audio_timeout,
                agent_chunk: cfg.agent_chunk,
                ..FlowConfig::default()
            },
            agent_tls: Some(Arc::new(agent_tls)),
            strict_rtp_source: cfg.rtp_strict_source,
            max_calls: cfg.max_calls_per_shard,
            admission: crate::admission::Limits {
                max_clock_late: cfg.admit_clock_late,
                clock_busy_percent: cfg.admit_clock_busy_percent,
                max_inbox_depth: cfg.admit_inbox_depth,
                max_sip_lag: cfg.admit_sip_lag,
                max_setup_depth: cfg.admit_setup_depth,
            },
            overloaded_shards: Arc::default(),
        };
        let mut spawn = |engine: &mut Engine,
                         index: usize,
                         sip: Option<SocketAddr>,
                         media: Option<SocketAddr>| {
            let placement = match &cpus {
                Some(cpus) => Placement::Fixed(cpus[index % cpus.len()]),
                None => Placement::Unbound,
            };
            let tx = senders[index].clone();
            let rx = receivers[index].take().expect("each shard is spawned once");
            let stats = Arc::new(ShardStats::default());
            let params = ShardParams {
                index,
                sip,
                media_streams: cfg
                    .media_streams
                    .clone()
                    .map(|m| crate::MediaStreamsConfig { addr: media.unwrap_or(m.addr), ..m }),
                recv_buffer_bytes: cfg.recv_buffer_bytes,
                rtp_ports: rtp_port_slice(cfg.rtp_ports.clone(), index, cfg.shards),
                stats: stats.clone(),
                inbox: rx,
                peers: senders.clone(),
                control: control.clone(),
                settings: settings.clone(),
                reporter: Reporter::new(index, report_tx.clone()),
            };
            let thread = LocalExecutorBuilder::new(placement)
                .name(&format!("shard-{index}"))
                .io_memory(cfg.io_memory_bytes)
                .spawn(move || shard::run(params))
                .map_err(|e| EngineError::ShardStart { shard: index, source: e.into() })?;
            engine.shards.push(ShardHandle { index, inbox: tx, stats, thread: Some(thread) });
            Ok(())
        };

        // Shard 0 binds first: with port 0 the kernel picks a port, which the others then share.
        let media = cfg.media_streams.as_ref().map(|m| m.addr);
        if let Err(err) = spawn(&mut engine, 0, cfg.sip, media) {
            return Err(engine.abort(err));
        }
        match engine.await_report(&reports) {
            Ok((sip, media)) => {
                engine.sip_addr = sip;
                engine.media_streams_addr = media;
            }
            Err(err) => return Err(engine.abort(err)),
        }
        let (sip, media) = (engine.sip_addr, engine.media_streams_addr);
        for index in 1..cfg.shards {
            if let Err(err) = spawn(&mut engine, index, sip, media) {
                return Err(engine.abort(err));
            }
        }
        for _ in 1..cfg.shards {
            if let Err(err) = engine.await_report(&reports) {
                return Err(engine.abort(err));
            }
        }
        tracing::info!(shards = cfg.shards, sip = ?engine.sip_addr, media_streams = ?engine.media_streams_addr, "engine started");
        Ok(engine)
    }

    /// The SIP address every shard listens on (with the port the kernel chose for port 0), or
    /// `None` when SIP is disabled.
    pub fn sip_addr(&self) -> Option<SocketAddr> {
        self.sip_addr
    }

    /// The address every shard's Twilio Media Streams server listens on (with the port the
    /// kernel chose for port 0), or `None` when streams are off.
    pub fn media_streams_addr(&self) -> Option<SocketAddr> {
        self.media_streams_addr
    }

    /// How many shards run.
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// A snapshot of every shard's counters, in shard order.
    pub fn health(&self) -> Vec<ShardHealth> {
        self.shards.iter().map(|s| s.stats.snapshot(s.index)).collect()
    }

    /// Puts `msg` in shard `shard`'s inbox and wakes it. Never blocks.
    pub fn send(&self, shard: usize, msg: ShardMsg) -> Result<(), SendError> {
        let handle = self
            .shards
            .get(shard)
            .ok_or(SendError::NoSuchShard { shard, shards: self.shards.len() })?;
        handle.inbox.send(msg)
    }

    /// Starts a graceful stop: every shard answers new INVITEs and OPTIONS `503` with
    /// `Retry-After` from now on, and its calls go on. Returns how many shards were told (a
    /// shard with a full inbox is told nothing now; ask again).
    pub fn drain(&self) -> usize {
        self.shards.iter().filter(|s| s.inbox.send(ShardMsg::Drain).is_ok()).count()
    }

    /// Calls the shards hold right now (SIP calls and Twilio streams).
    pub fn active_calls(&self) -> u64 {
        self.shards.iter().map(|s| s.stats.snapshot(s.index).active_calls).sum()
    }

    /// Tells every shard that the clone job of `calls` finished: the shard holding any of them
    /// checks it at once instead of at its next poll. Never blocks; a full inbox loses only the
    /// shortcut (the call's own poll still comes).
    pub fn recheck(&self, calls: Vec<CallId>) {
        if calls.is_empty() {
            return;
        }
        let calls: std::sync::Arc<[CallId]> = calls.into();
        for shard in &self.shards {
            let _ = shard.inbox.send(ShardMsg::Recheck(calls.clone()));
        }
    }

    /// Stops every shard and joins its thread. Every shard is joined even after an error; the
    /// first error (in shard order) is returned. A shard that panicked is reported as
    /// [`EngineError::ShardPanicked`], not re-raised.
    pub fn shutdown(mut self) -> Result<(), EngineError> {
        let result = self.stop_and_join();
        tracing::info!(ok = result.is_ok(), "engine stopped");
        result
    }

    /// Waits for the next start report; `Ok` carries the shard's SIP and media streams
    /// addresses.
    fn await_report(
        &mut self,
        reports: &Reports,
    ) -> Result<(Option<SocketAddr>, Option<SocketAddr>), EngineError> {
        // Every shard's `Reporter` sends exactly once, even when its thread dies first, so
        // this cannot wait for a shard that is gone.
        let (shard, report) = reports.recv().map_err(|_| EngineError::ShardStart {
            shard: self.shards.len(),
            source: std::io::Error::other("start report channel closed"),
        })?;
        match report {
            StartReport::Started(sip, media) => Ok((sip, media)),
            StartReport::Failed(err) => Err(err),
            StartReport::Vanished => {
                let joined = self.shards[shard].thread.take().map(|t| join_shard(shard, t));
                Err(match joined {
                    Some(Err(err)) => err,
                    _ => EngineError::ShardStart {
                        shard,
                        source: std::io::Error::other("shard exited before reporting"),
                    },
                })
            }
        }
    }

    /// Stops what started, joins it, and hands back the error that caused the abort.
    fn abort(mut self, err: EngineError) -> EngineError {
        if let Err(other) = self.stop_and_join() {
            tracing::debug!(error = %other, "while aborting the start");
        }
        err
    }

    fn stop_and_join(&mut self) -> Result<(), EngineError> {
        for shard in &self.shards {
            shard.inbox.request_stop();
        }
        let mut result = Ok(());
        for shard in &mut self.shards {
            if let Some(thread) = shard.thread.take() {
                let joined = join_shard(shard.index, thread);
                if result.is_ok() {
                    result = joined;
                }
            }
        }
        result
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if let Err(err) = self.stop_and_join() {
            tracing::error!(error = %err, "engine dropped without shutdown");
        }
    }
}

fn join_shard(shard: usize, thread: ExecutorJoinHandle<()>) -> Result<(), EngineError> {
    match thread.join() {
        Ok(()) => Ok(()),
        Err(GlommioError::BuilderError(BuilderErrorKind::ThreadPanic(_))) => {
            Err(EngineError::ShardPanicked { shard })
        }
        Err(err) => Err(EngineError::ShardStart { shard, source: err.into() }),
    }
}

/// Online CPU ids in ascending order; shard `i` is pinned to entry `i % len`.
fn online_cpus() -> Result<Vec<usize>, EngineError> {
    let set = CpuSet::online().map_err(|e| EngineError::CpuTopology { source: e.into() })?;
    let mut cpus: Vec<usize> = set.into_iter().map(|loc| loc.cpu).collect();
    cpus.sort_unstable();
    cpus.dedup();
    if cpus.is_empty() {
        return Err(EngineError::CpuTopology {
            source: std::io::Error::other("no online CPU found"),
        });
    }
    Ok(cpus)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shard_panic_is_an_error_naming_the_shard() {
        let cfg = EngineConfig { shards: 2, sip: None, ..EngineConfig::default() };
        let engine = Engine::start(cfg, crate::control::tests::NoControl::arc()).unwrap();
        engine.send(1, ShardMsg::PanicForTest).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while engine.health()[1].alive {
            assert!(std::time::Instant::now() < deadline, "shard 1 never died");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert!(engine.health()[0].alive);
        assert!(matches!(engine.shutdown(), Err(EngineError::ShardPanicked { shard: 1 })));
    }
}
