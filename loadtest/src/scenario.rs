//! Scenarios: what the sockets do, read from a TOML file in `loadtest/scenarios/` and
//! overridden by command-line flags.
//!
//! Users are numbered `0..sockets`; user `i` has the identity `u<i>` and owns exactly one socket.
//! Who watches whom is a pure function of the scenario ([`Scenario::watches`]), so every worker
//! process computes the same topology without talking to the others.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// What the scenario does once every socket is connected and subscribed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Hold every socket for `hold_s` seconds; measure memory and CPU.
    Idle,
    /// Users in rooms of `room_size`, each watching the others; `churn_per_s` leave+rejoin
    /// cycles per second.
    Rooms,
    /// Every socket drops (abruptly) and reconnects at once; measure convergence.
    Storm,
    /// `flappers` users watched by every other socket flap (`bye`, rejoin) repeatedly.
    Fanout,
}

/// Who watches whom.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Topology {
    /// User `i` watches `i+1 ..= i+subs` (mod sockets).
    Ring,
    /// Rooms of `room_size` consecutive users; each watches the others of its room.
    Rooms,
    /// Users `0..flappers` are watched by every other user.
    Fanout,
}

/// How a leaving user leaves, as fractions (they need not add up to 1; they are weights).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Mix {
    /// `bye`, then a normal close: offline at once.
    pub bye: f64,
    /// The TCP connection is reset (linger 0): offline after `offline_grace`.
    pub abrupt: f64,
    /// The socket stays open but the peer stops reading and answering pings: offline after
    /// `heartbeat_timeout + offline_grace`.
    pub silent: f64,
}

impl Default for Mix {
    fn default() -> Self {
        Mix {
            bye: 1.0,
            abrupt: 0.0,
            silent: 0.0,
        }
    }
}

/// The whole scenario. Every field has a default; a file sets some, flags override.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    pub kind: Kind,
    /// `None`: derived from `kind` (idle, storm: ring; rooms: rooms; fanout: fanout).
    pub topology: Option<Topology>,
    /// Sockets (= users) in total, over all workers.
    pub sockets: u32,
    /// Ring topology: subscriptions per socket.
    pub subs: u32,
    /// Rooms topology: users per room.
    pub room_size: u32,
    /// Fanout: users that flap (each watched by all the others).
    pub flappers: u32,
    /// Fanout: flap cycles (connect, bye) per second, over all flappers.
    pub flaps_per_s: f64,
    /// Rooms: leave+rejoin cycles per second, over all workers.
    pub churn_per_s: f64,
    pub mix: Mix,
    /// Time between a `bye` and the rejoin.
    pub rejoin_ms: u64,
    /// Time between an abrupt close and the rejoin. Less than `offline_grace - 500 ms`: the
    /// close must stay invisible; more than `offline_grace + 500 ms`: it must be seen.
    pub abrupt_rejoin_ms: u64,
    /// Duration of the scenario's active phase.
    pub hold_s: f64,
    /// Quiet time after the active phase before the final views are compared with the truth.
    pub settle_s: f64,
    /// New connections per second during the initial ramp (0: as fast as possible).
    pub connect_per_s: f64,
    /// Connections in flight at once per worker during the ramp.
    pub connect_concurrency: u32,
    /// Worker processes (each holds `sockets / workers` sockets; keep it under 19,000).
    pub workers: u32,
    /// Source addresses `127.0.<worker+1>.<1..=n>` per worker (bind before connect).
    pub source_ips: u32,
    /// `msgpack` or `json`.
    pub encoding: String,
    /// How long a socket waits for one reply (`welcome`, `subscribed`, a peer's
    /// `subscription_succeeded` or SUBACK) before counting an error.
    pub reply_timeout_s: f64,
    /// Presence settings the harness assumes (must match reachd's config).
    pub offline_grace_ms: u64,
    pub heartbeat_timeout_ms: u64,
}

impl Default for Scenario {
    fn default() -> Self {
        Scenario {
            name: "custom".into(),
            kind: Kind::Idle,
            topology: None,
            sockets: 1000,
            subs: 10,
            room_size: 10,
            flappers: 1,
            flaps_per_s: 10.0,
            churn_per_s: 0.0,
            mix: Mix::default(),
            rejoin_ms: 500,
            abrupt_rejoin_ms: 1000,
            hold_s: 10.0,
            settle_s: 2.0,
            connect_per_s: 0.0,
            connect_concurrency: 256,
            workers: 1,
            source_ips: 8,
            encoding: "msgpack".into(),
            reply_timeout_s: 30.0,
            offline_grace_ms: 5000,
            heartbeat_timeout_ms: 30_000,
        }
    }
}

