//! The config loader: any text is a config or a list of errors, never a
//! panic or a hang.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Err(errors) = tollgate::config::Config::parse(text) {
            assert!(!errors.0.is_empty());
        }
    }
});
