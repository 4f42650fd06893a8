//! Assembles and runs a gateway: the Pingora proxy service, the admin API,
//! the write-behind flusher, and shutdown.
//!
//! [`start`] runs everything on a thread of its own and returns once the
//! proxy accepts connections, with the addresses it bound (so tests can ask
//! for port 0). The shutdown trigger is passed in, as in mini-redis: the
//! binary wires it to signals, tests to a handle.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{bail, Context};
use arc_swap::ArcSwap;
use async_trait::async_trait;
use parking_lot::Mutex;
use pingora::listeners::tls::TlsSettings;
use pingora::listeners::{ListenerConfig, TcpSocketOptions};
use pingora::protocols::l4::stream::L4BufferSettings;
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch, ShutdownWatch};
use pingora::services::background::{background_service, BackgroundService};
use tokio::sync::watch;

use crate::admin;
use crate::clock::SharedClock;
use crate::config::Config;
use crate::gateway::{Gateway, Generation};
use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::reload;
use crate::store::Store;
use crate::upgrade;

/// How often usage is written behind to disk.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(200);
/// Keys unused this long leave memory (their state is in the store) ...
const KEY_IDLE: Duration = Duration::from_secs(600);
/// ... checked this often.
const EVICT_EVERY: Duration = Duration::from_secs(60);

/// How often the write-behind's usage log is set aside to be folded into
/// the keys' rows (see `store::sqlite`'s "Usage log"). A fold writes each
/// key logged since the last one once, however often it was logged, and
/// with the keys spread over a large store that is a page of the database
/// for nearly every key: the rarer the folds, the fewer such pages. At
/// 5 s, 10,000 keys in use spread over 1,000,000 cost the writer 1.2-1.3
/// us a request, at 15 s 0.9-1.0 (BENCHMARKS.md). The log then holds up to
/// 15 s of passes, which a start after a crash folds first.
const FOLD_EVERY: Duration = Duration::from_secs(15);

/// How long after the log is set aside it is folded: long enough for
/// every key still in use to be logged again in the new log (within
/// `store::local::REWRITE_AFTER_MS` and a pass of being charged), which
/// the fold then leaves to that log's own fold rather than write a state
/// of it that is already old.
const FOLD_SETTLE: Duration = Duration::from_secs(1);

/// How long the drain lets the tasks of connections accepted just before
/// the stop start being served (and so be counted) before it looks.
const CONNECTIONS_SETTLE: Duration = Duration::from_millis(50);

/// Keys held in memory before written, unused ones are dropped at once:
/// bounds memory when traffic spreads over millions of keys (about 2 KB
/// a key).
const MAX_CACHED_KEYS: usize = 50_000;

/// How long start-up waits for another process to release the store.
const STORE_LOCK_WAIT: Duration = Duration::from_secs(5);
/// How long a taking-over process waits for the old one to hand the store
/// over: Pingora's 5 s hand-over, the drain, and a margin.
const UPGRADE_LOCK_WAIT: Duration = Duration::from_secs(60);

/// How a gateway runs, beyond its config file.
pub struct Options {
    pub clock: SharedClock,
    /// The admin API's root key (read from the env var the config names).
    pub root_key: Option<String>,
    /// Proxy worker threads.
    pub threads: usize,
    /// One work-stealing runtime for the workers instead of one
    /// current-thread runtime each. The binary runs without (about 9% less
    /// CPU per request, BENCHMARKS.md). A process that starts gateways one
    /// after another, like the in-process tests, needs it: Pingora 0.9.1's
    /// current-thread runtimes find their handles through a thread-local
    /// table keyed by recycled thread ids, so a later gateway's worker can
    /// pick up a stopped gateway's handles and never run its tasks.
    pub work_stealing: bool,
    /// Where the config came from, for reloads; `None` disables reloading.
    pub config_path: Option<PathBuf>,
    /// Also stop on SIGTERM/SIGINT and reload on SIGHUP, and exit the
    /// process once drained (the binary does; tests do not).
    pub handle_signals: bool,
    /// How long in-flight requests may take to finish after a stop.
    pub drain_timeout: Duration,
    /// Take over from a tollgate already serving this store, if there is one
    /// (see [`crate::upgrade`]).
    pub upgrade: bool,
}

