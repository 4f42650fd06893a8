//! HTTPS upstreams: certificates are verified. The real binary runs with a
//! test CA as its trust store (`SSL_CERT_FILE`, which the system trust
//! loader honours), in front of two TLS upstreams: one whose certificate
//! that CA signed, and one with a self-signed certificate.

use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::rustls::{self, ServerConfig};

use crate::common::Binary;

/// A TLS server for `localhost` that answers every request `200 tls-ok`.
async fn tls_upstream(
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
) -> std::net::SocketAddr {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocols")
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .expect("server cert");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let _ = tls
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\nconnection: close\r\n\r\ntls-ok",
                    )
                    .await;
                let _ = tls.shutdown().await;
            });
        }
    });
    addr
}

fn pkcs8(key: &KeyPair) -> PrivateKeyDer<'static> {
    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_upstreams_are_verified() {
    let ca_key = KeyPair::generate().expect("ca key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).expect("ca cert");
    let issuer = Issuer::new(ca_params, &ca_key);
    let leaf_key = KeyPair::generate().expect("leaf key");
    let leaf = CertificateParams::new(vec!["localhost".to_string()])
        .expect("leaf params")
        .signed_by(&leaf_key, &issuer)
        .expect("leaf cert");
    let stranger_key = KeyPair::generate().expect("stranger key");
    let stranger = CertificateParams::new(vec!["localhost".to_string()])
        .expect("params")
        .self_signed(&stranger_key)
        .expect("self-signed");

    let trusted = tls_upstream(leaf.der().clone(), pkcs8(&leaf_key)).await;
    let untrusted = tls_upstream(stranger.der().clone(), pkcs8(&stranger_key)).await;

    let dir = tempfile::tempdir().expect("tempdir");
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca_cert.pem()).expect("write ca");
    let config = dir.path().join("tollgate.yaml");
    std::fs::write(
        &config,
        format!(
            r#"
listen: {{ proxy: "127.0.0.1:0", admin: "127.0.0.1:0", metrics: "127.0.0.1:0" }}
store: {{ path: "{store}" }}
upstreams:
  good: {{ url: "https://localhost:{good}" }}
  bad: {{ url: "https://localhost:{bad}" }}
tiers:
  free: {{ credits: 1 }}
routes:
  - {{ name: good, path: /good, upstream: good, auth: none }}
  - {{ name: bad, path: /bad, upstream: bad, auth: none }}
"#,
            store = dir.path().join("store").display(),
            good = trusted.port(),
            bad = untrusted.port(),
        ),
    )
    .expect("write config");

    let gateway = Binary::serve(&config, &[("SSL_CERT_FILE", ca_file.as_os_str())]).await;
    let proxy = &gateway.proxy;

    // A connection per request: this upstream closes after each answer, and
    // that is not what this test is about.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .expect("client");
    let good = client
        .get(format!("http://{proxy}/good"))
        .send()
        .await
        .expect("send");
    assert_eq!(good.status(), 200);
    assert_eq!(good.text().await.expect("body"), "tls-ok");
    let bad = client
        .get(format!("http://{proxy}/bad"))
        .send()
        .await
        .expect("send");
    assert_eq!(bad.status(), 502);
    let body: serde_json::Value = bad.json().await.expect("json");
    assert_eq!(body["code"], "UPSTREAM_UNAVAILABLE");
}

