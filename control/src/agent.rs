//! Where the agent is: the control plane's half of the agent leg.
//!
//! A shard never waits on DNS or HTTP, so before a `connect` plan goes to the shard this
//! resolves the agent's address, and for private ElevenLabs agents (an API key is set) fetches
//! a signed URL (`GET /v1/convai/conversation/get-signed-url?agent_id=…`, valid 15 minutes
//! and possibly single-use: one per call, fetched right before the connect).

use std::time::Duration;

use precall_api::WebSocketInstruction;
use precall_engine::{AgentTarget, AgentUnavailable};
use reqwest::Url;
use serde::Deserialize;

/// Which agent service calls are bridged to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentEndpoint {
    /// A WebSocket endpoint that takes `agent_id` in the query (`AGENT_WS_URL`, a self-hosted
    /// agent, or the embedded demo agent).
    Url(String),
    /// ElevenLabs Agents: public agents by `agent_id` on the API host, private ones (an API key
    /// is set) by signed URL.
    ElevenLabs {
        /// `ELEVENLABS_API_BASE`.
        api_base: String,
        /// `ELEVENLABS_API_KEY`.
        api_key: Option<String>,
    },
}

impl AgentEndpoint {
    /// The WebSocket endpoint the controller names in its instructions (`agent_id` appended).
    pub fn ws_base(&self) -> String {
        match self {
            AgentEndpoint::Url(url) => url.clone(),
            AgentEndpoint::ElevenLabs { api_base, .. } => {
                let ws = if let Some(rest) = api_base.strip_prefix("https://") {
                    format!("wss://{rest}")
                } else if let Some(rest) = api_base.strip_prefix("http://") {
                    format!("ws://{rest}")
                } else {
                    api_base.clone()
                };
                format!("{}/v1/convai/conversation", ws.trim_end_matches('/'))
            }
        }
    }
}

/// Turns a `connect` instruction into an [`AgentTarget`] a shard can open at once.
#[derive(Debug, Clone)]
pub struct AgentResolver {
    endpoint: AgentEndpoint,
    http: reqwest::Client,
}

#[derive(Deserialize)]
struct SignedUrl {
    signed_url: String,
}

