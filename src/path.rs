//! Request path normalisation: the path a route is matched on is the path
//! that is forwarded.
//!
//! Upstreams decode and resolve paths in their own ways, so tollgate forwards
//! one canonical form and matches routes on exactly that form:
//! - percent-encoded unreserved characters (`%61`, `%2e`) are decoded, other
//!   escapes are kept with upper-case hex (RFC 3986 §6.2.2);
//! - `.` and `..` segments are resolved; climbing above the root is an error;
//! - repeated slashes collapse to one;
//! - a raw backslash, a control character, or a malformed escape is an error;
//! - an encoded slash or backslash (`%2F`, `%5C`) is an error unless the
//!   caller allows it, in which case it stays encoded inside its segment.
//!
//! So `/api/%2e%2e/admin`, `/api//admin`, `/api/./admin` and `/api/%61dmin`
//! are all `/admin` or `/api/admin` both for the route table and upstream.

use std::borrow::Cow;
use std::fmt::Write;

/// Why a path was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathError {
    NotAbsolute,
    AboveRoot,
    EncodedSlash,
    Backslash,
    BadEscape,
    ControlCharacter,
}

impl std::fmt::Display for PathError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PathError::NotAbsolute => "the path must start with '/'",
            PathError::AboveRoot => "the path climbs above the root",
            PathError::EncodedSlash => "the path contains an encoded slash or backslash",
            PathError::Backslash => "the path contains a backslash",
            PathError::BadEscape => "the path contains a malformed percent-escape",
            PathError::ControlCharacter => "the path contains a control character",
        })
    }
}

impl std::error::Error for PathError {}

/// Returns the canonical form of `raw` (a path without its query):
/// borrowed when `raw` already is canonical, as nearly every request's is.
pub fn normalise(raw: &str, allow_encoded_slashes: bool) -> Result<Cow<'_, str>, PathError> {
    if already_canonical(raw) {
        return Ok(Cow::Borrowed(raw));
    }
    rebuild(raw, allow_encoded_slashes).map(Cow::Owned)
}

/// A path of printable ASCII without escapes, backslashes, empty or dot
/// segments is its own canonical form. One pass over the bytes (every
/// request's path goes through it).
fn already_canonical(raw: &str) -> bool {
    let Some((b'/', rest)) = raw.as_bytes().split_first() else {
        return false;
    };
    // The segment so far: its length, and how many of its bytes are dots.
    let (mut len, mut dots) = (0usize, 0usize);
    let dot_segment = |len: usize, dots: usize| len > 0 && len == dots && dots <= 2;
    for &b in rest {
        if !(0x21..=0x7e).contains(&b) || b == b'%' || b == b'\\' {
            return false;
        }
        if b == b'/' {
            // An empty segment (`//`), or `.` or `..`, before this slash.
            if len == 0 || dot_segment(len, dots) {
                return false;
            }
            (len, dots) = (0, 0);
        } else {
            len += 1;
            dots += usize::from(b == b'.');
        }
    }
    // The last segment may be empty (a trailing slash), not a dot segment.
    !dot_segment(len, dots)
}

