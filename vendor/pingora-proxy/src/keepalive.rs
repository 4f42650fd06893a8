//! Connections served by the proxy itself: an HTTP/1 connection's requests
//! in one loop.
//!
//! (tollgate's vendored copy.) Pingora serves a connection through the
//! blanket `ServerApp` of an `HttpServerApp`, whose `process_new_http` is an
//! `async_trait` method: every request on a kept-alive connection boxes a new
//! future the size of the whole proxy state machine (9-14 KiB here) and
//! copies it into the box. Here the proxy is the `ServerApp`: an HTTP/1
//! connection's requests are awaited in place, in the connection's one
//! future, and only HTTP/2, h2c and custom-protocol connections go through
//! Pingora's own handling, by way of [`Connection`].

use super::*;
use pingora_core::apps::ServerApp;
use pingora_core::protocols::ALPN;

#[async_trait]
impl<SV, C> ServerApp for HttpProxy<SV, C>
where
    SV: ProxyHttp + Send + Sync + 'static,
    <SV as ProxyHttp>::CTX: Send + Sync,
    C: custom::Connector,
{
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let _served = Served::open(&self.inner);
        let options = self.server_options.as_ref();
        let h2c = options.is_some_and(|o| o.h2c) && stream.get_ssl_digest().is_none();
        let custom = options.is_some_and(|o| o.force_custom);
        let alpn_not_h1 = matches!(
            stream.selected_alpn_proto(),
            Some(ALPN::H2 | ALPN::Custom(_))
        );
        if h2c || custom || alpn_not_h1 {
            let connection = Arc::new(Connection(self.clone()));
            return ServerApp::process_new(&connection, stream, shutdown).await;
        }
        // As Pingora does for HTTP/1, without the box per request.
        let mut session = HttpSession::new_http1(stream);
        if *shutdown.borrow() {
            // stop downstream from reusing if this service is shutting down soon
            session.set_keepalive(None);
        } else {
            // default 60s
            session.set_keepalive(Some(60));
        }
        session.set_keepalive_reuses_remaining(options.and_then(|o| o.keepalive_request_limit));
        let mut result = self.serve_http(session, shutdown).await;
        while let Some((stream, persistent_settings)) = result.map(|r| r.consume()) {
            let mut session = HttpSession::new_http1(stream);
            if let Some(persistent_settings) = persistent_settings {
                persistent_settings.apply_to_session(&mut session);
            }
            result = self.serve_http(session, shutdown).await;
        }
        None
    }

    async fn cleanup(&self) {
        self.http_cleanup().await;
    }
}

/// Tells the proxy a connection is being served, and that it is done when
/// dropped (however `process_new` ends).
struct Served<'a, SV: ProxyHttp>(&'a SV);

impl<'a, SV: ProxyHttp> Served<'a, SV> {
    fn open(proxy: &'a SV) -> Self {
        proxy.connection_opened();
        Self(proxy)
    }
}

impl<SV: ProxyHttp> Drop for Served<'_, SV> {
    fn drop(&mut self) {
        self.0.connection_closed();
    }
}

/// One HTTP/2, h2c or custom-protocol connection, served by Pingora's own
/// `ServerApp` for an `HttpServerApp` (its h2c preface check, HTTP/2
/// handshake and stream accept loop are Pingora's, not copied here).
pub(crate) struct Connection<SV, C: custom::Connector>(Arc<HttpProxy<SV, C>>);

#[async_trait]
impl<SV, C> HttpServerApp for Connection<SV, C>
where
    SV: ProxyHttp + Send + Sync + 'static,
    <SV as ProxyHttp>::CTX: Send + Sync,
    C: custom::Connector,
{
    async fn process_new_http(
        self: &Arc<Self>,
        session: HttpSession,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        self.0.serve_http(session, shutdown).await
    }

    fn server_options(&self) -> Option<&HttpServerOptions> {
        self.0.server_options.as_ref()
    }

    fn h2_options(&self) -> Option<H2Options> {
        self.0.h2_options.clone()
    }

    async fn process_custom_session(
        self: Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        self.0.clone().custom_session(stream, shutdown).await
    }
}
