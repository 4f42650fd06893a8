//! `tollgate keys ...` and `tollgate outbox ...` against a running gateway:
//! JSON out, one-line errors.

use std::process::Command;

use serde_json::Value;

use crate::common::{Harness, ROOT_KEY};
use crate::PLANS;

/// Runs `tollgate keys <args> --admin-url <admin>`; returns the exit code,
/// stdout parsed as JSON (or Null) and stderr.
async fn keys(admin: &str, args: &[&str]) -> (Option<i32>, Value, String) {
    cli(admin, "keys", args).await
}

/// Runs `tollgate <command> <args> --admin-url <admin>`, from a directory
/// with no `config/tollgate.yaml` (so no config is read).
async fn cli(admin: &str, command_name: &str, args: &[&str]) -> (Option<i32>, Value, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tollgate"));
    command
        .arg(command_name)
        .args(args)
        .args(["--admin-url", admin])
        .current_dir(std::env::temp_dir())
        .env("TOLLGATE_ROOT_KEY", ROOT_KEY);
    let out = tokio::task::spawn_blocking(move || command.output())
        .await
        .expect("join")
        .expect("run");
    let json = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (
        out.status.code(),
        json,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_keys_commands_drive_the_admin_api() {
    let h = Harness::start(PLANS).await;
    let admin = h.admin_url("");
    let (code, created, err) = keys(
        &admin,
        &[
            "create",
            "--tier",
            "free",
            "--external-id",
            "cus_cli",
            "--meta",
            r#"{"team":"a"}"#,
        ],
    )
    .await;
    assert_eq!(code, Some(0), "{err}");
    let key = created["key"].as_str().expect("secret").to_string();
    let id = created["key_id"].as_str().expect("id").to_string();
    assert_eq!(created["meta"]["team"], "a");

    let (code, got, _) = keys(&admin, &["get", &id]).await;
    assert_eq!(
        (code, got["external_id"].as_str()),
        (Some(0), Some("cus_cli"))
    );

    let (code, list, _) = keys(&admin, &["list", "--external-id", "cus_cli", "--all"]).await;
    assert_eq!(code, Some(0));
    assert_eq!(list["keys"].as_array().map(Vec::len), Some(1));

    let (code, updated, _) = keys(
        &admin,
        &[
            "update",
            &id,
            "--tier",
            "metered",
            "--credit-policy",
            "reset",
            "--name",
            "cli",
        ],
    )
    .await;
    assert_eq!(code, Some(0));
    assert_eq!(
        (
            updated["tier"].as_str(),
            updated["credits"]["remaining"].as_u64()
        ),
        (Some("metered"), Some(1000))
    );

    let (code, granted, _) = keys(&admin, &["credits", &id, "add", "5"]).await;
    assert_eq!(
        (code, granted["credits"]["remaining"].as_u64()),
        (Some(0), Some(1005))
    );
    assert_eq!(h.get("/api/data", &key).await.status(), 200);

    let (code, revoked, _) = keys(&admin, &["revoke", &id]).await;
    assert_eq!((code, revoked["revoked"].as_bool()), (Some(0), Some(true)));
    assert_eq!(h.get("/api/data", &key).await.status(), 401);

    // An error answer: one line, non-zero.
    let (code, out, err) = keys(&admin, &["get", &id]).await;
    assert_eq!((code, out), (Some(1), Value::Null));
    assert_eq!(err.trim(), "error: 404 KEY_NOT_FOUND: no key with this id");
    let (code, _, err) = keys(&admin, &["create", "--tier", "gold"]).await;
    assert_eq!(code, Some(1));
    assert!(
        err.contains("400 INVALID_REQUEST") && err.lines().count() == 1,
        "{err}"
    );
}

#[tokio::test]
async fn a_gateway_that_is_down_is_a_one_line_error() {
    let dead = format!("http://{}", crate::common::dead_address());
    let (code, _, err) = keys(&dead, &["get", "key_x"]).await;
    assert_eq!(code, Some(1));
    assert!(
        err.starts_with("error: cannot reach the admin API at http://127.0.0.1:"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}

/// A config named on the command line must exist: no silent fallback to
/// a default address.
#[test]
fn a_config_that_does_not_exist_is_an_error() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["keys", "--config", "/nonexistent.yaml", "list"])
        .env("TOLLGATE_ROOT_KEY", "x")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent.yaml: no such file"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outbox_command_shows_and_retries() {
    let h = Harness::start(PLANS).await;
    let admin = h.admin_url("");
    let (code, shown, err) = cli(&admin, "outbox", &[]).await;
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(shown["sinks"]["webhook"]["pending"], 0);
    assert_eq!(shown["sinks"]["stripe"]["parked"], serde_json::json!([]));
    let (code, _, err) = cli(&admin, "outbox", &["retry", "--all"]).await;
    assert_eq!(code, Some(0), "{err}");
    let (code, _, err) = cli(&admin, "outbox", &["retry"]).await;
    assert_eq!(code, Some(1));
    assert!(err.contains("--all"), "{err}");
}

/// The client reads addresses from the config; the gateway's secrets need
/// not be set where it runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_reads_a_config_whose_secrets_are_not_set_here() {
    let nobody = format!("http://{}", crate::common::dead_address());
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args([
                "outbox",
                "--config",
                "config/tollgate.yaml",
                "--admin-url",
                &nobody,
            ])
            .env("TOLLGATE_ROOT_KEY", ROOT_KEY)
            .env_remove("TOLLGATE_WEBHOOK_SECRET")
            .output()
    })
    .await
    .expect("join")
    .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot reach the admin API"), "{err}");
}
