//! Live video in (PROTOCOL.md §10): the client's side of the video track it
//! sends, without I/O. Callers pass packets, results and instants in.
//!
//! Two things make a live session exact where the reference client is not.
//!
//! **Every frame is processed at once.** The server's RTP receiver (aiortc)
//! knows a frame is complete only when a packet with another timestamp
//! arrives, so the newest frame sent waits for the next one: a frame
//! interval of latency, and at the end of the stream the last frame is never
//! processed at all. After each frame the client therefore sends a
//! *boundary packet*: an RTP packet stamped with the next frame's timestamp
//! whose payload depayloads to no bytes (a VP8 descriptor alone, or an H.264
//! FU-A fragment with neither start nor end bit). It completes the frame
//! before it and becomes the empty head of the next frame. So the next
//! frame's timestamp is fixed when a frame is sent ([`RtpPlan`]).
//!
//! **Results pair with their frames, exactly.** The server reports `pts` =
//! the frame's RTP timestamp minus that of the first frame it assembled (its
//! *anchor*), which is the client's first frame unless that one was lost.
//! With evenly spaced timestamps a wrong anchor shifts every result by whole
//! frames and still matches, so the gaps after the first [`ANCHOR_FRAMES`]
//! frames carry a code: the gap after frame `m` is longer by `2^m` ticks
//! (1.4 ms at most after frame 7, far below anything a player notices). The
//! gaps are otherwise all the same (the caps' frame rate, not each buffer's
//! duration: a duration 16 ticks short next to a code of 16 would undo it,
//! as a property test found). Then a result with a pts other than 0 matches
//! exactly one anchor among those frames ([`LivePairing`]); a pts of 0,
//! which names the anchor itself, matches them all, and is held until a
//! later result tells them apart. The RTP clock thus does not follow the
//! buffers' timing; nothing needs it to: results carry the buffers' PTS.

use std::collections::VecDeque;
use std::time::Instant;

/// Frames whose following gaps carry the anchor code; the anchor is found
/// among them.
pub const ANCHOR_FRAMES: usize = 8;
/// The gap between frames when the caps give no frame rate (30 frames per
/// second at 90 kHz).
pub const DEFAULT_FRAME_TICKS: u32 = 3000;
/// Gaps are never shorter, so that a frame's code stays below a frame gap.
pub const MIN_FRAME_TICKS: u32 = 4 << ANCHOR_FRAMES;
/// Results held at most while the anchor is ambiguous; past this the first
/// frame sent is taken as the anchor.
pub const MAX_HELD_RESULTS: usize = 16;

pub const RTP_HEADER_LEN: usize = 12;

/// The codec of the client's track.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LiveCodec {
    Vp8,
    H264,
}

impl LiveCodec {
    pub fn mime_type(self) -> &'static str {
        match self {
            LiveCodec::Vp8 => "video/VP8",
            LiveCodec::H264 => "video/H264",
        }
    }

    /// The `a=fmtp` line offered: H.264 constrained baseline with
    /// packetization-mode 1, the only H.264 the server takes (§10).
    pub fn sdp_fmtp_line(self) -> &'static str {
        match self {
            LiveCodec::Vp8 => "",
            LiveCodec::H264 => "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f",
        }
    }

    /// A payload that the server's depayloader turns into no bytes.
    fn empty_payload(self) -> &'static [u8] {
        match self {
            // Descriptor byte: no extension, not a partition start, partition 0.
            LiveCodec::Vp8 => &[0x00],
            // FU-A indicator (type 28), FU header without start or end bit.
            LiveCodec::H264 => &[0x1c, 0x01],
        }
    }
}

/// The RTP timestamps and sequence numbers of the client's track.
#[derive(Debug, Clone)]
pub struct RtpPlan {
    codec: LiveCodec,
    /// Ticks between frames, before the anchor code.
    gap: u32,
    next_timestamp: u32,
    next_sequence: u16,
    frames: u64,
}

impl RtpPlan {
    /// `frame_ticks`: 90 kHz ticks per frame (None: 30 fps).
    pub fn new(codec: LiveCodec, origin: u32, first_sequence: u16, frame_ticks: Option<u32>) -> Self {
        let gap = frame_ticks.unwrap_or(DEFAULT_FRAME_TICKS).max(MIN_FRAME_TICKS);
        RtpPlan { codec, gap, next_timestamp: origin, next_sequence: first_sequence, frames: 0 }
    }

