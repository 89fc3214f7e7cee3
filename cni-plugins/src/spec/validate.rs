//! The spec's rules for identifiers that reach file names, chain names and the kernel.

use super::{CniError, ErrorCode};

fn is_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// A container id must start with an alphanumeric and contain only alphanumerics, `_`, `.`, `-`.
pub fn validate_container_id(id: &str) -> Result<(), CniError> {
    if id.is_empty() {
        return Err(CniError::msg(
            ErrorCode::InvalidEnvironment,
            "CNI_CONTAINERID is empty",
        ));
    }
    if !is_name(id) {
        return Err(CniError::new(
            ErrorCode::InvalidEnvironment,
            "invalid characters in CNI_CONTAINERID",
            id,
        ));
    }
    Ok(())
}

/// A network name follows the same rule as a container id.
pub fn validate_network_name(name: &str) -> Result<(), CniError> {
    if name.is_empty() {
        return Err(CniError::msg(
            ErrorCode::InvalidConfig,
            "network name is missing",
        ));
    }
    if !is_name(name) {
        return Err(CniError::new(
            ErrorCode::InvalidConfig,
            "invalid characters in network name",
            name,
        ));
    }
    Ok(())
}

/// Linux interface names: 1 to 15 bytes, not `.` or `..`, no `/`, `:` or whitespace.
pub fn validate_ifname(name: &str) -> Result<(), CniError> {
    let bad = |why: &str| {
        Err(CniError::new(
            ErrorCode::InvalidEnvironment,
            format!("invalid CNI_IFNAME: {why}"),
            name,
        ))
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > 15 {
        return bad("longer than 15 bytes");
    }
    if name == "." || name == ".." {
        return bad("'.' and '..' are not interface names");
    }
    if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        return bad("contains '/', ':' or whitespace");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn container_ids() {
        assert!(validate_container_id("abc-1.2_3").is_ok());
        for bad in ["", "-a", "a/b", "a b", "../x", "a;b", "é"] {
            let e = validate_container_id(bad).unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidEnvironment, "{bad}");
        }
    }

    #[test]
    fn ifnames() {
        assert!(validate_ifname("eth0").is_ok());
        for bad in ["", ".", "..", "a/b", "a:b", "a b", "0123456789abcdef"] {
            assert!(validate_ifname(bad).is_err(), "{bad}");
        }
    }

    proptest! {
        #[test]
        fn accepted_ids_are_safe_file_names(id in "\\PC{0,40}") {
            if validate_container_id(&id).is_ok() {
                prop_assert!(!id.contains('/'));
                prop_assert!(!id.starts_with('.'));
            }
        }
    }
}
