//! Pairs the frames of the returned video track with their results
//! (PROTOCOL.md sections 6 and 10). Time and data are passed in; nothing
//! here sleeps, reads a clock or knows GStreamer.
//!
//! The server stamps each frame's RTP packets with `origin + pts` in clock
//! ticks (90 kHz), where `origin` is random and unknown to the client, and
//! sends a frame's JSON (which carries `pts`) just before the frame goes to
//! its encoder. [`TrackPairing`] estimates the origin, maps each RTP frame
//! to the pts of its JSON, and holds a frame whose JSON has not arrived yet
//! (the two travel apart) for a bounded time, so that whoever pushes the
//! packets never waits for a result downstream.
//!
//! Estimating the origin. With evenly spaced pts, an origin off by a whole
//! frame still "matches" a JSON on every frame, so matching alone cannot
//! tell; arrival order can, in the majority. Each RTP frame votes for the
//! origin that pairs it with the newest JSON received before it (its own,
//! since the server sends a frame's JSON first): the offset `extended RTP
//! ts - pts x clock rate`, constant for the true origin give or take VP8's
//! one tick. A frame's RTP may overtake its JSON, or lag behind the next
//! frame's JSON (the client's first packet does, while it sets up the
//! track), so single votes are noisy; they are independent of each other
//! and of the estimate, so one odd arrival costs one vote.
//!
//! - The first frame: when its newest JSON is also the first JSON, both
//!   readings agree and the origin is set. Otherwise (several JSONs came
//!   first: the first RTP frame was lost, or it lags) the first frames are
//!   held until [`STARTUP_VOTES`] votes agree, or the hold runs out.
//! - Later: when [`REANCHOR_VOTES`] of the last [`REANCHOR_WINDOW`] votes
//!   agree on another origin, the estimate moves there (a wrong first guess:
//!   the first frame lost and the next one overtaking its JSON).
//! - No origin may put the first RTP frame before the first JSON: nothing
//!   is encoded before the first processed frame. This keeps a stream whose
//!   every RTP frame overtakes its JSON on the true origin.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

/// The clock rate of video RTP (RFC 3551) and of the server's track.
pub const VIDEO_CLOCK_RATE: u32 = 90_000;

/// How long a frame's packets wait for its JSON before they go out
/// without one. The JSON normally arrives first or within milliseconds;
/// holding costs latency only when a JSON is really missing.
pub const DEFAULT_HOLD: Duration = Duration::from_millis(250);

/// How far, in clock ticks, an RTP timestamp may sit from `origin + pts`
/// and still be that frame: the server's rounding of pts to 90 kHz and
/// VP8's one-tick shift.
pub const ORIGIN_TOLERANCE_TICKS: i64 = 3;

/// The recent votes weighed, and how many of them must agree on another
/// origin before the estimate moves. Measured against the test worker with
/// no encoder latency, about one frame in ten arrives out of order; five
/// of six such frames in a row do not happen in practice.
pub const REANCHOR_WINDOW: usize = 6;
pub const REANCHOR_VOTES: usize = 5;

/// Agreeing votes that settle the origin at the start when the first RTP
/// frame's newest JSON is not the first JSON.
pub const STARTUP_VOTES: usize = 3;

/// RTP frames remembered from the start, to find the first result's when
/// frames were missed before it.
const MAX_EARLY_FRAMES: usize = 256;

/// Results older than the newest by more than this are forgotten: their
/// frames were dropped by the server's codec and will never pair.
const RESULT_HORIZON: Duration = Duration::from_secs(2);

/// Extends 32-bit RTP timestamps to 64 bits across wraps. A timestamp
/// that moves back (a reordered packet) extends backwards.
#[derive(Debug, Default, Clone)]
pub struct RtpUnwrapper {
    last: Option<u32>,
    extended: i64,
}

impl RtpUnwrapper {
    pub fn extend(&mut self, timestamp: u32) -> i64 {
        self.extended = match self.last {
            None => i64::from(timestamp),
            Some(last) => self.extended + i64::from(timestamp.wrapping_sub(last) as i32),
        };
        self.last = Some(timestamp);
        self.extended
    }
}

