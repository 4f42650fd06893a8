//! The Grafana dashboard (`config/grafana-dashboard.json`) against the
//! metrics tollgate exports (`tollgate::metrics::NAMES`): every panel
//! queries something, every metric a query names is exported, and every
//! exported metric is on the dashboard.

use std::collections::BTreeSet;

use serde_json::Value;
use tollgate::metrics::NAMES;

const DASHBOARD: &str = include_str!("../config/grafana-dashboard.json");

/// Every panel, rows' nested `panels` included, in order.
fn panels(list: &Value, out: &mut Vec<Value>) {
    for panel in list.as_array().into_iter().flatten() {
        out.push(panel.clone());
        panels(&panel["panels"], out);
    }
}

/// The `targets[].expr` of one panel.
fn exprs(panel: &Value) -> Vec<&str> {
    let targets = panel["targets"].as_array().into_iter().flatten();
    targets.filter_map(|t| t["expr"].as_str()).collect()
}

/// The metric names an expression references: tokens `tollgate_[a-z_]+`,
/// with a histogram's `_bucket`, `_sum` or `_count` series mapped back to
/// the histogram (a listed name in `_seconds`).
fn metric_names(expr: &str) -> Vec<String> {
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut names = Vec::new();
    for (at, _) in expr.match_indices("tollgate_") {
        if expr[..at].ends_with(word) {
            continue; // inside a longer identifier
        }
        let rest = &expr[at..];
        let end = rest
            .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
            .unwrap_or(rest.len());
        let name = &rest[..end];
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .filter_map(|suffix| name.strip_suffix(suffix))
            .find(|base| base.ends_with("_seconds") && NAMES.contains(base));
        names.push(base.unwrap_or(name).to_string());
    }
    names
}

#[test]
fn dashboard_queries_exactly_the_exported_metrics() {
    let dashboard: Value = serde_json::from_str(DASHBOARD).expect("dashboard is valid JSON");
    let mut all = Vec::new();
    panels(&dashboard["panels"], &mut all);
    assert!(!all.is_empty(), "dashboard has no panels");

    let mut queried = BTreeSet::new();
    for panel in &all {
        let title = panel["title"].as_str().unwrap_or("(untitled)");
        let exprs = exprs(panel);
        if panel["type"] != "row" {
            assert!(!exprs.is_empty(), "panel {title:?} has no query");
        }
        for expr in exprs {
            let names = metric_names(expr);
            assert!(
                !names.is_empty(),
                "panel {title:?} queries no tollgate metric: {expr}"
            );
            for name in names {
                assert!(
                    NAMES.contains(&name.as_str()),
                    "panel {title:?} queries {name}, which tollgate does not export: {expr}"
                );
                queried.insert(name);
            }
        }
    }

    let missing: Vec<_> = NAMES.iter().filter(|n| !queried.contains(**n)).collect();
    assert!(missing.is_empty(), "exported but on no panel: {missing:?}");
}

#[test]
fn scanner_finds_names_and_nested_panels() {
    assert_eq!(
        metric_names(
            "histogram_quantile(0.9, rate(tollgate_verify_duration_seconds_bucket[5m]))
             / tollgate_keys_count + x_tollgate_keys"
        ),
        ["tollgate_verify_duration_seconds", "tollgate_keys_count"]
    );
    let nested: Value = serde_json::json!([
        { "type": "row", "panels": [{ "type": "stat", "targets": [{ "expr": "tollgate_keys" }] }] }
    ]);
    let mut all = Vec::new();
    panels(&nested, &mut all);
    assert_eq!(all.len(), 2);
    assert_eq!(exprs(&all[1]), ["tollgate_keys"]);
}
