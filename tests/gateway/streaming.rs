//! Bodies stream both ways: a large upload arrives whole and intact, and an
//! event stream arrives piece by piece.

use std::time::Duration;

use bytes::Bytes;
use reqwest::Method;
use sha2::{Digest, Sha256};

use crate::common::{json_of, Harness};
use crate::PLANS;

const MIB: usize = 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_50_mib_upload_streams_through_intact() {
    let h = Harness::start(PLANS).await;
    let (key, _) = h.create_key("free").await;
    // 50 chunks of 1 MiB, each a different byte, sent chunked.
    let chunks: Vec<Bytes> = (0..50u8).map(|i| Bytes::from(vec![i; MIB])).collect();
    let mut hasher = Sha256::new();
    for c in &chunks {
        hasher.update(c);
    }
    let expected = format!("{:x}", hasher.finalize());
    let body = reqwest::Body::wrap_stream(futures::stream::iter(
        chunks.into_iter().map(Ok::<_, std::io::Error>),
    ));
    let resp = h
        .keyed(Method::POST, "/api/upload", &key)
        .body(body)
        .send()
        .await
        .expect("send");
    let seen = json_of(resp, 200).await;
    assert_eq!(seen["body_len"], 50 * MIB);
    assert_eq!(seen["body_sha256"], expected.as_str());
}

#[tokio::test]
async fn server_sent_events_arrive_piece_by_piece() {
    let h = Harness::start(PLANS).await;
    let (key, _) = h.create_key("free").await;
    let mut resp = h
        .keyed(Method::GET, "/api/events", &key)
        .header("x-test-stream", "1")
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    // The upstream holds its second event until we have seen the first: a
    // gateway that buffered the response would never deliver it. The
    // timeout only turns such a hang into a failure.
    let first = tokio::time::timeout(Duration::from_secs(20), resp.chunk())
        .await
        .expect("the first event arrived before the stream ended")
        .expect("read")
        .expect("a chunk");
    assert_eq!(first, Bytes::from_static(b"data: one\n\n"));
    h.upstream.release();
    let mut rest = Vec::new();
    while let Some(chunk) = resp.chunk().await.expect("read") {
        rest.extend_from_slice(&chunk);
    }
    assert_eq!(rest, b"data: two\n\n");
}
