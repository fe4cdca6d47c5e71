//! Keepalive and ack bookkeeping (PROTOCOL.md sections 4 and 7). Time is
//! passed in; nothing here sleeps or reads a clock.

use std::collections::{BTreeSet, VecDeque};
use std::time::{Duration, Instant};

/// The reference client's keepalive interval on `video_upload`.
pub const DEFAULT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);

/// Most unanswered keepalives remembered; older ones are forgotten but still
/// counted by [`KeepaliveTracker::missed_echoes`].
const MAX_OUTSTANDING: usize = 1024;

/// Decides when to send a keepalive and pairs the server's echoes with the
/// sends, first in first out, to measure round-trip times.
#[derive(Debug, Clone)]
pub struct KeepaliveTracker {
    interval: Duration,
    next_due: Option<Instant>,
    outstanding: VecDeque<Instant>,
    forgotten_unanswered: u32,
    sent: u64,
    echoed: u64,
    unmatched_echoes: u64,
    last_rtt: Option<Duration>,
}

impl KeepaliveTracker {
    /// `interval` zero disables keepalives: nothing is ever due.
    pub fn new(interval: Duration) -> Self {
        KeepaliveTracker {
            interval,
            next_due: None,
            outstanding: VecDeque::new(),
            forgotten_unanswered: 0,
            sent: 0,
            echoed: 0,
            unmatched_echoes: 0,
            last_rtt: None,
        }
    }

    pub fn is_enabled(&self) -> bool {
        !self.interval.is_zero()
    }

    /// Starts (or restarts) the schedule: the first keepalive is due
    /// `interval` after `now`.
    pub fn start(&mut self, now: Instant) {
        if self.is_enabled() {
            self.next_due = Some(now + self.interval);
        }
    }

    /// Stops the schedule; echoes of earlier sends are still paired.
    pub fn stop(&mut self) {
        self.next_due = None;
    }

    /// True when a keepalive is due at `now`; the caller must then send
    /// one. Records the send and schedules the next one `interval` after
    /// `now` (a late poll delays the schedule rather than causing a burst).
    pub fn poll_send(&mut self, now: Instant) -> bool {
        match self.next_due {
            Some(due) if now >= due => {
                self.next_due = Some(now + self.interval);
                self.sent += 1;
                if self.outstanding.len() == MAX_OUTSTANDING {
                    self.outstanding.pop_front();
                    self.forgotten_unanswered = self.forgotten_unanswered.saturating_add(1);
                }
                self.outstanding.push_back(now);
                true
            }
            _ => false,
        }
    }

    /// When the next keepalive is due; `None` when disabled or not started.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.next_due
    }

    /// Records an echo; returns the round-trip time of the oldest unanswered
    /// keepalive, or `None` when none was outstanding.
    pub fn on_echo(&mut self, now: Instant) -> Option<Duration> {
        let Some(sent_at) = self.outstanding.pop_front() else {
            self.unmatched_echoes += 1;
            return None;
        };
        let rtt = now.saturating_duration_since(sent_at);
        self.echoed += 1;
        self.last_rtt = Some(rtt);
        Some(rtt)
    }

    /// Keepalives sent so far.
    pub fn sent(&self) -> u64 {
        self.sent
    }

    /// Echoes paired with a send.
    pub fn echoed(&self) -> u64 {
        self.echoed
    }

    /// Echoes that arrived with no keepalive outstanding.
    #[cfg(test)]
    pub fn unmatched_echoes(&self) -> u64 {
        self.unmatched_echoes
    }

    pub fn last_rtt(&self) -> Option<Duration> {
        self.last_rtt
    }

    /// Keepalives sent more than `grace` before `now` and not echoed yet.
    pub fn missed_echoes(&self, now: Instant, grace: Duration) -> u32 {
        let late = self
            .outstanding
            .iter()
            .take_while(|sent_at| now.saturating_duration_since(**sent_at) > grace)
            .count();
        u32::try_from(late)
            .unwrap_or(u32::MAX)
            .saturating_add(self.forgotten_unanswered)
    }
}

/// Cumulative acks for the `inference` channel. The server reads `{"ack":
/// N}` as "frames 1..=N are handled" and then produces frame K only while
/// K <= N + 1 (its window). Frames may be handled out of order; the ack
/// never passes a frame that is not handled yet, plus the lead.
///
/// The lead is a credit: acks run that many frames ahead of the handled
/// ones, so the server never waits an ack round trip while the client has
/// room for that many more, and still stops within the lead when handling
/// stops. Without one, each frame cost a round trip: 900 720p frames took
/// 160 s against the Python SDK's 154 s (which never acks).
#[derive(Debug, Clone, Default)]
pub struct AckTracker {
    /// Highest N such that frames 1..=N are all handled (0: none yet).
    contiguous: u64,
    /// Handled frames above a gap.
    ahead: BTreeSet<u64>,
    lead: u64,
    acks_sent: u64,
}

