//! Configuration from the environment (and `.env` when present), with the seed's names.
//!
//! Every variable is listed once in [`VARS`]: `precall --help` prints that table, the README
//! mirrors it, and [`Config::from_lookup`] reads exactly those names. A bad value stops the
//! start with a message naming the variable and what it expected.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

/// One configuration variable: its name, default (as shown) and meaning.
#[derive(Debug, Clone, Copy)]
pub struct Var {
    /// Environment variable name.
    pub name: &'static str,
    /// The default, as shown in `--help` (`-` when unset by default).
    pub default: &'static str,
    /// What it does.
    pub help: &'static str,
}

/// Every variable precall reads.
pub const VARS: &[Var] = &[
    Var {
        name: "HTTP_HOST",
        default: "0.0.0.0",
        help: "address of the HTTP control plane (Twilio webhooks, /health, /metrics)",
    },
    Var { name: "HTTP_PORT", default: "8000", help: "port of the HTTP control plane" },
    Var {
        name: "METRICS_ADDR",
        default: "-",
        help: "an address such as 127.0.0.1:9100 to serve /metrics and /health on a listener of \
               their own (then the control plane's port no longer serves /metrics)",
    },
    Var {
        name: "HTTP_MAX_CONNECTIONS",
        default: "10000",
        help: "HTTP connections open at once at most; one more gets 503 + Retry-After and is \
               closed",
    },
    Var {
        name: "PUBLIC_BASE_URL",
        default: "http://127.0.0.1:HTTP_PORT",
        help: "the URL Twilio uses to reach precall (signatures, TwiML URLs)",
    },
    Var {
        name: "ENABLE_SIP_HANDLER",
        default: "true",
        help: "serve native SIP on the engine shards",
    },
    Var {
        name: "SIP_HOST",
        default: "0.0.0.0",
        help: "address of the SIP/UDP socket (every shard binds it with SO_REUSEPORT)",
    },
    Var { name: "SIP_PORT", default: "5060", help: "port of the SIP/UDP socket" },
    Var {
        name: "SIP_ADVERTISED_IP",
        default: "-",
        help: "address put in SDP and Contact when behind NAT (default: the bound address)",
    },
    Var {
        name: "SIP_TRUSTED_CIDRS",
        default: "-",
        help: "comma-separated networks (198.51.100.0/24) or addresses allowed to send SIP; \
               others get 403 (unset: any source, logged loudly at start)",
    },
    Var {
        name: "SIP_DIGEST_USERS",
        default: "-",
        help: "comma-separated user:password pairs; an INVITE from outside SIP_TRUSTED_CIDRS (from \
               anyone, with no list) must answer a digest challenge (RFC 8760: SHA-256, MD5)",
    },
    Var { name: "SIP_DIGEST_REALM", default: "precall", help: "realm of the digest challenge" },
    Var {
        name: "SIP_DIGEST_ALGORITHMS",
        default: "SHA-256,MD5",
        help: "digest algorithms challenged, in order of preference (RFC 8760); MD5 alone for \
               clients that give up when the first challenge is SHA-256 (SIPp 3.6)",
    },
    Var {
        name: "SIP_FORCE_RPORT",
        default: "false",
        help: "answer SIP at the request's source port even when its Via has no rport (for \
               phones behind NAT; default: the Via sent-by port, RFC 3261 18.2.2)",
    },
    Var {
        name: "SHARDS",
        default: "one per core",
        help: "number of engine shards (glommio executors)",
    },
    Var { name: "SHARD_PIN_CORES", default: "true", help: "pin shard i to core i" },
    Var {
        name: "SHARD_MAX_CALLS",
        default: "10240",
        help: "calls one shard holds at most (SIP and Twilio streams); past it, or with every \
               RTP port of the shard taken, new INVITEs get 503 + Retry-After before any record \
               is made",
    },
    Var {
        name: "ADMIT_CLOCK_LATE_MS",
        default: "10",
        help: "overload admission: a shard whose media clock wakes later than this on more than \
               1 % of its ticks in a second answers new INVITEs and OPTIONS 503 + Retry-After \
               until it keeps time again (0: off)",
    },
    Var {
        name: "ADMIT_CLOCK_BUSY_PERCENT",
        default: "25",
        help: "overload admission: the media clock's lateness (and the SIP datagrams' wait) \
               counts only while the shard's thread was busy at least this share of the second \
               (of the 100 ms; a mostly idle shard is late because the machine does not run it, \
               and refusing calls would not cure that; 0: every late clock counts)",
    },
    Var {
        name: "ADMIT_SIP_LAG_MS",
        default: "20",
        help: "overload admission: a shard whose SIP datagrams all waited longer than this \
               (from the kernel's arrival to the shard's reading, inbox included) for 100 ms \
               refuses new calls the same way, until one is on time (0: off)",
    },
    Var {
        name: "ADMIT_INBOX_DEPTH",
        default: "4096",
        help: "overload admission: a shard with more SIP datagrams than this waiting in its \
               inbox refuses new calls the same way (0: off; the inbox holds 16384)",
    },
    Var {
        name: "ADMIT_SETUP_DEPTH",
        default: "1024",
        help: "overload admission: while this many of a shard's new calls wait for the control \
               plane's first plan, its next INVITE gets a stateless 503 + Retry-After (0: off)",
    },
    Var {
        name: "RTP_PORT_MIN",
        default: "10000",
        help: "lowest RTP port; each shard owns a slice of the range",
    },
    Var {
        name: "RTP_PORT_MAX",
        default: "32767",
        help: "highest RTP port (the default range holds 11,384 calls per node, one even RTP port \
               each, and stays below the kernel's ephemeral ports)",
    },
    Var {
        name: "RTP_TIMEOUT_MS",
        default: "30000",
        help: "no RTP from the caller for this long ends the call",
    },
    Var {
        name: "RTP_STRICT_SOURCE",
        default: "true",
        help: "take a call's RTP only from its SDP or INVITE address (false: from any address \
               after 3 packets; for trunks whose media comes from elsewhere; see OPERATIONS.md)",
    },
    Var {
        name: "MEDIA_WS_PORT",
        default: "8001",
        help: "port of the Twilio Media Streams WebSocket server (on HTTP_HOST, every shard)",
    },
    Var {
        name: "TWILIO_STREAM_URL",
        default: "from PUBLIC_BASE_URL",
        help: "the <Stream> URL put in TwiML (and signed by Twilio): default \
               ws://HOST:MEDIA_WS_PORT/twilio/media for an http:// PUBLIC_BASE_URL, \
               wss://HOST/twilio/media (a TLS proxy in front) for https://",
    },
    Var {
        name: "TWILIO_HOLD_MODE",
        default: "stream",
        help: "stream: answer <Connect><Stream> at once, hold and agent over the stream; \
               poll: <Play> hold + <Redirect> polling, the stream only for the agent",
    },
    Var {
        name: "DATABASE_URL",
        default: "-",
        help: "PostgreSQL URL; unset = in-memory store (lost at exit)",
    },
    Var { name: "DATABASE_POOL_SIZE", default: "8", help: "PostgreSQL connections" },
    Var {
        name: "MEMORY_STORE_CALLS",
        default: "20000",
        help: "the in-memory store (no DATABASE_URL) keeps this many calls; past it the oldest \
               ended ones are forgotten (about 1.2 KB each)",
    },
    Var {
        name: "TWILIO_AUTH_TOKEN",
        default: "-",
        help: "validates X-Twilio-Signature; unset = /twilio/* answers 403",
    },
    Var {
        name: "TWILIO_SKIP_SIGNATURE",
        default: "false",
        help: "accept unsigned Twilio webhooks (development only; logged loudly)",
    },
    Var {
        name: "TWILIO_PUSH",
        default: "true",
        help: "poll hold mode: push each held call on with Twilio's REST API as soon as its \
               clone is ready or failed, or its hold limit passed (polling stays the fallback)",
    },
    Var {
        name: "TWILIO_API_BASE",
        default: "https://api.twilio.com",
        help: "Twilio REST base URL (the live-call push)",
    },
    Var {
        name: "TWILIO_ACCOUNT_SID",
        default: "-",
        help: "account whose auth token signs the push (a parent account's serves its \
               subaccounts); default: each call's own AccountSid",
    },
    Var {
        name: "TWILIO_API_KEY",
        default: "-",
        help: "API key SID (SK...) for the push; unset = AccountSid + TWILIO_AUTH_TOKEN",
    },
    Var { name: "TWILIO_API_SECRET", default: "-", help: "the API key's secret" },
    Var {
        name: "ELEVENLABS_API_KEY",
        default: "-",
        help: "ElevenLabs key; unset = simulated clone provider",
    },
    Var {
        name: "ELEVENLABS_API_BASE",
        default: "https://api.elevenlabs.io",
        help: "ElevenLabs REST base URL",
    },
    Var { name: "ELEVENLABS_AGENT_ID", default: "-", help: "agent of the default voice profile" },
    Var {
        name: "AGENT_WS_URL",
        default: "-",
        help: "agent WebSocket endpoint, agent_id appended (unset: ElevenLabs when \
               ELEVENLABS_AGENT_ID is set, else the embedded demo agent)",
    },
    Var {
        name: "AGENT_CONNECT_TIMEOUT_MS",
        default: "5000",
        help: "TCP, TLS and WebSocket handshake of the agent leg",
    },
    Var {
        name: "AGENT_FIRST_AUDIO_TIMEOUT_MS",
        default: "10000",
        help: "from the open agent socket to its first audio (hold plays meanwhile)",
    },
    Var {
        name: "AGENT_CHUNK_MS",
        default: "40",
        help: "caller audio per user_audio_chunk message (a multiple of 20)",
    },
    Var {
        name: "AGENT_TLS_CA_FILE",
        default: "-",
        help: "PEM file of extra CAs for wss:// agents (self-hosted agents, tests)",
    },
    Var {
        name: "VOICE_SAMPLE_URLS",
        default: "-",
        help: "comma-separated sample URLs of the default voice profile",
    },
    Var {
        name: "VOICE_PROFILES_FILE",
        default: "-",
        help: "JSON file of voice profiles by dialed number (see README)",
    },
    Var {
        name: "GREETING_AUDIO_URL",
        default: "PUBLIC_BASE_URL/audio/greeting.wav",
        help: "greeting clip (http, https or file URL)",
    },
    Var {
        name: "HOLD_AUDIO_URL",
        default: "PUBLIC_BASE_URL/audio/hold.wav",
        help: "hold clip, looped while the clone is prepared",
    },
    Var {
        name: "ERROR_AUDIO_URL",
        default: "PUBLIC_BASE_URL/audio/error.wav",
        help: "recorded error message for SIP calls",
    },
    Var {
        name: "AUDIO_CACHE_DIR",
        default: "TMPDIR/precall-audio",
        help: "disk cache of fetched greeting, hold and error clips",
    },
    Var {
        name: "ERROR_MESSAGE",
        default: "We are sorry, we could not connect your call. Please try again later.",
        help: "said (Twilio <Say>) before hanging up on a failed call",
    },
    Var {
        name: "STATUS_POLL_INTERVAL_MS",
        default: "2000",
        help: "time between clone status checks",
    },
    Var {
        name: "MAX_HOLD_MS",
        default: "60000",
        help: "longest hold before the call gets the error message and is hung up",
    },
    Var {
        name: "CLONE_JOB_TIMEOUT_MS",
        default: "120000",
        help: "a clone job's deadline: the provider's work is cut off after this (its request \
               timeout is at most half of it) and the job fails, transiently",
    },
    Var {
        name: "CLONE_LEASE_MS",
        default: "10000",
        help: "the node running a clone job renews a lease on it every third of this; a job \
               whose lease lapses (its node died) is taken over by another node (at least 300)",
    },
    Var {
        name: "CLONE_RETRY_MS",
        default: "10000",
        help: "after a transient clone failure (429, 5xx, timeout), new calls of the profile get \
               the error message for this long, doubling per failed attempt, before one retries",
    },
    Var {
        name: "CLONE_RETRY_PERMANENT_MS",
        default: "900000",
        help: "the same after a permanent failure (bad key, quota, full voice library, rejected \
               samples); new samples retry at once",
    },
    Var {
        name: "CLONE_DELETE_REPLACED",
        default: "true",
        help: "delete a voice at the provider once new samples (or a removed profile) left it \
               unused and no call is on it; false keeps them (a full library still frees the \
               oldest unused one)",
    },
    Var {
        name: "CLONE_VERIFY_AFTER_MS",
        default: "3600000",
        help: "a reused voice the provider has not confirmed for this long is checked (GET \
               /v1/voices/{id}) before a call is sent to it; gone, the call waits on a new clone \
               (0: never check)",
    },
    Var {
        name: "CALL_RETENTION_DAYS",
        default: "30",
        help: "call records and their events (phone numbers: personal data) are deleted this \
               many days after the call started, in batches every minute (0: kept forever); the \
               in-memory store also forgets a call that never got an end after MAX_HOLD_MS plus \
               4 hours",
    },
    Var {
        name: "NODE_ID",
        default: "host:pid:random",
        help: "this node's name on the clone job leases it holds (unique per process)",
    },
    Var {
        name: "SIMULATED_CLONE_DELAY_MS",
        default: "8000",
        help: "simulated provider: time to finish a clone",
    },
    Var {
        name: "SIMULATED_CLONE_OUTCOME",
        default: "completed",
        help: "simulated provider: completed or failed",
    },
    Var {
        name: "CONTROL_REQUEST_TIMEOUT_MS",
        default: "5000",
        help: "longest a webhook or shard waits for the controller",
    },
    Var {
        name: "DRAIN_TIMEOUT_MS",
        default: "30000",
        help: "on SIGTERM: no new calls, calls up go on for at most this long, then BYE",
    },
    Var {
        name: "LOG_LEVEL",
        default: "info",
        help: "tracing filter (error, warn, info, debug, or a RUST_LOG-style filter)",
    },
];

