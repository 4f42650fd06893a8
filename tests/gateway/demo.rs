//! `tollgate demo` runs from nothing, and every example it prints does what
//! its comment says. Its `curl` lines are parsed and sent with reqwest, so
//! the test needs no curl.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_tollgate");

/// One printed example: the status its comment promises, and its command.
struct Example {
    status: u16,
    code: Option<String>,
    command: String,
}

/// `-H 'Name: value'` pairs and the URL of a curl command line.
fn parse_curl(command: &str) -> (Vec<(String, String)>, String) {
    let mut headers = Vec::new();
    let mut rest = command;
    while let Some(i) = rest.find("-H '") {
        rest = &rest[i + 4..];
        let end = rest.find('\'').expect("closing quote");
        let (name, value) = rest[..end].split_once(": ").expect("header");
        headers.push((name.to_string(), value.to_string()));
        rest = &rest[end + 1..];
    }
    let url = command
        .split_whitespace()
        .find(|t| t.starts_with("http://"))
        .expect("a URL")
        .trim_end_matches(';')
        .to_string();
    (headers, url)
}

async fn send(client: &reqwest::Client, command: &str) -> (u16, String) {
    let (headers, url) = parse_curl(command);
    let mut req = client.get(url);
    for (name, value) in headers {
        req = req.header(name, value);
    }
    let resp = req.send().await.expect("demo answers");
    let status = resp.status().as_u16();
    (status, resp.text().await.expect("body"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_runs_and_its_examples_are_true() {
    let mut child = Command::new(BIN)
        .arg("demo")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn demo");
    let stdout = child.stdout.take().expect("stdout");
    // Every line after the examples, read on as the demo prints them.
    let later = std::sync::Arc::new(parking_lot::Mutex::new(Vec::<String>::new()));
    let sink = later.clone();
    let examples = tokio::task::spawn_blocking(move || {
        let mut examples = Vec::new();
        let mut promise: Option<(u16, Option<String>)> = None;
        let mut lines = BufReader::new(stdout).lines();
        for line in lines.by_ref() {
            let line = line.expect("line");
            if let Some(comment) = line.strip_prefix("# ") {
                let mut words = comment.split_whitespace();
                let status = words.next().and_then(|w| w.parse().ok()).expect("a status");
                let code = words.next().map(|w| w.trim_end_matches(':').to_string());
                promise = Some((status, code.filter(|c| c != "OK")));
            } else if let Some((status, code)) = promise.take() {
                examples.push(Example {
                    status,
                    code,
                    command: line,
                });
                if examples.len() == 7 {
                    break;
                }
            }
        }
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                sink.lock().push(line);
            }
        });
        examples
    })
    .await
    .expect("reader");
    assert_eq!(examples.len(), 7, "the demo printed fewer examples");

    let client = reqwest::Client::new();
    for example in &examples {
        if let Some(loop_head) = example.command.strip_prefix("for i in $(seq ") {
            let n: usize = loop_head
                .split(')')
                .next()
                .and_then(|n| n.parse().ok())
                .expect("count");
            let mut statuses = Vec::new();
            for _ in 0..n {
                statuses.push(send(&client, &example.command).await.0);
            }
            assert_eq!(statuses.first(), Some(&200), "{statuses:?}");
            assert_eq!(statuses.last(), Some(&example.status), "{statuses:?}");
            continue;
        }
        let (status, body) = send(&client, &example.command).await;
        assert_eq!(status, example.status, "{}: {body}", example.command);
        if let Some(code) = &example.code {
            assert!(body.contains(code.as_str()), "{}: {body}", example.command);
        }
    }

    // Billing happens where a newcomer sees it: 8,000 credits on the Pro
    // key (of 10,000) crosses its 80% threshold, and the demo's receiver
    // prints the event.
    let pro = examples
        .iter()
        .find(|e| e.command.contains("/api/ai/chat") && e.status == 200)
        .expect("the Pro example");
    let (headers, url) = parse_curl(&pro.command);
    let search = url.replace("/api/ai/chat", "/api/search");
    let mut req = client.get(&search).header("x-cost", "8000");
    for (name, value) in headers.into_iter().filter(|(n, _)| n == "Authorization") {
        req = req.header(name, value);
    }
    assert_eq!(req.send().await.expect("demo answers").status(), 200);
    let printed = || {
        later
            .lock()
            .iter()
            .any(|l| l.starts_with("billing event") && l.contains("usage.threshold"))
    };
    for _ in 0..1500 {
        if printed() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(printed(), "no billing event printed: {:?}", later.lock());

    // Ctrl-C ends it cleanly.
    let pid = child.id().to_string();
    let killed = Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .expect("kill");
    assert!(killed.success());
    let status = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::task::spawn_blocking(move || child.wait()),
    )
    .await
    .expect("the demo stopped")
    .expect("join")
    .expect("wait");
    assert!(status.success(), "{status:?}");
}
