//! What the engine is started with. Read once by [`Engine::start`](crate::Engine::start) and
//! handed to each shard by value: shards never read global configuration.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    ops::RangeInclusive,
    path::PathBuf,
    time::Duration,
};

use crate::{EngineError, routing::rtp_pair_count};

/// How many shards to run and what they bind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineConfig {
    /// Number of shards (glommio executors, one thread each); at least 1.
    pub shards: usize,
    /// Pin shard `i` to the `i % n`-th online CPU (n = online CPUs). Leave off in tests and
    /// wherever several engines share a machine.
    pub pin_cores: bool,
    /// The SIP/UDP address every shard binds with SO_REUSEPORT. Port 0 picks a free port (shard
    /// 0 binds first, the others join its port). `None` (`ENABLE_SIP_HANDLER=false`): shards run
    /// without a SIP socket and the RTP range is not checked.
    pub sip: Option<SocketAddr>,
    /// The RTP port range; each shard owns the slice [`rtp_port_slice`](crate::rtp_port_slice)
    /// gives it. With SIP enabled it must hold at least one even/odd (RTP/RTCP) pair per shard.
    pub rtp_ports: RangeInclusive<u16>,
    /// SO_RCVBUF asked for on each SIP socket. The default 208 KiB lost datagrams in bursts;
    /// 1 MiB lost none. The kernel caps it at `net.core.rmem_max` (a warning is logged then).
    pub recv_buffer_bytes: usize,
    /// glommio `io_memory` per shard: registered buffers for io_uring, allocated up front and
    /// fully resident. glommio's own default is 10 MiB; above about 1 MiB a non-root process
    /// with the default 8 MiB memlock limit silently skips registering it.
    pub io_memory_bytes: usize,
    /// `SIP_ADVERTISED_IP`: the address put in SDP and Contact behind NAT (default: the bound
    /// address).
    pub advertised_ip: Option<IpAddr>,
    /// `SIP_TRUSTED_CIDRS`: the only SIP sources served (others get `403`); empty: any.
    pub sip_trusted: Vec<precall_sip::Cidr>,
    /// `SIP_FORCE_RPORT`: answer SIP at the request's source port even without `rport`.
    pub sip_force_rport: bool,
    /// `SIP_DIGEST_USERS`/`SIP_DIGEST_REALM`: INVITEs from outside `sip_trusted` (from anyone,
    /// with no list) must authenticate (RFC 8760); `None`: no digest authentication.
    pub sip_digest: Option<precall_sip::DigestConfig>,
    /// `SHARD_MAX_CALLS`: calls one shard holds at most (SIP and Twilio streams together);
    /// past it a new INVITE gets `503` + `Retry-After` before any record is made, and a new
    /// stream is closed (Twilio goes on in the poll flow).
    pub max_calls_per_shard: usize,
    /// `ADMIT_CLOCK_LATE_MS`: a shard whose media clock wakes later than this on more than 1 %
    /// of its ticks in a second refuses new calls (`503` + `Retry-After`, OPTIONS too) until
    /// it keeps time again. Zero turns this reading off.
    pub admit_clock_late: Duration,
    /// `ADMIT_CLOCK_BUSY_PERCENT`: the clock's lateness (and the SIP datagrams' wait) counts
    /// only while the shard's thread was on the CPU at least this share of the window (0-100;
    /// zero: every late clock counts).
    pub admit_clock_busy_percent: u8,
    /// `ADMIT_SIP_LAG_MS`: a shard every one of whose SIP datagrams waited longer than this
    /// (from the kernel's arrival to the shard's reading) for 100 ms refuses new calls the same
    /// way, until one is on time. Zero turns this reading off.
    pub admit_sip_lag: Duration,
    /// `ADMIT_INBOX_DEPTH`: a shard with more SIP datagrams than this waiting in its inbox
    /// refuses new calls the same way. Zero turns this reading off.
    pub admit_inbox_depth: usize,
    /// `ADMIT_SETUP_DEPTH`: while this many of a shard's new calls wait for the control
    /// plane's first plan, its next INVITE gets a stateless `503` + `Retry-After` (checked
    /// per INVITE, not held). Zero turns this reading off.
    pub admit_setup_depth: usize,
    /// `RTP_TIMEOUT_MS`: no RTP from the caller for this long ends the call with BYE.
    pub rtp_timeout: Duration,
    /// `RTP_STRICT_SOURCE`: take a call's RTP only from the SDP `c=` address or the INVITE's
    /// source IP (after a few consecutive packets of one SSRC, always). Off for trunks whose
    /// media comes from other addresses than their signalling and SDP say: then any source
    /// can take a call's audio with a few packets.
    pub rtp_strict_source: bool,
    /// Longest a ringing call waits for the control plane's plan before it is refused with
    /// `500`. Covers a reply lost to a full inbox; set it above the controller's own deadline
    /// plus the time to fetch clips.
    pub plan_timeout: Duration,
    /// The agent leg's TCP + TLS + WebSocket handshake must finish within this
    /// (`AGENT_CONNECT_TIMEOUT_MS`).
    pub agent_connect_timeout: Duration,
    /// From the open agent socket to its first audio (`AGENT_FIRST_AUDIO_TIMEOUT_MS`); hold
    /// plays meanwhile.
    pub agent_first_audio_timeout: Duration,
    /// Caller audio per `user_audio_chunk` message (`AGENT_CHUNK_MS`, a multiple of 20 ms).
    pub agent_chunk: Duration,
    /// A PEM file of CAs trusted for `wss://` agents beside the system's (`AGENT_TLS_CA_FILE`).
    pub agent_tls_ca_file: Option<PathBuf>,
    /// The Twilio Media Streams server every shard runs; `None`: no streams.
    pub media_streams: Option<MediaStreamsConfig>,
}

