//! The framework's own ceiling: a minimal Pingora pass-through with nothing
//! of tollgate in it, built the way tollgate builds its proxy (mimalloc, the
//! same Pingora features, the same server settings), so `benches/compare.sh`
//! can show what tollgate adds on top of Pingora itself.
//!
//! ```sh
//! cargo build --release --example bare_pingora
//! target/release/examples/bare_pingora 127.0.0.1:8950 127.0.0.1:3900 1
//! ```
//!
//! Arguments: listen address, upstream address, worker threads, and
//! `defaults` (Pingora as it comes) or `tuned` (the settings tollgate runs
//! with: current-thread runtimes, a write buffer that sends a small answer
//! in one `send`, no compression module).

use pingora::prelude::*;
use pingora::server::configuration::{Opt, ServerConf};

#[global_allocator]
static ALLOCATOR: tollgate::alloc::Allocator = tollgate::alloc::Allocator;

struct PassThrough {
    upstream: std::net::SocketAddr,
    tuned: bool,
}

impl ProxyHttp for PassThrough {
    type CTX = ();

    fn new_ctx(&self) {}

    fn init_downstream_modules(&self, modules: &mut pingora::modules::http::HttpModules) {
        if !self.tuned {
            modules.add_module(
                pingora::modules::http::compression::ResponseCompressionBuilder::enable(0),
            );
        }
    }

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(self.upstream, false, String::new())))
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let usage = "usage: bare_pingora LISTEN UPSTREAM [THREADS] [defaults|tuned]";
    let listen = args.next().expect(usage);
    let upstream = args.next().expect(usage).parse().expect(usage);
    let threads = args.next().map_or(1, |t| t.parse().expect(usage));
    let tuned = args.next().as_deref() == Some("tuned");
    let conf = ServerConf {
        threads,
        work_stealing: !tuned,
        grace_period_seconds: Some(1),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(Opt::default(), conf);
    server.bootstrap();
    let mut proxy =
        pingora::proxy::http_proxy_service(&server.configuration, PassThrough { upstream, tuned });
    let mut listener = pingora::listeners::ListenerConfig::tcp(listen);
    if tuned {
        listener = listener.l4_buffer(
            pingora::protocols::l4::stream::L4BufferSettings::default().write(16 * 1024),
        );
    }
    proxy.add_listener(listener);
    server.add_service(proxy);
    server.run_forever();
}
