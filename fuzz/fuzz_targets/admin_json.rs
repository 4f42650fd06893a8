//! The admin API's JSON bodies and list query: a value or a clear error,
//! never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tollgate::admin::parse_every_body(data);
});
