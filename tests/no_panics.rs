//! Bad input of every kind gets an answer, never a panic: property tests
//! that feed arbitrary text to every parser a user or the network reaches.

use proptest::prelude::*;

use tollgate::config::Config;
use tollgate::gate::parse_amount;
use tollgate::keys;
use tollgate::path::normalise;

/// YAML-ish text: the config's own words, punctuation and numbers.
fn yamlish() -> impl Strategy<Value = String> {
    let token = prop_oneof![
        Just("tiers:".to_string()),
        Just("routes:".to_string()),
        Just("upstreams:".to_string()),
        Just("listen:".to_string()),
        Just("  free:".to_string()),
        Just("    credits: ".to_string()),
        Just("limit: ".to_string()),
        Just("window: ".to_string()),
        Just("- { name: a, path: /a, upstream: main }".to_string()),
        Just("{".to_string()),
        Just("}".to_string()),
        Just("[".to_string()),
        Just("\n".to_string()),
        Just("  ".to_string()),
        Just("&a ".to_string()),
        Just("*a".to_string()),
        "-?[0-9]{1,25}".prop_map(String::from),
        "[a-z%./:0-9]{0,12}".prop_map(String::from),
    ];
    proptest::collection::vec(token, 0..60).prop_map(|t| t.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn paths_never_panic(raw in ".{0,64}", allow in any::<bool>()) {
        let _ = normalise(&raw, allow);
    }

    #[test]
    fn keys_never_panic(raw in ".{0,80}") {
        let _ = keys::well_formed(&raw);
    }

    #[test]
    fn amounts_never_panic(raw in proptest::collection::vec(any::<u8>(), 0..32)) {
        if let Some(n) = parse_amount(&raw) {
            prop_assert!(n <= i64::MAX as u64);
        }
    }

    #[test]
    fn configs_never_panic(text in yamlish()) {
        let _ = Config::parse(&text);
    }

    #[test]
    fn arbitrary_text_configs_never_panic(text in ".{0,200}") {
        let _ = Config::parse(&text);
    }
}