/// A packet ready to push.
#[derive(Debug, Clone, PartialEq)]
pub struct Released<P> {
    pub packet: P,
    /// The frame's pts in ns on the source timeline: exactly its JSON's pts
    /// when paired. None for a frame that maps before the origin (drop it).
    pub pts_ns: Option<u64>,
    /// The frame's JSON had arrived when its first packet was released.
    pub paired: bool,
    /// The first packet released of its frame.
    pub first_of_frame: bool,
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Decision {
    pts_ns: Option<u64>,
    paired: bool,
}

#[derive(Debug)]
struct Frame<P> {
    extended: i64,
    arrived: Instant,
    packets: VecDeque<P>,
    /// pts of the newest JSON when the frame arrived.
    newest_at_arrival: Option<u64>,
    decision: Option<Decision>,
    released_any: bool,
}

/// Counts for statistics and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PairingStats {
    pub frames_paired: u64,
    pub frames_unpaired: u64,
    pub reanchors: u64,
}

/// Maps the returned track's RTP frames onto the pts of their results and
/// holds a frame's packets until its result arrives or the hold passes.
/// Feed it with [`on_result`](Self::on_result) and
/// [`on_packet`](Self::on_packet) in the order they were read, take packets
/// with [`poll_packet`](Self::poll_packet), and wake at
/// [`next_deadline`](Self::next_deadline).
#[derive(Debug)]
pub struct TrackPairing<P> {
    clock_rate: u32,
    hold: Duration,
    unwrapper: RtpUnwrapper,
    /// Extended RTP ticks at source pts 0.
    origin: Option<i64>,
    /// Results not paired yet, by pts in ns.
    results: BTreeMap<u64, ()>,
    /// pts of the newest result.
    newest: Option<u64>,
    /// pts of the first result, and extended ts of the first RTP frame.
    first_result: Option<u64>,
    first_frame: Option<i64>,
    /// Recent origins implied by arrival order, newest last.
    votes: VecDeque<i64>,
    frames: VecDeque<Frame<P>>,
    stragglers: VecDeque<Released<P>>,
    finishing: bool,
    /// Frames processed, and their video sent, before the first result's
    /// frame, whose results never come (a camera's frames before the
    /// results channel opened): the first result is that many RTP frames in.
    missed_at_start: usize,
    /// Extended timestamps of the first RTP frames, in arrival order.
    early_frames: Vec<i64>,
    stats: PairingStats,
}

impl<P> TrackPairing<P> {
    pub fn new(clock_rate: u32, hold: Duration) -> Self {
        TrackPairing {
            clock_rate: clock_rate.max(1),
            hold,
            unwrapper: RtpUnwrapper::default(),
            origin: None,
            results: BTreeMap::new(),
            newest: None,
            first_result: None,
            first_frame: None,
            votes: VecDeque::new(),
            frames: VecDeque::new(),
            stragglers: VecDeque::new(),
            finishing: false,
            missed_at_start: 0,
            early_frames: Vec::new(),
            stats: PairingStats::default(),
        }
    }

    /// The negotiated clock rate, known once the track's codec is.
    pub fn set_clock_rate(&mut self, clock_rate: u32) {
        self.clock_rate = clock_rate.max(1);
    }

    #[cfg(test)]
    pub fn stats(&self) -> PairingStats {
        self.stats
    }

    /// Extended RTP ticks at source pts 0, once estimated.
    #[cfg(test)]
    pub fn origin(&self) -> Option<i64> {
        self.origin
    }

    fn ticks(&self, pts_ns: u64) -> i64 {
        let ticks = (i128::from(pts_ns) * i128::from(self.clock_rate) + 500_000_000) / 1_000_000_000;
        ticks as i64
    }

    fn nanoseconds(&self, ticks: i64) -> Option<u64> {
        (ticks >= 0).then(|| (i128::from(ticks) * 1_000_000_000 / i128::from(self.clock_rate)) as u64)
    }

    /// The JSON of the frame at `pts_ns`, the server's `frame_id`-th
    /// processed frame, arrived. A first JSON whose frame_id is above 1
    /// comes after frames whose video was sent but whose results never come
    /// (a camera's frames processed before the results channel opened): it
    /// then belongs to RTP frame `frame_id`, not to the first.
    pub fn on_result(&mut self, pts_ns: u64, frame_id: u64) {
        if self.first_result.is_none() {
            self.missed_at_start = usize::try_from(frame_id.saturating_sub(1)).unwrap_or(usize::MAX);
        }
        self.results.insert(pts_ns, ());
        self.newest = Some(pts_ns);
        self.first_result.get_or_insert(pts_ns);
        let horizon = pts_ns.saturating_sub(RESULT_HORIZON.as_nanos() as u64);
        self.results = self.results.split_off(&horizon);
    }