impl AgentResolver {
    /// A resolver for `endpoint`; HTTP requests (signed URLs) give up after `timeout`.
    pub fn new(endpoint: AgentEndpoint, timeout: Duration) -> Result<Self, String> {
        // No redirects: the signed-URL request carries the API key (xi-api-key).
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(timeout)
            .connect_timeout(timeout)
            .user_agent(concat!("precall/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("agent HTTP client: {e}"))?;
        Ok(Self { endpoint, http })
    }

    /// The endpoint.
    pub fn endpoint(&self) -> &AgentEndpoint {
        &self.endpoint
    }

    /// The URL to open for `ws` and the address it resolves to.
    pub async fn resolve(
        &self,
        ws: &WebSocketInstruction,
    ) -> Result<AgentTarget, AgentUnavailable> {
        let url = match &self.endpoint {
            AgentEndpoint::ElevenLabs { api_base, api_key: Some(key) } => {
                self.signed_url(api_base, key, &ws.agent_id).await?
            }
            _ => ws.url.clone(),
        };
        target(&url).await
    }

    async fn signed_url(
        &self,
        api_base: &str,
        key: &str,
        agent_id: &str,
    ) -> Result<String, AgentUnavailable> {
        let mut url = Url::parse(&format!("{api_base}/v1/convai/conversation/get-signed-url"))
            .map_err(|e| AgentUnavailable(format!("ELEVENLABS_API_BASE: {e}")))?;
        url.query_pairs_mut().append_pair("agent_id", agent_id);
        let response = self
            .http
            .get(url)
            .header("xi-api-key", key)
            .send()
            .await
            .map_err(|e| AgentUnavailable(format!("signed URL request: {e}")))?;
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            let body: String = body.chars().take(300).collect();
            return Err(AgentUnavailable(format!("signed URL: HTTP {status}: {body}")));
        }
        let signed: SignedUrl = response
            .json()
            .await
            .map_err(|e| AgentUnavailable(format!("signed URL answer: {e}")))?;
        Ok(signed.signed_url)
    }
}

/// Parses `url` and resolves its host (the shard connects to the address, and uses the host
/// for TLS and the `Host` header).
pub async fn target(url: &str) -> Result<AgentTarget, AgentUnavailable> {
    let parsed =
        Url::parse(url).map_err(|e| AgentUnavailable(format!("agent URL {url:?}: {e}")))?;
    let tls = match parsed.scheme() {
        "wss" => true,
        "ws" => false,
        other => {
            return Err(AgentUnavailable(format!("agent URL scheme {other:?} is not ws or wss")));
        }
    };
    let host = parsed
        .host_str()
        .ok_or_else(|| AgentUnavailable(format!("agent URL {url:?} has no host")))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = parsed.port_or_known_default().unwrap_or(if tls { 443 } else { 80 });
    let addr = tokio::net::lookup_host((host.as_str(), port))
        .await
        .map_err(|e| AgentUnavailable(format!("resolving {host}: {e}")))?
        .next()
        .ok_or_else(|| AgentUnavailable(format!("{host} has no address")))?;
    Ok(AgentTarget { url: url.to_owned(), host, addr, tls })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elevenlabs_ws_base_follows_the_api_host() {
        let e = AgentEndpoint::ElevenLabs {
            api_base: "https://api.eu.residency.elevenlabs.io".into(),
            api_key: None,
        };
        assert_eq!(e.ws_base(), "wss://api.eu.residency.elevenlabs.io/v1/convai/conversation");
        let e = AgentEndpoint::ElevenLabs { api_base: "http://127.0.0.1:9/".into(), api_key: None };
        assert_eq!(e.ws_base(), "ws://127.0.0.1:9/v1/convai/conversation");
    }

    /// A fake ElevenLabs REST API answering one request per connection: the signed URL to a
    /// key it knows, 401 with ElevenLabs' body otherwise. Returns its base URL and the
    /// request lines it saw.
    fn fake_api() -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
        use std::io::{BufRead, BufReader, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = std::sync::Arc::clone(&seen);
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut head = Vec::new();
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    head.push(line.trim_end().to_owned());
                }
                let keyed = head.iter().any(|h| h.eq_ignore_ascii_case("xi-api-key: good-key"));
                log.lock().unwrap().push(head[0].clone());
                let (status, body) = if keyed {
                    (
                        "200 OK",
                        r#"{"signed_url":"ws://127.0.0.1:9/v1/convai/conversation?agent_id=a1&conversation_signature=sig"}"#,
                    )
                } else {
                    (
                        "401 Unauthorized",
                        r#"{"detail":{"status":"invalid_api_key","message":"Invalid API key"}}"#,
                    )
                };
                let mut out = stream;
                let _ = write!(
                    out,
                    "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        (base, seen)
    }

    fn ws(agent_id: &str) -> WebSocketInstruction {
        WebSocketInstruction {
            url: format!("wss://unused.example/v1/convai/conversation?agent_id={agent_id}"),
            agent_id: agent_id.into(),
            voice_id: "v".into(),
            first_message: None,
        }
    }

    #[tokio::test]
    async fn private_agents_get_a_signed_url_per_call() {
        let (base, seen) = fake_api();
        let good =
            AgentEndpoint::ElevenLabs { api_base: base.clone(), api_key: Some("good-key".into()) };
        let resolver = AgentResolver::new(good, Duration::from_secs(5)).unwrap();
        let t = resolver.resolve(&ws("a1")).await.unwrap();
        assert_eq!(
            t.url,
            "ws://127.0.0.1:9/v1/convai/conversation?agent_id=a1&conversation_signature=sig"
        );
        assert_eq!((t.addr.port(), t.tls), (9, false));
        let t2 = resolver.resolve(&ws("a1")).await.unwrap();
        assert_eq!(t2.url, t.url);
        let lines = seen.lock().unwrap().clone();
        assert_eq!(
            lines,
            vec!["GET /v1/convai/conversation/get-signed-url?agent_id=a1 HTTP/1.1"; 2],
            "one signed URL per call"
        );
        let bad = AgentEndpoint::ElevenLabs { api_base: base, api_key: Some("wrong".into()) };
        let e = AgentResolver::new(bad, Duration::from_secs(5))
            .unwrap()
            .resolve(&ws("a1"))
            .await
            .unwrap_err();
        assert!(e.0.contains("401") && e.0.contains("invalid_api_key"), "{}", e.0);
        // Public agents (no key) connect with agent_id, no HTTP.
        let public =
            AgentEndpoint::ElevenLabs { api_base: "http://127.0.0.1:1".into(), api_key: None };
        let mut w = ws("pub");
        w.url = "ws://127.0.0.1:7/v1/convai/conversation?agent_id=pub".into();
        let t =
            AgentResolver::new(public, Duration::from_secs(5)).unwrap().resolve(&w).await.unwrap();
        assert_eq!(t.url, w.url);
    }

    #[tokio::test]
    async fn targets_resolve_and_bad_urls_say_why() {
        let t = target("ws://127.0.0.1:4567/v1/convai/conversation?agent_id=a").await.unwrap();
        assert_eq!((t.addr.port(), t.tls, t.host.as_str()), (4567, false, "127.0.0.1"));
        let t = target("wss://localhost/x").await.unwrap();
        assert_eq!((t.addr.port(), t.tls, t.host.as_str()), (443, true, "localhost"));
        assert!(target("http://x/").await.unwrap_err().0.contains("scheme"));
        assert!(target("ws://no-such-host.invalid/").await.unwrap_err().0.contains("resolving"));
    }
}