/// A running gateway.
pub struct Running {
    pub proxy_addr: SocketAddr,
    /// The proxy's HTTPS listener (`listen.proxy_tls`), if any.
    pub tls_addr: Option<SocketAddr>,
    pub admin_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub gateway: Arc<Gateway>,
    stop: watch::Sender<bool>,
    /// Told when the shutdown sequence is over (or the server thread ended).
    done: std::sync::mpsc::Receiver<()>,
    thread: Option<JoinHandle<()>>,
}

impl Running {
    /// Asks the gateway to stop and waits until it has.
    pub fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }

    /// Waits until the gateway has stopped by itself (a signal) and its
    /// shutdown sequence is over: requests drained, the store flushed, the
    /// reporter's last attempt made. Pingora may still be sitting out its
    /// grace period; the caller (the binary's `main`) ends the process.
    pub fn wait(self) {
        let _ = self.done.recv();
    }
}

impl Drop for Running {
    /// A dropped gateway stops in the background.
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// Binds `addr` for Pingora. Port 0 is resolved here, because Pingora binds
/// later and would not tell which port it got: a port is reserved with a
/// bound (not listening) `SO_REUSEPORT` socket that Pingora's own
/// `SO_REUSEPORT` listener then joins. For a fixed port, a trial bind turns
/// "address in use" into a clear start-up error instead of a panic inside
/// Pingora.
fn reserve_proxy_port(addr: SocketAddr) -> anyhow::Result<(SocketAddr, Option<socket2::Socket>)> {
    use socket2::{Domain, Protocol, Socket, Type};
    if addr.port() != 0 {
        TcpListener::bind(addr).with_context(|| format!("cannot listen on {addr}"))?;
        return Ok((addr, None));
    }
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_port(true)?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    let bound = socket
        .local_addr()?
        .as_socket()
        .context("reserved proxy port has no address")?;
    Ok((bound, Some(socket)))
}

/// Binds a listener of our own (admin, metrics) with `SO_REUSEPORT`, so
/// that during an upgrade the new process can bind it while the old one
/// still serves it.
fn bind_shared(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let bind = || -> std::io::Result<TcpListener> {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(1024)?;
        Ok(socket.into())
    };
    bind().with_context(|| format!("cannot listen on {addr} ({what})"))
}

/// The proxy listener's write buffer per connection.
const PROXY_WRITE_BUFFER: usize = 16 * 1024;

/// Starts a gateway and returns once its proxy accepts connections.
pub fn start(config: Config, options: Options) -> anyhow::Result<Running> {
    std::fs::create_dir_all(&config.store_path).with_context(|| {
        format!(
            "cannot create store directory {}",
            config.store_path.display()
        )
    })?;
    let handover = upgrade::Handover::beside(&config.store_path);
    if options.upgrade {
        handover.check()?;
    }
    let conf = ServerConf {
        threads: options.threads.max(1),
        work_stealing: options.work_stealing,
        // Pingora sleeps this long after a stop before ending its runtimes
        // (default 300 s). The drainer below exits sooner, as soon as the
        // last in-flight request is done.
        grace_period_seconds: Some(options.drain_timeout.as_secs().max(1)),
        graceful_shutdown_timeout_seconds: Some(2),
        upgrade_sock: handover.sock.display().to_string(),
        upgrade_sock_connect_accept_max_retries: Some(30),
        // Upstream read and connect timeouts of a second or more on
        // tokio's timer wheel (one per runtime, so one per worker thread)
        // rather than Pingora's "fast" timers (a map under a lock, a box
        // and a `Notify` per timeout): about 600 fewer instructions a
        // proxied request, measured with callgrind (BENCHMARKS.md).
        fast_timeout_to_tokio_threshold_seconds: Some(0),
        ..ServerConf::default()
    };

    // With --upgrade, a store locked by a running tollgate means: take over.
    let (store, takeover) = match Store::open_for(&config) {
        Err(e) if options.upgrade && e.is_locked() => (None, true),
        Err(e) if e.is_locked() => (
            Some(Store::open_for_waiting(&config, STORE_LOCK_WAIT)),
            false,
        ),
        other => (Some(other), false),
    };
    let opt = pingora::server::configuration::Opt {
        upgrade: takeover,
        ..Default::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    if takeover {
        if config.listen.proxy.port() == 0 {
            bail!("--upgrade needs the running process's fixed listen.proxy address, not port 0");
        }
        tracing::info!(sock = %handover.sock.display(), "taking over from the running tollgate");
        handover.signal_old_process()?;
    }
    // Receives the old process's listening sockets when taking over.
    server.bootstrap();
    let admin_listener = bind_shared(config.listen.admin, "listen.admin")?;
    let admin_addr = admin_listener.local_addr()?;
    let metrics_listener = bind_shared(config.listen.metrics, "listen.metrics")?;
    let metrics_addr = metrics_listener.local_addr()?;
    // Taking over, the listening sockets come from the old process.
    let reserve = |addr: SocketAddr, field: &str| {
        if takeover {
            Ok((addr, None))
        } else {
            reserve_proxy_port(addr).with_context(|| format!("{field} {addr}"))
        }
    };
    let (proxy_addr, reservation) = reserve(config.listen.proxy, "listen.proxy")?;
    let tls = match &config.listen.proxy_tls {
        None => None,
        Some(t) => {
            let pair = crate::tls::load_pair(&t.cert, &t.key)
                .map_err(|e| anyhow::anyhow!("listen.proxy_tls.{}: {}", e.field, e.message))?;
            let (addr, reservation) = reserve(t.addr, "listen.proxy_tls.addr")?;
            Some((addr, reservation, crate::tls::Certs::new(pair)))
        }
    };
    let store = match store {
        Some(store) => store,
        // The old process releases the lock once it has drained and flushed.
        None => Store::open_for_waiting(&config, UPGRADE_LOCK_WAIT),
    }
    .with_context(|| {
        format!(
            "cannot open store {} (is another tollgate using it?)",
            config.store_path.display()
        )
    })?;
    handover.claim();
    if options.root_key.is_none() {
        tracing::warn!(
            "{} is not set: the admin API answers 503 NO_ROOT_KEY to every call until the gateway is restarted with it",
            config.root_key_env
        );
    }

    let metrics = Metrics::new().context("cannot register metrics")?;
    metrics.config_generation.set(1);
    let clock = store.clock(options.clock.clone());
    let gateway = Arc::new(Gateway {
        config: ArcSwap::from_pointee(Generation::new(config, &metrics)),
        store: Arc::new(store),
        clock,
        root_key: options.root_key.clone(),
        metrics,
        last_reload: Mutex::new(None),
        in_flight: Default::default(),
        connections: Default::default(),
    });

    let mut proxy =
        pingora::proxy::http_proxy_service(&server.configuration, Proxy::new(gateway.clone()));
    if let Some(app) = proxy.app_logic_mut() {
        // CONNECT reaches `request_filter`, which refuses it in JSON
        // (Pingora's own refusal is an empty 405).
        let mut options = pingora::apps::HttpServerOptions::default();
        options.allow_connect_method_proxying = true;
        app.server_options = Some(options);
    }
    // A listener of the proxy: joins its reservation's port, if it has one.
    let listener = |addr: SocketAddr, reserved: bool| {
        let mut socket_options = TcpSocketOptions::default();
        socket_options.so_reuseport = Some(reserved);
        ListenerConfig::tcp(addr.to_string())
            .tcp_socket_options(socket_options)
            // Room for an answer's header and a small body in one `send`
            // (Pingora's default is one MSS, 1460 bytes). Streamed bodies
            // are still flushed chunk by chunk.
            .l4_buffer(L4BufferSettings::default().write(PROXY_WRITE_BUFFER))
    };
    proxy.add_listener(listener(proxy_addr, reservation.is_some()));
    if let Some((addr, reservation, certs)) = &tls {
        // The certificate comes from `certs` (so it can change); the paths
        // Pingora would read are unused.
        let mut settings =
            TlsSettings::intermediate("", "").map_err(|e| anyhow::anyhow!("TLS settings: {e}"))?;
        settings.set_cert_resolver(certs.clone());
        settings.enable_h2();
        proxy.add_listener(listener(*addr, reservation.is_some()).tls(settings));
    }
    server.add_service(proxy);
    server.add_service(background_service(
        "admin api",
        HttpService::new(admin_listener, admin::router(gateway.clone())),
    ));
    server.add_service(background_service(
        "metrics",
        HttpService::new(metrics_listener, metrics_router(gateway.clone())),
    ));
    let (done_tx, done) = std::sync::mpsc::channel();
    server.add_service(background_service(
        "usage flusher",
        Flusher {
            gateway: gateway.clone(),
            drain_timeout: options.drain_timeout,
            handover: handover.clone(),
            done: done_tx.clone(),
        },
    ));
    server.add_service(background_service(
        "reporter",
        crate::report::Reporter::new(gateway.clone()),
    ));
    if let Some((_, _, certs)) = &tls {
        server.add_service(background_service(
            "tls certificate reloader",
            crate::tls::Reloader {
                gateway: gateway.clone(),
                certs: certs.clone(),
            },
        ));
    }
    server.add_service(background_service(
        "upstream resolver",
        crate::upstream::Resolver {
            gateway: gateway.clone(),
        },
    ));
    if let Some(path) = &options.config_path {
        server.add_service(background_service(
            "config watcher",
            reload::Watcher {
                gateway: gateway.clone(),
                path: path.clone(),
            },
        ));
    }

    let (stop, stop_rx) = watch::channel(false);
    let signals = Signals {
        stop: stop_rx,
        os: options.handle_signals,
        gateway: gateway.clone(),
        config_path: options.config_path.clone(),
    };
    let store = gateway.store.clone();
    let tls_addr = tls.as_ref().map(|(addr, _, _)| *addr);
    let tls_reservation = tls.and_then(|(_, reservation, _)| reservation);
    let thread = std::thread::Builder::new()
        .name("tollgate".into())
        .spawn(move || {
            server.run(RunArgs {
                shutdown_signal: Box::new(signals),
            });
            // The flusher flushed on shutdown; this catches anything charged
            // by requests that finished after it.
            if let Err(e) = store.flush_blocking() {
                tracing::error!(error = %e, "final store flush failed");
            }
            handover.release();
            drop((reservation, tls_reservation));
            let _ = done_tx.send(());
        })?;

    // Ready when the proxy accepts; Pingora binds on its own runtime.
    let mut ready = false;
    let accepting =
        |addr: &SocketAddr| TcpStream::connect_timeout(addr, Duration::from_millis(100)).is_ok();
    for _ in 0..500 {
        if accepting(&proxy_addr) && tls_addr.as_ref().is_none_or(accepting) {
            ready = true;
            break;
        }
        if thread.is_finished() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    if !ready {
        bail!("the proxy did not start listening on {proxy_addr}");
    }
    defer_accept(proxy_addr);
    if let Some(addr) = tls_addr {
        defer_accept(addr);
        tracing::info!(proxy_tls = %addr, "the proxy also serves HTTPS (HTTP/2 by ALPN)");
    }
    tracing::info!(proxy = %proxy_addr, admin = %admin_addr, metrics = %metrics_addr, "tollgate is serving");
    Ok(Running {
        proxy_addr,
        tls_addr,
        admin_addr,
        metrics_addr,
        gateway,
        stop,
        done,
        thread: Some(thread),
    })
}

/// What ends `Server::run`: the handle's trigger, or (for the binary) a
/// signal. SIGINT drains like SIGTERM, since a Ctrl-C must not lose charges.
struct Signals {
    stop: watch::Receiver<bool>,
    os: bool,
    gateway: Arc<Gateway>,
    config_path: Option<PathBuf>,
}

#[async_trait]
impl ShutdownSignalWatch for Signals {
    async fn recv(&self) -> ShutdownSignal {
        let mut stop = self.stop.clone();
        if !self.os {
            stopped(&mut stop).await;
            return ShutdownSignal::GracefulTerminate;
        }
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int), Ok(mut hup), Ok(mut quit)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
            signal(SignalKind::quit()),
        ) else {
            tracing::error!("cannot install signal handlers; stopping");
            return ShutdownSignal::GracefulTerminate;
        };
        loop {
            tokio::select! {
                _ = stopped(&mut stop) => return ShutdownSignal::GracefulTerminate,
                _ = term.recv() => {
                    tracing::info!("SIGTERM: draining and stopping");
                    return ShutdownSignal::GracefulTerminate;
                }
                _ = int.recv() => {
                    tracing::info!("SIGINT: draining and stopping");
                    return ShutdownSignal::GracefulTerminate;
                }
                _ = quit.recv() => {
                    tracing::info!("SIGQUIT: handing the listening sockets to the new process, then draining");
                    return ShutdownSignal::GracefulUpgrade;
                }
                _ = hup.recv() => {}
            }
            // SIGHUP: reload, off the runtime (it reads and validates a file).
            match &self.config_path {
                Some(path) => {
                    let (gateway, path) = (self.gateway.clone(), path.clone());
                    let _ =
                        tokio::task::spawn_blocking(move || reload::reload(&gateway, &path)).await;
                }
                None => tracing::warn!("SIGHUP: this gateway has no config file to reload"),
            }
        }
    }
}

/// Resolves once the stop trigger is set.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Sets `TCP_DEFER_ACCEPT` on Pingora's proxy listener (found by its
/// address among this process's descriptors, since Pingora does not hand
/// it out): a connection is accepted only once its request bytes are there.
///
/// Pingora drops a connection it has accepted but not yet read a request
/// from when it stops accepting (a stop, or the hand-over of an upgrade).
/// With deferred accept such a connection already holds its request, which
/// Pingora reads before it looks at the stop: no client that connected just
/// before the hand-over is dropped. The option lives on the socket, so it
/// carries over to the process that takes the socket in an upgrade.
fn defer_accept(addr: SocketAddr) {
    use std::os::fd::{AsRawFd, BorrowedFd};
    let Ok(fds) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    for fd in fds
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
    {
        // SAFETY: the descriptor stays open for the duration of this check:
        // it is one of ours, and only looked at.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        let socket = socket2::SockRef::from(&borrowed);
        let is_listener = socket.is_listener().unwrap_or(false);
        let local = socket.local_addr().ok().and_then(|a| a.as_socket());
        if !is_listener || local != Some(addr) {
            continue;
        }
        let seconds: libc::c_int = 5;
        // SAFETY: a valid descriptor, option and length for an int option.
        let rc = unsafe {
            libc::setsockopt(
                borrowed.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_DEFER_ACCEPT,
                (&seconds as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            tracing::info!(
                fd,
                "the proxy listener accepts connections once their request has arrived"
            );
        } else {
            tracing::warn!(error = %std::io::Error::last_os_error(), "cannot defer accept on the proxy listener");
        }
    }
}

/// Serves an axum router on a listener bound at start-up, until shutdown.
struct HttpService {
    listener: Mutex<Option<TcpListener>>,
    router: axum::Router,
}

impl HttpService {
    fn new(listener: TcpListener, router: axum::Router) -> Self {
        Self {
            listener: Mutex::new(Some(listener)),
            router,
        }
    }
}

#[async_trait]
impl BackgroundService for HttpService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let Some(listener) = self.listener.lock().take() else {
            return;
        };
        let listener = match tokio::net::TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "listener failed");
                return;
            }
        };
        let serve = axum::serve(listener, self.router.clone()).with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|s| *s).await;
        });
        if let Err(e) = serve.await {
            tracing::error!(error = %e, "HTTP listener stopped");
        }
    }
}

