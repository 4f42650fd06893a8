//! HTTPS upstreams: certificates are verified. The real binary runs with a
//! test CA as its trust store (`SSL_CERT_FILE`, which the system trust
//! loader honours), in front of two TLS upstreams: one whose certificate
//! that CA signed, and one with a self-signed certificate.

use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
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
