//! Session threads: a fixed set of threads, each running a single-threaded
//! tokio runtime, that client sessions are spread over.
//!
//! A session, the tasks it spawns and the upstream connections it opens stay
//! on the thread it was given, so a request, its upstream round trip and the
//! reply wake no other thread. On a multi-threaded runtime each of those
//! steps may hand work to another worker, which costs a futex or eventfd
//! wake-up and a context switch. On a small machine those cost more than
//! the request itself.
//!
//! A PostgreSQL server connection stays with the thread that opened it, so
//! with more than one thread, a session that borrows it from the pool may
//! be woken from another thread.

use std::future::Future;
use std::io;

use tokio::runtime::{Builder, Handle};
use tokio_util::sync::{CancellationToken, DropGuard};

/// Returns half the CPUs the process may use, at least one: the default
/// thread count of skiff's runtimes, so a sidecar leaves the rest to the
/// application beside it.
pub fn half_the_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |cpus| (cpus.get() / 2).max(1))
}

/// Returns the number of runtime threads, and of PostgreSQL session
/// threads: `SKIFF_WORKER_THREADS`, or half the CPUs. Half by default,
/// because skiff runs beside the application it serves, and on a small
/// machine a second thread costs more in wake-ups between threads than it
/// adds.
pub fn worker_threads() -> usize {
    std::env::var("SKIFF_WORKER_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or_else(half_the_cpus)
        .max(1)
}

/// Threads that run sessions until this value is dropped.
pub struct SessionThreads {
    handles: Vec<Handle>,
    _stop: DropGuard,
}

impl SessionThreads {
    /// Starts `count` threads (at least one) named `name-N`.
    /// When one fails to start, those already started stop again.
    pub fn start(name: &str, count: usize) -> io::Result<SessionThreads> {
        let stop = CancellationToken::new();
        // Armed before the first thread starts, so an early return by `?`
        // stops the threads started so far.
        let guard = stop.clone().drop_guard();
        let mut handles = Vec::new();
        for index in 0..count.max(1) {
            let runtime = Builder::new_current_thread().enable_all().build()?;
            handles.push(runtime.handle().clone());
            let stopped = stop.clone();
            std::thread::Builder::new()
                .name(format!("{name}-{index}"))
                .spawn(move || runtime.block_on(stopped.cancelled()))?;
        }
        Ok(SessionThreads {
            handles,
            _stop: guard,
        })
    }

    /// Runs `task` on thread `index` modulo the thread count.
    pub fn spawn<F>(&self, index: u64, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let handle = &self.handles[(index % self.handles.len() as u64) as usize];
        drop(handle.spawn(task));
    }
}

#[cfg(test)]
mod tests {
    use super::SessionThreads;

    /// Returns the name of the thread that runs task `index`.
    fn thread_of(threads: &SessionThreads, index: u64) -> String {
        let (sender, receiver) = std::sync::mpsc::channel();
        threads.spawn(index, async move {
            let name = std::thread::current()
                .name()
                .unwrap_or_default()
                .to_string();
            sender.send(name).unwrap();
        });
        receiver
            .recv_timeout(std::time::Duration::from_secs(5))
            .expect("the task ran")
    }

    #[test]
    fn tasks_run_on_index_modulo_count() {
        let threads = SessionThreads::start("placement", 3).unwrap();
        assert_eq!(thread_of(&threads, 0), "placement-0");
        assert_eq!(thread_of(&threads, 4), "placement-1");
        assert_eq!(thread_of(&threads, 5), "placement-2");
        assert_eq!(thread_of(&threads, 9), "placement-0");
    }

    #[test]
    fn zero_threads_start_one() {
        let threads = SessionThreads::start("at-least-one", 0).unwrap();
        assert_eq!(thread_of(&threads, 7), "at-least-one-0");
    }

    #[test]
    fn dropping_stops_the_threads() {
        let threads = SessionThreads::start("stopping", 2).unwrap();
        let (sender, receiver) = std::sync::mpsc::channel::<()>();
        // A task that never ends keeps the sender until its runtime drops it.
        threads.spawn(1, async move {
            let _sender = sender;
            std::future::pending::<()>().await;
        });
        drop(threads);
        let ended = receiver.recv_timeout(std::time::Duration::from_secs(5));
        assert_eq!(ended, Err(std::sync::mpsc::RecvTimeoutError::Disconnected));
    }
}