    /// An RTP packet with `timestamp` arrived.
    pub fn on_packet(&mut self, timestamp: u32, packet: P, now: Instant) {
        let extended = self.unwrapper.extend(timestamp);
        if let Some(frame) = self.frames.iter_mut().rev().find(|frame| frame.extended == extended) {
            frame.packets.push_back(packet);
            return;
        }
        if self.frames.back().is_some_and(|newest| newest.extended > extended) {
            // A reordered packet of a frame already gone: it follows at once
            // with that frame's pts; it is not a frame of its own.
            let pts_ns = self.origin.and_then(|origin| self.nanoseconds(extended - origin));
            self.stragglers.push_back(Released { packet, pts_ns, paired: false, first_of_frame: false });
            return;
        }
        self.first_frame.get_or_insert(extended);
        if self.early_frames.len() < MAX_EARLY_FRAMES {
            self.early_frames.push(extended);
        }
        self.frames.push_back(Frame {
            extended,
            arrived: now,
            packets: VecDeque::from([packet]),
            newest_at_arrival: self.newest,
            decision: None,
            released_any: false,
        });
        if let Some(newest) = self.newest {
            self.vote(extended - self.ticks(newest));
        }
    }

    fn vote(&mut self, offset: i64) {
        self.votes.push_back(offset);
        if self.votes.len() > REANCHOR_WINDOW {
            self.votes.pop_front();
        }
        let Some(origin) = self.origin else {
            return;
        };
        let agreeing = self.votes.iter().filter(|vote| (*vote - offset).abs() <= ORIGIN_TOLERANCE_TICKS).count();
        if agreeing >= REANCHOR_VOTES && (offset - origin).abs() > ORIGIN_TOLERANCE_TICKS && self.plausible(offset) {
            self.origin = Some(offset);
            self.stats.reanchors += 1;
            self.votes.clear();
        }
    }

    /// Whether `origin` keeps the first RTP frame at or after the first JSON.
    fn plausible(&self, origin: i64) -> bool {
        match (self.anchor_frame(), self.first_result) {
            (Some(frame), Some(pts_ns)) => frame - origin >= self.ticks(pts_ns) - ORIGIN_TOLERANCE_TICKS,
            _ => true,
        }
    }

    /// The plausible origin most recent votes agree on, and how many.
    fn best_vote(&self) -> Option<(i64, usize)> {
        self.votes
            .iter()
            .filter(|vote| self.plausible(**vote))
            .map(|vote| (*vote, self.votes.iter().filter(|other| (*other - vote).abs() <= ORIGIN_TOLERANCE_TICKS).count()))
            .max_by_key(|(_, count)| *count)
    }

    /// The RTP frame of the first result: the first, unless frames were
    /// missed at the start (None until it has arrived, or if it is beyond
    /// the frames remembered).
    fn anchor_frame(&self) -> Option<i64> {
        if self.missed_at_start == 0 {
            return self.first_frame;
        }
        self.early_frames.get(self.missed_at_start).copied()
    }

    /// The origin at the start, or None while the first frame should wait.
    fn first_origin(&self, expired: bool) -> Option<i64> {
        let extended = self.first_frame?;
        let first_json = self.first_result.map(|pts_ns| extended - self.ticks(pts_ns));
        if self.missed_at_start > 0 {
            // The first result's RTP frame is known by its rank.
            if let (Some(anchor), Some(pts_ns)) = (self.anchor_frame(), self.first_result) {
                return Some(anchor - self.ticks(pts_ns));
            }
            if !expired {
                return None;
            }
        }
        let newest = self.frames.front().and_then(|frame| frame.newest_at_arrival).or(self.newest);
        if newest.is_some() && newest == self.first_result {
            return first_json;
        }
        match self.best_vote() {
            Some((origin, count)) if count >= STARTUP_VOTES => Some(origin),
            best if expired => Some(best.map(|(origin, _)| origin).or(first_json).unwrap_or(extended)),
            _ => None,
        }
    }

    /// No more input: what is held goes out without waiting.
    pub fn finish(&mut self) {
        self.finishing = true;
    }

    /// True while packets wait in the pairing.
    #[cfg(test)]
    pub fn is_holding(&self) -> bool {
        !self.stragglers.is_empty() || self.frames.iter().any(|frame| !frame.packets.is_empty())
    }