impl Scenario {
    pub fn load(path: &Path) -> Result<Scenario, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn topology(&self) -> Topology {
        self.topology.unwrap_or(match self.kind {
            Kind::Idle | Kind::Storm => Topology::Ring,
            Kind::Rooms => Topology::Rooms,
            Kind::Fanout => Topology::Fanout,
        })
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.sockets < 2 {
            return Err("sockets must be at least 2".into());
        }
        if self.workers == 0 || self.workers > 64 {
            return Err("workers must be 1..=64".into());
        }
        if self.sockets / self.workers > 19_000 {
            return Err(format!(
                "{} sockets per worker passes the 20,000 open files of one process: raise --workers",
                self.sockets / self.workers
            ));
        }
        if self.source_ips == 0 || self.source_ips > 250 {
            return Err("source_ips must be 1..=250".into());
        }
        if self.topology() == Topology::Fanout && self.flappers >= self.sockets {
            return Err("flappers must be fewer than sockets".into());
        }
        if self.topology() == Topology::Rooms && self.room_size < 2 {
            return Err("room_size must be at least 2".into());
        }
        if self.topology() == Topology::Ring && self.subs >= self.sockets {
            return Err("subs must be fewer than sockets".into());
        }
        if self.mix.abrupt > 0.0 {
            let g = self.offline_grace_ms;
            let r = self.abrupt_rejoin_ms;
            if r + 500 > g && r < g + 500 {
                return Err(format!(
                    "abrupt_rejoin_ms ({r}) is too close to offline_grace_ms ({g}): keep 500 ms away"
                ));
            }
        }
        if self.reply_timeout_s.is_nan() || self.reply_timeout_s <= 0.0 {
            return Err("reply_timeout_s must be positive".into());
        }
        if !matches!(self.encoding.as_str(), "msgpack" | "json") {
            return Err("encoding must be msgpack or json".into());
        }
        Ok(())
    }

    /// Whether an abrupt close followed by the configured rejoin is visible to watchers.
    pub fn abrupt_visible(&self) -> bool {
        self.abrupt_rejoin_ms >= self.offline_grace_ms + 500
    }

    /// The users `user` subscribes to (its own user is implicit).
    pub fn watches(&self, user: u32) -> Vec<u32> {
        let n = self.sockets;
        match self.topology() {
            Topology::Ring => (1..=self.subs).map(|d| (user + d) % n).collect(),
            Topology::Rooms => {
                let k = self.room_size;
                let start = user / k * k;
                (start..(start + k).min(n)).filter(|&u| u != user).collect()
            }
            Topology::Fanout => {
                if user < self.flappers {
                    Vec::new()
                } else {
                    (0..self.flappers).collect()
                }
            }
        }
    }

    /// The users worker `w` owns: contiguous, aligned to rooms for the rooms topology so that a
    /// room's events stay inside one process.
    pub fn owned(&self, w: u32) -> std::ops::Range<u32> {
        let unit = if self.topology() == Topology::Rooms {
            self.room_size
        } else {
            1
        };
        let units = self.sockets.div_ceil(unit);
        let per = units.div_ceil(self.workers);
        let start = (w * per * unit).min(self.sockets);
        let end = ((w + 1) * per * unit).min(self.sockets);
        start..end
    }

    /// Whether some watcher of `user` lives in another worker than its owner.
    pub fn watched_across_workers(&self, user: u32) -> bool {
        if self.workers == 1 {
            return false;
        }
        match self.topology() {
            Topology::Fanout => user < self.flappers,
            Topology::Rooms => false,
            Topology::Ring => true,
        }
    }
}

pub fn identity(user: u32) -> String {
    format!("u{user}")
}

/// Parses `u<digits>` back to a user number.
pub fn user_of(identity: &str) -> Option<u32> {
    identity.strip_prefix('u')?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rooms_stay_inside_one_worker_and_watch_the_others() {
        let s = Scenario {
            kind: Kind::Rooms,
            sockets: 2000,
            room_size: 10,
            workers: 3,
            ..Scenario::default()
        };
        let mut covered = 0;
        for w in 0..3 {
            let r = s.owned(w);
            assert_eq!(r.start % 10, 0);
            covered += r.len();
        }
        assert_eq!(covered, 2000);
        assert_eq!(s.watches(13), vec![10, 11, 12, 14, 15, 16, 17, 18, 19]);
    }

    #[test]
    fn ring_and_fanout_topologies() {
        let s = Scenario {
            sockets: 100,
            subs: 3,
            ..Scenario::default()
        };
        assert_eq!(s.watches(98), vec![99, 0, 1]);
        let f = Scenario {
            kind: Kind::Fanout,
            sockets: 100,
            flappers: 2,
            ..Scenario::default()
        };
        assert_eq!(f.watches(0), Vec::<u32>::new());
        assert_eq!(f.watches(50), vec![0, 1]);
        assert_eq!(user_of(&identity(42)), Some(42));
    }
}
