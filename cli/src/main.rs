//! `pairfs`: the command-line tool and node daemon (DESIGN §2, `cli/`).
//!
//! Wires the layers together: a data directory, its volume (with recovery), the FS core and
//! the FUSE session; parses and checks every argument with a clear message.

mod size;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use pairfs::datadir::{CreateParams, DataDir};
use pairfs::{Volume, VolumeOptions};
use pairfs_fs::fsck::fsck;
use pairfs_fs::fuse::{FuseOptions, PairFuse};
use pairfs_fs::{FormatOptions, Fs, FsOptions};

use crate::size::parse_size;

/// pairfs: a replicated NAS filesystem (this build: single node).
#[derive(Parser, Debug)]
#[command(name = "pairfs", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Create a node's data directory with an empty filesystem.
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
        /// Number of inodes (default: one per 16 KiB of volume).
        #[arg(long)]
        inodes: Option<u64>,
        /// Overwrite an existing data directory.
        #[arg(long)]
        force: bool,
    },
    /// Mount the filesystem and serve it in the foreground until unmounted or signalled.
    Mount {
        /// The data directory.
        #[arg(long)]
        data: PathBuf,
        /// Where to mount.
        mountpoint: PathBuf,
        /// FUSE worker threads.
        #[arg(long, default_value_t = 4)]
        threads: usize,
        /// Seconds between group commits when nobody calls fsync.
        #[arg(long, default_value_t = 1.0)]
        commit_interval: f64,
        /// Do not update access times.
        #[arg(long)]
        noatime: bool,
        /// Let the kernel cache writes and send them in bulk (FUSE writeback cache).
        #[arg(long)]
        writeback_cache: bool,
        /// A write of at least this many blocks goes straight to the volume (written once);
        /// smaller ones go through the journal. A huge value journals all file data (for
        /// comparisons: large writes are then written twice).
        #[arg(long, default_value_t = 8)]
        inplace_min_blocks: usize,
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
            inodes,
            force,
        } => init(&data, size, block_size, journal_size, inodes, force).map(|()| ExitCode::SUCCESS),
        Cmd::Mount {
            data,
            mountpoint,
            threads,
            commit_interval,
            noatime,
            writeback_cache,
            inplace_min_blocks,
        } => mount(
            &data,
            &mountpoint,
            threads,
            commit_interval,
            noatime,
            writeback_cache,
            inplace_min_blocks,
        )
        .map(|()| ExitCode::SUCCESS),
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
    size: u64,
    block_size: u32,
    journal_size: Option<u64>,
    inodes: Option<u64>,
    force: bool,
) -> Result<()> {
    let params = CreateParams {
        size,
        block_size,
        journal_size,
        force,
    };
    let (dd, id) = DataDir::create(data, &params)?;
    let (n, j) = dd.devices(false)?;
    let mut vol = Volume::open(n, j, VolumeOptions::default()).context("opening the new volume")?;
    Fs::format(&mut vol, &FormatOptions { inodes }).context("creating the filesystem")?;
    vol.close().context("flushing the new volume")?;
    let fs = Fs::open(vol, FsOptions::default()).context("checking the new filesystem")?;
    let sb = fs.superblock();
    println!(
        "pairfs: created {} — volume {id}, {} blocks of {} bytes ({}), {} inodes, journal {}",
        data.display(),
        sb.total_blocks,
        sb.block_size,
        size::human(sb.total_blocks * u64::from(sb.block_size)),
        sb.inode_count,
        size::human(fs.with_volume(|v| v.journal().header().capacity)),
    );
    Ok(())
}

