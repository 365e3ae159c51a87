//! SDP (RFC 4566) parsing and serialising, and offer/answer (RFC 3264) for one G.711 audio
//! stream with RFC 4733 telephone-events. rsip has no SDP, hence this small module.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use thiserror::Error;

/// Why an SDP body does not parse (answered with `400`, or `488` for addresses we cannot use).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SdpError {
    /// The body does not start with `v=0`.
    #[error("missing v=0")]
    MissingVersion,
    /// A line that is not `<letter>=<value>`.
    #[error("bad line {0}")]
    BadLine(usize),
    /// An `m=` line without port, protocol or formats.
    #[error("bad m= line")]
    BadMedia,
    /// A `c=` line that is not `IN IP4|IP6 <address>`.
    #[error("bad c= line")]
    BadConnection,
    /// A `c=` address that is a host name: we do no DNS (sans-IO), answered `488`.
    #[error("c= address is not an IP literal")]
    UnsupportedAddress,
    /// An `a=rtpmap` that is not `<pt> <name>/<clock>`.
    #[error("bad rtpmap")]
    BadRtpmap,
    /// An audio stream without any `c=` line.
    #[error("no connection address")]
    MissingConnection,
}

/// Media direction from one side's point of view (RFC 3264 §5.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Direction {
    /// Send and receive (the default).
    #[default]
    SendRecv,
    /// Send only (the other side is on hold, or holds us).
    SendOnly,
    /// Receive only.
    RecvOnly,
    /// Neither.
    Inactive,
}

impl Direction {
    fn attribute(self) -> &'static str {
        match self {
            Self::SendRecv => "sendrecv",
            Self::SendOnly => "sendonly",
            Self::RecvOnly => "recvonly",
            Self::Inactive => "inactive",
        }
    }

    fn parse(a: &str) -> Option<Self> {
        match a {
            "sendrecv" => Some(Self::SendRecv),
            "sendonly" => Some(Self::SendOnly),
            "recvonly" => Some(Self::RecvOnly),
            "inactive" => Some(Self::Inactive),
            _ => None,
        }
    }

    /// The answer to an offered direction (RFC 3264 §6.1 table).
    pub fn answer(self) -> Self {
        match self {
            Self::SendRecv => Self::SendRecv,
            Self::SendOnly => Self::RecvOnly,
            Self::RecvOnly => Self::SendOnly,
            Self::Inactive => Self::Inactive,
        }
    }
}

/// The G.711 codecs precall speaks (RFC 3551 static payload types 0 and 8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// G.711 µ-law.
    Pcmu,
    /// G.711 A-law.
    Pcma,
}

impl Codec {
    fn name(self) -> &'static str {
        match self {
            Self::Pcmu => "PCMU",
            Self::Pcma => "PCMA",
        }
    }
}

/// The negotiated media of a call, as the media layer needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MediaParams {
    /// Where to send RTP (`0.0.0.0:port` while the caller holds with the old `c=` form).
    pub remote_rtp: SocketAddr,
    /// The payload type to send, as the caller numbered it (0 or 8 in practice).
    pub payload_type: u8,
    /// The codec behind `payload_type`.
    pub codec: Codec,
    /// RFC 4733 telephone-event payload type, when the caller offered it.
    pub telephone_event: Option<u8>,
    /// Packetisation time we send with.
    pub ptime_ms: u16,
    /// Our direction: what we may do.
    pub direction: Direction,
}

/// One `m=` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaDescription {
    /// `audio`, `video`, ...
    pub media: String,
    /// Transport port; 0 means the stream is disabled.
    pub port: u16,
    /// `RTP/AVP`, ...
    pub proto: String,
    /// Formats (payload types for RTP) in preference order.
    pub formats: Vec<String>,
    /// Media-level `c=` address.
    pub connection: Option<IpAddr>,
    /// `a=rtpmap` entries: payload type, encoding name, clock rate.
    pub rtpmaps: Vec<(u8, String, u32)>,
    /// `a=ptime`.
    pub ptime: Option<u16>,
    /// Media-level direction attribute.
    pub direction: Option<Direction>,
}

/// A parsed session description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionDescription {
    /// Session-level `c=` address.
    pub connection: Option<IpAddr>,
    /// Session-level direction attribute.
    pub direction: Option<Direction>,
    /// The `m=` sections in order.
    pub media: Vec<MediaDescription>,
}

