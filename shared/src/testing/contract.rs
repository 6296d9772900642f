//! The published contract (`openapi.yaml`) against the code: the routes a router serves, the
//! `HttpApi` events of `template.yaml`, and the request examples taken from `events/`.
//! Each API function's `tests/contract.rs` calls these with its own route keys.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use serde_json::Value;

use super::render;

/// The values the spec's examples give the fixtures' placeholders.
pub const EXAMPLE_VALUES: [(&str, &str); 5] = [
    ("RUN", "example"),
    ("NOW", "2026-11-25T12:00:00.000Z"),
    ("TODAY", "2026-11-25"),
    ("PAYMENT_ID", "0193a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"),
    ("TENANT_SLUG", "demo"),
];

const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

/// A file of the workspace, by its path from the top.
pub fn workspace_file(relative: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(relative)
}

fn read(relative: &str) -> String {
    std::fs::read_to_string(workspace_file(relative))
        .unwrap_or_else(|e| panic!("cannot read {relative}: {e}"))
}

/// `openapi.yaml`, as JSON.
pub fn openapi() -> Value {
    serde_norway::from_str(&read("openapi.yaml")).expect("openapi.yaml is YAML")
}

/// Every operation of the spec: its route key (`METHOD /path/{param}`) and the operation.
pub fn operations(spec: &Value) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    for (path, item) in spec["paths"].as_object().expect("paths") {
        for (method, operation) in item.as_object().expect("a path item") {
            if METHODS.contains(&method.as_str()) {
                out.insert(
                    format!("{} {path}", method.to_ascii_uppercase()),
                    operation.clone(),
                );
            }
        }
    }
    out
}

/// The route keys of the operations tagged with any of `tags`.
pub fn spec_routes(spec: &Value, tags: &[&str]) -> BTreeSet<String> {
    operations(spec)
        .into_iter()
        .filter(|(_, op)| {
            op["tags"]
                .as_array()
                .is_some_and(|t| t.iter().any(|t| tags.contains(&t.as_str().unwrap_or(""))))
        })
        .map(|(key, _)| key)
        .collect()
}

/// `template.yaml`, its CloudFormation tags (`!Ref`, `!Sub`, …) as tagged values.
pub fn template() -> serde_norway::Value {
    serde_norway::from_str(&read("template.yaml")).expect("template.yaml is YAML")
}

/// The `HttpApi` events of every function in `template.yaml`: function → route keys.
pub fn template_routes() -> BTreeMap<String, BTreeSet<String>> {
    let template = template();
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let resources = template["Resources"].as_mapping().expect("Resources");
    for (name, resource) in resources {
        let Some(events) = resource["Properties"]["Events"].as_mapping() else {
            continue;
        };
        for event in events.values() {
            if event["Type"].as_str() != Some("HttpApi") {
                continue;
            }
            let method = event["Properties"]["Method"].as_str().expect("Method");
            let path = event["Properties"]["Path"].as_str().expect("Path");
            out.entry(name.as_str().expect("a resource name").to_owned())
                .or_default()
                .insert(format!("{} {path}", method.to_ascii_uppercase()));
        }
    }
    out
}

/// The spec's operations tagged with any of `tags` and the `HttpApi` events of the template's
/// `function` are exactly `keys`, and the spec's example path of each key routes to it through
/// `route` (a router's match, giving the route key it matched).
pub fn check_router<E: std::fmt::Display>(
    tags: &[&str],
    function: &str,
    keys: &[&str],
    route: impl Fn(&http::Method, &str) -> Result<&'static str, E>,
) {
    let spec = openapi();
    let keys: BTreeSet<String> = keys.iter().map(|k| k.to_string()).collect();
    assert_eq!(spec_routes(&spec, tags), keys, "openapi.yaml");
    assert_eq!(template_routes()[function], keys, "template.yaml");
    for key in &keys {
        let (method, path) = example_path(&spec, key);
        let matched = route(&method, &path).unwrap_or_else(|e| panic!("{key}: {path}: {e}"));
        assert_eq!(matched, key, "{path}");
    }
}

/// A request path for a route key, each path parameter filled with the spec's example of it.
pub fn example_path(spec: &Value, key: &str) -> (http::Method, String) {
    let operation = &operations(spec)[key];
    let (method, template) = key.split_once(' ').expect("METHOD /path");
    let mut path = template.to_owned();
    for parameter in operation["parameters"].as_array().into_iter().flatten() {
        let parameter = resolve(spec, parameter);
        if parameter["in"] == "path" {
            let name = parameter["name"].as_str().expect("a parameter name");
            let example = parameter["example"]
                .as_str()
                .unwrap_or_else(|| panic!("{key}: path parameter {name} has no example"));
            path = path.replace(&format!("{{{name}}}"), example);
        }
    }
    assert!(
        !path.contains('{'),
        "{key}: a path parameter is not declared"
    );
    (method.parse().expect("a method"), path)
}

/// A `$ref` to a local component, followed; anything else as it is.
pub fn resolve<'a>(spec: &'a Value, value: &'a Value) -> &'a Value {
    match value["$ref"].as_str() {
        Some(pointer) => spec
            .pointer(pointer.trim_start_matches('#'))
            .unwrap_or_else(|| panic!("dangling $ref {pointer}")),
        None => value,
    }
}

/// Every request-body example names the fixture it was taken from (`x-fixture`), which is a
/// request to the same route with exactly that body once its placeholders hold
/// [`EXAMPLE_VALUES`]; and every fixture in `dir` for one of `keys` with a JSON body is some
/// example. Returns how many examples were checked.
pub fn check_fixture_examples(spec: &Value, dir: &str, keys: &[&str]) -> usize {
    let mut referenced = BTreeSet::new();
    for (key, operation) in operations(spec) {
        let examples = &operation["requestBody"]["content"]["application/json"]["examples"];
        for (name, example) in examples.as_object().into_iter().flatten() {
            let fixture = example["x-fixture"]
                .as_str()
                .unwrap_or_else(|| panic!("{key}: example {name} names no x-fixture"));
            let event: Value = serde_json::from_str(&render(&read(fixture), &EXAMPLE_VALUES))
                .unwrap_or_else(|e| panic!("{fixture}: {e}"));
            assert_eq!(event["routeKey"], key.as_str(), "{fixture} is not a {key}");
            let body: Value = serde_json::from_str(event["body"].as_str().unwrap_or_default())
                .unwrap_or_else(|e| panic!("{fixture}: the body is not JSON: {e}"));
            assert_eq!(
                example["value"], body,
                "{key}: example {name} is not the body of {fixture}"
            );
            referenced.insert(fixture.to_owned());
        }
    }
    let mut missing = Vec::new();
    for entry in std::fs::read_dir(workspace_file(dir)).expect("the fixtures folder") {
        let path = entry.expect("a fixture").path();
        let relative = format!(
            "{dir}/{}",
            path.file_name().and_then(|n| n.to_str()).expect("a name")
        );
        let event: Value = serde_json::from_str(&render(&read(&relative), &EXAMPLE_VALUES))
            .unwrap_or_else(|e| panic!("{relative}: {e}"));
        let routed = keys.contains(&event["routeKey"].as_str().unwrap_or(""));
        let json_body = event["body"]
            .as_str()
            .is_some_and(|b| serde_json::from_str::<Value>(b).is_ok());
        if routed && json_body && !referenced.contains(&relative) {
            missing.push(relative);
        }
    }
    assert!(
        missing.is_empty(),
        "fixtures that are no example in openapi.yaml: {missing:?}"
    );
    referenced.len()
}
