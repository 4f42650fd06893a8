//! The HTTP corners a real client hits: HEAD, 405, CORS preflights,
//! pipelined requests, an HTTP/1.0 upstream, answers tollgate makes itself.

use reqwest::Method;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::{json_of, metric, read_answers, Harness};

const EDGES: &str = r#"
tiers:
  free:
    credits: 100
    features: [api]
routes:
  - { name: read, methods: [GET], path: /v1/items, upstream: main, feature: api }
  - { name: write, methods: [POST, PUT], path: /v1/items, upstream: main, feature: api }
  - { name: old, path: /old/*, upstream: dead, feature: api }
  - { name: public, path: /public, upstream: main, auth: none }
"#;

async fn remaining(h: &Harness, key: &str) -> Value {
    h.usage(key).await["usage"]["credits"]["remaining"].clone()
}

/// `HEAD` goes wherever `GET` goes and is charged like it.
#[tokio::test]
async fn head_goes_where_get_goes_and_is_charged() {
    let h = Harness::start(EDGES).await;
    let (key, _) = h.create_key("free").await;
    let resp = h.keyed(Method::HEAD, "/v1/items", &key).send().await.expect("head");
    assert_eq!(resp.status(), 200);
    assert_eq!(remaining(&h, &key).await, 99);
    assert_eq!(h.upstream.seen().len(), 1);
}

/// A path routes have, with a method none takes: 405 with `Allow`.
#[tokio::test]
async fn a_known_path_with_another_method_is_405_with_allow() {
    let h = Harness::start(EDGES).await;
    let (key, _) = h.create_key("free").await;
    let resp = h.keyed(Method::DELETE, "/v1/items", &key).send().await.expect("delete");
    assert_eq!(
        resp.headers().get("allow").and_then(|v| v.to_str().ok()),
        Some("GET, HEAD, POST, PUT")
    );
    let body = json_of(resp, 405).await;
    assert_eq!(body["code"], "METHOD_NOT_ALLOWED");
    assert!(body["message"].as_str().is_some_and(|m| m.contains("GET, HEAD, POST, PUT")));
    // Refused before the key is read: nothing charged, nothing forwarded.
    assert_eq!(remaining(&h, &key).await, 100);
    assert!(h.upstream.seen().is_empty());
    // A path nobody has is still 404.
    let body = json_of(h.get("/v2/nothing", &key).await, 404).await;
    assert_eq!(body["code"], "ROUTE_NOT_FOUND");
}

/// A CORS preflight is routed as the method it announces and reaches the
/// upstream without a key, uncharged.
#[tokio::test]
async fn a_cors_preflight_reaches_the_upstream_uncharged() {
    let h = Harness::start(EDGES).await;
    let (key, _) = h.create_key("free").await;
    let preflight = |announced: &str| {
        h.client
            .request(Method::OPTIONS, h.url("/v1/items"))
            .header("origin", "https://app.example.com")
            .header("access-control-request-method", announced)
            .header("access-control-request-headers", "authorization")
    };
    let echoed = json_of(preflight("POST").send().await.expect("preflight"), 200).await;
    assert_eq!(echoed["method"], "OPTIONS");
    assert_eq!(echoed["headers"]["origin"], "https://app.example.com");
    // Sent with a key anyway: still uncharged, and the key is not passed on.
    let echoed = json_of(
        preflight("GET")
            .bearer_auth(&key)
            .send()
            .await
            .expect("preflight"),
        200,
    )
    .await;
    assert!(echoed["headers"].get("authorization").is_none(), "{echoed}");
    assert_eq!(remaining(&h, &key).await, 100);
    // A method no route takes is refused as that method would be.
    let resp = preflight("DELETE").send().await.expect("preflight");
    assert_eq!(resp.status(), 405);
    // A plain OPTIONS (no Origin) is an ordinary request: no route takes it.
    let resp = h
        .client
        .request(Method::OPTIONS, h.url("/v1/items"))
        .send()
        .await
        .expect("options");
    assert_eq!(resp.status(), 405);
    assert_eq!(h.upstream.seen().len(), 2);
}

/// Five requests in one write are all answered, in order, and each charged.
#[tokio::test]
async fn pipelined_requests_are_all_answered_in_order() {
    let h = Harness::start(EDGES).await;
    let (key, _) = h.create_key("free").await;
    let mut stream = connect(&h).await;
    let mut batch = String::new();
    for i in 0..5 {
        batch.push_str(&format!(
            "GET /v1/items?n={i} HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {key}\r\n\r\n"
        ));
    }
    stream.write_all(batch.as_bytes()).await.expect("write");
    let answers = read_answers(&mut stream, 5).await;
    let targets: Vec<String> = answers
        .iter()
        .map(|(status, body)| {
            assert_eq!(*status, 200, "{body}");
            let v: Value = serde_json::from_str(body).expect("json");
            v["target"].as_str().unwrap_or_default().to_string()
        })
        .collect();
    assert_eq!(
        targets,
        (0..5).map(|i| format!("/v1/items?n={i}")).collect::<Vec<_>>()
    );
    assert_eq!(remaining(&h, &key).await, 95);
}

/// An upstream that speaks HTTP/1.0: the client still gets HTTP/1.1 and a
/// connection it can keep using.
#[tokio::test]
async fn an_http_1_0_upstream_does_not_leak_its_version() {
    let addr = raw_upstream(|_| {
        b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"
    })
    .await;
    let h = Harness::start_beside(EDGES, addr).await;
    let (key, _) = h.create_key("free").await;
    let mut stream = connect(&h).await;
    for round in 0..3 {
        let request =
            format!("GET /old/x HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {key}\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("write");
        let head = read_head(&mut stream).await.to_lowercase();
        assert!(head.starts_with("http/1.1 200"), "round {round}: {head}");
        assert!(!head.contains("connection: close"), "round {round}: {head}");
        let mut body = [0u8; 2];
        stream.read_exact(&mut body).await.expect("body");
        assert_eq!(&body, b"ok");
    }
    assert_eq!(remaining(&h, &key).await, 97);
}

/// An upstream on a raw socket that answers the first request head of
/// each connection with what `answer` makes of it. Returns its address.
async fn raw_upstream(
    answer: impl Fn(&[u8]) -> &'static [u8] + Send + Sync + 'static,
) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let answer = std::sync::Arc::new(answer);
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let answer = answer.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = conn.write_all(answer(&got)).await;
            });
        }
    });
    addr
}

/// A fresh connection to the gateway's proxy listener.
async fn connect(h: &Harness) -> tokio::net::TcpStream {
    tokio::net::TcpStream::connect(h.gateway.proxy_addr)
        .await
        .expect("connect")
}

/// An answer's head, read a byte at a time (so nothing after it is taken).
async fn read_head(stream: &mut tokio::net::TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = stream.read(&mut byte).await.expect("read");
        assert_eq!(n, 1, "the connection closed in the head: {head:?}");
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// An HTTP/1.1 upstream on a raw socket: each connection answers requests
/// with `ok` until the client closes it or, when `close_after` is set, just
/// after its first answer (an upstream whose idle timeout is zero, saying
/// nothing of it). Returns its address and the connections it accepted.
async fn counting_upstream(
    close_after: bool,
) -> (std::net::SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepted = std::sync::Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut got = Vec::new();
                while next_head(&mut conn, &mut got).await.is_some() {
                    let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                    if conn.write_all(answer).await.is_err() || close_after {
                        return;
                    }
                }
            });
        }
    });
    (addr, accepted)
}

/// The next request head on `conn` (bytes read past it stay in `got`
/// for the next), or `None` once the client closes the connection.
async fn next_head(conn: &mut tokio::net::TcpStream, got: &mut Vec<u8>) -> Option<String> {
    let mut buf = [0u8; 8192];
    loop {
        if let Some(at) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..at + 4]).into_owned();
            got.drain(..at + 4);
            return Some(head);
        }
        match conn.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// A gateway in front of the upstream at `addr`, and a key that has made
/// five requests through it one after another, each answered `ok`.
async fn five_requests_through(addr: std::net::SocketAddr) -> (Harness, String) {
    let h = Harness::start_beside_on_one_thread(EDGES, addr).await;
    let (key, _) = h.create_key("free").await;
    for round in 0..5 {
        let resp = h.get("/old/x", &key).await;
        assert_eq!(resp.status(), 200, "round {round}");
        assert_eq!(resp.text().await.expect("body"), "ok");
    }
    (h, key)
}

/// Requests one after another reuse the upstream connection.
#[tokio::test]
async fn upstream_connections_are_kept_and_reused() {
    let (addr, accepted) = counting_upstream(false).await;
    let (h, key) = five_requests_through(addr).await;
    // Idle connections are kept per worker thread, and this gateway has
    // one (with two, a request's task moved from one thread to the other
    // by work stealing can leave its connection in the other's list, so
    // the count was not certain).
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(remaining(&h, &key).await, 95);
}

/// An upstream that closes every connection once it has answered, without
/// saying so: a kept connection found closed is dropped and another made,
/// and no request fails or goes uncharged for it.
#[tokio::test]
async fn an_upstream_closing_idle_connections_fails_no_request() {
    let (addr, accepted) = counting_upstream(true).await;
    let (h, key) = five_requests_through(addr).await;
    assert!(accepted.load(std::sync::atomic::Ordering::SeqCst) >= 5);
    assert_eq!(remaining(&h, &key).await, 95);
}

/// An HTTP/1.0 client never gets chunked encoding: a streamed answer
/// reaches it whole, ended by the connection closing.
#[tokio::test]
async fn an_http_1_0_client_gets_no_chunked_encoding() {
    let h = Harness::start(EDGES).await;
    let mut stream = connect(&h).await;
    stream
        .write_all(b"GET /public HTTP/1.0\r\nHost: test\r\nX-Test-Stream: 1\r\n\r\n")
        .await
        .expect("write");
    // The first event arrives before the upstream is told to send the second.
    let mut got = Vec::new();
    let mut chunk = [0u8; 1024];
    while !String::from_utf8_lossy(&got).contains("data: one") {
        let n = stream.read(&mut chunk).await.expect("read");
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&chunk[..n]);
    }
    h.upstream.release();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        stream.read_to_end(&mut got),
    )
    .await
    .expect("the connection ends")
    .expect("read");
    let text = String::from_utf8_lossy(&got).to_lowercase();
    let (head, body) = text.split_once("\r\n\r\n").expect("a head");
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(!head.contains("transfer-encoding"), "{head}");
    assert_eq!(body, "data: one\n\ndata: two\n\n");
}

/// Sends `request` raw on a fresh connection; the answer's head (lower
/// case) and body.
async fn raw_answer(h: &Harness, request: &[u8]) -> (String, String) {
    let mut stream = connect(h).await;
    stream.write_all(request).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        stream.read_to_end(&mut out),
    )
    .await
    .expect("the gateway answers and closes");
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (head.to_lowercase(), body.to_string())
}

/// `head` (a request line and headers) with `n` more headers, ended.
fn with_headers(head: &str, n: usize) -> String {
    let mut request = head.to_string();
    for i in 0..n {
        request.push_str(&format!("x-h-{i}: v\r\n"));
    }
    request + "\r\n"
}

/// Requests past tollgate's caps, and CONNECT, get the §3 JSON, with no
/// framework banner.
#[tokio::test]
async fn requests_past_the_caps_get_json() {
    let h = Harness::start(EDGES).await;
    let long = format!(
        "GET /public?q={} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n",
        "a".repeat(10_000)
    );
    let many = with_headers("GET /public HTTP/1.1\r\nHost: test\r\nConnection: close\r\n", 150);
    let big = format!(
        "GET /public HTTP/1.1\r\nHost: test\r\nConnection: close\r\nx-big: {}\r\n\r\n",
        "b".repeat(40_000)
    );
    for (request, status, words) in [
        (long, "400", "request target"),
        (many, "400", "request headers"),
        (big, "400", "bytes of request headers"),
        (
            "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n".to_string(),
            "405",
            "does not take this method",
        ),
    ] {
        let (head, body) = raw_answer(&h, request.as_bytes()).await;
        assert!(head.starts_with(&format!("http/1.1 {status}")), "{head}");
        assert!(!head.contains("server: pingora"), "{head}");
        let body: Value = serde_json::from_str(&body).unwrap_or_else(|_| panic!("not JSON: {body}"));
        assert!(
            body["message"].as_str().is_some_and(|m| m.contains(words)),
            "{body}"
        );
    }
    assert!(h.upstream.seen().is_empty());
}

/// Requests Pingora itself cannot parse (past its own limits, or not
/// HTTP/1.x at all) get the same JSON, naming what was wrong without
/// quoting the request, and are counted.
#[tokio::test]
async fn requests_pingora_cannot_parse_get_json() {
    let h = Harness::start(EDGES).await;
    let secret = "tg_not_to_be_echoed";
    let huge_target = format!(
        "GET /public?q={}&k={secret} HTTP/1.1\r\nHost: test\r\n\r\n",
        "a".repeat(100_000)
    );
    let too_many = with_headers("GET /public HTTP/1.1\r\nHost: test\r\n", 300);
    let huge_header = format!(
        "GET /public HTTP/1.1\r\nHost: test\r\nx-big: {}\r\n\r\n",
        "b".repeat(1_100_000)
    );
    for (request, words) in [
        (format!("GET /public?k={secret}\r\n\r\n"), "request line"),
        (format!("GET /public HTTP/2.7\r\nx-k: {secret}\r\n\r\n"), "request line"),
        (huge_target, "request target"),
        (too_many, "more than 256 request headers"),
        (huge_header, "over 1 MiB"),
        (format!("GET /public HTTP/1.1\r\nbad header: {secret}\r\n\r\n"), "malformed"),
    ] {
        let (head, body) = raw_answer(&h, request.as_bytes()).await;
        assert!(head.starts_with("http/1.1 400"), "{head}");
        assert!(head.contains("content-type: application/json"), "{head}");
        assert!(!head.contains("server:"), "{head}");
        assert!(!body.contains(secret), "{body}");
        let body: Value = serde_json::from_str(&body).unwrap_or_else(|_| panic!("not JSON: {body}"));
        assert_eq!(body["code"], "BAD_REQUEST", "{body}");
        assert!(
            body["message"].as_str().is_some_and(|m| m.contains(words)),
            "{words}: {body}"
        );
    }
    assert!(h.upstream.seen().is_empty());
    // Counted before the answer is written.
    let labels = [("route", "none"), ("code", "BAD_REQUEST")];
    assert_eq!(metric(&h.scrape().await, "tollgate_requests_total", &labels), 6.0);
}

/// Hop-by-hop fields, and those the client's `Connection` names, stop at
/// the gateway; the rest of the request goes on. (The sanitiser skips its
/// work for a request that has none of these fields: this is the case
/// where it must not.)
#[tokio::test]
async fn hop_by_hop_fields_are_not_forwarded() {
    let h = Harness::start(EDGES).await;
    let (head, body) = raw_answer(
        &h,
        b"GET /public HTTP/1.1\r\nHost: t\r\nConnection: close, X-Nominated\r\n\
          X-Nominated: gone\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\n\
          TE: trailers\r\nProxy-Authorization: Basic eA==\r\nX-Kept: yes\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    let seen: Value = serde_json::from_str(&body).expect("the echo's JSON");
    let headers = &seen["headers"];
    assert_eq!(headers["x-kept"], "yes", "{headers}");
    for gone in [
        "x-nominated",
        "keep-alive",
        "proxy-connection",
        "te",
        "proxy-authorization",
    ] {
        assert!(headers.get(gone).is_none(), "{gone} reached the upstream: {headers}");
    }
}

/// Header names go on in the spelling they came in, both ways, each value
/// of a repeated name in its own; the ones tollgate adds in lower case.
/// An upstream's own fields under the names of tollgate's (a rate-limited
/// API behind it) are replaced by tollgate's, once each; its others pass.
#[tokio::test]
async fn tollgate_fields_replace_the_upstreams_of_the_same_names() {
    let addr = raw_upstream(|_| {
        b"HTTP/1.1 200 OK\r\nRateLimit-Limit: 7\r\nx-usage-remaining: 123\r\n\
          RateLimit-Policy: \"theirs\";q=7\r\nRateLimit: \"theirs\";r=6;t=1\r\n\
          ratelimit-limit: 8\r\nX-Other: kept\r\nContent-Length: 2\r\n\r\nok"
    })
    .await;
    let h = Harness::start_beside(
        &EDGES.replace(
            "    credits: 100\n",
            "    credits: 100\n    rate_limits:\n      requests: { limit: 50, window: 60s }\n",
        ),
        addr,
    )
    .await;
    let (key, _) = h.create_key("free").await;
    let mut stream = connect(&h).await;
    let request = format!("GET /old/x HTTP/1.1\r\nhost: test\r\nAuthorization: Bearer {key}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    let head = read_head(&mut stream).await.to_lowercase();
    for (name, value) in [
        ("x-usage-remaining", "99"),
        ("ratelimit-limit", "50"),
        ("ratelimit-remaining", "49"),
        ("ratelimit-policy", "\"requests\";q=50;w=60"),
        ("x-other", "kept"),
    ] {
        let lines: Vec<_> = head
            .lines()
            .filter(|l| l.split(':').next() == Some(name))
            .collect();
        assert_eq!(lines, [format!("{name}: {value}")], "in:\n{head}");
    }
    let state: Vec<_> = head.lines().filter(|l| l.starts_with("ratelimit:")).collect();
    assert_eq!(state.len(), 1, "{head}");
    assert!(state[0].starts_with("ratelimit: \"requests\";r=49;t="), "{head}");
}

#[tokio::test]
async fn header_names_keep_their_spelling_both_ways() {
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let addr = raw_upstream(move |head| {
        let _ = seen_tx.send(String::from_utf8_lossy(head).into_owned());
        b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nX-Mixed: 1\r\n\
          x-mixed: 2\r\nX-MIXED: 3\r\nX-Upper: b\r\nContent-Length: 2\r\n\r\nok"
    })
    .await;
    let h = Harness::start_beside(EDGES, addr).await;
    let (key, _) = h.create_key("free").await;
    let mut stream = connect(&h).await;
    let request = format!(
        "GET /old/x HTTP/1.1\r\nhost: test\r\nAuthorization: Bearer {key}\r\nx-seq: 1\r\n\
         X-Seq: 2\r\nUser-Agent: t\r\nACCEPT: */*\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let head = read_head(&mut stream).await;
    for line in [
        "content-type: text/plain\r\n",
        "X-Mixed: 1\r\nx-mixed: 2\r\nX-MIXED: 3\r\n",
        "X-Upper: b\r\n",
        "x-usage-remaining: 99\r\n",
    ] {
        assert!(head.contains(line), "{line:?} not in the answer:\n{head}");
    }
    let seen = seen_rx.recv().await.expect("the upstream saw the request");
    for line in ["host: test\r\n", "x-seq: 1\r\nX-Seq: 2\r\n", "User-Agent: t\r\n", "ACCEPT: */*\r\n"] {
        assert!(seen.contains(line), "{line:?} not in the request:\n{seen}");
    }
    assert!(!seen.to_lowercase().contains("authorization"), "{seen}");
}

