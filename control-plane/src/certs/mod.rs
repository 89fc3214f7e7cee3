//! The cluster's certificates: a CA, the API server's serving certificate and the admin's
//! client certificate, made on first start under the data dir, plus `admin.kubeconfig`.
//!
//! The CA is kept; the serving certificate is made again whenever the names it must carry
//! change (a new `--listen` address or hostname), so the kubeconfig keeps working.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("generating certificate {what}: {source}")]
    Generate {
        what: &'static str,
        #[source]
        source: rcgen::Error,
    },
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a usable PEM key: {source}")]
    BadKey {
        path: PathBuf,
        #[source]
        source: rcgen::Error,
    },
}

const CA_CN: &str = "ferrolet-ca";

/// Paths of the PEM files under the data dir.
#[derive(Clone, Debug)]
pub struct CertPaths {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub serving_cert: PathBuf,
    pub serving_key: PathBuf,
    pub admin_cert: PathBuf,
    pub admin_key: PathBuf,
    /// The API server's own client identity towards nodes' agents (pod logs).
    pub kubelet_client_cert: PathBuf,
    pub kubelet_client_key: PathBuf,
    pub kubeconfig: PathBuf,
}

impl CertPaths {
    pub fn new(data_dir: &Path) -> Self {
        let pki = data_dir.join("pki");
        CertPaths {
            ca_cert: pki.join("ca.crt"),
            ca_key: pki.join("ca.key"),
            serving_cert: pki.join("apiserver.crt"),
            serving_key: pki.join("apiserver.key"),
            admin_cert: pki.join("admin.crt"),
            admin_key: pki.join("admin.key"),
            kubelet_client_cert: pki.join("apiserver-kubelet-client.crt"),
            kubelet_client_key: pki.join("apiserver-kubelet-client.key"),
            kubeconfig: data_dir.join("admin.kubeconfig"),
        }
    }
}

fn read(path: &Path) -> Result<String, CertError> {
    fs::read_to_string(path).map_err(|source| CertError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Writes `contents` atomically (temp file + rename); `secret` files are mode 0600.
fn write(path: &Path, contents: &str, secret: bool) -> Result<(), CertError> {
    let err = |source| CertError::Write {
        path: path.to_owned(),
        source,
    };
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(err)?;
    }
    let tmp = path.with_extension("tmp");
    let mode = if secret { 0o600 } else { 0o644 };
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(err)?;
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(err)?;
    file.write_all(contents.as_bytes()).map_err(err)?;
    file.sync_all().map_err(err)?;
    fs::rename(&tmp, path).map_err(err)
}

fn ca_params() -> Result<CertificateParams, CertError> {
    let mut params = CertificateParams::new(Vec::<String>::new())
        .map_err(|source| CertError::Generate { what: "ca", source })?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_CN);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_after = rcgen::date_time_ymd(2100, 1, 1);
    Ok(params)
}

fn leaf_params(
    what: &'static str,
    sans: Vec<String>,
    cn: &str,
    org: Option<&str>,
    usage: ExtendedKeyUsagePurpose,
) -> Result<CertificateParams, CertError> {
    let mut params =
        CertificateParams::new(sans).map_err(|source| CertError::Generate { what, source })?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    if let Some(org) = org {
        dn.push(DnType::OrganizationName, org);
    }
    params.distinguished_name = dn;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![usage];
    params.not_after = rcgen::date_time_ymd(2100, 1, 1);
    Ok(params)
}

fn load_key(path: &Path) -> Result<KeyPair, CertError> {
    KeyPair::from_pem(&read(path)?).map_err(|source| CertError::BadKey {
        path: path.to_owned(),
        source,
    })
}

