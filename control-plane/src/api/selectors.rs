//! Label selectors (`=`, `==`, `!=`, `in`, `notin`, exists, `!` not-exists) and field
//! selectors (`=`, `==`, `!=`), parsed from query strings and matched against objects.

use std::collections::BTreeMap;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SelectorError {
    #[error("unable to parse requirement: {0}")]
    Syntax(String),
    #[error("invalid label key {key:?}: {why}")]
    Key { key: String, why: &'static str },
    #[error("invalid label value {value:?}: {why}")]
    Value { value: String, why: &'static str },
    #[error("invalid field selector {0:?}: expected <field>=<value> or <field>!=<value>")]
    Field(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// A parsed label selector; the empty selector matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LabelSelector(pub Vec<Requirement>);

fn check_name_part(part: &str) -> Option<&'static str> {
    if part.is_empty() {
        return Some("name part must be non-empty");
    }
    if part.len() > 63 {
        return Some("name part must be no more than 63 characters");
    }
    let ok_edge = |c: char| c.is_ascii_alphanumeric();
    let ok_mid = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    let first = part.chars().next().is_some_and(ok_edge);
    let last = part.chars().last().is_some_and(ok_edge);
    if !first || !last || !part.chars().all(ok_mid) {
        return Some(
            "must consist of alphanumeric characters, '-', '_' or '.', and must start and end \
             with an alphanumeric character",
        );
    }
    None
}

fn check_key(key: &str) -> Result<(), SelectorError> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(prefix) = prefix {
        let valid = !prefix.is_empty()
            && prefix.len() <= 253
            && prefix.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                    && label.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                    && label
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            });
        if !valid {
            return Err(SelectorError::Key {
                key: key.to_owned(),
                why: "prefix part must be a lowercase RFC 1123 subdomain",
            });
        }
    }
    match check_name_part(name) {
        Some(why) => Err(SelectorError::Key {
            key: key.to_owned(),
            why,
        }),
        None => Ok(()),
    }
}

/// Checks a label value (also used to validate `metadata.labels`).
pub fn check_value(value: &str) -> Result<(), SelectorError> {
    if value.is_empty() {
        return Ok(());
    }
    match check_name_part(value) {
        Some(why) => Err(SelectorError::Value {
            value: value.to_owned(),
            why,
        }),
        None => Ok(()),
    }
}

/// Checks a label key (also used to validate `metadata.labels`).
pub fn check_label_key(key: &str) -> Result<(), SelectorError> {
    check_key(key)
}

/// Splits on commas that are not inside parentheses.
fn split_top_level(s: &str) -> Result<Vec<&str>, SelectorError> {
    let mut parts = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
        if !(0..=1).contains(&depth) {
            return Err(SelectorError::Syntax(s.to_owned()));
        }
    }
    if depth != 0 {
        return Err(SelectorError::Syntax(s.to_owned()));
    }
    parts.push(&s[start..]);
    Ok(parts)
}

fn parse_set(s: &str, original: &str) -> Result<Vec<String>, SelectorError> {
    let inner = s
        .trim()
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .ok_or_else(|| SelectorError::Syntax(original.to_owned()))?;
    let mut values = Vec::new();
    for v in inner.split(',') {
        let v = v.trim();
        check_value(v)?;
        values.push(v.to_owned());
    }
    Ok(values)
}

fn parse_requirement(part: &str) -> Result<Requirement, SelectorError> {
    let part = part.trim();
    let syntax = || SelectorError::Syntax(part.to_owned());
    if part.is_empty() {
        return Err(syntax());
    }
    if let Some(key) = part.strip_prefix('!') {
        let key = key.trim();
        check_key(key)?;
        return Ok(Requirement::NotExists(key.to_owned()));
    }
    for (op, negate) in [("!=", true), ("==", false), ("=", false)] {
        if let Some((key, value)) = part.split_once(op) {
            let (key, value) = (key.trim(), value.trim());
            check_key(key)?;
            check_value(value)?;
            return Ok(if negate {
                Requirement::NotEquals(key.to_owned(), value.to_owned())
            } else {
                Requirement::Equals(key.to_owned(), value.to_owned())
            });
        }
    }
    let mut words = part.splitn(2, char::is_whitespace);
    let key = words.next().unwrap_or("").trim();
    let rest = words.next().unwrap_or("").trim();
    if rest.is_empty() {
        if key.contains(['(', ')', '<', '>']) {
            return Err(syntax());
        }
        check_key(key)?;
        return Ok(Requirement::Exists(key.to_owned()));
    }
    check_key(key)?;
    if let Some(set) = rest.strip_prefix("notin") {
        return Ok(Requirement::NotIn(key.to_owned(), parse_set(set, part)?));
    }
    if let Some(set) = rest.strip_prefix("in") {
        return Ok(Requirement::In(key.to_owned(), parse_set(set, part)?));
    }
    Err(syntax())
}

