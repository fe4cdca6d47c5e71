// The plugin's tokio runtimes: one thread per session for everything of its
// peer connection, one small shared runtime for the rest, and cancellable,
// bounded waits from GStreamer's streaming threads.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use futures::future::{AbortHandle, Abortable};
use tokio::runtime::Handle;
use tokio::sync::Notify;

/// The shared runtime: the waits of the elements' streaming threads (their
/// timeouts) and the few tasks that belong to no session's connection.
pub static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .worker_threads(1)
        .thread_name("roboflow-runtime")
        .build()
        .expect("the roboflow plugin could not create its tokio runtime")
});

/// The session runtimes whose thread still runs, for `live_tasks`.
static SESSION_RUNTIMES: Mutex<Vec<(u64, Handle)>> = Mutex::new(Vec::new());
static NEXT_SESSION_RUNTIME: AtomicU64 = AtomicU64::new(0);

/// How long a closed session's runtime waits for its tasks (the peer
/// connection's close among them) before it drops what is left.
const SESSION_RUNTIME_LINGER: Duration = Duration::from_secs(5);

/// Number of tasks alive on the plugin's runtimes, plus one for each session
/// runtime whose thread has not ended (for leak checks in tests).
pub fn live_tasks() -> usize {
    let sessions: usize = SESSION_RUNTIMES
        .lock()
        .unwrap()
        .iter()
        .map(|(_, handle)| handle.metrics().num_alive_tasks() + 1)
        .sum();
    RUNTIME.metrics().num_alive_tasks() + sessions
}

/// A session's own single-threaded runtime: its peer connection (webrtc-rs
/// spawns its drivers on the ambient runtime), its channel readers and
/// senders all run on one thread, so a packet, its result and the wake-ups
/// between them never cross threads, and one session's work never waits
/// behind another's. `stop()` lets its tasks finish (at most
/// SESSION_RUNTIME_LINGER), then the thread drops the runtime and ends.
#[derive(Debug)]
pub struct SessionRuntime {
    id: u64,
    handle: Handle,
    stop: Arc<Notify>,
}

impl SessionRuntime {
    /// Starts the runtime's thread (named after the session, as far as
    /// Linux's 15 bytes allow).
    pub fn start(session: &str) -> SessionRuntime {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("the roboflow plugin could not create a session's tokio runtime");
        let handle = runtime.handle().clone();
        let stop = Arc::new(Notify::new());
        let id = NEXT_SESSION_RUNTIME.fetch_add(1, Ordering::Relaxed);
        SESSION_RUNTIMES.lock().unwrap().push((id, handle.clone()));
        let stopped = stop.clone();
        let thread_name: String = format!("rf-{session}").chars().filter(char::is_ascii_graphic).take(15).collect();
        let spawned = std::thread::Builder::new().name(thread_name).spawn(move || {
            runtime.block_on(async {
                stopped.notified().await;
                let deadline = Instant::now() + SESSION_RUNTIME_LINGER;
                let metrics = tokio::runtime::Handle::current().metrics();
                while metrics.num_alive_tasks() > 0 && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            });
            drop(runtime);
            SESSION_RUNTIMES.lock().unwrap().retain(|(entry, _)| *entry != id);
        });
        if let Err(err) = spawned {
            SESSION_RUNTIMES.lock().unwrap().retain(|(entry, _)| *entry != id);
            panic!("the roboflow plugin could not start a session's thread: {err}");
        }
        SessionRuntime { id, handle, stop }
    }

    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// The session is closed: the thread ends once its tasks have.
    pub fn stop(&self) {
        self.stop.notify_one();
    }

    /// Whether the runtime's thread still runs.
    #[cfg_attr(not(test), allow(dead_code))]
    fn running(&self) -> bool {
        SESSION_RUNTIMES.lock().unwrap().iter().any(|(entry, _)| *entry == self.id)
    }
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
    use std::sync::atomic::AtomicBool;

    /// Polls `done` every 10 ms for at most `limit`.
    fn eventually(limit: Duration, done: impl Fn() -> bool) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if done() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        done()
    }

    #[test]
    fn a_session_runtime_runs_its_tasks_on_its_own_thread_and_ends_after_them() {
        let runtime = SessionRuntime::start("test-ends");
        let (thread_tx, thread_rx) = std::sync::mpsc::channel();
        let finished = Arc::new(AtomicBool::new(false));
        let task_finished = finished.clone();
        runtime.handle().spawn(async move {
            thread_tx.send(std::thread::current().name().map(str::to_owned)).unwrap();
            tokio::time::sleep(Duration::from_millis(200)).await;
            task_finished.store(true, Ordering::SeqCst);
        });
        let thread = thread_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(thread.as_deref(), Some("rf-test-ends"));
        assert!(runtime.running());
        runtime.stop();
        assert!(eventually(Duration::from_secs(5), || !runtime.running()), "the thread ends after stop()");
        assert!(finished.load(Ordering::SeqCst), "its task finished before the runtime was dropped");
    }

    #[test]
    fn a_session_runtime_drops_a_task_that_outlives_the_linger() {
        let runtime = SessionRuntime::start("test-linger");
        runtime.handle().spawn(std::future::pending::<()>());
        let started = Instant::now();
        runtime.stop();
        assert!(eventually(SESSION_RUNTIME_LINGER * 2, || !runtime.running()), "the thread ends anyway");
        assert!(started.elapsed() >= SESSION_RUNTIME_LINGER - Duration::from_millis(100), "it waited the linger first");
    }

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
