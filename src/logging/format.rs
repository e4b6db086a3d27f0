//! The access-log line format: gunicorn's `access_log_format` tokens, parsed once at config load
//! into a list of [`Segment`]s, or one JSON object per line. Rendering walks the segments and
//! writes into a reused buffer; nothing is parsed per request.
//!
//! Pure: depends on nothing else in the crate, so `config` can parse the format at load time.

use std::borrow::Cow;
use std::cell::RefCell;
use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::header::{HeaderName, HeaderValue};
use http::{Method, Uri, Version};

/// gunicorn's default `access_log_format`, kept here for the docs and tests.
pub const GUNICORN_DEFAULT: &str = r#"%(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s""#;

/// The default: Apache combined, then the duration in microseconds and the worker's pid.
pub const DEFAULT: &str =
    r#"%(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s" %(D)s %(P)s"#;

/// One piece of a text format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    Literal(Box<str>),
    /// `h`: client address (X-Forwarded-For / X-Real-IP only from `forwarded_allow_ips`).
    Remote,
    /// `l`: always `-`.
    Dash,
    /// `u`: user name of HTTP Basic authentication, or `-`.
    User,
    /// `t`: `[22/Nov/2026:13:15:11 +0800]`, local time.
    Time,
    /// `r`: `GET /path?query HTTP/1.1`.
    RequestLine,
    /// `s`: status code.
    Status,
    /// `b` and `B`: response body bytes sent.
    Bytes,
    /// `f`: Referer, or `-`.
    Referer,
    /// `a`: User-Agent, or `-`.
    UserAgent,
    /// `T`: whole seconds.
    Seconds,
    /// `M`: milliseconds.
    Millis,
    /// `D`: microseconds.
    Micros,
    /// `L`: seconds with 6 decimals.
    SecondsDecimal,
    /// `p`: `<pid>` of the worker that answered (gunicorn's form), `<->` if none did.
    PidAngle,
    /// `P` (not in gunicorn): the worker's pid, `-` if none did.
    Pid,
    /// `m`: request method.
    Method,
    /// `U`: URL path, percent-decoded (gunicorn's PATH_INFO).
    Path,
    /// `q`: query string (without `?`), empty if none.
    Query,
    /// `H`: protocol, `HTTP/1.1`.
    Protocol,
    /// `{name}i`: request header (index into [`AccessFormat::request_headers`]).
    RequestHeader(usize),
    /// `{name}o`: response header (index into [`AccessFormat::response_headers`]).
    ResponseHeader(usize),
}

/// Text (gunicorn tokens) or JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Text(Vec<Segment>),
    Json,
}

/// A parsed access-log format and what it needs captured per request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessFormat {
    /// The format as written (`"json"` for JSON).
    source: Box<str>,
    pub kind: Kind,
    /// Request headers named by `%({name}i)s`, in first-use order.
    pub request_headers: Vec<HeaderName>,
    /// Response headers named by `%({name}o)s`.
    pub response_headers: Vec<HeaderName>,
    pub needs_referer: bool,
    pub needs_user_agent: bool,
    pub needs_authorization: bool,
}

impl Default for AccessFormat {
    fn default() -> Self {
        AccessFormat::parse(DEFAULT).expect("the default access format parses")
    }
}

const TOKENS: &str = "h l u t r s b B f a T M D L p P m U q H {header}i {header}o";

