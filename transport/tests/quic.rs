//! Real QUIC on 127.0.0.1: pinned mutual authentication, framed streams, hostile input,
//! and dead-peer detection.

// Test code: a failed unwrap is a failed test (helpers outside #[test] included).
#![allow(clippy::unwrap_used)]

use std::fmt::{self, Write as _};
use std::net::{SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::time::timeout;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Metadata, Subscriber, span};

use pairfs_transport::frame::{self, Header};
use pairfs_transport::{
    CLOSE_FRAME_ERROR, CLOSE_NORMAL, Connection, DEFAULT_MAX_FRAME, Endpoint, FrameError, Identity,
    TransportConfig, TransportError,
};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum TestMsg {
    Ping(u64),
    Text(String),
    Blob(Vec<u8>),
}

const PING: u8 = 1;
const TEXT: u8 = 2;
const BLOB: u8 = 3;

/// Generous bound for steps that take milliseconds; only hit when something is broken.
const STEP: Duration = Duration::from_secs(5);

fn localhost() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

struct Node {
    id: Identity,
    ep: Endpoint,
}

fn bind(id: &Identity, peer: &Identity) -> Endpoint {
    Endpoint::bind(
        localhost(),
        id,
        peer.fingerprint(),
        TransportConfig::default(),
    )
    .unwrap()
}

/// Two endpoints with fresh identities pinned to each other.
fn pair() -> (Node, Node) {
    let a = Identity::generate("alpha").unwrap();
    let b = Identity::generate("beta").unwrap();
    let ep_a = bind(&a, &b);
    let ep_b = bind(&b, &a);
    (Node { id: a, ep: ep_a }, Node { id: b, ep: ep_b })
}

/// `dialler` connects to `listener`; returns (dialler's connection, listener's).
async fn connect(dialler: &Endpoint, listener: &Endpoint) -> (Connection, Connection) {
    let addr = listener.local_addr().unwrap();
    let (out, inc) = tokio::join!(
        timeout(STEP, dialler.connect(addr)),
        timeout(STEP, listener.accept())
    );
    (out.unwrap().unwrap(), inc.unwrap().unwrap().unwrap())
}

/// A minimal `tracing` subscriber that keeps the text of every `warn!` event; the tests
/// run on a current-thread runtime, so the thread-local default sees quinn's tasks too.
#[derive(Clone, Default)]
struct Warnings(Arc<Mutex<Vec<String>>>);

impl Warnings {
    fn install(&self) -> tracing::subscriber::DefaultGuard {
        tracing::subscriber::set_default(self.clone())
    }