fn rebuild(raw: &str, allow_encoded_slashes: bool) -> Result<String, PathError> {
    if !raw.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    let mut segments: Vec<String> = Vec::new();
    let mut pieces = raw[1..].split('/').peekable();
    // A trailing slash is significant to most upstreams (`/dir/` vs `/dir`).
    let mut trailing_slash = false;
    while let Some(piece) = pieces.next() {
        let last = pieces.peek().is_none();
        let segment = canonical_segment(piece, allow_encoded_slashes)?;
        match segment.as_str() {
            "" => trailing_slash = last,
            "." => trailing_slash = last,
            ".." => {
                if segments.pop().is_none() {
                    return Err(PathError::AboveRoot);
                }
                trailing_slash = last;
            }
            _ => {
                segments.push(segment);
                trailing_slash = false;
            }
        }
    }
    let mut out = String::with_capacity(raw.len());
    for segment in &segments {
        out.push('/');
        out.push_str(segment);
    }
    if trailing_slash || out.is_empty() {
        out.push('/');
    }
    Ok(out)
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex_value(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// Decodes what may be decoded in one segment, keeps the rest escaped.
fn canonical_segment(piece: &str, allow_encoded_slashes: bool) -> Result<String, PathError> {
    let bytes = piece.as_bytes();
    let mut out = String::with_capacity(piece.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'%' => {
                let hi = bytes.get(i + 1).copied().and_then(hex_value);
                let lo = bytes.get(i + 2).copied().and_then(hex_value);
                let (Some(hi), Some(lo)) = (hi, lo) else {
                    return Err(PathError::BadEscape);
                };
                let decoded = hi << 4 | lo;
                if decoded == b'/' || decoded == b'\\' {
                    if !allow_encoded_slashes {
                        return Err(PathError::EncodedSlash);
                    }
                    let _ = write!(out, "%{decoded:02X}");
                } else if decoded < 0x20 || decoded == 0x7f {
                    return Err(PathError::ControlCharacter);
                } else if is_unreserved(decoded) {
                    out.push(decoded as char);
                } else {
                    let _ = write!(out, "%{decoded:02X}");
                }
                i += 3;
            }
            b'\\' => return Err(PathError::Backslash),
            0..=0x1f | 0x7f => return Err(PathError::ControlCharacter),
            0x80..=0xff => {
                let _ = write!(out, "%{b:02X}");
                i += 1;
            }
            _ => {
                out.push(b as char);
                i += 1;
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(p: &str) -> Result<String, PathError> {
        normalise(p, false).map(Cow::into_owned)
    }

    #[test]
    fn plain_paths_are_unchanged() {
        assert_eq!(norm("/"), Ok("/".into()));
        assert_eq!(norm("/api/data"), Ok("/api/data".into()));
        assert_eq!(norm("/api/data/"), Ok("/api/data/".into()));
        assert_eq!(norm("/a%20b"), Ok("/a%20b".into()));
    }

    #[test]
    fn dot_segments_resolve_raw_and_encoded() {
        assert_eq!(norm("/api/../admin"), Ok("/admin".into()));
        assert_eq!(norm("/api/%2e%2e/admin"), Ok("/admin".into()));
        assert_eq!(norm("/api/%2E./admin"), Ok("/admin".into()));
        assert_eq!(norm("/api/./data"), Ok("/api/data".into()));
        assert_eq!(norm("/api/data/.."), Ok("/api/".into()));
        assert_eq!(norm("/api/%2e"), Ok("/api/".into()));
    }

    #[test]
    fn climbing_above_root_is_refused() {
        assert_eq!(norm("/.."), Err(PathError::AboveRoot));
        assert_eq!(norm("/api/../../etc"), Err(PathError::AboveRoot));
        assert_eq!(norm("/%2e%2e/x"), Err(PathError::AboveRoot));
    }

    #[test]
    fn doubled_slashes_collapse() {
        assert_eq!(norm("//api///data"), Ok("/api/data".into()));
    }

    #[test]
    fn encoded_slashes_and_backslashes() {
        assert_eq!(norm("/api%2Fadmin"), Err(PathError::EncodedSlash));
        assert_eq!(norm("/api%5cadmin"), Err(PathError::EncodedSlash));
        assert_eq!(norm("/api\\admin"), Err(PathError::Backslash));
        assert_eq!(normalise("/files/a%2fb", true), Ok("/files/a%2Fb".into()));
    }

    #[test]
    fn unreserved_escapes_decode_others_uppercase() {
        assert_eq!(norm("/api/%61dmin"), Ok("/api/admin".into()));
        assert_eq!(norm("/q%3bx"), Ok("/q%3Bx".into()));
    }

    #[test]
    fn malformed_input_is_refused() {
        assert_eq!(norm("api"), Err(PathError::NotAbsolute));
        assert_eq!(norm("/a%zz"), Err(PathError::BadEscape));
        assert_eq!(norm("/a%2"), Err(PathError::BadEscape));
        assert_eq!(norm("/a%00"), Err(PathError::ControlCharacter));
    }

    proptest::proptest! {
        /// Normalising is idempotent, and never yields a dot segment, an
        /// empty segment, or a decoded slash.
        #[test]
        fn canonical_form_is_a_fixed_point(raw in "/[a-z./%2eEfF5cC\\\\]{0,24}") {
            if let Ok(once) = normalise(&raw, false) {
                proptest::prop_assert_eq!(normalise(&once, false), Ok(once.clone()));
                let once = once.into_owned();
                for seg in once.split('/').skip(1) {
                    proptest::prop_assert!(seg != "." && seg != "..");
                }
                proptest::prop_assert!(!once.contains("//"));
            }
        }
    }

    /// What `already_canonical` decided before it was one pass.
    fn canonical_by_its_definition(raw: &str) -> bool {
        let bytes = raw.as_bytes();
        bytes.first() == Some(&b'/')
            && bytes
                .iter()
                .all(|b| (0x21..=0x7e).contains(b) && *b != b'%' && *b != b'\\')
            && !raw.contains("//")
            && raw[1..].split('/').all(|seg| seg != "." && seg != "..")
    }

    proptest::proptest! {
        #[test]
        fn the_one_pass_check_is_the_definition(raw in "(/|\\.|\\.\\.|\\.\\.\\.|a|%|\\\\| |[\\x00-\\x7f]){0,10}") {
            proptest::prop_assert_eq!(already_canonical(&raw), canonical_by_its_definition(&raw), "{:?}", raw);
        }
    }

    #[test]
    fn the_one_pass_check_on_the_corners() {
        for raw in [
            "/", "//", "/a/", "/a//b", "/.", "/..", "/...", "/./a", "/a/..", "/a/.b", "/.a", "a",
            "", "/a b", "/%41", "/a\\b",
        ] {
            assert_eq!(
                already_canonical(raw),
                canonical_by_its_definition(raw),
                "{raw:?}"
            );
        }
    }

    proptest::proptest! {
        /// The shortcut for paths already canonical agrees with the full
        /// normalisation on every input.
        #[test]
        fn the_canonical_shortcut_agrees_with_the_full_rebuild(raw in "(/|\\.|%2e|%2F|%5c|%41|a|~|\\\\|[\\x00-\\x7f]){0,12}") {
            for allow in [false, true] {
                let full = rebuild(&raw, allow);
                let fast = normalise(&raw, allow).map(Cow::into_owned);
                proptest::prop_assert_eq!(fast, full);
            }
        }
    }
}