    /// When a held frame stops waiting for its JSON.
    pub fn next_deadline(&self) -> Option<Instant> {
        let frame = self.frames.iter().find(|frame| !frame.packets.is_empty())?;
        frame.decision.is_none().then_some(frame.arrived + self.hold)
    }

    /// The next packet to push, in arrival order, or None while the oldest
    /// held frame still waits for its JSON.
    pub fn poll_packet(&mut self, now: Instant) -> Option<Released<P>> {
        if let Some(straggler) = self.stragglers.pop_front() {
            return Some(straggler);
        }
        loop {
            let index = self.frames.iter().position(|frame| !frame.packets.is_empty())?;
            // Frames before it are fully released; keep only the newest
            // (more of its packets may come).
            self.frames.drain(..index);
            if self.frames[0].decision.is_none() {
                let decision = self.decide(now)?;
                self.frames[0].decision = Some(decision);
                if decision.paired {
                    self.stats.frames_paired += 1;
                } else {
                    self.stats.frames_unpaired += 1;
                }
            }
            let frame = &mut self.frames[0];
            let Some(packet) = frame.packets.pop_front() else {
                continue;
            };
            let decision = frame.decision.expect("decided above");
            let first_of_frame = !frame.released_any;
            frame.released_any = true;
            return Some(Released {
                packet,
                pts_ns: decision.pts_ns,
                paired: decision.paired,
                first_of_frame,
            });
        }
    }

    /// Pairs the oldest held frame, or None while it should wait.
    fn decide(&mut self, now: Instant) -> Option<Decision> {
        let frame = &self.frames[0];
        let extended = frame.extended;
        let expired = self.finishing || now >= frame.arrived + self.hold;
        let origin = match self.origin {
            Some(origin) => origin,
            None => {
                let origin = self.first_origin(expired)?;
                self.origin = Some(origin);
                origin
            }
        };
        let mapped = extended - origin;
        let low = self.nanoseconds(mapped - ORIGIN_TOLERANCE_TICKS).unwrap_or(0);
        let high = self.nanoseconds(mapped + ORIGIN_TOLERANCE_TICKS);
        let matched = high.and_then(|high| {
            self.results
                .range(low..=high)
                .min_by_key(|(pts_ns, _)| self.ticks(**pts_ns).abs_diff(mapped))
                .map(|(pts_ns, _)| *pts_ns)
        });
        if let Some(pts_ns) = matched {
            self.results.remove(&pts_ns);
            return Some(Decision { pts_ns: Some(pts_ns), paired: true });
        }
        // Results arrive in pts order: once a later one is here, this
        // frame's will not come.
        let overtaken = self.newest.is_some_and(|newest| self.ticks(newest) > mapped + ORIGIN_TOLERANCE_TICKS);
        (expired || overtaken).then(|| Decision { pts_ns: self.nanoseconds(mapped), paired: false })
    }
}

/// The results of frames whose video has not left the element yet, by pts:
/// where the video carries its result's exact pts, a map look-up pairs them.
#[derive(Debug)]
pub struct ResultsByPts<T> {
    pending: BTreeMap<u64, T>,
    /// Largest distance in ns at which a frame still takes a result when no
    /// pts matches exactly (a decoder that rounds pts).
    pub tolerance_ns: u64,
}

impl<T> Default for ResultsByPts<T> {
    fn default() -> Self {
        ResultsByPts { pending: BTreeMap::new(), tolerance_ns: 0 }
    }
}

/// Results waiting for their decoded frame, at most: far more than a
/// stalled decoder or a syncing sink holds back, yet bounded if the video
/// stops while results go on.
const MAX_PENDING_RESULTS: usize = 1024;

impl<T> ResultsByPts<T> {
    pub fn insert(&mut self, pts_ns: u64, result: T) {
        self.pending.insert(pts_ns, result);
        if self.pending.len() > MAX_PENDING_RESULTS {
            self.pending.pop_first();
        }
    }

    /// The result for video at `pts_ns`: exact, else nearest within
    /// tolerance. Frames come in pts order, so results left behind belong to
    /// frames the codec dropped: they never pair and are forgotten. (Not by
    /// a distance to the newest result: a decoder or a syncing sink may lag
    /// the results by seconds under load.)
    pub fn take(&mut self, pts_ns: u64) -> Option<T> {
        let low = pts_ns.saturating_sub(self.tolerance_ns);
        let high = pts_ns.saturating_add(self.tolerance_ns);
        let found = match self.pending.remove(&pts_ns) {
            Some(result) => Some(result),
            None => self
                .pending
                .range(low..=high)
                .min_by_key(|(key, _)| key.abs_diff(pts_ns))
                .map(|(key, _)| *key)
                .and_then(|nearest| self.pending.remove(&nearest)),
        };
        self.pending = self.pending.split_off(&low);
        found
    }

    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 30 fps at 90 kHz.
    const STEP_TICKS: u32 = 3000;

