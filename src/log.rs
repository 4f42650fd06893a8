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
//! or JSON layout `tracing-subscriber` gives every other line: going
//! through the subscriber's field visitors cost about three microseconds a
//! request (measured), most of a public route's overhead. And it is
//! formatted when it is written out, not when the request ends: a request
//! leaves its line's fields (names as `&'static str`, numbers, its end's
//! clock reading) in the buffer, and up to [`ACCESS_BATCH`] of them are
//! formatted together, the formatting's code and state in the CPU's caches
//! for all but the first, where one line at a time ran from cold caches
//! each request. A line written by any other event first formats the
//! access lines before it, so the output keeps the order things happened
//! in. `RUST_LOG` still decides whether access lines are written (the
//! target is `tollgate::access`).

use std::io::{IsTerminal, Write};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;

use crate::clock::Tick;

/// How often buffered lines reach stderr.
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// A buffer this full is written out by the thread that filled it. Small
/// enough that the buffer and its spare stay in the CPU's cache: at tens
/// of thousands of lines a second a larger one is written out by the
/// request threads all the same (it fills within `FLUSH_EVERY`), and
/// each line then went into memory not touched since the last time round.
pub const FLUSH_AT: usize = 32 * 1024;
/// This many access lines waiting are formatted and written out by the
/// request that adds the last: about [`FLUSH_AT`] of text (a line is
/// ~140 bytes), the fields kept meanwhile ~25 KiB.
pub const ACCESS_BATCH: usize = 224;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
}

/// Lines not yet written, and the output they go to. Whoever writes out
/// holds `out` while taking `lines`, so chunks reach the output in order.
struct Shared<W> {
    lines: Mutex<Lines>,
    out: Mutex<Out<W>>,
}

/// What waits to be written out: text, then access lines not yet
/// formatted (every one of them later than all of the text).
struct Lines {
    text: Vec<u8>,
    access: Vec<Access>,
    /// How access lines are formatted, and the state that carries from
    /// one to the next.
    style: Style,
}

