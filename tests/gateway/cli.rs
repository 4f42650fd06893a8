//! The `tollgate` binary's config commands.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_tollgate");

/// Runs `tollgate <command> --config <a file holding text>`; returns the
/// exit code and stderr.
fn run(command: &str, text: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("tollgate.yaml");
    std::fs::write(&path, text).expect("write config");
    let out = Command::new(BIN)
        .args([command, "--config"])
        .arg(&path)
        .output()
        .expect("run");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_example_config_checks_clean() {
    let out = Command::new(BIN)
        .args(["check-config", "--config", "config/tollgate.yaml"])
        .env("TOLLGATE_WEBHOOK_SECRET", "whsec_c2VjcmV0")
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stderr.is_empty(),
        "warnings: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

const BROKEN: &str = "\
upstreams:
  main: { url: \"http://127.0.0.1:3000\" }
tiers:
  free:
    credits: 10
    rate_limits: { requests: { limit: 0, window: 60s } }
routes:
  - { name: a, path: /a, upstream: nowhere }
";

#[test]
fn check_config_prints_every_error_with_path_and_line() {
    let (code, stderr) = run("check-config", BROKEN);
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("tiers.free.rate_limits.requests.limit (line 6)"),
        "{stderr}"
    );
    assert!(
        stderr.contains("routes[0].upstream (line 8): unknown upstream 'nowhere'"),
        "{stderr}"
    );
}

#[test]
fn check_config_warns_but_passes() {
    let text = BROKEN.replace("limit: 0", "limit: 5").replace(
        "upstream: nowhere }",
        "upstream: main, feature: nobody_has_it }",
    );
    let (code, stderr) = run("check-config", &text);
    assert_eq!(code, Some(0));
    assert!(stderr.contains("warning: routes[0].feature"), "{stderr}");
}

#[test]
fn serve_with_a_bad_config_exits_at_once() {
    let (code, stderr) = run("serve", BROKEN);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("routes[0].upstream (line 8)"), "{stderr}");
}

#[test]
fn a_yaml_syntax_error_names_its_line() {
    let (code, stderr) = run(
        "check-config",
        "tiers:\n  free: { credits: 10\nroutes: []\n",
    );
    assert_eq!(code, Some(1));
    assert!(stderr.contains("line "), "{stderr}");
}

/// A secret the config names but the environment does not hold is an
/// error naming the field and the variable; a Stripe meter on a counter
/// nothing has is a warning.
#[test]
fn reporting_secrets_must_be_set_and_meters_must_meter_something() {
    let text = r#"
upstreams: { main: { url: "http://127.0.0.1:3000" } }
tiers: { free: { credits: 10 } }
routes: [ { name: a, path: /a, upstream: main } ]
reporting:
  webhook: { url: "http://127.0.0.1:4000/billing", secret_env: TOLLGATE_TEST_UNSET_SECRET_VAR }
  stripe:
    api_key_env: TOLLGATE_TEST_UNSET_STRIPE_VAR
    meters: { credits: api_calls, gpu-seconds: gpu }
"#;
    let (code, stderr) = run("check-config", text);
    assert_eq!(code, Some(1), "{stderr}");
    for expected in [
        "reporting.webhook.secret_env",
        "TOLLGATE_TEST_UNSET_SECRET_VAR is not set",
        "reporting.stripe.api_key_env",
        "TOLLGATE_TEST_UNSET_STRIPE_VAR",
    ] {
        assert!(stderr.contains(expected), "{expected}: {stderr}");
    }
    let set = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg({
            let dir = tempfile::tempdir().expect("tempdir").keep();
            let path = dir.join("tollgate.yaml");
            std::fs::write(&path, text).expect("write");
            path
        })
        .env("TOLLGATE_TEST_UNSET_SECRET_VAR", "whsec_c2VjcmV0")
        .env("TOLLGATE_TEST_UNSET_STRIPE_VAR", "sk_test_x")
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&set.stderr);
    assert!(set.status.success(), "{stderr}");
    assert!(
        stderr.contains("reporting.stripe.meters.gpu-seconds")
            && !stderr.contains("meters.credits"),
        "{stderr}"
    );
}

/// Logs written to a pipe (or a file) carry no terminal colour codes.
#[test]
fn logs_to_a_pipe_have_no_colour_codes() {
    use std::io::BufRead;
    let mut child = Command::new(BIN)
        .args(["--log-format", "text", "echo", "--listen", "127.0.0.1:0"])
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    let stderr = child.stderr.take().expect("stderr");
    let line = std::io::BufReader::new(stderr)
        .lines()
        .next()
        .expect("a log line")
        .expect("text");
    let _ = child.kill();
    let _ = child.wait();
    assert!(line.contains("INFO"), "{line}");
    assert!(line.contains("echo upstream listening"), "{line}");
    assert!(!line.contains('\u{1b}'), "colour codes in {line:?}");
}
