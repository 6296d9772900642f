//! What `template.yaml` promises operators, checked: the connection budget holds in every
//! environment of `samconfig.toml`, every function has its alarms, every alarm notifies the
//! topic, and the dashboard shows every metric the code emits.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};

use meterbridge::testing::contract::{self, workspace_file};
use serde_norway::Value;

/// A template value that is a literal or a `!Ref` to a parameter, resolved as a number.
fn number(value: &Value, parameters: &BTreeMap<String, String>) -> i64 {
    match value {
        Value::Number(n) => n.as_i64().unwrap(),
        Value::String(s) => s.parse().unwrap_or_else(|_| panic!("not a number: {s}")),
        Value::Tagged(tagged) if tagged.tag == "Ref" => {
            let name = tagged.value.as_str().unwrap();
            parameters[name]
                .parse()
                .unwrap_or_else(|_| panic!("parameter {name} is not a number"))
        }
        other => panic!("not a number or a !Ref: {other:?}"),
    }
}

/// The template's parameter defaults, overridden by a `parameter_overrides` string.
fn parameters(template: &Value, overrides: &str) -> BTreeMap<String, String> {
    let mut values = BTreeMap::new();
    for (name, parameter) in template["Parameters"].as_mapping().unwrap() {
        if let Some(default) = parameter.get("Default") {
            let default = match default {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                other => panic!("unexpected default {other:?}"),
            };
            values.insert(name.as_str().unwrap().to_owned(), default);
        }
    }
    for pair in overrides.split_whitespace() {
        let (name, value) = pair.split_once('=').unwrap();
        assert!(
            template["Parameters"].get(name).is_some(),
            "samconfig overrides the unknown parameter {name}"
        );
        values.insert(name.to_owned(), value.to_owned());
    }
    values
}

fn functions(template: &Value) -> Vec<(String, &Value)> {
    template["Resources"]
        .as_mapping()
        .unwrap()
        .iter()
        .filter(|(_, r)| r["Type"].as_str() == Some("AWS::Serverless::Function"))
        .map(|(name, r)| (name.as_str().unwrap().to_owned(), r))
        .collect()
}

/// Connections at full concurrency: each database-connected function's reserved concurrency
/// times its pool, plus the headroom.
fn connections_at_full_concurrency(template: &Value, p: &BTreeMap<String, String>) -> i64 {
    let mut total = number(&Value::String(p["DbConnectionHeadroom"].clone()), p);
    for (name, function) in functions(template) {
        let properties = &function["Properties"];
        let variables = &properties["Environment"]["Variables"];
        if variables.get("DB_SECRET_ID").is_none() {
            continue;
        }
        let concurrency = properties
            .get("ReservedConcurrentExecutions")
            .unwrap_or_else(|| {
                panic!("{name} connects to the database without a reserved concurrency")
            });
        let pool = variables.get("DB_MAX_CONNECTIONS").unwrap_or_else(|| {
            panic!("{name} connects to the database without DB_MAX_CONNECTIONS")
        });
        total += number(concurrency, p) * number(pool, p);
    }
    total
}

#[test]
fn the_connection_budget_holds_in_every_environment() {
    let template = contract::template();
    let samconfig: toml::Table = std::fs::read_to_string(workspace_file("samconfig.toml"))
        .unwrap()
        .parse()
        .unwrap();
    let mut environments = vec![("template defaults".to_owned(), String::new())];
    for (env, sections) in &samconfig {
        if let Some(overrides) = sections
            .get("deploy")
            .and_then(|d| d.get("parameters"))
            .and_then(|p| p.get("parameter_overrides"))
        {
            environments.push((env.clone(), overrides.as_str().unwrap().to_owned()));
        }
    }
    let names: BTreeSet<&str> = environments.iter().map(|(n, _)| n.as_str()).collect();
    assert!(names.contains("dev") && names.contains("prod"), "{names:?}");
    for (env, overrides) in &environments {
        let p = parameters(&template, overrides);
        let needed = connections_at_full_concurrency(&template, &p);
        let budget: i64 = p["DbConnectionBudget"].parse().unwrap();
        assert!(
            needed <= budget,
            "{env}: {needed} connections at full concurrency, budget {budget}"
        );
    }
    // The arithmetic itself: a budget one short of the need must fail.
    let p = parameters(&template, "");
    let needed = connections_at_full_concurrency(&template, &p);
    let tight = parameters(&template, &format!("DbConnectionBudget={}", needed - 1));
    assert!(connections_at_full_concurrency(&template, &tight) > needed - 1);
}