impl AccessFormat {
    /// Parses `"json"` or a gunicorn `access_log_format` string. The error says what is wrong.
    pub fn parse(s: &str) -> Result<AccessFormat, String> {
        if s.trim().eq_ignore_ascii_case("json") {
            return Ok(AccessFormat {
                source: "json".into(),
                kind: Kind::Json,
                request_headers: Vec::new(),
                response_headers: Vec::new(),
                needs_referer: true,
                needs_user_agent: true,
                needs_authorization: false,
            });
        }
        let mut f = AccessFormat {
            source: s.into(),
            kind: Kind::Json,
            request_headers: Vec::new(),
            response_headers: Vec::new(),
            needs_referer: false,
            needs_user_agent: false,
            needs_authorization: false,
        };
        let mut segs: Vec<Segment> = Vec::new();
        let mut lit = String::new();
        let mut rest = s;
        while let Some(pos) = rest.find('%') {
            lit.push_str(&rest[..pos]);
            let after = &rest[pos + 1..];
            if let Some(r) = after.strip_prefix('%') {
                lit.push('%');
                rest = r;
                continue;
            }
            let Some(inner) = after.strip_prefix('(') else {
                return Err(format!(
                    "a '%' must start a token like %(h)s (or be doubled: %%), at {:?}",
                    clip(&rest[pos..])
                ));
            };
            let Some(close) = inner.find(')') else {
                return Err(format!("unclosed %( at {:?}", clip(&rest[pos..])));
            };
            let key = &inner[..close];
            let after_key = &inner[close + 1..];
            let conv = after_key.chars().next();
            if !matches!(conv, Some('s') | Some('d') | Some('i')) {
                return Err(format!(
                    "%({key}) must be followed by s (as in %({key})s); width and other conversions are not supported"
                ));
            }
            let seg = f.token(key)?;
            if !lit.is_empty() {
                segs.push(Segment::Literal(std::mem::take(&mut lit).into_boxed_str()));
            }
            segs.push(seg);
            rest = &after_key[1..];
        }
        lit.push_str(rest);
        if !lit.is_empty() {
            segs.push(Segment::Literal(lit.into_boxed_str()));
        }
        if segs.is_empty() {
            return Err("is empty: use \"off\" in [log] access to turn the access log off".into());
        }
        f.kind = Kind::Text(segs);
        Ok(f)
    }

    fn token(&mut self, key: &str) -> Result<Segment, String> {
        Ok(match key {
            "h" => Segment::Remote,
            "l" => Segment::Dash,
            "u" => {
                self.needs_authorization = true;
                Segment::User
            }
            "t" => Segment::Time,
            "r" => Segment::RequestLine,
            "s" => Segment::Status,
            "b" | "B" => Segment::Bytes,
            "f" => {
                self.needs_referer = true;
                Segment::Referer
            }
            "a" => {
                self.needs_user_agent = true;
                Segment::UserAgent
            }
            "T" => Segment::Seconds,
            "M" => Segment::Millis,
            "D" => Segment::Micros,
            "L" => Segment::SecondsDecimal,
            "p" => Segment::PidAngle,
            "P" => Segment::Pid,
            "m" => Segment::Method,
            "U" => Segment::Path,
            "q" => Segment::Query,
            "H" => Segment::Protocol,
            _ => {
                let header = |k: &str| -> Result<HeaderName, String> {
                    HeaderName::from_bytes(k.as_bytes())
                        .map_err(|_| format!("%({{{k}}}...): {k:?} is not a header name"))
                };
                if let Some(name) = key.strip_prefix('{').and_then(|k| k.strip_suffix("}i")) {
                    let name = header(name)?;
                    return Ok(Segment::RequestHeader(index_of(
                        &mut self.request_headers,
                        name,
                    )));
                }
                if let Some(name) = key.strip_prefix('{').and_then(|k| k.strip_suffix("}o")) {
                    let name = header(name)?;
                    return Ok(Segment::ResponseHeader(index_of(
                        &mut self.response_headers,
                        name,
                    )));
                }
                if key.starts_with('{') && key.ends_with("}e") {
                    return Err(format!(
                        "%({key})s: WSGI environ variables live in the worker and cannot be logged by the master; log a request header with %({{name}}i)s instead"
                    ));
                }
                return Err(format!("unknown token %({key})s; known tokens: {TOKENS}"));
            }
        })
    }

    /// The format as written.
    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn is_json(&self) -> bool {
        matches!(self.kind, Kind::Json)
    }
}

fn index_of(list: &mut Vec<HeaderName>, name: HeaderName) -> usize {
    match list.iter().position(|n| *n == name) {
        Some(i) => i,
        None => {
            list.push(name);
            list.len() - 1
        }
    }
}

fn clip(s: &str) -> &str {
    match s.char_indices().nth(16) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Everything one line can show.
pub struct Facts<'a> {
    pub remote: &'a str,
    pub method: &'a Method,
    pub uri: &'a Uri,
    pub version: Version,
    pub status: u16,
    pub bytes: u64,
    pub elapsed: Duration,
    pub worker_pid: Option<u32>,
    pub referer: Option<&'a HeaderValue>,
    pub user_agent: Option<&'a HeaderValue>,
    pub authorization: Option<&'a HeaderValue>,
    pub request_headers: &'a [Option<HeaderValue>],
    pub response_headers: &'a [Option<HeaderValue>],
    pub now: SystemTime,
}