/// A configuration value was not what it must be.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The value did not parse.
    #[error("{var}={value:?} is not valid: expected {expected}")]
    Invalid {
        /// The variable.
        var: &'static str,
        /// What was given.
        value: String,
        /// What it must be.
        expected: &'static str,
    },
    /// Two values do not fit together.
    #[error("{0}")]
    Inconsistent(String),
    /// The voice profiles file could not be used.
    #[error("VOICE_PROFILES_FILE {path}: {reason}")]
    ProfilesFile {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
}

/// How a Twilio call waits for its clone (`TWILIO_HOLD_MODE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldMode {
    /// `<Connect><Stream>` at once: greeting, hold and the agent over one media stream.
    Stream,
    /// The seed's flow: `<Play>` hold and `<Redirect>` to the poll URL; the stream carries
    /// the agent only.
    Poll,
}

/// The stream URL for a `PUBLIC_BASE_URL` (no trailing slash): a direct `http://host[:port]`
/// reaches the media port itself; an `https://` base means a TLS proxy in front (as in
/// `deploy/nginx.conf`), which serves the stream path on the same host.
pub fn derive_stream_url(public_base_url: &str, media_ws_port: u16) -> String {
    if let Some(rest) = public_base_url.strip_prefix("https://") {
        return format!("wss://{rest}/twilio/media");
    }
    let rest = public_base_url.strip_prefix("http://").unwrap_or(public_base_url);
    let authority = rest.split('/').next().unwrap_or(rest);
    let host = match authority.rsplit_once(':') {
        // `[v6]:port` or `host:port`; a bare `[v6]` has its last colon inside the brackets.
        Some((host, port)) if !port.contains(']') => host,
        _ => authority,
    };
    format!("ws://{host}:{media_ws_port}/twilio/media")
}

