//! Matching labels against a `LabelSelector` object (the structured form in specs).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

/// Whether `labels` satisfy `selector`. An empty selector matches everything; an unknown
/// operator matches nothing (the API validates operators, so this only guards bad data).
pub fn matches(selector: &LabelSelector, labels: Option<&BTreeMap<String, String>>) -> bool {
    let get = |k: &str| labels.and_then(|l| l.get(k));
    let labels_ok = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| get(k) == Some(v));
    labels_ok
        && selector.match_expressions.iter().flatten().all(|e| {
            let values = e.values.as_deref().unwrap_or_default();
            let v = get(&e.key);
            match e.operator.as_str() {
                "In" => v.is_some_and(|v| values.contains(v)),
                "NotIn" => v.is_none_or(|v| !values.contains(v)),
                "Exists" => v.is_some(),
                "DoesNotExist" => v.is_none(),
                _ => false,
            }
        })
}

/// A selector that selects nothing: nil, or empty where the API forbids that (workloads).
pub fn is_empty(selector: &LabelSelector) -> bool {
    selector
        .match_labels
        .as_ref()
        .is_none_or(BTreeMap::is_empty)
        && selector
            .match_expressions
            .as_ref()
            .is_none_or(Vec::is_empty)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sel(v: serde_json::Value) -> LabelSelector {
        serde_json::from_value(v).unwrap()
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn match_labels_and_expressions() {
        let s = sel(json!({"matchLabels": {"app": "web"},
            "matchExpressions": [{"key": "tier", "operator": "In", "values": ["a", "b"]},
                                  {"key": "canary", "operator": "DoesNotExist"}]}));
        assert!(matches(&s, Some(&labels(&[("app", "web"), ("tier", "a")]))));
        assert!(!matches(
            &s,
            Some(&labels(&[("app", "web"), ("tier", "c")]))
        ));
        assert!(!matches(
            &s,
            Some(&labels(&[("app", "web"), ("tier", "a"), ("canary", "1")]))
        ));
        assert!(!matches(&s, Some(&labels(&[("app", "db"), ("tier", "a")]))));
        assert!(!matches(&s, None));
        let notin =
            sel(json!({"matchExpressions": [{"key": "x", "operator": "NotIn", "values": ["1"]}]}));
        assert!(matches(&notin, None));
        assert!(!matches(&notin, Some(&labels(&[("x", "1")]))));
        let bogus = sel(json!({"matchExpressions": [{"key": "x", "operator": "Near"}]}));
        assert!(!matches(&bogus, Some(&labels(&[("x", "1")]))));
    }
}