    fn all(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

struct Text(String);

impl Visit for Text {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let _ = write!(self.0, "{}={:?} ", field.name(), value);
    }
}

impl Subscriber for Warnings {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &span::Attributes<'_>) -> span::Id {
        span::Id::from_u64(1)
    }
    fn record(&self, _: &span::Id, _: &span::Record<'_>) {}
    fn record_follows_from(&self, _: &span::Id, _: &span::Id) {}
    fn event(&self, event: &Event<'_>) {
        if *event.metadata().level() == Level::WARN {
            let mut text = Text(String::new());
            event.record(&mut text);
            self.0.lock().unwrap().push(text.0);
        }
    }
    fn enter(&self, _: &span::Id) {}
    fn exit(&self, _: &span::Id) {}
}

/// Asserts that a warning names both fingerprints of a refusal.
fn assert_refusal_logged(warnings: &Warnings, presented: &Identity, expected: &Identity) {
    let (p, e) = (
        presented.fingerprint().to_string(),
        expected.fingerprint().to_string(),
    );
    let all = warnings.all();
    assert!(
        all.iter()
            .any(|w| w.contains(&format!("presented={p}")) && w.contains(&format!("expected={e}"))),
        "no warning names presented {p} and expected {e}: {all:#?}"
    );
}

#[tokio::test]
async fn messages_flow_both_ways_on_bi_and_uni_streams() {
    let (a, b) = pair();
    let (ca, cb) = connect(&a.ep, &b.ep).await;
    assert_eq!(ca.peer_fingerprint(), b.id.fingerprint());
    assert_eq!(cb.peer_fingerprint(), a.id.fingerprint());

    // Bidirectional: A opens, sends first (the peer learns of the stream then).
    let (mut a_send, mut a_recv) = ca.open_bi().await.unwrap();
    a_send.send(PING, &TestMsg::Ping(1)).await.unwrap();
    a_send
        .send(TEXT, &TestMsg::Text("héllo".into()))
        .await
        .unwrap();
    let (mut b_send, mut b_recv) = timeout(STEP, cb.accept_bi()).await.unwrap().unwrap();
    assert_eq!(
        b_recv.recv::<TestMsg>().await.unwrap(),
        Some((PING, TestMsg::Ping(1)))
    );
    assert_eq!(
        b_recv.recv::<TestMsg>().await.unwrap(),
        Some((TEXT, TestMsg::Text("héllo".into())))
    );
    b_send.send(PING, &TestMsg::Ping(2)).await.unwrap();
    assert_eq!(
        a_recv.recv::<TestMsg>().await.unwrap(),
        Some((PING, TestMsg::Ping(2)))
    );

    // Clean end of stream between frames is None.
    a_send.finish().unwrap();
    assert_eq!(b_recv.recv::<TestMsg>().await.unwrap(), None);

    // Unidirectional, each way.
    let mut a_uni = ca.open_uni().await.unwrap();
    a_uni.send(PING, &TestMsg::Ping(3)).await.unwrap();
    let mut b_uni_in = timeout(STEP, cb.accept_uni()).await.unwrap().unwrap();
    assert_eq!(
        b_uni_in.recv::<TestMsg>().await.unwrap(),
        Some((PING, TestMsg::Ping(3)))
    );
    let mut b_uni = cb.open_uni().await.unwrap();
    b_uni.send(PING, &TestMsg::Ping(4)).await.unwrap();
    b_uni.finish().unwrap();
    let mut a_uni_in = timeout(STEP, ca.accept_uni()).await.unwrap().unwrap();
    assert_eq!(
        a_uni_in.recv::<TestMsg>().await.unwrap(),
        Some((PING, TestMsg::Ping(4)))
    );
    assert_eq!(a_uni_in.recv::<TestMsg>().await.unwrap(), None);

    // recv_frame lets the caller pick the type from the kind.
    a_uni
        .send_encoded(&frame::encode(TEXT, "raw", DEFAULT_MAX_FRAME).unwrap())
        .await
        .unwrap();
    let (header, payload) = b_uni_in.recv_frame().await.unwrap().unwrap();
    assert_eq!(header.kind, TEXT);
    assert_eq!(
        frame::decode_payload::<String>(&header, &payload).unwrap(),
        "raw"
    );

    let stats = ca.stats();
    assert!(
        stats.bytes_sent > 0 && stats.bytes_received > 0,
        "{stats:?}"
    );
}

#[tokio::test]
async fn large_frame_works_and_oversize_is_refused() {
    let (a, b) = pair();
    let (ca, cb) = connect(&a.ep, &b.ep).await;
    let (mut send, _a_recv) = ca.open_bi().await.unwrap();

    // Payload = 4 (variant) + 8 (length) + n bytes; fill the 16 MiB frame exactly.
    let n = DEFAULT_MAX_FRAME as usize - 12;
    let big = TestMsg::Blob((0..n).map(|i| (i % 251) as u8).collect());
    let started = Instant::now();
    // The receiver must read while the sender writes: 16 MiB exceeds the stream window.
    let receiver = tokio::spawn(async move {
        let (_b_send, mut recv) = timeout(STEP, cb.accept_bi()).await.unwrap().unwrap();
        let first = timeout(Duration::from_secs(30), recv.recv::<TestMsg>())
            .await
            .unwrap()
            .unwrap();
        let second = recv.recv::<TestMsg>().await.unwrap();
        (first, second)
    });
    send.send(BLOB, &big).await.unwrap();

    // One byte more is refused locally with a clear error, and nothing is written.
    let too_big = TestMsg::Blob(vec![0; n + 1]);
    let err = send.send(BLOB, &too_big).await.unwrap_err();
    assert!(
        matches!(
            err,
            TransportError::Frame(FrameError::TooLarge { len, max }) if len == u64::from(DEFAULT_MAX_FRAME) + 1 && max == DEFAULT_MAX_FRAME
        ),
        "{err}"
    );
    assert!(err.to_string().contains("exceeds the limit"), "{err}");
    send.send(PING, &TestMsg::Ping(5)).await.unwrap();

    let (first, second) = receiver.await.unwrap();
    assert!(first == Some((BLOB, big)), "large message altered");
    assert_eq!(second, Some((PING, TestMsg::Ping(5))));
    eprintln!("16 MiB frame sent and received in {:?}", started.elapsed());
}

#[tokio::test]
async fn client_with_unpinned_certificate_is_refused() {
    let warnings = Warnings::default();
    let _guard = warnings.install();
    let (a, b) = pair();
    // Mallory pins B correctly, but B pins A, not Mallory.
    let mallory = Identity::generate("mallory").unwrap();
    let ep_m = bind(&mallory, &b.id);
    let b_addr = b.ep.local_addr().unwrap();

    let accept = tokio::spawn(async move {
        let got = timeout(Duration::from_millis(1500), b.ep.accept()).await;
        (b, got)
    });

    // TLS 1.3: the client's certificate is checked after the client finished, so the
    // refusal arrives either as a failed connect or as the connection closing at once.
    let err = match ep_m.connect(b_addr).await {
        Err(e) => e,
        Ok(conn) => timeout(STEP, conn.closed()).await.unwrap(),
    };
    let text = err.to_string();
    assert!(
        text.contains(&mallory.fingerprint().to_string()),
        "the refusal names the presented fingerprint: {text}"
    );
    assert!(!err.is_timeout(), "{err}");

    // B's accept did not return Mallory (it kept waiting, then timed out).
    let (b, got) = accept.await.unwrap();
    assert!(
        got.is_err(),
        "B accepted a connection it should have refused"
    );

    // And B still accepts A.
    let (ca, _cb) = connect(&a.ep, &b.ep).await;
    assert_eq!(ca.peer_fingerprint(), b.id.fingerprint());
}

#[tokio::test]
async fn server_with_unpinned_certificate_is_refused() {
    let warnings = Warnings::default();
    let _guard = warnings.install();
    let (a, b) = pair();
    // An impostor at some address, pinning A (so it would accept A), but it is not B.
    let impostor = Identity::generate("beta").unwrap();
    let ep_i = bind(&impostor, &a.id);
    let i_addr = ep_i.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = ep_i.accept().await;
    });
    let err = timeout(STEP, a.ep.connect(i_addr))
        .await
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, TransportError::Handshake { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains(&impostor.fingerprint().to_string()), "{text}");
    assert!(text.contains("not the pinned peer"), "{text}");
    assert_refusal_logged(&warnings, &impostor, &b.id);

    // The real B is fine.
    let (ca, _cb) = connect(&a.ep, &b.ep).await;
    assert_eq!(ca.peer_fingerprint(), b.id.fingerprint());
}

