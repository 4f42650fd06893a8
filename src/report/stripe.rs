//! The Stripe sink: one Billing meter event per outbox row
//! (`POST <base_url>/v1/billing/meter_events`, form-encoded), sent one at a
//! time, so calls for one customer and meter are never concurrent (Stripe
//! allows one at a time). The event id is the `identifier`, so Stripe
//! de-duplicates a retry.

use std::time::Duration;

use serde_json::Value;

use crate::config::Stripe;

/// A call not answered within this is retried.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// What became of one meter event.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Sent,
    /// 429, 5xx or no answer: try again later, with backoff.
    Retry(String),
    /// Refused for good (another 4xx, or no Stripe customer): park it.
    Park(String),
}

/// The form fields of a meter event call, from its outbox row.
pub fn form(call: &Value) -> Result<Vec<(&'static str, String)>, String> {
    let customer = call["customer"]
        .as_str()
        .filter(|c| !c.is_empty())
        .ok_or("the key has no meta.stripe_customer_id")?;
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    Ok(vec![
        ("event_name", text(&call["event_name"])),
        ("payload[stripe_customer_id]", customer.to_string()),
        ("payload[value]", text(&call["value"])),
        ("identifier", text(&call["identifier"])),
        ("timestamp", text(&call["timestamp"])),
    ])
}

/// Sends one meter event.
pub async fn send(client: &reqwest::Client, stripe: &Stripe, call: &Value) -> Outcome {
    let form = match form(call) {
        Ok(form) => form,
        Err(reason) => return Outcome::Park(reason),
    };
    let url = format!("{}/v1/billing/meter_events", stripe.base_url);
    let sent = client
        .post(url)
        .timeout(TIMEOUT)
        .bearer_auth(stripe.api_key.expose())
        .form(&form)
        .send()
        .await;
    match sent {
        Ok(resp) if resp.status().is_success() => Outcome::Sent,
        Ok(resp) => {
            let status = resp.status();
            // Stripe explains itself in error.message; never echo more.
            let message = resp
                .json::<Value>()
                .await
                .ok()
                .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
                .unwrap_or_default();
            let reason = format!("Stripe answered {}: {message}", status.as_u16());
            if status.as_u16() == 429 || status.is_server_error() {
                Outcome::Retry(reason)
            } else {
                Outcome::Park(reason)
            }
        }
        Err(e) if e.is_timeout() => {
            Outcome::Retry(format!("no answer within {}s", TIMEOUT.as_secs()))
        }
        Err(e) => Outcome::Retry(format!("cannot reach Stripe: {}", e.without_url())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_call_without_a_customer_is_parked_with_a_reason() {
        let call = json!({ "identifier": "evt_1", "event_name": "m", "customer": null, "value": 3, "timestamp": 1 });
        assert_eq!(
            form(&call),
            Err("the key has no meta.stripe_customer_id".to_string())
        );
        let call = json!({ "identifier": "evt_1", "event_name": "m", "customer": "cus_1", "value": 3, "timestamp": 1 });
        let form = form(&call).expect("form");
        assert!(form.contains(&("payload[value]", "3".to_string())));
        assert!(form.contains(&("identifier", "evt_1".to_string())));
    }
}
