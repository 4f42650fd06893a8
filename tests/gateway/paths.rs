//! Path tricks never reach an upstream path other than the one whose route,
//! feature gate and cost were applied. Requests are sent raw, since HTTP
//! clients clean paths themselves.
//!
//! The config gates `/api/admin` behind feature `ai` (which `free` lacks)
//! and serves the rest of `/api/*` to `free`.

use crate::common::Harness;
use crate::PLANS;

#[tokio::test]
async fn tricks_toward_a_gated_path_hit_its_gate() {
    let h = Harness::start(PLANS).await;
    let (key, _) = h.create_key("free").await;
    for trick in [
        "/api/admin",
        "/api/x/../admin",
        "/api/%2e%2e/api/admin",
        "/api/x/%2E%2E/admin",
        "/api/x/.%2e/admin",
        "/api//admin",
        "//api///admin",
        "/api/./admin",
        "/api/%2e/admin",
        "/api/%61dmin",
        "/api/admin/.",
    ] {
        let (status, body) = h.raw_get(trick, &key).await;
        assert_eq!(status, 403, "{trick}: {body}");
        assert!(body.contains("FEATURE_NOT_AVAILABLE"), "{trick}: {body}");
    }
    assert!(h.upstream.seen().is_empty(), "{:?}", h.upstream.seen());
}

#[tokio::test]
async fn the_forwarded_path_is_the_matched_path() {
    let h = Harness::start(PLANS).await;
    let (key, _) = h.create_key("metered").await;
    let cases = [
        ("/api/x/../admin", "/api/admin"),
        ("/api/%2e%2e/api/admin?q=1", "/api/admin?q=1"),
        ("//api//admin", "/api/admin"),
        ("/api/%61dmin", "/api/admin"),
        ("/api/data/", "/api/data/"),
        ("/api/a%20b", "/api/a%20b"),
    ];
    for (trick, forwarded) in cases {
        let (status, body) = h.raw_get(trick, &key).await;
        assert_eq!(status, 200, "{trick}: {body}");
        let seen: serde_json::Value = serde_json::from_str(&body).expect("upstream json");
        assert_eq!(seen["target"], forwarded, "{trick}");
    }
    let seen: Vec<String> = h.upstream.seen().into_iter().map(|s| s.target).collect();
    let forwarded: Vec<&str> = cases.iter().map(|(_, f)| *f).collect();
    assert_eq!(seen, forwarded, "the upstream saw other paths");
}

#[tokio::test]
async fn slashes_backslashes_and_climbing_are_bad_requests() {
    let h = Harness::start(PLANS).await;
    let (key, _) = h.create_key("metered").await;
    for trick in [
        "/api%2Fadmin",
        "/api/..%2Fadmin",
        "/api/x%2f..%2fadmin",
        "/api%5cadmin",
        "/api\\admin",
        "/api/x\\..\\admin",
        "/..",
        "/api/../../etc/passwd",
        "/%2e%2e/etc/passwd",
        "/api/%zz",
        "/api/%00",
    ] {
        let (status, body) = h.raw_get(trick, &key).await;
        assert_eq!(status, 400, "{trick}: {body}");
        assert!(body.contains("BAD_REQUEST"), "{trick}: {body}");
    }
    assert!(h.upstream.seen().is_empty(), "{:?}", h.upstream.seen());
    assert_eq!(h.usage(&key).await["usage"]["credits"]["remaining"], 1000);
}

#[tokio::test]
async fn encoded_slashes_pass_unchanged_where_the_route_allows() {
    let h = Harness::start(PLANS).await;
    let (key, _) = h.create_key("free").await;
    let (status, body) = h.raw_get("/files/a%2fb/c", &key).await;
    assert_eq!(status, 200, "{body}");
    let seen: serde_json::Value = serde_json::from_str(&body).expect("upstream json");
    assert_eq!(seen["target"], "/files/a%2Fb/c");
}