/// The Twilio Media Streams WebSocket server of the shards.
#[derive(Clone, PartialEq, Eq)]
pub struct MediaStreamsConfig {
    /// Where every shard listens (SO_REUSEPORT); port 0 picks one (shard 0 binds first).
    pub addr: SocketAddr,
    /// The stream URL as Twilio was given it in TwiML: the upgrade's `X-Twilio-Signature` is
    /// over this URL (with the request's query, if any).
    pub public_url: String,
    /// `TWILIO_AUTH_TOKEN`: signs the upgrade request. `None` with `skip_signature` false
    /// refuses every stream (403).
    pub auth_token: Option<String>,
    /// `TWILIO_SKIP_SIGNATURE`: accept unsigned upgrades (development only).
    pub skip_signature: bool,
}

impl std::fmt::Debug for MediaStreamsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MediaStreamsConfig")
            .field("addr", &self.addr)
            .field("public_url", &self.public_url)
            .field("signed", &self.auth_token.is_some())
            .field("skip_signature", &self.skip_signature)
            .finish()
    }
}

impl EngineConfig {
    /// Default for [`EngineConfig::recv_buffer_bytes`]: 8 MiB (about 6,000 SIP datagrams: 150 ms of
    /// a trunk at 15,000 calls/s, all of which lands on one shard's socket).
    pub const DEFAULT_RECV_BUFFER_BYTES: usize = 8 << 20;
    /// Default for [`EngineConfig::io_memory_bytes`]: 1 MiB.
    pub const DEFAULT_IO_MEMORY_BYTES: usize = 1 << 20;

    /// Checks what can be checked before starting any thread.
    pub fn validate(&self) -> Result<(), EngineError> {
        if self.shards == 0 {
            return Err(EngineError::InvalidConfig { reason: "shards must be at least 1" });
        }
        if self.rtp_timeout.is_zero() || self.plan_timeout.is_zero() {
            return Err(EngineError::InvalidConfig {
                reason: "rtp_timeout and plan_timeout must be positive",
            });
        }
        let chunk = self.agent_chunk.as_millis();
        if chunk == 0 || !chunk.is_multiple_of(20) || chunk > 1000 {
            return Err(EngineError::InvalidConfig {
                reason: "agent_chunk must be a multiple of 20 ms, at most 1 s",
            });
        }
        if self.recv_buffer_bytes == 0 {
            return Err(EngineError::InvalidConfig {
                reason: "recv_buffer_bytes must be positive",
            });
        }
        if self.sip.is_some() && rtp_pair_count(&self.rtp_ports) < self.shards {
            return Err(EngineError::InvalidConfig {
                reason: "the RTP range needs at least one even-aligned RTP/RTCP port pair per shard",
            });
        }
        Ok(())
    }
}

impl Default for EngineConfig {
    /// One unpinned shard on SIP 0.0.0.0:5060, RTP 10000-32767 (11,384 calls), 8 MiB buffers, RTP timeout
    /// 30 s, plan timeout 15 s.
    fn default() -> Self {
        Self {
            shards: 1,
            pin_cores: false,
            sip: Some(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 5060))),
            rtp_ports: 10000..=32767,
            recv_buffer_bytes: Self::DEFAULT_RECV_BUFFER_BYTES,
            io_memory_bytes: Self::DEFAULT_IO_MEMORY_BYTES,
            advertised_ip: None,
            sip_trusted: Vec::new(),
            sip_force_rport: false,
            sip_digest: None,
            max_calls_per_shard: 10_240,
            admit_clock_late: Duration::from_millis(10),
            admit_clock_busy_percent: crate::admission::BUSY_SHARE_PERCENT,
            admit_sip_lag: crate::admission::SIP_LAG,
            admit_inbox_depth: 4096,
            admit_setup_depth: 1024,
            rtp_timeout: Duration::from_secs(30),
            rtp_strict_source: true,
            plan_timeout: Duration::from_secs(15),
            agent_connect_timeout: Duration::from_secs(5),
            agent_first_audio_timeout: Duration::from_secs(10),
            agent_chunk: Duration::from_millis(40),
            agent_tls_ca_file: None,
            media_streams: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_valid() {
        assert!(EngineConfig::default().validate().is_ok());
    }

    #[test]
    fn rejects_zero_shards() {
        let cfg = EngineConfig { shards: 0, ..EngineConfig::default() };
        assert!(matches!(cfg.validate(), Err(EngineError::InvalidConfig { .. })));
    }

    #[test]
    fn rejects_rtp_range_smaller_than_one_pair_per_shard() {
        // 16385..=16388 holds only the pair 16386/16387.
        let cfg = EngineConfig { shards: 2, rtp_ports: 16385..=16388, ..EngineConfig::default() };
        assert!(matches!(cfg.validate(), Err(EngineError::InvalidConfig { .. })));
        // Without SIP there is no RTP, so the range is not checked.
        let cfg = EngineConfig { sip: None, ..cfg };
        assert!(cfg.validate().is_ok());
    }
}