impl AckTracker {
    #[cfg(test)]
    pub fn new() -> Self {
        AckTracker::default()
    }

    /// Acks that run `lead` frames ahead of the handled ones.
    pub fn with_lead(lead: u64) -> Self {
        AckTracker { lead, ..AckTracker::default() }
    }

    fn ack(&mut self) -> Option<u64> {
        self.acks_sent += 1;
        Some(self.contiguous + self.lead)
    }

    /// Records that `frame_id` (1-based) is fully handled. Returns `Some(N)`
    /// when a new cumulative ack `N` should be sent, i.e. when the run of
    /// handled frames starting at 1 grew. Frame 0, repeats and frames
    /// behind the ack return `None`.
    pub fn on_frame_handled(&mut self, frame_id: u64) -> Option<u64> {
        if frame_id == 0 || frame_id <= self.contiguous {
            return None;
        }
        if frame_id != self.contiguous + 1 {
            self.ahead.insert(frame_id);
            return None;
        }
        self.contiguous = frame_id;
        while self.ahead.remove(&(self.contiguous + 1)) {
            self.contiguous += 1;
        }
        self.ack()
    }

    /// Frames `first..=last` will never be handled: the server processed
    /// them but their results never came (a camera's frames before the
    /// results channel opened). The run of handled frames goes through
    /// them; returns the new ack if it moved.
    pub fn skip(&mut self, first: u64, last: u64) -> Option<u64> {
        let first = first.max(self.contiguous + 1);
        if first > last {
            return None;
        }
        self.ahead.extend(first..=last);
        let before = self.contiguous;
        while self.ahead.remove(&(self.contiguous + 1)) {
            self.contiguous += 1;
        }
        (self.contiguous > before).then(|| self.ack()).flatten()
    }

    /// Declares every frame up to `frame_id` handled, for a gap the caller
    /// knows will never fill. Returns the new ack, if it moved.
    #[cfg(test)]
    pub fn ack_through(&mut self, frame_id: u64) -> Option<u64> {
        if frame_id <= self.contiguous {
            return None;
        }
        self.contiguous = frame_id;
        self.ahead = self.ahead.split_off(&(frame_id + 1));
        while self.ahead.remove(&(self.contiguous + 1)) {
            self.contiguous += 1;
        }
        self.ack()
    }

    /// Highest N such that frames 1..=N are handled (0 before the first).
    #[cfg(test)]
    pub fn handled(&self) -> u64 {
        self.contiguous
    }

    /// Handled frames waiting for a gap below them to fill.
    #[cfg(test)]
    pub fn waiting_for_gap(&self) -> usize {
        self.ahead.len()
    }

