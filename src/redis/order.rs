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
/// slot map they were routed by, for each cluster route. A key always goes
/// by the same route, so commands of two routes need no order between them.
#[derive(Default)]
pub struct MapOrder {
    /// Indexed by route.
    routes: Vec<RouteOrder>,
}

struct RouteOrder {
    /// The map version the outstanding commands went by.
    version: u64,
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

impl MapOrder {
    /// Returns true, and records the version, when a command of `route` may
    /// go by the map of `version` now. Returns false while commands of the
    /// route that went by another map are outstanding.
    pub fn may_route(&mut self, route: RouteId, version: u64) -> bool {
        let order = self.route(route);
        if order.version == version {
            return true;
        }
        if order.shared.outstanding.load(Ordering::Acquire) > 0 {
            return false;
        }
        order.version = version;
        true
    }

    /// Waits until every tracked command of `route` has its final reply.
    pub async fn all_replied(&mut self, route: RouteId) {
        let shared = &self.route(route).shared;
        while shared.outstanding.load(Ordering::Acquire) > 0 {
            shared.all_replied.notified().await;
        }
    }

    /// Counts `pending`, a command of `route`, as outstanding until its
    /// reply is final. Changed in place, because a move copies its 144 bytes.
    pub fn track(&mut self, route: RouteId, pending: &mut Pending) {
        match pending {
            Pending::Ready(_) => {}
            Pending::InFlight(in_flight) => in_flight.outstanding = Some(self.outstanding(route)),
            Pending::Future(future) => {
                let outstanding = self.outstanding(route);
                // A boxed zero-sized future allocates nothing.
                let future = std::mem::replace(future, Box::pin(std::future::pending()));
                *pending = Pending::Future(Box::pin(async move {
                    let reply = future.await;
                    drop(outstanding);
                    reply
                }));
            }
        }
    }

    fn outstanding(&mut self, route: RouteId) -> Outstanding {
        let shared = &self.route(route).shared;
        shared.outstanding.fetch_add(1, Ordering::AcqRel);
        Outstanding(shared.clone())
    }

    fn route(&mut self, route: RouteId) -> &mut RouteOrder {
        if self.routes.len() <= route {
            self.routes.resize_with(route + 1, || RouteOrder {
                version: 0,
                shared: Arc::new(Shared {
                    outstanding: AtomicUsize::new(0),
                    all_replied: Notify::new(),
                }),
            });
        }
        &mut self.routes[route]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use std::time::Duration;

    fn ready_future() -> Pending {
        Pending::Future(Box::pin(async { Bytes::from("+OK\r\n") }))
    }

    async fn reply_of(pending: Pending) -> Bytes {
        match pending {
            Pending::Future(future) => future.await,
            _ => unreachable!("tracked as a future"),
        }
    }

    #[tokio::test]
    async fn map_order_waits_for_old_map() {
        let mut order = MapOrder::default();
        assert!(order.may_route(0, 1));
        let mut pending = ready_future();
        order.track(0, &mut pending);
        assert!(order.may_route(0, 1), "the same map goes on");
        assert!(!order.may_route(0, 2), "a new map waits");
        assert!(order.may_route(1, 5), "another route does not wait");

        assert_eq!(reply_of(pending).await, "+OK\r\n");
        tokio::time::timeout(Duration::from_secs(1), order.all_replied(0))
            .await
            .expect("every command has its final reply");
        assert!(order.may_route(0, 2));
        assert!(order.may_route(0, 1), "nothing outstanding: any map goes");
    }

    #[tokio::test]
    async fn map_order_wakes_waiting_session() {
        let mut order = MapOrder::default();
        assert!(order.may_route(0, 1));
        let (mut first, mut second) = (ready_future(), ready_future());
        order.track(0, &mut first);
        order.track(0, &mut second);
        assert!(!order.may_route(0, 2));
        let replies = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            reply_of(first).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
            reply_of(second).await;
        });
        tokio::time::timeout(Duration::from_secs(5), order.all_replied(0))
            .await
            .expect("woken when the last command has its reply");
        assert!(order.may_route(0, 2));
        replies.await.unwrap();
    }

    #[tokio::test]
    async fn map_order_skips_ready_replies() {
        let mut order = MapOrder::default();
        assert!(order.may_route(0, 1));
        let mut ready = Pending::Ready(Bytes::from("+OK\r\n"));
        order.track(0, &mut ready);
        assert!(order.may_route(0, 2));
    }
}