fn version_str(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/?",
    }
}

impl AccessFormat {
    /// Appends one line (with its newline) to `out`.
    pub fn render(&self, out: &mut String, f: &Facts<'_>) {
        match &self.kind {
            Kind::Text(segs) => {
                for s in segs {
                    render_segment(out, s, f);
                }
            }
            Kind::Json => render_json(out, f),
        }
        out.push('\n');
    }
}

fn render_segment(out: &mut String, s: &Segment, f: &Facts<'_>) {
    let header = |out: &mut String, v: Option<&HeaderValue>| match v {
        Some(v) => escape_into(out, v.as_bytes()),
        None => out.push('-'),
    };
    match s {
        Segment::Literal(l) => out.push_str(l),
        Segment::Remote => out.push_str(f.remote),
        Segment::Dash => out.push('-'),
        Segment::User => match f.authorization.and_then(|v| basic_user(v.as_bytes())) {
            Some(u) => escape_into(out, &u),
            None => out.push('-'),
        },
        Segment::Time => with_clock(f.now, |c| {
            out.push('[');
            out.push_str(&c.clf);
            out.push(']');
        }),
        Segment::RequestLine => {
            out.push_str(f.method.as_str());
            out.push(' ');
            match f.uri.path_and_query() {
                Some(pq) => escape_into(out, pq.as_str().as_bytes()),
                None => escape_into(out, f.uri.to_string().as_bytes()),
            }
            out.push(' ');
            out.push_str(version_str(f.version));
        }
        Segment::Status => push_num(out, f.status),
        Segment::Bytes => push_num(out, f.bytes),
        Segment::Referer => header(out, f.referer),
        Segment::UserAgent => header(out, f.user_agent),
        Segment::Seconds => push_num(out, f.elapsed.as_secs()),
        Segment::Millis => push_num(out, f.elapsed.as_millis() as u64),
        Segment::Micros => push_num(out, f.elapsed.as_micros() as u64),
        Segment::SecondsDecimal => {
            let _ = write!(
                out,
                "{}.{:06}",
                f.elapsed.as_secs(),
                f.elapsed.subsec_micros()
            );
        }
        Segment::PidAngle => match f.worker_pid {
            Some(p) => {
                let _ = write!(out, "<{p}>");
            }
            None => out.push_str("<->"),
        },
        Segment::Pid => match f.worker_pid {
            Some(p) => push_num(out, p),
            None => out.push('-'),
        },
        Segment::Method => out.push_str(f.method.as_str()),
        Segment::Path => escape_into(out, &percent_decode(f.uri.path().as_bytes())),
        Segment::Query => escape_into(out, f.uri.query().unwrap_or("").as_bytes()),
        Segment::Protocol => out.push_str(version_str(f.version)),
        Segment::RequestHeader(i) => {
            header(out, f.request_headers.get(*i).and_then(|v| v.as_ref()))
        }
        Segment::ResponseHeader(i) => {
            header(out, f.response_headers.get(*i).and_then(|v| v.as_ref()))
        }
    }
}

#[derive(serde::Serialize)]
struct JsonLine<'a> {
    time: &'a str,
    remote_addr: &'a str,
    method: &'a str,
    path: &'a str,
    query: &'a str,
    protocol: &'static str,
    status: u16,
    bytes: u64,
    duration_us: u64,
    referer: Option<Cow<'a, str>>,
    user_agent: Option<Cow<'a, str>>,
    worker_pid: Option<u32>,
}

fn render_json(out: &mut String, f: &Facts<'_>) {
    fn lossy(v: Option<&HeaderValue>) -> Option<Cow<'_, str>> {
        v.map(|v| String::from_utf8_lossy(v.as_bytes()))
    }
    let mut time = String::with_capacity(32);
    let d = f.now.duration_since(UNIX_EPOCH).unwrap_or_default();
    with_clock(f.now, |c| {
        let _ = write!(time, "{}.{:03}{}", c.iso, d.subsec_millis(), c.offset_iso);
    });
    let line = JsonLine {
        time: &time,
        remote_addr: f.remote,
        method: f.method.as_str(),
        path: f.uri.path(),
        query: f.uri.query().unwrap_or(""),
        protocol: version_str(f.version),
        status: f.status,
        bytes: f.bytes,
        duration_us: f.elapsed.as_micros() as u64,
        referer: lossy(f.referer),
        user_agent: lossy(f.user_agent),
        worker_pid: f.worker_pid,
    };
    // Serializing plain strings and numbers into a String cannot fail.
    if let Ok(s) = serde_json::to_string(&line) {
        out.push_str(&s);
    }
}

