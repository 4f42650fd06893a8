//! Turns the file structs into the runtime [`Config`], collecting every
//! error and warning with its YAML path and line.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU64;
use std::path::PathBuf;
use std::time::Duration;

use http::header::HeaderName;
use indexmap::IndexMap;

use super::file::{self, AmountFile, CreditsFile, FileConfig};
use super::locate::Lines;
use super::*;
use crate::calendar::Interval;
use crate::path::normalise;

const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_FLUSH_INTERVAL: Duration = Duration::from_secs(5);
const MAX_PREFIX_LEN: usize = 32;
/// The longest a rate limit's or pool's window may be.
const MAX_WINDOW: Duration = Duration::from_secs(365 * 86_400);
/// The longest a connect or read timeout may be.
const MAX_TIMEOUT: Duration = Duration::from_secs(3_600);
/// The longest the reporter may wait between passes, or before it takes
/// over a dead node's events.
const MAX_REPORTING_WAIT: Duration = Duration::from_secs(86_400);

/// The one duration grammar of the config (SPEC §2): a whole number and one
/// unit, `ms`, `s`, `m`, `h` or `d`, with nothing between or around them
/// but the spaces YAML leaves. `"1 minute"`, `"60 sec"`, `"1y"` and
/// `"1h30m"` are refused; so is a number too large to be a duration.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, ()> {
    let text = text.trim();
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    let (number, unit) = text.split_at(digits);
    let n: u64 = number.parse().map_err(|_| ())?;
    let ms_per: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(()),
    };
    n.checked_mul(ms_per).map(Duration::from_millis).ok_or(())
}

/// A duration as the grammar writes it, in its largest whole unit.
fn duration_text(d: Duration) -> String {
    let ms = d.as_millis();
    [
        (86_400_000, "d"),
        (3_600_000, "h"),
        (60_000, "m"),
        (1_000, "s"),
    ]
    .into_iter()
    .find(|(per, _)| ms.is_multiple_of(*per))
    .map_or_else(
        || format!("{ms}ms"),
        |(per, unit)| format!("{}{unit}", ms / per),
    )
}

/// Whether secrets are read from their env vars, or left empty (for a
/// client that only needs addresses).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Secrets {
    Read,
    Skip,
}

pub(super) fn parse(text: &str, secrets: Secrets) -> Result<Loaded, ConfigErrors> {
    let lines = Lines::index(text);
    let Structure {
        file,
        errors: mut structural,
        cut,
    } = deserialize(text, &lines)?;
    let mut check = Check {
        lines: &lines,
        errors: Vec::new(),
        warnings: Vec::new(),
        secrets,
    };
    let config = check.config(file);
    if check.errors.is_empty() && structural.is_empty() {
        return Ok(Loaded {
            config,
            warnings: check.warnings,
        });
    }
    // What was cut out to read the rest is reported already: its defaults
    // say nothing about the file.
    let within = |path: &str, cut: &str| {
        path.strip_prefix(cut)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))
    };
    structural.extend(
        check
            .errors
            .into_iter()
            .filter(|e| !cut.iter().any(|c| within(&e.path, c))),
    );
    structural.sort_by_key(|e| e.line.unwrap_or(usize::MAX));
    Err(ConfigErrors(structural))
}

/// How many structural errors one run reports at most.
const MAX_ERRORS: usize = 100;

/// Reads the file's structure. A YAML syntax error stops there (nothing
/// after it can be read); otherwise every unknown field and every value of
/// the wrong type is reported, not just the first: each error found is cut
/// out of the document and the rest read again.
fn deserialize(text: &str, lines: &Lines) -> Result<Structure, ConfigErrors> {
    if text.trim().is_empty() {
        return Err(ConfigErrors(vec![ConfigError {
            path: String::new(),
            line: None,
            message: "the file is empty".into(),
        }]));
    }
    let mut doc: yaml_serde::Value = yaml_serde::from_str(text).map_err(|e| {
        let line = e.location().map(|l| l.line());
        ConfigErrors(vec![ConfigError {
            path: String::new(),
            line,
            message: syntax_message(&e.to_string(), line.and_then(|l| text.lines().nth(l - 1))),
        }])
    })?;
    let mut errors = Vec::new();
    let mut cut: Vec<String> = Vec::new();
    while errors.len() < MAX_ERRORS {
        let e = match serde_path_to_error::deserialize::<_, FileConfig>(doc.clone()) {
            Ok(file) => return Ok(Structure { file, errors, cut }),
            Err(e) => e,
        };
        let segments: Vec<Segment> = e.path().iter().map(Segment::of).collect();
        let path = path_text(&segments);
        let mut message = humane_message(&e.into_inner().to_string(), &path);
        if matches!(segments.last(), Some(Segment::Unknown)) {
            message = format!("a key here is not a plain name: {message}");
        }
        // A required field this loop cut out: already reported.
        if cut
            .iter()
            .any(|c| message.contains("missing field") && c.starts_with(&path))
        {
            break;
        }
        errors.push(ConfigError {
            line: lines.line(&path),
            path: path.clone(),
            message,
        });
        if !remove(&mut doc, &segments) {
            break;
        }
        cut.push(path);
    }
    Err(ConfigErrors(errors))
}

/// The file as read, with the structural errors found on the way and the
/// paths cut out of it to find them.
struct Structure {
    file: FileConfig,
    errors: Vec<ConfigError>,
    cut: Vec<String>,
}

