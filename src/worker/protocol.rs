//! The master's side of the framing spoken with the bundled WSGI worker (see
//! `src/python/PROTOCOL.md`). Requests go out as one `R` frame whose meta is the WSGI environ's
//! variable part, NUL-separated and already in environ form, so Python does one `split` and one
//! `dict.update`; responses come back as `S`, `B`*, then `E` or `A` frames.

use std::net::{IpAddr, SocketAddr};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Uri, Version};

pub const REQUEST_HEADER_LEN: usize = 13;
pub const FRAME_HEADER_LEN: usize = 5;
pub const KIND_REQUEST: u8 = b'R';
pub const KIND_PING: u8 = b'P';

/// Facts about the listener the request came in on.
#[derive(Debug, Clone)]
pub struct ServerInfo {
    pub name: String,
    pub port: String,
}

/// Why a request could not be encoded (the client gets 400).
#[derive(Debug, PartialEq, Eq)]
pub enum EncodeError {
    /// The decoded path holds a NUL byte.
    NulInPath,
}

/// The request-specific facts the encoder needs beyond the parsed head.
pub struct RequestFacts<'a> {
    pub method: &'a Method,
    pub uri: &'a Uri,
    pub version: Version,
    pub headers: &'a HeaderMap,
    /// The client address as the app should see it (already resolved through trusted proxies).
    pub remote: SocketAddr,
    pub remote_ip_override: Option<&'a [u8]>,
    pub scheme: &'a str,
    /// Whether the peer is a trusted proxy (`forwarded_allow_ips`): its `SCRIPT_NAME` header
    /// then sets the app's mount point, as gunicorn's `forwarder_headers` default allows.
    pub trusted_peer: bool,
    pub server: &'a ServerInfo,
    pub body_len: u64,
    /// Whether the client announced a body (Content-Length or chunked): CONTENT_LENGTH is then set.
    pub has_body: bool,
}