/// An HTTP/1.1 upstream on a raw socket for the read timeout's tests:
/// each request is answered `ok`, after `x-delay-ms` milliseconds if it
/// says so; one with `x-stall: 1` gets its head and two bytes of a
/// ten-byte body, and then nothing. Returns its address and, for each
/// request in the order they came, the number of the connection it came on.
async fn timing_upstream() -> (std::net::SocketAddr, std::sync::Arc<parking_lot::Mutex<Vec<usize>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen = std::sync::Arc::new(parking_lot::Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        let mut connections = 0;
        while let Ok((mut conn, _)) = listener.accept().await {
            let (log, number) = (log.clone(), connections);
            connections += 1;
            tokio::spawn(async move {
                let mut got = Vec::new();
                while let Some(head) = next_head(&mut conn, &mut got).await {
                    let head = head.to_lowercase();
                    log.lock().push(number);
                    let field = |name: &str| {
                        head.lines()
                            .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
                    };
                    if field("x-stall:").is_some() {
                        let _ = conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nok").await;
                        std::future::pending::<()>().await;
                    }
                    if let Some(ms) = field("x-delay-ms:").and_then(|v| v.parse().ok()) {
                        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
                    }
                    let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                    if conn.write_all(answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, seen)
}

/// A gateway with one worker thread (so requests one after another share
/// an upstream connection) in front of [`timing_upstream`] as two
/// upstreams: `patient` with the default read timeout (30 s), `hasty` with
/// one second. Pingora keeps their connections together: they differ only
/// in timeouts.
async fn timed_gateway() -> (Harness, std::sync::Arc<parking_lot::Mutex<Vec<usize>>>) {
    let (addr, seen) = timing_upstream().await;
    let text = format!(
        r#"
listen: {{ proxy: "127.0.0.1:0", admin: "127.0.0.1:0", metrics: "127.0.0.1:0" }}
store: {{ path: "{{store}}" }}
upstreams:
  patient: {{ url: "http://{addr}" }}
  hasty: {{ url: "http://{addr}", read_timeout: 1s }}
tiers:
  free:
    credits: 100
routes:
  - {{ name: patient, path: /patient, upstream: patient, auth: none }}
  - {{ name: hasty, path: /hasty, upstream: hasty, auth: none }}
"#
    );
    (Harness::start_text_on_one_thread(&text).await, seen)
}

async fn get_with(h: &Harness, path: &str, field: (&str, &str)) -> reqwest::Response {
    h.client
        .get(h.url(path))
        .header(field.0, field.1)
        .send()
        .await
        .expect("proxy answers")
}

/// A kept upstream connection's reads wait as long as the request now on
/// it may: a 30 s request before does not lend its timeout to a 1 s one.
#[tokio::test]
async fn a_kept_connection_times_each_request_by_its_own_timeout() {
    let (h, seen) = timed_gateway().await;
    assert_eq!(get_with(&h, "/patient", ("x-delay-ms", "0")).await.status(), 200);
    let body = json_of(get_with(&h, "/hasty", ("x-delay-ms", "5000")).await, 502).await;
    assert_eq!(body["code"], "UPSTREAM_UNAVAILABLE");
    // Both on the one connection: the second found it kept.
    assert_eq!(*seen.lock(), [0, 0]);
}

/// The timeout is each read's, not the connection's or the requests'
/// together: three answers of 0.6 s each pass a one-second timeout on one
/// kept connection.
#[tokio::test]
async fn reads_are_timed_one_at_a_time() {
    let (h, seen) = timed_gateway().await;
    for round in 0..3 {
        let resp = get_with(&h, "/hasty", ("x-delay-ms", "600")).await;
        assert_eq!(resp.status(), 200, "round {round}");
        assert_eq!(resp.text().await.expect("body"), "ok");
    }
    assert_eq!(*seen.lock(), [0, 0, 0]);
}

/// An answer whose body stops coming is cut off at the read timeout: the
/// client's read of the body ends in an error instead of waiting for ever.
#[tokio::test]
async fn a_body_that_stops_coming_is_cut_off_at_the_read_timeout() {
    let (h, _) = timed_gateway().await;
    let resp = get_with(&h, "/hasty", ("x-stall", "1")).await;
    assert_eq!(resp.status(), 200);
    let body = tokio::time::timeout(std::time::Duration::from_secs(20), resp.bytes())
        .await
        .expect("the body ends well before the upstream's 30 s default");
    assert!(body.is_err(), "a body cut short reads as whole: {body:?}");
}
