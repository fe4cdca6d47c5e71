// The plugin's single tokio runtime, and cancellable, bounded waits on it
// from GStreamer's streaming threads.

use std::future::Future;
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use futures::future::{AbortHandle, Abortable};

/// One runtime for every element and session of the plugin: webrtc-rs spawns
/// its drivers on the ambient tokio runtime, so everything that touches a peer
/// connection must run inside this one.
pub static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .worker_threads(2)
        .thread_name("roboflow-runtime")
        .build()
        .expect("the roboflow plugin could not create its tokio runtime")
});

/// Number of tasks alive on the plugin runtime (for leak checks in tests).
pub fn live_tasks() -> usize {
    RUNTIME.metrics().num_alive_tasks()
}

/// Why a wait did not produce a value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WaitError {
    /// `unlock()` or a state change cancelled the wait: not an error to report.
    Cancelled,
    /// The wait ran longer than allowed.
    TimedOut(Duration),
}

/// The pending wait of one element, so that `unlock()` can abort it.
#[derive(Debug, Default)]
enum Canceller {
    #[default]
    Idle,
    Waiting(AbortHandle),
    /// Set by `unlock()`; every wait fails fast until `unlock_stop()`.
    Cancelled,
}

/// The cancellable waits of one element's streaming thread: `unlock()`
/// aborts the pending wait and fails the next ones until `unlock_stop()`,
/// as GstBaseSrc expects of its unlock virtual methods.
#[derive(Debug, Default)]
pub struct Waits(Mutex<Canceller>);

impl Waits {
    pub fn unlock(&self) {
        let mut canceller = self.0.lock().unwrap();
        if let Canceller::Waiting(handle) = &*canceller {
            handle.abort();
        }
        *canceller = Canceller::Cancelled;
    }

    pub fn unlock_stop(&self) {
        let mut canceller = self.0.lock().unwrap();
        if matches!(*canceller, Canceller::Cancelled) {
            *canceller = Canceller::Idle;
        }
    }

    /// Runs `future` on the plugin runtime from a non-runtime thread,
    /// blocking until it completes, `timeout` passes, or unlock().
    pub fn run<F, T>(&self, timeout: Option<Duration>, future: F) -> Result<T, WaitError>
    where
        F: Future<Output = T> + Send,
        T: Send,
    {
        let (handle, registration) = AbortHandle::new_pair();
        {
            let mut canceller = self.0.lock().unwrap();
            if matches!(*canceller, Canceller::Cancelled) {
                return Err(WaitError::Cancelled);
            }
            *canceller = Canceller::Waiting(handle);
        }
        let abortable = Abortable::new(future, registration);
        let outcome = RUNTIME.block_on(async move {
            match timeout {
                Some(limit) => match tokio::time::timeout(limit, abortable).await {
                    Ok(Ok(value)) => Ok(value),
                    Ok(Err(_aborted)) => Err(WaitError::Cancelled),
                    Err(_elapsed) => Err(WaitError::TimedOut(limit)),
                },
                None => abortable.await.map_err(|_aborted| WaitError::Cancelled),
            }
        });
        let mut canceller = self.0.lock().unwrap();
        if matches!(*canceller, Canceller::Waiting(_)) {
            *canceller = Canceller::Idle;
        }
        outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn wait_returns_value() {
        assert_eq!(Waits::default().run(None, async { 7 }), Ok(7));
    }

    #[test]
    fn wait_times_out() {
        let limit = Duration::from_millis(20);
        let outcome = Waits::default().run(Some(limit), futures::future::pending::<()>());
        assert_eq!(outcome, Err(WaitError::TimedOut(limit)));
    }

    #[test]
    fn unlock_aborts_a_pending_wait_and_fails_later_ones_until_unlock_stop() {
        let waits = Arc::new(Waits::default());
        let remote = waits.clone();
        let unlocker = std::thread::spawn(move || {
            for _ in 0..200 {
                if matches!(*remote.0.lock().unwrap(), Canceller::Waiting(_)) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            remote.unlock();
        });
        let outcome = waits.run(Some(Duration::from_secs(10)), futures::future::pending::<()>());
        unlocker.join().unwrap();
        assert_eq!(outcome, Err(WaitError::Cancelled));
        assert_eq!(waits.run(None, async { 1 }), Err(WaitError::Cancelled));
        waits.unlock_stop();
        assert_eq!(waits.run(None, async { 2 }), Ok(2));
    }
}