/// One step of a path into the document, as `serde_path_to_error` saw it.
enum Segment {
    Key(String),
    Index(usize),
    /// A step with no name (a mapping key that is not a string).
    Unknown,
}

impl Segment {
    fn of(segment: &serde_path_to_error::Segment) -> Segment {
        match segment {
            serde_path_to_error::Segment::Map { key } => Segment::Key(key.clone()),
            serde_path_to_error::Segment::Seq { index } => Segment::Index(*index),
            serde_path_to_error::Segment::Enum { variant } => Segment::Key(variant.clone()),
            _ => Segment::Unknown,
        }
    }
}

/// `tiers.free.rate_limits`, `routes[2].path`: the paths errors are shown
/// with. A step with no name ends the path (its parent is what is wrong).
fn path_text(segments: &[Segment]) -> String {
    let mut out = String::new();
    for segment in segments {
        match segment {
            Segment::Key(key) if out.is_empty() => out.push_str(key),
            Segment::Key(key) => {
                out.push('.');
                out.push_str(key);
            }
            Segment::Index(i) => out.push_str(&format!("[{i}]")),
            Segment::Unknown => break,
        }
    }
    out
}

/// Cuts the value at `segments` out of `doc`: a mapping entry is removed;
/// a list item or an unnamed step cannot be (the items after it would move),
/// so the search stops there. Whether something was cut.
fn remove(doc: &mut yaml_serde::Value, segments: &[Segment]) -> bool {
    use yaml_serde::Value;
    let Some((last, parents)) = segments.split_last() else {
        return false;
    };
    let mut at = doc;
    for segment in parents {
        at = match (segment, at) {
            (Segment::Key(key), Value::Mapping(map)) => match map.get_mut(key.as_str()) {
                Some(next) => next,
                None => return false,
            },
            (Segment::Index(i), Value::Sequence(items)) => match items.get_mut(*i) {
                Some(next) => next,
                None => return false,
            },
            _ => return false,
        };
    }
    match (last, at) {
        (Segment::Key(key), Value::Mapping(map)) => map.remove(key.as_str()).is_some(),
        _ => false,
    }
}

/// serde's message for a structural error, in the file's terms: no Rust
/// type names, no repeated path.
fn humane_message(message: &str, path: &str) -> String {
    let message = message
        .strip_prefix(&format!("{path}: "))
        .unwrap_or(message);
    let mut out = message.to_string();
    for (from, to) in [
        ("expected a map", "expected a mapping (`key: value` lines)"),
        ("invalid type: sequence", "found a list"),
        ("invalid type: map", "found a mapping"),
        ("invalid type: unit value", "found nothing"),
        ("invalid type: ", "found "),
        ("expected a sequence", "expected a list"),
        ("expected u64", "expected a whole number"),
        ("expected u32", "expected a whole number"),
        ("expected u16", "expected a whole number"),
        ("expected u8", "expected a whole number"),
        ("expected i64", "expected a whole number"),
        ("expected f64", "expected a number"),
    ] {
        out = out.replace(from, to);
    }
    // "expected struct TierFile" → "expected a mapping".
    if let Some(at) = out.find("expected struct ") {
        let end = out[at + 16..]
            .find(|c: char| !c.is_alphanumeric() && c != '_')
            .map_or(out.len(), |n| at + 16 + n);
        out.replace_range(at..end, "expected a mapping (`key: value` lines)");
    }
    if path.is_empty() && out.starts_with("found") {
        out = format!(
            "the file must be a mapping of sections (listen, upstreams, tiers, routes, ...): {out}"
        );
    }
    out
}

/// The YAML parser's message for a syntax error, with what to do about it.
fn syntax_message(message: &str, line: Option<&str>) -> String {
    let message = message
        .find(" at line ")
        .map_or(message, |cut| &message[..cut]);
    if line.is_some_and(|l| l.contains('\t')) || message.contains("tab") {
        return "a tab character: YAML indents with spaces only".into();
    }
    if message.contains("did not find expected key")
        || message.contains("mapping values are not allowed")
    {
        return format!(
            "the YAML structure breaks here ({message}): check the indentation, and that \
             every `key: value` lines up with the keys beside it"
        );
    }
    if message.starts_with("duplicate entry") || message.contains("duplicate key") {
        return format!("{message}: each key may appear once in a mapping");
    }
    format!("YAML syntax: {message}")
}

struct Check<'a> {
    lines: &'a Lines,
    errors: Vec<ConfigError>,
    warnings: Vec<ConfigError>,
    secrets: Secrets,
}

