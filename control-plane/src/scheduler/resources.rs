//! Resource quantities as the scheduler counts them: every amount in thousandths of a unit
//! (millicores for cpu, millibytes for memory) so "100m" and "0.1" compare exactly.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, Pod};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

/// A quantity string that is not a Kubernetes quantity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid quantity {0:?}: expected a number with an optional suffix such as m, Ki, Mi, G")]
pub struct QuantityError(pub String);

/// Parses a Kubernetes quantity into thousandths, rounding fractions of a thousandth up (as
/// the API server does when it canonicalises).
pub fn parse_milli(s: &str) -> Result<i128, QuantityError> {
    let bad = || QuantityError(s.to_owned());
    let t = s.trim();
    if t.is_empty() {
        return Err(bad());
    }
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(t.len());
    let (num, suffix) = t.split_at(split);
    // Multiplier as (numerator, power of ten) on top of the x1000 for milli units.
    let (mult, exp10): (i128, i32) = match suffix {
        "" => (1, 0),
        "m" => (1, -3),
        "u" => (1, -6),
        "n" => (1, -9),
        "k" => (1, 3),
        "M" => (1, 6),
        "G" => (1, 9),
        "T" => (1, 12),
        "P" => (1, 15),
        "E" => (1, 18),
        "Ki" => (1 << 10, 0),
        "Mi" => (1 << 20, 0),
        "Gi" => (1 << 30, 0),
        "Ti" => (1 << 40, 0),
        "Pi" => (1 << 50, 0),
        "Ei" => (1 << 60, 0),
        s if s.starts_with(['e', 'E']) => (1, s[1..].parse::<i32>().map_err(|_| bad())?),
        _ => return Err(bad()),
    };
    let (neg, digits) = match num.as_bytes().first() {
        Some(b'-') => (true, &num[1..]),
        Some(b'+') => (false, &num[1..]),
        _ => (false, num),
    };
    let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
    if (int.is_empty() && frac.is_empty())
        || !int.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
        || int.len() + frac.len() > 30
    {
        return Err(bad());
    }
    // value = int.frac * mult * 10^exp10 * 1000, computed as an integer over 10^scale.
    let mantissa: i128 = format!("{int}{frac}").parse().map_err(|_| bad())?;
    let scale = frac.len() as i32 - exp10 - 3;
    let value = mantissa.checked_mul(mult).ok_or_else(bad)?;
    let out = if scale <= 0 {
        10i128
            .checked_pow((-scale) as u32)
            .and_then(|p| value.checked_mul(p))
            .ok_or_else(bad)?
    } else {
        match 10i128.checked_pow(scale as u32) {
            Some(p) => (value + p - 1) / p,
            None => i128::from(value > 0),
        }
    };
    Ok(if neg { -out } else { out })
}

/// Amounts by resource name, in thousandths.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resources(pub BTreeMap<String, i128>);

impl Resources {
    pub fn get(&self, name: &str) -> i128 {
        self.0.get(name).copied().unwrap_or(0)
    }

    pub fn add(&mut self, other: &Resources) {
        for (k, v) in &other.0 {
            *self.0.entry(k.clone()).or_insert(0) += v;
        }
    }

    pub fn sub(&mut self, other: &Resources) {
        for (k, v) in &other.0 {
            *self.0.entry(k.clone()).or_insert(0) -= v;
        }
    }

    fn max_with(&mut self, other: &Resources) {
        for (k, v) in &other.0 {
            let e = self.0.entry(k.clone()).or_insert(0);
            *e = (*e).max(*v);
        }
    }

    /// Reads a `resources.requests`-style map; unparsable values count as zero and are
    /// reported by the caller's validation, not here.
    pub fn from_map(map: Option<&BTreeMap<String, Quantity>>) -> Self {
        Resources(
            map.into_iter()
                .flatten()
                .filter_map(|(k, q)| parse_milli(&q.0).ok().map(|v| (k.clone(), v)))
                .collect(),
        )
    }
}

fn container_requests(c: &Container) -> Resources {
    let res = c.resources.as_ref();
    let requests = Resources::from_map(res.and_then(|r| r.requests.as_ref()));
    // A limit without a request defaults the request to the limit.
    let mut out = Resources::from_map(res.and_then(|r| r.limits.as_ref()));
    out.0.extend(requests.0);
    out
}

/// What a pod asks of a node: the sum of its containers, at least the largest init container
/// (they run one at a time, before the others), plus the pod overhead.
pub fn pod_requests(pod: &Pod) -> Resources {
    let mut sum = Resources::default();
    let Some(spec) = pod.spec.as_ref() else {
        return sum;
    };
    for c in &spec.containers {
        sum.add(&container_requests(c));
    }
    for c in spec.init_containers.iter().flatten() {
        sum.max_with(&container_requests(c));
    }
    sum.add(&Resources::from_map(spec.overhead.as_ref()));
    sum
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_the_usual_forms() {
        assert_eq!(parse_milli("100m").unwrap(), 100);
        assert_eq!(parse_milli("0.1").unwrap(), 100);
        assert_eq!(parse_milli("2").unwrap(), 2000);
        assert_eq!(parse_milli("1Ki").unwrap(), 1_024_000);
        assert_eq!(parse_milli("128Mi").unwrap(), 128 * 1024 * 1024 * 1000);
        assert_eq!(parse_milli("1G").unwrap(), 1_000_000_000_000);
        assert_eq!(parse_milli("1e3").unwrap(), 1_000_000);
        assert_eq!(parse_milli("1.5Gi").unwrap(), 1536 * 1024 * 1024 * 1000);
        // A fraction of a thousandth rounds up.
        assert_eq!(parse_milli("1u").unwrap(), 1);
    }

    #[test]
    fn rejects_garbage() {
        for bad in ["", "m", "1x", "1.2.3", "abc", "--1", "1Mii", "1e"] {
            assert!(parse_milli(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    proptest! {
        #[test]
        fn milli_and_whole_agree(n in 0i64..1_000_000_000) {
            prop_assert_eq!(parse_milli(&format!("{n}m")).unwrap(), i128::from(n));
            prop_assert_eq!(parse_milli(&n.to_string()).unwrap(), i128::from(n) * 1000);
            prop_assert_eq!(parse_milli(&format!("{n}Ki")).unwrap(), i128::from(n) * 1024 * 1000);
        }

        #[test]
        fn never_panics(s in ".{0,40}") {
            let _ = parse_milli(&s);
        }
    }
}