/// Appends a complete `R` frame header + meta for one request to `out` (the body follows separately).
pub fn encode_request(out: &mut Vec<u8>, r: &RequestFacts<'_>) -> Result<(), EncodeError> {
    let start = out.len();
    out.extend_from_slice(&[KIND_REQUEST, 0, 0, 0, 0]);
    out.extend_from_slice(&r.body_len.to_be_bytes());
    let meta_start = out.len();

    out.extend_from_slice(r.method.as_str().as_bytes());
    out.push(0);
    // The asterisk form (`OPTIONS *`) names the server, not a path: PATH_INFO is empty (PEP 3333
    // wants it empty or starting with '/'; wsgiref's validator asserts so); RAW_URI keeps the '*'.
    let path = match r.uri.path() {
        "*" => "",
        p => p,
    };
    if !percent_decode_into(out, path.as_bytes()) {
        return Err(EncodeError::NulInPath);
    }
    out.push(0);
    if let Some(q) = r.uri.query() {
        out.extend_from_slice(q.as_bytes());
    }
    out.push(0);
    // RAW_URI: the request target as sent (origin form; absolute form is kept as it came).
    match r.uri.path_and_query() {
        Some(pq) if r.uri.scheme().is_none() => out.extend_from_slice(pq.as_str().as_bytes()),
        _ => out.extend_from_slice(r.uri.to_string().as_bytes()),
    }
    out.push(0);
    out.extend_from_slice(match r.version {
        Version::HTTP_10 => b"HTTP/1.0",
        Version::HTTP_09 => b"HTTP/0.9",
        _ => b"HTTP/1.1",
    });
    out.push(0);
    match r.remote_ip_override {
        Some(ip) => out.extend_from_slice(ip),
        None => {
            use std::io::Write;
            let _ = write!(out, "{}", r.remote.ip());
        }
    }
    out.push(0);
    {
        use std::io::Write;
        let _ = write!(out, "{}", r.remote.port());
    }
    out.push(0);
    // RFC 9112 §3.2.2: for an absolute-form target ("GET http://host/path") the host is the
    // target's, and a Host header is ignored: HTTP_HOST, SERVER_NAME and SERVER_PORT all come
    // from the target. (One with user info never gets here: see `message_error`.)
    let target_host = r.uri.authority().map(|a| a.as_str().as_bytes());
    // SERVER_NAME / SERVER_PORT from Host when present (as gunicorn does), else the listener.
    let host = target_host.or_else(|| r.headers.get(header::HOST).map(|h| h.as_bytes()));
    let (name, port) = match host {
        Some(h) if !h.is_empty() => split_host(h),
        _ => (r.server.name.as_bytes(), r.server.port.as_bytes()),
    };
    out.extend_from_slice(name);
    out.push(0);
    // (A target's own scheme gives its default port: "http://a/" is 80 whatever the connection.)
    let scheme = r.uri.scheme_str().unwrap_or(r.scheme);
    out.extend_from_slice(if port.is_empty() {
        if scheme.eq_ignore_ascii_case("https") {
            b"443"
        } else {
            b"80"
        }
    } else {
        port
    });
    out.push(0);
    out.extend_from_slice(r.scheme.as_bytes());

    if let Some(ct) = r.headers.get(header::CONTENT_TYPE) {
        out.extend_from_slice(b"\0CONTENT_TYPE\0");
        out.extend_from_slice(ct.as_bytes());
    }
    if r.has_body || r.body_len > 0 {
        use std::io::Write;
        let _ = write!(out, "\0CONTENT_LENGTH\0{}", r.body_len);
    }
    if let Some(h) = target_host {
        out.extend_from_slice(b"\0HTTP_HOST\0");
        out.extend_from_slice(h);
    }
    let mut prev: Option<&HeaderName> = None;
    for (name, value) in r.headers.iter() {
        if prev == Some(name) {
            // Repeated header: join onto the value just written, with ", " (RFC 9110 §5.3),
            // except Cookie: "; " (RFC 9113 §8.2.3, as nginx joins HTTP/2 cookie crumbs), since
            // cookie parsers split on ";" only and would read "a=1, b=2" as one cookie.
            out.extend_from_slice(if name == header::COOKIE { b"; " } else { b", " });
            out.extend_from_slice(value.as_bytes());
            continue;
        }
        if name == header::CONTENT_TYPE
            || name == header::CONTENT_LENGTH
            || name == header::TRANSFER_ENCODING
            || (name == header::HOST && target_host.is_some())
        {
            prev = None;
            continue;
        }
        let n = name.as_str().as_bytes();
        // Headers with '_' are dropped: X_Forwarded_For and X-Forwarded-For would map to the same
        // environ key, letting a client spoof what a proxy set (nginx and gunicorn do the same).
        if n.contains(&b'_') {
            if n == b"script_name" && r.trusted_peer {
                out.extend_from_slice(b"\0SCRIPT_NAME\0");
                out.extend_from_slice(value.as_bytes());
            }
            prev = None;
            continue;
        }
        out.extend_from_slice(b"\0HTTP_");
        out.extend(n.iter().map(|&c| {
            if c == b'-' {
                b'_'
            } else {
                c.to_ascii_uppercase()
            }
        }));
        out.push(0);
        out.extend_from_slice(value.as_bytes());
        prev = Some(name);
    }
    let meta_len = (out.len() - meta_start) as u32;
    out[start + 1..start + 5].copy_from_slice(&meta_len.to_be_bytes());
    Ok(())
}

/// A ping frame (health probe of the worker's request loop).
pub fn ping_frame() -> [u8; REQUEST_HEADER_LEN] {
    let mut f = [0u8; REQUEST_HEADER_LEN];
    f[0] = KIND_PING;
    f
}