/// `GET /metrics`: Prometheus text format.
fn metrics_router(gateway: Arc<Gateway>) -> axum::Router {
    let scrape = move || {
        let gateway = gateway.clone();
        async move {
            let m = &gateway.metrics;
            // A shared store that does not answer keeps the last count.
            if let Ok(keys) = gateway.store.key_count().await {
                m.keys.set(i64::try_from(keys).unwrap_or(i64::MAX));
            }
            m.store_healthy
                .set(if gateway.store.healthy() { 1.0 } else { 0.0 });
            m.in_flight
                .set(i64::try_from(gateway.in_flight.get()).unwrap_or(i64::MAX));
            (
                [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
                m.render(),
            )
        }
    };
    axum::Router::new().route("/metrics", axum::routing::get(scrape))
}

/// How long the reporter's last attempt at shutdown may take; what it
/// cannot send stays in the outbox for the next start.
const LAST_REPORT: Duration = Duration::from_secs(3);

/// Writes dirty usage behind every [`FLUSH_INTERVAL`], and owns the
/// shutdown sequence: once Pingora has stopped accepting, wait for
/// in-flight requests (up to the drain timeout), flush the store, give the
/// reporter a bounded last attempt, release the upgrade hand-over, and tell
/// [`Running::wait`], whose caller ends the process (rather than sit out
/// the rest of Pingora's grace period). No task ends the process itself.
struct Flusher {
    gateway: Arc<Gateway>,
    drain_timeout: Duration,
    handover: upgrade::Handover,
    done: std::sync::mpsc::Sender<()>,
}

#[async_trait]
impl BackgroundService for Flusher {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let store = &self.gateway.store;
        let mut tick = tokio::time::interval(FLUSH_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_eviction = tokio::time::Instant::now();
        let mut last_fold = tokio::time::Instant::now();
        // When the log was set aside, until it is folded.
        let mut set_aside: Option<tokio::time::Instant> = None;
        // A fold runs beside the passes, not between them: the writer
        // commits each pass between the fold's steps, so a charge reaches
        // the disk on time however many keys the fold has to write.
        let mut folding: Option<tokio::task::JoinHandle<()>> = None;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.wait_for(|s| *s) => break,
            }
            if let Err(e) = store.flush_due().await {
                tracing::error!(error = %e, "writing usage to the store failed; charges fail closed until it works");
            }
            // Over the cap, every key already written and not in use
            // leaves memory now (a later request reads it back, ~3 µs)
            // once a finished fold has its logged usage; otherwise keys
            // idle for KEY_IDLE, once a minute.
            let over_cap = store.cached() > MAX_CACHED_KEYS;
            let idle = folding.as_ref().is_none_or(|fold| fold.is_finished());
            match set_aside {
                Some(at) if idle && (over_cap || at.elapsed() >= FOLD_SETTLE) => {
                    set_aside = None;
                    let gateway = self.gateway.clone();
                    folding = Some(tokio::spawn(async move {
                        if let Err(e) = gateway.store.fold_aside().await {
                            tracing::error!(error = %e, "folding the usage log failed; charges fail closed until the store writes again");
                        }
                    }));
                }
                None if idle && (over_cap || last_fold.elapsed() >= FOLD_EVERY) => {
                    last_fold = tokio::time::Instant::now();
                    set_aside = Some(last_fold);
                    let gateway = self.gateway.clone();
                    folding = Some(tokio::spawn(async move {
                        if let Err(e) = gateway.store.set_aside().await {
                            tracing::error!(error = %e, "setting the usage log aside failed; charges fail closed until the store writes again");
                        }
                    }));
                }
                _ => {}
            }
            if over_cap {
                let dropped = store.evict_idle(Duration::ZERO);
                tracing::debug!(
                    dropped,
                    cached = store.cached(),
                    "keys over the memory cap left memory"
                );
            } else if last_eviction.elapsed() >= EVICT_EVERY {
                last_eviction = tokio::time::Instant::now();
                let dropped = store.evict_idle(KEY_IDLE);
                tracing::debug!(dropped, cached = store.cached(), "idle keys left memory");
            }
        }
        // The drain waits for every connection, not only the requests
        // under way: a connection accepted just before the stop has no
        // request under way yet, and its request, served after a flush
        // that did not wait for it, would be answered and its charge lost
        // at exit. Its task gets a moment to start first, so it is counted.
        let deadline = tokio::time::Instant::now() + self.drain_timeout;
        tokio::time::sleep(CONNECTIONS_SETTLE).await;
        loop {
            let in_flight = self.gateway.in_flight.get();
            let connections = self.gateway.connections.get();
            if in_flight == 0 && connections == 0 {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(
                    in_flight,
                    connections,
                    "drain timeout: stopping with requests still in flight"
                );
                break;
            }
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.gateway.in_flight.idle() => {}
                _ = self.gateway.connections.idle() => {}
            }
        }
        match store.flush_dirty().await {
            Ok(_) => tracing::info!("drained; usage flushed"),
            Err(e) => tracing::error!(error = %e, "final usage flush failed"),
        }
        crate::report::Reporter::new(self.gateway.clone())
            .last_attempt(LAST_REPORT)
            .await;
        // The next start would fold the log too; a store left folded is
        // whole for anything that reads it meanwhile.
        if let Err(e) = store.fold().await {
            tracing::error!(error = %e, "folding the usage log at exit failed; the next start folds it");
        }
        self.handover.release();
        let _ = self.done.send(());
    }
}
