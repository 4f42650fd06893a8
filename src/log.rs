//! Logging: the `tracing` subscriber, and the buffered writer behind it.
//!
//! Every proxied request writes one access line. Writing each line to
//! stderr costs a `write(2)` per request (about a quarter of a keyed
//! request's CPU, measured), so lines go into an in-memory buffer instead,
//! which a background thread writes out every [`FLUSH_EVERY`]. Nothing is
//! dropped: a writer that finds the buffer over [`FLUSH_AT`] writes it out
//! itself (back-pressure, not loss), a warning or an error is written out at
//! once with everything before it, and the buffer is written out when the
//! [`Flush`] guard is dropped at exit.
//!
//! Colours only when stderr is a terminal: a file or a pipe gets plain text.
//!
//! The access line itself ([`access`]) is formatted here, in the same text
//! or JSON layout `tracing-subscriber` gives every other line, and written
//! straight into the buffer: going through the subscriber's field visitors
//! cost about three microseconds a request (measured), most of a public
//! route's overhead. `RUST_LOG` still decides whether it is written (the
//! target is `tollgate::access`).

use std::fmt::Write as _;
use std::io::{IsTerminal, Write};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use parking_lot::Mutex;
use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;

/// How often buffered lines reach stderr.
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// A buffer this full is written out by the thread that filled it.
pub const FLUSH_AT: usize = 256 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
}

/// Lines not yet written, and the output they go to. Whoever writes out
/// holds `out` while taking `lines`, so chunks reach the output in order.
struct Shared<W> {
    lines: Mutex<Vec<u8>>,
    out: Mutex<Out<W>>,
}

/// The output, and the buffer last written out, kept empty with its
/// memory to take the lines' place next time: the lines' buffer is never
/// grown again from nothing (copied at each doubling, on fresh pages).
struct Out<W> {
    to: W,
    spare: Vec<u8>,
}

impl<W: Write> Shared<W> {
    fn write_out(&self) {
        let mut out = self.out.lock();
        let Out { to, spare } = &mut *out;
        std::mem::swap(spare, &mut *self.lines.lock());
        if !spare.is_empty() {
            // Stderr gone (a closed pipe): there is nowhere left to say so.
            let _ = to.write_all(spare);
            let _ = to.flush();
            spare.clear();
        }
    }
}

/// A [`MakeWriter`] that buffers lines in memory; see the module's docs.
pub struct Buffered<W> {
    shared: Arc<Shared<W>>,
}

impl<W> Clone for Buffered<W> {
    fn clone(&self) -> Self {
        Buffered {
            shared: self.shared.clone(),
        }
    }
}

impl<W: Write + Send + 'static> Buffered<W> {
    /// A buffer in front of `out`. Nothing writes it out on a schedule
    /// until [`Buffered::tick`] starts that.
    pub fn new(out: W) -> Buffered<W> {
        Buffered {
            shared: Arc::new(Shared {
                lines: Mutex::new(Vec::with_capacity(64 * 1024)),
                out: Mutex::new(Out {
                    to: out,
                    spare: Vec::with_capacity(64 * 1024),
                }),
            }),
        }
    }

    /// Starts a thread that writes the buffer out every `every`.
    pub fn tick(&self, every: Duration) -> std::io::Result<()> {
        let weak = Arc::downgrade(&self.shared);
        std::thread::Builder::new()
            .name("log writer".into())
            .spawn(move || loop {
                std::thread::sleep(every);
                match weak.upgrade() {
                    Some(shared) => shared.write_out(),
                    None => return,
                }
            })
            .map(drop)
    }

    /// Writes out every buffered line now.
    pub fn flush(&self) {
        self.shared.write_out();
    }

    /// A guard that writes the buffer out when dropped.
    pub fn guard(&self) -> Flush {
        let shared = self.shared.clone();
        Flush(Some(Box::new(move || shared.write_out())))
    }
}

/// Writes the buffered lines out when dropped (at exit).
pub struct Flush(Option<Box<dyn FnOnce() + Send>>);

impl Drop for Flush {
    fn drop(&mut self) {
        if let Some(flush) = self.0.take() {
            flush();
        }
    }
}

/// One event's writer: the line goes into the buffer; a warning or error
/// goes out at once, behind what was buffered before it.
pub struct Line<'a, W: Write> {
    shared: &'a Shared<W>,
    urgent: bool,
}