    /// Acks returned so far (each should have been sent).
    pub fn acks_sent(&self) -> u64 {
        self.acks_sent
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn keepalive_schedule() {
        let t0 = Instant::now();
        let mut k = KeepaliveTracker::new(5 * S);
        assert!(!k.poll_send(t0 + 100 * S), "not started");
        assert_eq!(k.next_deadline(), None);
        k.start(t0);
        assert_eq!(k.next_deadline(), Some(t0 + 5 * S));
        assert!(!k.poll_send(t0));
        assert!(!k.poll_send(t0 + 4 * S));
        assert!(k.poll_send(t0 + 5 * S));
        assert!(!k.poll_send(t0 + 5 * S), "only once per interval");
        assert_eq!(k.next_deadline(), Some(t0 + 10 * S));
        // A late poll sends one keepalive, not a burst.
        assert!(k.poll_send(t0 + 23 * S));
        assert!(!k.poll_send(t0 + 23 * S));
        assert_eq!(k.next_deadline(), Some(t0 + 28 * S));
        assert_eq!(k.sent(), 2);
        k.stop();
        assert_eq!(k.next_deadline(), None);
        assert!(!k.poll_send(t0 + 100 * S));
    }

    #[test]
    fn keepalive_disabled() {
        let t0 = Instant::now();
        let mut k = KeepaliveTracker::new(Duration::ZERO);
        assert!(!k.is_enabled());
        k.start(t0);
        assert_eq!(k.next_deadline(), None);
        assert!(!k.poll_send(t0 + 1000 * S));
        assert_eq!(k.sent(), 0);
    }

    #[test]
    fn echoes_pair_fifo_and_give_rtt() {
        let t0 = Instant::now();
        let mut k = KeepaliveTracker::new(5 * S);
        k.start(t0);
        assert!(k.poll_send(t0 + 5 * S));
        assert!(k.poll_send(t0 + 10 * S));
        assert_eq!(k.missed_echoes(t0 + 10 * S, 2 * S), 1);
        assert_eq!(k.missed_echoes(t0 + 13 * S, 2 * S), 2);
        assert_eq!(
            k.missed_echoes(t0 + 7 * S, 2 * S),
            0,
            "exactly grace is not missed"
        );
        assert_eq!(k.on_echo(t0 + 11 * S), Some(6 * S));
        assert_eq!(k.last_rtt(), Some(6 * S));
        assert_eq!(k.missed_echoes(t0 + 13 * S, 2 * S), 1);
        assert_eq!(
            k.on_echo(t0 + 10 * S + 250 * Duration::from_millis(1)),
            Some(Duration::from_millis(250))
        );
        assert_eq!(k.missed_echoes(t0 + 100 * S, 2 * S), 0);
        assert_eq!(k.on_echo(t0 + 12 * S), None);
        assert_eq!(k.unmatched_echoes(), 1);
        assert_eq!(k.sent(), 2);
        assert_eq!(k.echoed(), 2);
        assert_eq!(k.last_rtt(), Some(Duration::from_millis(250)));
    }

    #[test]
    fn unanswered_keepalives_are_bounded_but_counted() {
        let t0 = Instant::now();
        let mut k = KeepaliveTracker::new(S);
        k.start(t0);
        let n = MAX_OUTSTANDING as u32 + 10;
        for i in 1..=n {
            assert!(k.poll_send(t0 + i * S));
        }
        assert_eq!(k.outstanding.len(), MAX_OUTSTANDING);
        assert_eq!(k.missed_echoes(t0 + (n + 100) * S, S), n);
    }

    #[test]
    fn acks_are_cumulative_and_stop_at_gaps() {
        let mut a = AckTracker::new();
        assert_eq!(a.on_frame_handled(0), None);
        assert_eq!(a.on_frame_handled(1), Some(1));
        assert_eq!(a.on_frame_handled(1), None);
        assert_eq!(a.on_frame_handled(3), None);
        assert_eq!(a.on_frame_handled(4), None);
        assert_eq!(a.waiting_for_gap(), 2);
        assert_eq!(a.handled(), 1);
        assert_eq!(a.on_frame_handled(2), Some(4));
        assert_eq!(a.waiting_for_gap(), 0);
        assert_eq!(a.on_frame_handled(5), Some(5));
        assert_eq!(a.on_frame_handled(3), None);
        assert_eq!(a.acks_sent(), 3);
    }

    #[test]
    fn a_lead_runs_every_ack_ahead_of_the_handled_frames() {
        let mut a = AckTracker::with_lead(8);
        assert_eq!(a.on_frame_handled(2), None, "a gap still holds the acks back");
        assert_eq!(a.on_frame_handled(1), Some(10));
        assert_eq!(a.handled(), 2);
        assert_eq!(a.on_frame_handled(3), Some(11));
        assert_eq!(a.ack_through(5), Some(13));
        assert_eq!(a.on_frame_handled(5), None);
        assert_eq!(a.acks_sent(), 3);
    }

    #[test]
    fn first_frame_missing_blocks_acks() {
        let mut a = AckTracker::new();
        assert_eq!(a.on_frame_handled(2), None);
        assert_eq!(a.on_frame_handled(3), None);
        assert_eq!(a.acks_sent(), 0);
        assert_eq!(a.on_frame_handled(1), Some(3));
    }

    #[test]
    fn ack_through_skips_a_gap() {
        let mut a = AckTracker::new();
        a.on_frame_handled(1);
        a.on_frame_handled(4);
        a.on_frame_handled(6);
        assert_eq!(a.ack_through(2), Some(2));
        assert_eq!(a.on_frame_handled(3), Some(4));
        assert_eq!(a.ack_through(4), None);
        assert_eq!(a.ack_through(5), Some(6));
        assert_eq!(a.waiting_for_gap(), 0);
        assert_eq!(a.acks_sent(), 4);
    }

    #[test]
    fn frames_whose_results_never_come_do_not_hold_the_acks_back() {
        let mut acks = AckTracker::with_lead(2);
        // The server processed frames 1-6 before the channel opened.
        assert_eq!(acks.skip(1, 6), Some(8));
        assert_eq!(acks.on_frame_handled(7), Some(9));
        // A gap later, with frame 9 handled before the gap is known.
        assert_eq!(acks.on_frame_handled(11), None);
        assert_eq!(acks.skip(8, 10), Some(13), "8-10 skipped, 11 handled: contiguous 11");
        assert_eq!(acks.skip(3, 5), None, "behind the ack");
    }

}
