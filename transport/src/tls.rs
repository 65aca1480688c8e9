//! TLS for QUIC with mutual authentication pinned to exactly one peer fingerprint.
//!
//! A pair has no certificate authority: each node's certificate is self-signed, and each
//! node's configuration names the one peer fingerprint it accepts (docs/PROTOCOL.md §3).
//! So the verifiers here replace the usual WebPKI path validation by a single check: the
//! end-entity certificate's SHA-256 equals the pinned [`Fingerprint`]. Names, chains,
//! extensions and validity dates are ignored — the pin is the whole trust, and an expiry
//! date would only make a pair stop working one day. What is *not* skipped is the proof
//! of possession: the handshake signature is verified against the pinned certificate's
//! key with the *ring* provider's algorithms, so presenting a copy of the peer's public
//! certificate is not enough.
//!
//! The same check runs on both sides: [`PinnedServerVerifier`] when we dial, and
//! [`PinnedClientVerifier`] (client certificate required) when we accept. A refusal is
//! logged at `warn` with the fingerprint presented and the one expected; the error sent to
//! the other side names only the fingerprint it presented.
//!
//! TLS 1.3 only (QUIC requires it), ALPN [`ALPN`], no session resumption or 0-RTT: a
//! connection is long-lived, so a full handshake on reconnect costs nothing noticeable
//! and keeps replay out of the picture.

use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::{Fingerprint, Identity, Result};

/// The ALPN protocol: `pairfs/` and the replication protocol's version (docs/PROTOCOL.md
/// title). A peer of another version fails the handshake (TLS `no_application_protocol`,
/// logged) rather than at the first message it cannot decode.
pub const ALPN: &[u8] = b"pairfs/5";

/// The server name the dialler puts in its ClientHello. It is not checked by anyone (the
/// pin is the trust) but QUIC requires a syntactically valid one.
pub(crate) const SERVER_NAME: &str = "pairfs";

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The rustls server configuration: presents `identity`, requires a client certificate
/// whose fingerprint is `peer`.
pub fn server_config(identity: &Identity, peer: Fingerprint) -> Result<rustls::ServerConfig> {
    let provider = provider();
    let verifier = PinnedClientVerifier(PinCheck::new(peer, &provider, "client"));
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(identity.cert_chain(), identity.private_key())?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    // No tickets, no 0-RTT (see the module documentation).
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    config.max_early_data_size = 0;
    Ok(config)
}

/// The rustls client configuration: presents `identity`, accepts only a server whose
/// certificate fingerprint is `peer`.
pub fn client_config(identity: &Identity, peer: Fingerprint) -> Result<rustls::ClientConfig> {
    let provider = provider();
    let verifier = PinnedServerVerifier(PinCheck::new(peer, &provider, "server"));
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(identity.cert_chain(), identity.private_key())?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    config.resumption = rustls::client::Resumption::disabled();
    config.enable_early_data = false;
    Ok(config)
}

/// The rejection reason given to rustls (and so, in the CONNECTION_CLOSE, to the peer).
struct NotPinned {
    presented: Fingerprint,
}

impl fmt::Display for NotPinned {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "certificate {} is not the pinned peer", self.presented)
    }
}

impl fmt::Debug for NotPinned {
    /// rustls formats `CertificateError::Other` with `Debug`: make it the readable text.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for NotPinned {}

/// The check shared by both verifiers.
#[derive(Debug)]
struct PinCheck {
    expected: Fingerprint,
    algorithms: WebPkiSupportedAlgorithms,
    /// "client" or "server": the role of the peer being checked, for the log.
    peer_role: &'static str,
}

impl PinCheck {
    fn new(expected: Fingerprint, provider: &CryptoProvider, peer_role: &'static str) -> Self {
        PinCheck {
            expected,
            algorithms: provider.signature_verification_algorithms,
            peer_role,
        }
    }

    fn check(&self, end_entity: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        let presented = Fingerprint::of_cert(end_entity);
        if presented == self.expected {
            tracing::debug!(peer = %presented, role = self.peer_role, "peer certificate matches the pin");
            return Ok(());
        }
        tracing::warn!(
            presented = %presented,
            expected = %self.expected,
            role = self.peer_role,
            "refusing {} certificate: not the pinned peer fingerprint",
            self.peer_role,
        );
        Err(rustls::Error::InvalidCertificate(CertificateError::Other(
            rustls::OtherError(Arc::new(NotPinned { presented })),
        )))
    }

    fn tls12(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Never reached (TLS 1.3 only), but if it were, it would be checked as well.
        self.check(cert)?;
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // rustls passes the certificate accepted by `verify_*_cert`; checking the pin again
        // costs one hash and does not rely on that.
        self.check(cert)?;
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }
}

/// Verifies the server's certificate when we dial: pinned fingerprint + handshake signature.
#[derive(Debug)]
pub struct PinnedServerVerifier(PinCheck);

impl PinnedServerVerifier {
    /// A verifier accepting only the certificate whose fingerprint is `peer`.
    pub fn new(peer: Fingerprint) -> Self {
        PinnedServerVerifier(PinCheck::new(peer, &provider(), "server"))
    }
}

impl ServerCertVerifier for PinnedServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.0.check(end_entity)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.algorithms.supported_schemes()
    }
}

/// Verifies the client's certificate when we accept: a certificate is required, and it
/// must be the pinned one with a valid handshake signature.
#[derive(Debug)]
pub struct PinnedClientVerifier(PinCheck);

impl PinnedClientVerifier {
    /// A verifier accepting only the certificate whose fingerprint is `peer`.
    pub fn new(peer: Fingerprint) -> Self {
        PinnedClientVerifier(PinCheck::new(peer, &provider(), "client"))
    }
}

impl ClientCertVerifier for PinnedClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No CA to hint at: the client sends its only certificate.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.0.check(end_entity)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_check_accepts_only_the_pinned_certificate() {
        let a = Identity::generate("a").unwrap();
        let b = Identity::generate("b").unwrap();
        let verifier = PinnedClientVerifier::new(a.fingerprint());
        let now = UnixTime::now();
        assert!(
            verifier
                .verify_client_cert(&CertificateDer::from(a.cert_der.clone()), &[], now)
                .is_ok()
        );
        let err = verifier
            .verify_client_cert(&CertificateDer::from(b.cert_der.clone()), &[], now)
            .unwrap_err();
        assert!(
            err.to_string().contains(&b.fingerprint().to_string()),
            "{err}"
        );
        assert!(
            !err.to_string().contains(&a.fingerprint().to_string()),
            "{err}"
        );
    }

    #[test]
    fn configs_build_and_speak_only_tls13_pairfs1() {
        let a = Identity::generate("a").unwrap();
        let b = Identity::generate("b").unwrap();
        let server = server_config(&a, b.fingerprint()).unwrap();
        let client = client_config(&a, b.fingerprint()).unwrap();
        assert_eq!(server.alpn_protocols, vec![b"pairfs/5".to_vec()]);
        assert_eq!(client.alpn_protocols, vec![b"pairfs/5".to_vec()]);
        // A key that is not the certificate's is refused when building, not at handshake.
        let mixed = Identity {
            cert_der: a.cert_der.clone(),
            key_der: b.key_der.clone(),
        };
        assert!(server_config(&mixed, b.fingerprint()).is_err());
        assert!(client_config(&mixed, b.fingerprint()).is_err());
    }
}
