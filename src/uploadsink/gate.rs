// What lets the sink's streaming thread go on: the element's state (PAUSED
// holds the job, PLAYING lets it run), flushes and the stop. The thread
// blocks here and in its bounded waits on the runtime; a flush or a stop
// ends both within milliseconds, and nothing here ever waits for the
// streaming thread.

use std::future::Future;
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use crate::runtime::{WaitError, Waits};

#[derive(Debug, Default)]
struct Flags {
    playing: bool,
    flushing: bool,
    /// Between PAUSED->READY and the next READY->PAUSED.
    stopping: bool,
}

/// The streaming thread's answer to a flush or a stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cancelled;

#[derive(Debug)]
pub struct Gate {
    flags: Mutex<Flags>,
    changed: Condvar,
    waits: Waits,
}

impl Default for Gate {
    fn default() -> Self {
        let gate = Gate { flags: Mutex::new(Flags::default()), changed: Condvar::new(), waits: Waits::default() };
        // Stopped until the first READY->PAUSED.
        gate.stop();
        gate
    }
}

impl Gate {
    /// READY->PAUSED: a new job, held until PLAYING.
    pub fn start(&self) {
        let mut flags = self.flags.lock().unwrap();
        *flags = Flags::default();
        self.waits.unlock_stop();
    }

    /// PAUSED->READY: every wait ends, now and until the next start.
    pub fn stop(&self) {
        let mut flags = self.flags.lock().unwrap();
        flags.stopping = true;
        flags.playing = false;
        self.waits.unlock();
        self.changed.notify_all();
    }

    pub fn set_playing(&self, playing: bool) {
        let mut flags = self.flags.lock().unwrap();
        flags.playing = playing;
        self.changed.notify_all();
    }

    pub fn flush_start(&self) {
        let mut flags = self.flags.lock().unwrap();
        flags.flushing = true;
        self.waits.unlock();
        self.changed.notify_all();
    }

    pub fn flush_stop(&self) {
        let mut flags = self.flags.lock().unwrap();
        flags.flushing = false;
        // A stop that came meanwhile keeps every wait cancelled.
        if !flags.stopping {
            self.waits.unlock_stop();
        }
    }

    /// True while a flush or a stop refuses the streaming thread's work.
    pub fn is_cancelled(&self) -> bool {
        let flags = self.flags.lock().unwrap();
        flags.flushing || flags.stopping
    }

    /// Blocks while the element is paused; returns at once when it plays.
    pub fn wait_playing(&self) -> Result<(), Cancelled> {
        let flags = self.flags.lock().unwrap();
        let flags = self
            .changed
            .wait_while(flags, |flags| !flags.playing && !flags.flushing && !flags.stopping)
            .unwrap();
        if flags.flushing || flags.stopping { Err(Cancelled) } else { Ok(()) }
    }

    /// Runs `future` on the plugin runtime, up to `timeout`; a flush or a
    /// stop, also one that came before, cancels it. A pause does not: a
    /// wait under way finishes, and the next `wait_playing` holds the job.
    pub fn run<F, T>(&self, timeout: Option<Duration>, future: F) -> Result<T, WaitError>
    where
        F: Future<Output = T> + Send,
        T: Send,
    {
        self.waits.run(timeout, future)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Instant;

    fn started() -> Gate {
        let gate = Gate::default();
        gate.start();
        gate
    }

    /// Runs `f` on another thread after a short while (the gate must be
    /// blocking by then for the test to mean anything; it passes either way).
    fn later(gate: &Arc<Gate>, f: impl FnOnce(&Gate) + Send + 'static) -> std::thread::JoinHandle<()> {
        let gate = gate.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            f(&gate);
        })
    }

    #[test]
    fn a_new_gate_is_stopped() {
        let gate = Gate::default();
        assert!(gate.is_cancelled());
        assert_eq!(gate.wait_playing(), Err(Cancelled));
        assert_eq!(gate.run(None, async { 1 }), Err(WaitError::Cancelled));
    }

    #[test]
    fn paused_holds_until_playing() {
        let gate = Arc::new(started());
        assert!(!gate.is_cancelled());
        let player = later(&gate, |gate| gate.set_playing(true));
        assert_eq!(gate.wait_playing(), Ok(()));
        player.join().unwrap();
        // Playing: no wait at all.
        assert_eq!(gate.wait_playing(), Ok(()));
    }

    #[test]
    fn a_stop_releases_a_paused_thread_and_cancels_waits_until_start() {
        let gate = Arc::new(started());
        let stopper = later(&gate, Gate::stop);
        let started_at = Instant::now();
        assert_eq!(gate.wait_playing(), Err(Cancelled));
        stopper.join().unwrap();
        assert!(started_at.elapsed() < Duration::from_secs(5));
        assert_eq!(gate.run(None, async { 1 }), Err(WaitError::Cancelled));
        gate.start();
        assert_eq!(gate.run(None, async { 2 }), Ok(2));
    }

    #[test]
    fn a_stop_aborts_a_runtime_wait() {
        let gate = Arc::new(started());
        let stopper = later(&gate, Gate::stop);
        let outcome = gate.run(Some(Duration::from_secs(10)), futures::future::pending::<()>());
        stopper.join().unwrap();
        assert_eq!(outcome, Err(WaitError::Cancelled));
    }

    #[test]
    fn a_flush_cancels_until_flush_stop() {
        let gate = Arc::new(started());
        let flusher = later(&gate, Gate::flush_start);
        assert_eq!(gate.wait_playing(), Err(Cancelled));
        flusher.join().unwrap();
        assert_eq!(gate.run(None, async { 1 }), Err(WaitError::Cancelled));
        gate.flush_stop();
        assert!(!gate.is_cancelled());
        assert_eq!(gate.run(None, async { 2 }), Ok(2));
    }

    #[test]
    fn a_flush_stop_after_a_stop_keeps_waits_cancelled() {
        let gate = started();
        gate.flush_start();
        gate.stop();
        gate.flush_stop();
        assert!(gate.is_cancelled());
        assert_eq!(gate.run(None, async { 1 }), Err(WaitError::Cancelled));
    }

    #[test]
    fn a_pause_does_not_cancel_a_wait_under_way() {
        let gate = started();
        gate.set_playing(true);
        gate.set_playing(false);
        assert_eq!(gate.run(Some(Duration::from_secs(5)), async { 3 }), Ok(3));
    }
}
