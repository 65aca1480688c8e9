//! The node configuration file (TOML), documented in the README with an example in
//! `examples/`. Every value is checked here; a bad one is an error that names the field.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use pairfs::repl::{DEFAULT_MAX_LAG, DEFAULT_SYNC_TIMEOUT, Mode, Role};
use pairfs_transport::congestion::DEFAULT_QUEUE_TARGET;
use pairfs_transport::conn::{DEFAULT_IDLE_TIMEOUT, DEFAULT_KEEPALIVE};
use pairfs_transport::{Congestion, Fingerprint};
use serde::Deserialize;

use crate::size::parse_size;

/// A validated node configuration.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// This node's name.
    pub name: String,
    /// Its data directory.
    pub data: PathBuf,
    /// Where it listens for its peer (QUIC).
    pub listen: SocketAddr,
    /// Its role when the pair is first created.
    pub role: Role,
    /// The peer, if any.
    pub peer: Option<PeerConfig>,
    /// Replication settings.
    pub mode: Mode,
    /// Backlog kept in the journal before falling back to the bitmap (`None`: half the
    /// journal, see [`NodeConfig::journal_limit_for`]).
    pub journal_limit: Option<u64>,
    /// Async mode: how far the connected peer may fall behind before writers wait.
    pub max_lag: Option<Duration>,
    /// Sync mode: how long writers wait for the peer before the pair is degraded.
    pub sync_timeout: Duration,
    /// The link's congestion controller (`replication.congestion`).
    pub congestion: Congestion,
    /// Keep-alive interval.
    pub keepalive: Duration,
    /// A silent peer is declared gone after this long.
    pub idle_timeout: Duration,
    /// Taking over: how long a read of a block still on the old primary waits for it
    /// before it fails with EIO (docs/PROTOCOL.md §7.4).
    pub fetch_timeout: Duration,
}

/// Default `takeover.fetch_timeout`.
pub const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// The peer of a node.
#[derive(Clone, Debug)]
pub struct PeerConfig {
    /// Its name.
    pub name: String,
    /// Its address.
    pub address: SocketAddr,
    /// The fingerprint of its certificate (`pairfs id`).
    pub fingerprint: Fingerprint,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    name: String,
    data: PathBuf,
    listen: String,
    #[serde(default = "default_role")]
    role: String,
    peer: Option<RawPeer>,
    #[serde(default)]
    replication: RawReplication,
    #[serde(default)]
    timeouts: RawTimeouts,
    #[serde(default)]
    takeover: RawTakeover,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTakeover {
    fetch_timeout: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPeer {
    name: String,
    address: String,
    fingerprint: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawReplication {
    mode: Option<String>,
    journal_limit: Option<String>,
    max_lag: Option<String>,
    sync_timeout: Option<String>,
    congestion: Option<String>,
    queue_target: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTimeouts {
    keepalive: Option<String>,
    idle: Option<String>,
}

fn default_role() -> String {
    "primary".into()
}

/// Parses `500us`, `250ms`, `1s`, `1.5s`, `2m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let (num, mult) = if let Some(n) = t.strip_suffix("us") {
        (n, 1e-6)
    } else if let Some(n) = t.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60.0)
    } else {
        return Err(format!(
            "invalid duration '{s}': use a unit, e.g. 500us, 250ms, 1s, 2m"
        ));
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("invalid duration '{s}': use a number and a unit, e.g. 250ms"))?;
    if !(v.is_finite() && v > 0.0 && v * mult <= 86_400.0) {
        return Err(format!("invalid duration '{s}': out of range"));
    }
    Ok(Duration::from_secs_f64(v * mult))
}

fn field<T>(name: &str, r: Result<T, String>) -> Result<T> {
    r.map_err(|e| anyhow::anyhow!("field `{name}`: {e}"))
}

