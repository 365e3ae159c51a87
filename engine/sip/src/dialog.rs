//! Dialog state of a UAS (RFC 3261 §12.1.1) and the target of requests we send in it
//! (§12.2.1.1).

use std::net::{IpAddr, SocketAddr};

use crate::message::Request;
use crate::uri;

/// Identifies the dialog and holds what our own requests need.
#[derive(Debug, Clone)]
pub(crate) struct Dialog {
    pub call_id: String,
    /// Our tag (To tag of our responses); chosen on the first response that needs one.
    pub local_tag: Option<String>,
    /// The caller's From tag; empty for RFC 2543 callers without one.
    pub remote_tag: String,
    /// The INVITE's To value (our URI); gets `;tag=` in our requests.
    pub local_uri: String,
    /// The INVITE's From value, tag included (their URI).
    pub remote_uri: String,
    /// Contact URI of the INVITE (§12.1.1: the remote target), refreshed by re-INVITE.
    pub remote_target: Option<String>,
    /// §12.1.1: "the route set MUST be set to the list of URIs in the Record-Route header
    /// field from the request, taken in order" — a UAS keeps the order; only a UAC reverses.
    pub route_set: Vec<String>,
    pub remote_seq: u32,
    pub local_seq: u32,
    /// Source of the INVITE: where our BYE goes when the target is a host name (no DNS here).
    pub source: SocketAddr,
}

impl Dialog {
    pub fn from_invite(
        req: &Request<'_>,
        from_raw: &str,
        to_raw: &str,
        source: SocketAddr,
    ) -> Self {
        Self {
            call_id: req.call_id.to_owned(),
            local_tag: None,
            remote_tag: req.from.tag().unwrap_or("").to_owned(),
            local_uri: to_raw.to_owned(),
            remote_uri: from_raw.to_owned(),
            remote_target: req.contact.map(|c| c.uri.raw.to_owned()),
            route_set: req.record_route.iter().map(|r| (*r).to_owned()).collect(),
            remote_seq: req.cseq,
            // §12.1.1 leaves our first CSeq to us; 1 keeps traces readable.
            local_seq: 0,
            source,
        }
    }

    /// §12.2.2: an in-dialog request matches by Call-ID, their tag and ours.
    pub fn matches(&self, call_id: &str, from_tag: Option<&str>, to_tag: Option<&str>) -> bool {
        self.call_id == call_id
            && self.remote_tag == from_tag.unwrap_or("")
            && self.local_tag.is_some()
            && self.local_tag.as_deref() == to_tag
    }

    /// Request-URI, Route values and destination of our next request (§12.2.1.1): loose
    /// routing when the first route has `lr`, strict routing otherwise.
    pub fn request_target(&self) -> (String, Vec<String>, SocketAddr) {
        let target = self.remote_target.clone().unwrap_or_else(|| {
            // No Contact (RFC 2543 peers): address the caller's From URI.
            uri::parse_name_addr(&self.remote_uri).map_or_else(
                |_| format!("sip:{}", crate::build::host_port(self.source)),
                |n| n.uri.raw.to_owned(),
            )
        });
        let first_route =
            self.route_set.first().and_then(|r| uri::parse_name_addr(r).ok()).map(|n| n.uri);
        let (request_uri, routes, next_hop) = match first_route {
            None => (target.clone(), Vec::new(), target.clone()),
            Some(first) if uri::param(first.params, "lr").is_some() => {
                (target.clone(), self.route_set.clone(), first.raw.to_owned())
            }
            Some(first) => {
                let mut routes: Vec<String> = self.route_set[1..].to_vec();
                routes.push(format!("<{target}>"));
                let ruri = first.raw.split(';').next().unwrap_or(first.raw).to_owned();
                (ruri, routes, first.raw.to_owned())
            }
        };
        let dest = uri::parse_uri(&next_hop)
            .ok()
            .and_then(|u| uri::resolve(&u))
            .filter(|d| routable_from(d.ip(), self.source.ip()))
            .unwrap_or(self.source);
        (request_uri, routes, dest)
    }
}

/// Whether `dest`, from a Contact or Route, can be reached by a peer that reached us from
/// `source`. A caller behind NAT announces its private address (`Contact:
/// <sip:…@192.168.1.50>`) while its packets come from the NAT's public one: a request sent to
/// the private address is lost, so it goes to the source (where the NAT binding is) instead.
fn routable_from(dest: IpAddr, source: IpAddr) -> bool {
    fn local(ip: IpAddr) -> u8 {
        match ip {
            IpAddr::V4(v4) if v4.is_unspecified() => 3,
            IpAddr::V4(v4) if v4.is_loopback() => 2,
            IpAddr::V4(v4) if v4.is_private() || v4.is_link_local() => 1,
            IpAddr::V6(v6) if v6.is_unspecified() => 3,
            IpAddr::V6(v6) if v6.is_loopback() => 2,
            IpAddr::V6(v6) if v6.is_unique_local() || v6.is_unicast_link_local() => 1,
            _ => 0,
        }
    }
    match (local(dest), local(source)) {
        (3, _) => false,
        // Loopback is reachable only from loopback; a private address from a private one.
        (d, s) => d <= s,
    }
}