    /// Frame 1 at pts 0, as the server reports a file's first frame.
    fn pts(frame: u64) -> u64 {
        (frame - 1) * 100_000_000 / 3
    }

    /// A scripted session against a server whose RTP origin is `origin`.
    struct Script {
        pairing: TrackPairing<(u64, u32)>,
        origin: u32,
        now: Instant,
        released: Vec<Released<(u64, u32)>>,
    }

    impl Script {
        fn new(origin: u32) -> Self {
            Script { pairing: TrackPairing::new(VIDEO_CLOCK_RATE, DEFAULT_HOLD), origin, now: Instant::now(), released: Vec::new() }
        }

        fn json(&mut self, frame: u64) {
            // The server counts its processed frames: frame N's is N.
            self.pairing.on_result(pts(frame), frame);
            self.drain();
        }

        /// The `packets` RTP packets of `frame`, as the server stamps them.
        fn rtp(&mut self, frame: u64, packets: u32) {
            let timestamp = self.origin.wrapping_add(((frame - 1) as u32) * STEP_TICKS);
            for index in 0..packets {
                self.pairing.on_packet(timestamp, (frame, index), self.now);
                self.drain();
            }
        }

        fn advance(&mut self, by: Duration) {
            self.now += by;
            self.drain();
        }

        fn drain(&mut self) {
            while let Some(released) = self.pairing.poll_packet(self.now) {
                self.released.push(released);
            }
        }

        /// (frame whose packets these are, frame whose JSON they paired with) per frame.
        fn pairs(&self) -> Vec<(u64, Option<u64>)> {
            self.released
                .iter()
                .filter(|released| released.first_of_frame)
                .map(|released| {
                    let json = released.paired.then(|| (1..1000).find(|&f| Some(pts(f)) == released.pts_ns).unwrap());
                    (released.packet.0, json)
                })
                .collect()
        }
    }

    fn own_pairs(frames: impl IntoIterator<Item = u64>) -> Vec<(u64, Option<u64>)> {
        frames.into_iter().map(|frame| (frame, Some(frame))).collect()
    }

    #[test]
    fn unwraps_across_the_32_bit_wrap_and_back() {
        let mut unwrapper = RtpUnwrapper::default();
        let start = u32::MAX - 1000;
        assert_eq!(unwrapper.extend(start), i64::from(start));
        assert_eq!(unwrapper.extend(start.wrapping_add(3000)), i64::from(start) + 3000);
        assert_eq!(unwrapper.extend(start.wrapping_add(2000)), i64::from(start) + 2000, "a reordered packet");
        assert_eq!(unwrapper.extend(start.wrapping_add(6000)), i64::from(start) + 6000);
    }

    #[test]
    fn json_first_pairs_every_frame_at_once() {
        let mut script = Script::new(123_456);
        for frame in 1..=10 {
            script.json(frame);
            script.rtp(frame, 3);
        }
        assert_eq!(script.pairs(), own_pairs(1..=10));
        assert_eq!(script.released.len(), 30, "every packet released without waiting");
        assert!(script.released.iter().all(|r| r.paired));
        assert_eq!(script.pairing.stats(), PairingStats { frames_paired: 10, frames_unpaired: 0, reanchors: 0 });
    }

    #[test]
    fn rtp_before_its_json_is_held_until_the_json_arrives() {
        let mut script = Script::new(7);
        for frame in 1..=8 {
            // Frames 1, 3 and 4 overtake their JSON.
            let overtakes = [1, 3, 4].contains(&frame);
            if !overtakes {
                script.json(frame);
            }
            script.rtp(frame, 2);
            if overtakes {
                assert!(script.released.iter().all(|r| r.packet.0 < frame), "frame {frame} waits for its JSON");
                script.advance(Duration::from_millis(3));
                script.json(frame);
            }
        }
        assert_eq!(script.pairs(), own_pairs(1..=8));
        assert_eq!(script.pairing.stats().frames_unpaired, 0);
        assert_eq!(script.pairing.next_deadline(), None, "nothing waits");
    }