/// Captures the first datagram a real client sends: a genuine QUIC Initial.
async fn capture_initial(a: &Node, b: &Node) -> Vec<u8> {
    let trap = UdpSocket::bind(localhost()).unwrap();
    trap.set_read_timeout(Some(STEP)).unwrap();
    let trap_addr = trap.local_addr().unwrap();
    let dialler = bind(&a.id, &b.id);
    let attempt = tokio::spawn(async move {
        let _ = dialler.connect(trap_addr).await;
    });
    let initial = tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; 65536];
        let (n, _) = trap.recv_from(&mut buf).unwrap();
        buf.truncate(n);
        buf
    })
    .await
    .unwrap();
    attempt.abort();
    initial
}

#[tokio::test]
async fn garbage_datagrams_do_not_disturb_the_endpoint() {
    let (a, b) = pair();
    let b_addr = b.ep.local_addr().unwrap();
    let initial = capture_initial(&a, &b).await;
    assert!(initial.len() >= 1200, "QUIC pads Initials to 1200 bytes");
    assert_eq!(initial[0] & 0xc0, 0xc0, "long header");

    let sock = UdpSocket::bind(localhost()).unwrap();
    // Deterministic pseudo-random bytes (xorshift), many sizes.
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut rand = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for len in [0usize, 1, 2, 5, 20, 100, 1199, 1200, 1350, 1500, 9000] {
        for _ in 0..4 {
            let bytes: Vec<u8> = (0..len).map(|_| rand() as u8).collect();
            sock.send_to(&bytes, b_addr).unwrap();
        }
    }
    // Truncated real Initials, at every header boundary and inside the payload.
    for cut in [1, 5, 6, 10, 20, 30, 50, 100, 600, 1199] {
        sock.send_to(&initial[..cut.min(initial.len())], b_addr)
            .unwrap();
    }
    // Real Initial with flipped bytes (fails decryption or header checks).
    for pos in [0, 1, 5, 6, 20, 40, 200, 1000] {
        let mut bad = initial.clone();
        bad[pos] ^= 0x5a;
        sock.send_to(&bad, b_addr).unwrap();
    }
    // Long-header packet claiming an absurd length and connection ID lengths.
    let mut weird = vec![0xc3, 0, 0, 0, 1, 255];
    weird.extend((0..1200).map(|_| 0xffu8));
    sock.send_to(&weird, b_addr).unwrap();
    // A version negotiation-triggering unknown version.
    let mut unknown = initial.clone();
    unknown[1..5].copy_from_slice(&[0x1a, 0x2a, 0x3a, 0x4a]);
    sock.send_to(&unknown, b_addr).unwrap();

    // Genuine Initials (each of its own connection ID) from an address that then goes
    // silent: half-open handshakes that last until B's idle timeout (1 s). They must not
    // hold up the real client below. Six: more than the number of handshakes B runs
    // before it asks unvalidated addresses to retry, so that path is taken as well.
    for _ in 0..6 {
        let stall = capture_initial(&a, &b).await;
        assert_ne!(stall, initial);
        sock.send_to(&stall, b_addr).unwrap();
    }
    tokio::time::sleep(Duration::from_millis(50)).await;

    // The endpoint is still there and a good client gets through, without waiting for
    // the stranger's half-open handshake to time out (1 s).
    let started = Instant::now();
    let (ca, cb) = connect(&a.ep, &b.ep).await;
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_millis(800),
        "good client waited {waited:?}"
    );
    let (mut send, _) = ca.open_bi().await.unwrap();
    send.send(PING, &TestMsg::Ping(42)).await.unwrap();
    let (_, mut recv) = timeout(STEP, cb.accept_bi()).await.unwrap().unwrap();
    assert_eq!(
        recv.recv::<TestMsg>().await.unwrap(),
        Some((PING, TestMsg::Ping(42)))
    );
}