/// Makes sure every certificate exists and the serving one names `sans`; returns the paths.
pub fn ensure(data_dir: &Path, sans: &[String]) -> Result<CertPaths, CertError> {
    let paths = CertPaths::new(data_dir);
    let gen_err = |what| move |source| CertError::Generate { what, source };

    let ca_key = if paths.ca_cert.exists() && paths.ca_key.exists() {
        load_key(&paths.ca_key)?
    } else {
        let key = KeyPair::generate().map_err(gen_err("ca key"))?;
        let cert = ca_params()?.self_signed(&key).map_err(gen_err("ca"))?;
        write(&paths.ca_key, &key.serialize_pem(), true)?;
        write(&paths.ca_cert, &cert.pem(), false)?;
        // A new CA invalidates every certificate it did not sign.
        let _ = fs::remove_file(&paths.serving_cert);
        let _ = fs::remove_file(&paths.admin_cert);
        let _ = fs::remove_file(&paths.kubelet_client_cert);
        key
    };
    let issuer = Issuer::new(ca_params()?, ca_key);

    let sans_file = paths.serving_cert.with_extension("sans");
    let wanted = sans.join("\n");
    let current = fs::read_to_string(&sans_file).unwrap_or_default();
    if !paths.serving_cert.exists() || !paths.serving_key.exists() || current != wanted {
        let key = KeyPair::generate().map_err(gen_err("serving key"))?;
        let params = leaf_params(
            "serving",
            sans.to_vec(),
            "ferrolet-apiserver",
            None,
            ExtendedKeyUsagePurpose::ServerAuth,
        )?;
        let cert = params
            .signed_by(&key, &issuer)
            .map_err(gen_err("serving"))?;
        write(&paths.serving_key, &key.serialize_pem(), true)?;
        write(&paths.serving_cert, &cert.pem(), false)?;
        write(&sans_file, &wanted, false)?;
    }

    if !paths.admin_cert.exists() || !paths.admin_key.exists() {
        let key = KeyPair::generate().map_err(gen_err("admin key"))?;
        let params = leaf_params(
            "admin",
            Vec::new(),
            "admin",
            Some("system:masters"),
            ExtendedKeyUsagePurpose::ClientAuth,
        )?;
        let cert = params.signed_by(&key, &issuer).map_err(gen_err("admin"))?;
        write(&paths.admin_key, &key.serialize_pem(), true)?;
        write(&paths.admin_cert, &cert.pem(), false)?;
    }

    if !paths.kubelet_client_cert.exists() || !paths.kubelet_client_key.exists() {
        let key = KeyPair::generate().map_err(gen_err("kubelet client key"))?;
        let params = leaf_params(
            "kubelet client",
            Vec::new(),
            "kube-apiserver-kubelet-client",
            Some("system:masters"),
            ExtendedKeyUsagePurpose::ClientAuth,
        )?;
        let cert = params
            .signed_by(&key, &issuer)
            .map_err(gen_err("kubelet client"))?;
        write(&paths.kubelet_client_key, &key.serialize_pem(), true)?;
        write(&paths.kubelet_client_cert, &cert.pem(), false)?;
    }
    Ok(paths)
}

/// Standard base64 with padding (kubeconfig data fields, Secret data).
pub(crate) fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Writes the admin kubeconfig pointing at `server` (e.g. `https://127.0.0.1:6443`), with the
/// certificates inline so the file works when copied elsewhere.
pub fn write_kubeconfig(paths: &CertPaths, server: &str) -> Result<(), CertError> {
    let ca = read(&paths.ca_cert)?;
    let cert = read(&paths.admin_cert)?;
    let key = read(&paths.admin_key)?;
    let config = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: ferrolet\n  cluster:\n    server: {server}\n    certificate-authority-data: {}\nusers:\n- name: admin\n  user:\n    client-certificate-data: {}\n    client-key-data: {}\ncontexts:\n- name: admin@ferrolet\n  context:\n    cluster: ferrolet\n    user: admin\n    namespace: default\ncurrent-context: admin@ferrolet\n",
        base64(ca.as_bytes()),
        base64(cert.as_bytes()),
        base64(key.as_bytes()),
    );
    write(&paths.kubeconfig, &config, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_rfc_4648_vectors() {
        let cases = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ];
        for (input, want) in cases {
            assert_eq!(base64(input.as_bytes()), want);
        }
    }

    #[test]
    fn certificates_are_made_once_and_the_serving_one_follows_the_names() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sans = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
        let paths = ensure(dir.path(), &sans).expect("first start");
        let ca = fs::read_to_string(&paths.ca_cert).expect("ca");
        let serving = fs::read_to_string(&paths.serving_cert).expect("serving");
        let mode = fs::metadata(&paths.admin_key)
            .expect("key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        ensure(dir.path(), &sans).expect("second start");
        assert_eq!(fs::read_to_string(&paths.ca_cert).expect("ca"), ca);
        assert_eq!(
            fs::read_to_string(&paths.serving_cert).expect("serving"),
            serving
        );

        let more = vec!["localhost".to_owned(), "10.1.2.3".to_owned()];
        ensure(dir.path(), &more).expect("new address");
        assert_eq!(fs::read_to_string(&paths.ca_cert).expect("ca"), ca);
        assert_ne!(
            fs::read_to_string(&paths.serving_cert).expect("serving"),
            serving
        );

        write_kubeconfig(&paths, "https://127.0.0.1:6443").expect("kubeconfig");
        let kubeconfig = fs::read_to_string(&paths.kubeconfig).expect("kubeconfig");
        assert!(kubeconfig.contains("server: https://127.0.0.1:6443"));
    }

    #[test]
    fn a_corrupt_ca_key_is_reported_with_its_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = ensure(dir.path(), &["localhost".to_owned()]).expect("first start");
        fs::write(&paths.ca_key, "garbage").expect("corrupt");
        let err = ensure(dir.path(), &["localhost".to_owned()]).expect_err("corrupt key");
        assert!(err.to_string().contains("ca.key"), "{err}");
    }
}