    #[test]
    fn held_packets_keep_their_order_behind_a_waiting_frame() {
        let mut script = Script::new(99);
        script.json(1);
        script.rtp(1, 1);
        // Frame 2's RTP overtakes its JSON, frame 3's follows right away.
        script.rtp(2, 2);
        script.json(2);
        script.json(3);
        script.rtp(3, 2);
        let order: Vec<_> = script.released.iter().map(|r| r.packet).collect();
        assert_eq!(order, vec![(1, 0), (2, 0), (2, 1), (3, 0), (3, 1)]);
        assert_eq!(script.pairs(), own_pairs(1..=3));
    }

    #[test]
    fn a_frame_whose_json_never_comes_goes_out_unpaired_after_the_hold() {
        let mut script = Script::new(5_000);
        script.json(1);
        script.rtp(1, 1);
        script.rtp(2, 2);
        assert_eq!(script.released.len(), 1);
        let deadline = script.pairing.next_deadline().expect("frame 2 waits");
        script.advance(deadline - script.now - Duration::from_millis(1));
        assert_eq!(script.released.len(), 1, "still within the hold");
        script.advance(Duration::from_millis(1));
        assert_eq!(script.released.len(), 3);
        let frame2 = &script.released[1];
        assert!(!frame2.paired);
        assert_eq!(frame2.pts_ns, Some(33_333_333), "mapped from the origin");
        assert_eq!(script.pairing.stats().frames_unpaired, 1);
    }

    #[test]
    fn a_later_json_ends_the_wait_for_one_that_will_not_come() {
        let mut script = Script::new(5_000);
        script.json(1);
        script.rtp(1, 1);
        script.rtp(2, 1);
        // The server never sent frame 2's JSON; frame 3's shows it will not come.
        script.json(3);
        assert_eq!(script.released.len(), 2, "no need to wait out the hold");
        assert!(!script.released[1].paired);
    }

    #[test]
    fn first_frame_lost_pairs_from_the_start() {
        // The server's encoder dropped frame 1: its JSON came, its RTP never.
        let mut script = Script::new(1_000_000);
        script.json(1);
        for frame in 2..=10 {
            script.json(frame);
            script.rtp(frame, 2);
        }
        assert_eq!(script.pairs(), own_pairs(2..=10));
        assert_eq!(script.pairing.stats().reanchors, 0);
    }

    #[test]
    fn first_two_frames_lost_pair_from_the_start() {
        let mut script = Script::new(42);
        script.json(1);
        script.json(2);
        for frame in 3..=10 {
            script.json(frame);
            script.rtp(frame, 2);
        }
        assert_eq!(script.pairs(), own_pairs(3..=10));
    }

    #[test]
    fn first_frame_lost_and_the_next_overtaking_its_json_is_re_anchored() {
        // Frame 2's RTP arrives before its JSON: the newest JSON is then
        // frame 1's, and frame 2 is first taken for frame 1 (a shift by one
        // frame that every later frame would still "match").
        let mut script = Script::new(777);
        script.json(1);
        script.rtp(2, 1);
        script.json(2);
        for frame in 3..=12 {
            script.json(frame);
            script.rtp(frame, 1);
        }
        let pairs = script.pairs();
        let shifted: Vec<_> = (2..2 + REANCHOR_VOTES as u64).map(|frame| (frame, Some(frame - 1))).collect();
        assert_eq!(pairs[..REANCHOR_VOTES], shifted[..], "frames before the votes agree: {pairs:?}");
        assert_eq!(pairs[REANCHOR_VOTES..], own_pairs(2 + REANCHOR_VOTES as u64..=12)[..], "{pairs:?}");
        assert_eq!(script.pairing.origin(), Some(777));
        assert_eq!(script.pairing.stats().reanchors, 1);
    }

    #[test]
    fn first_two_frames_lost_with_a_race_settles_by_votes_across_the_wrap() {
        // Two JSONs came before the first RTP frame, which overtook its own:
        // the first frames wait until their votes agree.
        let mut script = Script::new(u32::MAX - 4000);
        script.json(1);
        script.json(2);
        script.rtp(3, 1);
        assert!(script.released.is_empty(), "the first frame waits for votes");
        script.json(3);
        for frame in 4..=14 {
            script.json(frame);
            script.rtp(frame, 1);
        }
        assert_eq!(script.pairs(), own_pairs(3..=14));
        assert_eq!(script.pairing.stats().reanchors, 0);
    }