/// Which clone provider runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProviderConfig {
    /// ElevenLabs Instant Voice Cloning.
    ElevenLabs {
        /// `ELEVENLABS_API_KEY`.
        api_key: String,
        /// `ELEVENLABS_API_BASE`.
        api_base: String,
    },
    /// The simulated provider (no key set).
    Simulated {
        /// `SIMULATED_CLONE_DELAY_MS`.
        delay: Duration,
        /// `SIMULATED_CLONE_OUTCOME` is `failed`.
        fail: bool,
    },
}

/// The whole configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// HTTP control plane address.
    pub http_addr: SocketAddr,
    /// `METRICS_ADDR`.
    pub metrics_addr: Option<SocketAddr>,
    /// `HTTP_MAX_CONNECTIONS`.
    pub http_max_connections: usize,
    /// Base URL Twilio reaches us at, without trailing slash.
    pub public_base_url: String,
    /// SIP socket address, `None` when SIP is disabled.
    pub sip_addr: Option<SocketAddr>,
    /// Address advertised in SDP/Contact.
    pub sip_advertised_ip: Option<IpAddr>,
    /// `SIP_TRUSTED_CIDRS`; empty: any source.
    pub sip_trusted: Vec<precall_engine::Cidr>,
    /// `SIP_FORCE_RPORT`.
    pub sip_force_rport: bool,
    /// `SIP_DIGEST_USERS` and `SIP_DIGEST_REALM`.
    pub sip_digest: Option<precall_engine::DigestConfig>,
    /// Engine shards.
    pub shards: usize,
    /// Pin shards to cores.
    pub pin_cores: bool,
    /// `SHARD_MAX_CALLS`.
    pub shard_max_calls: usize,
    /// `ADMIT_CLOCK_LATE_MS` (zero: off).
    pub admit_clock_late: Duration,
    /// `ADMIT_CLOCK_BUSY_PERCENT` (0-100; zero: every late clock counts).
    pub admit_clock_busy_percent: u8,
    /// `ADMIT_SIP_LAG_MS` (zero: off).
    pub admit_sip_lag: Duration,
    /// `ADMIT_INBOX_DEPTH` (zero: off).
    pub admit_inbox_depth: usize,
    /// `ADMIT_SETUP_DEPTH` (zero: off).
    pub admit_setup_depth: usize,
    /// RTP port range.
    pub rtp_ports: std::ops::RangeInclusive<u16>,
    /// Caller RTP silence that ends a call.
    pub rtp_timeout: Duration,
    /// `RTP_STRICT_SOURCE`.
    pub rtp_strict_source: bool,
    /// Media Streams WebSocket port.
    pub media_ws_port: u16,
    /// The `<Stream url>` Twilio is given (`TWILIO_STREAM_URL`, or derived).
    pub twilio_stream_url: String,
    /// `TWILIO_HOLD_MODE`.
    pub twilio_hold_mode: HoldMode,
    /// PostgreSQL URL, `None` for the in-memory store.
    pub database_url: Option<String>,
    /// PostgreSQL pool size.
    pub database_pool_size: usize,
    /// `MEMORY_STORE_CALLS`: calls the in-memory store keeps.
    pub memory_store_calls: usize,
    /// Twilio auth token.
    pub twilio_auth_token: Option<String>,
    /// Accept unsigned webhooks.
    pub twilio_skip_signature: bool,
    /// `TWILIO_PUSH`.
    pub twilio_push: bool,
    /// `TWILIO_API_BASE`, no trailing slash.
    pub twilio_api_base: String,
    /// `TWILIO_ACCOUNT_SID`.
    pub twilio_account_sid: Option<String>,
    /// `TWILIO_API_KEY` and `TWILIO_API_SECRET`, when both are set.
    pub twilio_api_key: Option<(String, String)>,
    /// Clone provider.
    pub provider: ProviderConfig,
    /// Agent of the default profile.
    pub default_agent_id: String,
    /// `ELEVENLABS_API_BASE` (also the agent host when `ELEVENLABS_AGENT_ID` is set).
    pub elevenlabs_api_base: String,
    /// `AGENT_WS_URL`, when set.
    pub agent_ws_url: Option<String>,
    /// `AGENT_CONNECT_TIMEOUT_MS`.
    pub agent_connect_timeout: Duration,
    /// `AGENT_FIRST_AUDIO_TIMEOUT_MS`.
    pub agent_first_audio_timeout: Duration,
    /// `AGENT_CHUNK_MS`.
    pub agent_chunk: Duration,
    /// `AGENT_TLS_CA_FILE`.
    pub agent_tls_ca_file: Option<PathBuf>,
    /// Default profile samples.
    pub voice_sample_urls: Vec<String>,
    /// Voice profiles file.
    pub voice_profiles_file: Option<PathBuf>,
    /// Greeting clip URL.
    pub greeting_audio_url: String,
    /// Hold clip URL.
    pub hold_audio_url: String,
    /// Error clip URL.
    pub error_audio_url: String,
    /// Clip cache directory.
    pub audio_cache_dir: PathBuf,
    /// Error message text.
    pub error_message: String,
    /// Poll interval.
    pub status_poll_interval: Duration,
    /// Hold limit.
    pub max_hold: Duration,
    /// A clone job's deadline.
    pub clone_job_timeout: Duration,
    /// `CLONE_LEASE_MS`.
    pub clone_lease: Duration,
    /// `CLONE_RETRY_MS`.
    pub clone_retry: Duration,
    /// `CLONE_RETRY_PERMANENT_MS`.
    pub clone_retry_permanent: Duration,
    /// `CLONE_DELETE_REPLACED`.
    pub clone_delete_replaced: bool,
    /// `CLONE_VERIFY_AFTER_MS`.
    pub clone_verify_after: Duration,
    /// `CALL_RETENTION_DAYS` (zero: forever).
    pub call_retention: Duration,
    /// `NODE_ID`, or a name made at start.
    pub node_id: String,
    /// Controller request deadline.
    pub control_request_timeout: Duration,
    /// `DRAIN_TIMEOUT_MS`.
    pub drain_timeout: Duration,
    /// Log filter.
    pub log_level: String,
}

