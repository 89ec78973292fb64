//! Who may open a connection: the cap on connections that are not authenticated sockets yet
//! (`limits.max_pending_connections`, and `limits.max_pending_per_address` per source address).
//!
//! A connection is *pending* from its accept until it is closed or becomes an authenticated
//! socket (`welcome`): an HTTP connection, kept alive or not, and an upgraded socket waiting
//! for `hello`. The accept loop asks [`Pending::admit`] before it reads a byte; the slot it gets
//! travels with the connection (as a request extension into the WebSocket upgrade, then into
//! the socket's task) and is given back when its last holder drops it. So a stranger who opens
//! connections and sends nothing, or half a request, holds at most its address's share, and
//! honest clients from other addresses are still admitted.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use dashmap::DashMap;
use prometheus::IntGauge;

/// Why a connection was not admitted; the `reason` label of `reach_connections_refused_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// `limits.max_pending_connections` pending connections in all.
    PendingTotal,
    /// `limits.max_pending_per_address` pending connections from this address.
    PendingPerAddress,
}

impl Refused {
    pub fn label(self) -> &'static str {
        match self {
            Refused::PendingTotal => "pending_total",
            Refused::PendingPerAddress => "pending_per_address",
        }
    }
}

/// The pending connections, in all and per address.
#[derive(Debug)]
pub struct Pending {
    max_total: usize,
    max_per_address: usize,
    total: AtomicUsize,
    per_address: DashMap<IpAddr, usize>,
    /// `reach_pending_connections`.
    gauge: IntGauge,
}

impl Pending {
    pub fn new(max_total: usize, max_per_address: usize, gauge: IntGauge) -> Arc<Pending> {
        Arc::new(Pending {
            max_total,
            max_per_address,
            total: AtomicUsize::new(0),
            per_address: DashMap::new(),
            gauge,
        })
    }

    /// A slot for a new connection from `address`, unless a cap is reached.
    pub fn admit(self: &Arc<Self>, address: IpAddr) -> Result<Slot, Refused> {
        if self
            .total
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_total).then_some(n + 1)
            })
            .is_err()
        {
            return Err(Refused::PendingTotal);
        }
        let mut count = self.per_address.entry(address).or_insert(0);
        if *count >= self.max_per_address {
            drop(count);
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(Refused::PendingPerAddress);
        }
        *count += 1;
        self.gauge.inc();
        Ok(Slot {
            _held: Arc::new(Held {
                pending: Arc::clone(self),
                address,
            }),
        })
    }

    /// Pending connections now.
    pub fn len(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn release(&self, address: IpAddr) {
        if let dashmap::Entry::Occupied(mut e) = self.per_address.entry(address) {
            *e.get_mut() -= 1;
            if *e.get() == 0 {
                e.remove();
            }
        }
        self.total.fetch_sub(1, Ordering::AcqRel);
        self.gauge.dec();
    }
}

/// One admitted connection's place; given back when the last clone is dropped.
#[derive(Debug, Clone)]
pub struct Slot {
    _held: Arc<Held>,
}

#[derive(Debug)]
struct Held {
    pending: Arc<Pending>,
    address: IpAddr,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.pending.release(self.address);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_hold_in_all_and_per_address_and_slots_come_back() {
        let gauge = IntGauge::new("pending", "test").unwrap();
        let pending = Pending::new(3, 2, gauge.clone());
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let b: IpAddr = "127.0.0.3".parse().unwrap();
        let a1 = pending.admit(a).unwrap();
        let a2 = pending.admit(a).unwrap();
        assert_eq!(pending.admit(a).unwrap_err(), Refused::PendingPerAddress);
        let b1 = pending.admit(b).unwrap();
        assert_eq!(pending.admit(b).unwrap_err(), Refused::PendingTotal);
        assert_eq!(pending.len(), 3);
        // A clone (the upgrade's) keeps the slot until it is dropped too.
        let upgraded = a1.clone();
        drop(a1);
        assert_eq!(pending.len(), 3);
        drop(upgraded);
        assert_eq!(pending.len(), 2);
        let a3 = pending.admit(a).unwrap();
        drop((a2, b1));
        assert_eq!(pending.len(), 1);
        assert_eq!(gauge.get(), 1);
        drop(a3);
        assert!(pending.is_empty());
        assert_eq!(gauge.get(), 0);
    }
}