/// Escapes quotes, backslashes and non-printable bytes so a line cannot be forged.
pub fn escape_into(out: &mut String, b: &[u8]) {
    let mut run = 0;
    for (i, &c) in b.iter().enumerate() {
        if (0x20..=0x7e).contains(&c) && c != b'"' && c != b'\\' {
            continue;
        }
        push_ascii(out, &b[run..i]);
        match c {
            b'"' => out.push_str("\\\""),
            b'\\' => out.push_str("\\\\"),
            _ => {
                let _ = write!(out, "\\x{c:02x}");
            }
        }
        run = i + 1;
    }
    push_ascii(out, &b[run..]);
}

/// Appends printable ASCII (checked by the caller; anything else would be skipped).
fn push_ascii(out: &mut String, b: &[u8]) {
    if let Ok(s) = std::str::from_utf8(b) {
        out.push_str(s);
    }
}

fn push_num(out: &mut String, n: impl itoa::Integer) {
    out.push_str(itoa::Buffer::new().format(n));
}

fn percent_decode(b: &[u8]) -> Cow<'_, [u8]> {
    if !b.contains(&b'%') {
        return Cow::Borrowed(b);
    }
    let hex = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push(h * 16 + l);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    Cow::Owned(out)
}

/// The user name of an `Authorization: Basic ...` header.
fn basic_user(v: &[u8]) -> Option<Vec<u8>> {
    let (scheme, rest) = v.split_at(v.iter().position(|&c| c == b' ')?);
    if !scheme.eq_ignore_ascii_case(b"basic") {
        return None;
    }
    let decoded = base64_decode(rest.trim_ascii())?;
    let user = match decoded.iter().position(|&c| c == b':') {
        Some(i) => decoded[..i].to_vec(),
        None => decoded,
    };
    Some(user)
}

fn base64_decode(s: &[u8]) -> Option<Vec<u8>> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => return None,
        } as u32)
    };
    let s: Vec<u8> = s.iter().copied().filter(|&c| c != b'=').collect();
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    for chunk in s.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= val(c)? << (18 - 6 * i);
        }
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        match chunk.len() {
            4 => out.extend_from_slice(&bytes),
            3 => out.extend_from_slice(&bytes[..2]),
            2 => out.push(bytes[0]),
            _ => return None,
        }
    }
    Some(out)
}

// ---------------------------------------------------------------------------------------------
// Local time
// ---------------------------------------------------------------------------------------------

/// A broken-down local time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Civil {
    pub year: i64,
    pub month: u32,
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
    /// Seconds east of UTC.
    pub offset: i64,
}

/// `secs` since the epoch as local time (the TZ variable or /etc/localtime, through libc).
pub fn local_civil(secs: i64) -> Civil {
    let t: libc::time_t = secs as libc::time_t;
    // SAFETY: localtime_r only writes into `tm`, which we own; a null return is handled.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    let ok = unsafe { !libc::localtime_r(&t, &mut tm).is_null() };
    if !ok {
        return utc_civil(secs);
    }
    Civil {
        year: tm.tm_year as i64 + 1900,
        month: tm.tm_mon as u32 + 1,
        day: tm.tm_mday as u32,
        hour: tm.tm_hour as u32,
        minute: tm.tm_min as u32,
        second: tm.tm_sec as u32,
        offset: tm.tm_gmtoff as i64,
    }
}

/// `secs` since the epoch in UTC (Howard Hinnant's civil-from-days).
pub fn utc_civil(secs: i64) -> Civil {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    Civil {
        year: y,
        month: m as u32,
        day: d as u32,
        hour: (rem / 3600) as u32,
        minute: ((rem % 3600) / 60) as u32,
        second: (rem % 60) as u32,
        offset: 0,
    }
}

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// `22/Nov/2026:13:15:11 +0800`.
pub fn format_clf(c: &Civil) -> String {
    let off = c.offset.abs();
    format!(
        "{:02}/{}/{}:{:02}:{:02}:{:02} {}{:02}{:02}",
        c.day,
        MONTHS[(c.month.clamp(1, 12) - 1) as usize],
        c.year,
        c.hour,
        c.minute,
        c.second,
        if c.offset < 0 { '-' } else { '+' },
        off / 3600,
        (off % 3600) / 60
    )
}

