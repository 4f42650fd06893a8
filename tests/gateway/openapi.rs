//! openapi/admin.yaml against the real admin router: the same routes, the
//! same security, and every operation answers a status the document lists
//! with a body its schema allows.

use std::collections::BTreeSet;

use reqwest::Method;
use serde_json::{json, Map, Value};

use crate::common::Harness;
use crate::PLANS;

const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

/// The parsed document and the few lookups the tests need.
struct Doc {
    root: Value,
}

/// One documented operation.
struct Op<'a> {
    method: String,
    path: String,
    spec: &'a Value,
}

impl Doc {
    fn load() -> Doc {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi/admin.yaml");
        let text = std::fs::read_to_string(path).expect("read openapi/admin.yaml");
        let root = yaml_serde::from_str::<Value>(&text).expect("openapi/admin.yaml is YAML");
        Doc { root }
    }

    /// Follows `$ref`s within the document.
    fn resolve<'a>(&'a self, mut node: &'a Value) -> &'a Value {
        while let Some(target) = node.get("$ref").and_then(Value::as_str) {
            let pointer = target
                .strip_prefix('#')
                .unwrap_or_else(|| panic!("only local $refs: {target}"));
            node = self
                .root
                .pointer(pointer)
                .unwrap_or_else(|| panic!("dangling $ref {target}"));
        }
        node
    }

