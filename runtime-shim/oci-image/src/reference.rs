//! Image references: `[domain[:port]/]path[:tag][@digest]`.
//!
//! The grammar follows the one Docker and containerd accept, so a name that parses here is
//! one `ctr images import` and the CRI will take.

use std::fmt;
use std::str::FromStr;

use oci_spec::image::Digest;

/// Longest repository name (domain and path) that registries accept.
const MAX_NAME_LEN: usize = 255;
const MAX_TAG_LEN: usize = 128;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReferenceError {
    #[error("image reference is empty")]
    Empty,
    #[error("image reference {input:?}: repository name is longer than {MAX_NAME_LEN} characters")]
    NameTooLong { input: String },
    #[error("image reference {input:?}: repository name must be lowercase")]
    Uppercase { input: String },
    #[error("image reference {input:?}: invalid domain {domain:?}")]
    BadDomain { input: String, domain: String },
    #[error(
        "image reference {input:?}: invalid path component {component:?} (lowercase letters and \
         digits, separated by '.', '_', '__' or dashes)"
    )]
    BadPathComponent { input: String, component: String },
    #[error(
        "image reference {input:?}: invalid tag {tag:?} (letters, digits, '_', '.', '-', \
         at most {MAX_TAG_LEN}, not starting with '.' or '-')"
    )]
    BadTag { input: String, tag: String },
    #[error("image reference {input:?}: invalid digest {digest:?}: {reason}")]
    BadDigest {
        input: String,
        digest: String,
        reason: String,
    },
}

/// A parsed image reference. `Display` writes it back in its canonical textual form.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageReference {
    domain: Option<String>,
    path: String,
    tag: Option<String>,
    digest: Option<Digest>,
}

impl ImageReference {
    /// Parses a reference, checking every part.
    pub fn parse(input: &str) -> Result<Self, ReferenceError> {
        if input.is_empty() {
            return Err(ReferenceError::Empty);
        }
        let (rest, digest) = match input.split_once('@') {
            Some((rest, digest)) => (rest, Some(parse_digest(input, digest)?)),
            None => (input, None),
        };
        // A ':' after the last '/' starts the tag; one before it belongs to a domain port.
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(colon) => {
                let colon = last_slash + colon;
                (&rest[..colon], Some(&rest[colon + 1..]))
            }
            None => (rest, None),
        };
        if let Some(tag) = tag
            && !valid_tag(tag)
        {
            return Err(ReferenceError::BadTag {
                input: input.to_owned(),
                tag: tag.to_owned(),
            });
        }
        if name.is_empty() {
            return Err(ReferenceError::Empty);
        }
        if name.len() > MAX_NAME_LEN {
            return Err(ReferenceError::NameTooLong {
                input: input.to_owned(),
            });
        }
        let (domain, path) = match name.split_once('/') {
            Some((first, path)) if looks_like_domain(first) => (Some(first), path),
            _ => (None, name),
        };
        if let Some(domain) = domain
            && !valid_domain(domain)
        {
            return Err(ReferenceError::BadDomain {
                input: input.to_owned(),
                domain: domain.to_owned(),
            });
        }
        for component in path.split('/') {
            if !valid_path_component(component) {
                let err = if component.chars().any(|c| c.is_ascii_uppercase()) {
                    ReferenceError::Uppercase {
                        input: input.to_owned(),
                    }
                } else {
                    ReferenceError::BadPathComponent {
                        input: input.to_owned(),
                        component: component.to_owned(),
                    }
                };
                return Err(err);
            }
        }
        Ok(Self {
            domain: domain.map(str::to_owned),
            path: path.to_owned(),
            tag: tag.map(str::to_owned),
            digest,
        })
    }

    /// The registry part, if the reference names one.
    pub fn domain(&self) -> Option<&str> {
        self.domain.as_deref()
    }

    /// The repository path below the domain, e.g. `library/busybox`.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The repository name: domain and path, without tag or digest.
    pub fn repository(&self) -> String {
        match &self.domain {
            Some(domain) => format!("{domain}/{}", self.path),
            None => self.path.clone(),
        }
    }

    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    pub fn digest(&self) -> Option<&Digest> {
        self.digest.as_ref()
    }

    /// This reference with `latest` as its tag when it has neither tag nor digest, the way
    /// every container tool reads a bare name.
    #[must_use]
    pub fn with_default_tag(mut self) -> Self {
        if self.tag.is_none() && self.digest.is_none() {
            self.tag = Some("latest".to_owned());
        }
        self
    }

    /// The fully qualified form Docker and the CRI use: `docker.io` as the default domain,
    /// `library/` before single-component Docker Hub names, `latest` as the default tag.
    #[must_use]
    pub fn docker_normalized(mut self) -> Self {
        let domain = self.domain.get_or_insert_with(|| "docker.io".to_owned());
        if domain == "docker.io" && !self.path.contains('/') {
            self.path = format!("library/{}", self.path);
        }
        self.with_default_tag()
    }
}

