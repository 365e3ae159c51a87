//! `precall`: the voice-AI call engine.
//!
//! With no arguments it serves until SIGINT or SIGTERM: the side runtime (controller, store,
//! clone provider), the engine shards (SIP/RTP) and the HTTP control plane. Start order is
//! side runtime -> shards -> HTTP, so nothing takes traffic before what it needs is up; stop
//! order is the reverse. Every start failure is printed with what to fix, and exits non-zero.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use precall::agent::{AgentEndpoint, AgentResolver};
use precall::app::{App, Observer};
use precall::audio_service::AudioService;
use precall::config::{self, Config, HoldMode, ProviderConfig, redact_url};
use precall::demo_agent::DemoAgent;
use precall::hold_segments::HoldSegments;
use precall::metrics::{Metrics, PoolProbe};
use precall::profiles;
use precall::push::{LivePush, PushAuth, PushConfig};
use precall::runtime::{Recheck, Retention, Service, SideRuntime, StoreHealth};
use precall::sip_bridge::{DefaultClips, SipBridge};
use precall::store::{PgStore, PgStoreConfig};
use precall::twilio::{Twilio, TwilioConfig};
use precall_api::ProfileId;
use precall_clone::{
    AnyProvider, ElevenLabsConfig, ElevenLabsProvider, SimulatedConfig, SimulatedOutcome,
    SimulatedProvider,
};
use precall_controller::{CallController, ControllerConfig, MemoryStore, Store, VoiceProfile};
use precall_engine::{Engine, EngineConfig, MediaStreamsConfig};
use precall_http::{Limits, Server};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