fn split_host(h: &[u8]) -> (&[u8], &[u8]) {
    if h.first() == Some(&b'[') {
        // [v6]:port
        if let Some(end) = h.iter().position(|&c| c == b']') {
            let name = &h[..=end];
            let rest = &h[end + 1..];
            return (name, rest.strip_prefix(b":").unwrap_or(b""));
        }
        return (h, b"");
    }
    match h.iter().rposition(|&c| c == b':') {
        Some(i) => (&h[..i], &h[i + 1..]),
        None => (h, b""),
    }
}

/// Percent-decodes `src` onto `out`; false if the result would contain NUL.
fn percent_decode_into(out: &mut Vec<u8>, src: &[u8]) -> bool {
    if !src.contains(&b'%') {
        out.extend_from_slice(src);
        return true;
    }
    let hex = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    let mut i = 0;
    while i < src.len() {
        let c = src[i];
        if c == b'%' && i + 2 < src.len() {
            if let (Some(h), Some(l)) = (hex(src[i + 1]), hex(src[i + 2])) {
                let b = h * 16 + l;
                if b == 0 {
                    return false;
                }
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(c);
        i += 1;
    }
    true
}

/// Picks the client address: the peer, or — when the peer is a trusted proxy — X-Real-IP, else the
/// last X-Forwarded-For entry (the one the trusted proxy appended).
pub fn forwarded_client<'a>(
    headers: &'a HeaderMap,
    peer: IpAddr,
    trusted: &TrustedProxies,
) -> Option<&'a [u8]> {
    if !trusted.contains(peer) {
        return None;
    }
    if let Some(v) = headers.get("x-real-ip") {
        let v = v.as_bytes().trim_ascii();
        if valid_ip(v) {
            return Some(v);
        }
    }
    let last = headers.get_all("x-forwarded-for").iter().next_back()?;
    let entry = last.as_bytes().rsplit(|&c| c == b',').next()?.trim_ascii();
    valid_ip(entry).then_some(entry)
}

fn valid_ip(v: &[u8]) -> bool {
    std::str::from_utf8(v)
        .ok()
        .and_then(|s| s.parse::<IpAddr>().ok())
        .is_some()
}

/// `forwarded_allow_ips`, ready for lookups.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies {
    pub any: bool,
    pub ips: Vec<IpAddr>,
}

impl TrustedProxies {
    pub fn new(list: &[String]) -> Self {
        TrustedProxies {
            any: list.iter().any(|s| s == "*"),
            ips: list.iter().filter_map(|s| s.parse().ok()).collect(),
        }
    }
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        self.any || self.ips.contains(&ip)
    }
}

/// One frame from the worker.
#[derive(Debug)]
pub enum Frame {
    Start(Bytes),
    Body(Bytes),
    End,
    Abort(Bytes),
    Pong,
}

/// A broken promise from the worker.
#[derive(Debug)]
pub struct ProtocolError(pub String);

/// Takes one complete frame off the front of `buf`, if there is one.
pub fn take_frame(buf: &mut BytesMut) -> Result<Option<Frame>, ProtocolError> {
    if buf.len() < FRAME_HEADER_LEN {
        return Ok(None);
    }
    let kind = buf[0];
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if buf.len() < FRAME_HEADER_LEN + len {
        if len > 64 << 20 {
            return Err(ProtocolError(format!("frame of {len} bytes is too large")));
        }
        buf.reserve(FRAME_HEADER_LEN + len - buf.len());
        return Ok(None);
    }
    buf.advance(FRAME_HEADER_LEN);
    let payload = buf.split_to(len).freeze();
    Ok(Some(match kind {
        b'S' => Frame::Start(payload),
        b'B' => Frame::Body(payload),
        b'E' => Frame::End,
        b'A' => Frame::Abort(payload),
        b'P' => Frame::Pong,
        k => return Err(ProtocolError(format!("unknown frame kind {k:#04x}"))),
    }))
}

/// Hop-by-hop response headers (RFC 9110 §7.6.1; gunicorn's list): never passed to the client
/// as the app wrote them.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    *name == header::CONNECTION
        || *name == header::TRANSFER_ENCODING
        || *name == header::TE
        || *name == header::TRAILER
        || *name == header::UPGRADE
        || *name == header::PROXY_AUTHENTICATE
        || *name == header::PROXY_AUTHORIZATION
        || name.as_str() == "keep-alive"
        || name.as_str() == "trailers"
}