/// A CA and a `localhost` / 127.0.0.1 certificate it signed, as PEM.
struct TestPki {
    ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl TestPki {
    fn new() -> TestPki {
        let ca_key = KeyPair::generate().expect("ca key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).expect("ca cert");
        TestPki {
            ca_pem: ca_cert.pem(),
            issuer: Issuer::new(ca_params, ca_key),
        }
    }

    /// A leaf for localhost; its PEM chain, its key's PEM and its DER.
    fn leaf(&self, name: &str) -> (String, String, Vec<u8>) {
        let key = KeyPair::generate().expect("leaf key");
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .expect("leaf params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let cert = params.signed_by(&key, &self.issuer).expect("leaf cert");
        (cert.pem(), key.serialize_pem(), cert.der().to_vec())
    }
}

/// The certificate a fresh TLS handshake with `addr` is shown, and the
/// connection (for later use).
async fn handshake(
    addr: std::net::SocketAddr,
    ca_pem: &str,
) -> (Vec<u8>, tokio_rustls::client::TlsStream<tokio::net::TcpStream>) {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.expect("ca pem")).expect("root");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocols")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let tls = connector.connect(name, tcp).await.expect("handshake");
    let shown = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .expect("a certificate")
        .to_vec();
    (shown, tls)
}

/// Sends a keyed GET on an open HTTP/1.1 connection; the status.
async fn get_on(
    tls: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    key: &str,
) -> u16 {
    let request = format!("GET /api/data HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {key}\r\n\r\n");
    tls.write_all(request.as_bytes()).await.expect("write");
    let answers = crate::common::read_answers(tls, 1).await;
    answers.first().expect("an answer before the connection closed").0
}

/// `listen.proxy_tls`: the proxy over HTTPS, HTTP/2 by ALPN and HTTP/1.1,
/// charged like plain HTTP; a renewed certificate is served to new
/// connections without dropping the open ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_serves_https_and_h2_and_reloads_its_certificate() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert_path, key_path) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    let (cert_pem, key_pem, first_der) = pki.leaf("first");
    std::fs::write(&cert_path, &cert_pem).expect("cert");
    std::fs::write(&key_path, &key_pem).expect("key");
    let listen = format!(
        "  proxy_tls: {{ addr: \"127.0.0.1:0\", cert: \"{}\", key: \"{}\" }}\n",
        cert_path.display(),
        key_path.display()
    );
    let h = crate::common::Harness::start_listening(crate::PLANS, &listen).await;
    let addr = h.gateway.tls_addr.expect("a TLS listener");
    let (key, _) = h.create_key("free").await;

    let client = |http2: bool| {
        let builder = reqwest::Client::builder()
            .add_root_certificate(
                reqwest::Certificate::from_pem(pki.ca_pem.as_bytes()).expect("ca"),
            )
            .resolve("localhost", addr);
        if http2 { builder } else { builder.http1_only() }
            .build()
            .expect("client")
    };
    let url = format!("https://localhost:{}/api/data", addr.port());
    for ((http2, version), left) in [
        ((true, reqwest::Version::HTTP_2), "4"),
        ((false, reqwest::Version::HTTP_11), "3"),
    ] {
        let resp = client(http2)
            .get(&url)
            .bearer_auth(&key)
            .send()
            .await
            .expect("https");
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.version(), version);
        // tollgate's own fields, which HTTP/1.x and HTTP/2 answers get by
        // different roads (`proxy::add_fields`).
        let field = |name: &str| {
            let values: Vec<_> = resp.headers().get_all(name).iter().collect();
            assert_eq!(values.len(), 1, "{name} on {version:?}: {values:?}");
            values[0].to_str().expect("ascii").to_string()
        };
        assert_eq!(field("x-usage-remaining"), left);
        assert_eq!(field("ratelimit-limit"), "100");
        assert_eq!(field("ratelimit-policy"), "\"requests\";q=100;w=60");
        assert!(field("ratelimit").starts_with("\"requests\";r="));
        // The key was read and removed, as on plain HTTP.
        let echoed: serde_json::Value = resp.json().await.expect("json");
        assert!(echoed["headers"].get("authorization").is_none(), "{echoed}");
    }
    assert_eq!(h.usage(&key).await["usage"]["credits"]["remaining"], 3);

    // An open connection, then a renewal written over the files.
    let (shown, mut open) = handshake(addr, &pki.ca_pem).await;
    assert_eq!(shown, first_der);
    assert_eq!(get_on(&mut open, &key).await, 200);
    let (cert_pem, key_pem, second_der) = pki.leaf("second");
    std::fs::write(&key_path, &key_pem).expect("key");
    std::fs::write(&cert_path, &cert_pem).expect("cert");
    let mut renewed = false;
    for _ in 0..100 {
        if handshake(addr, &pki.ca_pem).await.0 == second_der {
            renewed = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(renewed, "new handshakes never saw the renewed certificate");
    // The connection made before is still served.
    assert_eq!(get_on(&mut open, &key).await, 200);

}
