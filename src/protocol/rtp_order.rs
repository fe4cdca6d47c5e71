//! Puts the returned track's RTP packets back in sequence order and waits a
//! bounded time for a lost one, so that a retransmission (the session NACKs
//! a gap 10 ms after it appears) reaches the depayloader in its place instead
//! of after the packets that overtook it, which the depayloader would drop
//! as late. Time and data are passed in; nothing here sleeps or reads a
//! clock.
//!
//! A packet that does not come within [`DEFAULT_LOSS_WAIT`] of the first
//! packet held behind it is given up: the packets after it go on, the
//! depayloader sees the gap and asks for a keyframe (the server's encoder
//! sends one only at the start and when asked).

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

/// How long packets wait behind a missing one. Retransmission takes the
/// NACK delay (10 ms) plus one round trip to the server.
pub const DEFAULT_LOSS_WAIT: Duration = Duration::from_millis(150);

/// Packets held behind a gap at most; past this the gap is given up at once
/// (a burst this long is a keyframe's worth and will not be repaired). A
/// packet further than this from the newest one starts a new sequence (the
/// sender's encoder restarted): nothing is waited for or counted lost.
pub const MAX_HELD: usize = 1024;

#[derive(Debug)]
pub struct RtpOrder<P> {
    wait: Duration,
    /// The extended sequence number expected next (counted from 1 << 16, so
    /// that older packets stay positive).
    next: Option<u64>,
    /// Packets behind a gap, with when they arrived.
    held: BTreeMap<u64, (P, Instant)>,
    ready: VecDeque<P>,
    lost: u64,
    late: u64,
}

impl<P> RtpOrder<P> {
    pub fn new(wait: Duration) -> Self {
        RtpOrder { wait, next: None, held: BTreeMap::new(), ready: VecDeque::new(), lost: 0, late: 0 }
    }

    /// How long packets wait behind a missing one.
    pub fn wait(&self) -> Duration {
        self.wait
    }

    /// Packets given up as lost so far.
    pub fn lost(&self) -> u64 {
        self.lost
    }

    /// Packets that came after their place was given up, or twice: dropped.
    #[cfg(test)]
    pub fn late(&self) -> u64 {
        self.late
    }

    pub fn push(&mut self, sequence: u16, packet: P, now: Instant) {
        let Some(next) = self.next else {
            self.next = Some((1 << 16) + u64::from(sequence) + 1);
            self.ready.push_back(packet);
            return;
        };
        // Relative to the newest packet seen, so that a long gap still
        // extends right.
        let newest = self.held.keys().next_back().copied().unwrap_or(next - 1);
        let delta = i64::from(sequence.wrapping_sub(newest as u16) as i16);
        let Some(extended) = newest.checked_add_signed(delta) else {
            self.late += 1;
            return;
        };
        if extended.abs_diff(newest) > MAX_HELD as u64 {
            // Far from the newest packet, either way: the sender started a
            // new sequence (an encoder restarted), not a loss. What is held
            // goes on and the order starts again here.
            self.restart(extended, packet);
            return;
        }
        if extended < next || self.held.contains_key(&extended) {
            self.late += 1;
            return;
        }
        if extended == next {
            self.ready.push_back(packet);
            self.next = Some(next + 1);
            self.release_in_order();
            return;
        }
        self.held.insert(extended, (packet, now));
        if self.held.len() > MAX_HELD {
            self.give_up_first_gap();
        }
    }

    /// The next packet in order, once any wait for a lost one has run out.
    pub fn poll(&mut self, now: Instant) -> Option<P> {
        if self.ready.is_empty() && self.next_deadline().is_some_and(|deadline| deadline <= now) {
            self.give_up_first_gap();
        }
        self.ready.pop_front()
    }

