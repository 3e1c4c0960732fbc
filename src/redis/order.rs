//! Keeps one client's commands in order while a cluster's slot map changes.
//!
//! Commands routed by one map reach each slot's node in the client's order,
//! and the writer follows their redirects in that order too. When the map
//! changes, a command routed by the new map could reach a slot's new owner
//! before an earlier command, still on the old owner, is redirected there.
//! So a session routes by a new map only once every command it routed by
//! the old one has its final reply. Until then it reads no more requests.
//!
//! A command retried after TRYAGAIN or CLUSTERDOWN waits before it is sent
//! again, and later commands of the client could run first. So while the
//! writer follows a redirect or retries, the session routes nothing, and a
//! command with later commands already sent gets its error instead of a
//! retry, as with a pipeline sent to Redis directly.

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
    /// Redirects and retries the writer is following for these commands.
    retrying: AtomicUsize,
    /// Notified when `outstanding` drops to 0.
    all_replied: Notify,
}

/// Counts one command as outstanding until dropped.
pub struct Outstanding(Arc<Shared>);

impl Drop for Outstanding {
    fn drop(&mut self) {
        if self.0.outstanding.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.all_replied.notify_one();
        }
    }
}

impl Outstanding {
    /// Returns a hold that keeps the session from routing while the
    /// writer follows a redirect or retries this command.
    pub fn hold_for_retry(&self) -> RetryHold {
        self.0.retrying.fetch_add(1, Ordering::SeqCst);
        RetryHold(self.0.clone())
    }
}

/// Keeps the session from routing until dropped.
pub struct RetryHold(Arc<Shared>);

impl RetryHold {
    /// Returns true when the client has commands outstanding after this
    /// one, which a retry sent now would follow instead of precede.
    pub fn later_commands_sent(&self) -> bool {
        // Sequentially consistent with `MapOrder::reserve`: either the
        // session reads the hold and waits, or this load counts its command.
        self.0.outstanding.load(Ordering::SeqCst) > 1
    }
}

impl Drop for RetryHold {
    fn drop(&mut self) {
        self.0.retrying.fetch_sub(1, Ordering::SeqCst);
    }
}

impl MapOrder {
    /// Counts a command of `route` about to go by the map of `version` as
    /// outstanding, and returns its count. Returns `None` while the
    /// command must wait, because commands of the route that went by
    /// another map are outstanding or the writer is retrying one of them.
    pub fn reserve(&mut self, route: RouteId, version: u64) -> Option<Outstanding> {
        let order = self.route(route);
        order.shared.outstanding.fetch_add(1, Ordering::SeqCst);
        let outstanding = Outstanding(order.shared.clone());
        if order.shared.retrying.load(Ordering::SeqCst) > 0 {
            return None;
        }
        if order.version != version {
            if order.shared.outstanding.load(Ordering::SeqCst) > 1 {
                return None;
            }
            order.version = version;
        }
        Some(outstanding)
    }

    /// Waits until every tracked command of `route` has its final reply.
    pub async fn all_replied(&mut self, route: RouteId) {
        let shared = &self.route(route).shared;
        while shared.outstanding.load(Ordering::SeqCst) > 0 {
            shared.all_replied.notified().await;
        }
    }

    fn route(&mut self, route: RouteId) -> &mut RouteOrder {
        if self.routes.len() <= route {
            self.routes.resize_with(route + 1, || RouteOrder {
                version: 0,
                shared: Arc::new(Shared {
                    outstanding: AtomicUsize::new(0),
                    retrying: AtomicUsize::new(0),
                    all_replied: Notify::new(),
                }),
            });
        }
        &mut self.routes[route]
    }
}

tokio::task_local! {
    /// The count of the tracked command whose reply future the writer is
    /// polling, for the replies nested in it, such as the parts of a
    /// split multi-key command.
    static RESOLVING: Outstanding;
}

/// Returns a hold for a retry of a reply nested in a tracked command, or
/// `None` outside one.
pub fn hold_for_nested_retry() -> Option<RetryHold> {
    RESOLVING.try_with(Outstanding::hold_for_retry).ok()
}

/// Keeps `outstanding` with `pending` until its reply is final. Changed in
/// place, because a move copies its 144 bytes.
pub fn track(pending: &mut Pending, outstanding: Outstanding) {
    match pending {
        Pending::Ready(_) => {}
        Pending::InFlight(in_flight) => in_flight.outstanding = Some(outstanding),
        Pending::Future(future) => {
            // A boxed zero-sized future allocates nothing.
            let future = std::mem::replace(future, Box::pin(std::future::pending()));
            *pending = Pending::Future(Box::pin(RESOLVING.scope(outstanding, future)));
        }
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

    /// Reserves and tracks a command that completes when awaited.
    fn send(order: &mut MapOrder, route: RouteId, version: u64) -> Option<Pending> {
        let outstanding = order.reserve(route, version)?;
        let mut pending = ready_future();
        track(&mut pending, outstanding);
        Some(pending)
    }

    #[tokio::test]
    async fn map_order_waits_for_old_map() {
        let mut order = MapOrder::default();
        let pending = send(&mut order, 0, 1).expect("the first map goes");
        assert!(order.reserve(0, 1).is_some(), "the same map goes on");
        assert!(order.reserve(0, 2).is_none(), "a new map waits");
        assert!(order.reserve(1, 5).is_some(), "another route does not wait");

        assert_eq!(reply_of(pending).await, "+OK\r\n");
        tokio::time::timeout(Duration::from_secs(1), order.all_replied(0))
            .await
            .expect("every command has its final reply");
        assert!(order.reserve(0, 2).is_some());
        assert!(
            order.reserve(0, 1).is_some(),
            "nothing outstanding: any map goes"
        );
    }

    #[tokio::test]
    async fn map_order_wakes_waiting_session() {
        let mut order = MapOrder::default();
        let first = send(&mut order, 0, 1).unwrap();
        let second = send(&mut order, 0, 1).unwrap();
        assert!(order.reserve(0, 2).is_none());
        let replies = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            reply_of(first).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
            reply_of(second).await;
        });
        tokio::time::timeout(Duration::from_secs(5), order.all_replied(0))
            .await
            .expect("woken when the last command has its reply");
        assert!(order.reserve(0, 2).is_some());
        replies.await.unwrap();
    }

    #[tokio::test]
    async fn map_order_skips_ready_replies() {
        let mut order = MapOrder::default();
        let mut ready = Pending::Ready(Bytes::from("+OK\r\n"));
        track(&mut ready, order.reserve(0, 1).unwrap());
        assert!(order.reserve(0, 2).is_some());
    }

    #[test]
    fn retry_hold_stops_routing() {
        let mut order = MapOrder::default();
        let outstanding = order.reserve(0, 1).unwrap();
        let hold = outstanding.hold_for_retry();
        assert!(!hold.later_commands_sent(), "the retried command alone");
        assert!(order.reserve(0, 1).is_none(), "no routing during a retry");
        assert!(
            !hold.later_commands_sent(),
            "a refused command is not counted"
        );
        drop(hold);
        let later = order
            .reserve(0, 1)
            .expect("routing goes on after the retry");

        let hold = outstanding.hold_for_retry();
        assert!(hold.later_commands_sent(), "a later command went first");
        drop((hold, later, outstanding));
        assert!(order.reserve(0, 2).is_some(), "nothing outstanding");
    }
}