// The binary's edge: --help and --version write to stdout on purpose.
#[allow(clippy::print_stdout)]
fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    match args.next().as_deref() {
        None => {}
        Some("-h" | "--help") => {
            print!("{}", config::help_text());
            return ExitCode::SUCCESS;
        }
        Some("-V" | "--version") => {
            println!("precall {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Some("demo-agent") => return demo_agent(args.next().as_deref()),
        Some(other) => {
            eprintln!("precall: unknown argument {other:?}; see `precall --help`");
            return ExitCode::from(2);
        }
    }
    match dotenvy::dotenv() {
        Ok(_) => {}
        Err(e) if e.not_found() => {}
        Err(e) => {
            eprintln!("precall: cannot read .env: {e}");
            return ExitCode::from(2);
        }
    }
    let cfg = match Config::from_env() {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("precall: configuration error: {e}\n(see `precall --help`)");
            return ExitCode::from(2);
        }
    };
    init_logging(&cfg.log_level);
    match serve(cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("precall: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `precall demo-agent [ADDR]`: the demo agent alone (default 127.0.0.1:8002), until SIGINT or
/// SIGTERM. Point `AGENT_WS_URL` at the URL it prints.
#[allow(clippy::print_stdout)]
fn demo_agent(addr: Option<&str>) -> ExitCode {
    init_logging(&std::env::var("LOG_LEVEL").unwrap_or_else(|_| "info".into()));
    let addr = addr.unwrap_or("127.0.0.1:8002");
    let Ok(addr) = addr.parse::<std::net::SocketAddr>() else {
        eprintln!("precall demo-agent: {addr:?} is not an address like 127.0.0.1:8002");
        return ExitCode::from(2);
    };
    let signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ]);
    let Ok(mut signals) = signals else {
        eprintln!("precall demo-agent: cannot install signal handlers");
        return ExitCode::FAILURE;
    };
    match DemoAgent::start(addr) {
        Ok(agent) => {
            println!("demo agent listening: AGENT_WS_URL={}", agent.ws_url());
            signals.forever().next();
            drop(agent);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("precall demo-agent: cannot listen on {addr}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

fn controller_config(cfg: &Config, agent_ws_url: &str) -> ControllerConfig {
    ControllerConfig {
        greeting_url: cfg.greeting_audio_url.clone(),
        hold_url: cfg.hold_audio_url.clone(),
        error_message: cfg.error_message.clone(),
        error_audio_url: Some(cfg.error_audio_url.clone()),
        poll_interval: cfg.status_poll_interval,
        max_hold: cfg.max_hold,
        clone_job_timeout: cfg.clone_job_timeout,
        clone_lease: cfg.clone_lease,
        clone_retry: cfg.clone_retry,
        clone_retry_permanent: cfg.clone_retry_permanent,
        node_id: cfg.node_id.clone(),
        clone_verify_after: cfg.clone_verify_after,
        agent_ws_url: agent_ws_url.to_owned(),
        default_agent_id: if cfg.default_agent_id.is_empty() {
            "demo".to_owned()
        } else {
            cfg.default_agent_id.clone()
        },
        default_profile: ProfileId::new(profiles::DEFAULT_PROFILE),
    }
}

fn provider(cfg: &Config) -> Result<AnyProvider, String> {
    Ok(match &cfg.provider {
        ProviderConfig::ElevenLabs { api_key, api_base } => {
            let defaults = ElevenLabsConfig::new(api_key.clone());
            let el = ElevenLabsConfig {
                api_base: api_base.clone(),
                // The provider's own deadline stays inside the job's: one request may take at
                // most half of CLONE_JOB_TIMEOUT_MS (the job's deadline cuts off the rest).
                request_timeout: defaults.request_timeout.min(cfg.clone_job_timeout / 2),
                ..defaults
            };
            AnyProvider::from(ElevenLabsProvider::new(el).map_err(|e| format!("ElevenLabs: {e}"))?)
        }
        ProviderConfig::Simulated { delay, fail } => {
            AnyProvider::from(SimulatedProvider::new(SimulatedConfig {
                delay: *delay,
                outcome: if *fail { SimulatedOutcome::Failed } else { SimulatedOutcome::Completed },
            }))
        }
    })
}

/// The live-call push, when the poll hold mode is on with REST credentials.
fn live_push(cfg: &Config) -> Result<Option<Arc<LivePush>>, String> {
    if cfg.twilio_hold_mode != HoldMode::Poll || !cfg.twilio_push {
        return Ok(None);
    }
    let auth = match (&cfg.twilio_api_key, &cfg.twilio_auth_token) {
        (Some((sid, secret)), _) => PushAuth::ApiKey { sid: sid.clone(), secret: secret.clone() },
        (None, Some(token)) => PushAuth::AuthToken(token.clone()),
        (None, None) => {
            tracing::warn!(
                "TWILIO_PUSH is on but neither TWILIO_AUTH_TOKEN nor TWILIO_API_KEY is set: held \
                 Twilio calls learn their news at their next poll only"
            );
            return Ok(None);
        }
    };
    tracing::info!(api_base = %cfg.twilio_api_base, "held Twilio calls are pushed on with the REST API");
    let push = LivePush::new(PushConfig {
        api_base: cfg.twilio_api_base.clone(),
        auth,
        account_sid: cfg.twilio_account_sid.clone(),
        public_base_url: cfg.public_base_url.clone(),
        stream_url: cfg.twilio_stream_url.clone(),
        timeout: cfg.control_request_timeout,
        backoff: Duration::from_millis(200),
    })?;
    Ok(Some(Arc::new(push)))
}

/// What the side runtime is built from, whichever store it gets.
struct SideSetup {
    controller: ControllerConfig,
    provider: AnyProvider,
    profiles: Vec<VoiceProfile>,
    metrics: Arc<Metrics>,
    request_timeout: Duration,
    push: Option<Arc<LivePush>>,
    recheck: Arc<Recheck>,
    delete_replaced: bool,
    retention: Option<Retention>,
    store_health: Arc<StoreHealth>,
}

fn start_side_runtime<S: Store>(
    store: impl std::future::Future<Output = Result<S, String>> + Send + 'static,
    setup: SideSetup,
) -> Result<SideRuntime, String> {
    let SideSetup {
        controller,
        provider,
        profiles,
        metrics,
        request_timeout,
        push,
        recheck,
        delete_replaced,
        retention,
        store_health,
    } = setup;
    SideRuntime::start(
        move || async move {
            let store = store.await?;
            Ok(Service {
                controller: CallController::new(store, controller),
                provider,
                metrics,
                push,
                recheck,
                delete_replaced,
                running: Default::default(),
                profiles,
                retention,
                journal: Default::default(),
                store_health,
                voices: Default::default(),
            })
        },
        request_timeout,
    )
    .map_err(|e| e.to_string())
}

/// Makes the default greeting, hold and error clips ready before SIP calls arrive, so the first
/// call does not wait for them. Waits a bounded time; a clip that fails is logged (calls then
/// play without it) but does not stop the start.
fn warm_clips(side: &SideRuntime, audio: &Arc<AudioService>, cfg: &Config) {
    let urls =
        [cfg.greeting_audio_url.clone(), cfg.hold_audio_url.clone(), cfg.error_audio_url.clone()];
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let audio = Arc::clone(audio);
    side.spawn(async move {
        for url in &urls {
            if let Err(e) = audio.clip(url).await {
                tracing::warn!(error = %e, "default clip not ready; SIP calls will play without it");
            }
        }
        let _ = done_tx.send(());
    });
    if done_rx.recv_timeout(cfg.control_request_timeout).is_err() {
        tracing::warn!("default clips still loading; the first SIP calls may wait for them");
    }
}

/// Loads the hold clips (the configured one and the profiles') for the poll flow's segments,
/// in the background: until one is loaded, its calls play it whole.
fn load_hold_segments(
    side: &SideRuntime,
    audio: &Arc<AudioService>,
    segments: &Arc<HoldSegments>,
    cfg: &Config,
    profiles: &[VoiceProfile],
) {
    let mut urls = vec![cfg.hold_audio_url.clone()];
    urls.extend(profiles.iter().filter_map(|p| p.hold_url.clone()));
    urls.sort();
    urls.dedup();
    let (audio, segments) = (Arc::clone(audio), Arc::clone(segments));
    side.spawn(async move {
        for url in urls {
            match audio.clip(&url).await {
                Ok(clip) => segments.insert(&url, clip),
                Err(e) => {
                    tracing::warn!(error = %e, "hold clip not loaded; it plays whole at each poll")
                }
            }
        }
    });
}

/// No call lasts longer than this (the in-memory store forgets a call with no end after the
/// hold limit plus this).
const LONGEST_CALL: Duration = Duration::from_secs(4 * 3600);

/// Longest a stop may take before the process exits anyway.
const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(20);

/// The graceful stop: `/health` says draining (503) and new calls get `503` + `Retry-After`
/// (SIP INVITE and OPTIONS, so a dispatcher takes the node out; Twilio's voice webhook); the
/// calls already up go on to their natural end, for at most `timeout`; the rest get BYE when
/// the shards stop.
fn drain(engine: &Engine, draining: &std::sync::atomic::AtomicBool, timeout: Duration) {
    draining.store(true, std::sync::atomic::Ordering::Release);
    let start = std::time::Instant::now();
    let mut told = engine.drain();
    let calls = engine.active_calls();
    tracing::info!(calls, timeout_ms = timeout.as_millis() as u64, "draining");
    loop {
        if told < engine.shard_count() {
            // An inbox was full: ask again.
            told = engine.drain();
        }
        let calls = engine.active_calls();
        if calls == 0 {
            tracing::info!(took_ms = start.elapsed().as_millis() as u64, "drained: no calls left");
            return;
        }
        if start.elapsed() >= timeout {
            tracing::warn!(calls, "drain timeout: the calls left get BYE");
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Refuses to start on a port another process (another `precall`, most likely) serves. The
/// listeners set SO_REUSEPORT (every shard binds the SIP and media ports; may's HTTP listener
/// does too), which would let a second instance start silently and take half the traffic. A
/// plain bind, without SO_REUSEPORT, fails on a port anyone holds. Port 0 is not checked.
fn check_ports_free(cfg: &Config) -> Result<(), String> {
    let in_use = |what: &str, addr: std::net::SocketAddr, e: std::io::Error| {
        format!(
            "{what} {addr} is already in use ({e}): is another precall running? Stop it, or \
             choose another port"
        )
    };
    let media = std::net::SocketAddr::new(cfg.http_addr.ip(), cfg.media_ws_port);
    for (what, addr) in [("HTTP_PORT", cfg.http_addr), ("MEDIA_WS_PORT", media)] {
        if addr.port() != 0 {
            std::net::TcpListener::bind(addr).map_err(|e| in_use(what, addr, e))?;
        }
    }
    if let Some(sip) = cfg.sip_addr.filter(|a| a.port() != 0) {
        std::net::UdpSocket::bind(sip).map_err(|e| in_use("SIP_PORT", sip, e))?;
    }
    Ok(())
}

fn serve(cfg: Config) -> Result<(), String> {
    check_ports_free(&cfg)?;
    // Registered before anything starts, so a SIGTERM that arrives during start-up is not lost:
    // it is delivered once the start completes, and precall then stops at once.
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])
    .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    let mut voice_profiles = vec![profiles::default_profile(&cfg)];
    if let Some(path) = &cfg.voice_profiles_file {
        voice_profiles.extend(profiles::load_file(path).map_err(|e| e.to_string())?);
    }
    let metrics = Arc::new(Metrics::default());
    let recheck: Arc<Recheck> = Arc::default();
    // The agent: AGENT_WS_URL, else ElevenLabs when an agent id is set, else the demo agent.
    let mut demo = None;
    let agent_endpoint = match (&cfg.agent_ws_url, cfg.default_agent_id.is_empty()) {
        (Some(url), _) => AgentEndpoint::Url(url.clone()),
        (None, false) => AgentEndpoint::ElevenLabs {
            api_base: cfg.elevenlabs_api_base.clone(),
            api_key: match &cfg.provider {
                ProviderConfig::ElevenLabs { api_key, .. } => Some(api_key.clone()),
                ProviderConfig::Simulated { .. } => None,
            },
        },
        (None, true) => {
            let agent = DemoAgent::start(([127, 0, 0, 1], 0).into())
                .map_err(|e| format!("cannot start the demo agent: {e}"))?;
            tracing::warn!(url = %agent.ws_url(),
                "neither AGENT_WS_URL nor ELEVENLABS_AGENT_ID is set: calls are bridged to the \
                 embedded demo agent, which echoes the caller");
            let url = agent.ws_url();
            demo = Some(agent);
            AgentEndpoint::Url(url)
        }
    };
    let agent_ws_url = agent_endpoint.ws_base();
    let agents = Arc::new(AgentResolver::new(agent_endpoint, cfg.control_request_timeout)?);
    let store_health = Arc::new(StoreHealth::default());
    let setup = SideSetup {
        controller: controller_config(&cfg, &agent_ws_url),
        provider: provider(&cfg)?,
        profiles: voice_profiles.clone(),
        metrics: Arc::clone(&metrics),
        request_timeout: cfg.control_request_timeout,
        push: live_push(&cfg)?,
        recheck: Arc::clone(&recheck),
        delete_replaced: cfg.clone_delete_replaced,
        retention: None,
        store_health: Arc::clone(&store_health),
    };
    let kept = (!cfg.call_retention.is_zero()).then_some(cfg.call_retention);
    let (side, store_kind) = match &cfg.database_url {
        None => {
            tracing::warn!("DATABASE_URL is not set: calls are kept in memory and lost at exit");
            // A call with no end (its status callback never came) is forgotten once it cannot
            // be going on any more: the hold limit plus the longest call.
            let unended = cfg.max_hold + LONGEST_CALL;
            let retention = Retention {
                ended: kept.unwrap_or(Duration::MAX),
                unended: kept.map_or(unended, |k| k.min(unended)),
            };
            let setup = SideSetup { retention: Some(retention), ..setup };
            let calls = cfg.memory_store_calls;
            (
                start_side_runtime(async move { Ok(MemoryStore::with_retention(calls)) }, setup)?,
                "memory",
            )
        }
        Some(url) => {
            let setup =
                SideSetup { retention: kept.map(|k| Retention { ended: k, unended: k }), ..setup };
            let pg = PgStoreConfig {
                url: url.clone(),
                pool_size: cfg.database_pool_size,
                connect_timeout: Duration::from_secs(5),
            };
            let shown = redact_url(url);
            // No connection yet: the side runtime reaches the server and migrates in the
            // background, retrying while it is down (/health says 503 meanwhile).
            let store = PgStore::new(&pg).map_err(|e| format!("PostgreSQL at {shown}: {e}"))?;
            let probe = store.clone();
            metrics.watch_pool(PoolProbe(Box::new(move || probe.pool_use())));
            let store = async move { Ok(store) };
            (start_side_runtime(store, setup)?, "postgres")
        }
    };
    match &cfg.provider {
        ProviderConfig::Simulated { delay, fail } => tracing::warn!(
            delay_ms = delay.as_millis() as u64,
            outcome = if *fail { "failed" } else { "completed" },
            "ELEVENLABS_API_KEY is not set: voice clones are simulated"
        ),
        ProviderConfig::ElevenLabs { api_base, .. } => {
            tracing::info!(api_base = %api_base, "voice clones by ElevenLabs")
        }
    }

    let audio =
        Arc::new(AudioService::new(cfg.audio_cache_dir.clone(), &cfg.public_base_url).map_err(
            |e| format!("cannot create AUDIO_CACHE_DIR {}: {e}", cfg.audio_cache_dir.display()),
        )?);
    if cfg.sip_addr.is_some() {
        warm_clips(&side, &audio, &cfg);
        let users = cfg.sip_digest.as_ref().map_or(0, |d| d.users.len());
        match (cfg.sip_trusted.is_empty(), users) {
            (true, 0) => tracing::warn!(
                "SIP_TRUSTED_CIDRS is not set: precall answers SIP from ANY address. Anyone who \
                 can reach the SIP port can place calls (and start voice clones). List your \
                 carriers' signalling networks in SIP_TRUSTED_CIDRS, or set SIP_DIGEST_USERS."
            ),
            (true, users) => tracing::warn!(
                users,
                "SIP_TRUSTED_CIDRS is not set: every INVITE must answer a digest challenge \
                 (SIP_DIGEST_USERS); list your carriers in SIP_TRUSTED_CIDRS to spare them"
            ),
            (false, 0) => {
                tracing::info!(networks = cfg.sip_trusted.len(), "SIP only from SIP_TRUSTED_CIDRS")
            }
            (false, users) => tracing::info!(
                networks = cfg.sip_trusted.len(),
                users,
                "SIP from SIP_TRUSTED_CIDRS, and from elsewhere with digest credentials"
            ),
        }
    }
    let bridge = SipBridge::new(
        side.handle(),
        Arc::clone(&audio),
        DefaultClips {
            hold_url: cfg.hold_audio_url.clone(),
            error_url: cfg.error_audio_url.clone(),
        },
        cfg.control_request_timeout,
        agents,
    );
    let engine = Engine::start(
        EngineConfig {
            shards: cfg.shards,
            pin_cores: cfg.pin_cores,
            sip: cfg.sip_addr,
            rtp_ports: cfg.rtp_ports.clone(),
            advertised_ip: cfg.sip_advertised_ip,
            sip_trusted: cfg.sip_trusted.clone(),
            sip_force_rport: cfg.sip_force_rport,
            sip_digest: cfg.sip_digest.clone(),
            max_calls_per_shard: cfg.shard_max_calls,
            admit_clock_late: cfg.admit_clock_late,
            admit_clock_busy_percent: cfg.admit_clock_busy_percent,
            admit_sip_lag: cfg.admit_sip_lag,
            admit_inbox_depth: cfg.admit_inbox_depth,
            admit_setup_depth: cfg.admit_setup_depth,
            rtp_timeout: cfg.rtp_timeout,
            rtp_strict_source: cfg.rtp_strict_source,
            // The controller's deadline, then at most the same again to make the clips ready,
            // and a margin: past that the plan was lost (a full inbox) and the call is refused.
            plan_timeout: cfg.control_request_timeout * 2 + Duration::from_secs(1),
            agent_connect_timeout: cfg.agent_connect_timeout,
            agent_first_audio_timeout: cfg.agent_first_audio_timeout,
            agent_chunk: cfg.agent_chunk,
            agent_tls_ca_file: cfg.agent_tls_ca_file.clone(),
            media_streams: Some(MediaStreamsConfig {
                addr: std::net::SocketAddr::new(cfg.http_addr.ip(), cfg.media_ws_port),
                public_url: cfg.twilio_stream_url.clone(),
                auth_token: cfg.twilio_auth_token.clone(),
                skip_signature: cfg.twilio_skip_signature,
            }),
            ..EngineConfig::default()
        },
        Arc::new(bridge),
    )
    .map_err(|e| format!("engine: {e}"))?;
    let engine = Arc::new(engine);
    // A finished clone job reaches the shards holding its calls at once. A weak reference, so
    // that shutdown can take the engine back.
    let weak = Arc::downgrade(&engine);
    recheck.set(move |calls| {
        if let Some(engine) = weak.upgrade() {
            engine.recheck(calls);
        }
    });

    // may: no pinning (the shards own the cores), stacks sized for our handlers, fewer wakeups.
    let may_cfg = may::config();
    may_cfg.set_worker_pin(false);
    may_cfg.set_stack_size(128 * 1024);
    may_cfg.set_workers(cfg.shards.clamp(1, 4));
    // The probe holds a weak reference so that shutdown can take the engine back.
    let probe_engine = Arc::downgrade(&engine);
    let probe =
        Arc::new(move || probe_engine.upgrade().map_or_else(Vec::new, |engine| engine.health()));
    let twilio = Twilio::new(
        side.handle(),
        TwilioConfig {
            public_base_url: cfg.public_base_url.clone(),
            auth_token: cfg.twilio_auth_token.clone(),
            skip_signature: cfg.twilio_skip_signature,
            error_message: cfg.error_message.clone(),
            stream_url: cfg.twilio_stream_url.clone(),
            hold_mode: cfg.twilio_hold_mode,
            hold_audio_url: cfg.hold_audio_url.clone(),
            poll_interval: cfg.status_poll_interval,
            max_hold: cfg.max_hold,
        },
        Arc::clone(&metrics),
    );
    // The poll flow's hold in segments: the poll hold mode's, and the stream mode's fallback
    // after a broken stream.
    let segments = Arc::new(HoldSegments::new(cfg.status_poll_interval));
    load_hold_segments(&side, &audio, &segments, &cfg, &voice_profiles);
    let twilio = twilio.with_hold_segments(segments);
    let app =
        App::new(side.handle(), probe, Arc::clone(&metrics), store_kind, twilio, store_health);
    let app = if cfg.metrics_addr.is_some() { app.with_metrics_elsewhere() } else { app };
    let draining = app.draining();
    let app = Arc::new(app);
    let limits = Limits { max_connections: cfg.http_max_connections, ..Limits::default() };
    let http =
        Server::bind(cfg.http_addr, limits, Arc::clone(&app) as Arc<dyn precall_http::Handler>)
            .map_err(|e| format!("cannot listen for HTTP on {}: {e}", cfg.http_addr))?;
    metrics.watch_http_connections(http.open_connections());
    // Scrapes on their own listener (and connection cap): a flood there never takes the
    // webhooks' connections.
    let observer = match cfg.metrics_addr {
        Some(addr) => {
            let limits = Limits { max_connections: 256, ..Limits::default() };
            let server = Server::bind(addr, limits, Arc::new(Observer(Arc::clone(&app))))
                .map_err(|e| format!("cannot listen for METRICS_ADDR {addr}: {e}"))?;
            tracing::info!(metrics = %server.local_addr(), "/metrics and /health on their own listener");
            Some(server)
        }
        None => None,
    };

    tracing::info!(
        http = %http.local_addr(),
        sip = ?engine.sip_addr(),
        media_streams = ?engine.media_streams_addr(),
        twilio_stream_url = %cfg.twilio_stream_url,
        shards = engine.shard_count(),
        store = store_kind,
        node = %cfg.node_id,
        "precall is ready"
    );

    if let Some(sig) = signals.forever().next() {
        tracing::info!(signal = sig, "signal received");
    }
    // A second signal ends the process at once, whatever it is doing.
    std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            tracing::warn!(signal = sig, "second signal: exiting now");
            std::process::exit(1);
        }
    });
    drain(&engine, &draining, cfg.drain_timeout);
    tracing::info!("stopping");
    // Stopping ends in bounded time whatever state the process is in.
    std::thread::spawn(|| {
        std::thread::sleep(SHUTDOWN_DEADLINE);
        tracing::error!(deadline = ?SHUTDOWN_DEADLINE, "stopping took too long: exiting now");
        std::process::exit(1);
    });
    http.shutdown();
    if let Some(observer) = observer {
        observer.shutdown();
    }
    let engine =
        Arc::try_unwrap(engine).map_err(|_| "engine still in use at shutdown".to_owned())?;
    let engine_result = engine.shutdown();
    side.shutdown();
    drop(demo);
    engine_result.map_err(|e| format!("engine: {e}"))?;
    tracing::info!("stopped");
    Ok(())
}