#[tokio::test]
async fn garbage_frames_give_specific_errors() {
    let (a, b) = pair();
    let (ca, cb) = connect(&a.ep, &b.ep).await;
    let good = frame::encode(PING, &TestMsg::Ping(7), DEFAULT_MAX_FRAME).unwrap();

    let mut bad_magic = good.clone();
    bad_magic[0] = b'G';
    let mut bad_version = good.clone();
    bad_version[2] = 9;
    let mut bad_crc = good.clone();
    *bad_crc.last_mut().unwrap() ^= 0x80;
    let oversize = frame::encode_header(Header {
        kind: BLOB,
        len: DEFAULT_MAX_FRAME + 1,
        crc: 0,
    })
    .to_vec();
    // Valid header and CRC, payload not a TestMsg (variant 0xffffffff does not exist).
    let undecodable = raw_frame(PING, &[0xff, 0xff, 0xff, 0xff, 1, 2]);
    // Valid header and CRC, a TestMsg followed by one extra byte.
    let trailing = raw_frame(PING, &[&good[frame::HEADER_LEN..], &[0]].concat());
    let truncated = good[..good.len() - 2].to_vec();

    type IsExpected = fn(&TransportError) -> bool;
    let cases: Vec<(&str, Vec<u8>, IsExpected)> = vec![
        (
            "bad magic",
            bad_magic,
            |e| matches!(e, TransportError::Frame(FrameError::BadMagic { found }) if *found == u16::from_le_bytes([b'G', 0x50])),
        ),
        ("bad version", bad_version, |e| {
            matches!(
                e,
                TransportError::Frame(FrameError::UnsupportedVersion { found: 9 })
            )
        }),
        ("bad crc", bad_crc, |e| {
            matches!(e, TransportError::Frame(FrameError::Checksum { .. }))
        }),
        ("oversize len", oversize, |e| {
            matches!(e, TransportError::Frame(FrameError::TooLarge { .. }))
        }),
        ("undecodable", undecodable, |e| {
            matches!(e, TransportError::Frame(FrameError::Decode(_)))
        }),
        ("trailing bytes", trailing, |e| {
            matches!(e, TransportError::Frame(FrameError::Decode(_)))
        }),
        ("truncated", truncated, |e| {
            matches!(e, TransportError::TruncatedFrame { .. })
        }),
    ];
    for (name, bytes, expected) in cases {
        let (mut send, _) = ca.open_bi().await.unwrap();
        // A good frame first: the receiver is mid-stream when the bad one comes.
        send.send_encoded(&good).await.unwrap();
        send.send_encoded(&bytes).await.unwrap();
        send.finish().unwrap();
        let (_, mut recv) = timeout(STEP, cb.accept_bi()).await.unwrap().unwrap();
        assert_eq!(
            recv.recv::<TestMsg>().await.unwrap(),
            Some((PING, TestMsg::Ping(7))),
            "{name}"
        );
        let err = timeout(STEP, recv.recv::<TestMsg>())
            .await
            .unwrap()
            .unwrap_err();
        assert!(expected(&err), "{name}: unexpected error {err:?}");
    }

    // The receiver closes the connection naming the reason; the sender learns it.
    cb.close_with_error(&FrameError::Checksum {
        expected: 1,
        actual: 2,
    });
    let err = timeout(STEP, ca.closed()).await.unwrap();
    match &err {
        TransportError::Connection(quinn::ConnectionError::ApplicationClosed(close)) => {
            assert_eq!(close.error_code, quinn::VarInt::from_u32(CLOSE_FRAME_ERROR));
            let reason = String::from_utf8_lossy(&close.reason);
            assert!(reason.contains("checksum"), "{reason}");
        }
        other => panic!("unexpected close: {other:?}"),
    }
}