impl FromStr for ImageReference {
    type Err = ReferenceError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        Self::parse(input)
    }
}

impl fmt::Display for ImageReference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(domain) = &self.domain {
            write!(f, "{domain}/")?;
        }
        f.write_str(&self.path)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

fn parse_digest(input: &str, digest: &str) -> Result<Digest, ReferenceError> {
    let bad = |reason: String| ReferenceError::BadDigest {
        input: input.to_owned(),
        digest: digest.to_owned(),
        reason,
    };
    let parsed: Digest = digest.parse().map_err(|e| bad(format!("{e}")))?;
    if crate::digest::sha256_hex(&parsed).is_none() {
        return Err(bad("only sha256 digests are supported".to_owned()));
    }
    Ok(parsed)
}

/// The first component is a domain when it could not be a path component: it has a '.' or
/// a ':' (port), or is `localhost`, or has uppercase letters.
fn looks_like_domain(first: &str) -> bool {
    first.contains(['.', ':'])
        || first == "localhost"
        || first.chars().any(|c| c.is_ascii_uppercase())
}

fn valid_domain(domain: &str) -> bool {
    let (host, port) = match domain.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (domain, None),
    };
    if let Some(port) = port
        && (port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()))
    {
        return false;
    }
    !host.is_empty()
        && host.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// `[a-z0-9]+` runs joined by one separator: `.`, `_`, `__` or one or more `-`.