fn default_of(name: &str) -> &'static str {
    VARS.iter().find(|v| v.name == name).map_or("", |v| v.default)
}

struct Reader<'a> {
    get: &'a dyn Fn(&str) -> Option<String>,
}

impl Reader<'_> {
    /// The value if set and not blank.
    fn raw(&self, var: &'static str) -> Option<String> {
        debug_assert!(VARS.iter().any(|v| v.name == var), "{var} missing from VARS");
        (self.get)(var).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty())
    }

    fn string(&self, var: &'static str) -> String {
        self.raw(var).unwrap_or_else(|| default_of(var).to_owned())
    }

    fn parse<T: std::str::FromStr>(
        &self,
        var: &'static str,
        expected: &'static str,
    ) -> Result<T, ConfigError> {
        let value = self.string(var);
        value.parse().map_err(|_| ConfigError::Invalid { var, value, expected })
    }

    /// A count that must be at least 1.
    fn positive(&self, var: &'static str, expected: &'static str) -> Result<usize, ConfigError> {
        match self.parse::<usize>(var, expected)? {
            0 => Err(ConfigError::Invalid { var, value: "0".to_owned(), expected }),
            n => Ok(n),
        }
    }

    /// A share from 0 to 100.
    fn percent(&self, var: &'static str) -> Result<u8, ConfigError> {
        const EXPECTED: &str = "a whole percentage, 0 to 100";
        match self.parse::<u8>(var, EXPECTED)? {
            n @ 0..=100 => Ok(n),
            n => Err(ConfigError::Invalid { var, value: n.to_string(), expected: EXPECTED }),
        }
    }

    fn bool(&self, var: &'static str) -> Result<bool, ConfigError> {
        let value = self.string(var);
        match value.to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => Ok(true),
            "0" | "false" | "no" | "off" => Ok(false),
            _ => Err(ConfigError::Invalid { var, value, expected: "true or false" }),
        }
    }

    fn millis(&self, var: &'static str) -> Result<Duration, ConfigError> {
        self.parse::<u64>(var, "a whole number of milliseconds").map(Duration::from_millis)
    }

    fn port(&self, var: &'static str) -> Result<u16, ConfigError> {
        self.parse(var, "a port number 0-65535")
    }

    fn ip(&self, var: &'static str) -> Result<IpAddr, ConfigError> {
        self.parse(var, "an IPv4 or IPv6 address")
    }

    fn url(
        &self,
        var: &'static str,
        schemes: &[&str],
        expected: &'static str,
    ) -> Result<Option<String>, ConfigError> {
        match self.raw(var) {
            None => Ok(None),
            Some(v) if schemes.iter().any(|s| v.starts_with(s) && v.len() > s.len()) => {
                Ok(Some(v.trim_end_matches('/').to_owned()))
            }
            Some(value) => Err(ConfigError::Invalid { var, value, expected }),
        }
    }
}