/// A frame with a correct header and CRC around any payload.
fn raw_frame(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = frame::encode_header(Header {
        kind,
        len: payload.len() as u32,
        crc: crc32c_of(payload),
    })
    .to_vec();
    f.extend_from_slice(payload);
    f
}

fn crc32c_of(bytes: &[u8]) -> u32 {
    // The frame's checksum, computed the same way as the crate does; kept local so that a
    // wrong polynomial in the crate would fail the "undecodable" case with Checksum.
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[test]
fn dead_peer_is_noticed_by_idle_timeout() {
    let a = Identity::generate("alpha").unwrap();
    let b = Identity::generate("beta").unwrap();

    // B lives in its own runtime so that it can be killed without sending anything:
    // shutting the runtime down drops quinn's drivers before they can send a close.
    let b_rt = tokio::runtime::Runtime::new().unwrap();
    let (b_ep, b_addr) = {
        let _guard = b_rt.enter();
        let ep = bind(&b, &a);
        let addr = ep.local_addr().unwrap();
        (Arc::new(ep), addr)
    };
    {
        // B keeps its connection open until it is killed: a connection handle dropped
        // while the runtime runs would close it cleanly, which is not what a crash does.
        let ep = Arc::clone(&b_ep);
        b_rt.spawn(async move {
            let conn = ep.accept().await;
            std::future::pending::<()>().await;
            drop(conn);
        });
    }

    let a_rt = tokio::runtime::Runtime::new().unwrap();
    a_rt.block_on(async {
        let ep_a = bind(&a, &b);
        let ca = timeout(STEP, ep_a.connect(b_addr)).await.unwrap().unwrap();

        // Idle but alive: keep-alives hold the connection well past the idle timeout.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert!(ca.close_reason().is_none(), "{:?}", ca.close_reason());

        let killed = Instant::now();
        std::thread::spawn(move || b_rt.shutdown_background())
            .join()
            .unwrap();
        let err = timeout(Duration::from_secs(10), ca.closed()).await.unwrap();
        let noticed = killed.elapsed();
        assert!(err.is_timeout(), "expected an idle timeout, got {err}");
        assert!(
            noticed < Duration::from_secs(3),
            "dead peer noticed after {noticed:?}"
        );
        eprintln!("dead peer noticed after {noticed:?}");
        // The idle timeout (1 s) is what fired, not something faster.
        assert!(noticed >= Duration::from_millis(500), "{noticed:?}");
    });
    drop(b_ep);
}

/// A client certificate resolver that always presents the same certificate and key.
#[derive(Debug)]
struct Fixed(Arc<rustls::sign::CertifiedKey>);

impl rustls::client::ResolvesClientCert for Fixed {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// How a hand-made client fares against `b`'s endpoint: the error text it ends with.
async fn raw_dial(client: rustls::ClientConfig, b: &Endpoint) -> String {
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(client).unwrap();
    let ep = quinn::Endpoint::client(localhost()).unwrap();
    let connecting = ep
        .connect_with(
            quinn::ClientConfig::new(Arc::new(crypto)),
            b.local_addr().unwrap(),
            "pairfs",
        )
        .unwrap();
    let accept = timeout(Duration::from_millis(1500), b.accept());
    let dial = async {
        match timeout(STEP, connecting).await.unwrap() {
            Err(e) => e.to_string(),
            Ok(conn) => timeout(STEP, conn.closed()).await.unwrap().to_string(),
        }
    };
    let (accepted, text) = tokio::join!(accept, dial);
    assert!(accepted.is_err(), "the endpoint accepted: {text}");
    text
}

#[tokio::test]
async fn stolen_certificate_without_its_key_is_refused() {
    let (a, b) = pair();
    let warnings = Warnings::default();
    let _guard = warnings.install();
    // Mallory has A's certificate (public: it is sent in every handshake) but not A's key.
    // The fingerprint matches; the handshake signature cannot.
    let mallory = Identity::generate("mallory").unwrap();
    let provider = rustls::crypto::ring::default_provider();
    let key = provider
        .key_provider
        .load_private_key(rustls::pki_types::PrivateKeyDer::Pkcs8(
            mallory.key_der.clone().into(),
        ))
        .unwrap();
    let stolen = rustls::sign::CertifiedKey::new(vec![a.id.cert_der.clone().into()], key);
    let mut client = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(
            pairfs_transport::tls::PinnedServerVerifier::new(b.id.fingerprint()),
        ))
        .with_client_cert_resolver(Arc::new(Fixed(Arc::new(stolen))));
    client.alpn_protocols = vec![pairfs_transport::tls::ALPN.to_vec()];
    let text = raw_dial(client, &b.ep).await;
    assert!(
        text.contains("BadSignature"),
        "refused for the signature: {text}"
    );
    assert!(!text.contains("not the pinned peer"), "{text}");
    // The pin itself matched, so no pin refusal was logged; the handshake failure was.
    assert!(
        warnings.all().iter().all(|w| !w.contains("not the pinned")),
        "{:#?}",
        warnings.all()
    );
    assert!(
        warnings
            .all()
            .iter()
            .any(|w| w.contains("incoming connection refused"))
    );
}

#[tokio::test]
async fn client_without_certificate_or_with_wrong_alpn_is_refused() {
    let (a, b) = pair();

    let no_cert = {
        let mut c = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(
            pairfs_transport::tls::PinnedServerVerifier::new(b.id.fingerprint()),
        ))
        .with_no_client_auth();
        c.alpn_protocols = vec![pairfs_transport::tls::ALPN.to_vec()];
        c
    };
    let text = raw_dial(no_cert, &b.ep).await;
    assert!(text.contains("no certificates"), "{text}");

    let mut wrong_alpn = pairfs_transport::tls::client_config(&a.id, b.id.fingerprint()).unwrap();
    // A node of protocol version 1.
    wrong_alpn.alpn_protocols = vec![b"pairfs/1".to_vec()];
    let text = raw_dial(wrong_alpn, &b.ep).await;
    // Alert 120: no_application_protocol.
    assert!(text.contains("error 120"), "{text}");

    // The genuine A still gets in.
    let (ca, _cb) = connect(&a.ep, &b.ep).await;
    assert_eq!(ca.peer_fingerprint(), b.id.fingerprint());
}

