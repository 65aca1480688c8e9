//! A node's identity: an ECDSA P-256 key and a self-signed certificate, and the
//! certificate's fingerprint that the peer pins (docs/PROTOCOL.md §3).
//!
//! There is no certificate authority: the certificate only carries the public key, and the
//! trust is the fingerprint (`sha256:` + hex SHA-256 of the certificate DER) that an operator
//! copies from `pairfs id` on one node into the other node's configuration. Names, chains and
//! validity dates in the certificate are therefore not meaningful and not checked.
//!
//! On disk, `DIR/identity.key` is the PKCS#8 private key in PEM (mode 0600) and
//! `DIR/identity.crt` the certificate in PEM. Both are written durably (temp file, fsync,
//! rename, fsync of the directory) and never overwritten: a new key would silently unpair
//! the node. Loading refuses a key file readable by group or others, as ssh does.
//!
//! ECDSA P-256 is chosen because rustls with the *ring* provider signs and verifies it in
//! TLS 1.3 on both sides and every TLS stack supports it.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use thiserror::Error;

use crate::{Result, TransportError};

/// File name of the private key in the identity directory.
pub const KEY_FILE: &str = "identity.key";
/// File name of the certificate in the identity directory.
pub const CERT_FILE: &str = "identity.crt";

/// Permission bits of the private key file: owner read/write only.
const KEY_MODE: u32 = 0o600;
/// Permission bits of the certificate: it is public.
const CERT_MODE: u32 = 0o644;

/// A node's key pair and self-signed certificate, both DER.
#[derive(Clone, PartialEq, Eq)]
pub struct Identity {
    /// The X.509 certificate, DER.
    pub cert_der: Vec<u8>,
    /// The private key, PKCS#8 DER.
    pub key_der: Vec<u8>,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the private key.
        f.debug_struct("Identity")
            .field("fingerprint", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// Makes a new ECDSA P-256 key and a self-signed certificate whose common name is
    /// `node_name` (informative only: the fingerprint is the trust).
    pub fn generate(node_name: &str) -> Result<Identity> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| TransportError::Generate(e.to_string()))?;
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, node_name);
        let cert = params
            .self_signed(&key)
            .map_err(|e| TransportError::Generate(e.to_string()))?;
        Ok(Identity {
            cert_der: cert.der().to_vec(),
            key_der: key.serialize_der(),
        })
    }

    /// The fingerprint of the certificate, which the peer pins.
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of_cert(&self.cert_der)
    }

    /// Writes `dir/identity.key` (PEM, mode 0600) and `dir/identity.crt` (PEM) durably.
    /// Refuses if either file already exists ([`TransportError::IdentityExists`]).
    pub fn save(&self, dir: &Path) -> Result<()> {
        let key_path = dir.join(KEY_FILE);
        let cert_path = dir.join(CERT_FILE);
        for path in [&key_path, &cert_path] {
            if fs::symlink_metadata(path).is_ok() {
                return Err(TransportError::IdentityExists { path: path.clone() });
            }
        }
        let key_pem = pem_encode("PRIVATE KEY", &self.key_der);
        let cert_pem = pem_encode("CERTIFICATE", &self.cert_der);
        // The key goes first: a crash in between leaves a key without a certificate, which
        // `load` reports, rather than a certificate whose key is lost.
        write_durably(&key_path, key_pem.as_bytes(), KEY_MODE)?;
        write_durably(&cert_path, cert_pem.as_bytes(), CERT_MODE)?;
        sync_dir(dir)?;
        tracing::info!(dir = %dir.display(), fingerprint = %self.fingerprint(), "identity saved");
        Ok(())
    }

    /// Reads the identity saved by [`Identity::save`] in `dir`, checking that the key file
    /// is not readable by group or others and that the key belongs to the certificate.
    pub fn load(dir: &Path) -> Result<Identity> {
        let key_path = dir.join(KEY_FILE);
        let cert_path = dir.join(CERT_FILE);

        let key_pem = read_file(&key_path)?;
        let mode = fs::metadata(&key_path)
            .map_err(|source| TransportError::IdentityIo {
                path: key_path.clone(),
                source,
            })?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            tracing::warn!(path = %key_path.display(), mode = format_args!("{:04o}", mode & 0o7777),
                "private key readable by group or others; refusing it");
            return Err(TransportError::KeyPermissions {
                path: key_path,
                mode: mode & 0o7777,
            });
        }
        let key = PrivatePkcs8KeyDer::from_pem_slice(&key_pem).map_err(|e| {
            TransportError::IdentityInvalid {
                path: key_path.clone(),
                reason: format!("not a PKCS#8 PEM private key: {e}"),
            }
        })?;

        let cert_pem = read_file(&cert_path)?;
        let cert = CertificateDer::from_pem_slice(&cert_pem).map_err(|e| {
            TransportError::IdentityInvalid {
                path: cert_path.clone(),
                reason: format!("not a PEM certificate: {e}"),
            }
        })?;

        let identity = Identity {
            cert_der: cert.to_vec(),
            key_der: key.secret_pkcs8_der().to_vec(),
        };
        identity
            .certified_key()
            .map_err(|e| TransportError::IdentityInvalid {
                path: key_path,
                reason: format!(
                    "key unusable or not the key of {}: {e}",
                    cert_path.display()
                ),
            })?;
        Ok(identity)
    }

    /// The certificate chain (just the certificate) for rustls.
    pub(crate) fn cert_chain(&self) -> Vec<CertificateDer<'static>> {
        vec![CertificateDer::from(self.cert_der.clone())]
    }

    /// The private key for rustls.
    pub(crate) fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }

    /// Parses the key with the ring provider and checks it matches the certificate.
    fn certified_key(&self) -> std::result::Result<CertifiedKey, rustls::Error> {
        CertifiedKey::from_der(
            self.cert_chain(),
            self.private_key(),
            &rustls::crypto::ring::default_provider(),
        )
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>> {
    fs::read(path).map_err(|source| {
        if source.kind() == io::ErrorKind::NotFound {
            TransportError::IdentityMissing {
                path: path.to_path_buf(),
            }
        } else {
            TransportError::IdentityIo {
                path: path.to_path_buf(),
                source,
            }
        }
    })
}

/// Writes `path` through a temporary file created with `mode`, fsynced, then renamed over.
fn write_durably(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    let io_err = |source| TransportError::IdentityIo {
        path: tmp.clone(),
        source,
    };
    // A temporary left by a crash may have any mode; `create_new` below must set ours.
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(e)),
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err)?;
    // The umask may have removed bits from `mode`; it can only have removed, so the key is
    // never more open than 0600. Set it exactly anyway, so the certificate is readable.
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io_err)?;
    file.write_all(data).map_err(io_err)?;
    file.sync_all().map_err(io_err)?;
    drop(file);
    fs::rename(&tmp, path).map_err(|source| TransportError::IdentityIo {
        path: path.to_path_buf(),
        source,
    })
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| TransportError::IdentityIo {
            path: dir.to_path_buf(),
            source,
        })
}

