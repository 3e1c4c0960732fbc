//! The signal on which client sessions stop reading requests when skiff
//! shuts down.
//!
//! A session's read loop waits on it beside every read, so it is polled
//! about twice per request. A `CancellationToken` future locks the token's
//! list of waiters, shared by every session, on each poll. Here a poll is
//! an atomic load and, when the waker is the same as last time, a
//! compare-and-swap.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use atomic_waker::AtomicWaker;
use parking_lot::Mutex;

use crate::signal::poll_raised;

/// Stops every session that watches it.
#[derive(Default)]
pub struct StopSignal {
    stopped: AtomicBool,
    next_id: AtomicU64,
    /// The waker of each session waiting, by watch id.
    watchers: Mutex<HashMap<u64, Arc<AtomicWaker>>>,
}

impl StopSignal {
    pub fn new() -> Arc<StopSignal> {
        Arc::default()
    }

    /// Returns a future that completes once [`StopSignal::stop`] is
    /// called, at once if it already was.
    pub fn watch(self: &Arc<Self>) -> StopWatch {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let waker = Arc::new(AtomicWaker::new());
        self.watchers.lock().insert(id, waker.clone());
        StopWatch {
            signal: self.clone(),
            id,
            waker,
        }
    }

    /// Completes every watch, present and future.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        for waker in self.watchers.lock().values() {
            waker.wake();
        }
    }

    fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }
}

/// One session's wait for a [`StopSignal`]; it may be polled any number
/// of times, before and after it completes.
pub struct StopWatch {
    signal: Arc<StopSignal>,
    id: u64,
    waker: Arc<AtomicWaker>,
}

impl Future for StopWatch {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        poll_raised(&self.waker, cx, || self.signal.is_stopped())
    }
}

impl Drop for StopWatch {
    fn drop(&mut self) {
        self.signal.watchers.lock().remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stop_wakes_waiting_watches() {
        let signal = StopSignal::new();
        let waiting: Vec<_> = (0..3).map(|_| tokio::spawn(signal.watch())).collect();
        tokio::task::yield_now().await;
        assert!(waiting.iter().all(|task| !task.is_finished()));

        signal.stop();
        for task in waiting {
            tokio::time::timeout(std::time::Duration::from_secs(5), task)
                .await
                .expect("a waiting watch completes on stop")
                .unwrap();
        }
    }

    #[tokio::test]
    async fn watch_after_stop_completes_at_once() {
        let signal = StopSignal::new();
        signal.stop();
        let mut watch = signal.watch();
        let polled = futures_util::poll!(&mut watch);
        assert_eq!(polled, Poll::Ready(()));
        // It stays complete when polled again.
        assert_eq!(futures_util::poll!(&mut watch), Poll::Ready(()));
    }

    #[test]
    fn dropped_watches_leave_the_signal() {
        let signal = StopSignal::new();
        let first = signal.watch();
        let second = signal.watch();
        assert_eq!(signal.watchers.lock().len(), 2);
        drop(first);
        drop(second);
        assert!(signal.watchers.lock().is_empty());
    }
}