impl Check<'_> {
    fn error(&mut self, path: &str, message: impl Into<String>) {
        self.errors.push(ConfigError {
            path: path.to_string(),
            line: self.lines.line(path),
            message: message.into(),
        });
    }

    fn warn(&mut self, path: &str, message: impl Into<String>) {
        self.warnings.push(ConfigError {
            path: path.to_string(),
            line: self.lines.line(path),
            message: message.into(),
        });
    }

    fn config(&mut self, file: FileConfig) -> Config {
        let listen = self.listen(&file.listen);
        let upstreams = file
            .upstreams
            .iter()
            .filter_map(|(name, u)| {
                self.upstream(&format!("upstreams.{name}"), name, u)
                    .map(|u| (name.clone(), u))
            })
            .collect::<IndexMap<_, _>>();
        let tiers = file
            .tiers
            .iter()
            .filter_map(|(id, t)| self.tier(id, t).map(|t| (id.clone(), t)))
            .collect::<IndexMap<_, _>>();
        if file.upstreams.is_empty() {
            self.error("upstreams", "at least one upstream is required");
        }
        if file.tiers.is_empty() {
            self.error("tiers", "at least one tier is required");
        }
        if file.routes.is_empty() {
            self.warn("routes", "no routes: every request will get 404");
        }
        let mut names = HashSet::new();
        let routes = file
            .routes
            .iter()
            .enumerate()
            .filter_map(|(i, r)| {
                let path = format!("routes[{i}]");
                if !names.insert(r.name.clone()) {
                    self.error(
                        &format!("{path}.name"),
                        format!("duplicate route name '{}'", r.name),
                    );
                }
                if [crate::metrics::NONE, crate::metrics::USAGE].contains(&r.name.as_str()) {
                    self.error(
                        &format!("{path}.name"),
                        format!(
                            "'{}' is reserved: metrics and logs use it for requests no route \
                             matched and for the usage endpoint",
                            r.name
                        ),
                    );
                }
                self.route(&path, r, &file)
            })
            .collect::<Vec<_>>();
        let reporting = file.reporting.as_ref().and_then(|r| self.reporting(r));
        if let Some(stripe) = file.reporting.as_ref().and_then(|r| r.stripe.as_ref()) {
            for counter in stripe.meters.keys() {
                let known = counter == "credits"
                    || file.tiers.values().any(|t| t.pools.contains_key(counter))
                    || file
                        .routes
                        .iter()
                        .any(|r| r.pools.contains_key(counter) || r.meter.contains_key(counter));
                if !known {
                    self.warn(
                        &format!("reporting.stripe.meters.{counter}"),
                        format!("no tier or route has a counter '{counter}' (credits or a pool): this meter will never bill"),
                    );
                }
            }
        }
        let usage_path = self.usage_path(&file.usage.path);
        if file.admin.root_key_env.trim().is_empty() {
            self.error("admin.root_key_env", "must name an environment variable");
        }
        if file.store.path.trim().is_empty() {
            self.error("store.path", "must not be empty");
        }
        let redis = file.store.redis.as_ref().and_then(|r| self.redis(r));
        Config {
            listen,
            store_path: PathBuf::from(&file.store.path),
            redis,
            root_key_env: file.admin.root_key_env,
            upstreams,
            tiers,
            route_table: crate::route::RouteTable::new(&routes),
            routes,
            reporting,
            usage_path,
        }
    }

    fn listen(&mut self, l: &file::ListenFile) -> Listen {
        let mut addr = |field: &str, value: &str| -> SocketAddr {
            value.parse().unwrap_or_else(|_| {
                self.error(
                    &format!("listen.{field}"),
                    format!("'{value}' is not an address like 127.0.0.1:8080"),
                );
                SocketAddr::from(([127, 0, 0, 1], 0))
            })
        };
        let tls_addr = l
            .proxy_tls
            .as_ref()
            .map(|t| ("proxy_tls.addr", addr("proxy_tls.addr", &t.addr)));
        let mut listen = Listen {
            proxy: addr("proxy", &l.proxy),
            admin: addr("admin", &l.admin),
            metrics: addr("metrics", &l.metrics),
            proxy_tls: None,
        };
        let mut named = vec![
            ("proxy", listen.proxy),
            ("admin", listen.admin),
            ("metrics", listen.metrics),
        ];
        named.extend(tls_addr);
        for (i, (a_name, a)) in named.iter().enumerate() {
            for (b_name, b) in &named[i + 1..] {
                if overlaps(*a, *b) {
                    self.error(
                        &format!("listen.{b_name}"),
                        format!("{b} overlaps listen.{a_name} ({a})"),
                    );
                }
            }
        }
        if let (Some(t), Some((_, addr))) = (&l.proxy_tls, tls_addr) {
            let (cert, key) = (PathBuf::from(&t.cert), PathBuf::from(&t.key));
            // A client reading only addresses need not be able to read them.
            if self.secrets == Secrets::Read {
                if let Err(e) = crate::tls::load_pair(&cert, &key) {
                    self.error(&format!("listen.proxy_tls.{}", e.field), e.message);
                }
            }
            listen.proxy_tls = Some(ProxyTls { addr, cert, key });
        }
        listen
    }

    fn duration(&mut self, path: &str, text: &str, max: Duration) -> Option<Duration> {
        match parse_duration(text) {
            Ok(d) if d.is_zero() => {
                self.error(path, "must be greater than zero");
                None
            }
            Ok(d) if d > max => {
                self.error(
                    path,
                    format!("'{text}' is too long: at most {}", duration_text(max)),
                );
                None
            }
            Ok(d) => Some(d),
            Err(()) => {
                self.error(
                    path,
                    format!(
                        "'{text}' is not a duration: a whole number and one unit, \
                         ms, s, m, h or d (like 500ms, 60s, 5m, 1h or 30d)"
                    ),
                );
                None
            }
        }
    }

    fn positive(&mut self, path: &str, value: i64) -> Option<NonZeroU64> {
        match u64::try_from(value).ok().and_then(NonZeroU64::new) {
            Some(v) => Some(v),
            None => {
                self.error(path, format!("must be greater than 0, got {value}"));
                None
            }
        }
    }

    fn non_negative(&mut self, path: &str, value: i64) -> Option<u64> {
        match u64::try_from(value) {
            Ok(v) => Some(v),
            Err(_) => {
                self.error(path, format!("must not be negative, got {value}"));
                None
            }
        }
    }

    fn url(&mut self, path: &str, text: &str) -> Option<http::Uri> {
        match text.parse::<http::Uri>() {
            Ok(uri)
                if matches!(uri.scheme_str(), Some("http" | "https"))
                    && uri.host().is_some_and(|h| !h.is_empty()) =>
            {
                Some(uri)
            }
            _ => {
                self.error(
                    path,
                    format!("'{text}' is not an http:// or https:// URL with a host"),
                );
                None
            }
        }
    }

    fn upstream(&mut self, path: &str, name: &str, u: &file::UpstreamFile) -> Option<Upstream> {
        let uri = self.url(&format!("{path}.url"), &u.url);
        let connect_timeout = match &u.connect_timeout {
            Some(t) => self.duration(&format!("{path}.connect_timeout"), t, MAX_TIMEOUT),
            None => Some(DEFAULT_CONNECT_TIMEOUT),
        };
        let read_timeout = match &u.read_timeout {
            Some(t) => self.duration(&format!("{path}.read_timeout"), t, MAX_TIMEOUT),
            None => Some(DEFAULT_READ_TIMEOUT),
        };
        let uri = uri?;
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            self.error(
                &format!("{path}.url"),
                "must be an origin (scheme, host and port) without a path or query",
            );
            return None;
        }
        let tls = uri.scheme_str() == Some("https");
        let host = uri
            .host()
            .unwrap_or_default()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let host_header = match &u.host {
            Some(h) if h.trim().is_empty() || h.contains(['\r', '\n']) => {
                self.error(&format!("{path}.host"), "must be a host name");
                return None;
            }
            other => other.clone(),
        };
        Some(Upstream {
            name: name.to_string(),
            tls,
            host,
            port,
            host_header,
            connect_timeout: connect_timeout?,
            read_timeout: read_timeout?,
        })
    }

    /// A refill interval written as `<base>.<field>: daily|monthly` with an
    /// optional `<base>.day`.
    fn interval(
        &mut self,
        base: &str,
        field: &str,
        word: &str,
        day: Option<i64>,
    ) -> Option<Interval> {
        let path = format!("{base}.{field}");
        let day = match day {
            None => None,
            Some(d) if (1..=31).contains(&d) => Some(d as u8),
            Some(d) => {
                self.error(
                    &format!("{base}.day"),
                    format!("must be a day of the month, 1-31, got {d}"),
                );
                return None;
            }
        };
        match word {
            "daily" if day.is_some() => {
                self.error(&format!("{base}.day"), "only a monthly refill takes a day");
                None
            }
            "daily" => Some(Interval::Daily),
            "monthly" => Some(Interval::Monthly {
                day: day.unwrap_or(1),
            }),
            other => {
                self.error(
                    &path,
                    format!("unknown refill interval '{other}': expected daily or monthly"),
                );
                None
            }
        }
    }

    fn tier(&mut self, id: &str, t: &file::TierFile) -> Option<Tier> {
        let path = format!("tiers.{id}");
        let ok_before = self.errors.len();
        if id.is_empty()
            || !id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_".contains(c))
        {
            self.error(
                &path,
                "a tier id may hold only letters, digits, '-' and '_'",
            );
        }
        let key_prefix = match &t.key_prefix {
            Some(p) => {
                if p.is_empty()
                    || p.len() > MAX_PREFIX_LEN
                    || !p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                    || p.starts_with('_')
                    || p.ends_with('_')
                {
                    self.error(
                        &format!("{path}.key_prefix"),
                        format!("'{p}' must be 1-{MAX_PREFIX_LEN} letters, digits or inner '_'"),
                    );
                }
                p.clone()
            }
            None => format!("sk_{}", id.replace('-', "_")),
        };
        let credits = match &t.credits {
            None => Credits::Unlimited,
            Some(CreditsFile::Word(w)) if w == "unlimited" => Credits::Unlimited,
            Some(CreditsFile::Word(w)) => {
                self.error(
                    &format!("{path}.credits"),
                    format!("'{w}' is not a number of credits or 'unlimited'"),
                );
                Credits::Unlimited
            }
            Some(CreditsFile::Amount(n)) => self
                .non_negative(&format!("{path}.credits"), *n)
                .map_or(Credits::Unlimited, Credits::Limited),
        };
        let refill = t.refill.as_ref().and_then(|r| {
            let rpath = format!("{path}.refill");
            let interval = self.interval(&rpath, "interval", &r.interval, r.day);
            let amount = self.positive(&format!("{rpath}.amount"), r.amount);
            if credits == Credits::Unlimited {
                self.error(
                    &rpath,
                    "a tier with unlimited credits has nothing to refill",
                );
            }
            Some(Refill {
                interval: interval?,
                amount: amount?.get(),
            })
        });
        let mut rate_limits = IndexMap::new();
        for (name, rl) in &t.rate_limits {
            let rpath = format!("{path}.rate_limits.{name}");
            let limit = self.positive(&format!("{rpath}.limit"), rl.limit);
            let window = self.duration(&format!("{rpath}.window"), &rl.window, MAX_WINDOW);
            if let (Some(limit), Some(window)) = (limit, window) {
                rate_limits.insert(
                    name.clone(),
                    RateLimit {
                        limit,
                        window,
                        shadow: rl.shadow,
                    },
                );
            }
        }
        let mut pools = IndexMap::new();
        for (name, p) in &t.pools {
            let ppath = format!("{path}.pools.{name}");
            let limit = self.positive(&format!("{ppath}.limit"), p.limit);
            let window = match (&p.window, &p.refill) {
                (Some(w), None) => {
                    if p.day.is_some() {
                        self.error(&format!("{ppath}.day"), "only a monthly refill takes a day");
                    }
                    self.duration(&format!("{ppath}.window"), w, MAX_WINDOW)
                        .map(PoolWindow::Rolling)
                }
                (None, Some(r)) => self
                    .interval(&ppath, "refill", r, p.day)
                    .map(PoolWindow::Calendar),
                _ => {
                    self.error(
                        &ppath,
                        "a pool needs exactly one of 'window' (rolling) or 'refill' (calendar)",
                    );
                    None
                }
            };
            if let (Some(limit), Some(window)) = (limit, window) {
                pools.insert(
                    name.clone(),
                    Pool {
                        limit,
                        window,
                        shadow: p.shadow,
                    },
                );
            }
        }
        let overage = match t.overage.as_deref() {
            None | Some("block") => Overage::Block,
            Some("allow") => Overage::Allow,
            Some(other) => {
                self.error(
                    &format!("{path}.overage"),
                    format!("unknown overage policy '{other}': expected block or allow"),
                );
                Overage::Block
            }
        };
        if let Some(url) = &t.upgrade_url {
            self.url(&format!("{path}.upgrade_url"), url);
        }
        if self.errors.len() > ok_before {
            return None;
        }
        let rate_limit_policy = Tier::policy_header(&rate_limits);
        // Letters, digits, '-' and '_' (checked above): always a valid value.
        let id_header = http::HeaderValue::from_str(id).ok()?;
        Some(Tier {
            id: id.to_string(),
            id_header,
            name: t.name.clone().unwrap_or_else(|| id.to_string()),
            key_prefix,
            credits,
            refill,
            rate_limits,
            rate_limit_policy,
            pools,
            features: t.features.clone(),
            overage,
            upgrade_url: t.upgrade_url.clone(),
        })
    }

    fn header_name(&mut self, path: &str, name: &str) -> Option<HeaderName> {
        match HeaderName::from_bytes(name.as_bytes()) {
            Ok(h) => Some(h),
            Err(_) => {
                self.error(path, format!("'{name}' is not a valid header name"));
                None
            }
        }
    }

    fn amount(&mut self, path: &str, a: &AmountFile) -> Option<Amount> {
        match a {
            AmountFile::Fixed(n) => self.non_negative(path, *n).map(Amount::Fixed),
            AmountFile::Header(h) => self
                .header_name(&format!("{path}.header"), &h.header)
                .map(Amount::Header),
        }
    }

    fn route(&mut self, path: &str, r: &file::RouteFile, file: &FileConfig) -> Option<Route> {
        let ok_before = self.errors.len();
        if r.name.trim().is_empty() {
            self.error(&format!("{path}.name"), "must not be empty");
        }
        let methods = r.methods.as_ref().map(|ms| {
            ms.iter()
                .enumerate()
                .filter_map(|(i, m)| {
                    match http::Method::from_bytes(m.to_ascii_uppercase().as_bytes()) {
                        Ok(m) => Some(m),
                        Err(_) => {
                            self.error(
                                &format!("{path}.methods[{i}]"),
                                format!("'{m}' is not an HTTP method"),
                            );
                            None
                        }
                    }
                })
                .collect::<Vec<_>>()
        });
        let pattern = self.path_pattern(&format!("{path}.path"), &r.path, r.allow_encoded_slashes);
        if !file.upstreams.contains_key(&r.upstream) {
            self.error(
                &format!("{path}.upstream"),
                format!("unknown upstream '{}'", r.upstream),
            );
        }
        let public = match r.auth.as_deref() {
            None | Some("key") => false,
            Some("none") => true,
            Some(other) => {
                self.error(
                    &format!("{path}.auth"),
                    format!("unknown auth '{other}': expected key or none"),
                );
                false
            }
        };
        if public {
            let charges = [
                ("feature", r.feature.is_some()),
                ("cost", r.cost.is_some()),
                ("pools", !r.pools.is_empty()),
                ("meter", !r.meter.is_empty()),
            ];
            for (field, set) in charges {
                if set {
                    self.error(
                        &format!("{path}.{field}"),
                        "a public route (auth: none) has no key to gate or charge",
                    );
                }
            }
        }
        if let Some(feature) = &r.feature {
            let granted = file.tiers.values().any(|t| t.features.contains(feature));
            if !granted {
                self.warn(
                    &format!("{path}.feature"),
                    format!("no tier grants feature '{feature}': every keyed request gets 403"),
                );
            }
        }
        let cost = match &r.cost {
            Some(a) => self.amount(&format!("{path}.cost"), a),
            None => Some(Amount::Fixed(1)),
        };
        let mut pools = Vec::new();
        for (pool, a) in &r.pools {
            self.warn_unknown_pool(&format!("{path}.pools.{pool}"), pool, file);
            if let Some(a) = self.amount(&format!("{path}.pools.{pool}"), a) {
                pools.push((Arc::from(pool.as_str()), a));
            }
        }
        let mut meter = Vec::new();
        for (pool, header) in &r.meter {
            self.warn_unknown_pool(&format!("{path}.meter.{pool}"), pool, file);
            if let Some(h) = self.header_name(&format!("{path}.meter.{pool}"), header) {
                meter.push((pool.clone(), h));
            }
        }
        if self.errors.len() > ok_before {
            return None;
        }
        Some(Route {
            name: r.name.clone(),
            methods,
            path: pattern?,
            upstream: r.upstream.clone(),
            // Every upstream is valid when every route is (else the config
            // is refused), so the file's index is the config's.
            upstream_index: file.upstreams.get_index_of(&r.upstream).unwrap_or(0),
            feature: r.feature.as_deref().map(Arc::from),
            cost: cost?,
            pools,
            meter,
            refund_on_5xx: r.refund_on_5xx,
            auth: !public,
            forward_key: r.forward_key,
            allow_encoded_slashes: r.allow_encoded_slashes,
        })
    }

    fn warn_unknown_pool(&mut self, path: &str, pool: &str, file: &FileConfig) {
        if !file.tiers.values().any(|t| t.pools.contains_key(pool)) {
            self.warn(
                path,
                format!("no tier defines pool '{pool}': its use is counted but never limited"),
            );
        }
    }

    fn path_pattern(&mut self, path: &str, text: &str, allow_encoded: bool) -> Option<PathPattern> {
        let (base, prefix) = match text.strip_suffix("/*") {
            Some(base) => (if base.is_empty() { "/" } else { base }, true),
            None => (text, false),
        };
        if base.contains('*') {
            self.error(path, "'*' is allowed only as a final '/*'");
            return None;
        }
        match normalise(base, allow_encoded) {
            Ok(canonical) if canonical == base => Some(if prefix {
                PathPattern::Prefix(canonical.into_owned())
            } else {
                PathPattern::Exact(canonical.into_owned())
            }),
            Ok(canonical) => {
                self.error(
                    path,
                    format!("'{text}' is not in canonical form; write it as '{canonical}'"),
                );
                None
            }
            Err(e) => {
                self.error(path, format!("'{text}': {e}"));
                None
            }
        }
    }

    fn redis(&mut self, r: &file::RedisFile) -> Option<RedisConfig> {
        let ok_before = self.errors.len();
        if let Err(e) = redis::IntoConnectionInfo::into_connection_info(r.url.as_str()) {
            self.error(
                "store.redis.url",
                format!(
                    "'{}' is not a Redis URL (redis://host:port/db or rediss://...): {e}",
                    crate::store::migrate::redacted(&r.url)
                ),
            );
        }
        let password = match &r.password_env {
            Some(name) => self.secret("store.redis.password_env", name),
            None => None,
        };
        let on_error = match r.on_error.as_deref() {
            None | Some("deny") => OnStoreError::Deny,
            Some("allow") => OnStoreError::Allow,
            Some(other) => {
                self.error(
                    "store.redis.on_error",
                    format!(
                        "'{other}' is not one of: deny (answer 503), allow (forward uncharged)"
                    ),
                );
                OnStoreError::Deny
            }
        };
        let claim_after = match r.claim_after.as_deref() {
            None => Some(Duration::from_secs(30)),
            Some(text) => self.duration("store.redis.claim_after", text, MAX_REPORTING_WAIT),
        };
        if claim_after.is_some_and(|d| d < Duration::from_secs(1) || d > Duration::from_secs(3600))
        {
            self.error("store.redis.claim_after", "must be between 1s and 1h");
        }
        (self.errors.len() == ok_before).then(|| RedisConfig {
            url: r.url.clone(),
            password,
            on_error,
            cluster: r.cluster,
            claim_after: claim_after.unwrap_or(Duration::from_secs(30)),
        })
    }

    /// The value of the env var `name`, which must be set and not empty.
    fn secret(&mut self, path: &str, name: &str) -> Option<Secret> {
        if self.secrets == Secrets::Skip {
            return Some(Secret::new(String::new()));
        }
        match std::env::var(name) {
            Ok(value) if !value.is_empty() => Some(Secret::new(value)),
            _ => {
                self.error(
                    path,
                    format!("the environment variable {name} is not set (it holds the secret)"),
                );
                None
            }
        }
    }

    fn reporting(&mut self, r: &file::ReportingFile) -> Option<Reporting> {
        let ok_before = self.errors.len();
        for (i, t) in r.thresholds.iter().enumerate() {
            if !(*t > 0.0 && *t <= 1.0) {
                self.error(
                    &format!("reporting.thresholds[{i}]"),
                    format!("a threshold is a fraction of credits used, in (0, 1]; got {t}"),
                );
            }
        }
        let flush_interval = match &r.flush_interval {
            Some(t) => self.duration("reporting.flush_interval", t, MAX_REPORTING_WAIT),
            None => Some(DEFAULT_FLUSH_INTERVAL),
        };
        let webhook = r.webhook.as_ref().and_then(|w| {
            self.url("reporting.webhook.url", &w.url);
            let secret = match &w.secret_env {
                Some(name) => self.secret("reporting.webhook.secret_env", name),
                None => {
                    self.error(
                        "reporting.webhook",
                        "secret_env is required: the name of the env var holding the signing secret",
                    );
                    None
                }
            };
            Some(Webhook {
                url: w.url.clone(),
                secret: secret?,
            })
        });
        let stripe = r.stripe.as_ref().and_then(|s| {
            let base_url = s
                .base_url
                .clone()
                .unwrap_or_else(|| "https://api.stripe.com".into());
            self.url("reporting.stripe.base_url", &base_url);
            let api_key = self.secret("reporting.stripe.api_key_env", &s.api_key_env);
            Some(Stripe {
                api_key: api_key?,
                base_url: base_url.trim_end_matches('/').to_string(),
                event_name: s.event_name.clone().unwrap_or_else(|| "api_overage".into()),
                meters: s.meters.clone(),
            })
        });
        if self.errors.len() > ok_before {
            return None;
        }
        let mut thresholds = r.thresholds.clone();
        thresholds.sort_by(f64::total_cmp);
        thresholds.dedup();
        Some(Reporting {
            webhook,
            stripe,
            thresholds,
            flush_interval: flush_interval?,
            usage_events: r.usage_events,
        })
    }

    fn usage_path(&mut self, text: &str) -> String {
        match normalise(text, false) {
            Ok(canonical) if canonical == text => canonical.into_owned(),
            _ => {
                self.error(
                    "usage.path",
                    format!("'{text}' must be an absolute path in canonical form"),
                );
                text.to_string()
            }
        }
    }
}