impl Lines {
    /// Formats the access lines waiting onto the text: what is added
    /// after this comes after them.
    fn format_access(&mut self) {
        let Lines {
            text,
            access,
            style,
        } = self;
        for line in access.drain(..) {
            style.line(text, &line);
        }
    }
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
        {
            let mut lines = self.lines.lock();
            lines.format_access();
            std::mem::swap(spare, &mut lines.text);
        }
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
    /// A buffer in front of `out`, its access lines in `format` (with
    /// colours if `ansi`). Nothing writes it out on a schedule until
    /// [`Buffered::tick`] starts that.
    pub fn new(out: W, format: Format, ansi: bool) -> Buffered<W> {
        Buffered {
            shared: Arc::new(Shared {
                lines: Mutex::new(Lines {
                    text: Vec::with_capacity(64 * 1024),
                    access: Vec::with_capacity(ACCESS_BATCH),
                    style: Style {
                        format,
                        ansi,
                        time: Time::default(),
                        labels: Labels::default(),
                    },
                }),
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

    /// Keeps an access line, to be formatted when it is written out.
    pub fn access(&self, line: Access) {
        let full = {
            let mut lines = self.shared.lines.lock();
            lines.access.push(line);
            lines.access.len() >= ACCESS_BATCH
        };
        if full {
            self.shared.write_out();
        }
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
            lines.format_access();
            lines.text.extend_from_slice(buf);
            lines.text.len() >= FLUSH_AT
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

/// Where access lines go once [`init`] has run.
struct Sink {
    writer: Buffered<std::io::Stderr>,
    /// Whether `RUST_LOG` lets `tollgate::access` through, asked once when
    /// the subscriber was installed: its filter does not change after, and
    /// asking per request (`tracing::enabled!` goes to the subscriber
    /// every time) was about 200 instructions of each.
    enabled: bool,
}

static ACCESS: OnceLock<Sink> = OnceLock::new();

/// One request, as its access line says it. Its names are `'static`
/// (interned, see `metrics::intern`): the line is formatted after the
/// request, and its config, may be gone.
#[derive(Debug, Clone, Copy)]
pub struct Access {
    pub route: &'static str,
    pub tier: &'static str,
    pub code: &'static str,
    pub status: u16,
    /// The whole request, in microseconds (written in milliseconds).
    pub latency_us: u64,
    /// From forwarding to the upstream's answer, in microseconds.
    pub upstream_us: Option<u64>,
    pub error: Option<&'static str>,
    /// When the request ended (the line's time).
    pub at: Tick,
}

/// Writes one access line, if `RUST_LOG` lets `tollgate::access` through.
pub fn access(line: Access) {
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
    if sink.enabled {
        sink.writer.access(line);
    }
}

/// How access lines are written, and what carries from one to the next:
/// the clock, and the labels last written.
struct Style {
    format: Format,
    ansi: bool,
    time: Time,
    labels: Labels,
}

impl Style {
    fn line(&mut self, out: &mut Vec<u8>, line: &Access) {
        match self.format {
            Format::Text => text_line(out, &mut self.time, &mut self.labels, line, self.ansi),
            Format::Json => json_line(out, &mut self.time, line),
        }
    }
}

/// The wall clock now, in nanoseconds since the epoch: an `i64` holds
/// them for 292 years either side of 1970 (a clock set beyond is held at
/// the end), so a line's time is worked out without 128-bit division.
fn wall_nanos() -> i64 {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(since) => i64::try_from(since.as_nanos()).unwrap_or(i64::MAX),
        // A clock set before 1970.
        Err(before) => i64::try_from(before.duration().as_nanos()).map_or(i64::MIN, |n| -n),
    }
}

/// How far from a reading of the wall clock it is counted on the
/// monotonic one before it is read again.
const READ_WALL_EVERY: u64 = 1_000_000_000;

/// The wall clock as of a monotonic reading: read at most once a second,
/// and counted forward (or back, for a line that ended before the
/// reading) from the monotonic reading each line already has (its
/// request's end), so a line costs no clock read of its own. The two
/// clocks run at the same rate (NTP slews both); a step of the wall clock
/// (set by hand) reaches the lines within a second.
#[derive(Default)]
struct Wall {
    /// A monotonic reading, and the wall time then (nanoseconds since the
    /// epoch).
    read: Option<(Tick, i64)>,
}

impl Wall {
    /// The wall time at `at`, in nanoseconds since the epoch; `read` reads
    /// both clocks, one just after the other.
    fn at(&mut self, at: Tick, read: impl FnOnce() -> (Tick, i64)) -> i64 {
        let fresh = self
            .read
            .filter(|&(tick, _)| at.nanos().abs_diff(tick.nanos()) < READ_WALL_EVERY);
        let (tick, wall) = match fresh {
            Some(fresh) => fresh,
            None => *self.read.insert(read()),
        };
        // Within a second of each other (a line ending before a reading
        // made for a later one included): the difference fits.
        wall.saturating_add(at.nanos().wrapping_sub(tick.nanos()) as i64)
    }
}

/// The clock of access lines: the wall clock, and the current second's
/// text.
#[derive(Default)]
struct Time {
    wall: Wall,
    second: Second,
}

/// The time as `tracing-subscriber` writes it up to the second (RFC 3339,
/// UTC), formatted once a second.
#[derive(Default)]
struct Second {
    at: Option<i64>,
    text: Vec<u8>,
}

impl Second {
    fn text(&mut self, secs: i64) -> &[u8] {
        if self.at != Some(secs) {
            self.at = Some(secs);
            self.text.clear();
            // Outside jiff's years (-9999..=9999): no date to write.
            if let Ok(now) = jiff::Timestamp::from_second(secs) {
                let dt = jiff::tz::TimeZone::UTC.to_datetime(now);
                let _ = write!(
                    self.text,
                    "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
                    dt.year(),
                    dt.month(),
                    dt.day(),
                    dt.hour(),
                    dt.minute(),
                    dt.second()
                );
            }
        }
        &self.text
    }
}

/// The time at `at` as `tracing-subscriber` writes it: RFC 3339,
/// microseconds, UTC.
fn timestamp(out: &mut Vec<u8>, time: &mut Time, at: Tick) {
    let nanos = time.wall.at(at, || (Tick::now(), wall_nanos()));
    // Floored, as before 1970 too: the second before, counted up.
    let secs = nanos.div_euclid(1_000_000_000);
    let micros = (nanos.rem_euclid(1_000_000_000) / 1000) as u32;
    out.extend_from_slice(time.second.text(secs));
    out.extend_from_slice(&fraction(micros));
}

/// `.{micros:06}Z`, without `core::fmt`.
fn fraction(micros: u32) -> [u8; 8] {
    let mut text = *b".000000Z";
    let mut left = micros;
    for at in (1..7).rev() {
        text[at] = b'0' + (left % 10) as u8;
        left /= 10;
    }
    text
}

/// A number of microseconds in milliseconds, as the access line gives it.
pub fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// A piece of a line written from its end, in a buffer on the stack:
/// digits come out of a number last first, so nothing is formatted
/// elsewhere and copied, and one copy puts the piece in the line.
struct Backward {
    buf: [u8; 160],
    at: usize,
}

impl Backward {
    fn new() -> Backward {
        Backward {
            buf: [0; 160],
            at: 160,
        }
    }

    #[inline(always)]
    fn push(&mut self, bytes: &[u8]) {
        let at = self.at - bytes.len();
        self.buf[at..self.at].copy_from_slice(bytes);
        self.at = at;
    }

    /// The last decimal digit of `n`.
    #[inline(always)]
    fn digit(&mut self, n: u64) {
        self.at -= 1;
        self.buf[self.at] = b'0' + (n % 10) as u8;
    }

    #[inline(always)]
    fn number(&mut self, mut n: u64) {
        loop {
            self.digit(n);
            n /= 10;
            if n == 0 {
                return;
            }
        }
    }

    /// `ms(us)` as `{:?}` writes it, from the integer: the whole
    /// milliseconds, a point, and the thousandths without their trailing
    /// zeros (Debug writes `x.0`). Below 10^15 microseconds that is exactly
    /// Debug's text: `ms(us)` is the double nearest `us / 1000` (`us` is
    /// exact as a double, the division correctly rounded), and Debug
    /// writes the shortest decimal that reads back as it; `us / 1000` in
    /// decimal, at most 15 significant digits, does, and no other decimal
    /// of at most 15 significant digits does (doubles there are closer
    /// together than such decimals), so neither does a shorter one. No
    /// float is formatted.
    #[inline(always)]
    fn ms(&mut self, us: u64) {
        #[cold]
        fn debug(rest: &mut Backward, us: u64) {
            rest.push(format!("{:?}", ms(us)).as_bytes());
        }
        if us >= 1_000_000_000_000_000 {
            debug(self, us);
            return;
        }
        let f = us % 1000;
        if !f.is_multiple_of(10) {
            self.digit(f);
        }
        if !f.is_multiple_of(100) {
            self.digit(f / 10);
        }
        self.digit(f / 100);
        self.push(b".");
        self.number(us / 1000);
    }

    fn text(&self) -> &[u8] {
        &self.buf[self.at..]
    }
}

/// `value` as `{:?}` writes it, without Debug's per-character escaping
/// when nothing needs escaping (names from the config nearly always).
fn quoted(out: &mut Vec<u8>, value: &str) {
    if value
        .bytes()
        .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
    {
        out.push(b'"');
        out.extend_from_slice(value.as_bytes());
        out.push(b'"');
    } else {
        let _ = write!(out, "{value:?}");
    }
}

/// A field's name and `=` as the text layout writes them: plain, and in
/// colour.
macro_rules! field {
    ($name:literal) => {
        [
            concat!(" ", $name, "=").as_bytes(),
            concat!(" \x1b[3m", $name, "\x1b[0m\x1b[2m=\x1b[0m").as_bytes(),
        ]
    };
}

/// `tracing-subscriber`'s full text layout for the access event.
fn text_line(out: &mut Vec<u8>, time: &mut Time, labels: &mut Labels, line: &Access, ansi: bool) {
    if ansi {
        out.extend_from_slice(b"\x1b[2m");
        timestamp(out, time, line.at);
        out.extend_from_slice(b"\x1b[0m");
    } else {
        timestamp(out, time, line.at);
    }
    out.extend_from_slice(labels.text(line, ansi));
    // The rest up to the error, or the end, from its end.
    let colour = usize::from(ansi);
    let mut rest = Backward::new();
    if line.error.is_none() {
        rest.push(b"\n");
    }
    if let Some(us) = line.upstream_us {
        rest.ms(us);
        rest.push(field!("upstream_ms")[colour]);
    }
    rest.ms(line.latency_us);
    rest.push(field!("latency_ms")[colour]);
    rest.number(u64::from(line.status));
    out.extend_from_slice(rest.text());
    if let Some(error) = line.error {
        out.extend_from_slice(field!("error")[colour]);
        quoted(out, error);
        out.push(b'\n');
    }
}

/// A line's route, tier and code, and whether it is in colour.
type Labelled = (&'static str, &'static str, &'static str, bool);

/// A text line from its level to its `status=`, which depends only on the
/// route, tier and code: formatted once and reused while they repeat (a
/// dozen pieces pushed and three names scanned, a fifth of the line's
/// work, become three comparisons and one copy).
#[derive(Default)]
struct Labels {
    /// The route, tier and code `text` was formatted for, and whether in
    /// colour; `None` before the first line.
    of: Option<Labelled>,
    text: Vec<u8>,
}

impl Labels {
    fn text(&mut self, line: &Access, ansi: bool) -> &[u8] {
        let of = (line.route, line.tier, line.code, ansi);
        // Names compared by address: route and tier names are interned
        // and codes are constants, so the same name is the same address
        // (one equal in text but elsewhere only formats the text again).
        let same = |(r, t, c, a): Labelled| {
            std::ptr::eq(r, of.0) && std::ptr::eq(t, of.1) && std::ptr::eq(c, of.2) && a == of.3
        };
        if !self.of.is_some_and(same) {
            self.of = Some(of);
            let out = &mut self.text;
            out.clear();
            out.extend_from_slice(if ansi {
                b" \x1b[32m INFO\x1b[0m \x1b[2mtollgate::access\x1b[0m\x1b[2m:\x1b[0m request"
            } else {
                b"  INFO tollgate::access: request"
            });
            let colour = usize::from(ansi);
            for (name, value) in [
                (field!("route"), line.route),
                (field!("tier"), line.tier),
                (field!("code"), line.code),
            ] {
                out.extend_from_slice(name[colour]);
                quoted(out, value);
            }
            out.extend_from_slice(field!("status")[colour]);
        }
        &self.text
    }
}

/// `tracing-subscriber`'s JSON layout for the access event.
fn json_line(out: &mut Vec<u8>, time: &mut Time, line: &Access) {
    // A `Vec` sink cannot fail; serde_json escapes what must be.
    let string = |out: &mut Vec<u8>, s: &str| {
        let _ = serde_json::to_writer(&mut *out, s);
    };
    let number = |out: &mut Vec<u8>, n: f64| match serde_json::Number::from_f64(n) {
        Some(n) => {
            let _ = write!(out, "{n}");
        }
        None => out.extend_from_slice(b"null"),
    };
    out.extend_from_slice(b"{\"timestamp\":\"");
    timestamp(out, time, line.at);
    out.extend_from_slice(b"\",\"level\":\"INFO\",\"fields\":{\"message\":\"request\",\"route\":");
    string(out, line.route);
    out.extend_from_slice(b",\"tier\":");
    string(out, line.tier);
    out.extend_from_slice(b",\"code\":");
    string(out, line.code);
    let _ = write!(out, ",\"status\":{},\"latency_ms\":", line.status);
    number(out, ms(line.latency_us));
    if let Some(us) = line.upstream_us {
        out.extend_from_slice(b",\"upstream_ms\":");
        number(out, ms(us));
    }
    if let Some(error) = line.error {
        out.extend_from_slice(b",\"error\":");
        string(out, error);
    }
    out.extend_from_slice(b"},\"target\":\"tollgate::access\"}\n");
}

/// Sets up logging to stderr, filtered by `RUST_LOG` (else `default`).
/// Keep the returned guard alive until exit: dropping it writes out what
/// is still buffered.
pub fn init(format: Format, default: &str) -> Flush {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let ansi = std::io::stderr().is_terminal();
    let writer = Buffered::new(std::io::stderr(), format, ansi);
    if let Err(e) = writer.tick(FLUSH_EVERY) {
        eprintln!("warning: no log writer thread ({e}); lines are written when the buffer fills or at exit");
    }
    let flush = writer.guard();
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

    /// A buffer in front of a recorder, its access lines in `format`.
    fn buffered(format: Format) -> (Recorder, Buffered<Recorder>) {
        let out = Recorder::default();
        let writer = Buffered::new(out.clone(), format, false);
        (out, writer)
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
        let (out, writer) = buffered(Format::Text);
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
        let (out, writer) = buffered(Format::Text);
        write_line(&writer, Level::INFO, "access\n");
        write_line(&writer, Level::WARN, "warning\n");
        assert_eq!(out.0.lock().0, b"access\nwarning\n");
    }

    #[test]
    fn a_full_buffer_is_written_by_the_writer_and_nothing_is_lost() {
        let (out, writer) = buffered(Format::Text);
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

    fn request(n: u64) -> Access {
        Access {
            route: "r",
            tier: "t",
            code: "OK",
            status: 200,
            latency_us: n,
            upstream_us: None,
            error: None,
            at: Tick::now(),
        }
    }

    /// The access lines of an output, by their latency, and its other
    /// lines as they are.
    fn lines_of(out: &Recorder) -> Vec<String> {
        let text = String::from_utf8(out.0.lock().0.clone()).expect("utf8");
        text.lines()
            .map(|line| match line.split_once(" latency_ms=") {
                Some((_, latency)) => format!("access {latency}"),
                None => line.to_string(),
            })
            .collect()
    }

    #[test]
    fn access_lines_keep_their_place_among_the_other_lines() {
        let (out, writer) = buffered(Format::Text);
        writer.access(request(1000));
        write_line(&writer, Level::INFO, "event\n");
        writer.access(request(2000));
        writer.access(request(3000));
        assert!(out.0.lock().0.is_empty(), "nothing written before its time");
        writer.flush();
        assert_eq!(
            lines_of(&out),
            ["access 1.0", "event", "access 2.0", "access 3.0"]
        );
        assert_eq!(out.0.lock().1, 1, "in one write");
    }

    #[test]
    fn a_warning_goes_out_at_once_behind_the_access_lines_before_it() {
        let (out, writer) = buffered(Format::Text);
        writer.access(request(1000));
        write_line(&writer, Level::WARN, "warning\n");
        assert_eq!(lines_of(&out), ["access 1.0", "warning"]);
    }

    #[test]
    fn a_full_batch_of_access_lines_is_written_by_the_request_that_fills_it() {
        let (out, writer) = buffered(Format::Json);
        let flush = writer.guard();
        for n in 0..ACCESS_BATCH as u64 - 1 {
            writer.access(request(n));
        }
        assert!(out.0.lock().0.is_empty(), "a batch not yet full waits");
        writer.access(request(7));
        let written = lines_of(&out);
        assert_eq!(
            written.len(),
            ACCESS_BATCH,
            "the batch, written by its last"
        );
        assert_eq!(out.0.lock().1, 1);
        for line in &written {
            serde_json::from_str::<serde_json::Value>(line).expect("a JSON line");
        }
        writer.access(request(8));
        drop(flush);
        assert_eq!(lines_of(&out).len(), ACCESS_BATCH + 1, "the rest at exit");
    }

    /// What `tracing-subscriber` itself writes for the access event, in
    /// one layout.
    fn from_subscriber(json: bool, ansi: bool, line: &Access) -> String {
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
            let out = fraction(micros);
            assert_eq!(&out, written.as_bytes());
            assert_eq!(&out, format!(".{micros:06}Z").as_bytes());
        }
    }

    #[test]
    fn the_second_is_written_as_rfc_3339_utc() {
        let mut second = Second::default();
        for (secs, written) in [
            (0, "1970-01-01T00:00:00"),
            (-1, "1969-12-31T23:59:59"),
            (951_782_400, "2000-02-29T00:00:00"),
            (1_796_083_199, "2026-11-30T23:59:59"),
        ] {
            assert_eq!(second.text(secs), written.as_bytes());
            // Again: the text kept for the second.
            assert_eq!(second.text(secs), written.as_bytes());
        }
        // Past jiff's last year: nothing, rather than a wrong date.
        assert_eq!(second.text(i64::MAX), b"");
    }

    #[test]
    fn the_wall_clock_is_read_once_a_second_and_lines_counted_from_it() {
        let epoch_2027: i64 = 1_798_761_600 * 1_000_000_000;
        let stepped = epoch_2027 - 3_600_000_000_000;
        // A line's end; what the two clocks read, should they be read; the
        // wall time the line gets; the readings taken so far.
        let lines: [(u64, (u64, i64), i64, u32); 6] = [
            // The first line reads them (300 ns after its request ended).
            (
                5_000_000_000,
                (5_000_000_300, epoch_2027 + 300),
                epoch_2027,
                1,
            ),
            // Within the second: counted forward, not read.
            (5_400_000_000, (0, 0), epoch_2027 + 400_000_000, 1),
            (6_000_000_299, (0, 0), epoch_2027 + 1_000_000_299, 1),
            // A second after the reading: read again, and a step of the
            // wall clock (an hour back) shows from here.
            (
                6_000_000_300,
                (6_000_000_400, stepped + 1_000_000_400),
                stepped + 1_000_000_300,
                2,
            ),
            // A line whose end was before the last reading (formatted
            // after it): counted back from it.
            (6_000_000_200, (0, 0), stepped + 1_000_000_200, 2),
            // A second before the reading: read again.
            (
                5_000_000_400,
                (6_000_000_500, stepped + 1_000_000_500),
                stepped + 400,
                3,
            ),
        ];
        let mut wall = Wall::default();
        let mut reads = 0;
        for (end, (tick, wall_then), given, read_so_far) in lines {
            let read = || {
                reads += 1;
                (Tick::from_nanos(tick), wall_then)
            };
            assert_eq!(wall.at(Tick::from_nanos(end), read), given, "line at {end}");
            assert_eq!(reads, read_so_far, "line at {end}");
        }
    }

    #[test]
    fn an_access_line_starts_with_the_time_now() {
        let (mut time, mut labels) = (Time::default(), Labels::default());
        // Before the line's end is read: its time is that end.
        let before = jiff::Timestamp::now();
        let line = Access {
            route: "r",
            tier: "t",
            code: "OK",
            status: 200,
            latency_us: 1,
            upstream_us: None,
            error: None,
            at: Tick::now(),
        };
        let mut text = Vec::new();
        text_line(&mut text, &mut time, &mut labels, &line, false);
        let after = jiff::Timestamp::now();
        let text = String::from_utf8(text).expect("utf8");
        let (time, _) = text.split_once(' ').expect("a time, then the rest");
        let time: jiff::Timestamp = time.parse().expect("an RFC 3339 time");
        // Written to the microsecond, so up to one before `before`.
        assert!(time >= before - jiff::SignedDuration::from_micros(1) && time <= after);
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
                at: Tick::now(),
            },
            Access {
                route: "a \"quoted\" name",
                tier: "none",
                code: "UPSTREAM_UNAVAILABLE",
                status: 502,
                latency_us: 3000,
                upstream_us: None,
                error: Some("ConnectRefused"),
                at: Tick::now(),
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
        let lines: Vec<Access> = lines
            .into_iter()
            .chain(latencies.iter().map(|&us| Access {
                route: "r",
                tier: "t",
                code: "OK",
                status: 200,
                latency_us: us,
                upstream_us: Some(us / 7),
                error: None,
                at: Tick::now(),
            }))
            .collect();
        // The same route, tier and code with another code in between, so
        // the labels formatted once are reused, and not reused wrongly.
        let lines: Vec<Access> = lines
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
        let (mut time, mut labels) = (Time::default(), Labels::default());
        for line in &lines {
            for ansi in [false, true] {
                let theirs = from_subscriber(false, ansi, line);
                for _ in 0..2 {
                    let mut ours = Vec::new();
                    text_line(&mut ours, &mut time, &mut labels, line, ansi);
                    let ours = String::from_utf8(ours).expect("utf8");
                    assert_eq!(after_time(&ours), after_time(&theirs), "ansi {ansi}");
                }
            }
            let theirs: serde_json::Value =
                serde_json::from_str(&from_subscriber(true, false, line)).expect("json");
            let mut ours = Vec::new();
            json_line(&mut ours, &mut time, line);
            let ours = String::from_utf8(ours).expect("utf8");
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