    fn operations(&self) -> Vec<Op<'_>> {
        let paths = self.root["paths"].as_object().expect("paths");
        let mut ops = Vec::new();
        for (path, item) in paths {
            for (method, spec) in item.as_object().expect("path item") {
                if METHODS.contains(&method.as_str()) {
                    ops.push(Op {
                        method: method.to_lowercase(),
                        path: path.clone(),
                        spec,
                    });
                }
            }
        }
        ops
    }

    /// The statuses an operation documents.
    fn statuses(&self, op: &Op) -> BTreeSet<u16> {
        op.spec["responses"]
            .as_object()
            .expect("responses")
            .keys()
            .map(|s| {
                s.parse()
                    .unwrap_or_else(|_| panic!("{} {}: status {s}", op.method, op.path))
            })
            .collect()
    }

    /// The JSON schema of the answer with this status, if it has a body.
    fn response_schema<'a>(&'a self, op: &Op<'a>, status: u16) -> Option<&'a Value> {
        let response = self.resolve(&op.spec["responses"][status.to_string()]);
        response["content"].get("application/json")?.get("schema")
    }

    /// The security requirements in force for an operation.
    fn security<'a>(&'a self, op: &Op<'a>) -> &'a Value {
        op.spec.get("security").unwrap_or(&self.root["security"])
    }

    /// A schema with its `allOf` parts merged into one: their properties
    /// and required fields together.
    fn merged(&self, schema: &Value) -> Value {
        let schema = self.resolve(schema);
        let Some(parts) = schema.get("allOf").and_then(Value::as_array) else {
            return schema.clone();
        };
        let mut out = schema.as_object().expect("schema").clone();
        out.remove("allOf");
        for part in parts {
            let Value::Object(part) = self.merged(part) else {
                panic!("allOf part is not a schema");
            };
            for (k, v) in part {
                match (out.get_mut(&k), v) {
                    (Some(Value::Object(mine)), Value::Object(theirs)) => mine.extend(theirs),
                    (Some(Value::Array(mine)), Value::Array(theirs)) => mine.extend(theirs),
                    (Some(_), _) => {}
                    (None, v) => {
                        out.insert(k, v);
                    }
                }
            }
        }
        Value::Object(out)
    }

    /// Checks `value` against `schema` (the part of JSON Schema the document
    /// uses). Stricter than JSON Schema in one way: an object whose schema
    /// lists `properties` may have no others, so an undocumented field in
    /// an answer fails.
    fn check(&self, schema: &Value, value: &Value, at: &str, errors: &mut Vec<String>) {
        let schema = &self.merged(schema);
        if let Some(types) = schema.get("type") {
            let types: Vec<&str> = match types {
                Value::String(t) => vec![t.as_str()],
                Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
                other => panic!("bad type {other}"),
            };
            if !types.iter().any(|t| is_type(value, t)) {
                errors.push(format!("{at}: {value} is not {types:?}"));
                return;
            }
        }
        if let Some(c) = schema.get("const").filter(|c| *c != value) {
            errors.push(format!("{at}: {value} is not {c}"));
        }
        if let Some(e) = schema.get("enum").and_then(Value::as_array) {
            if !e.contains(value) {
                errors.push(format!("{at}: {value} is not one of {e:?}"));
            }
        }
        if let Some(branches) = schema.get("oneOf").and_then(Value::as_array) {
            let matching = branches
                .iter()
                .filter(|b| {
                    let mut e = Vec::new();
                    self.check(b, value, at, &mut e);
                    e.is_empty()
                })
                .count();
            if matching != 1 {
                errors.push(format!("{at}: {value} matches {matching} oneOf branches"));
            }
        }
        if let Some(n) = value.as_f64() {
            if schema
                .get("minimum")
                .and_then(Value::as_f64)
                .is_some_and(|m| n < m)
            {
                errors.push(format!("{at}: {n} is below the minimum"));
            }
            if schema
                .get("maximum")
                .and_then(Value::as_f64)
                .is_some_and(|m| n > m)
            {
                errors.push(format!("{at}: {n} is above the maximum"));
            }
        }
        if let (Some("date-time"), Some(s)) =
            (schema.get("format").and_then(Value::as_str), value.as_str())
        {
            if s.parse::<jiff::Timestamp>().is_err() {
                errors.push(format!("{at}: {s} is not a date-time"));
            }
        }
        if let (Some(items), Some(values)) = (schema.get("items"), value.as_array()) {
            for (i, v) in values.iter().enumerate() {
                self.check(items, v, &format!("{at}[{i}]"), errors);
            }
        }
        let Value::Object(fields) = value else {
            return;
        };
        for name in schema["required"].as_array().into_iter().flatten() {
            let name = name.as_str().expect("required names");
            if !fields.contains_key(name) {
                errors.push(format!("{at}: missing {name}"));
            }
        }
        let props = schema.get("properties").and_then(Value::as_object);
        let extra = schema.get("additionalProperties");
        for (name, v) in fields {
            let at = format!("{at}.{name}");
            match (props.and_then(|p| p.get(name)), extra) {
                (Some(s), _) => self.check(s, v, &at, errors),
                (None, Some(s)) if s.is_object() => self.check(s, v, &at, errors),
                (None, Some(Value::Bool(true))) => {}
                (None, _) if props.is_some() || extra == Some(&Value::Bool(false)) => {
                    errors.push(format!("{at}: not in the document"));
                }
                (None, _) => {}
            }
        }
    }

    /// Asserts an answer's body is what the document says for this status:
    /// JSON its schema allows, or nothing. Returns the JSON (or null).
    fn assert_body(&self, op: &Op, status: u16, text: &str) -> Value {
        let name = format!("{} {} {status}", op.method, op.path);
        let Some(schema) = self.response_schema(op, status) else {
            assert!(text.is_empty(), "{name}: undocumented body {text}");
            return Value::Null;
        };
        let body: Value =
            serde_json::from_str(text).unwrap_or_else(|_| panic!("{name}: not JSON: {text}"));
        let mut errors = Vec::new();
        self.check(schema, &body, "$", &mut errors);
        assert!(errors.is_empty(), "{name}: {errors:#?}\nbody: {body:#}");
        body
    }

    /// The smallest valid JSON body for an operation whose document says a
    /// body is required: each required property from `known` when the
    /// document cannot say what a real value is (a tier id, a secret), else
    /// from its schema.
    fn minimal_body(&self, op: &Op, known: &Map<String, Value>) -> Option<Value> {
        let body = self.resolve(op.spec.get("requestBody")?);
        if body["required"] != true {
            return None;
        }
        let schema = self.merged(&body["content"]["application/json"]["schema"]);
        let mut out = Map::new();
        for name in schema["required"].as_array().into_iter().flatten() {
            let name = name.as_str().expect("required names");
            let value = known.get(name).cloned().unwrap_or_else(|| {
                let prop = self.resolve(&schema["properties"][name]);
                if let Some(first) = prop["enum"].get(0) {
                    first.clone()
                } else if let Some(c) = prop.get("const") {
                    c.clone()
                } else if prop["type"] == "integer" {
                    prop.get("minimum").cloned().unwrap_or(json!(0))
                } else if prop["type"] == "boolean" {
                    json!(true)
                } else {
                    panic!(
                        "{} {}: no value for {name}; add it to `known`",
                        op.method, op.path
                    )
                }
            });
            out.insert(name.to_string(), value);
        }
        // A body that must say something: its first boolean, set.
        if out.is_empty() && schema["minProperties"].as_u64() >= Some(1) {
            let props = schema["properties"].as_object().expect("properties");
            let (name, _) = props
                .iter()
                .find(|(_, p)| self.resolve(p)["type"] == "boolean")
                .unwrap_or_else(|| panic!("{} {}: no boolean to set", op.method, op.path));
            out.insert(name.clone(), json!(true));
        }
        Some(Value::Object(out))
    }
}

fn is_type(value: &Value, t: &str) -> bool {
    match t {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        "boolean" => value.is_boolean(),
        "null" => value.is_null(),
        other => panic!("unknown type {other}"),
    }
}