    #[cfg(test)]
    /// The timestamp the next frame carries (announced by the last boundary).
    pub fn timestamp(&self) -> u32 {
        self.next_timestamp
    }

    #[cfg(test)]
    pub fn frames(&self) -> u64 {
        self.frames
    }

    /// Restamps one frame's packets (from a payloader, in order) with the
    /// planned timestamp and the track's sequence numbers, marks its last
    /// packet, and appends the boundary packet announcing the next frame,
    /// one gap later (plus the anchor code). Returns the frame's timestamp.
    /// Packets shorter than an RTP header are refused.
    pub fn stamp_frame(&mut self, packets: &mut Vec<Vec<u8>>) -> Result<u32, String> {
        if packets.is_empty() {
            return Err("the encoder produced no packet for the frame".to_owned());
        }
        if let Some(short) = packets.iter().find(|packet| packet.len() < RTP_HEADER_LEN) {
            return Err(format!("a packet of {} bytes is shorter than an RTP header", short.len()));
        }
        let timestamp = self.next_timestamp;
        let last = packets.len() - 1;
        for (i, packet) in packets.iter_mut().enumerate() {
            let sequence = self.take_sequence();
            write_header(packet, sequence, timestamp, i == last);
        }
        let gap = self.gap + anchor_code(self.frames);
        self.next_timestamp = timestamp.wrapping_add(gap);
        let mut boundary = vec![0u8; RTP_HEADER_LEN];
        boundary[0] = 0x80;
        boundary.extend_from_slice(self.codec.empty_payload());
        let sequence = self.take_sequence();
        write_header(&mut boundary, sequence, self.next_timestamp, false);
        packets.push(boundary);
        self.frames += 1;
        Ok(timestamp)
    }

    fn take_sequence(&mut self) -> u16 {
        let sequence = self.next_sequence;
        self.next_sequence = sequence.wrapping_add(1);
        sequence
    }
}

/// Extra ticks in the gap after frame `index`.
fn anchor_code(index: u64) -> u32 {
    if index < ANCHOR_FRAMES as u64 { 1 << index } else { 0 }
}

fn write_header(packet: &mut [u8], sequence: u16, timestamp: u32, marker: bool) {
    packet[1] = (packet[1] & 0x7f) | if marker { 0x80 } else { 0 };
    packet[2..4].copy_from_slice(&sequence.to_be_bytes());
    packet[4..8].copy_from_slice(&timestamp.to_be_bytes());
}

/// A frame sent on the track.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SentFrame {
    /// 0-based, in sending order.
    pub index: u64,
    pub rtp_timestamp: u32,
    /// The buffer's PTS, ns.
    pub pts_ns: Option<u64>,
    /// When the buffer reached the sink.
    pub arrived: Instant,
}

/// A result with the frame it belongs to.
#[derive(Debug, Clone, PartialEq)]
pub struct Paired<T> {
    pub result: T,
    /// None: no frame sent matches the result's pts.
    pub frame: Option<SentFrame>,
    /// Frames sent before this one that got no result (the server dropped
    /// them, or could not decode them).
    pub skipped: u64,
}

/// Pairs results with the frames sent, by pts, and counts the frames in flight.
#[derive(Debug)]
pub struct LivePairing<T> {
    /// Frames sent that no result has reached yet, oldest first.
    in_flight: VecDeque<SentFrame>,
    /// The timestamps of the first frames: the possible anchors.
    first_frames: Vec<u32>,
    /// The anchors still possible; None until the first result.
    candidates: Option<Vec<u32>>,
    /// Results waiting for the anchor, with their pts in ticks.
    held: VecDeque<(u32, T)>,
    /// The newest frame a result was paired with.
    newest_paired: Option<u64>,
    frames_sent: u64,
    frames_paired: u64,
    frames_skipped: u64,
    results_unpaired: u64,
}

impl<T> Default for LivePairing<T> {
    fn default() -> Self {
        LivePairing {
            in_flight: VecDeque::new(),
            first_frames: Vec::new(),
            candidates: None,
            held: VecDeque::new(),
            newest_paired: None,
            frames_sent: 0,
            frames_paired: 0,
            frames_skipped: 0,
            results_unpaired: 0,
        }
    }
}

