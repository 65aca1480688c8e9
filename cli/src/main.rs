//! `pairfs`: the command-line tool and node daemon (docs/DESIGN.md §2, `cli/`).
//!
//! Wires the layers together: a data directory, its volume (with recovery), the FS core and
//! the FUSE session; parses and checks every argument with a clear message.

mod bench;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use pairfs::datadir::{CreateParams, DataDir};
use pairfs::{Volume, VolumeOptions};
use pairfs_fs::fsck::fsck;
use pairfs_fs::{FormatOptions, Fs, FsOptions};
use pairfs_transport::Identity;

use pairfs_cli::config::NodeConfig;
use pairfs_cli::daemon::{MountOpts, mount_standalone, run_node};
use pairfs_cli::size::parse_size;
use pairfs_cli::{node, rejoin, size, state};

/// pairfs: a replicated NAS filesystem.
#[derive(Parser, Debug)]
#[command(name = "pairfs", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Create a node's data directory: a volume, a journal, a TLS identity, and (unless
    /// --secondary) an empty filesystem.
    Init {
        /// The data directory (created if missing).
        #[arg(long)]
        data: PathBuf,
        /// Volume size, e.g. 16G, 512M, 1T (binary units).
        #[arg(long, value_parser = parse_size)]
        size: u64,
        /// Block size in bytes: a power of two from 4096 to 65536.
        #[arg(long, default_value_t = 4096)]
        block_size: u32,
        /// Journal size (default: 1/8 of the volume, between 16M and 1G).
        #[arg(long, value_parser = parse_size)]
        journal_size: Option<u64>,
        /// Size of the local-unreflected area, where a node that takes over writes until
        /// the old primary's backlog has drained and merged (default: the journal's).
        #[arg(long, value_parser = parse_size)]
        lu_size: Option<u64>,
        /// Number of inodes (default: one per 16 KiB of volume).
        #[arg(long)]
        inodes: Option<u64>,
        /// A blank secondary: no filesystem; its first pairing copies the primary's volume.
        #[arg(long)]
        secondary: bool,
        /// Name written into the node's certificate.
        #[arg(long, default_value = "pairfs")]
        name: String,
        /// Overwrite an existing data directory.
        #[arg(long)]
        force: bool,
    },
    /// Print the fingerprint of a node's identity (for its peer's configuration).
    Id {
        /// The data directory.
        #[arg(long)]
        data: PathBuf,
    },
    /// Mount the filesystem and serve it in the foreground until unmounted or signalled.
    /// With --config, the node also replicates (a secondary's mount is read-only).
    Mount {
        /// The data directory (a node without replication).
        #[arg(long, conflicts_with = "config", required_unless_present = "config")]
        data: Option<PathBuf>,
        /// The node configuration (replication).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Where to mount.
        mountpoint: PathBuf,
        #[command(flatten)]
        opts: MountOpts,
    },
    /// Run a replicated node without a mount (until SIGINT/SIGTERM).
    Serve {
        /// The node configuration.
        #[arg(long)]
        config: PathBuf,
    },
    /// Show a running node's replication status.
    Status {
        /// The node configuration.
        #[arg(long, conflicts_with = "data", required_unless_present = "data")]
        config: Option<PathBuf>,
        /// Or its data directory.
        #[arg(long)]
        data: Option<PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Refresh every second.
        #[arg(long)]
        watch: bool,
    },
    /// Compare every block in use on the two nodes of a running pair (online verify, run on
    /// the primary); exits 1 if any block differs, 2 if the verify could not run.
    Verify {
        /// The primary's node configuration.
        #[arg(long)]
        config: PathBuf,
        /// Write the differing blocks again from the primary (resyncing the secondary),
        /// then compare them once more.
        #[arg(long)]
        repair: bool,
        /// Machine-readable result.
        #[arg(long)]
        json: bool,
    },
    /// Make this node (the secondary) the primary at once, while the old primary is
    /// reachable (docs/PROTOCOL.md §7.3): the old primary freezes and turns read-only, this
    /// node accepts writes when the command returns; the blocks it still lacks are read
    /// from the old primary while its backlog drains. With `--force`, when the old primary
    /// is gone (§7.7): this node continues from what it holds and reports exactly what it
    /// lacks.
    Takeover {
        /// This node's configuration.
        #[arg(long)]
        config: PathBuf,
        /// The old primary is gone (you attest it: it must not come back as primary
        /// without being told). Continue from what this node holds, as a new generation,
        /// and report what it never received; a takeover cut short sets this node's own
        /// writes aside in DATA/preserved/.
        #[arg(long)]
        force: bool,
        /// Machine-readable result.
        #[arg(long)]
        json: bool,
    },
    /// Make an old primary that was fenced on its return after a forced takeover the new
    /// primary's secondary again (docs/PROTOCOL.md §7.8), with the node stopped: its tail
    /// (what the new primary never got) is reported and its files copied into
    /// DATA/preserved/; at its next start only the blocks changed on either side since the
    /// divergence are resynced.
    Rejoin {
        /// This node's configuration.
        #[arg(long)]
        config: PathBuf,
        /// Machine-readable result.
        #[arg(long)]
        json: bool,
    },
    /// Measure this build's raw loopback QUIC throughput (benchmark baseline).
    #[command(hide = true)]
    BenchQuic {
        /// Seconds to stream.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// 4 KiB blocks per message.
        #[arg(long, default_value_t = 256)]
        blocks: usize,
    },
    /// Check every on-disk invariant; exits 1 with a report on any inconsistency.
    Fsck {
        /// The data directory.
        #[arg(long)]
        data: PathBuf,
    },
}