/// Two listen addresses overlap when they share a (fixed) port and one
/// address covers the other.
fn overlaps(a: SocketAddr, b: SocketAddr) -> bool {
    let covers = |x: IpAddr, y: IpAddr| x == y || x.is_unspecified() || y.is_unspecified();
    a.port() != 0 && a.port() == b.port() && covers(a.ip(), b.ip())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "upstreams:\n  main: { url: \"http://127.0.0.1:3000\" }\ntiers:\n  free: { credits: 10 }\nroutes:\n  - { name: a, path: /a, upstream: main }\n";

    fn errors(text: &str) -> Vec<ConfigError> {
        match Config::parse(text) {
            Ok(_) => Vec::new(),
            Err(ConfigErrors(e)) => e,
        }
    }

    #[test]
    fn minimal_config_is_valid() {
        let loaded = Config::parse(MINIMAL).expect("valid");
        assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
        let route = &loaded.config.routes[0];
        assert_eq!(route.cost, Amount::Fixed(1));
        assert_eq!(loaded.config.tiers["free"].key_prefix, "sk_free");
    }

    #[test]
    fn unknown_key_names_path_and_line() {
        let e =
            errors(&MINIMAL.replace("free: { credits: 10 }", "free: { credits: 10, creditz: 5 }"));
        assert_eq!(e.len(), 1);
        assert!(e[0].message.contains("unknown field `creditz`"), "{e:?}");
        assert_eq!(e[0].path, "tiers.free.creditz");
        assert_eq!(e[0].line, Some(4));
    }

    #[test]
    fn every_semantic_error_is_reported() {
        let text = "\
listen: { proxy: \"0.0.0.0:8080\", admin: \"127.0.0.1:8080\" }
upstreams:
  main: { url: \"not a url\" }
tiers:
  free:
    credits: -1
    refill: { interval: monthly, amount: 10, day: 32 }
    rate_limits: { requests: { limit: 0, window: 0s } }
routes:
  - { name: a, path: /a, upstream: nowhere }
  - { name: a, path: /b, upstream: main }
";
        let e = errors(text);
        let paths: Vec<_> = e.iter().map(|e| (e.path.as_str(), e.line)).collect();
        for expected in [
            ("listen.admin", Some(1)),
            ("upstreams.main.url", Some(3)),
            ("tiers.free.credits", Some(6)),
            ("tiers.free.refill.day", Some(7)),
            ("tiers.free.rate_limits.requests.limit", Some(8)),
            ("tiers.free.rate_limits.requests.window", Some(8)),
            ("routes[0].upstream", Some(10)),
            ("routes[1].name", Some(11)),
        ] {
            assert!(paths.contains(&expected), "missing {expected:?} in {e:#?}");
        }
    }

    #[test]
    fn warnings_do_not_fail() {
        let text = MINIMAL.replace(
            "upstream: main }",
            "upstream: main, feature: nope, pools: { ghosts: 1 } }",
        );
        let loaded = Config::parse(&text).expect("valid with warnings");
        let paths: Vec<_> = loaded.warnings.iter().map(|w| w.path.as_str()).collect();
        assert_eq!(paths, ["routes[0].feature", "routes[0].pools.ghosts"]);
    }

    #[test]
    fn type_errors_name_the_path() {
        let e = errors(&MINIMAL.replace("credits: 10", "credits: [1]"));
        assert_eq!(e[0].path, "tiers.free.credits");
        let e = errors(&MINIMAL.replace("path: /a", "path: /a/../b"));
        assert!(e[0].message.contains("canonical"), "{e:?}");
    }

    #[test]
    fn either_or_values_explain_what_they_accept() {
        let e = errors(&MINIMAL.replace("credits: 10", "credits: 1.5"));
        assert_eq!(e[0].path, "tiers.free.credits");
        assert!(
            e[0].message
                .contains("a whole number of credits, or unlimited"),
            "{e:?}"
        );
        let e = errors(&MINIMAL.replace(
            "upstream: main }",
            "upstream: main, cost: { header: x, extra: 1 } }",
        ));
        assert_eq!(e[0].path, "routes[0].cost");
        assert!(
            e[0].message.contains("{ header: <request header name> }"),
            "{e:?}"
        );
    }

    #[test]
    fn every_structural_error_is_reported_in_one_run() {
        let text = MINIMAL
            .replace("free: { credits: 10 }", "free: { credts: 10 }")
            .replace("upstream: main }", "upstream: main, costt: 2 }");
        let e = errors(&text);
        let found: Vec<_> = e.iter().map(|e| (e.path.as_str(), e.line)).collect();
        assert_eq!(
            found,
            [("tiers.free.credts", Some(4)), ("routes[0].costt", Some(6))]
        );
        // Structural and semantic errors together, in line order.
        let text = MINIMAL
            .replace("free: { credits: 10 }", "free: { credits: 10, refill: 5 }")
            .replace("upstream: main }", "upstream: nowhere }");
        let e = errors(&text);
        let found: Vec<_> = e.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(found, ["tiers.free.refill", "routes[0].upstream"]);
    }

    #[test]
    fn messages_speak_yaml_not_rust() {
        let e = errors(&MINIMAL.replace("free: { credits: 10 }", "[free]"));
        assert_eq!(e[0].path, "tiers");
        assert_eq!(
            e[0].message,
            "found a list, expected a mapping (`key: value` lines)"
        );
        let e = errors(&MINIMAL.replace("upstream: main }", "upstream: main, cost: [1] }"));
        assert!(!e[0].message.contains("File"), "{e:?}");
        let e = errors(&MINIMAL.replace("  free: { credits: 10 }", "  free:\n\tcredits: 10"));
        assert_eq!(
            e[0].message,
            "a tab character: YAML indents with spaces only"
        );
        assert_eq!(e[0].line, Some(5));
        let e = errors(&MINIMAL.replace(
            "  free: { credits: 10 }",
            "  free: { credits: 10 }\n  ? [a]",
        ));
        assert_eq!(e[0].path, "tiers");
        assert!(
            e[0].message.starts_with("a key here is not a plain name"),
            "{e:?}"
        );
        for e in errors("- just\n- a list\n") {
            assert!(e.message.starts_with("the file must be a mapping"), "{e:?}");
        }
    }

    #[test]
    fn durations_have_one_grammar_and_bounds() {
        for (text, ms) in [
            ("500ms", 500),
            ("60s", 60_000),
            ("5m", 300_000),
            ("1h", 3_600_000),
            ("30d", 2_592_000_000),
            (" 7s ", 7_000),
        ] {
            assert_eq!(
                parse_duration(text),
                Ok(Duration::from_millis(ms)),
                "{text}"
            );
        }
        for bad in [
            "1 minute",
            "60 sec",
            "1y",
            "1h30m",
            "1.5s",
            "-1s",
            "s",
            "10",
            "99999999999999999999d",
            "1S",
        ] {
            assert_eq!(parse_duration(bad), Err(()), "{bad}");
        }
        let window = |w: &str| {
            errors(&MINIMAL.replace(
                "free: { credits: 10 }",
                &format!("free: {{ credits: 10, rate_limits: {{ r: {{ limit: 1, window: \"{w}\" }} }} }}"),
            ))
        };
        assert!(window("365d").is_empty());
        let e = window("366d");
        assert_eq!(e[0].message, "'366d' is too long: at most 365d");
        let e = window("99999999999d");
        assert!(e[0].message.contains("too long"), "{e:?}");
        let e = window("1 minute");
        assert!(
            e[0].message.contains("a whole number and one unit"),
            "{e:?}"
        );
    }

    #[test]
    fn proxy_tls_needs_readable_files_and_its_own_address() {
        let text = format!(
            "listen: {{ proxy: \"127.0.0.1:8080\", proxy_tls: {{ addr: \"127.0.0.1:8080\", cert: /nonexistent/tls.crt, key: /nonexistent/tls.key }} }}\n{MINIMAL}"
        );
        let e = errors(&text);
        let paths: Vec<_> = e.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            ["listen.proxy_tls.addr", "listen.proxy_tls.cert"],
            "{e:?}"
        );
        assert!(
            e[1].message.contains("cannot read /nonexistent/tls.crt"),
            "{e:?}"
        );
        // A client reading addresses only does not need the files.
        let text = text.replace("127.0.0.1:8080\", cert", "127.0.0.1:8443\", cert");
        assert!(parse(&text, Secrets::Skip).is_ok());
    }

    #[test]
    fn route_names_none_and_usage_are_reserved() {
        for name in ["none", "usage"] {
            let e = errors(&MINIMAL.replace("name: a,", &format!("name: {name},")));
            assert_eq!(e.len(), 1, "{e:?}");
            assert_eq!(e[0].path, "routes[0].name");
            assert!(e[0].message.contains("reserved"), "{e:?}");
        }
    }

    #[test]
    fn listen_overlap_rules() {
        let a: SocketAddr = "0.0.0.0:80".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:80".parse().unwrap();
        let c: SocketAddr = "127.0.0.1:0".parse().unwrap();
        assert!(overlaps(a, b));
        assert!(!overlaps(c, c));
        assert!(!overlaps(b, "127.0.0.2:80".parse().unwrap()));
    }
}