impl<T> LivePairing<T> {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn on_frame_sent(&mut self, rtp_timestamp: u32, pts_ns: Option<u64>, arrived: Instant) -> u64 {
        let index = self.frames_sent;
        self.frames_sent += 1;
        if self.first_frames.len() < ANCHOR_FRAMES {
            self.first_frames.push(rtp_timestamp);
        }
        self.in_flight.push_back(SentFrame { index, rtp_timestamp, pts_ns, arrived });
        index
    }

    /// Frames sent whose result has not come back (nor a later frame's).
    /// A held result counts for the oldest frame it may belong to: the
    /// window frees a slot for it without waiting for the anchor, and never
    /// more slots than the result really frees.
    pub fn in_flight(&self) -> u64 {
        let held = self.held.iter().filter_map(|(pts, _)| {
            self.candidates.iter().flatten().filter_map(|anchor| self.frame_at(anchor.wrapping_add(*pts))).map(|f| f.index).min()
        });
        match held.chain(self.newest_paired).max() {
            Some(newest) => self.frames_sent.saturating_sub(newest + 1),
            None => self.frames_sent,
        }
    }

    fn frame_at(&self, rtp_timestamp: u32) -> Option<&SentFrame> {
        self.in_flight.iter().find(|frame| frame.rtp_timestamp == rtp_timestamp)
    }

    pub fn frames_sent(&self) -> u64 {
        self.frames_sent
    }

    #[cfg(test)]
    pub fn frames_paired(&self) -> u64 {
        self.frames_paired
    }

    pub fn frames_skipped(&self) -> u64 {
        self.frames_skipped
    }

    pub fn results_unpaired(&self) -> u64 {
        self.results_unpaired
    }

    #[cfg(test)]
    /// Results wait for the anchor to be known.
    pub fn is_holding(&self) -> bool {
        !self.held.is_empty()
    }

    #[cfg(test)]
    /// The anchor, once only one is possible.
    pub fn anchor(&self) -> Option<u32> {
        match self.candidates.as_deref() {
            Some([anchor]) => Some(*anchor),
            _ => None,
        }
    }

    /// A result arrived with this pts in 90 kHz ticks (None: it has none).
    /// Returns the results that can be delivered now, in order.
    pub fn on_result(&mut self, pts_ticks: Option<u32>, result: T) -> Vec<Paired<T>> {
        let Some(pts) = pts_ticks else {
            self.results_unpaired += 1;
            let mut out = self.release_held(true);
            out.push(Paired { result, frame: None, skipped: 0 });
            return out;
        };
        let candidates = self.candidates.clone().unwrap_or_else(|| self.first_frames.clone());
        let matching: Vec<u32> =
            candidates.iter().copied().filter(|anchor| self.frame_at(anchor.wrapping_add(pts)).is_some()).collect();
        self.candidates = Some(if matching.is_empty() { candidates } else { matching });
        self.held.push_back((pts, result));
        let force = self.held.len() > MAX_HELD_RESULTS;
        self.release_held(force)
    }

    /// No more results will come: held results are paired with the first
    /// frame as anchor.
    pub fn finish(&mut self) -> Vec<Paired<T>> {
        self.release_held(true)
    }

    /// Delivers held results whose frame no longer depends on the anchor
    /// (or all of them, on the earliest anchor, when `force`d).
    fn release_held(&mut self, force: bool) -> Vec<Paired<T>> {
        let mut out = Vec::new();
        while let Some(&(pts, _)) = self.held.front() {
            let candidates = self.candidates.as_deref().unwrap_or_default();
            let targets: Vec<Option<u32>> = candidates
                .iter()
                .map(|anchor| {
                    let rtp = anchor.wrapping_add(pts);
                    self.in_flight.iter().any(|frame| frame.rtp_timestamp == rtp).then_some(rtp)
                })
                .collect();
            let agreed = targets.windows(2).all(|pair| pair[0] == pair[1]);
            let rtp = match targets.first() {
                Some(first) if agreed || force => *first,
                None => None,
                Some(_) => break,
            };
            let (_, result) = self.held.pop_front().expect("peeked");
            out.push(self.pair(rtp, result));
        }
        if force && let Some(candidates) = self.candidates.as_mut() {
            candidates.truncate(1);
        }
        out
    }