impl<W: Write> Write for Line<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let full = {
            let mut lines = self.shared.lines.lock();
            lines.extend_from_slice(buf);
            lines.len() >= FLUSH_AT
        };
        if full || self.urgent {
            self.shared.write_out();
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a, W: Write + 'a> MakeWriter<'a> for Buffered<W> {
    type Writer = Line<'a, W>;

    fn make_writer(&'a self) -> Self::Writer {
        Line {
            shared: &self.shared,
            urgent: false,
        }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Self::Writer {
        Line {
            shared: &self.shared,
            urgent: *meta.level() <= Level::WARN,
        }
    }
}

/// Where access lines go once [`init`] has run, and in which layout.
struct Sink {
    writer: Buffered<std::io::Stderr>,
    format: Format,
    ansi: bool,
    /// Whether `RUST_LOG` lets `tollgate::access` through, asked once when
    /// the subscriber was installed: its filter does not change after, and
    /// asking per request (`tracing::enabled!` goes to the subscriber
    /// every time) was about 200 instructions of each.
    enabled: bool,
}

static ACCESS: OnceLock<Sink> = OnceLock::new();

/// One request, as its access line says it.
#[derive(Clone, Copy)]
pub struct Access<'a> {
    pub route: &'a str,
    pub tier: &'a str,
    pub code: &'a str,
    pub status: u16,
    /// The whole request, in microseconds (written in milliseconds).
    pub latency_us: u64,
    /// From forwarding to the upstream's answer, in microseconds.
    pub upstream_us: Option<u64>,
    pub error: Option<&'a str>,
}

/// Writes one access line, if `RUST_LOG` lets `tollgate::access` through.
pub fn access(line: &Access<'_>) {
    let Some(sink) = ACCESS.get() else {
        // Logging not set up by [`init`] (a library user's subscriber):
        // the ordinary event.
        tracing::info!(
            target: "tollgate::access",
            route = line.route,
            tier = line.tier,
            code = line.code,
            status = line.status,
            latency_ms = ms(line.latency_us),
            upstream_ms = line.upstream_us.map(ms),
            error = line.error,
            "request"
        );
        return;
    };
    if !sink.enabled {
        return;
    }
    thread_local! {
        static LINE: std::cell::RefCell<String> = std::cell::RefCell::new(String::with_capacity(256));
    }
    LINE.with(|buf| {
        let Ok(mut buf) = buf.try_borrow_mut() else {
            return;
        };
        buf.clear();
        match sink.format {
            Format::Text => text_line(&mut buf, line, sink.ansi),
            Format::Json => json_line(&mut buf, line),
        }
        sink.writer.make_writer().write_all(buf.as_bytes()).ok();
    });
}

/// The time as `tracing-subscriber` writes it: RFC 3339, microseconds, UTC.
/// The part up to the second is formatted once a second per thread.
fn timestamp(out: &mut String) {
    thread_local! {
        static SECOND: std::cell::RefCell<(i64, String)> = const { std::cell::RefCell::new((i64::MIN, String::new())) };
    }
    let now = jiff::Timestamp::now();
    let (secs, nanos) = (now.as_second(), now.subsec_nanosecond());
    // A negative sub-second part belongs to the second before.
    let (secs, micros) = if nanos < 0 {
        (secs - 1, (1_000_000_000 + nanos) / 1000)
    } else {
        (secs, nanos / 1000)
    };
    SECOND.with(|cell| {
        let Ok(mut cached) = cell.try_borrow_mut() else {
            return;
        };
        if cached.0 != secs {
            let dt = jiff::tz::TimeZone::UTC.to_datetime(now);
            cached.1.clear();
            let _ = write!(
                cached.1,
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
                dt.year(),
                dt.month(),
                dt.day(),
                dt.hour(),
                dt.minute(),
                dt.second()
            );
            cached.0 = secs;
        }
        out.push_str(&cached.1);
    });
    fraction(out, micros);
}

/// `.{micros:06}Z`, without `core::fmt`.
fn fraction(out: &mut String, micros: i32) {
    let mut buf = itoa::Buffer::new();
    let digits = buf.format(micros);
    out.push('.');
    out.extend(std::iter::repeat_n(
        '0',
        6usize.saturating_sub(digits.len()),
    ));
    out.push_str(digits);
    out.push('Z');
}

/// A number of microseconds in milliseconds, as the access line gives it.
pub fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// `ms(us)` as `{:?}` writes it, from the integer: the whole
/// milliseconds, a point, and the thousandths without their trailing
/// zeros (Debug writes `x.0`). Below 10^15 microseconds that is exactly
/// Debug's text: `ms(us)` is the double nearest `us / 1000` (`us` is
/// exact as a double, the division correctly rounded), and Debug writes
/// the shortest decimal that reads back as it; `us / 1000` in decimal, at
/// most 15 significant digits, does, and no other decimal of at most 15
/// significant digits does (doubles there are closer together than such
/// decimals), so neither does a shorter one. No float is formatted.
fn debug_ms(out: &mut String, us: u64) {
    if us >= 1_000_000_000_000_000 {
        let _ = write!(out, "{:?}", ms(us));
        return;
    }
    out.push_str(itoa::Buffer::new().format(us / 1000));
    let f = us % 1000;
    let digit = |d: u64| char::from(b'0' + (d % 10) as u8);
    out.push('.');
    out.push(digit(f / 100));
    if !f.is_multiple_of(100) {
        out.push(digit(f / 10));
        if !f.is_multiple_of(10) {
            out.push(digit(f));
        }
    }
}

/// `value` as `{:?}` writes it, without Debug's per-character escaping
/// when nothing needs escaping (names from the config nearly always).
fn quoted(out: &mut String, value: &str) {
    if value
        .bytes()
        .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
    {
        out.push('"');
        out.push_str(value);
        out.push('"');
    } else {
        let _ = write!(out, "{value:?}");
    }
}

/// `tracing-subscriber`'s full text layout for the access event.
fn text_line(out: &mut String, line: &Access<'_>, ansi: bool) {
    if ansi {
        out.push_str("\x1b[2m");
        timestamp(out);
        out.push_str("\x1b[0m");
    } else {
        timestamp(out);
    }
    labels(out, line, ansi);
    latency(out, ansi, "latency_ms", line.latency_us);
    if let Some(us) = line.upstream_us {
        latency(out, ansi, "upstream_ms", us);
    }
    if let Some(error) = line.error {
        field(out, ansi, "error");
        quoted(out, error);
    }
    out.push('\n');
}

/// A field's name and `=`, as the text layout writes them.
fn field(out: &mut String, ansi: bool, name: &str) {
    if ansi {
        out.push_str(" \x1b[3m");
        out.push_str(name);
        out.push_str("\x1b[0m\x1b[2m=\x1b[0m");
    } else {
        out.push(' ');
        out.push_str(name);
        out.push('=');
    }
}

fn latency(out: &mut String, ansi: bool, name: &str, us: u64) {
    field(out, ansi, name);
    debug_ms(out, us);
}

/// A text line from its level to its `status`, which depends only on the
/// route, tier and code: formatted once and reused while they repeat (a
/// dozen pieces pushed and three names scanned, a fifth of the line's
/// work, become three comparisons and one copy).
fn labels(out: &mut String, line: &Access<'_>, ansi: bool) {
    #[derive(Default)]
    struct Last {
        route: String,
        tier: String,
        code: String,
        ansi: bool,
        text: String,
    }
    fn format(out: &mut String, line: &Access<'_>, ansi: bool) {
        out.push_str(if ansi {
            " \x1b[32m INFO\x1b[0m \x1b[2mtollgate::access\x1b[0m\x1b[2m:\x1b[0m request"
        } else {
            "  INFO tollgate::access: request"
        });
        for (name, value) in [
            ("route", line.route),
            ("tier", line.tier),
            ("code", line.code),
        ] {
            field(out, ansi, name);
            quoted(out, value);
        }
        field(out, ansi, "status");
    }
    thread_local! {
        static LAST: std::cell::RefCell<Last> = std::cell::RefCell::default();
    }
    LAST.with(|cell| {
        let Ok(mut last) = cell.try_borrow_mut() else {
            format(out, line, ansi);
            return;
        };
        let same = last.ansi == ansi
            && last.route == line.route
            && last.tier == line.tier
            && last.code == line.code;
        if !same {
            let last = &mut *last;
            last.route.clear();
            last.route.push_str(line.route);
            last.tier.clear();
            last.tier.push_str(line.tier);
            last.code.clear();
            last.code.push_str(line.code);
            last.ansi = ansi;
            last.text.clear();
            format(&mut last.text, line, ansi);
        }
        out.push_str(&last.text);
    });
    out.push_str(itoa::Buffer::new().format(line.status));
}

/// `tracing-subscriber`'s JSON layout for the access event.
fn json_line(out: &mut String, line: &Access<'_>) {
    let string = |out: &mut String, s: &str| {
        // A `String` sink cannot fail; serde_json escapes what must be.
        if let Ok(quoted) = serde_json::to_string(s) {
            out.push_str(&quoted);
        }
    };
    let number = |out: &mut String, n: f64| match serde_json::Number::from_f64(n) {
        Some(n) => {
            let _ = write!(out, "{n}");
        }
        None => out.push_str("null"),
    };
    out.push_str("{\"timestamp\":\"");
    timestamp(out);
    out.push_str("\",\"level\":\"INFO\",\"fields\":{\"message\":\"request\",\"route\":");
    string(out, line.route);
    out.push_str(",\"tier\":");
    string(out, line.tier);
    out.push_str(",\"code\":");
    string(out, line.code);
    let _ = write!(out, ",\"status\":{},\"latency_ms\":", line.status);
    number(out, ms(line.latency_us));
    if let Some(us) = line.upstream_us {
        out.push_str(",\"upstream_ms\":");
        number(out, ms(us));
    }
    if let Some(error) = line.error {
        out.push_str(",\"error\":");
        string(out, error);
    }
    out.push_str("},\"target\":\"tollgate::access\"}\n");
}

/// Sets up logging to stderr, filtered by `RUST_LOG` (else `default`).
/// Keep the returned guard alive until exit: dropping it writes out what
/// is still buffered.
pub fn init(format: Format, default: &str) -> Flush {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let writer = Buffered::new(std::io::stderr());
    if let Err(e) = writer.tick(FLUSH_EVERY) {
        eprintln!("warning: no log writer thread ({e}); lines are written when the buffer fills or at exit");
    }
    let flush = writer.guard();
    let ansi = std::io::stderr().is_terminal();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(writer.clone());
    let installed = match format {
        Format::Text => builder.try_init(),
        Format::Json => builder.json().try_init(),
    };
    if let Err(e) = installed {
        eprintln!("warning: logging was already set up: {e}");
    }
    let _ = ACCESS.set(Sink {
        writer,
        format,
        ansi,
        enabled: tracing::enabled!(target: "tollgate::access", Level::INFO),
    });
    flush
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An output that records what reached it, and in how many writes.
    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<(Vec<u8>, usize)>>);

    impl Write for Recorder {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let mut r = self.0.lock();
            r.0.extend_from_slice(buf);
            r.1 += 1;
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn write_line(writer: &Buffered<Recorder>, level: Level, line: &str) {
        let meta_writer = match level {
            Level::WARN | Level::ERROR => Line {
                shared: &writer.shared,
                urgent: true,
            },
            _ => writer.make_writer(),
        };
        let mut w = meta_writer;
        w.write_all(line.as_bytes()).expect("write");
    }

    #[test]
    fn lines_wait_in_memory_and_go_out_in_order_in_one_write() {
        let out = Recorder::default();
        let writer = Buffered::new(out.clone());
        for n in 0..100 {
            write_line(&writer, Level::INFO, &format!("line {n}\n"));
        }
        writer.flush();
        let (bytes, writes) = out.0.lock().clone();
        let expected: String = (0..100).map(|n| format!("line {n}\n")).collect();
        assert_eq!(String::from_utf8(bytes).expect("utf8"), expected);
        assert_eq!(writes, 1, "a hundred lines, one write");
    }

    #[test]
    fn a_warning_goes_out_at_once_behind_what_came_before() {
        let out = Recorder::default();
        let writer = Buffered::new(out.clone());
        write_line(&writer, Level::INFO, "access\n");
        write_line(&writer, Level::WARN, "warning\n");
        assert_eq!(out.0.lock().0, b"access\nwarning\n");
    }

    #[test]
    fn a_full_buffer_is_written_by_the_writer_and_nothing_is_lost() {
        let out = Recorder::default();
        let writer = Buffered::new(out.clone());
        let flush = writer.guard();
        let line = "x".repeat(999) + "\n";
        let lines = 2 * FLUSH_AT / line.len() + 7;
        for _ in 0..lines {
            write_line(&writer, Level::INFO, &line);
        }
        assert!(
            out.0.lock().0.len() >= FLUSH_AT,
            "the writer wrote out the full buffer itself"
        );
        drop(flush);
        assert_eq!(out.0.lock().0.len(), lines * line.len(), "every line, once");
    }

    /// What `tracing-subscriber` itself writes for the access event, in
    /// one layout.
    fn from_subscriber(json: bool, ansi: bool, line: &Access<'_>) -> String {
        let out = Recorder::default();
        let make = {
            let out = out.clone();
            move || out.clone()
        };
        let builder = tracing_subscriber::fmt().with_ansi(ansi).with_writer(make);
        let event = || {
            tracing::info!(
                target: "tollgate::access",
                route = line.route,
                tier = line.tier,
                code = line.code,
                status = line.status,
                latency_ms = ms(line.latency_us),
                upstream_ms = line.upstream_us.map(ms),
                error = line.error,
                "request"
            )
        };
        if json {
            tracing::subscriber::with_default(builder.json().finish(), event);
        } else {
            tracing::subscriber::with_default(builder.finish(), event);
        }
        let bytes = out.0.lock().0.clone();
        String::from_utf8(bytes).expect("utf8")
    }

    /// The line after its timestamp.
    fn after_time(line: &str) -> &str {
        let at = line.find('Z').expect("a timestamp");
        &line[at + 1..]
    }

    #[test]
    fn the_fraction_of_a_second_has_six_digits() {
        for (micros, written) in [
            (0, ".000000Z"),
            (7, ".000007Z"),
            (4_250, ".004250Z"),
            (999_999, ".999999Z"),
        ] {
            let mut out = String::new();
            fraction(&mut out, micros);
            assert_eq!(out, written);
            assert_eq!(out, format!(".{micros:06}Z"));
        }
    }

    #[test]
    fn access_lines_match_what_tracing_subscriber_writes() {
        let lines = [
            Access {
                route: "data",
                tier: "free",
                code: "OK",
                status: 200,
                latency_us: 1250,
                upstream_us: Some(500),
                error: None,
            },
            Access {
                route: "a \"quoted\" name",
                tier: "none",
                code: "UPSTREAM_UNAVAILABLE",
                status: 502,
                latency_us: 3000,
                upstream_us: None,
                error: Some("ConnectRefused"),
            },
        ];
        // Latencies from none to the most a u64 holds: every count of
        // thousandths, zeros trailing or not, and past 10^15 microseconds,
        // where Debug's own text is used.
        let latencies = [
            0,
            1,
            5,
            10,
            50,
            100,
            500,
            520,
            523,
            999,
            1000,
            1001,
            12_000,
            12_050,
            999_999,
            1_000_000,
            86_400_000_001,
            123_456_789_012_345,
            999_999_999_999_999,
            1_000_000_000_000_000,
            // 2^53 + 1: no longer exact as a double.
            9_007_199_254_740_993,
            1_234_567_890_123_456_789,
            u64::MAX,
        ];
        let lines: Vec<Access<'_>> = lines
            .into_iter()
            .chain(latencies.iter().map(|&us| Access {
                route: "r",
                tier: "t",
                code: "OK",
                status: 200,
                latency_us: us,
                upstream_us: Some(us / 7),
                error: None,
            }))
            .collect();
        // The same route, tier and code with another code in between, so
        // the labels formatted once are reused, and not reused wrongly.
        let lines: Vec<Access<'_>> = lines
            .into_iter()
            .flat_map(|line| {
                let other = Access {
                    code: "RATE_LIMITED",
                    status: 429,
                    ..line
                };
                [line, other, line]
            })
            .collect();
        for line in &lines {
            for ansi in [false, true] {
                let theirs = from_subscriber(false, ansi, line);
                for _ in 0..2 {
                    let mut ours = String::new();
                    text_line(&mut ours, line, ansi);
                    assert_eq!(after_time(&ours), after_time(&theirs), "ansi {ansi}");
                }
            }
            let theirs: serde_json::Value =
                serde_json::from_str(&from_subscriber(true, false, line)).expect("json");
            let mut ours = String::new();
            json_line(&mut ours, line);
            assert!(ours.ends_with('\n'));
            let mut ours: serde_json::Value = serde_json::from_str(&ours).expect("our json");
            assert!(ours["timestamp"]
                .as_str()
                .and_then(|t| t.parse::<jiff::Timestamp>().ok())
                .is_some());
            ours["timestamp"] = theirs["timestamp"].clone();
            assert_eq!(ours, theirs);
        }
    }
}