impl NodeConfig {
    /// Reads and checks a configuration file.
    pub fn load(path: &Path) -> Result<NodeConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the configuration {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("in the configuration {}", path.display()))
    }

    /// Parses and checks configuration text.
    pub fn parse(text: &str) -> Result<NodeConfig> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))?;
        if raw.name.trim().is_empty() || raw.name.len() > 64 {
            bail!("field `name`: must be 1 to 64 characters");
        }
        let listen = field(
            "listen",
            raw.listen
                .parse::<SocketAddr>()
                .map_err(|e| format!("'{}' is not an address:port ({e})", raw.listen)),
        )?;
        let role = match raw.role.as_str() {
            "primary" => Role::Primary,
            "secondary" => Role::Secondary,
            other => bail!("field `role`: '{other}' is neither `primary` nor `secondary`"),
        };
        let peer = match raw.peer {
            None => None,
            Some(p) => {
                if p.name == raw.name {
                    bail!("field `peer.name`: the peer must have another name than this node");
                }
                if p.name.trim().is_empty() {
                    bail!("field `peer.name`: must not be empty");
                }
                let address = field(
                    "peer.address",
                    p.address
                        .parse::<SocketAddr>()
                        .map_err(|e| format!("'{}' is not an address:port ({e})", p.address)),
                )?;
                let fingerprint = field(
                    "peer.fingerprint",
                    p.fingerprint.parse::<Fingerprint>().map_err(|e| {
                        format!("{e} (get it with `pairfs id --data DIR` on the peer)")
                    }),
                )?;
                Some(PeerConfig {
                    name: p.name,
                    address,
                    fingerprint,
                })
            }
        };
        let mode = match raw.replication.mode.as_deref().unwrap_or("async") {
            "async" => Mode::Async,
            "sync" => Mode::Sync,
            other => bail!("field `replication.mode`: '{other}' is neither `async` nor `sync`"),
        };
        let journal_limit = match raw.replication.journal_limit {
            None => None,
            Some(s) => Some(field("replication.journal_limit", parse_size(&s))?),
        };
        let max_lag = match raw.replication.max_lag.as_deref().map(str::trim) {
            None => Some(DEFAULT_MAX_LAG),
            Some("off") => None,
            Some(s) => Some(field(
                "replication.max_lag",
                parse_duration(s).map_err(|e| format!("{e}, or `off`")),
            )?),
        };
        let sync_timeout = match raw.replication.sync_timeout {
            None => DEFAULT_SYNC_TIMEOUT,
            Some(s) => field("replication.sync_timeout", parse_duration(&s))?,
        };
        let queue_target = match raw.replication.queue_target {
            None => DEFAULT_QUEUE_TARGET,
            Some(s) => field("replication.queue_target", parse_duration(&s))?,
        };
        let congestion = field(
            "replication.congestion",
            match raw.replication.congestion.as_deref().map(str::trim) {
                None | Some("queue-bound") => Ok(Congestion::QueueBound(queue_target)),
                Some("cubic") => Ok(Congestion::Cubic),
                Some("bbr") => Ok(Congestion::Bbr),
                Some(other) => Err(format!(
                    "'{other}' is not a congestion controller: queue-bound (the default), cubic or bbr"
                )),
            },
        )?;
        let keepalive = match raw.timeouts.keepalive {
            None => DEFAULT_KEEPALIVE,
            Some(s) => field("timeouts.keepalive", parse_duration(&s))?,
        };
        let idle_timeout = match raw.timeouts.idle {
            None => DEFAULT_IDLE_TIMEOUT,
            Some(s) => field("timeouts.idle", parse_duration(&s))?,
        };
        let fetch_timeout = match raw.takeover.fetch_timeout {
            None => DEFAULT_FETCH_TIMEOUT,
            Some(s) => field("takeover.fetch_timeout", parse_duration(&s))?,
        };
        if keepalive >= idle_timeout {
            bail!(
                "field `timeouts.keepalive`: must be shorter than `timeouts.idle` ({keepalive:?} ≥ {idle_timeout:?})"
            );
        }
        Ok(NodeConfig {
            name: raw.name,
            data: raw.data,
            listen,
            role,
            peer,
            mode,
            journal_limit,
            max_lag,
            sync_timeout,
            congestion,
            keepalive,
            idle_timeout,
            fetch_timeout,
        })
    }

    /// The journal limit for a journal of `capacity` bytes: as configured, or half of it.
    /// More than half is refused: entries the peer lacks must leave room for the ones
    /// being written, or the journal fills before the bitmap takes over.
    pub fn journal_limit_for(&self, capacity: u64) -> Result<u64> {
        let half = capacity / 2;
        match self.journal_limit {
            None => Ok(half),
            Some(l) if l <= half => Ok(l),
            Some(l) => bail!(
                "field `replication.journal_limit`: {} is more than half the journal ({} of {}): \
                 lower it, or re-create the node with a larger --journal-size",
                crate::size::human(l),
                crate::size::human(half),
                crate::size::human(capacity)
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FP: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000000";

    fn base() -> String {
        format!(
            "name = \"a\"\ndata = \"/tmp/a\"\nlisten = \"127.0.0.1:7001\"\n\
             [peer]\nname = \"b\"\naddress = \"127.0.0.1:7002\"\nfingerprint = \"{FP}\"\n"
        )
    }

    #[test]
    fn parses_a_good_config_with_defaults() {
        let c = NodeConfig::parse(&base()).unwrap();
        assert_eq!(c.name, "a");
        assert_eq!(c.role, Role::Primary);
        assert_eq!(c.mode, Mode::Async);
        assert_eq!(c.peer.unwrap().address.port(), 7002);
        assert_eq!(c.idle_timeout, Duration::from_secs(1));
        assert_eq!(c.max_lag, Some(Duration::from_secs(5)));
        let off =
            NodeConfig::parse(&format!("{}[replication]\nmax_lag = \"off\"\n", base())).unwrap();
        assert_eq!(off.max_lag, None);
        let one =
            NodeConfig::parse(&format!("{}[replication]\nmax_lag = \"1s\"\n", base())).unwrap();
        assert_eq!(one.max_lag, Some(Duration::from_secs(1)));
        assert_eq!(c.congestion, Congestion::default());
        assert_eq!(
            Congestion::default(),
            Congestion::QueueBound(Duration::from_micros(500))
        );
        let cubic = NodeConfig::parse(&format!(
            "{}[replication]\ncongestion = \"cubic\"\n",
            base()
        ))
        .unwrap();
        assert_eq!(cubic.congestion, Congestion::Cubic);
        let bound = NodeConfig::parse(&format!(
            "{}[replication]\ncongestion = \"queue-bound\"\nqueue_target = \"2ms\"\n",
            base()
        ))
        .unwrap();
        assert_eq!(
            bound.congestion,
            Congestion::QueueBound(Duration::from_millis(2))
        );
        let bbr =
            NodeConfig::parse(&format!("{}[replication]\ncongestion = \"bbr\"\n", base())).unwrap();
        assert_eq!(bbr.congestion, Congestion::Bbr);
    }

    #[test]
    fn bad_values_name_their_field() {
        let cases = [
            (
                base().replace("127.0.0.1:7001", "nowhere"),
                "field `listen`",
            ),
            (
                base().replace("127.0.0.1:7002", "x:y"),
                "field `peer.address`",
            ),
            (base().replace(FP, "sha256:12"), "field `peer.fingerprint`"),
            (
                base().replace("name = \"b\"", "name = \"a\""),
                "field `peer.name`",
            ),
            (
                format!("{}[replication]\nmode = \"fast\"\n", base()),
                "field `replication.mode`",
            ),
            (
                format!("{}[replication]\njournal_limit = \"lots\"\n", base()),
                "field `replication.journal_limit`",
            ),
            (
                format!("{}[replication]\nmax_lag = \"never\"\n", base()),
                "field `replication.max_lag`",
            ),
            (
                format!("{}[replication]\ncongestion = \"vegas\"\n", base()),
                "field `replication.congestion`",
            ),
            (
                format!("{}[replication]\nqueue_target = \"short\"\n", base()),
                "field `replication.queue_target`",
            ),
            (
                format!("{}[timeouts]\nidle = \"soon\"\n", base()),
                "field `timeouts.idle`",
            ),
            (format!("{}bogus = 1\n", base()), "bogus"),
            (
                base().replace("listen = \"127.0.0.1:7001\"\n", ""),
                "listen",
            ),
        ];
        for (text, needle) in cases {
            let err = format!("{:#}", NodeConfig::parse(&text).unwrap_err());
            assert!(err.contains(needle), "{needle:?} not in {err:?}");
        }
    }

    #[test]
    fn the_example_configs_parse() {
        for text in [
            include_str!("../../examples/node-a.toml"),
            include_str!("../../examples/node-b.toml"),
        ] {
            let c = NodeConfig::parse(text).unwrap();
            assert_eq!(c.max_lag, Some(Duration::from_secs(5)));
            assert!(c.peer.is_some());
            // The demo's nodes (2 GiB, the default journal) start with these configs: a
            // journal limit above half that journal stopped both (issue 9's own demo).
            let journal = pairfs::datadir::default_journal_size(2 << 30, 4096);
            c.journal_limit_for(journal).unwrap();
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("500us").unwrap(), Duration::from_micros(500));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("-1s").is_err());
    }
}