fn valid_path_component(component: &str) -> bool {
    let bytes = component.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if bytes.is_empty() || !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < bytes.len() {
        if alnum(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let separator = &component[start..i];
        let ok = matches!(separator, "." | "_" | "__") || separator.bytes().all(|b| b == b'-');
        if !ok {
            return false;
        }
    }
    true
}

fn valid_tag(tag: &str) -> bool {
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let bytes = tag.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= MAX_TAG_LEN
        && word(bytes[0])
        && bytes.iter().all(|&b| word(b) || b == b'.' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const DIGEST: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn parses_the_common_shapes() {
        let r = ImageReference::parse("busybox").unwrap();
        assert_eq!((r.domain(), r.path(), r.tag()), (None, "busybox", None));

        let r = ImageReference::parse("ferrolet.local/pause:0.1.0").unwrap();
        assert_eq!(r.domain(), Some("ferrolet.local"));
        assert_eq!(r.path(), "pause");
        assert_eq!(r.tag(), Some("0.1.0"));
        assert_eq!(r.repository(), "ferrolet.local/pause");

        let r = ImageReference::parse("localhost:5000/a/b-c__d:v1").unwrap();
        assert_eq!(r.domain(), Some("localhost:5000"));
        assert_eq!(r.path(), "a/b-c__d");
        assert_eq!(r.tag(), Some("v1"));

        let r = ImageReference::parse(&format!("registry.k8s.io/pause:3.9@{DIGEST}")).unwrap();
        assert_eq!(r.tag(), Some("3.9"));
        assert_eq!(r.digest().unwrap().to_string(), DIGEST);

        // Without a '.' or ':' the first component is part of the path.
        let r = ImageReference::parse("library/busybox").unwrap();
        assert_eq!((r.domain(), r.path()), (None, "library/busybox"));
    }

    #[test]
    fn rejects_bad_references_with_the_reason() {
        let cases = [
            ("", "empty"),
            (":tag", "empty"),
            ("Busybox", "lowercase"),
            ("busybox:", "invalid tag"),
            ("busybox:-x", "invalid tag"),
            ("busybox:a b", "invalid tag"),
            ("a//b", "path component"),
            ("a/-b", "path component"),
            ("a/b./c", "path component"),
            ("a/b...c", "path component"),
            ("bad_domain.x:port/a", "invalid domain"),
            ("-x.io/a", "invalid domain"),
            ("busybox@sha256:abc", "invalid digest"),
            (
                &format!("busybox@sha512:{}", "a".repeat(128)),
                "only sha256",
            ),
        ];
        for (input, expected) in cases {
            let err = ImageReference::parse(input).unwrap_err().to_string();
            assert!(err.contains(expected), "{input:?}: {err}");
        }
        let long = format!("a/{}", "b".repeat(300));
        assert!(matches!(
            ImageReference::parse(&long),
            Err(ReferenceError::NameTooLong { .. })
        ));
    }

    #[test]
    fn normalizes_like_docker() {
        let r = ImageReference::parse("busybox")
            .unwrap()
            .docker_normalized();
        assert_eq!(r.to_string(), "docker.io/library/busybox:latest");
        let r = ImageReference::parse("me/app:1")
            .unwrap()
            .docker_normalized();
        assert_eq!(r.to_string(), "docker.io/me/app:1");
        let r = ImageReference::parse("ferrolet.local/pause")
            .unwrap()
            .docker_normalized();
        assert_eq!(r.to_string(), "ferrolet.local/pause:latest");
        let r = ImageReference::parse(&format!("x.io/app@{DIGEST}"))
            .unwrap()
            .docker_normalized();
        assert_eq!(r.tag(), None, "a digest reference needs no tag");
    }

    fn component() -> impl Strategy<Value = String> {
        "[a-z0-9]{1,5}((\\.|_|__|-{1,3})[a-z0-9]{1,5}){0,2}"
    }

    fn domain() -> impl Strategy<Value = String> {
        (
            "[a-z0-9]{1,6}(\\.[a-z0-9]([a-z0-9-]{0,4}[a-z0-9])?){1,2}",
            proptest::option::of(1u16..),
        )
            .prop_map(|(host, port)| match port {
                Some(port) => format!("{host}:{port}"),
                None => host,
            })
    }

    fn reference() -> impl Strategy<Value = String> {
        (
            proptest::option::of(domain()),
            proptest::collection::vec(component(), 1..4),
            proptest::option::of("[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}"),
            proptest::option::of("[0-9a-f]{64}"),
        )
            .prop_map(|(domain, mut path, tag, digest)| {
                // Without a domain, a first component with a '.' would be read as one.
                if domain.is_none() && path.len() > 1 {
                    path[0] = path[0].replace('.', "-");
                }
                let mut s = domain.map(|d| format!("{d}/")).unwrap_or_default();
                s.push_str(&path.join("/"));
                if let Some(tag) = tag {
                    s.push(':');
                    s.push_str(&tag);
                }
                if let Some(hex) = digest {
                    s.push_str("@sha256:");
                    s.push_str(&hex);
                }
                s
            })
    }

    proptest! {
        #[test]
        fn valid_references_round_trip(input in reference()) {
            let parsed = ImageReference::parse(&input).unwrap();
            prop_assert_eq!(parsed.to_string(), input.clone());
            prop_assert_eq!(ImageReference::parse(&parsed.to_string()).unwrap(), parsed);
        }

        #[test]
        fn arbitrary_input_never_panics_and_what_parses_round_trips(input in "\\PC{0,80}") {
            if let Ok(parsed) = ImageReference::parse(&input) {
                prop_assert_eq!(ImageReference::parse(&parsed.to_string()).unwrap(), parsed);
            }
        }

        #[test]
        fn uppercase_in_the_path_is_rejected(
            input in reference(),
            at in any::<prop::sample::Index>(),
        ) {
            let parsed = ImageReference::parse(&input).unwrap();
            let path = parsed.path().to_owned();
            let i = at.index(path.len());
            prop_assume!(path.as_bytes()[i].is_ascii_lowercase());
            let upper = format!(
                "{}{}{}",
                &path[..i],
                path[i..=i].to_ascii_uppercase(),
                &path[i + 1..]
            );
            // Without a domain, an uppercase first component is read as a domain (as Docker
            // does), so only later components must be rejected.
            let first_len = path.find('/').unwrap_or(path.len());
            prop_assume!(parsed.domain().is_some() || !path.contains('/') || i > first_len);
            let mut input = parsed.domain().map(|d| format!("{d}/")).unwrap_or_default();
            input.push_str(&upper);
            if let Some(tag) = parsed.tag() {
                input.push(':');
                input.push_str(tag);
            }
            prop_assert!(ImageReference::parse(&input).is_err());
        }
    }
}