    #[test]
    fn video_of_frames_whose_results_never_come_does_not_shift_the_pairing() {
        // A camera: the server processed frames 1-3 before the results
        // channel opened; their video came, their JSON never will.
        for order in ["json-first", "rtp-first"] {
            let mut script = Script::new(9_000);
            script.rtp(1, 2);
            script.rtp(2, 1);
            script.rtp(3, 1);
            for frame in 4..=14 {
                if order == "json-first" {
                    script.json(frame);
                    script.rtp(frame, 2);
                } else {
                    script.rtp(frame, 2);
                    script.json(frame);
                }
            }
            script.advance(DEFAULT_HOLD * 2);
            let pairs = script.pairs();
            assert_eq!(pairs[..3], [(1, None), (2, None), (3, None)], "{order}: {pairs:?}");
            assert_eq!(pairs[3..], own_pairs(4..=14)[..], "{order}: {pairs:?}");
        }
    }

    #[test]
    fn timestamps_wrapping_past_32_bits_still_pair() {
        // Frame 4 onwards wrap around 2^32.
        let mut script = Script::new(u32::MAX - 2 * STEP_TICKS - 10);
        for frame in 1..=8 {
            script.json(frame);
            script.rtp(frame, 2);
        }
        assert_eq!(script.pairs(), own_pairs(1..=8));
    }

    #[test]
    fn a_frame_the_codec_dropped_costs_only_that_frame() {
        let mut script = Script::new(31_337);
        for frame in 1..=12 {
            script.json(frame);
            if frame != 5 {
                script.rtp(frame, 2);
            }
        }
        let expected: Vec<_> = own_pairs((1..=12).filter(|&f| f != 5));
        assert_eq!(script.pairs(), expected);
        assert_eq!(script.pairing.stats().reanchors, 0);
    }

    #[test]
    fn an_isolated_wrong_vote_does_not_move_the_origin() {
        // Frame 6 is dropped by the codec and frame 7's RTP overtakes its
        // JSON: by arrival order frame 7 points at frame 6's JSON, once.
        let mut script = Script::new(2_024);
        for frame in 1..=5 {
            script.json(frame);
            script.rtp(frame, 1);
        }
        script.json(6);
        script.rtp(7, 1);
        script.json(7);
        for frame in 8..=12 {
            script.json(frame);
            script.rtp(frame, 1);
        }
        let expected: Vec<_> = own_pairs((1..=12).filter(|&f| f != 6));
        assert_eq!(script.pairs(), expected);
        assert_eq!(script.pairing.stats().reanchors, 0);
    }

    /// Plays an arrival order written as "J1 R1 R2 J2 ..." (JSON or RTP of
    /// a frame, one packet each).
    fn play(script: &mut Script, order: &str) {
        for token in order.split_whitespace() {
            let frame = token[1..].parse().unwrap();
            match &token[..1] {
                "J" => script.json(frame),
                _ => script.rtp(frame, 1),
            }
        }
    }

    #[test]
    fn arrival_orders_seen_against_the_test_worker_pair_every_frame() {
        // Read by the result source with no encoder latency in the worker:
        // RTP piled up behind the caps at the start, some frames' RTP
        // overtaking their JSON, some lagging behind the next JSON.
        let orders = [
            "J1 R1 R2 R3 R4 J2 J3 J4 J5 R5 J6 R6 J7 R7 J8 J9 R8 R9 J10 R10 J11 R11 J12 R12 J13 R13 R14 J14 J15 R15",
            "J1 R1 R2 R3 R4 R5 J2 J3 J4 J5 J6 R6 J7 R7 J8 R8 R9 J9 J10 R10 J11 R11 J12 R12 R13 J13 J14 R14 J15 R15",
            "J1 R1 J2 J3 R2 R3 J4 R4 J5 J6 R5 R6 J7 R7 J8 J9 R8 R9 J10 R10 J11 R11 J12 R12 J13 R13 J14 R14 J15 R15",
        ];
        for order in orders {
            let mut script = Script::new(3_141_592);
            play(&mut script, order);
            assert_eq!(script.pairs(), own_pairs(1..=15), "{order}");
            assert_eq!(script.pairing.stats().reanchors, 0, "{order}");
        }
    }

