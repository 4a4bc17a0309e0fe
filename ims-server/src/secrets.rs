//! Secret files: the admin token, the host token and the IMS signing key. Both are refused
//! unless only their owner can read them (mode 0600 or 0400).

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use mat6_proto::assertion::SigningKey;

/// Secret file errors.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// Cannot read.
    #[error("cannot read {what} {path}: {source}")]
    Read {
        /// Which secret.
        what: &'static str,
        /// Path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// Group/other can access it.
    #[error("{what} {path} has mode {mode:04o}; it must be 0600 (chmod 600 {path})")]
    TooOpen {
        /// Which secret.
        what: &'static str,
        /// Path.
        path: PathBuf,
        /// Mode.
        mode: u32,
    },
    /// Content invalid.
    #[error("{what} {path} is invalid: {reason}")]
    Invalid {
        /// Which secret.
        what: &'static str,
        /// Path.
        path: PathBuf,
        /// Why.
        reason: &'static str,
    },
    /// Cannot create.
    #[error("cannot create {path}: {source}")]
    Write {
        /// Path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
}

fn read_private(what: &'static str, path: &Path) -> Result<Vec<u8>, SecretError> {
    let meta = std::fs::metadata(path).map_err(|source| SecretError::Read {
        what,
        path: path.to_owned(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(SecretError::TooOpen {
            what,
            path: path.to_owned(),
            mode,
        });
    }
    std::fs::read(path).map_err(|source| SecretError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

/// Reads the admin token (trimmed; at least 16 characters).
pub fn read_admin_token(path: &Path) -> Result<String, SecretError> {
    read_token("admin token file", path)
}

/// Reads the host token (same rules as the admin token: mode 0600, trimmed,
/// at least 16 characters). It only authorizes `activate_standby`.
pub fn read_host_token(path: &Path) -> Result<String, SecretError> {
    read_token("host token file", path)
}

fn read_token(what: &'static str, path: &Path) -> Result<String, SecretError> {
    let bytes = read_private(what, path)?;
    let s = String::from_utf8(bytes).map_err(|_| SecretError::Invalid {
        what,
        path: path.to_owned(),
        reason: "not UTF-8",
    })?;
    let t = s.trim().to_owned();
    if t.len() < 16 {
        return Err(SecretError::Invalid {
            what,
            path: path.to_owned(),
            reason: "token shorter than 16 characters",
        });
    }
    Ok(t)
}

/// Reads the Ed25519 signing key: PKCS#8 DER, or PEM ("PRIVATE KEY", e.g.
/// `openssl genpkey -algorithm ed25519`).
pub fn read_signing_key(path: &Path) -> Result<SigningKey, SecretError> {
    let what = "signing key file";
    let bytes = read_private(what, path)?;
    let der = if bytes.starts_with(b"-----BEGIN") {
        let text = String::from_utf8_lossy(&bytes);
        let b64: String = text
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect::<Vec<_>>()
            .concat();
        base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .map_err(|_| SecretError::Invalid {
                what,
                path: path.to_owned(),
                reason: "bad PEM base64",
            })?
    } else {
        bytes
    };
    SigningKey::from_pkcs8(&der).map_err(|_| SecretError::Invalid {
        what,
        path: path.to_owned(),
        reason: "not an Ed25519 PKCS#8 key",
    })
}

/// Creates a file with mode 0600 (fails if it exists).
pub fn write_private(path: &Path, content: &[u8]) -> Result<(), SecretError> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| SecretError::Write {
            path: path.to_owned(),
            source,
        })?;
    f.write_all(content).map_err(|source| SecretError::Write {
        path: path.to_owned(),
        source,
    })
}

/// Generates a new signing key file.
pub fn generate_signing_key(path: &Path) -> Result<SigningKey, SecretError> {
    let der = SigningKey::generate_pkcs8().map_err(|_| SecretError::Invalid {
        what: "signing key",
        path: path.to_owned(),
        reason: "random generator failed",
    })?;
    write_private(path, &der)?;
    read_signing_key(path)
}

/// Generates a new admin token file (32 random bytes, base64url).
pub fn generate_admin_token(path: &Path) -> Result<String, SecretError> {
    use ring::rand::SecureRandom as _;
    let mut b = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| SecretError::Invalid {
            what: "admin token",
            path: path.to_owned(),
            reason: "random generator failed",
        })?;
    let t = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    write_private(path, format!("{t}\n").as_bytes())?;
    Ok(t)
}

/// Files written by [`generate_tls`].
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// CA certificate (give it to clients).
    pub ca: PathBuf,
    /// Server certificate chain.
    pub cert: PathBuf,
    /// Server private key (mode 0600).
    pub key: PathBuf,
}

/// Creates a private CA and a server certificate for `names` (DNS names or
/// IP addresses) in `dir`: `ca.pem`, `server.pem`, `server.key`. For labs
/// and tests; production operators may use openssl (see the README).
pub fn generate_tls(dir: &Path, names: &[String]) -> Result<TlsFiles, SecretError> {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let bad = |reason: &'static str| SecretError::Invalid {
        what: "TLS certificate",
        path: dir.to_owned(),
        reason,
    };
    let ca_key = KeyPair::generate().map_err(|_| bad("key generation failed"))?;
    let mut ca_params =
        CertificateParams::new(Vec::<String>::new()).map_err(|_| bad("CA parameters"))?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "mat6 IMS CA");
    let ca_cert = ca_params
        .self_signed(&ca_key)
        .map_err(|_| bad("CA signing failed"))?;
    let issuer = Issuer::new(ca_params, ca_key);
    let srv_key = KeyPair::generate().map_err(|_| bad("key generation failed"))?;
    let srv_params =
        CertificateParams::new(names.to_vec()).map_err(|_| bad("invalid server name"))?;
    let srv = srv_params
        .signed_by(&srv_key, &issuer)
        .map_err(|_| bad("certificate signing failed"))?;
    let files = TlsFiles {
        ca: dir.join("ca.pem"),
        cert: dir.join("server.pem"),
        key: dir.join("server.key"),
    };
    let w = |p: &Path, c: &str| {
        std::fs::write(p, c).map_err(|source| SecretError::Write {
            path: p.to_owned(),
            source,
        })
    };
    w(&files.ca, &ca_cert.pem())?;
    w(&files.cert, &srv.pem())?;
    write_private(&files.key, srv_key.serialize_pem().as_bytes())?;
    Ok(files)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn modes_and_round_trips() {
        let d = tempfile::tempdir().unwrap();
        let tok = d.path().join("tok");
        let t = generate_admin_token(&tok).unwrap();
        assert_eq!(read_admin_token(&tok).unwrap(), t);
        std::fs::set_permissions(&tok, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = read_admin_token(&tok).unwrap_err().to_string();
        assert!(e.contains("0644") && e.contains("tok"), "{e}");
        let host = d.path().join("host");
        let h = generate_admin_token(&host).unwrap();
        assert_eq!(read_host_token(&host).unwrap(), h);
        std::fs::set_permissions(&host, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = read_host_token(&host).unwrap_err().to_string();
        assert!(e.contains("host token file") && e.contains("0640"), "{e}");
        let sk = d.path().join("sk");
        let k = generate_signing_key(&sk).unwrap();
        assert_eq!(read_signing_key(&sk).unwrap().public_key(), k.public_key());
        assert!(generate_signing_key(&sk).is_err(), "must not overwrite");
        let bad = d.path().join("bad");
        write_private(&bad, b"junk").unwrap();
        assert!(matches!(
            read_signing_key(&bad),
            Err(SecretError::Invalid { .. })
        ));
    }
}
