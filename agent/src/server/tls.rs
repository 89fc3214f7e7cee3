//! TLS of the kubelet HTTP API: a self-signed serving certificate made under the root dir
//! (made again when the names it must carry change), unless the configuration names its own
//! files; client certificates are verified against the cluster CA from the kubeconfig.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, KeyPair};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;

/// What stops the server's TLS from being set up; names the file or what is missing.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("generating the kubelet serving certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a usable PEM {what}: {message}")]
    Pem {
        path: PathBuf,
        what: &'static str,
        message: String,
    },
    #[error(
        "no client CA: the kubeconfig has no certificate-authority, so no client of the kubelet API could be authenticated"
    )]
    NoClientCa,
    #[error("client CA from the kubeconfig: {0}")]
    ClientCa(String),
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// Paths of the serving certificate and key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServingCert {
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes through a temp file and a rename, so a crash never leaves half a key.
fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), TlsError> {
    let tmp = path.with_extension("tmp");
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io(&tmp))?;
    file.write_all(contents).map_err(io(&tmp))?;
    file.sync_all().map_err(io(&tmp))?;
    fs::rename(&tmp, path).map_err(io(path))
}

/// Makes sure `<root_dir>/pki/kubelet.{crt,key}` exist and the certificate names exactly
/// `names` (host names and IPs); returns their paths.
pub fn ensure_self_signed(
    root_dir: &Path,
    node_name: &str,
    names: &[String],
) -> Result<ServingCert, TlsError> {
    let pki = root_dir.join("pki");
    fs::create_dir_all(&pki).map_err(io(&pki))?;
    let paths = ServingCert {
        cert: pki.join("kubelet.crt"),
        key: pki.join("kubelet.key"),
    };
    let names_file = pki.join("kubelet.names");
    let wanted = names.join("\n");
    let current = fs::read_to_string(&names_file).unwrap_or_default();
    if paths.cert.exists() && paths.key.exists() && current == wanted {
        return Ok(paths);
    }
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(names.to_vec())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("{node_name}@ferrolet"));
    params.distinguished_name = dn;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.not_after = rcgen::date_time_ymd(2100, 1, 1);
    let cert = params.self_signed(&key)?;
    write_atomic(&paths.key, key.serialize_pem().as_bytes(), 0o600)?;
    write_atomic(&paths.cert, cert.pem().as_bytes(), 0o644)?;
    write_atomic(&names_file, wanted.as_bytes(), 0o644)?;
    Ok(paths)
}

/// The server config: the serving certificate, and client certificates verified against
/// `client_ca_pem`. A client without a certificate still completes the handshake so it can be
/// told 401 in HTTP; a certificate the CA did not sign fails the handshake.
pub fn server_config(
    serving: &ServingCert,
    client_ca_pem: Option<&[u8]>,
) -> Result<rustls::ServerConfig, TlsError> {
    let ca_pem = client_ca_pem.ok_or(TlsError::NoClientCa)?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        let cert = cert.map_err(|e| TlsError::ClientCa(e.to_string()))?;
        roots
            .add(cert)
            .map_err(|e| TlsError::ClientCa(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(TlsError::ClientCa("no certificate in the PEM data".into()));
    }
    let verifier = WebPkiClientVerifier::builder(Arc::new(roots))
        .allow_unauthenticated()
        .build()
        .map_err(|e| TlsError::ClientCa(e.to_string()))?;
    let pem_err = |path: &Path, what| {
        let path = path.to_path_buf();
        move |e: rustls::pki_types::pem::Error| TlsError::Pem {
            path,
            what,
            message: e.to_string(),
        }
    };
    let chain = CertificateDer::pem_file_iter(&serving.cert)
        .map_err(pem_err(&serving.cert, "certificate"))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_err(&serving.cert, "certificate"))?;
    if chain.is_empty() {
        return Err(TlsError::Pem {
            path: serving.cert.clone(),
            what: "certificate",
            message: "no certificate in the file".into(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(&serving.key).map_err(pem_err(&serving.key, "key"))?;
    let mut config = rustls::ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca_pem() -> String {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.self_signed(&key).expect("ca").pem()
    }

    #[test]
    fn serving_cert_is_kept_until_its_names_change() {
        let dir = tempfile::tempdir().expect("tempdir");
        let names = vec!["node-a".to_owned(), "127.0.0.1".to_owned()];
        let first = ensure_self_signed(dir.path(), "node-a", &names).expect("first");
        let pem = fs::read(&first.cert).expect("cert");
        let again = ensure_self_signed(dir.path(), "node-a", &names).expect("again");
        assert_eq!(fs::read(&again.cert).expect("cert"), pem, "kept");
        let other = vec!["node-a".to_owned(), "10.0.0.5".to_owned()];
        ensure_self_signed(dir.path(), "node-a", &other).expect("renamed");
        assert_ne!(fs::read(&first.cert).expect("cert"), pem, "made again");
        use std::os::unix::fs::PermissionsExt as _;
        let mode = fs::metadata(&first.key).expect("key").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        server_config(&first, Some(ca_pem().as_bytes())).expect("config");
    }

    #[test]
    fn a_missing_or_bad_client_ca_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cert = ensure_self_signed(dir.path(), "n", &["n".to_owned()]).expect("cert");
        assert!(matches!(
            server_config(&cert, None),
            Err(TlsError::NoClientCa)
        ));
        let e = server_config(&cert, Some(b"not pem")).expect_err("junk");
        assert!(e.to_string().contains("client CA"), "{e}");
        let missing = ServingCert {
            cert: dir.path().join("nope.crt"),
            key: cert.key.clone(),
        };
        let e = server_config(&missing, Some(ca_pem().as_bytes())).expect_err("missing");
        assert!(e.to_string().contains("nope.crt"), "{e}");
    }
}