#[test]
fn the_document_lists_exactly_the_routes_the_router_serves() {
    let doc = Doc::load();
    let version = doc.root["openapi"].as_str().expect("openapi field");
    assert!(version.starts_with("3.1"), "openapi: {version}");
    let documented: BTreeSet<(String, String)> = doc
        .operations()
        .into_iter()
        .map(|op| (op.method, op.path))
        .collect();
    let served: BTreeSet<(String, String)> = tollgate::admin::ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(
        documented, served,
        "openapi/admin.yaml and admin::ROUTES disagree"
    );
    // Every `{param}` of a path is a documented path parameter.
    let paths = doc.root["paths"].as_object().expect("paths");
    for op in doc.operations() {
        let declared: Vec<&Value> = [&paths[&op.path]["parameters"], &op.spec["parameters"]]
            .into_iter()
            .filter_map(Value::as_array)
            .flatten()
            .map(|p| doc.resolve(p))
            .filter(|p| p["in"] == "path")
            .collect();
        for name in op.path.split('/').filter_map(|s| s.strip_prefix('{')) {
            let name = name.trim_end_matches('}');
            assert!(
                declared
                    .iter()
                    .any(|p| p["name"] == name && p["required"] == true),
                "{} {}: no required path parameter {name}",
                op.method,
                op.path
            );
        }
    }
}

#[tokio::test]
async fn every_documented_operation_answers_as_documented() {
    let doc = Doc::load();
    let h = Harness::start(PLANS).await;
    let (secret, key_id) = h.create_key("free").await;
    let known = json!({ "tier": "free", "key": secret });
    let known = known.as_object().expect("map");
    let mut ops = doc.operations();
    // Revoke last, so the key exists for the rest.
    ops.sort_by_key(|op| (op.method == "delete", op.path.clone(), op.method.clone()));
    let request = |op: &Op, root_key: bool| {
        let method = Method::from_bytes(op.method.to_uppercase().as_bytes()).expect("method");
        let path = op.path.replace("{key_id}", &key_id);
        assert!(!path.contains('{'), "unfilled parameter in {path}");
        let mut req = if root_key {
            h.admin(method, &path)
        } else {
            h.client.request(method, h.admin_url(&path))
        };
        if let Some(body) = doc.minimal_body(op, known) {
            req = req.json(&body);
        }
        req
    };

    // Without the root key: 401 wherever the document asks for it.
    for op in &ops {
        let name = format!("{} {}", op.method, op.path);
        let statuses = doc.statuses(op);
        let secured = doc
            .security(op)
            .as_array()
            .is_some_and(|reqs| !reqs.is_empty());
        let resp = request(op, false).send().await.expect("admin answers");
        let status = resp.status().as_u16();
        if secured {
            assert_eq!(status, 401, "{name} without the root key");
            assert!(statuses.contains(&401), "{name}: 401 is not documented");
            let body = doc.assert_body(op, 401, &resp.text().await.expect("body"));
            assert_eq!(body["code"], "UNAUTHORIZED", "{name}");
        } else {
            assert!(
                (200..300).contains(&status),
                "{name} has no security but answers {status} without the root key"
            );
            assert!(
                !statuses.contains(&401),
                "{name}: documents a 401 it cannot answer"
            );
        }
    }

    // With the root key and a minimal valid request: the documented success.
    for op in &ops {
        let name = format!("{} {}", op.method, op.path);
        let statuses = doc.statuses(op);
        let resp = request(op, true).send().await.expect("admin answers");
        let status = resp.status().as_u16();
        let text = resp.text().await.expect("body");
        assert_ne!(status, 405, "{name}: method not allowed");
        let body: Option<Value> = serde_json::from_str(&text).ok();
        let code = body.as_ref().and_then(|b| b["code"].as_str());
        assert!(
            !(status == 404 && code == Some("NOT_FOUND")),
            "{name}: the router's fallback answered"
        );
        assert!(
            statuses.contains(&status),
            "{name}: {status} is not among the documented {statuses:?}; body: {text}"
        );
        let successes: Vec<u16> = statuses
            .iter()
            .copied()
            .filter(|s| (200..300).contains(s))
            .collect();
        assert_eq!(successes.len(), 1, "{name}: one documented success");
        assert_eq!(status, successes[0], "{name}: body: {text}");
        doc.assert_body(op, status, &text);
    }

    // The key is revoked now: whatever documents a 404 answers it, and
    // verify refuses the secret; both with bodies the document allows.
    for op in &ops {
        let name = format!("{} {}", op.method, op.path);
        let resp = request(op, true).send().await.expect("admin answers");
        let status = resp.status().as_u16();
        let text = resp.text().await.expect("body");
        let body = doc.assert_body(op, status, &text);
        if doc.statuses(op).contains(&404) {
            assert_eq!(status, 404, "{name} of a revoked key: {text}");
            assert_eq!(body["code"], "KEY_NOT_FOUND", "{name}");
        } else if op.path == "/v1/verify" {
            assert_eq!(status, 200, "{name}: {text}");
            assert_eq!(
                (&body["valid"], &body["code"]),
                (&json!(false), &json!("INVALID_KEY"))
            );
        }
    }
}