fn main() -> ExitCode {
    // Two malloc arenas instead of eight per core: the FUSE threads allocate and free
    // block-sized buffers constantly, and per-thread arenas kept tens of MiB of freed memory
    // each (measured: RSS 300 MiB → see BENCHMARKS.md).
    // SAFETY: mallopt only tunes glibc's allocator, before any other thread exists.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 2) };
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let r = match cli.cmd {
        Cmd::Init {
            data,
            size,
            block_size,
            journal_size,
            lu_size,
            inodes,
            secondary,
            name,
            force,
        } => init(
            &data,
            &CreateParams {
                size,
                block_size,
                journal_size,
                lu_size,
                force,
            },
            inodes,
            secondary,
            &name,
        )
        .map(|()| ExitCode::SUCCESS),
        Cmd::Id { data } => Identity::load(&data)
            .map(|i| {
                println!("{}", i.fingerprint());
                ExitCode::SUCCESS
            })
            .with_context(|| format!("reading the identity in {}", data.display())),
        Cmd::Mount {
            data,
            config,
            mountpoint,
            opts,
        } => match (data, config) {
            (Some(d), _) => mount_standalone(&d, &mountpoint, &opts),
            (None, Some(c)) => run_node(&c, Some((&mountpoint, &opts))),
            (None, None) => Err(anyhow::anyhow!("give --data or --config")),
        }
        .map(|()| ExitCode::SUCCESS),
        Cmd::Serve { config } => run_node(&config, None).map(|()| ExitCode::SUCCESS),
        Cmd::Status {
            config,
            data,
            json,
            watch,
        } => status(config.as_deref(), data.as_deref(), json, watch).map(|()| ExitCode::SUCCESS),
        Cmd::Verify {
            config,
            repair,
            json,
        } => verify(&config, repair, json),
        Cmd::Takeover {
            config,
            json,
            force,
        } => takeover(&config, json, force),
        Cmd::Rejoin { config, json } => rejoin_cmd(&config, json),
        Cmd::BenchQuic { seconds, blocks } => {
            bench::bench_quic(seconds, blocks).map(|_| ExitCode::SUCCESS)
        }
        Cmd::Fsck { data } => run_fsck(&data),
    };
    match r {
        Ok(c) => c,
        Err(e) => {
            eprintln!("pairfs: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn init(
    data: &Path,
    params: &CreateParams,
    inodes: Option<u64>,
    secondary: bool,
    name: &str,
) -> Result<()> {
    let (dd, id) = DataDir::create(data, params)?;
    let identity = Identity::generate(name).context("creating the node's identity")?;
    identity.save(data).context("writing the node's identity")?;
    let (n, j) = dd.devices(false)?;
    let mut vol = Volume::open(n, j, VolumeOptions::default()).context("opening the new volume")?;
    if secondary {
        vol.close().context("flushing the new volume")?;
        state::save_state(data, &pairfs::repl::PersistedState::new_secondary())?;
        println!(
            "pairfs: created blank secondary {} — {} blocks of {} bytes ({}); fingerprint {}",
            data.display(),
            vol.block_count(),
            vol.block_size(),
            size::human(vol.block_count() * vol.block_size() as u64),
            identity.fingerprint()
        );
        return Ok(());
    }
    Fs::format(&mut vol, &FormatOptions { inodes }).context("creating the filesystem")?;
    vol.close().context("flushing the new volume")?;
    let fs = Fs::open(vol, FsOptions::default()).context("checking the new filesystem")?;
    let sb = fs.superblock();
    println!(
        "pairfs: created {} — volume {id}, {} blocks of {} bytes ({}), {} inodes, journal {}; fingerprint {}",
        data.display(),
        sb.total_blocks,
        sb.block_size,
        size::human(sb.total_blocks * u64::from(sb.block_size)),
        sb.inode_count,
        size::human(fs.with_volume(|v| v.journal().header().capacity)),
        identity.fingerprint()
    );
    Ok(())
}

fn verify(config: &Path, repair: bool, json: bool) -> Result<ExitCode> {
    use std::io::{IsTerminal, Write};
    let dir = NodeConfig::load(config)?.data;
    let tty = std::io::stderr().is_terminal();
    let mut last_line = std::time::Instant::now();
    let result = node::run_verify(&dir, repair, |u| {
        let node::VerifyUpdate::Progress {
            compared,
            total,
            differ,
            bytes_per_s,
        } = u
        else {
            return;
        };
        if json {
            return;
        }
        let line = progress_bar(
            "verify",
            *compared,
            *total,
            bytes_per_s / 4096.0,
            4096.0,
            &format!(" · {differ} differ"),
        );
        if tty {
            eprint!("\r{line}");
        } else if last_line.elapsed() >= Duration::from_secs(5) {
            last_line = std::time::Instant::now();
            eprintln!("{line}");
        }
        let _ = std::io::stderr().flush();
    })?;
    if tty && !json {
        eprintln!();
    }
    let report = match result {
        node::VerifyUpdate::Done(r) => r,
        node::VerifyUpdate::Failed { error } => {
            if json {
                println!("{}", serde_json::json!({ "error": error }));
            } else {
                eprintln!("pairfs: verify failed: {error}");
            }
            return Ok(ExitCode::from(2));
        }
        node::VerifyUpdate::Progress { .. } => bail!("the daemon ended the verify early"),
    };
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", verify_text(&report));
    }
    Ok(if report.differing == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn verify_text(r: &node::VerifyReport) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "verify: {} blocks ({}) compared in {:.1} s: {}",
        r.blocks_compared,
        size::human(r.bytes_compared),
        r.seconds,
        if r.differing == 0 {
            "the nodes hold the same data".to_string()
        } else {
            format!("{} block(s) DIFFER", r.differing)
        }
    );
    for (b, owner) in &r.listed {
        let _ = writeln!(o, "  block {b}: {owner}");
    }
    if r.differing > r.listed.len() as u64 {
        let _ = writeln!(o, "  … and {} more", r.differing - r.listed.len() as u64);
    }
    if r.invisible > 0 {
        let _ = writeln!(
            o,
            "  ({} block(s) differ where no reader sees them: free, or allocated and never written)",
            r.invisible
        );
    }
    if let Some(n) = r.repaired {
        let _ = writeln!(
            o,
            "repair: {n} block(s) written again from the primary and now equal{}",
            if r.unrepaired > 0 {
                format!("; {} still differ", r.unrepaired)
            } else {
                String::new()
            }
        );
    }
    o
}

/// `label [#####-----]  42.0% done/total units · rate/s · ETA n s` + `extra`.
fn progress_bar(label: &str, done: u64, total: u64, rate: f64, unit: f64, extra: &str) -> String {
    let pct = if total == 0 {
        100.0
    } else {
        (done as f64 * 100.0 / total as f64).min(100.0)
    };
    let width = 30;
    let filled = ((pct / 100.0) * width as f64) as usize;
    let eta = if rate > 0.0 && total > done {
        format!("{:.0} s", (total - done) as f64 / rate)
    } else {
        "-".into()
    };
    format!(
        "{label:<9} [{}{}] {pct:5.1}% {done}/{total} blocks · {}/s · ETA {eta}{extra}",
        "#".repeat(filled),
        "-".repeat(width - filled.min(width)),
        size::human((rate * unit) as u64),
    )
}

fn rejoin_cmd(config: &Path, json: bool) -> Result<ExitCode> {
    let r = rejoin::rejoin(config)?;
    if json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!("{}", r.describe());
    }
    Ok(ExitCode::SUCCESS)
}

fn takeover(config: &Path, json: bool, force: bool) -> Result<ExitCode> {
    let dir = NodeConfig::load(config)?.data;
    let r = node::run_takeover(&dir, force)?;
    if json {
        println!("{}", serde_json::to_string(&r)?);
    } else if let (true, Some(loss)) = (r.ok, &r.forced) {
        println!(
            "{}\ntakeover: this node accepts writes ({:.1} ms)",
            loss.describe(),
            r.seconds * 1e3
        );
    } else if r.ok {
        println!(
            "takeover: this node accepts writes ({:.1} ms); the old primary froze at seq {}, \
             its backlog still draining here: {} entries, {} blocks, {} bytes",
            r.seconds * 1e3,
            r.freeze_seq,
            r.backlog_entries,
            r.backlog_blocks,
            r.backlog_bytes
        );
    } else {
        eprintln!(
            "pairfs: takeover failed: {}",
            r.error.as_deref().unwrap_or("no reason given")
        );
    }
    Ok(if r.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn status(config: Option<&Path>, data: Option<&Path>, json: bool, watch: bool) -> Result<()> {
    let dir = match (config, data) {
        (Some(c), _) => NodeConfig::load(c)?.data,
        (None, Some(d)) => d.to_path_buf(),
        (None, None) => bail!("give --config or --data"),
    };
    loop {
        let s = node::query_status(&dir)?;
        if json {
            println!("{}", serde_json::to_string(&s)?);
        } else {
            if watch {
                print!("\x1b[2J\x1b[H");
            }
            print!("{}", status_text(&s));
        }
        if !watch {
            return Ok(());
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn status_text(s: &node::StatusReport) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "node      {} ({}, {} replication, epoch {})",
        s.node, s.role, s.mode, s.epoch
    );
    let _ = writeln!(
        o,
        "peer      {} {} — {}",
        s.peer.as_deref().unwrap_or("(none)"),
        s.peer_address.as_deref().unwrap_or(""),
        if s.connected {
            "connected"
        } else {
            "unreachable"
        }
    );
    let _ = writeln!(
        o,
        "state     {}{}{}",
        s.state,
        if s.inconsistent {
            " — replica NOT write-order consistent until the copy ends"
        } else {
            ""
        },
        if s.role == "primary" && !s.writable {
            " — writes wait"
        } else {
            ""
        }
    );
    if let Some(t) = &s.takeover {
        let _ = writeln!(
            o,
            "takeover  {} (old primary froze at seq {}): backlog {} entries · {} blocks · {} · \
             local-unreflected {} entries · {} blocks ({} of {}) · remote reads {} ({} blocks{}) · \
             fetch errors {}{}",
            t.phase,
            t.freeze_seq,
            t.backlog_entries,
            t.backlog_blocks,
            size::human(t.backlog_bytes),
            t.lu_entries,
            t.lu_blocks,
            size::human(t.lu_used),
            size::human(t.lu_capacity),
            t.remote_reads,
            t.remote_read_blocks,
            t.remote_read_mean_ms
                .map(|m| format!(", mean {m:.2} ms"))
                .unwrap_or_default(),
            t.fetch_errors,
            if t.writers_waiting > 0 {
                format!(
                    " · {} writers wait for room (the area is full until the merge)",
                    t.writers_waiting
                )
            } else {
                String::new()
            }
        );
    }
    if let Some(f) = &s.last_forced {
        let _ = writeln!(
            o,
            "forced    takeover {:.0} s ago at seq {}: lost {} entries ({}){}; report {}/report.json",
            pairfs::types::now_ns().saturating_sub(f.at_ns) as f64 / 1e9,
            f.base_seq,
            f.lost.entries,
            size::human(f.lost.bytes),
            f.preserved
                .as_ref()
                .map(|p| format!("; {} local entries set aside", p.entries.entries))
                .unwrap_or_default(),
            f.dir
        );
    }
    if let (Some(seq), Some(ns)) = (s.degraded_since_seq, s.degraded_since_ns) {
        let ago = pairfs::types::now_ns().saturating_sub(ns) as f64 / 1e9;
        let _ = writeln!(
            o,
            "DEGRADED  sync writes acknowledged without the peer since seq {seq} ({ago:.0} s ago)"
        );
    }
    if let Some(e) = &s.apply_error {
        let _ = writeln!(o, "ERROR     apply failed: {e}");
    }
    let _ = writeln!(
        o,
        "seqs      committed {} · durable {} · sent {} · replica received {} · replica durable {}",
        s.committed_seq, s.durable_seq, s.sent_seq, s.replica_received_seq, s.replica_durable_seq
    );
    let _ = writeln!(
        o,
        "lag       {} entries · {} · {:.2} s{}",
        s.lag_entries,
        size::human(s.lag_bytes),
        s.lag_seconds,
        match s.peer_apply_rate_bps {
            Some(r) if r >= 1.0 => format!(
                " · peer applies {}/s, backlog drains in {:.2} s",
                size::human(r as u64),
                s.lag_bytes as f64 / r
            ),
            _ => String::new(),
        }
    );
    let _ = writeln!(
        o,
        "journal   {} of {} used · backlog in {}{}",
        size::human(s.journal_used),
        size::human(s.journal_capacity),
        s.backlog,
        if s.bitmap_blocks > 0 {
            format!(" ({} blocks marked)", s.bitmap_blocks)
        } else {
            String::new()
        }
    );
    if let (Some(sent), Some(total)) = (s.copy_sent, s.copy_total) {
        let rate = s.copy_rate_bps.unwrap_or(0.0) / 4096.0;
        let _ = writeln!(o, "{}", progress_bar("copy", sent, total, rate, 4096.0, ""));
    }
    if s.verify_running {
        let _ = writeln!(o, "verify    running");
    }
    if let Some(v) = &s.last_verify {
        let ago = pairfs::types::now_ns().saturating_sub(v.finished_ns) as f64 / 1e9;
        let _ = writeln!(
            o,
            "verified  {ago:.0} s ago: {} blocks, {}{}",
            v.blocks_compared,
            if v.differing == 0 {
                "no difference".to_string()
            } else {
                format!("{} differed", v.differing)
            },
            match v.repaired {
                Some(n) => format!(", {n} repaired"),
                None => String::new(),
            }
        );
    }
    if let Some(r) = &s.refused {
        let _ = writeln!(o, "refused   {r}");
    }
    let _ = writeln!(
        o,
        "wire      sent {} · received {}",
        size::human(s.wire_bytes_sent),
        size::human(s.wire_bytes_received)
    );
    o
}

fn run_fsck(data: &Path) -> Result<ExitCode> {
    let dd = DataDir::open(data)?;
    let (n, j) = dd.devices(true)?;
    let vol = match Volume::open(
        n,
        j,
        VolumeOptions {
            read_only: true,
            ..VolumeOptions::default()
        },
    ) {
        Ok(v) => v,
        Err(e) => {
            println!(
                "pairfs fsck {}: INCONSISTENT\n  volume: {e}",
                data.display()
            );
            return Ok(ExitCode::from(1));
        }
    };
    let rec = vol.recovery().clone();
    let r = fsck(&vol);
    println!(
        "pairfs fsck {}: {} directories, {} files, {} symlinks, {} special, {} orphans, {} blocks used{}",
        data.display(),
        r.dirs,
        r.files,
        r.symlinks,
        r.specials,
        r.orphans,
        r.blocks_used,
        if rec.entries_replayed > 0 {
            format!(
                "; journal: {} entries to replay ({} blocks), checked as replayed",
                rec.entries_replayed, rec.blocks_replayed
            )
        } else {
            String::new()
        }
    );
    if r.is_clean() {
        println!("clean");
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "INCONSISTENT: {} problem(s)",
        r.errors.len() + r.more_errors
    );
    for e in &r.errors {
        println!("  {e}");
    }
    if r.more_errors > 0 {
        println!("  … and {} more", r.more_errors);
    }
    Ok(ExitCode::from(1))
}