    fn pair(&mut self, rtp: Option<u32>, result: T) -> Paired<T> {
        let position = rtp.and_then(|rtp| self.in_flight.iter().position(|frame| frame.rtp_timestamp == rtp));
        let Some(position) = position else {
            self.results_unpaired += 1;
            return Paired { result, frame: None, skipped: 0 };
        };
        let skipped = position as u64;
        self.in_flight.drain(..position);
        let frame = self.in_flight.pop_front();
        self.frames_skipped += skipped;
        self.frames_paired += 1;
        if let Some(frame) = frame {
            self.newest_paired = Some(self.newest_paired.map_or(frame.index, |n| n.max(frame.index)));
        }
        Paired { result, frame, skipped }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payloader_packets(count: usize, payload: u8) -> Vec<Vec<u8>> {
        (0..count)
            .map(|i| {
                let mut packet = vec![0x80, 96, 0xff, 0xff, 1, 2, 3, 4, 9, 9, 9, 9];
                packet.push(payload);
                packet.push(i as u8);
                packet
            })
            .collect()
    }

    fn header(packet: &[u8]) -> (bool, u16, u32) {
        (
            packet[1] & 0x80 != 0,
            u16::from_be_bytes([packet[2], packet[3]]),
            u32::from_be_bytes([packet[4], packet[5], packet[6], packet[7]]),
        )
    }

    /// The timestamps of `n` frames sent at 30 fps with the plan.
    fn plan_timestamps(origin: u32, n: usize) -> Vec<u32> {
        let mut plan = RtpPlan::new(LiveCodec::Vp8, origin, 0, Some(3000));
        (0..n).map(|_| plan.stamp_frame(&mut payloader_packets(1, 0)).unwrap()).collect()
    }

    #[test]
    fn frames_are_restamped_and_each_ends_with_a_boundary_packet() {
        let mut plan = RtpPlan::new(LiveCodec::Vp8, 1000, 65534, None);
        let mut packets = payloader_packets(3, 7);
        assert_eq!(plan.stamp_frame(&mut packets).unwrap(), 1000);
        assert_eq!(packets.len(), 4);
        let headers: Vec<_> = packets.iter().map(|p| header(p)).collect();
        assert_eq!(headers, [(false, 65534, 1000), (false, 65535, 1000), (true, 0, 1000), (false, 1, 4001)]);
        // The payloader's payload and other header bytes are kept.
        assert_eq!(&packets[0][8..], &[9, 9, 9, 9, 7, 0]);
        assert_eq!(packets[0][1] & 0x7f, 96);
        // The boundary: a bare RTP header and a VP8 descriptor without data.
        assert_eq!(packets[3], [0x80, 0, 0, 1, 0, 0, 0x0f, 0xa1, 0, 0, 0, 0, 0x00]);

        let mut next = payloader_packets(1, 8);
        assert_eq!(plan.stamp_frame(&mut next).unwrap(), 4001, "the announced timestamp");
        assert_eq!(header(&next[0]), (true, 2, 4001));
        assert_eq!(header(&next[1]), (false, 3, 4001 + 3000 + 2));
        assert_eq!(plan.frames(), 2);
    }

    #[test]
    fn an_h264_boundary_is_an_fu_a_fragment_without_start_or_end() {
        let mut plan = RtpPlan::new(LiveCodec::H264, 0, 0, Some(1500));
        let mut packets = payloader_packets(1, 0);
        plan.stamp_frame(&mut packets).unwrap();
        assert_eq!(&packets[1][RTP_HEADER_LEN..], &[0x1c, 0x01]);
        assert_eq!(header(&packets[1]).2, 1500 + 1);
    }

    #[test]
    fn gaps_carry_the_anchor_code_then_stay_the_same() {
        let timestamps = plan_timestamps(u32::MAX - 5000, 12);
        let gaps: Vec<u32> = timestamps.windows(2).map(|w| w[1].wrapping_sub(w[0])).collect();
        assert_eq!(gaps, [3001, 3002, 3004, 3008, 3016, 3032, 3064, 3128, 3000, 3000, 3000]);
        let mut plan = RtpPlan::new(LiveCodec::Vp8, 0, 0, Some(10));
        plan.stamp_frame(&mut payloader_packets(1, 0)).unwrap();
        assert_eq!(plan.timestamp(), MIN_FRAME_TICKS + 1, "a tiny frame interval still leaves room for the code");
    }

    #[test]
    fn bad_payloader_output_is_refused() {
        let mut plan = RtpPlan::new(LiveCodec::Vp8, 0, 0, None);
        assert!(plan.stamp_frame(&mut Vec::new()).is_err());
        assert!(plan.stamp_frame(&mut vec![vec![0x80; 5]]).is_err());
        assert_eq!(plan.frames(), 0);
    }

    fn send_all(pairing: &mut LivePairing<u32>, timestamps: &[u32], now: Instant) {
        for (i, &rtp) in timestamps.iter().enumerate() {
            pairing.on_frame_sent(rtp, Some(i as u64 * 33_333_333), now);
        }
    }

    fn indices(paired: &[Paired<u32>]) -> Vec<(u32, Option<u64>, u64)> {
        paired.iter().map(|p| (p.result, p.frame.map(|f| f.index), p.skipped)).collect()
    }

    #[test]
    fn every_result_pairs_with_its_own_frame() {
        let now = Instant::now();
        let timestamps = plan_timestamps(123_456, 300);
        let mut pairing = LivePairing::new();
        let mut delivered = Vec::new();
        for (i, &rtp) in timestamps.iter().enumerate() {
            pairing.on_frame_sent(rtp, Some(i as u64), now);
            assert_eq!(pairing.in_flight(), 1);
            let pts = rtp.wrapping_sub(timestamps[0]);
            delivered.extend(indices(&pairing.on_result(Some(pts), i as u32)));
            assert_eq!(pairing.in_flight(), 0);
        }
        let expected: Vec<_> = (0..300).map(|i| (i as u32, Some(i as u64), 0)).collect();
        assert_eq!(delivered, expected);
        assert_eq!(pairing.frames_paired(), 300);
        assert_eq!(pairing.anchor(), Some(123_456));
    }

    #[test]
    fn a_lost_first_frame_is_found_and_no_result_shifts() {
        let now = Instant::now();
        let timestamps = plan_timestamps(7, 20);
        for lost in 1..ANCHOR_FRAMES {
            let mut pairing = LivePairing::new();
            send_all(&mut pairing, &timestamps[..lost + 2], now);
            // The server's anchor is frame `lost`; its first result (pts 0)
            // could be any of the frames sent: held.
            assert!(pairing.on_result(Some(0), 0).is_empty(), "lost {lost}");
            assert!(pairing.is_holding());
            // The held result frees the slot of the oldest frame it may be.
            assert_eq!(pairing.in_flight(), lost as u64 + 1);
            // The next result tells the anchors apart.
            let pts = timestamps[lost + 1].wrapping_sub(timestamps[lost]);
            let paired = pairing.on_result(Some(pts), 1);
            assert_eq!(indices(&paired), [(0, Some(lost as u64), lost as u64), (1, Some(lost as u64 + 1), 0)]);
            assert_eq!(pairing.anchor(), Some(timestamps[lost]));
            assert_eq!(pairing.frames_skipped(), lost as u64);
        }
    }

    #[test]
    fn realtime_results_skip_frames_and_may_start_past_the_anchor() {
        let now = Instant::now();
        let timestamps = plan_timestamps(0, 30);
        let mut pairing = LivePairing::new();
        send_all(&mut pairing, &timestamps[..4], now);
        // The server processed frame 2 first: no ambiguity.
        let paired = pairing.on_result(Some(timestamps[2]), 0);
        assert_eq!(indices(&paired), [(0, Some(2), 2)]);
        assert_eq!(pairing.in_flight(), 1);
        for &rtp in &timestamps[4..] {
            pairing.on_frame_sent(rtp, None, now);
        }
        let paired = pairing.on_result(Some(timestamps[9]), 1);
        assert_eq!(indices(&paired), [(1, Some(9), 6)]);
        assert_eq!(pairing.frames_skipped(), 8);
        assert_eq!(pairing.in_flight(), 20);
    }

    #[test]
    fn a_pts_no_frame_has_is_delivered_unpaired() {
        let now = Instant::now();
        let timestamps = plan_timestamps(0, 3);
        let mut pairing = LivePairing::new();
        send_all(&mut pairing, &timestamps[..1], now);
        assert_eq!(indices(&pairing.on_result(Some(0), 0)), [(0, Some(0), 0)]);
        send_all(&mut pairing, &timestamps[1..], now);
        assert_eq!(indices(&pairing.on_result(Some(1234), 1)), [(1, None, 0)]);
        assert_eq!(indices(&pairing.on_result(None, 2)), [(2, None, 0)]);
        assert_eq!(pairing.results_unpaired(), 2);
        // The frames still wait for their results.
        assert_eq!(indices(&pairing.on_result(Some(timestamps[2]), 3)), [(3, Some(2), 1)]);
    }

    #[test]
    fn held_results_are_released_on_the_first_frame_at_the_end_or_when_too_many() {
        let now = Instant::now();
        let timestamps = plan_timestamps(0, 40);
        let mut pairing = LivePairing::new();
        send_all(&mut pairing, &timestamps[..3], now);
        assert!(pairing.on_result(Some(0), 0).is_empty());
        assert_eq!(indices(&pairing.finish()), [(0, Some(0), 0)]);
        assert_eq!(pairing.anchor(), Some(0));

        let mut pairing = LivePairing::new();
        send_all(&mut pairing, &timestamps[..2], now);
        let mut released = Vec::new();
        for i in 0..=MAX_HELD_RESULTS as u32 {
            released.extend(indices(&pairing.on_result(Some(0), i)));
        }
        assert_eq!(released.len(), MAX_HELD_RESULTS + 1);
        assert_eq!(released[0], (0, Some(0), 0));
        assert!(released[1..].iter().all(|r| r.1.is_none()), "{released:?}");
    }

    #[test]
    fn a_result_never_makes_the_window_fuller() {
        let now = Instant::now();
        let timestamps = plan_timestamps(0, 12);
        let mut pairing = LivePairing::new();
        send_all(&mut pairing, &timestamps[..3], now);
        assert!(pairing.on_result(Some(0), 0).is_empty(), "held");
        assert_eq!(pairing.in_flight(), 2, "the held result frees one slot");
        pairing.on_frame_sent(timestamps[3], None, now);
        let before = pairing.in_flight();
        let paired = pairing.on_result(Some(timestamps[1]), 1);
        assert_eq!(paired.len(), 2);
        assert!(pairing.in_flight() <= before, "{} > {before}", pairing.in_flight());
        assert_eq!(pairing.in_flight(), 2);
    }

    use proptest::prelude::*;

    proptest! {
        /// A simulated server loses the client's first frames, processes a
        /// random subset of the rest in order (realtime drops), and results
        /// reach the client at random points after their frames: every
        /// result is delivered once, in order, with its own frame.
        #[test]
        fn results_never_pair_with_another_frame(
            gap in prop_oneof![Just(3000u32), Just(1500u32), 1u32..20_000],
            n in 12usize..40,
            lost in 0usize..ANCHOR_FRAMES,
            kept in proptest::collection::vec(any::<bool>(), 40),
            lags in proptest::collection::vec(0usize..4, 40),
            origin in any::<u32>(),
        ) {
            let now = Instant::now();
            let mut plan = RtpPlan::new(LiveCodec::Vp8, origin, 0, Some(gap));
            let timestamps: Vec<u32> =
                (0..n).map(|_| plan.stamp_frame(&mut vec![vec![0x80; RTP_HEADER_LEN]]).unwrap()).collect();
            prop_assume!(lost + 2 < n);
            let anchor = timestamps[lost];
            // The server's processed frames: a random subset of those it
            // received, at least two (a lone pts-0 result names no anchor).
            let processed: Vec<usize> = (lost..n).filter(|&i| kept[i]).collect();
            prop_assume!(processed.len() >= 2);
            let mut pairing = LivePairing::new();
            let mut delivered: Vec<(usize, Option<u64>)> = Vec::new();
            let mut next_result = 0;
            for (i, &rtp) in timestamps.iter().enumerate() {
                pairing.on_frame_sent(rtp, None, now);
                // Results of frames sent at least `lag` frames ago arrive.
                while next_result < processed.len() && processed[next_result] + lags[i] <= i {
                    let frame = processed[next_result];
                    let pts = timestamps[frame].wrapping_sub(anchor);
                    for paired in pairing.on_result(Some(pts), frame) {
                        delivered.push((paired.result, paired.frame.map(|f| f.index)));
                    }
                    next_result += 1;
                }
            }
            for &frame in &processed[next_result..] {
                let pts = timestamps[frame].wrapping_sub(anchor);
                for paired in pairing.on_result(Some(pts), frame) {
                    delivered.push((paired.result, paired.frame.map(|f| f.index)));
                }
            }
            for paired in pairing.finish() {
                delivered.push((paired.result, paired.frame.map(|f| f.index)));
            }
            let expected: Vec<(usize, Option<u64>)> = processed.iter().map(|&f| (f, Some(f as u64))).collect();
            prop_assert_eq!(delivered, expected);
            prop_assert_eq!(pairing.results_unpaired(), 0);
        }
    }
}