    /// When the wait for the first missing packet runs out.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.held.values().map(|(_, arrived)| *arrived).min().map(|arrived| arrived + self.wait)
    }

    /// The stream ended: what is held goes on, its gaps given up.
    pub fn finish(&mut self) {
        while !self.held.is_empty() {
            self.give_up_first_gap();
        }
    }

    fn restart(&mut self, extended: u64, packet: P) {
        let held = std::mem::take(&mut self.held);
        self.ready.extend(held.into_values().map(|(packet, _)| packet));
        self.ready.push_back(packet);
        self.next = Some(extended + 1);
    }

    fn give_up_first_gap(&mut self) {
        let (Some(next), Some(&first)) = (self.next, self.held.keys().next()) else {
            return;
        };
        self.lost += first - next;
        self.next = Some(first);
        self.release_in_order();
    }

    fn release_in_order(&mut self) {
        let Some(mut next) = self.next else {
            return;
        };
        while let Some((packet, _)) = self.held.remove(&next) {
            self.ready.push_back(packet);
            next += 1;
        }
        self.next = Some(next);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WAIT: Duration = Duration::from_millis(150);

    fn drain(order: &mut RtpOrder<u16>, now: Instant) -> Vec<u16> {
        std::iter::from_fn(|| order.poll(now)).collect()
    }

    #[test]
    fn in_order_packets_pass_at_once() {
        let start = Instant::now();
        let mut order = RtpOrder::new(WAIT);
        for sequence in (65_533..=65_535).chain(0..3) {
            order.push(sequence, sequence, start);
        }
        assert_eq!(drain(&mut order, start), vec![65_533, 65_534, 65_535, 0, 1, 2]);
        assert_eq!(order.next_deadline(), None);
        assert_eq!((order.lost(), order.late()), (0, 0));
    }

    #[test]
    fn a_retransmission_within_the_wait_takes_its_place() {
        let start = Instant::now();
        let mut order = RtpOrder::new(WAIT);
        order.push(10, 10, start);
        order.push(12, 12, start + Duration::from_millis(1));
        order.push(13, 13, start + Duration::from_millis(2));
        assert_eq!(drain(&mut order, start + Duration::from_millis(2)), vec![10], "12 and 13 wait for 11");
        assert_eq!(order.next_deadline(), Some(start + Duration::from_millis(1) + WAIT));
        order.push(11, 11, start + Duration::from_millis(40));
        assert_eq!(drain(&mut order, start + Duration::from_millis(40)), vec![11, 12, 13]);
        assert_eq!(order.next_deadline(), None);
        assert_eq!((order.lost(), order.late()), (0, 0));
    }

    #[test]
    fn a_packet_that_does_not_come_is_given_up_after_the_wait() {
        let start = Instant::now();
        let mut order = RtpOrder::new(WAIT);
        order.push(65_534, 1, start);
        order.push(1, 4, start + Duration::from_millis(5));
        order.push(2, 5, start + Duration::from_millis(6));
        assert_eq!(drain(&mut order, start + Duration::from_millis(5) + WAIT - Duration::from_millis(1)), vec![1]);
        assert_eq!(drain(&mut order, start + Duration::from_millis(5) + WAIT), vec![4, 5]);
        assert_eq!(order.lost(), 2, "65535 and 0");
        // Coming now, it is too late: dropped, not sent after its successors.
        order.push(0, 3, start + Duration::from_millis(200));
        assert_eq!(drain(&mut order, start + Duration::from_millis(200)), Vec::<u16>::new());
        assert_eq!(order.late(), 1);
    }

    #[test]
    fn gaps_are_given_up_one_at_a_time_from_the_oldest() {
        let start = Instant::now();
        let mut order = RtpOrder::new(WAIT);
        order.push(1, 1, start);
        order.push(3, 3, start);
        order.push(6, 6, start + Duration::from_millis(100));
        assert_eq!(drain(&mut order, start + WAIT), vec![1, 3], "2 given up; 6 still waits for 4 and 5");
        assert_eq!(order.next_deadline(), Some(start + Duration::from_millis(100) + WAIT));
        order.push(4, 4, start + Duration::from_millis(160));
        order.push(5, 5, start + Duration::from_millis(161));
        assert_eq!(drain(&mut order, start + Duration::from_millis(161)), vec![4, 5, 6]);
        assert_eq!((order.lost(), order.late()), (1, 0));
    }

    #[test]
    fn duplicates_are_dropped() {
        let start = Instant::now();
        let mut order = RtpOrder::new(WAIT);
        order.push(1, 1, start);
        order.push(1, 1, start);
        order.push(3, 3, start);
        order.push(3, 3, start);
        order.push(2, 2, start);
        assert_eq!(drain(&mut order, start), vec![1, 2, 3]);
        assert_eq!(order.late(), 2);
    }

    #[test]
    fn a_jump_to_another_sequence_restarts_the_order_instead_of_waiting() {
        let start = Instant::now();
        let mut order = RtpOrder::new(WAIT);
        order.push(100, 100, start);
        order.push(102, 102, start);
        // Backwards, far: a new sequence, not 30 000 late packets.
        order.push(40_000, 40_000, start);
        order.push(40_001, 40_001, start);
        // Forwards, far.
        order.push(60_000, 60_000, start);
        order.push(60_001, 60_001, start);
        assert_eq!(drain(&mut order, start), vec![100, 102, 40_000, 40_001, 60_000, 60_001]);
        assert_eq!((order.lost(), order.late()), (0, 0));
        assert_eq!(order.next_deadline(), None);
    }

    #[test]
    fn a_long_burst_gives_up_the_gap_without_waiting() {
        let start = Instant::now();
        let mut order = RtpOrder::new(WAIT);
        order.push(0, 0, start);
        for sequence in 2..(MAX_HELD as u16 + 3) {
            order.push(sequence, sequence, start);
        }
        let out = drain(&mut order, start);
        assert_eq!(out.len(), MAX_HELD + 2, "everything but the lost packet, in order");
        assert!(out.windows(2).all(|pair| pair[0] < pair[1]));
        assert_eq!(order.lost(), 1);
    }

    #[test]
    fn finish_releases_what_is_held() {
        let start = Instant::now();
        let mut order = RtpOrder::new(WAIT);
        order.push(1, 1, start);
        order.push(4, 4, start);
        order.push(3, 3, start);
        order.finish();
        assert_eq!(drain(&mut order, start), vec![1, 3, 4]);
        assert_eq!(order.lost(), 1);
    }
}