/// The per-second cache of formatted times.
struct Clock {
    secs: i64,
    clf: String,
    /// `2026-11-22T13:15:11`
    iso: String,
    /// `+08:00`
    offset_iso: String,
}

thread_local! {
    static CLOCK: RefCell<Clock> = const { RefCell::new(Clock {
        secs: i64::MIN,
        clf: String::new(),
        iso: String::new(),
        offset_iso: String::new(),
    }) };
}

/// Runs `f` with `now` formatted (once per second per thread).
fn with_clock(now: SystemTime, f: impl FnOnce(&Clock)) {
    let secs = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    CLOCK.with(|c| {
        let mut c = c.borrow_mut();
        if c.secs != secs {
            let civ = local_civil(secs);
            let off = civ.offset.abs();
            *c = Clock {
                secs,
                clf: format_clf(&civ),
                iso: format!(
                    "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
                    civ.year, civ.month, civ.day, civ.hour, civ.minute, civ.second
                ),
                offset_iso: format!(
                    "{}{:02}:{:02}",
                    if civ.offset < 0 { '-' } else { '+' },
                    off / 3600,
                    (off % 3600) / 60
                ),
            };
        }
        f(&c);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts<'a>(
        uri: &'a Uri,
        method: &'a Method,
        req: &'a [Option<HeaderValue>],
        resp: &'a [Option<HeaderValue>],
        referer: Option<&'a HeaderValue>,
        agent: Option<&'a HeaderValue>,
        auth: Option<&'a HeaderValue>,
    ) -> Facts<'a> {
        Facts {
            remote: "10.1.2.3",
            method,
            uri,
            version: Version::HTTP_11,
            status: 201,
            bytes: 1234,
            elapsed: Duration::from_micros(2_345_678),
            worker_pid: Some(4242),
            referer,
            user_agent: agent,
            authorization: auth,
            request_headers: req,
            response_headers: resp,
            now: UNIX_EPOCH + Duration::from_secs(1_795_324_511),
        }
    }

    fn render(fmt: &str, f: &Facts<'_>) -> String {
        let mut s = String::new();
        AccessFormat::parse(fmt).unwrap().render(&mut s, f);
        s.pop();
        s
    }

    #[test]
    fn every_token() {
        let uri: Uri = "/a%20b/c?x=1&y=%22".parse().unwrap();
        let m = Method::POST;
        let rh = HeaderValue::from_static("req-7");
        let rs = HeaderValue::from_static("resp-9");
        let referer = HeaderValue::from_static("http://r/\"q\"");
        let agent = HeaderValue::from_static("curl/8");
        // "alice:secret"
        let auth = HeaderValue::from_static("Basic YWxpY2U6c2VjcmV0");
        let req = [Some(rh)];
        let resp = [Some(rs)];
        let f = facts(
            &uri,
            &m,
            &req,
            &resp,
            Some(&referer),
            Some(&agent),
            Some(&auth),
        );
        let cases = [
            ("%(h)s", "10.1.2.3"),
            ("%(l)s", "-"),
            ("%(u)s", "alice"),
            ("%(r)s", "POST /a%20b/c?x=1&y=%22 HTTP/1.1"),
            ("%(s)s", "201"),
            ("%(b)s", "1234"),
            ("%(B)s", "1234"),
            ("%(f)s", "http://r/\\\"q\\\""),
            ("%(a)s", "curl/8"),
            ("%(T)s", "2"),
            ("%(M)s", "2345"),
            ("%(D)s", "2345678"),
            ("%(L)s", "2.345678"),
            ("%(p)s", "<4242>"),
            ("%(P)s", "4242"),
            ("%(m)s", "POST"),
            ("%(U)s", "/a b/c"),
            ("%(q)s", "x=1&y=%22"),
            ("%(H)s", "HTTP/1.1"),
            ("%({x-request-id}i)s", "req-7"),
            ("%({X-Out}o)s", "resp-9"),
            ("100%% %(s)d!", "100% 201!"),
        ];
        for (fmt, want) in cases {
            assert_eq!(render(fmt, &f), want, "format {fmt}");
        }
        let t = render("%(t)s", &f);
        assert!(
            t.starts_with('[') && t.ends_with(']') && t.contains("/Nov/2026:"),
            "{t}"
        );
    }

    #[test]
    fn missing_values_are_dashes() {
        let uri: Uri = "/".parse().unwrap();
        let m = Method::GET;
        let req = [None];
        let resp = [None];
        let f = facts(&uri, &m, &req, &resp, None, None, None);
        assert_eq!(
            render(r#"%(u)s "%(f)s" "%(a)s" %({a}i)s %({b}o)s %(q)s."#, &f),
            r#"- "-" "-" - - ."#
        );
    }

    #[test]
    fn default_is_combined_plus_duration_and_pid() {
        let uri: Uri = "/pid?tag=1".parse().unwrap();
        let m = Method::GET;
        let agent = HeaderValue::from_static("ua");
        let f = facts(&uri, &m, &[], &[], None, Some(&agent), None);
        let line = render(DEFAULT, &f);
        assert!(line.starts_with("10.1.2.3 - - ["), "{line}");
        assert!(
            line.ends_with(r#"] "GET /pid?tag=1 HTTP/1.1" 201 1234 "-" "ua" 2345678 4242"#),
            "{line}"
        );
        assert!(AccessFormat::parse(GUNICORN_DEFAULT).is_ok());
    }

    #[test]
    fn parse_errors_name_the_problem() {
        let e = AccessFormat::parse("%(h)s %(z)s").unwrap_err();
        assert!(e.contains("%(z)s") && e.contains("known tokens"), "{e}");
        assert!(AccessFormat::parse("%(h)")
            .unwrap_err()
            .contains("followed by s"));
        assert!(AccessFormat::parse("%(h").unwrap_err().contains("unclosed"));
        assert!(AccessFormat::parse("50% %(h)s")
            .unwrap_err()
            .contains("doubled"));
        assert!(AccessFormat::parse("%({HOME}e)s")
            .unwrap_err()
            .contains("environ"));
        assert!(AccessFormat::parse("%({bad name}i)s")
            .unwrap_err()
            .contains("header name"));
        assert!(AccessFormat::parse("").is_err());
    }

    #[test]
    fn header_captures_are_listed_once() {
        let f = AccessFormat::parse("%({X-A}i)s %({x-a}i)s %({x-b}o)s %(a)s").unwrap();
        assert_eq!(f.request_headers.len(), 1);
        assert_eq!(f.response_headers.len(), 1);
        assert!(f.needs_user_agent && !f.needs_referer && !f.needs_authorization);
        let d = AccessFormat::default();
        assert!(d.request_headers.is_empty() && d.needs_referer && d.needs_user_agent);
    }

    #[test]
    fn json_line_parses() {
        let uri: Uri = "/x?y=\"1\""
            .parse()
            .unwrap_or_else(|_| "/x?y=1".parse().unwrap());
        let m = Method::GET;
        let agent = HeaderValue::from_static("a\"b");
        let f = facts(&uri, &m, &[], &[], None, Some(&agent), None);
        let s = render("json", &f);
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v["status"], 201);
        assert_eq!(v["user_agent"], "a\"b");
        assert_eq!(v["referer"], serde_json::Value::Null);
        assert_eq!(v["worker_pid"], 4242);
        assert_eq!(v["duration_us"], 2_345_678);
        assert_eq!(v["remote_addr"], "10.1.2.3");
    }

    #[test]
    fn clf_dates_and_offsets() {
        assert_eq!(format_clf(&utc_civil(0)), "01/Jan/1970:00:00:00 +0000");
        assert_eq!(
            format_clf(&utc_civil(1_795_324_511)),
            "22/Nov/2026:05:15:11 +0000"
        );
        assert_eq!(
            format_clf(&utc_civil(951_782_400)),
            "29/Feb/2000:00:00:00 +0000"
        );
        let mut c = utc_civil(0);
        c.offset = -(5 * 3600 + 30 * 60);
        assert!(format_clf(&c).ends_with(" -0530"));
    }

    #[test]
    fn helpers() {
        assert_eq!(&*percent_decode(b"/a%2Fb%zz%4"), b"/a/b%zz%4");
        assert_eq!(base64_decode(b"YWxpY2U6c2VjcmV0").unwrap(), b"alice:secret");
        assert_eq!(basic_user(b"Bearer abc"), None);
        let mut s = String::new();
        escape_into(&mut s, b"a\"b\\c\n");
        assert_eq!(s, "a\\\"b\\\\c\\x0a");
    }
}
