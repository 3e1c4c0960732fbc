//! Flags that one task raises and then wakes another with, polled without
//! a lock: an atomic load and, while not raised, a waker registration.

use std::task::{Context, Poll};

use atomic_waker::AtomicWaker;

/// Polls a flag that another task raises and then wakes `waker`: ready
/// once `raised` returns true.
pub fn poll_raised(
    waker: &AtomicWaker,
    cx: &mut Context<'_>,
    raised: impl Fn() -> bool,
) -> Poll<()> {
    if raised() {
        return Poll::Ready(());
    }
    waker.register(cx.waker());
    // Checked again after registering, so a raise in between is seen.
    if raised() {
        return Poll::Ready(());
    }
    Poll::Pending
}
