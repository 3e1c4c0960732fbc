//! Keeps one client's commands in order while a cluster's slot map changes.
//!
//! Commands routed by one map reach each slot's node in the client's order,
//! and the writer follows their redirects in that order too. When the map
//! changes, a command routed by the new map could reach a slot's new owner
//! before an earlier command, still on the old owner, is redirected there.
//! So a session routes by a new map only once every command it routed by
//! the old one has its final reply. Until then it reads no more requests.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

use super::router::Pending;
use super::routes::RouteId;

/// The commands of a session still waiting for their final reply, and the
/// slot map they were routed by.
pub struct MapOrder {
    /// The route and map version the outstanding commands went by.
    routed_by: (RouteId, u64),
    shared: Arc<Shared>,
}

struct Shared {
    outstanding: AtomicUsize,
    /// Notified when `outstanding` drops to 0.
    all_replied: Notify,
}

/// Counts one command as outstanding until dropped.
pub struct Outstanding(Arc<Shared>);

impl Drop for Outstanding {
    fn drop(&mut self) {
        if self.0.outstanding.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.all_replied.notify_one();
        }
    }
}

impl Default for MapOrder {
    fn default() -> MapOrder {
        MapOrder {
            routed_by: (0, 0),
            shared: Arc::new(Shared {
                outstanding: AtomicUsize::new(0),
                all_replied: Notify::new(),
            }),
        }
    }
}

impl MapOrder {
    /// Returns true, and records the version, when a command of `route` may
    /// go by the map of `version` now. Returns false while commands routed
    /// by another map are outstanding.
    pub fn may_route(&mut self, route: RouteId, version: u64) -> bool {
        if self.routed_by == (route, version) {
            return true;
        }
        if self.shared.outstanding.load(Ordering::Acquire) > 0 {
            return false;
        }
        self.routed_by = (route, version);
        true
    }

    /// Waits until every tracked command has its final reply.
    pub async fn all_replied(&self) {
        while self.shared.outstanding.load(Ordering::Acquire) > 0 {
            self.shared.all_replied.notified().await;
        }
    }

    /// Counts `pending` as outstanding until its reply is final.
    pub fn track(&self, pending: Pending) -> Pending {
        match pending {
            Pending::Ready(_) => pending,
            Pending::InFlight(mut in_flight) => {
                in_flight.outstanding = Some(self.outstanding());
                Pending::InFlight(in_flight)
            }
            Pending::Future(future) => {
                let outstanding = self.outstanding();
                Pending::Future(Box::pin(async move {
                    let reply = future.await;
                    drop(outstanding);
                    reply
                }))
            }
        }
    }

    fn outstanding(&self) -> Outstanding {
        self.shared.outstanding.fetch_add(1, Ordering::AcqRel);
        Outstanding(self.shared.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[tokio::test]
    async fn map_order_waits_for_old_map() {
        let mut order = MapOrder::default();
        assert!(order.may_route(0, 1));
        let pending = order.track(Pending::Future(Box::pin(async { Bytes::from("+OK\r\n") })));
        assert!(order.may_route(0, 1), "the same map goes on");
        assert!(!order.may_route(0, 2), "a new map waits");
        assert!(!order.may_route(1, 1), "another route waits");
        let reply = match pending {
            Pending::Future(future) => future.await,
            _ => unreachable!("tracked as a future"),
        };
        assert_eq!(reply, "+OK\r\n");
        tokio::time::timeout(std::time::Duration::from_secs(1), order.all_replied())
            .await
            .expect("every command has its final reply");
        assert!(order.may_route(0, 2));
        assert!(order.may_route(0, 1), "nothing outstanding: any map goes");
    }

    #[tokio::test]
    async fn map_order_skips_ready_replies() {
        let mut order = MapOrder::default();
        assert!(order.may_route(0, 1));
        let _ready = order.track(Pending::Ready(Bytes::from("+OK\r\n")));
        assert!(order.may_route(0, 2));
    }
}
