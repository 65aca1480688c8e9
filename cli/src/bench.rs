//! `pairfs bench-quic`: the raw loopback throughput of this build's transport — the same
//! QUIC + TLS + framing + message encoding that replication uses, without any volume — the
//! baseline of the catch-up benchmark (BENCHMARKS.md).

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use pairfs::repl::{Epoch, Message, WireBlock};
use pairfs_transport::{Endpoint, Identity, TransportConfig};

/// Streams copy messages of `blocks` × 4 KiB from one endpoint to another on loopback for
/// `seconds`; prints and returns the payload throughput in bytes per second.
pub(crate) fn bench_quic(seconds: f64, blocks: usize) -> Result<f64> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let a = Identity::generate("bench-a")?;
        let b = Identity::generate("bench-b")?;
        let lo = "127.0.0.1:0".parse().context("address")?;
        let ea = Endpoint::bind(lo, &a, b.fingerprint(), TransportConfig::default())?;
        let eb = Endpoint::bind(lo, &b, a.fingerprint(), TransportConfig::default())?;
        let addr = eb.local_addr()?;
        let receiver = tokio::spawn(async move {
            let conn = eb.accept().await?.context("no connection")?;
            let mut r = conn.accept_uni().await?;
            let mut bytes = 0u64;
            while let Some((_, m)) = r.recv::<Message>().await? {
                if let Message::CopyBlocks { blocks, .. } = m {
                    bytes += blocks.iter().map(|b| b.data.len() as u64).sum::<u64>();
                }
            }
            anyhow::Ok(bytes)
        });
        let conn = ea.connect(addr).await?;
        let mut s = conn.open_uni().await?;
        let msg = Message::CopyBlocks {
            epoch: Epoch(1),
            blocks: (0..blocks as u64)
                .map(|i| WireBlock {
                    block: i,
                    data: vec![(i % 251) as u8; 4096],
                    fresh: false,
                })
                .collect(),
        };
        let start = Instant::now();
        let until = start + Duration::from_secs_f64(seconds);
        while Instant::now() < until {
            s.send(2, &msg).await?;
        }
        s.finish()?;
        let bytes = receiver.await??;
        let secs = start.elapsed().as_secs_f64();
        conn.close(0, "done");
        let rate = bytes as f64 / secs;
        println!(
            "quic loopback: {:.1} MiB/s ({} MiB in {secs:.2} s, {blocks} blocks per message)",
            rate / (1 << 20) as f64,
            bytes >> 20
        );
        Ok(rate)
    })
}
