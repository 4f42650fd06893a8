//! The path normaliser and the route matcher: any request target is
//! refused or normalised to a canonical path (normalising it again changes
//! nothing), and the route table finds what a scan of the routes in order
//! finds.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use tollgate::config::Config;
use tollgate::path::normalise;

static CONFIG: LazyLock<Config> = LazyLock::new(|| {
    Config::parse(
        r#"
upstreams:
  main: { url: "http://127.0.0.1:3000" }
tiers:
  free: { credits: 10, features: [api] }
routes:
  - { name: a, methods: [GET], path: /api/data, upstream: main }
  - { name: b, methods: [POST], path: /api/data, upstream: main }
  - { name: c, path: /api/ai/*, upstream: main }
  - { name: d, path: /api/admin, upstream: main }
  - { name: e, path: /files/*, upstream: main, allow_encoded_slashes: true }
  - { name: f, path: /api/*, upstream: main }
  - { name: g, path: /, upstream: main }
"#,
    )
    .expect("the fuzz config is valid")
    .config
});

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let raw = String::from_utf8_lossy(rest);
    let Ok(path) = normalise(&raw, flags & 1 == 1) else {
        return;
    };
    assert!(path.starts_with('/'), "{path:?}");
    let again = normalise(&path, flags & 1 == 1).expect("a canonical path stays valid");
    assert_eq!(again, path);
    let config = &*CONFIG;
    for method in [http::Method::GET, http::Method::POST, http::Method::HEAD] {
        let found = config.route_index(&method, &path);
        let scan = config.routes.iter().position(|r| r.matches(&method, &path));
        assert_eq!(found, scan, "{method} {path:?}");
    }
});
