//! The node daemon (docs/DESIGN.md §2): a data directory's volume with recovery, the FS
//! core, the replicating node and the FUSE session, wired together — `pairfs mount` and
//! `pairfs serve`, as a library so that tests and the simulation can drive it.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use pairfs::datadir::DataDir;
use pairfs::repl::Role;
use pairfs::{Volume, VolumeOptions};
use pairfs_fs::fuse::{FuseOptions, PairFuse, ReadOnlyFlag, session_config};
use pairfs_fs::{Fs, FsMode, FsOptions};

use crate::config::NodeConfig;
use crate::{node, size, state};

#[derive(clap::Args, Debug, Clone)]
pub struct MountOpts {
    /// FUSE worker threads.
    #[arg(long, default_value_t = 4)]
    pub threads: usize,
    /// Seconds between group commits when nobody calls fsync.
    #[arg(long, default_value_t = 1.0)]
    pub commit_interval: f64,
    /// Do not update access times.
    #[arg(long)]
    pub noatime: bool,
    /// Let the kernel cache writes and send them in bulk (FUSE writeback cache). Only for a
    /// volume of its own (`--data`): a node of a pair can turn read-only online, and what
    /// the kernel cached before would then be lost.
    #[arg(long)]
    pub writeback_cache: bool,
    /// A write of at least this many blocks goes straight to the volume (written once);
    /// smaller ones go through the journal. A huge value journals all file data (for
    /// comparisons: large writes are then written twice).
    #[arg(long, default_value_t = 8)]
    pub inplace_min_blocks: usize,
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

/// A termination signal of `sigset` (blocked by [`block_signals`]) that is pending, taken
/// without waiting: for loops that must stay responsive to Ctrl-C before a thread waits
/// for the signals with `sigwait`.
fn pending_signal(sigset: &libc::sigset_t) -> Option<libc::c_int> {
    let zero = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `sigset` is a valid set; a null info pointer is allowed.
    let sig = unsafe { libc::sigtimedwait(sigset, std::ptr::null_mut(), &zero) };
    (sig > 0).then_some(sig)
}

fn check_mount_opts(mountpoint: &Path, o: &MountOpts) -> Result<()> {
    if !(0.001..=3600.0).contains(&o.commit_interval) {
        bail!("--commit-interval must be between 0.001 and 3600 seconds");
    }
    if !(1..=64).contains(&o.threads) {
        bail!("--threads must be between 1 and 64");
    }
    let md = std::fs::metadata(mountpoint)
        .with_context(|| format!("mountpoint {}", mountpoint.display()))?;
    if !md.is_dir() {
        bail!("mountpoint {} is not a directory", mountpoint.display());
    }
    Ok(())
}

pub fn open_volume(dd: &DataDir, opts: VolumeOptions) -> Result<Volume> {
    let (n, j) = dd.devices(false)?;
    let vol = Volume::open(n, j, opts)
        .with_context(|| format!("opening the volume in {}", dd.path().display()))?;
    let rec = vol.recovery().clone();
    if rec.unclean {
        tracing::warn!(
            entries_replayed = rec.entries_replayed,
            blocks_replayed = rec.blocks_replayed,
            last_seq = %rec.last_seq,
            "recovered after an unclean shutdown"
        );
    }
    Ok(vol)
}

pub fn mount_standalone(data: &Path, mountpoint: &Path, o: &MountOpts) -> Result<()> {
    check_mount_opts(mountpoint, o)?;
    let sigset = block_signals();
    let dd = DataDir::open(data)?;
    if state::load_state(data)?.is_some() {
        bail!(
            "{} belongs to a replicated pair: mount it with --config",
            data.display()
        );
    }
    let vol = open_volume(
        &dd,
        VolumeOptions {
            commit_interval: Duration::from_secs_f64(o.commit_interval),
            inplace_min_blocks: o.inplace_min_blocks.max(1),
            ..VolumeOptions::default()
        },
    )?;
    let fs = Arc::new(
        Fs::open(
            vol,
            FsOptions {
                track_lookups: true,
                atime: !o.noatime,
                mode: FsMode::Writable,
                reap_at_open: true,
            },
        )
        .context("opening the filesystem")?,
    );
    serve_fuse(&fs, mountpoint, o, data, sigset, true, |_, _| {})?;
    drop(dd);
    Ok(())
}

/// Mounts `fs` and serves it until unmounted or signalled; flushes on the way out.
/// `standalone`: the filesystem never switches to replica mode (a volume of its own), the
/// only case in which the kernel may cache writes.
///
/// The kernel mount is read-write in either mode, so that it can become writable without a
/// remount: the filesystem refuses changes in replica mode, and the mount's read-only flag
/// follows the mode for what the kernel answers alone (`access(W_OK)`; see
/// [`ReadOnlyFlag`]).
fn serve_fuse(
    fs: &Arc<Fs>,
    mountpoint: &Path,
    o: &MountOpts,
    data: &Path,
    sigset: libc::sigset_t,
    standalone: bool,
    on_session: impl FnOnce(&fuser::Session<PairFuse>, node::MountFlag),
) -> Result<()> {
    let adapter = PairFuse::new(
        fs.clone(),
        FuseOptions {
            writeback_cache: o.writeback_cache && standalone,
            ..FuseOptions::default()
        },
    );
    let config = session_config(format!("pairfs:{}", data.display()), o.threads);
    let mut session = fuser::Session::new(adapter, mountpoint, &config).with_context(|| {
        format!(
            "cannot mount at {} (is /dev/fuse available and the mountpoint not in use?)",
            mountpoint.display()
        )
    })?;
    let mount_flag: node::MountFlag = Arc::new(std::sync::Mutex::new(
        ReadOnlyFlag::new(mountpoint)
            .inspect_err(|e| {
                tracing::warn!(error = %e, "the mount's read-only flag cannot follow the mode: access(W_OK) says yes in replica mode");
            })
            .ok(),
    ));
    on_session(&session, mount_flag.clone());
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
        let mount_flag = mount_flag.clone();
        std::thread::Builder::new()
            .name("maintenance".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Some(f) = mount_flag
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .as_mut()
                    {
                        f.follow(fs.mode());
                    }
                    std::thread::sleep(Duration::from_millis(20));
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
        mode = ?fs.mode(),
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
    Ok(())
}

/// A replicated node: `pairfs serve` (no mount) or `pairfs mount --config`.
pub fn run_node(config: &Path, mount: Option<(&Path, &MountOpts)>) -> Result<()> {
    let cfg = NodeConfig::load(config)?;
    if let Some((mp, o)) = mount {
        check_mount_opts(mp, o)?;
    }
    let sigset = block_signals();
    let dd = Arc::new(DataDir::open(&cfg.data)?);
    let st = node::initial_state(&cfg)?;
    let role = st.role;
    let commit = mount.map_or(1.0, |(_, o)| o.commit_interval);
    let vopts = VolumeOptions {
        // With a peer, entries become durable (and sendable) at least every 50 ms: the
        // replication lag is bounded by it.
        commit_interval: Duration::from_secs_f64(if cfg.peer.is_some() {
            commit.min(0.05)
        } else {
            commit
        }),
        inplace_min_blocks: mount.map_or(8, |(_, o)| o.inplace_min_blocks.max(1)),
        // Both roles keep entries for the peer: a primary until the peer has them durably,
        // a secondary until the primary has them durably (a crashed primary takes back
        // what it lost).
        retain: cfg.peer.is_some(),
        max_entry_bytes: 8 << 20,
        ..VolumeOptions::default()
    };
    let vol = open_volume(&dd, vopts.clone())?;
    let reopen: node::Reopen = {
        let dd = dd.clone();
        Box::new(move || open_volume(&dd, vopts.clone()))
    };
    tracing::info!(node = %cfg.name, role = ?role, peer = ?cfg.peer.as_ref().map(|p| &p.name), "node starting");
    let fs_opts = |mode| FsOptions {
        track_lookups: true,
        atime: !mount.is_some_and(|(_, o)| o.noatime),
        mode,
        // The node frees them once it may write (after a reconciliation, if any).
        reap_at_open: false,
    };
    let host = if mount.is_some() && (role == Role::Primary || node::mountable(&st)) {
        // A secondary follows the stream; so does a frozen old primary, and a node taking
        // over turns writable only once its takeover has resumed (`node::start`).
        let mode = if role == Role::Secondary || st.takeover.is_some() {
            FsMode::Replica
        } else {
            FsMode::Writable
        };
        let fs = Fs::open(vol, fs_opts(mode)).context("opening the filesystem")?;
        node::Host::with_fs(Arc::new(fs), reopen)
    } else {
        node::Host::bare(vol, reopen)
    };
    let handle = node::start(cfg.clone(), host.clone(), st)?;
    if let Some(fs) = host_fs(&host) {
        fs.set_hooks(handle.shared.clone());
    }
    match mount {
        None => {
            // Serve until signalled, with periodic commits of the bare volume.
            let stop = Arc::new(AtomicBool::new(false));
            {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut sig: libc::c_int = 0;
                    // SAFETY: waits for one of the blocked signals of `sigset`.
                    unsafe { libc::sigwait(&sigset, &mut sig) };
                    tracing::info!(signal = sig, "stopping");
                    stop.store(true, Ordering::Relaxed);
                });
            }
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(50));
                host.maintain();
            }
            drop(handle);
            host.close()?;
        }
        Some((mp, o)) => {
            if host_fs(&host).is_none() {
                // A secondary without a consistent filesystem yet: wait for its copy.
                tracing::info!("secondary has no consistent copy yet: waiting before mounting");
                loop {
                    std::thread::sleep(Duration::from_millis(200));
                    if let Some(sig) = pending_signal(&sigset) {
                        tracing::info!(signal = sig, "stopping before the first copy ended");
                        drop(handle);
                        host.close()?;
                        drop(dd);
                        return Ok(());
                    }
                    host.maintain();
                    if let Ok(s) = node::query_status(&cfg.data) {
                        if s.role == "secondary" && !s.inconsistent && s.replica_durable_seq > 0 {
                            break;
                        }
                    }
                }
                host.promote(|v| Fs::open(v, fs_opts(FsMode::Replica)))
                    .context("opening the replicated filesystem")?;
                if let Some(fs) = host_fs(&host) {
                    fs.set_hooks(handle.shared.clone());
                }
            }
            let fs = host_fs(&host).context("no filesystem")?;
            if o.writeback_cache {
                tracing::warn!(
                    "--writeback-cache is ignored on a node of a pair: its mount can turn \
                     read-only online, and writes the kernel had cached would then be lost"
                );
            }
            let h2 = host.clone();
            serve_fuse(&fs, mp, o, &cfg.data, sigset, false, move |s, flag| {
                h2.set_mount_flag(flag);
                h2.set_notifier(s.notifier());
            })?;
            drop(handle);
        }
    }
    drop(dd);
    Ok(())
}

fn host_fs(h: &node::Host) -> Option<Arc<Fs>> {
    h.fs_arc()
}