/// Blocks the termination signals in this thread and every thread created after it, so
/// that one thread can wait for them with `sigwait`.
fn block_signals() -> libc::sigset_t {
    // SAFETY: sigset manipulation on a local, then pthread_sigmask on the current thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

fn mount(
    data: &Path,
    mountpoint: &Path,
    threads: usize,
    commit_interval: f64,
    noatime: bool,
    writeback_cache: bool,
    inplace_min_blocks: usize,
) -> Result<()> {
    if !(0.001..=3600.0).contains(&commit_interval) {
        bail!("--commit-interval must be between 0.001 and 3600 seconds");
    }
    if !(1..=64).contains(&threads) {
        bail!("--threads must be between 1 and 64");
    }
    let md = std::fs::metadata(mountpoint)
        .with_context(|| format!("mountpoint {}", mountpoint.display()))?;
    if !md.is_dir() {
        bail!("mountpoint {} is not a directory", mountpoint.display());
    }
    let sigset = block_signals();
    let dd = DataDir::open(data)?;
    let (n, j) = dd.devices(false)?;
    let opts = VolumeOptions {
        commit_interval: Duration::from_secs_f64(commit_interval),
        inplace_min_blocks: inplace_min_blocks.max(1),
        ..VolumeOptions::default()
    };
    let vol = Volume::open(n, j, opts)
        .with_context(|| format!("opening the volume in {}", data.display()))?;
    let rec = vol.recovery().clone();
    if rec.unclean {
        tracing::warn!(
            entries_replayed = rec.entries_replayed,
            blocks_replayed = rec.blocks_replayed,
            last_seq = %rec.last_seq,
            "recovered after an unclean shutdown"
        );
    }
    let fs = Arc::new(
        Fs::open(
            vol,
            FsOptions {
                track_lookups: true,
                atime: !noatime,
            },
        )
        .context("opening the filesystem")?,
    );
    let adapter = PairFuse::new(
        fs.clone(),
        FuseOptions {
            writeback_cache,
            ..FuseOptions::default()
        },
    );
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::FSName(format!("pairfs:{}", data.display())),
        fuser::MountOption::Subtype("pairfs".into()),
        fuser::MountOption::DefaultPermissions,
        fuser::MountOption::RW,
        fuser::MountOption::Dev,
        fuser::MountOption::Suid,
    ];
    config.acl = fuser::SessionACL::All;
    config.n_threads = Some(threads);
    config.clone_fd = true;
    let mut session = fuser::Session::new(adapter, mountpoint, &config).with_context(|| {
        format!(
            "cannot mount at {} (is /dev/fuse available and the mountpoint not in use?)",
            mountpoint.display()
        )
    })?;
    let mut unmounter = session.unmount_callable();
    let stop = Arc::new(AtomicBool::new(false));
    let mp = mountpoint.to_path_buf();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut sig: libc::c_int = 0;
            // SAFETY: waits for one of the blocked signals of `sigset`.
            unsafe { libc::sigwait(&sigset, &mut sig) };
            tracing::info!(signal = sig, "unmounting");
            if let Err(e) = unmounter.unmount() {
                tracing::warn!(error = %e, "unmount failed; detaching the mount lazily");
                if let Ok(c) = std::ffi::CString::new(mp.as_os_str().as_encoded_bytes()) {
                    // SAFETY: a valid NUL-terminated path.
                    unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
                }
            }
        })
        .context("starting the signal thread")?;
    let maint = {
        let fs = fs.clone();
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("maintenance".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(100));
                    if let Err(e) = fs.maintain() {
                        tracing::error!(error = %e, "background commit failed");
                    }
                }
            })
            .context("starting the maintenance thread")?
    };
    let sb = fs.superblock();
    tracing::info!(
        data = %data.display(),
        mountpoint = %mountpoint.display(),
        uuid = %sb.uuid,
        size = %size::human(sb.total_blocks * u64::from(sb.block_size)),
        "mounted"
    );
    let run = session.run();
    stop.store(true, Ordering::Relaxed);
    let _ = maint.join();
    // The session's destroy already flushed; do it again in case the kernel never sent it.
    fs.close().context("flushing the journal at unmount")?;
    match run {
        // The kernel ends some connections with ECONNABORTED instead of ENODEV when they
        // are torn down at unmount (seen on 6.18 under load): the session is over either
        // way, and everything it served has been flushed just above.
        Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => {
            tracing::info!("FUSE connection closed by the kernel (aborted at unmount)");
        }
        r => r.context("FUSE session")?,
    }
    tracing::info!("unmounted cleanly");
    drop(dd);
    Ok(())
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
