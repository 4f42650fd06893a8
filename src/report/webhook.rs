//! The webhook sink: `POST {"events":[...]}`, signed twice (SPEC §5) so a
//! receiver can check either: tollgate's own `Tollgate-Signature`, and the
//! Standard Webhooks headers that its official libraries verify.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::config::Webhook;
use crate::store::sqlite::Batch;

/// A delivery not answered within this is retried.
pub const TIMEOUT: Duration = Duration::from_secs(10);

fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // HMAC takes a key of any length.
    let mut mac = Hmac::<Sha256>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

/// The Standard Webhooks key: the base64 after `whsec_`, else the secret's
/// own bytes.
fn standard_key(secret: &str) -> Vec<u8> {
    secret
        .strip_prefix("whsec_")
        .and_then(|b64| base64::engine::general_purpose::STANDARD.decode(b64).ok())
        .unwrap_or_else(|| secret.as_bytes().to_vec())
}

/// The body of a batch.
pub fn body(batch: &Batch) -> String {
    format!("{{\"events\":[{}]}}", batch.events.join(","))
}

/// The signature headers of `body`, sent as batch `id` at unix time `t`.
pub fn signatures(secret: &str, id: &str, t: u64, body: &str) -> [(&'static str, String); 5] {
    let t = t.to_string();
    let ours = hmac_sha256(secret.as_bytes(), &[t.as_bytes(), b".", body.as_bytes()]);
    let ours: String = ours.iter().map(|b| format!("{b:02x}")).collect();
    let standard = hmac_sha256(
        &standard_key(secret),
        &[id.as_bytes(), b".", t.as_bytes(), b".", body.as_bytes()],
    );
    let standard = base64::engine::general_purpose::STANDARD.encode(standard);
    [
        ("tollgate-signature", format!("t={t},v1={ours}")),
        ("idempotency-key", id.to_string()),
        ("webhook-id", id.to_string()),
        ("webhook-timestamp", t),
        ("webhook-signature", format!("v1,{standard}")),
    ]
}

/// Sends one batch. Any 2xx is delivered; anything else is an error (the
/// caller retries the same batch, with the same id).
pub async fn send(client: &reqwest::Client, hook: &Webhook, batch: &Batch) -> Result<(), String> {
    let body = body(batch);
    // Signed with the wall clock: receivers compare it with theirs.
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut request = client
        .post(&hook.url)
        .timeout(TIMEOUT)
        .header("content-type", "application/json");
    for (name, value) in signatures(hook.secret.expose(), &batch.id, t, &body) {
        request = request.header(name, value);
    }
    match request.body(body).send().await {
        Ok(resp) if resp.status().is_success() => Ok(()),
        Ok(resp) => Err(format!("the receiver answered {}", resp.status().as_u16())),
        Err(e) if e.is_timeout() => Err(format!("no answer within {}s", TIMEOUT.as_secs())),
        Err(e) => Err(format!("cannot reach the receiver: {}", e.without_url())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_key_decodes_whsec_and_falls_back_to_bytes() {
        assert_eq!(standard_key("whsec_aGVsbG8="), b"hello");
        assert_eq!(standard_key("plain-secret"), b"plain-secret");
        assert_eq!(standard_key("whsec_!!notbase64"), b"whsec_!!notbase64");
    }

    #[test]
    fn tollgate_signature_is_hmac_of_timestamp_and_body() {
        let [(name, value), ..] = signatures("s3cret", "batch_1", 1700000000, "{}");
        assert_eq!(name, "tollgate-signature");
        let expected: String = hmac_sha256(b"s3cret", &[b"1700000000.{}"])
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(value, format!("t=1700000000,v1={expected}"));
    }
}