    #[test]
    fn a_first_frame_lagging_behind_the_next_json_still_pairs() {
        // Frame 1's RTP arrives after frame 2's JSON (the client was still
        // setting up the track): by arrival alone it would be frame 2's.
        let mut script = Script::new(65_000);
        play(&mut script, "J1 J2 R1 R2 J3 R3 J4 R4 J5 R5 J6 R6");
        assert_eq!(script.pairs(), own_pairs(1..=6));
        assert_eq!(script.pairing.origin(), Some(65_000));
    }

    #[test]
    fn a_stream_whose_every_frame_overtakes_its_json_keeps_the_true_origin() {
        let mut script = Script::new(8_888);
        play(&mut script, "R1 J1 R2 J2 R3 J3 R4 J4 R5 J5 R6 J6 R7 J7 R8 J8 R9 J9");
        assert_eq!(script.pairs(), own_pairs(1..=9));
        assert_eq!(script.pairing.stats().reanchors, 0);
    }

    #[test]
    fn the_first_frames_wait_at_most_the_hold_for_votes() {
        let mut script = Script::new(400);
        play(&mut script, "J1 J2 R2");
        assert!(script.released.is_empty());
        script.advance(DEFAULT_HOLD);
        assert_eq!(script.pairs(), own_pairs(2..=2), "the newest JSON is the best guess");
    }

    #[test]
    fn the_first_frame_before_any_json_waits_for_it() {
        let mut script = Script::new(10);
        script.rtp(1, 2);
        assert!(script.released.is_empty());
        assert!(script.pairing.next_deadline().is_some());
        script.advance(Duration::from_millis(5));
        script.json(1);
        script.json(2);
        script.rtp(2, 2);
        assert_eq!(script.pairs(), own_pairs(1..=2));
    }

    #[test]
    fn vp8_one_tick_shift_still_pairs() {
        let mut script = Script::new(500);
        script.json(1);
        script.pairing.on_packet(500, (1, 0), script.now);
        script.json(2);
        script.pairing.on_packet(500 + STEP_TICKS + 1, (2, 0), script.now);
        script.json(3);
        script.pairing.on_packet(500 + 2 * STEP_TICKS - 1, (3, 0), script.now);
        script.drain();
        assert_eq!(script.pairs(), own_pairs(1..=3));
    }

    #[test]
    fn a_reordered_packet_of_a_released_frame_follows_with_its_pts() {
        let mut script = Script::new(1_000);
        script.json(1);
        script.rtp(1, 1);
        script.json(2);
        script.rtp(2, 1);
        script.pairing.on_packet(1_000, (1, 1), script.now);
        script.drain();
        let late = script.released.last().unwrap();
        assert_eq!((late.packet, late.pts_ns, late.first_of_frame), ((1, 1), Some(0), false));
        assert_eq!(script.pairing.stats().frames_paired, 2, "not counted as a frame");
    }

    #[test]
    fn finish_releases_what_is_held() {
        let mut script = Script::new(0);
        script.json(1);
        script.rtp(1, 1);
        script.rtp(2, 3);
        assert_eq!(script.released.len(), 1);
        script.pairing.finish();
        script.drain();
        assert_eq!(script.released.len(), 4);
        assert!(!script.pairing.is_holding());
    }

    #[test]
    fn results_by_pts_take_exact_then_nearest_within_tolerance() {
        let mut results = ResultsByPts { tolerance_ns: 16_000_000, ..Default::default() };
        results.insert(0, 1);
        results.insert(33_333_333, 2);
        results.insert(66_666_667, 3);
        assert_eq!(results.take(0), Some(1));
        assert_eq!(results.take(33_300_000), Some(2));
        assert_eq!(results.take(50_000_000), None, "more than the tolerance away");
        assert_eq!(results.take(66_666_667), Some(3));
        assert!(results.is_empty());
    }

    #[test]
    fn results_by_pts_wait_for_a_lagging_frame_and_forget_those_left_behind() {
        let mut results = ResultsByPts::default();
        results.insert(0, "dropped by the codec");
        results.insert(1_000_000_000, "lagging");
        results.insert(9_000_000_000, "newest");
        assert_eq!(results.len(), 3, "a frame 9 s behind the newest result still finds its own");
        assert_eq!(results.take(1_000_000_000), Some("lagging"));
        assert_eq!(results.len(), 1, "the result of the frame the codec dropped is forgotten");
        for pts in 0..(MAX_PENDING_RESULTS as u64 + 10) {
            results.insert(10_000_000_000 + pts, "more");
        }
        assert_eq!(results.len(), MAX_PENDING_RESULTS, "bounded when no video comes");
    }
}