#[tokio::test]
async fn closes_are_seen_with_their_reason() {
    let (a, b) = pair();
    let (ca, cb) = connect(&a.ep, &b.ep).await;
    ca.close(CLOSE_NORMAL, "shutting down");
    let err = timeout(STEP, cb.closed()).await.unwrap();
    assert!(!err.is_timeout());
    assert!(err.to_string().contains("shutting down"), "{err}");
    assert!(cb.close_reason().is_some());
    assert!(matches!(
        cb.open_uni().await,
        Err(TransportError::Connection(_))
    ));

    // Closing the endpoint ends a pending accept() with None, and later ones too.
    let waiter = async { b.ep.accept().await };
    let closer = async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        b.ep.close(CLOSE_NORMAL, "bye");
    };
    let (got, ()) = tokio::join!(timeout(STEP, waiter), closer);
    assert!(got.unwrap().unwrap().is_none());
    assert!(
        timeout(STEP, b.ep.accept())
            .await
            .unwrap()
            .unwrap()
            .is_none()
    );
    // And it dials no more.
    let err = b.ep.connect(a.ep.local_addr().unwrap()).await.unwrap_err();
    assert!(matches!(err, TransportError::Connect { .. }), "{err}");
}

#[tokio::test]
async fn recv_is_cancel_safe() {
    let (a, b) = pair();
    let (ca, cb) = connect(&a.ep, &b.ep).await;
    let (mut send, _) = ca.open_bi().await.unwrap();
    let msgs: Vec<TestMsg> = (0..6u8)
        .map(|i| TestMsg::Blob(vec![i; 90_000 * usize::from(i)]))
        .collect();
    let bytes: Vec<u8> = msgs
        .iter()
        .flat_map(|m| frame::encode(BLOB, m, DEFAULT_MAX_FRAME).unwrap())
        .collect();
    // Dribble the frames in small pieces so that frames arrive over many reads.
    let writer = tokio::spawn(async move {
        for piece in bytes.chunks(7_777) {
            send.send_encoded(piece).await.unwrap();
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        send.finish().unwrap();
        send
    });
    let (_, mut recv) = timeout(STEP, cb.accept_bi()).await.unwrap().unwrap();
    let mut got = Vec::new();
    let mut cancelled = 0;
    loop {
        tokio::select! {
            r = recv.recv::<TestMsg>() => match r.unwrap() {
                Some((_, m)) => got.push(m),
                None => break,
            },
            () = tokio::time::sleep(Duration::from_micros(300)) => cancelled += 1,
        }
    }
    let _send = writer.await.unwrap();
    assert!(got == msgs, "messages altered by cancelled receives");
    assert!(cancelled > 20, "only {cancelled} receives were cancelled");
}

#[tokio::test]
async fn silent_address_fails_to_connect_in_bounded_time() {
    let (a, _b) = pair();
    // A UDP socket that never answers.
    let silent = UdpSocket::bind(localhost()).unwrap();
    let started = Instant::now();
    let err = timeout(
        Duration::from_secs(10),
        a.ep.connect(silent.local_addr().unwrap()),
    )
    .await
    .unwrap()
    .unwrap_err();
    let took = started.elapsed();
    eprintln!("handshake with a silent address gave up after {took:?}");
    assert!(err.is_timeout(), "{err}");
    assert!(took < Duration::from_secs(5), "{took:?}");
}

#[test]
fn bind_outside_a_runtime_is_an_error_not_a_panic() {
    let a = Identity::generate("a").unwrap();
    let err =
        Endpoint::bind(localhost(), &a, a.fingerprint(), TransportConfig::default()).unwrap_err();
    assert!(err.to_string().contains("Tokio runtime"), "{err}");
}

#[tokio::test]
async fn invalid_config_is_refused() {
    let a = Identity::generate("a").unwrap();
    for cfg in [
        TransportConfig {
            keepalive: Duration::from_secs(2),
            ..TransportConfig::default()
        },
        TransportConfig {
            keepalive: Duration::ZERO,
            ..TransportConfig::default()
        },
        TransportConfig {
            max_frame: 0,
            ..TransportConfig::default()
        },
    ] {
        let err = Endpoint::bind(localhost(), &a, a.fingerprint(), cfg).unwrap_err();
        assert!(matches!(err, TransportError::InvalidConfig(_)), "{err}");
    }
}
