//! The cost header parser: never a panic, never a value past 2^63-1, and
//! what it accepts reads back as the same number.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate::gate::{parse_amount, MAX_AMOUNT};

fuzz_target!(|data: &[u8]| {
    if let Some(n) = parse_amount(data) {
        assert!(n <= MAX_AMOUNT);
        assert_eq!(parse_amount(n.to_string().as_bytes()), Some(n));
    }
});