#[test]
fn dev_and_prod_differ_where_they_should() {
    let samconfig: toml::Table = std::fs::read_to_string(workspace_file("samconfig.toml"))
        .unwrap()
        .parse()
        .unwrap();
    let overrides = |env: &str| -> BTreeMap<String, String> {
        samconfig[env]["deploy"]["parameters"]["parameter_overrides"]
            .as_str()
            .unwrap()
            .split_whitespace()
            .map(|pair| {
                let (k, v) = pair.split_once('=').unwrap();
                (k.to_owned(), v.to_owned())
            })
            .collect()
    };
    let (dev, prod) = (overrides("dev"), overrides("prod"));
    for name in [
        "Stage",
        "LogLevel",
        "LogRetentionDays",
        "AlarmsEnabled",
        "IngestUsageConcurrency",
    ] {
        assert_ne!(dev.get(name), prod.get(name), "{name}");
        assert!(dev.contains_key(name), "{name}");
    }
    assert_eq!(prod["AlarmsEnabled"], "true");
    assert_eq!(
        samconfig["prod"]["global"]["parameters"]["stack_name"].as_str(),
        Some("meterbridge-prod")
    );
}

/// The alarms on one function: metric name → threshold.
fn alarms_of(template: &Value, function: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for resource in template["Resources"].as_mapping().unwrap().values() {
        if resource["Type"].as_str() != Some("AWS::CloudWatch::Alarm") {
            continue;
        }
        let p = &resource["Properties"];
        let on_function = p["Dimensions"]
            .as_sequence()
            .into_iter()
            .flatten()
            .any(|d| match &d["Value"] {
                Value::Tagged(t) => t.tag == "Ref" && t.value.as_str() == Some(function),
                _ => false,
            });
        if on_function {
            let threshold = p["Threshold"].as_f64().unwrap_or(f64::NAN);
            out.insert(p["MetricName"].as_str().unwrap().to_owned(), threshold);
        }
    }
    out
}

#[test]
fn every_function_has_its_alarms_and_every_alarm_notifies_the_topic() {
    let template = contract::template();
    let global_timeout = template["Globals"]["Function"]["Timeout"].as_f64().unwrap();
    for (name, function) in functions(&template) {
        let alarms = alarms_of(&template, &name);
        for metric in ["Errors", "Throttles", "Duration"] {
            assert!(alarms.contains_key(metric), "{name} has no {metric} alarm");
        }
        let timeout = function["Properties"]["Timeout"]
            .as_f64()
            .unwrap_or(global_timeout);
        assert!(
            alarms["Duration"] <= timeout * 1000.0 * 0.8,
            "{name}: the duration alarm must fire before a timeout is near"
        );
    }
    let mut metrics = BTreeSet::new();
    for (name, resource) in template["Resources"].as_mapping().unwrap() {
        if resource["Type"].as_str() != Some("AWS::CloudWatch::Alarm") {
            continue;
        }
        let p = &resource["Properties"];
        for actions in ["AlarmActions", "OKActions"] {
            let text = format!("{:?}", p[actions]);
            assert!(
                text.contains("HasAlarmTopic") && text.contains("AlarmTopicArn"),
                "{name:?}: {actions} must notify AlarmTopicArn"
            );
        }
        if let Some(metric) = p["MetricName"].as_str() {
            metrics.insert(metric.to_owned());
        }
        for m in p["Metrics"].as_sequence().into_iter().flatten() {
            if let Some(metric) = m["MetricStat"]["Metric"]["MetricName"].as_str() {
                metrics.insert(metric.to_owned());
            }
        }
    }
    for metric in [
        "5xx",
        "Latency",
        "OutboxDead",
        "OutboxOldestPendingAgeSeconds",
        "AggregationRunsCommitted",
    ] {
        assert!(metrics.contains(metric), "no alarm on {metric}");
    }
}

/// Every metric name the code emits (`metrics::counter!("Name")`, `gauge!`, `histogram!`).
fn emitted_metrics() -> BTreeSet<String> {
    let mut names = BTreeSet::from(["ColdStart".to_owned()]);
    let mut folders = vec![workspace_file("shared/src")];
    for entry in std::fs::read_dir(workspace_file("functions")).unwrap() {
        folders.push(entry.unwrap().path().join("src"));
    }
    while let Some(folder) = folders.pop() {
        for entry in std::fs::read_dir(&folder).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                folders.push(path);
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            for kind in ["counter!(\"", "gauge!(\"", "histogram!(\""] {
                for piece in text.split(kind).skip(1) {
                    let name = piece.split('"').next().unwrap();
                    if name.chars().all(|c| c.is_ascii_alphanumeric()) && !name.is_empty() {
                        names.insert(name.to_owned());
                    }
                }
            }
        }
    }
    names
}