impl LabelSelector {
    pub fn parse(s: &str) -> Result<Self, SelectorError> {
        if s.trim().is_empty() {
            return Ok(LabelSelector::default());
        }
        let requirements = split_top_level(s)?
            .into_iter()
            .map(parse_requirement)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(LabelSelector(requirements))
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|r| match r {
            Requirement::Equals(k, v) => labels.get(k) == Some(v),
            Requirement::NotEquals(k, v) => labels.get(k) != Some(v),
            Requirement::In(k, vs) => labels.get(k).is_some_and(|l| vs.contains(l)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|l| !vs.contains(l)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::NotExists(k) => !labels.contains_key(k),
        })
    }
}

/// One `field=value` or `field!=value` term.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldTerm {
    pub field: String,
    pub value: String,
    pub negate: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FieldSelector(pub Vec<FieldTerm>);

impl FieldSelector {
    pub fn parse(s: &str) -> Result<Self, SelectorError> {
        if s.trim().is_empty() {
            return Ok(FieldSelector::default());
        }
        let mut terms = Vec::new();
        for part in s.split(',') {
            let (field, value, negate) = if let Some((f, v)) = part.split_once("!=") {
                (f, v, true)
            } else if let Some((f, v)) = part.split_once("==") {
                (f, v, false)
            } else if let Some((f, v)) = part.split_once('=') {
                (f, v, false)
            } else {
                return Err(SelectorError::Field(part.to_owned()));
            };
            let field = field.trim();
            if field.is_empty() || field.contains(char::is_whitespace) {
                return Err(SelectorError::Field(part.to_owned()));
            }
            terms.push(FieldTerm {
                field: field.to_owned(),
                value: value.trim().to_owned(),
                negate,
            });
        }
        Ok(FieldSelector(terms))
    }

    /// Whether every term holds, reading field values through `get` (missing = empty).
    pub fn matches(&self, get: impl Fn(&str) -> String) -> bool {
        self.0
            .iter()
            .all(|t| (get(&t.field) == t.value) != t.negate)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn parses_every_operator() {
        let sel = LabelSelector::parse(
            "app=web,tier!=db,env in (prod, staging),zone notin (a),ready,!legacy",
        )
        .expect("parses");
        assert_eq!(sel.0.len(), 6);
        let yes = labels(&[
            ("app", "web"),
            ("env", "prod"),
            ("zone", "b"),
            ("ready", ""),
        ]);
        assert!(sel.matches(&yes));
        let no = labels(&[
            ("app", "web"),
            ("env", "prod"),
            ("ready", ""),
            ("legacy", "1"),
        ]);
        assert!(!sel.matches(&no));
        assert!(
            LabelSelector::parse("")
                .expect("empty")
                .matches(&labels(&[]))
        );
    }

    #[test]
    fn rejects_bad_selectors_with_the_reason() {
        for bad in [
            "app in prod",
            "=x",
            "a b c",
            "env in (a",
            "app==(x)",
            "-bad=1",
            "x/y/z=1",
            "a,,b",
        ] {
            assert!(LabelSelector::parse(bad).is_err(), "{bad} should not parse");
        }
        let long = "a".repeat(64);
        assert!(matches!(
            LabelSelector::parse(&long),
            Err(SelectorError::Key { .. })
        ));
        assert!(FieldSelector::parse("metadata.name").is_err());
    }

    #[test]
    fn field_selector_terms() {
        let sel = FieldSelector::parse("spec.nodeName=n1,status.phase!=Failed").expect("parses");
        let obj = |f: &str| match f {
            "spec.nodeName" => "n1".to_owned(),
            "status.phase" => "Running".to_owned(),
            _ => String::new(),
        };
        assert!(sel.matches(obj));
        assert!(!sel.matches(|_| String::new()));
    }

    proptest! {
        #[test]
        fn equality_selector_matches_exactly_its_label(
            key in "[a-z][a-z0-9]{0,10}", value in "[a-z0-9]{1,10}", other in "[a-z0-9]{1,10}"
        ) {
            let sel = LabelSelector::parse(&format!("{key}={value}")).expect("valid");
            prop_assert!(sel.matches(&labels(&[(&key, &value)])));
            prop_assert_eq!(sel.matches(&labels(&[(&key, &other)])), value == other);
            let neg = LabelSelector::parse(&format!("{key}!={value}")).expect("valid");
            prop_assert_eq!(neg.matches(&labels(&[(&key, &other)])), value != other);
        }

        #[test]
        fn set_selector_is_membership(
            key in "[a-z]{1,8}", values in proptest::collection::vec("[a-z0-9]{1,6}", 1..5),
            probe in "[a-z0-9]{1,6}"
        ) {
            let sel = LabelSelector::parse(&format!("{key} in ({})", values.join(","))).expect("valid");
            prop_assert_eq!(sel.matches(&labels(&[(&key, &probe)])), values.contains(&probe));
            let not = LabelSelector::parse(&format!("{key} notin ({})", values.join(", "))).expect("valid");
            prop_assert_eq!(not.matches(&labels(&[(&key, &probe)])), !values.contains(&probe));
            prop_assert!(not.matches(&labels(&[])));
        }

        #[test]
        fn parser_never_panics(s in ".{0,40}") {
            let _ = LabelSelector::parse(&s);
            let _ = FieldSelector::parse(&s);
        }
    }
}