/// Whether a comma-separated header value (`Connection: keep-alive, Upgrade`) lists `token`,
/// case-insensitively.
pub fn has_token(value: &[u8], token: &str) -> bool {
    value
        .split(|&c| c == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// Status and headers of an `S` frame.
pub fn parse_start(
    payload: &[u8],
) -> Result<(StatusCode, Option<Bytes>, HeaderMap), ProtocolError> {
    let mut fields = payload.split(|&c| c == 0);
    let status_line = fields.next().unwrap_or(b"");
    if status_line.len() < 3 {
        return Err(ProtocolError("empty status".into()));
    }
    let status = StatusCode::from_bytes(&status_line[..3])
        .map_err(|_| ProtocolError("invalid status code".into()))?;
    let reason = status_line
        .get(4..)
        .filter(|r| !r.is_empty() && status.canonical_reason().map(str::as_bytes) != Some(*r));
    let reason = reason.map(Bytes::copy_from_slice);
    let mut headers = HeaderMap::with_capacity(8);
    while let Some(name) = fields.next() {
        let value = fields
            .next()
            .ok_or_else(|| ProtocolError("header without value".into()))?;
        let name = HeaderName::from_bytes(name)
            .map_err(|_| ProtocolError("invalid header name".into()))?;
        if is_hop_by_hop(&name) {
            // Of the app's Connection header only a `close` option is kept (hyper then closes
            // the client connection after this response); the rest of the kind is dropped.
            if name == header::CONNECTION && has_token(value, "close") {
                headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            continue;
        }
        let value = HeaderValue::from_bytes(value)
            .map_err(|_| ProtocolError("invalid header value".into()))?;
        headers.append(name, value);
    }
    Ok((status, reason, headers))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(uri: &str, headers: &[(&str, &str)], body_len: u64) -> Vec<String> {
        let uri: Uri = uri.parse().unwrap();
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        let server = ServerInfo {
            name: "127.0.0.1".into(),
            port: "8000".into(),
        };
        let facts = RequestFacts {
            method: &Method::GET,
            uri: &uri,
            version: Version::HTTP_11,
            headers: &map,
            remote: "127.0.0.1:5555".parse().unwrap(),
            remote_ip_override: None,
            scheme: "http",
            trusted_peer: false,
            server: &server,
            body_len,
            has_body: body_len > 0,
        };
        let mut out = Vec::new();
        encode_request(&mut out, &facts).unwrap();
        assert_eq!(out[0], b'R');
        let mlen = u32::from_be_bytes([out[1], out[2], out[3], out[4]]) as usize;
        assert_eq!(mlen, out.len() - REQUEST_HEADER_LEN);
        out[REQUEST_HEADER_LEN..]
            .split(|&c| c == 0)
            .map(|f| f.iter().map(|&b| b as char).collect())
            .collect()
    }

    #[test]
    fn environ_fields() {
        let f = encode(
            "/caf%C3%A9/x?a=1&b=%20",
            &[
                ("host", "example.com:81"),
                ("x-a", "1"),
                ("x-a", "2"),
                ("cookie", "a=1"),
                ("cookie", "b=2"),
                ("content-type", "text/plain"),
            ],
            3,
        );
        assert_eq!(f[0], "GET");
        assert_eq!(f[1], "/caf\u{c3}\u{a9}/x");
        assert_eq!(f[2], "a=1&b=%20");
        assert_eq!(f[3], "/caf%C3%A9/x?a=1&b=%20");
        assert_eq!(f[4], "HTTP/1.1");
        assert_eq!(f[5], "127.0.0.1");
        assert_eq!(f[6], "5555");
        assert_eq!(f[7], "example.com");
        assert_eq!(f[8], "81");
        assert_eq!(f[9], "http");
        let pairs: Vec<(String, String)> = f[10..]
            .chunks(2)
            .map(|c| (c[0].clone(), c[1].clone()))
            .collect();
        assert!(pairs.contains(&("CONTENT_TYPE".into(), "text/plain".into())));
        assert!(pairs.contains(&("CONTENT_LENGTH".into(), "3".into())));
        assert!(pairs.contains(&("HTTP_X_A".into(), "1, 2".into())));
        assert!(pairs.contains(&("HTTP_COOKIE".into(), "a=1; b=2".into())));
        assert!(!pairs.iter().any(|(k, _)| k == "HTTP_CONTENT_TYPE"));
    }

    #[test]
    fn underscore_headers_dropped_and_nul_rejected() {
        let f = encode("/", &[("x_forwarded_for", "1.2.3.4")], 0);
        assert!(!f.iter().any(|x| x.contains("FORWARDED")));
        let uri: Uri = "/a%00b".parse().unwrap();
        let map = HeaderMap::new();
        let server = ServerInfo {
            name: "h".into(),
            port: "1".into(),
        };
        let facts = RequestFacts {
            method: &Method::GET,
            uri: &uri,
            version: Version::HTTP_11,
            headers: &map,
            remote: "127.0.0.1:1".parse().unwrap(),
            remote_ip_override: None,
            scheme: "http",
            trusted_peer: false,
            server: &server,
            body_len: 0,
            has_body: false,
        };
        assert_eq!(
            encode_request(&mut Vec::new(), &facts),
            Err(EncodeError::NulInPath)
        );
    }

    #[test]
    fn frames_parse() {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(b"S\0\0\0\x17200 OK\0Content-Type\0x/y");
        buf.extend_from_slice(b"B\0\0\0\x02hiE\0\0\0\0");
        let Some(Frame::Start(p)) = take_frame(&mut buf).unwrap() else {
            panic!()
        };
        let (s, reason, h) = parse_start(&p).unwrap();
        assert_eq!(s, StatusCode::OK);
        assert!(reason.is_none());
        assert_eq!(h["content-type"], "x/y");
        assert!(matches!(take_frame(&mut buf).unwrap(), Some(Frame::Body(b)) if &b[..] == b"hi"));
        assert!(matches!(take_frame(&mut buf).unwrap(), Some(Frame::End)));
        assert!(take_frame(&mut buf).unwrap().is_none());
    }

    #[test]
    fn trusted_forwarding() {
        let mut h = HeaderMap::new();
        h.append(
            "x-forwarded-for",
            HeaderValue::from_static("10.0.0.1, 203.0.113.7"),
        );
        let t = TrustedProxies::new(&["127.0.0.1".into()]);
        assert_eq!(
            forwarded_client(&h, "127.0.0.1".parse().unwrap(), &t),
            Some(&b"203.0.113.7"[..])
        );
        assert_eq!(forwarded_client(&h, "192.0.2.1".parse().unwrap(), &t), None);
        h.insert("x-real-ip", HeaderValue::from_static("198.51.100.2"));
        assert_eq!(
            forwarded_client(&h, "127.0.0.1".parse().unwrap(), &t),
            Some(&b"198.51.100.2"[..])
        );
    }

    #[test]
    fn hop_by_hop_response_headers_are_dropped_but_close_is_kept() {
        let p = b"200 OK\0Connection\0Keep-Alive, CLOSE\0Keep-Alive\0timeout=5\0\
                  Transfer-Encoding\0chunked\0Upgrade\0h2c\0X-A\0one";
        let (_, _, h) = parse_start(p).unwrap();
        assert_eq!(h.get("connection").unwrap(), "close");
        assert_eq!(h.get("x-a").unwrap(), "one");
        assert_eq!(h.len(), 2, "{h:?}");
        let (_, _, h) = parse_start(b"200 OK\0Connection\0keep-alive").unwrap();
        assert!(h.is_empty(), "{h:?}");
    }
}