#[test]
fn the_dashboard_shows_every_metric_the_code_emits() {
    let template = contract::template();
    let body = match &template["Resources"]["Dashboard"]["Properties"]["DashboardBody"] {
        Value::Tagged(t) if t.tag == "Sub" => t.value.as_str().unwrap().to_owned(),
        other => panic!("DashboardBody: {other:?}"),
    };
    let dashboard: serde_json::Value =
        serde_json::from_str(&body).expect("the dashboard body is JSON");
    let shown: BTreeSet<String> = dashboard["widgets"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|w| w["properties"]["metrics"].as_array().unwrap().iter())
        .filter_map(|m| m[1].as_str().map(str::to_owned))
        .collect();
    let emitted = emitted_metrics();
    assert!(emitted.len() > 20, "{emitted:?}");
    let missing: Vec<_> = emitted.difference(&shown).collect();
    assert!(missing.is_empty(), "not on the dashboard: {missing:?}");
}

/// The provider webhook takes no API key: its route has a throttle of its own, below the paying
/// routes' in every environment, so a flood of unsigned requests never eats their budget.
#[test]
fn the_webhook_route_has_a_throttle_of_its_own() {
    let template = contract::template();
    let settings = &template["Resources"]["VerifyPaymentFunction"]["Properties"]["Events"]
        ["ProviderWebhook"]["Properties"]["RouteSettings"];
    let samconfig: toml::Table = std::fs::read_to_string(workspace_file("samconfig.toml"))
        .unwrap()
        .parse()
        .unwrap();
    for env in ["", "dev", "prod"] {
        let overrides = if env.is_empty() {
            ""
        } else {
            samconfig[env]["deploy"]["parameters"]["parameter_overrides"]
                .as_str()
                .unwrap()
        };
        let p = parameters(&template, overrides);
        let rate = number(&settings["ThrottlingRateLimit"], &p);
        let burst = number(&settings["ThrottlingBurstLimit"], &p);
        let api_rate: i64 = p["ApiThrottleRateLimit"].parse().unwrap();
        let api_burst: i64 = p["ApiThrottleBurstLimit"].parse().unwrap();
        assert!(rate > 0 && burst >= rate, "{env:?}: {rate}/{burst}");
        assert!(
            rate < api_rate && burst < api_burst,
            "{env:?}: the webhook's {rate}/{burst} is not below the API's {api_rate}/{api_burst}"
        );
    }
}

/// Every function that connects to PostgreSQL bounds its transactions by its own timeout
/// (`transaction_timeout` on PostgreSQL 17+): no transaction outlives an invocation.
#[test]
fn no_transaction_outlives_its_invocation() {
    let template = contract::template();
    let global_timeout = template["Globals"]["Function"]["Timeout"].as_i64().unwrap();
    for (name, function) in functions(&template) {
        let properties = &function["Properties"];
        let variables = &properties["Environment"]["Variables"];
        if variables.get("DB_SECRET_ID").is_none() {
            continue;
        }
        let timeout = properties["Timeout"].as_i64().unwrap_or(global_timeout);
        let bound = variables
            .get("DB_TRANSACTION_TIMEOUT_MS")
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("{name} sets no DB_TRANSACTION_TIMEOUT_MS"));
        assert_eq!(bound, (timeout * 1000).to_string(), "{name}");
    }
}

/// In AWS nothing turns transport security down: no function sets `REDIS_REQUIRE_TLS` (on by
/// default inside Lambda) or a `DB_SSL_MODE` below `verify-full`; only the local stack does, in
/// the functions' `cargo lambda watch` settings.
#[test]
fn no_function_turns_tls_down_in_aws() {
    let template = contract::template();
    let mut scopes = vec![("Globals".to_owned(), &template["Globals"]["Function"])];
    for (name, function) in functions(&template) {
        scopes.push((name, &function["Properties"]));
    }
    for (name, properties) in scopes {
        let variables = &properties["Environment"]["Variables"];
        assert!(
            variables.get("REDIS_REQUIRE_TLS").is_none(),
            "{name} sets REDIS_REQUIRE_TLS"
        );
        if let Some(mode) = variables.get("DB_SSL_MODE") {
            assert_eq!(mode.as_str(), Some("verify-full"), "{name}");
        }
    }
}