const AUDIO_SCHEMES: &[&str] = &["http://", "https://", "file://"];

impl Config {
    /// Reads the process environment (after `.env` was loaded into it).
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(&|k| std::env::var(k).ok())
    }

    /// Reads configuration through `get`; used by tests with a map.
    pub fn from_lookup(get: &dyn Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let r = Reader { get };
        let http_port = r.port("HTTP_PORT")?;
        let http_addr = SocketAddr::new(r.ip("HTTP_HOST")?, http_port);
        let public_base_url = r
            .url("PUBLIC_BASE_URL", &["http://", "https://"], "an http:// or https:// URL")?
            .unwrap_or_else(|| format!("http://127.0.0.1:{http_port}"));
        let media_ws_port = r.port("MEDIA_WS_PORT")?;
        let twilio_stream_url = r
            .url("TWILIO_STREAM_URL", &["ws://", "wss://"], "a ws:// or wss:// URL")?
            .unwrap_or_else(|| derive_stream_url(&public_base_url, media_ws_port));
        let sip_addr = if r.bool("ENABLE_SIP_HANDLER")? {
            Some(SocketAddr::new(r.ip("SIP_HOST")?, r.port("SIP_PORT")?))
        } else {
            None
        };
        let sip_advertised_ip = match r.raw("SIP_ADVERTISED_IP") {
            None => None,
            Some(_) => Some(r.ip("SIP_ADVERTISED_IP")?),
        };
        let sip_trusted = match r.raw("SIP_TRUSTED_CIDRS") {
            None => Vec::new(),
            Some(list) => list
                .split(',')
                .filter(|s| !s.trim().is_empty())
                .map(|s| {
                    s.parse().map_err(|_| ConfigError::Invalid {
                        var: "SIP_TRUSTED_CIDRS",
                        value: list.clone(),
                        expected: "comma-separated IP networks (198.51.100.0/24) or addresses",
                    })
                })
                .collect::<Result<Vec<_>, _>>()?,
        };
        let sip_digest = match r.raw("SIP_DIGEST_USERS") {
            None => None,
            Some(list) => {
                let users = list
                    .split(',')
                    .filter(|s| !s.trim().is_empty())
                    .map(|pair| match pair.trim().split_once(':') {
                        Some((user, password)) if !user.is_empty() && !password.is_empty() => {
                            Ok((user.to_owned(), password.to_owned()))
                        }
                        _ => Err(ConfigError::Invalid {
                            var: "SIP_DIGEST_USERS",
                            value: "(not shown: it holds passwords)".to_owned(),
                            expected: "comma-separated user:password pairs",
                        }),
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let algorithms = r
                    .string("SIP_DIGEST_ALGORITHMS")
                    .split(',')
                    .map(|name| {
                        precall_engine::DigestAlgorithm::from_name(name).ok_or_else(|| {
                            ConfigError::Invalid {
                                var: "SIP_DIGEST_ALGORITHMS",
                                value: name.trim().to_owned(),
                                expected: "SHA-256 and/or MD5, comma-separated",
                            }
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let repeated =
                    algorithms.iter().enumerate().any(|(i, a)| algorithms[..i].contains(a));
                if algorithms.is_empty() || repeated {
                    return Err(ConfigError::Invalid {
                        var: "SIP_DIGEST_ALGORITHMS",
                        value: r.string("SIP_DIGEST_ALGORITHMS"),
                        expected: "SHA-256 and/or MD5, each once",
                    });
                }
                Some(precall_engine::DigestConfig {
                    realm: r.string("SIP_DIGEST_REALM"),
                    users,
                    algorithms,
                })
            }
        };
        let shards = match r.raw("SHARDS") {
            None => std::thread::available_parallelism().map_or(1, usize::from),
            Some(value) => match value.parse::<usize>() {
                Ok(n) if (1..=1024).contains(&n) => n,
                _ => {
                    return Err(ConfigError::Invalid {
                        var: "SHARDS",
                        value,
                        expected: "a number of shards from 1 to 1024",
                    });
                }
            },
        };
        let rtp_min = r.port("RTP_PORT_MIN")?;
        let rtp_max = r.port("RTP_PORT_MAX")?;
        if rtp_min == 0 || rtp_min > rtp_max || usize::from(rtp_max - rtp_min) + 1 < 2 * shards {
            return Err(ConfigError::Inconsistent(format!(
                "RTP_PORT_MIN={rtp_min} and RTP_PORT_MAX={rtp_max} must be a non-zero range with \
                 at least two ports (RTP + RTCP) per shard ({shards} shards)"
            )));
        }
        let database_url = r.raw("DATABASE_URL");
        if let Some(url) = &database_url {
            if url.parse::<tokio_postgres::Config>().is_err() {
                return Err(ConfigError::Invalid {
                    var: "DATABASE_URL",
                    value: redact_url(url),
                    expected: "a PostgreSQL URL like postgres://user:pass@host:5432/db",
                });
            }
        }
        let database_pool_size =
            match r.parse::<usize>("DATABASE_POOL_SIZE", "a pool size from 1 to 512")? {
                n @ 1..=512 => n,
                n => {
                    return Err(ConfigError::Invalid {
                        var: "DATABASE_POOL_SIZE",
                        value: n.to_string(),
                        expected: "a pool size from 1 to 512",
                    });
                }
            };
        let provider = match r.raw("ELEVENLABS_API_KEY") {
            Some(api_key) => ProviderConfig::ElevenLabs {
                api_key,
                api_base: r
                    .url(
                        "ELEVENLABS_API_BASE",
                        &["http://", "https://"],
                        "an http:// or https:// URL",
                    )?
                    .unwrap_or_else(|| default_of("ELEVENLABS_API_BASE").to_owned()),
            },
            None => ProviderConfig::Simulated {
                delay: r.millis("SIMULATED_CLONE_DELAY_MS")?,
                fail: match r.string("SIMULATED_CLONE_OUTCOME").to_ascii_lowercase().as_str() {
                    "completed" => false,
                    "failed" => true,
                    _ => {
                        return Err(ConfigError::Invalid {
                            var: "SIMULATED_CLONE_OUTCOME",
                            value: r.string("SIMULATED_CLONE_OUTCOME"),
                            expected: "completed or failed",
                        });
                    }
                },
            },
        };
        let elevenlabs_api_base = r
            .url("ELEVENLABS_API_BASE", &["http://", "https://"], "an http:// or https:// URL")?
            .unwrap_or_else(|| default_of("ELEVENLABS_API_BASE").to_owned());
        let agent_ws_url = r.url("AGENT_WS_URL", &["ws://", "wss://"], "a ws:// or wss:// URL")?;
        let agent_chunk = r.millis("AGENT_CHUNK_MS")?;
        let chunk_ms = agent_chunk.as_millis();
        if chunk_ms == 0 || !chunk_ms.is_multiple_of(20) || chunk_ms > 1000 {
            return Err(ConfigError::Invalid {
                var: "AGENT_CHUNK_MS",
                value: chunk_ms.to_string(),
                expected: "a multiple of 20 milliseconds, from 20 to 1000",
            });
        }
        let mut voice_sample_urls = Vec::new();
        if let Some(list) = r.raw("VOICE_SAMPLE_URLS") {
            for url in list.split(',').map(str::trim).filter(|u| !u.is_empty()) {
                if !AUDIO_SCHEMES.iter().any(|s| url.starts_with(s)) {
                    return Err(ConfigError::Invalid {
                        var: "VOICE_SAMPLE_URLS",
                        value: url.to_owned(),
                        expected: "comma-separated http://, https:// or file:// URLs",
                    });
                }
                voice_sample_urls.push(url.to_owned());
            }
        }
        let audio = |var: &'static str, file: &str| -> Result<String, ConfigError> {
            Ok(r.url(var, AUDIO_SCHEMES, "an http://, https:// or file:// URL")?
                .unwrap_or_else(|| format!("{public_base_url}/audio/{file}")))
        };
        let clone_lease = r.millis("CLONE_LEASE_MS")?;
        if clone_lease < Duration::from_millis(300) {
            return Err(ConfigError::Invalid {
                var: "CLONE_LEASE_MS",
                value: clone_lease.as_millis().to_string(),
                expected: "at least 300 milliseconds",
            });
        }
        let status_poll_interval = r.millis("STATUS_POLL_INTERVAL_MS")?;
        if status_poll_interval < Duration::from_millis(100) {
            return Err(ConfigError::Invalid {
                var: "STATUS_POLL_INTERVAL_MS",
                value: status_poll_interval.as_millis().to_string(),
                expected: "at least 100 milliseconds",
            });
        }
        let metrics_addr = match r.raw("METRICS_ADDR") {
            None => None,
            Some(v) => Some(v.parse::<SocketAddr>().map_err(|_| ConfigError::Invalid {
                var: "METRICS_ADDR",
                value: v.clone(),
                expected: "an address and port such as 127.0.0.1:9100",
            })?),
        };
        Ok(Config {
            http_addr,
            metrics_addr,
            http_max_connections: r
                .positive("HTTP_MAX_CONNECTIONS", "a number of connections, 1 or more")?,
            sip_addr,
            sip_advertised_ip,
            sip_trusted,
            sip_force_rport: r.bool("SIP_FORCE_RPORT")?,
            sip_digest,
            shards,
            pin_cores: r.bool("SHARD_PIN_CORES")?,
            shard_max_calls: r.positive("SHARD_MAX_CALLS", "a number of calls, 1 or more")?,
            admit_clock_late: r.millis("ADMIT_CLOCK_LATE_MS")?,
            admit_clock_busy_percent: r.percent("ADMIT_CLOCK_BUSY_PERCENT")?,
            admit_sip_lag: r.millis("ADMIT_SIP_LAG_MS")?,
            admit_inbox_depth: r
                .parse::<usize>("ADMIT_INBOX_DEPTH", "a number of datagrams (0: off)")?,
            admit_setup_depth: r
                .parse::<usize>("ADMIT_SETUP_DEPTH", "a number of calls (0: off)")?,
            rtp_ports: rtp_min..=rtp_max,
            rtp_timeout: r.millis("RTP_TIMEOUT_MS")?,
            rtp_strict_source: r.bool("RTP_STRICT_SOURCE")?,
            media_ws_port,
            twilio_stream_url,
            twilio_hold_mode: match r.string("TWILIO_HOLD_MODE").to_ascii_lowercase().as_str() {
                "stream" => HoldMode::Stream,
                "poll" => HoldMode::Poll,
                _ => {
                    return Err(ConfigError::Invalid {
                        var: "TWILIO_HOLD_MODE",
                        value: r.string("TWILIO_HOLD_MODE"),
                        expected: "stream or poll",
                    });
                }
            },
            database_url,
            database_pool_size,
            memory_store_calls: r.positive("MEMORY_STORE_CALLS", "a number of calls, 1 or more")?,
            twilio_auth_token: r.raw("TWILIO_AUTH_TOKEN"),
            twilio_skip_signature: r.bool("TWILIO_SKIP_SIGNATURE")?,
            twilio_push: r.bool("TWILIO_PUSH")?,
            twilio_api_base: r
                .url("TWILIO_API_BASE", &["http://", "https://"], "an http:// or https:// URL")?
                .unwrap_or_else(|| default_of("TWILIO_API_BASE").to_owned()),
            twilio_account_sid: r.raw("TWILIO_ACCOUNT_SID"),
            twilio_api_key: match (r.raw("TWILIO_API_KEY"), r.raw("TWILIO_API_SECRET")) {
                (Some(k), Some(s)) => Some((k, s)),
                (None, None) => None,
                _ => {
                    return Err(ConfigError::Inconsistent(
                        "TWILIO_API_KEY and TWILIO_API_SECRET go together".to_owned(),
                    ));
                }
            },
            provider,
            default_agent_id: r.raw("ELEVENLABS_AGENT_ID").unwrap_or_default(),
            elevenlabs_api_base,
            agent_ws_url,
            agent_connect_timeout: r.millis("AGENT_CONNECT_TIMEOUT_MS")?,
            agent_first_audio_timeout: r.millis("AGENT_FIRST_AUDIO_TIMEOUT_MS")?,
            agent_chunk,
            agent_tls_ca_file: r.raw("AGENT_TLS_CA_FILE").map(PathBuf::from),
            voice_sample_urls,
            voice_profiles_file: r.raw("VOICE_PROFILES_FILE").map(PathBuf::from),
            greeting_audio_url: audio("GREETING_AUDIO_URL", "greeting.wav")?,
            hold_audio_url: audio("HOLD_AUDIO_URL", "hold.wav")?,
            error_audio_url: audio("ERROR_AUDIO_URL", "error.wav")?,
            audio_cache_dir: r
                .raw("AUDIO_CACHE_DIR")
                .map_or_else(|| std::env::temp_dir().join("precall-audio"), PathBuf::from),
            error_message: r.string("ERROR_MESSAGE"),
            status_poll_interval,
            max_hold: r.millis("MAX_HOLD_MS")?,
            clone_job_timeout: r.millis("CLONE_JOB_TIMEOUT_MS")?,
            clone_lease,
            clone_retry: r.millis("CLONE_RETRY_MS")?,
            clone_retry_permanent: r.millis("CLONE_RETRY_PERMANENT_MS")?,
            clone_delete_replaced: r.bool("CLONE_DELETE_REPLACED")?,
            clone_verify_after: r.millis("CLONE_VERIFY_AFTER_MS")?,
            call_retention: Duration::from_secs(
                r.parse::<u64>("CALL_RETENTION_DAYS", "a whole number of days")?
                    .saturating_mul(86_400),
            ),
            node_id: r.raw("NODE_ID").unwrap_or_else(default_node_id),
            control_request_timeout: r.millis("CONTROL_REQUEST_TIMEOUT_MS")?,
            drain_timeout: r.millis("DRAIN_TIMEOUT_MS")?,
            log_level: r.string("LOG_LEVEL"),
            public_base_url,
        })
    }

    /// Reads configuration from a map (tests).
    pub fn from_map(map: &HashMap<&str, &str>) -> Result<Self, ConfigError> {
        Self::from_lookup(&|k| map.get(k).map(|v| (*v).to_owned()))
    }
}

/// A node name unique per process: host name, process id and a random part (a restarted
/// process is a new node: its old leases lapse and are taken over like another node's).
fn default_node_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "precall".to_owned());
    // std's hasher keys are random per process: enough to tell two processes of one pid apart.
    use std::hash::{BuildHasher, Hasher};
    let random = std::collections::hash_map::RandomState::new().build_hasher().finish();
    format!("{host}:{}:{:08x}", std::process::id(), random as u32)
}

/// Hides a password in a URL for messages.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let userinfo = &url[s + 3..at];
            match userinfo.find(':') {
                Some(colon) => format!("{}{}:***{}", &url[..s + 3], &userinfo[..colon], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// The `--help` text: usage and every variable with its default.
pub fn help_text() -> String {
    let mut out = String::from(
        "precall — voice-AI call engine (Twilio webhooks + native SIP)\n\n\
         Usage: precall [--help | --version]\n\n\
         With no arguments precall serves: engine shards (SIP/RTP) and the HTTP control plane.\n\
         Configuration comes from the environment, and from ./.env when present.\n\n\
         Variables (default in brackets):\n",
    );
    let width = VARS.iter().map(|v| v.name.len()).max().unwrap_or(0);
    for v in VARS {
        out.push_str(&format!("  {:width$}  {} [{}]\n", v.name, v.help, v.default));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_map(&pairs.iter().copied().collect())
    }

    #[test]
    fn digest_algorithms_are_named_in_order_and_checked() {
        use precall_engine::DigestAlgorithm::{Md5, Sha256};
        let users = ("SIP_DIGEST_USERS", "pbx:pw");
        let algorithms = |c: Config| c.sip_digest.unwrap().algorithms;
        assert_eq!(algorithms(cfg(&[users]).unwrap()), [Sha256, Md5]);
        assert_eq!(algorithms(cfg(&[users, ("SIP_DIGEST_ALGORITHMS", "md5")]).unwrap()), [Md5]);
        assert_eq!(
            algorithms(cfg(&[users, ("SIP_DIGEST_ALGORITHMS", "MD5, SHA-256")]).unwrap()),
            [Md5, Sha256]
        );
        for bad in ["SHA-512", "MD5,MD5", "MD5,,SHA-256"] {
            let err = cfg(&[users, ("SIP_DIGEST_ALGORITHMS", bad)]).unwrap_err();
            assert!(err.to_string().contains("SIP_DIGEST_ALGORITHMS"), "{bad}: {err}");
        }
    }

    #[test]
    fn defaults_need_nothing() {
        let c = cfg(&[]).unwrap();
        assert_eq!(c.http_addr, "0.0.0.0:8000".parse().unwrap());
        assert_eq!(c.sip_addr, Some("0.0.0.0:5060".parse().unwrap()));
        assert_eq!(c.rtp_ports, 10000..=32767);
        assert_eq!(c.media_ws_port, 8001);
        assert_eq!(c.database_url, None);
        assert_eq!(c.status_poll_interval, Duration::from_millis(2000));
        assert_eq!(c.max_hold, Duration::from_millis(60_000));
        assert!(c.shards >= 1);
        assert_eq!(
            c.provider,
            ProviderConfig::Simulated { delay: Duration::from_millis(8000), fail: false }
        );
        assert_eq!(c.public_base_url, "http://127.0.0.1:8000");
        assert_eq!(c.greeting_audio_url, "http://127.0.0.1:8000/audio/greeting.wav");
        // The default stream URL reaches the media port, not the HTTP port.
        assert_eq!(c.twilio_stream_url, "ws://127.0.0.1:8001/twilio/media");
        assert_eq!(c.twilio_hold_mode, HoldMode::Stream);
        // The engine's own defaults are the same as the environment's.
        let engine = precall_engine::EngineConfig::default();
        assert_eq!(c.admit_clock_busy_percent, engine.admit_clock_busy_percent);
        assert_eq!(c.admit_clock_late, engine.admit_clock_late);
        assert_eq!(c.admit_sip_lag, engine.admit_sip_lag);
        assert_eq!(c.admit_setup_depth, engine.admit_setup_depth);
    }

    #[test]
    fn the_stream_url_follows_public_base_url_or_its_own_setting() {
        assert_eq!(
            derive_stream_url("http://203.0.113.7:8000", 8001),
            "ws://203.0.113.7:8001/twilio/media"
        );
        assert_eq!(
            derive_stream_url("http://[2001:db8::1]:80", 9),
            "ws://[2001:db8::1]:9/twilio/media"
        );
        assert_eq!(
            derive_stream_url("http://[2001:db8::1]", 9),
            "ws://[2001:db8::1]:9/twilio/media"
        );
        assert_eq!(
            derive_stream_url("http://voice.test/x", 8001),
            "ws://voice.test:8001/twilio/media"
        );
        assert_eq!(
            derive_stream_url("https://voice.example.com", 8001),
            "wss://voice.example.com/twilio/media"
        );
        let c = cfg(&[("PUBLIC_BASE_URL", "http://10.0.0.5:8080"), ("MEDIA_WS_PORT", "9001")]);
        assert_eq!(c.unwrap().twilio_stream_url, "ws://10.0.0.5:9001/twilio/media");
        let c = cfg(&[("TWILIO_STREAM_URL", "wss://media.example.com/twilio/media/")]);
        assert_eq!(c.unwrap().twilio_stream_url, "wss://media.example.com/twilio/media");
        assert!(cfg(&[("TWILIO_STREAM_URL", "https://x/twilio/media")]).is_err());
        assert_eq!(cfg(&[("TWILIO_HOLD_MODE", "POLL")]).unwrap().twilio_hold_mode, HoldMode::Poll);
        assert!(cfg(&[("TWILIO_HOLD_MODE", "music")]).is_err());
    }

    #[test]
    fn trusted_sip_networks_are_read_and_checked() {
        assert!(cfg(&[]).unwrap().sip_trusted.is_empty());
        let c = cfg(&[("SIP_TRUSTED_CIDRS", "198.51.100.0/24, 203.0.113.5,2001:db8::/32")]);
        let trusted = c.unwrap().sip_trusted;
        assert_eq!(trusted.len(), 3);
        assert!(trusted[1].contains("203.0.113.5".parse().unwrap()));
        let err = cfg(&[("SIP_TRUSTED_CIDRS", "198.51.100.0/24, carrier.example")]).unwrap_err();
        assert!(err.to_string().contains("SIP_TRUSTED_CIDRS"), "{err}");
    }

    #[test]
    fn values_are_read() {
        let c = cfg(&[
            ("HTTP_PORT", "9000"),
            ("ENABLE_SIP_HANDLER", "false"),
            ("SHARDS", "3"),
            ("ELEVENLABS_API_KEY", "k"),
            ("ELEVENLABS_API_BASE", "http://127.0.0.1:1234/"),
            ("PUBLIC_BASE_URL", "https://voice.example.com/"),
            ("VOICE_SAMPLE_URLS", "https://s/a.mp3, file:///srv/b.wav"),
            ("DATABASE_URL", "postgres://u:secret@db:5432/precall"),
            ("ADMIT_CLOCK_BUSY_PERCENT", "0"),
            ("ADMIT_SIP_LAG_MS", "0"),
        ])
        .unwrap();
        assert_eq!(c.http_addr.port(), 9000);
        assert_eq!(c.admit_clock_busy_percent, 0);
        assert_eq!(c.admit_sip_lag, Duration::ZERO);
        assert_eq!(c.sip_addr, None);
        assert_eq!(c.shards, 3);
        assert_eq!(
            c.provider,
            ProviderConfig::ElevenLabs {
                api_key: "k".into(),
                api_base: "http://127.0.0.1:1234".into()
            }
        );
        assert_eq!(c.public_base_url, "https://voice.example.com");
        assert_eq!(c.hold_audio_url, "https://voice.example.com/audio/hold.wav");
        assert_eq!(c.voice_sample_urls, ["https://s/a.mp3", "file:///srv/b.wav"]);
    }

    #[test]
    fn bad_values_name_the_variable() {
        let cases: &[(&str, &str)] = &[
            ("HTTP_PORT", "eighty"),
            ("SIP_PORT", "70000"),
            ("HTTP_HOST", "localhost:1"),
            ("ENABLE_SIP_HANDLER", "maybe"),
            ("SHARDS", "0"),
            ("MAX_HOLD_MS", "-1"),
            ("STATUS_POLL_INTERVAL_MS", "10"),
            ("SIMULATED_CLONE_OUTCOME", "sometimes"),
            ("PUBLIC_BASE_URL", "voice.example.com"),
            ("AGENT_WS_URL", "https://agent"),
            ("AGENT_CHUNK_MS", "30"),
            ("AGENT_CONNECT_TIMEOUT_MS", "soon"),
            ("VOICE_SAMPLE_URLS", "ftp://x/a.mp3"),
            ("DATABASE_URL", "postgres://u:hunter2@db:notaport/x"),
            ("DATABASE_POOL_SIZE", "0"),
            ("ADMIT_CLOCK_BUSY_PERCENT", "101"),
            ("ADMIT_CLOCK_BUSY_PERCENT", "-5"),
            ("ADMIT_SIP_LAG_MS", "soon"),
        ];
        for (var, value) in cases {
            let err = cfg(&[(var, value)]).unwrap_err().to_string();
            assert!(err.contains(var), "{var}={value}: {err}");
            assert!(err.contains("expected"), "{var}={value}: {err}");
            assert!(!err.contains("hunter2"), "passwords never appear: {err}");
        }
        let err = cfg(&[("RTP_PORT_MIN", "20000"), ("RTP_PORT_MAX", "10000")]).unwrap_err();
        assert!(err.to_string().contains("RTP_PORT_MIN"), "{err}");
    }

    #[test]
    fn help_lists_every_variable_with_its_default() {
        let help = help_text();
        for v in VARS {
            assert!(help.contains(v.name) && help.contains(v.default), "{}", v.name);
        }
        for seed_name in ["ENABLE_SIP_HANDLER", "SIP_HOST", "SIP_PORT"] {
            assert!(help.contains(seed_name));
        }
    }

    #[test]
    fn urls_lose_their_passwords() {
        assert_eq!(redact_url("postgres://u:pw@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
    }
}