/// PEM-encodes `der` with the given label, `\n` line endings (the files are read on Unix).
fn pem_encode(label: &str, der: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new(label, der),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

/// SHA-256 of a certificate (DER): what a node pins to recognise its peer.
///
/// Displayed and parsed as `sha256:` followed by 64 lowercase hexadecimal digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint(pub [u8; 32]);

/// Text before the hex digits of a fingerprint.
const FINGERPRINT_PREFIX: &str = "sha256:";

impl Fingerprint {
    /// The fingerprint of a DER certificate.
    pub fn of_cert(cert_der: &[u8]) -> Fingerprint {
        let digest = ring::digest::digest(&ring::digest::SHA256, cert_der);
        let mut out = [0u8; 32];
        out.copy_from_slice(digest.as_ref());
        Fingerprint(out)
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(FINGERPRINT_PREFIX)?;
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Why a text is not a fingerprint.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FingerprintError {
    /// The text does not start with `sha256:`.
    #[error("a fingerprint starts with `sha256:` (as printed by `pairfs id`)")]
    MissingPrefix,
    /// The number of hex digits after `sha256:` is not 64.
    #[error("a fingerprint has 64 hex digits after `sha256:`, found {0} characters")]
    WrongLength(usize),
    /// A character after `sha256:` is not a hex digit.
    #[error("invalid character {ch:?} at position {pos} of the fingerprint's hex digits")]
    NotHex {
        /// The offending character.
        ch: char,
        /// Its index among the characters after `sha256:`.
        pos: usize,
    },
}

impl FromStr for Fingerprint {
    type Err = FingerprintError;

    /// Parses `sha256:` + 64 hex digits; upper-case digits and surrounding white space are
    /// accepted (copied text), the output of `Display` is always lower case.
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        let hex = s
            .trim()
            .strip_prefix(FINGERPRINT_PREFIX)
            .ok_or(FingerprintError::MissingPrefix)?;
        let count = hex.chars().count();
        if count != 64 {
            return Err(FingerprintError::WrongLength(count));
        }
        let mut out = [0u8; 32];
        for (pos, ch) in hex.chars().enumerate() {
            let nibble = ch
                .to_digit(16)
                .ok_or(FingerprintError::NotHex { ch, pos })?;
            // to_digit(16) is < 16, so it fits in a u8.
            out[pos / 2] |= (nibble as u8) << if pos % 2 == 0 { 4 } else { 0 };
        }
        Ok(Fingerprint(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_display_parse_round_trip() {
        let fp = Fingerprint::of_cert(b"not really a certificate");
        let text = fp.to_string();
        assert!(text.starts_with("sha256:"));
        assert_eq!(text.len(), 7 + 64);
        assert!(
            text[7..]
                .chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        assert_eq!(text.parse::<Fingerprint>(), Ok(fp));
        assert_eq!(
            format!(" {} \n", text.to_uppercase().replace("SHA256", "sha256")).parse(),
            Ok(fp)
        );
    }

    #[test]
    fn fingerprint_known_value() {
        // SHA-256 of the empty string.
        assert_eq!(
            Fingerprint::of_cert(b"").to_string(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn fingerprint_parse_errors() {
        let hex = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        assert_eq!(
            hex.parse::<Fingerprint>(),
            Err(FingerprintError::MissingPrefix)
        );
        assert_eq!(
            format!("sha1:{hex}").parse::<Fingerprint>(),
            Err(FingerprintError::MissingPrefix)
        );
        assert_eq!(
            format!("sha256:{}", &hex[1..]).parse::<Fingerprint>(),
            Err(FingerprintError::WrongLength(63))
        );
        assert_eq!(
            format!("sha256:{hex}0").parse::<Fingerprint>(),
            Err(FingerprintError::WrongLength(65))
        );
        assert_eq!(
            format!("sha256:{}g", &hex[1..]).parse::<Fingerprint>(),
            Err(FingerprintError::NotHex { ch: 'g', pos: 63 })
        );
        // Multi-byte characters are counted as characters, never sliced.
        assert_eq!(
            format!("sha256:é{}", &hex[1..]).parse::<Fingerprint>(),
            Err(FingerprintError::NotHex { ch: 'é', pos: 0 })
        );
    }

    #[test]
    fn pem_encoding_matches_parser() {
        for len in 0..70 {
            let der: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            let pem = pem_encode("CERTIFICATE", &der);
            let back = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
            assert_eq!(back.as_ref(), &der[..], "len {len}");
        }
    }

    #[test]
    fn generate_gives_distinct_usable_identities() {
        let a = Identity::generate("alpha").unwrap();
        let b = Identity::generate("alpha").unwrap();
        assert_ne!(a.fingerprint(), b.fingerprint());
        a.certified_key().unwrap();
        // Non-ASCII names are fine: the name is only informative.
        Identity::generate("nœud-β")
            .unwrap()
            .certified_key()
            .unwrap();
        assert!(!format!("{a:?}").contains("key_der"));
    }

    #[test]
    fn save_load_round_trip_with_key_mode_0600() {
        let dir = tempdir("round-trip");
        let id = Identity::generate("node-a").unwrap();
        id.save(&dir).unwrap();
        let mode = fs::metadata(dir.join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let loaded = Identity::load(&dir).unwrap();
        assert_eq!(loaded, id);
        assert_eq!(loaded.fingerprint(), id.fingerprint());
        assert!(!dir.join("identity.key.tmp").exists());
        // Never overwritten.
        let other = Identity::generate("node-b").unwrap();
        assert!(matches!(
            other.save(&dir),
            Err(TransportError::IdentityExists { .. })
        ));
        assert_eq!(Identity::load(&dir).unwrap(), id);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn load_errors_are_specific() {
        let dir = tempdir("load-errors");
        assert!(matches!(
            Identity::load(&dir),
            Err(TransportError::IdentityMissing { path }) if path.ends_with(KEY_FILE)
        ));

        let id = Identity::generate("node-a").unwrap();
        id.save(&dir).unwrap();

        fs::set_permissions(dir.join(KEY_FILE), fs::Permissions::from_mode(0o640)).unwrap();
        let err = Identity::load(&dir).unwrap_err();
        assert!(
            matches!(err, TransportError::KeyPermissions { mode: 0o640, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("chmod 600"));
        fs::set_permissions(dir.join(KEY_FILE), fs::Permissions::from_mode(0o600)).unwrap();

        fs::remove_file(dir.join(CERT_FILE)).unwrap();
        assert!(matches!(
            Identity::load(&dir),
            Err(TransportError::IdentityMissing { path }) if path.ends_with(CERT_FILE)
        ));

        fs::write(dir.join(CERT_FILE), "garbage\n").unwrap();
        assert!(matches!(
            Identity::load(&dir),
            Err(TransportError::IdentityInvalid { path, .. }) if path.ends_with(CERT_FILE)
        ));

        // Someone else's certificate next to our key.
        let other = Identity::generate("node-b").unwrap();
        fs::write(
            dir.join(CERT_FILE),
            pem_encode("CERTIFICATE", &other.cert_der),
        )
        .unwrap();
        let err = Identity::load(&dir).unwrap_err();
        assert!(
            matches!(&err, TransportError::IdentityInvalid { path, .. } if path.ends_with(KEY_FILE)),
            "{err}"
        );

        fs::write(dir.join(KEY_FILE), "-----BEGIN PRIVATE KEY-----\n!!\n").unwrap();
        assert!(matches!(
            Identity::load(&dir),
            Err(TransportError::IdentityInvalid { path, .. }) if path.ends_with(KEY_FILE)
        ));
        fs::remove_dir_all(&dir).unwrap();
    }

    fn tempdir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "pairfs-transport-{name}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }
}
