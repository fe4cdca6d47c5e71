// The plugin's single tokio runtime, and cancellable, bounded waits on it
// from GStreamer's streaming threads.

use std::future::Future;
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use futures::future::{AbortHandle, AbortRegistration, Abortable};

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
pub enum Canceller {
    #[default]
    Idle,
    Waiting(AbortHandle),
    /// Set by `unlock()`; every wait fails fast until `unlock_stop()`.
    Cancelled,
}

impl Canceller {
    pub fn cancel(&mut self) {
        if let Canceller::Waiting(handle) = self {
            handle.abort();
        }
        *self = Canceller::Cancelled;
    }

    pub fn reset(&mut self) {
        if matches!(self, Canceller::Cancelled) {
            *self = Canceller::Idle;
        }
    }
}

/// The cancellable waits of one element's streaming thread: `unlock()`
/// aborts the pending wait and fails the next ones until `unlock_stop()`,
/// as GstBaseSink/GstBaseSrc expect of their unlock virtual methods.
#[derive(Debug, Default)]
pub struct Waits(Mutex<Canceller>);

impl Waits {
    pub fn unlock(&self) {
        self.0.lock().unwrap().cancel();
    }

    pub fn unlock_stop(&self) {
        self.0.lock().unwrap().reset();
    }

    /// See [`wait`].
    pub fn run<F, T>(&self, timeout: Option<Duration>, future: F) -> Result<T, WaitError>
    where
        F: Future<Output = T> + Send,
        T: Send,
    {
        wait(&self.0, timeout, future)
    }

    /// The first half of [`Waits::run`]: registers the wait, so that an
    /// unlock() from now on aborts it, or fails at once when unlock() came
    /// first. For a thread that must release a lock between the two halves
    /// (an unlock_stop() taken under that lock could otherwise re-arm the
    /// canceller before the wait begins, and the unlock would be lost).
    pub fn arm(&self) -> Result<Armed<'_>, WaitError> {
        Ok(Armed { waits: self, registration: register(&self.0)? })
    }

    /// True between unlock() and unlock_stop().
    pub fn is_cancelled(&self) -> bool {
        matches!(*self.0.lock().unwrap(), Canceller::Cancelled)
    }
}

/// A wait registered by [`Waits::arm`], ready to block.
pub struct Armed<'a> {
    waits: &'a Waits,
    registration: AbortRegistration,
}

impl Armed<'_> {
    pub fn block<F, T>(self, timeout: Option<Duration>, future: F) -> Result<T, WaitError>
    where
        F: Future<Output = T> + Send,
        T: Send,
    {
        block(&self.waits.0, self.registration, timeout, future)
    }
}

fn register(canceller: &Mutex<Canceller>) -> Result<AbortRegistration, WaitError> {
    let (handle, registration) = AbortHandle::new_pair();
    let mut guard = canceller.lock().unwrap();
    if matches!(*guard, Canceller::Cancelled) {
        return Err(WaitError::Cancelled);
    }
    *guard = Canceller::Waiting(handle);
    Ok(registration)
}

/// Runs `future` on the plugin runtime from a non-runtime thread, blocking
/// until it completes, `timeout` passes, or `canceller` is cancelled.
pub fn wait<F, T>(
    canceller: &Mutex<Canceller>,
    timeout: Option<Duration>,
    future: F,
) -> Result<T, WaitError>
where
    F: Future<Output = T> + Send,
    T: Send,
{
    block(canceller, register(canceller)?, timeout, future)
}

fn block<F, T>(
    canceller: &Mutex<Canceller>,
    registration: AbortRegistration,
    timeout: Option<Duration>,
    future: F,
) -> Result<T, WaitError>
where
    F: Future<Output = T> + Send,
    T: Send,
{
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

    let mut guard = canceller.lock().unwrap();
    if matches!(*guard, Canceller::Waiting(_)) {
        *guard = Canceller::Idle;
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn wait_returns_value() {
        let canceller = Mutex::new(Canceller::Idle);
        assert_eq!(wait(&canceller, None, async { 7 }), Ok(7));
    }

    #[test]
    fn wait_times_out() {
        let canceller = Mutex::new(Canceller::Idle);
        let limit = Duration::from_millis(20);
        let outcome = wait(&canceller, Some(limit), futures::future::pending::<()>());
        assert_eq!(outcome, Err(WaitError::TimedOut(limit)));
    }

    #[test]
    fn an_unlock_after_arming_aborts_the_wait_even_after_unlock_stop() {
        // The sink arms, releases its lock, then blocks: unlock() and
        // unlock_stop() may both come in between.
        let waits = Waits::default();
        let armed = waits.arm().unwrap();
        waits.unlock();
        waits.unlock_stop();
        let outcome = armed.block(Some(Duration::from_secs(10)), futures::future::pending::<()>());
        assert_eq!(outcome, Err(WaitError::Cancelled));
        assert!(!waits.is_cancelled());
        assert_eq!(waits.run(None, async { 3 }), Ok(3));
    }

    #[test]
    fn arming_after_unlock_fails_until_unlock_stop() {
        let waits = Waits::default();
        waits.unlock();
        assert!(waits.is_cancelled());
        assert!(matches!(waits.arm(), Err(WaitError::Cancelled)));
        waits.unlock_stop();
        assert!(waits.arm().is_ok());
    }

    #[test]
    fn cancel_aborts_a_pending_wait_and_blocks_later_ones_until_reset() {
        let canceller = Arc::new(Mutex::new(Canceller::Idle));
        let remote = canceller.clone();
        let cancel_thread = std::thread::spawn(move || {
            for _ in 0..200 {
                if matches!(*remote.lock().unwrap(), Canceller::Waiting(_)) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            remote.lock().unwrap().cancel();
        });
        let outcome = wait(
            &canceller,
            Some(Duration::from_secs(10)),
            futures::future::pending::<()>(),
        );
        cancel_thread.join().unwrap();
        assert_eq!(outcome, Err(WaitError::Cancelled));
        assert_eq!(wait(&canceller, None, async { 1 }), Err(WaitError::Cancelled));
        canceller.lock().unwrap().reset();
        assert_eq!(wait(&canceller, None, async { 2 }), Ok(2));
    }
}