/// An offer as received in an INVITE.
pub type SdpOffer = SessionDescription;

impl SessionDescription {
    /// Whether an answer can carry audio: an enabled RTP/AVP audio stream offering PCMU or PCMA
    /// (static 0/8, or by `a=rtpmap` name at 8000 Hz). The one G.711 check of the engine: the
    /// shard refuses other offers with `488` before the controller records a call.
    pub fn has_g711_audio(&self) -> bool {
        self.media
            .iter()
            .filter(|m| is_audio_rtp(m))
            .any(|m| m.formats.iter().any(|f| codec_of(m, f).is_some()))
    }

    /// Parses an SDP body. Tolerates LF-only lines; checks the lines we use.
    pub fn parse(body: &[u8]) -> Result<Self, SdpError> {
        let text = String::from_utf8_lossy(body);
        let mut sd = SessionDescription { connection: None, direction: None, media: Vec::new() };
        let mut first = true;
        for (n, raw) in text.split('\n').enumerate() {
            let line = raw.trim_end_matches('\r');
            if line.is_empty() {
                continue;
            }
            let b = line.as_bytes();
            if b.len() < 2 || !b[0].is_ascii_lowercase() || b[1] != b'=' {
                return Err(SdpError::BadLine(n + 1));
            }
            let value = &line[2..];
            if first {
                if line != "v=0" {
                    return Err(SdpError::MissingVersion);
                }
                first = false;
                continue;
            }
            match b[0] {
                b'm' => sd.media.push(parse_m(value)?),
                b'c' => {
                    let addr = parse_c(value)?;
                    match sd.media.last_mut() {
                        Some(m) => m.connection = Some(addr),
                        None => sd.connection = Some(addr),
                    }
                }
                b'a' => {
                    let (name, arg) = value.split_once(':').unwrap_or((value, ""));
                    match (sd.media.last_mut(), name) {
                        (None, _) => {
                            if let Some(d) = Direction::parse(name) {
                                sd.direction = Some(d);
                            }
                        }
                        (Some(m), "rtpmap") => m.rtpmaps.push(parse_rtpmap(arg)?),
                        (Some(m), "ptime") => m.ptime = arg.trim().parse().ok(),
                        (Some(m), other) => {
                            if let Some(d) = Direction::parse(other) {
                                m.direction = Some(d);
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        if first {
            return Err(SdpError::MissingVersion);
        }
        Ok(sd)
    }
}

fn parse_m(v: &str) -> Result<MediaDescription, SdpError> {
    let mut it = v.split_ascii_whitespace();
    let media = it.next().ok_or(SdpError::BadMedia)?;
    let port = it.next().ok_or(SdpError::BadMedia)?;
    let port = port.split('/').next().unwrap_or("").parse().map_err(|_| SdpError::BadMedia)?;
    let proto = it.next().ok_or(SdpError::BadMedia)?;
    let formats: Vec<String> = it.map(str::to_owned).collect();
    if formats.is_empty() {
        return Err(SdpError::BadMedia);
    }
    Ok(MediaDescription {
        media: media.to_owned(),
        port,
        proto: proto.to_owned(),
        formats,
        connection: None,
        rtpmaps: Vec::new(),
        ptime: None,
        direction: None,
    })
}

fn parse_c(v: &str) -> Result<IpAddr, SdpError> {
    let mut it = v.split_ascii_whitespace();
    let (Some("IN"), Some(family), Some(addr), None) = (it.next(), it.next(), it.next(), it.next())
    else {
        return Err(SdpError::BadConnection);
    };
    // Multicast `addr/ttl` forms: the address is before the slash.
    let addr = addr.split('/').next().unwrap_or("");
    let ip: IpAddr = match addr.parse() {
        Ok(ip) => ip,
        Err(_) if family == "IP4" || family == "IP6" => return Err(SdpError::UnsupportedAddress),
        Err(_) => return Err(SdpError::BadConnection),
    };
    match (family, ip) {
        ("IP4", IpAddr::V4(_)) | ("IP6", IpAddr::V6(_)) => Ok(ip),
        _ => Err(SdpError::BadConnection),
    }
}

fn parse_rtpmap(v: &str) -> Result<(u8, String, u32), SdpError> {
    let (pt, enc) = v.trim().split_once([' ', '\t']).ok_or(SdpError::BadRtpmap)?;
    let pt: u8 = pt.parse().map_err(|_| SdpError::BadRtpmap)?;
    let mut parts = enc.trim().split('/');
    let name = parts.next().filter(|n| !n.is_empty()).ok_or(SdpError::BadRtpmap)?;
    // RFC 4566 requires the clock rate, but RFC 4475's messages omit it for formats nobody
    // negotiates (`a=rtpmap:31 LPC`): an unknown rate only disqualifies that format.
    let clock = match parts.next() {
        Some(c) => c.parse().map_err(|_| SdpError::BadRtpmap)?,
        None => 0,
    };
    Ok((pt, name.to_owned(), clock))
}

/// Our side of the media: where we receive RTP and our `o=` line numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LocalMedia {
    pub rtp: SocketAddr,
    pub session_id: u64,
    pub session_version: u64,
}

/// Why an offer or answer cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub(crate) enum NegotiationError {
    #[error("no codec in common")]
    NoCommonCodec,
    #[error("{0}")]
    Sdp(#[from] SdpError),
}

const PTIME_MS: u16 = 20;
/// The telephone-event payload type we offer (the common carrier choice).
const OFFER_TELEPHONE_EVENT: u8 = 101;

fn codec_of(m: &MediaDescription, fmt: &str) -> Option<(u8, Codec)> {
    let pt: u8 = fmt.parse().ok()?;
    let by_map = m.rtpmaps.iter().find(|(p, _, _)| *p == pt);
    let codec = match by_map {
        Some((_, name, 8000)) if name.eq_ignore_ascii_case("PCMU") => Codec::Pcmu,
        Some((_, name, 8000)) if name.eq_ignore_ascii_case("PCMA") => Codec::Pcma,
        Some(_) => return None,
        None if pt == 0 => Codec::Pcmu,
        None if pt == 8 => Codec::Pcma,
        None => return None,
    };
    Some((pt, codec))
}

fn telephone_event_of(m: &MediaDescription) -> Option<u8> {
    m.rtpmaps
        .iter()
        .find(|(pt, name, clock)| {
            name.eq_ignore_ascii_case("telephone-event")
                && *clock == 8000
                && m.formats.iter().any(|f| f.parse() == Ok(*pt))
        })
        .map(|(pt, _, _)| *pt)
}

fn is_audio_rtp(m: &MediaDescription) -> bool {
    m.media.eq_ignore_ascii_case("audio") && m.proto.eq_ignore_ascii_case("RTP/AVP") && m.port != 0
}

fn write_header(out: &mut String, local: &LocalMedia) {
    let ip = local.rtp.ip();
    let family = if ip.is_ipv4() { "IP4" } else { "IP6" };
    let _ = write!(
        out,
        "v=0\r\no=precall {} {} IN {family} {ip}\r\ns=precall\r\nc=IN {family} {ip}\r\nt=0 0\r\n",
        local.session_id, local.session_version
    );
}

fn write_audio(
    out: &mut String,
    port: u16,
    codecs: &[(u8, Codec)],
    te: Option<u8>,
    dir: Direction,
) {
    let _ = write!(out, "m=audio {port} RTP/AVP");
    for (pt, _) in codecs {
        let _ = write!(out, " {pt}");
    }
    if let Some(te) = te {
        let _ = write!(out, " {te}");
    }
    out.push_str("\r\n");
    for (pt, codec) in codecs {
        let _ = write!(out, "a=rtpmap:{pt} {}/8000\r\n", codec.name());
    }
    if let Some(te) = te {
        let _ = write!(out, "a=rtpmap:{te} telephone-event/8000\r\na=fmtp:{te} 0-15\r\n");
    }
    let _ = write!(out, "a=ptime:{PTIME_MS}\r\na={}\r\n", dir.attribute());
}

/// Answers an offer (RFC 3264 §6): the first audio stream gets the first G.711 codec in the
/// caller's order plus telephone-event if offered; every other stream is rejected with port 0
/// so the answer has as many `m=` lines as the offer.
pub(crate) fn answer(
    offer: &SessionDescription,
    local: &LocalMedia,
) -> Result<(String, MediaParams), NegotiationError> {
    let mut out = String::with_capacity(256);
    write_header(&mut out, local);
    let mut chosen: Option<MediaParams> = None;
    for m in &offer.media {
        let pick = if chosen.is_none() && is_audio_rtp(m) {
            m.formats.iter().find_map(|f| codec_of(m, f))
        } else {
            None
        };
        let Some((pt, codec)) = pick else {
            let first = m.formats.first().map_or("0", String::as_str);
            let _ = write!(out, "m={} 0 {} {first}\r\n", m.media, m.proto);
            continue;
        };
        let ip = m
            .connection
            .or(offer.connection)
            .ok_or(NegotiationError::Sdp(SdpError::MissingConnection))?;
        let offered = m.direction.or(offer.direction).unwrap_or_default();
        // c=0.0.0.0 is the RFC 2543 hold (RFC 3264 §8.4): the caller cannot receive.
        let offered = if ip == IpAddr::V4(Ipv4Addr::UNSPECIFIED) {
            match offered {
                Direction::SendRecv | Direction::SendOnly => Direction::SendOnly,
                Direction::RecvOnly | Direction::Inactive => Direction::Inactive,
            }
        } else {
            offered
        };
        let direction = offered.answer();
        let te = telephone_event_of(m);
        write_audio(&mut out, local.rtp.port(), &[(pt, codec)], te, direction);
        chosen = Some(MediaParams {
            remote_rtp: SocketAddr::new(ip, m.port),
            payload_type: pt,
            codec,
            telephone_event: te,
            ptime_ms: PTIME_MS,
            direction,
        });
    }
    let params = chosen.ok_or(NegotiationError::NoCommonCodec)?;
    Ok((out, params))
}

/// Our offer when the INVITE (or re-INVITE) had none (RFC 3261 §13.2.1: the 2xx offers, the
/// ACK answers).
pub(crate) fn offer(local: &LocalMedia) -> String {
    let mut out = String::with_capacity(256);
    write_header(&mut out, local);
    write_audio(
        &mut out,
        local.rtp.port(),
        &[(0, Codec::Pcmu), (8, Codec::Pcma)],
        Some(OFFER_TELEPHONE_EVENT),
        Direction::SendRecv,
    );
    out
}

/// Reads the caller's answer to [`offer`].
pub(crate) fn read_answer(answer: &SessionDescription) -> Result<MediaParams, NegotiationError> {
    let m = answer.media.iter().find(|m| is_audio_rtp(m)).ok_or(NegotiationError::NoCommonCodec)?;
    let (pt, codec) =
        m.formats.iter().find_map(|f| codec_of(m, f)).ok_or(NegotiationError::NoCommonCodec)?;
    let ip = m
        .connection
        .or(answer.connection)
        .ok_or(NegotiationError::Sdp(SdpError::MissingConnection))?;
    let theirs = m.direction.or(answer.direction).unwrap_or_default();
    Ok(MediaParams {
        remote_rtp: SocketAddr::new(ip, m.port),
        payload_type: pt,
        codec,
        telephone_event: telephone_event_of(m),
        ptime_ms: PTIME_MS,
        direction: theirs.answer(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local() -> LocalMedia {
        LocalMedia {
            rtp: "203.0.113.10:30000".parse().unwrap(),
            session_id: 42,
            session_version: 1,
        }
    }

    /// A typical carrier offer (PCMU first, G.729, telephone-event 101, ptime 20).
    const CARRIER: &str = "v=0\r\n\
        o=- 3920000000 3920000000 IN IP4 198.51.100.20\r\n\
        s=SBC\r\n\
        c=IN IP4 198.51.100.20\r\n\
        t=0 0\r\n\
        m=audio 16384 RTP/AVP 0 8 18 101\r\n\
        a=rtpmap:0 PCMU/8000\r\n\
        a=rtpmap:8 PCMA/8000\r\n\
        a=rtpmap:18 G729/8000\r\n\
        a=fmtp:18 annexb=no\r\n\
        a=rtpmap:101 telephone-event/8000\r\n\
        a=fmtp:101 0-16\r\n\
        a=ptime:20\r\n\
        a=sendrecv\r\n";

    #[test]
    fn carrier_offer_is_answered_exactly() {
        let offer = SessionDescription::parse(CARRIER.as_bytes()).unwrap();
        assert_eq!(offer.media[0].ptime, Some(20));
        let (text, media) = answer(&offer, &local()).unwrap();
        assert_eq!(
            text,
            "v=0\r\no=precall 42 1 IN IP4 203.0.113.10\r\ns=precall\r\n\
             c=IN IP4 203.0.113.10\r\nt=0 0\r\nm=audio 30000 RTP/AVP 0 101\r\n\
             a=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-15\r\n\
             a=ptime:20\r\na=sendrecv\r\n"
        );
        assert_eq!(
            media,
            MediaParams {
                remote_rtp: "198.51.100.20:16384".parse().unwrap(),
                payload_type: 0,
                codec: Codec::Pcmu,
                telephone_event: Some(101),
                ptime_ms: 20,
                direction: Direction::SendRecv,
            }
        );
        // The answer parses back.
        let back = SessionDescription::parse(text.as_bytes()).unwrap();
        assert_eq!(back.media[0].formats, vec!["0", "101"]);
    }

    #[test]
    fn callers_preference_order_wins() {
        let pcma_first = CARRIER.replace("RTP/AVP 0 8 18 101", "RTP/AVP 18 8 0 101");
        let offer = SessionDescription::parse(pcma_first.as_bytes()).unwrap();
        let (_, media) = answer(&offer, &local()).unwrap();
        assert_eq!((media.payload_type, media.codec), (8, Codec::Pcma));
    }

    #[test]
    fn dynamic_payload_type_by_rtpmap_name_and_other_event_pt() {
        let sdp = "v=0\r\nc=IN IP4 198.51.100.20\r\nm=audio 5000 RTP/AVP 96 100\r\n\
                   a=rtpmap:96 pcmu/8000\r\na=rtpmap:100 telephone-event/8000\r\n";
        let offer = SessionDescription::parse(sdp.as_bytes()).unwrap();
        let (text, media) = answer(&offer, &local()).unwrap();
        assert_eq!(
            (media.payload_type, media.codec, media.telephone_event),
            (96, Codec::Pcmu, Some(100))
        );
        assert!(text.contains("m=audio 30000 RTP/AVP 96 100\r\n"));
        assert!(text.contains("a=fmtp:100 0-15\r\n"));
    }

    #[test]
    fn hold_forms() {
        let sendonly = CARRIER.replace("a=sendrecv", "a=sendonly");
        let offer = SessionDescription::parse(sendonly.as_bytes()).unwrap();
        let (text, media) = answer(&offer, &local()).unwrap();
        assert_eq!(media.direction, Direction::RecvOnly);
        assert!(text.ends_with("a=recvonly\r\n"));

        let old = CARRIER.replace("c=IN IP4 198.51.100.20", "c=IN IP4 0.0.0.0");
        let offer = SessionDescription::parse(old.as_bytes()).unwrap();
        let (_, media) = answer(&offer, &local()).unwrap();
        assert_eq!(media.direction, Direction::RecvOnly);
        assert_eq!(media.remote_rtp, "0.0.0.0:16384".parse().unwrap());

        let inactive = CARRIER.replace("a=sendrecv", "a=inactive");
        let offer = SessionDescription::parse(inactive.as_bytes()).unwrap();
        assert_eq!(answer(&offer, &local()).unwrap().1.direction, Direction::Inactive);

        let recvonly = CARRIER.replace("a=sendrecv", "a=recvonly");
        let offer = SessionDescription::parse(recvonly.as_bytes()).unwrap();
        assert_eq!(answer(&offer, &local()).unwrap().1.direction, Direction::SendOnly);
    }

    #[test]
    fn non_audio_streams_are_rejected_with_port_zero() {
        let sdp = "v=0\r\no=x 1 1 IN IP4 192.0.2.1\r\ns=-\r\nc=IN IP4 192.0.2.1\r\nt=0 0\r\n\
                   m=video 3227 RTP/AVP 31\r\nm=audio 49217 RTP/AVP 0 12\r\nm=audio 5000 RTP/AVP 8\r\n";
        let offer = SessionDescription::parse(sdp.as_bytes()).unwrap();
        let (text, media) = answer(&offer, &local()).unwrap();
        let m_lines: Vec<&str> = text.lines().filter(|l| l.starts_with("m=")).collect();
        assert_eq!(
            m_lines,
            vec!["m=video 0 RTP/AVP 31", "m=audio 30000 RTP/AVP 0", "m=audio 0 RTP/AVP 8"]
        );
        assert_eq!(media.telephone_event, None);
    }

    #[test]
    fn no_common_codec() {
        let g729 =
            "v=0\r\nc=IN IP4 192.0.2.1\r\nm=audio 5000 RTP/AVP 18\r\na=rtpmap:18 G729/8000\r\n";
        let offer = SessionDescription::parse(g729.as_bytes()).unwrap();
        assert_eq!(answer(&offer, &local()), Err(NegotiationError::NoCommonCodec));
        let srtp = "v=0\r\nc=IN IP4 192.0.2.1\r\nm=audio 5000 RTP/SAVP 0\r\n";
        let offer = SessionDescription::parse(srtp.as_bytes()).unwrap();
        assert_eq!(answer(&offer, &local()), Err(NegotiationError::NoCommonCodec));
        // a PCMU name at another clock rate is not G.711
        let wide =
            "v=0\r\nc=IN IP4 192.0.2.1\r\nm=audio 5000 RTP/AVP 96\r\na=rtpmap:96 PCMU/16000\r\n";
        let offer = SessionDescription::parse(wide.as_bytes()).unwrap();
        assert_eq!(answer(&offer, &local()), Err(NegotiationError::NoCommonCodec));
    }

    #[test]
    fn parse_errors() {
        assert_eq!(SessionDescription::parse(b""), Err(SdpError::MissingVersion));
        assert_eq!(SessionDescription::parse(b"o=x\r\nv=0\r\n"), Err(SdpError::MissingVersion));
        assert_eq!(SessionDescription::parse(b"v=0\r\nnonsense\r\n"), Err(SdpError::BadLine(2)));
        assert_eq!(
            SessionDescription::parse(b"v=0\r\nm=audio x RTP/AVP 0\r\n"),
            Err(SdpError::BadMedia)
        );
        assert_eq!(
            SessionDescription::parse(b"v=0\r\nm=audio 5000 RTP/AVP\r\n"),
            Err(SdpError::BadMedia)
        );
        assert_eq!(SessionDescription::parse(b"v=0\r\nc=IN IP4\r\n"), Err(SdpError::BadConnection));
        assert_eq!(
            SessionDescription::parse(b"v=0\r\nc=IN IP6 10.0.0.1\r\n"),
            Err(SdpError::BadConnection)
        );
        assert_eq!(
            SessionDescription::parse(b"v=0\r\nc=IN IP4 media.example.com\r\n"),
            Err(SdpError::UnsupportedAddress)
        );
        assert_eq!(
            SessionDescription::parse(b"v=0\r\nm=audio 1 RTP/AVP 0\r\na=rtpmap:x PCMU/8000\r\n"),
            Err(SdpError::BadRtpmap)
        );
        let no_c = SessionDescription::parse(b"v=0\nm=audio 1 RTP/AVP 0\n").unwrap();
        assert_eq!(
            answer(&no_c, &local()),
            Err(NegotiationError::Sdp(SdpError::MissingConnection))
        );
    }

    #[test]
    fn ipv6_media_and_lf_only_lines() {
        let sdp = "v=0\nc=IN IP6 2001:db8::20\nm=audio 7000 RTP/AVP 8\n";
        let offer = SessionDescription::parse(sdp.as_bytes()).unwrap();
        let v6 = LocalMedia { rtp: "[2001:db8::10]:30000".parse().unwrap(), ..local() };
        let (text, media) = answer(&offer, &v6).unwrap();
        assert_eq!(media.remote_rtp, "[2001:db8::20]:7000".parse().unwrap());
        assert!(text.contains("c=IN IP6 2001:db8::10\r\n"));
        // media-level c= overrides the session level
        let sdp = "v=0\nc=IN IP4 192.0.2.1\nm=audio 7000 RTP/AVP 0\nc=IN IP4 192.0.2.2\n";
        let offer = SessionDescription::parse(sdp.as_bytes()).unwrap();
        assert_eq!(
            answer(&offer, &local()).unwrap().1.remote_rtp,
            "192.0.2.2:7000".parse().unwrap()
        );
    }

    #[test]
    fn our_offer_and_reading_its_answer() {
        let text = offer(&local());
        assert!(text.contains("m=audio 30000 RTP/AVP 0 8 101\r\n"));
        let ans = "v=0\r\nc=IN IP4 198.51.100.20\r\nm=audio 4000 RTP/AVP 8 101\r\n\
                   a=rtpmap:101 telephone-event/8000\r\na=sendonly\r\n";
        let media = read_answer(&SessionDescription::parse(ans.as_bytes()).unwrap()).unwrap();
        assert_eq!((media.codec, media.telephone_event), (Codec::Pcma, Some(101)));
        assert_eq!(media.direction, Direction::RecvOnly);
    }
}
