//! The control socket, `DIR/control.sock` (mode 0600): one request line; one JSON reply
//! line (`status`), or JSON lines of progress and a last one with the result (`verify`,
//! `verify repair`). The CLI talks to a running node through it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::sync::oneshot;

use super::{Event, Shared, StatusReport, TakeoverReport, VerifyUpdate};

/// Control socket name in the data directory.
pub const CONTROL_SOCKET: &str = "control.sock";

/// Serves requests on `DIR/control.sock` until the runtime stops.
pub async fn control_socket(dir: PathBuf, shared: Arc<Shared>) {
    let path = dir.join(CONTROL_SOCKET);
    let _ = std::fs::remove_file(&path);
    let listener = match tokio::net::UnixListener::bind(&path) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(path = %path.display(), error = %e, "control socket unavailable");
            return;
        }
    };
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
    }
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
            let (r, mut w) = stream.split();
            let mut line = String::new();
            if BufReader::new(r).read_line(&mut line).await.is_err() {
                return;
            }
            let request = line.trim();
            if let Some(rest) = request.strip_prefix("verify") {
                let repair = rest.trim() == "repair";
                let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
                if shared
                    .priority
                    .send(Event::Verify {
                        repair,
                        updates: tx,
                    })
                    .is_err()
                {
                    return;
                }
                while let Some(u) = rx.recv().await {
                    let last = !matches!(u, VerifyUpdate::Progress { .. });
                    let mut line = serde_json::to_string(&u).unwrap_or_default();
                    line.push('\n');
                    if w.write_all(line.as_bytes()).await.is_err() || last {
                        return;
                    }
                }
                return;
            }
            let reply = match request {
                "status" => {
                    let (tx, rx) = oneshot::channel();
                    if shared.priority.send(Event::Status(tx)).is_err() {
                        return;
                    }
                    match rx.await {
                        Ok(s) => serde_json::to_string(&s).unwrap_or_default(),
                        Err(_) => return,
                    }
                }
                "takeover" | "takeover force" => {
                    let (tx, rx) = oneshot::channel();
                    let force = request == "takeover force";
                    if shared
                        .priority
                        .send(Event::Takeover { force, reply: tx })
                        .is_err()
                    {
                        return;
                    }
                    match rx.await {
                        Ok(r) => serde_json::to_string(&r).unwrap_or_default(),
                        Err(_) => return,
                    }
                }
                other => format!("{{\"error\":\"unknown request {other:?}\"}}"),
            };
            let _ = w.write_all(reply.as_bytes()).await;
            let _ = w.write_all(b"\n").await;
        });
    }
}

fn connect(dir: &Path) -> Result<std::os::unix::net::UnixStream> {
    let path = dir.join(CONTROL_SOCKET);
    std::os::unix::net::UnixStream::connect(&path).with_context(|| {
        format!(
            "no pairfs daemon answers on {} (is `pairfs mount`/`pairfs serve` running?)",
            path.display()
        )
    })
}

/// Runs a verify on the node whose data directory is `dir`: calls `progress` with every
/// update until the last, which it returns.
pub fn run_verify(
    dir: &Path,
    repair: bool,
    mut progress: impl FnMut(&VerifyUpdate),
) -> Result<VerifyUpdate> {
    use std::io::{BufRead, BufReader, Write};
    let mut s = connect(dir)?;
    s.write_all(if repair {
        b"verify repair\n"
    } else {
        b"verify\n"
    })?;
    for line in BufReader::new(s).lines() {
        let u: VerifyUpdate = serde_json::from_str(&line.context("reading from the daemon")?)
            .context("decoding the daemon's verify update")?;
        if !matches!(u, VerifyUpdate::Progress { .. }) {
            return Ok(u);
        }
        progress(&u);
    }
    anyhow::bail!("the daemon stopped before the verify finished")
}

/// Asks a running node to take over (docs/PROTOCOL.md §7.3); returns once it accepts
/// writes, or with the reason it cannot.
pub fn run_takeover(dir: &Path, force: bool) -> Result<TakeoverReport> {
    use std::io::{BufRead, BufReader, Write};
    let mut s = connect(dir)?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    s.write_all(if force {
        b"takeover force\n"
    } else {
        b"takeover\n"
    })?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    serde_json::from_str(&line).context("decoding the daemon's takeover report")
}

/// Asks a running node for its status through its control socket.
pub fn query_status(dir: &Path) -> Result<StatusReport> {
    use std::io::{BufRead, BufReader, Write};
    let mut s = connect(dir)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"status\n")?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    serde_json::from_str(&line).context("decoding the daemon's status")
}
