// NACKs (RFC 4585 generic NACK) for the video the server returns, sent when
// a gap in the sequence numbers appears, and only then.
//
// webrtc-rs 0.21.1's NACK generator wakes the session every 100 ms for as
// long as a track flows, lost packets or not: about a third of a camera
// session's wake-ups, and a lost packet waits up to 100 ms for its first
// NACK. This one keeps no timer while nothing is missing. A gap arms one:
// the first NACK leaves REORDER_WAIT after the gap appeared (a packet that
// was only reordered arrives in between and is never asked for), then again
// every RETRY_INTERVAL, at most MAX_NACKS times, until the packet arrives:
// in its own stream or, when RTX is negotiated, as a retransmission on the
// repair SSRC, whose original sequence number leads its payload (RFC 4588).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use rtc::interceptor::{AttributedPacket, Interceptor, Packet, StreamInfo, TaggedPacket};
use rtc::rtcp::transport_feedbacks::transport_layer_nack::{NackPair, TransportLayerNack};
use rtc::sansio::Protocol;
use rtc::shared::TransportContext;

/// How long a gap may be a reordering before its first NACK.
pub const REORDER_WAIT: Duration = Duration::from_millis(10);
/// Between two NACKs of the same packet (no RTT estimate: the server's
/// retransmission comes within one on any sane path).
pub const RETRY_INTERVAL: Duration = Duration::from_millis(100);
/// NACKs per lost packet before it is given up.
pub const MAX_NACKS: u8 = 10;
/// Lost packets tracked per stream. A larger gap is no loss to repair (the
/// sender keeps far fewer packets than this): it is forgotten, and the
/// decoder waits for the next keyframe.
pub const MAX_MISSING: u64 = 512;

#[derive(Debug)]
struct Missing {
    next_nack: Instant,
    sent: u8,
}

#[derive(Debug)]
struct Stream {
    /// The highest sequence number received, extended past wrap-arounds
    /// (counted from 1 << 16, so that older packets stay positive).
    highest: Option<u64>,
    /// Lost packets by extended sequence number.
    missing: BTreeMap<u64, Missing>,
}

impl Stream {
    fn on_sequence(&mut self, sequence: u16, now: Instant) {
        let Some(highest) = self.highest else {
            self.highest = Some((1 << 16) + u64::from(sequence));
            return;
        };
        let delta = i64::from(sequence.wrapping_sub(highest as u16) as i16);
        let Some(extended) = highest.checked_add_signed(delta) else {
            return;
        };
        if extended > highest {
            let gap = extended - highest - 1;
            if gap > MAX_MISSING {
                self.missing.clear();
            } else {
                let first_nack = now + REORDER_WAIT;
                for lost in highest + 1..extended {
                    self.missing.insert(lost, Missing { next_nack: first_nack, sent: 0 });
                }
            }
            self.highest = Some(extended);
            // Packets too old to be worth asking for.
            let oldest = extended.saturating_sub(MAX_MISSING);
            self.missing = self.missing.split_off(&oldest);
        } else {
            self.missing.remove(&extended);
        }
    }

    /// The sequence numbers to ask for now; advances their next NACK and
    /// forgets those asked for MAX_NACKS times.
    fn due(&mut self, now: Instant) -> Vec<u16> {
        let mut due = Vec::new();
        self.missing.retain(|sequence, missing| {
            if missing.next_nack > now {
                return true;
            }
            if missing.sent >= MAX_NACKS {
                return false;
            }
            missing.sent += 1;
            missing.next_nack = now + RETRY_INTERVAL;
            due.push(*sequence as u16);
            true
        });
        due
    }

    fn next_nack(&self) -> Option<Instant> {
        self.missing.values().map(|missing| missing.next_nack).min()
    }
}

/// The NACK generator of a session's peer connection (slot NackGenerator).
pub struct LossNacks {
    sender_ssrc: u32,
    /// By media SSRC, for the remote streams that negotiated `nack`.
    streams: HashMap<u32, Stream>,
    /// A repair (RTX) SSRC to the media SSRC it repairs.
    repairs: HashMap<u32, u32>,
    next_timeout: Option<Instant>,
    inbound: VecDeque<TaggedPacket>,
    outbound: VecDeque<TaggedPacket>,
}

impl LossNacks {
    pub fn new(sender_ssrc: u32) -> LossNacks {
        LossNacks {
            sender_ssrc,
            streams: HashMap::new(),
            repairs: HashMap::new(),
            next_timeout: None,
            inbound: VecDeque::new(),
            outbound: VecDeque::new(),
        }
    }

    /// The earliest NACK due over all streams (None: nothing missing).
    fn refresh_timeout(&mut self) {
        self.next_timeout = self.streams.values().filter_map(Stream::next_nack).min();
    }

    fn on_rtp(&mut self, packet: &rtc::rtp::Packet, now: Instant) {
        let ssrc = packet.header.ssrc;
        let (media, sequence) = match self.repairs.get(&ssrc) {
            // A retransmission: its payload starts with the original
            // sequence number (none in a padding-only probe).
            Some(&media) => match packet.payload.get(..2) {
                Some(osn) => (media, u16::from_be_bytes([osn[0], osn[1]])),
                None => return,
            },
            None => (ssrc, packet.header.sequence_number),
        };
        if let Some(stream) = self.streams.get_mut(&media) {
            stream.on_sequence(sequence, now);
            self.refresh_timeout();
        }
    }
}

impl Protocol<TaggedPacket, TaggedPacket, ()> for LossNacks {
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = rtc::shared::error::Error;
    type Time = Instant;

    fn handle_read(&mut self, message: TaggedPacket) -> Result<(), Self::Error> {
        if let Packet::Rtp(packet) = &message.message.packet {
            self.on_rtp(packet, message.now);
        }
        self.inbound.push_back(message);
        Ok(())
    }

    fn poll_read(&mut self) -> Option<Self::Rout> {
        self.inbound.pop_front()
    }

    fn handle_write(&mut self, message: TaggedPacket) -> Result<(), Self::Error> {
        self.outbound.push_back(message);
        Ok(())
    }

    fn poll_write(&mut self) -> Option<Self::Wout> {
        self.outbound.pop_front()
    }

    fn handle_timeout(&mut self, now: Instant) -> Result<(), Self::Error> {
        if self.next_timeout.is_none_or(|next| next > now) {
            return Ok(());
        }
        for (&media_ssrc, stream) in &mut self.streams {
            let due = stream.due(now);
            if due.is_empty() {
                continue;
            }
            let nack = TransportLayerNack {
                sender_ssrc: self.sender_ssrc,
                media_ssrc,
                nacks: nack_pairs(&due),
            };
            self.outbound.push_back(TaggedPacket {
                now,
                transport: TransportContext::default(),
                message: AttributedPacket::new(Packet::Rtcp(vec![Box::new(nack)])),
            });
        }
        self.refresh_timeout();
        Ok(())
    }

    fn poll_timeout(&mut self) -> Option<Self::Time> {
        self.next_timeout
    }
}

/// Sequence numbers (in order, across a wrap-around too) as NACK pairs: a
/// packet ID and a bitmask of the 16 that follow it (RFC 4585 §6.2.1).
fn nack_pairs(sequences: &[u16]) -> Vec<NackPair> {
    let mut pairs: Vec<NackPair> = Vec::new();
    for &sequence in sequences {
        match pairs.last_mut() {
            Some(pair) if (1..=16).contains(&sequence.wrapping_sub(pair.packet_id)) => {
                pair.lost_packets |= 1 << (sequence.wrapping_sub(pair.packet_id) - 1);
            }
            _ => pairs.push(NackPair { packet_id: sequence, lost_packets: 0 }),
        }
    }
    pairs
}

impl Interceptor for LossNacks {
    fn bind_remote_stream(&mut self, info: &StreamInfo) {
        let nack = info.rtcp_feedback.iter().any(|feedback| feedback.typ == "nack" && feedback.parameter.is_empty());
        if !nack {
            return;
        }
        self.streams.insert(info.ssrc, Stream { highest: None, missing: BTreeMap::new() });
        if let Some(repair) = info.ssrc_rtx {
            self.repairs.insert(repair, info.ssrc);
        }
    }

    fn unbind_remote_stream(&mut self, info: &StreamInfo) {
        self.streams.remove(&info.ssrc);
        self.repairs.retain(|_, media| *media != info.ssrc);
        self.refresh_timeout();
    }

    fn bind_local_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_local_stream(&mut self, _info: &StreamInfo) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use rtc::interceptor::RTCPFeedback;
    use rtc::rtp::header::Header;

    const MEDIA: u32 = 0x1111_1111;
    const REPAIR: u32 = 0x2222_2222;
    const SENDER: u32 = 0x0a0b_0c0d;

    fn generator(rtx: bool) -> LossNacks {
        let mut nacks = LossNacks::new(SENDER);
        nacks.bind_remote_stream(&StreamInfo {
            ssrc: MEDIA,
            ssrc_rtx: rtx.then_some(REPAIR),
            rtcp_feedback: vec![RTCPFeedback { typ: "nack".into(), parameter: String::new() }],
            ..Default::default()
        });
        nacks
    }

    fn rtp(ssrc: u32, sequence: u16, payload: &[u8], now: Instant) -> TaggedPacket {
        let header = Header { version: 2, ssrc, sequence_number: sequence, payload_type: 96, ..Default::default() };
        TaggedPacket {
            now,
            transport: TransportContext::default(),
            message: AttributedPacket::new(Packet::Rtp(rtc::rtp::Packet { header, payload: Bytes::copy_from_slice(payload) })),
        }
    }

    fn receive(nacks: &mut LossNacks, ssrc: u32, sequence: u16, now: Instant) {
        nacks.handle_read(rtp(ssrc, sequence, b"vp8", now)).unwrap();
        assert!(nacks.poll_read().is_some(), "every packet goes on to the next interceptor");
    }

    /// The RTCP bytes written, one entry per packet.
    fn written(nacks: &mut LossNacks) -> Vec<Vec<u8>> {
        std::iter::from_fn(|| nacks.poll_write())
            .map(|message| match message.message.packet {
                Packet::Rtcp(packets) => rtc::rtcp::packet::marshal(&packets).unwrap().to_vec(),
                _ => panic!("a NACK generator writes RTCP only"),
            })
            .collect()
    }

    /// RFC 4585 §6.2.1 generic NACK: V=2, FMT=1, PT=205, length 3 (one
    /// NACK pair), sender SSRC, media SSRC, PID, BLP.
    fn generic_nack(pid: u16, blp: u16) -> Vec<u8> {
        let mut bytes = vec![0x81, 205, 0, 3];
        bytes.extend_from_slice(&SENDER.to_be_bytes());
        bytes.extend_from_slice(&MEDIA.to_be_bytes());
        bytes.extend_from_slice(&pid.to_be_bytes());
        bytes.extend_from_slice(&blp.to_be_bytes());
        bytes
    }

    #[test]
    fn no_timer_while_nothing_is_lost() {
        let start = Instant::now();
        let mut nacks = generator(false);
        for (i, sequence) in (65_530..=65_535).chain(0..10).enumerate() {
            receive(&mut nacks, MEDIA, sequence, start + Duration::from_millis(i as u64));
            assert_eq!(nacks.poll_timeout(), None, "no wake-up without loss (after {sequence})");
        }
        nacks.handle_timeout(start + Duration::from_secs(5)).unwrap();
        assert!(written(&mut nacks).is_empty());
    }

    #[test]
    fn a_gap_is_asked_for_after_the_reorder_wait_then_every_retry_interval() {
        let start = Instant::now();
        let mut nacks = generator(false);
        receive(&mut nacks, MEDIA, 100, start);
        receive(&mut nacks, MEDIA, 103, start);
        assert_eq!(nacks.poll_timeout(), Some(start + REORDER_WAIT));
        nacks.handle_timeout(start + REORDER_WAIT - Duration::from_millis(1)).unwrap();
        assert!(written(&mut nacks).is_empty(), "not before the reorder wait");
        let first = start + REORDER_WAIT;
        nacks.handle_timeout(first).unwrap();
        // 101, and 102 as bit 0 of the bitmask.
        assert_eq!(written(&mut nacks), vec![generic_nack(101, 0b1)]);
        assert_eq!(nacks.poll_timeout(), Some(first + RETRY_INTERVAL));
        receive(&mut nacks, MEDIA, 101, first + Duration::from_millis(5));
        nacks.handle_timeout(first + RETRY_INTERVAL).unwrap();
        assert_eq!(written(&mut nacks), vec![generic_nack(102, 0)], "only what is still missing");
        receive(&mut nacks, MEDIA, 102, first + RETRY_INTERVAL + Duration::from_millis(5));
        assert_eq!(nacks.poll_timeout(), None, "nothing missing: no timer");
    }

    #[test]
    fn a_reordered_packet_is_never_asked_for() {
        let start = Instant::now();
        let mut nacks = generator(false);
        receive(&mut nacks, MEDIA, 7, start);
        receive(&mut nacks, MEDIA, 9, start);
        receive(&mut nacks, MEDIA, 8, start + Duration::from_millis(3));
        assert_eq!(nacks.poll_timeout(), None);
        nacks.handle_timeout(start + REORDER_WAIT).unwrap();
        assert!(written(&mut nacks).is_empty());
    }

    #[test]
    fn a_gap_across_the_wrap_around_names_the_right_packets() {
        let start = Instant::now();
        let mut nacks = generator(false);
        receive(&mut nacks, MEDIA, 65_534, start);
        receive(&mut nacks, MEDIA, 1, start);
        nacks.handle_timeout(start + REORDER_WAIT).unwrap();
        // 65535, then 0 as bit 0.
        assert_eq!(written(&mut nacks), vec![generic_nack(65_535, 0b1)]);
        receive(&mut nacks, MEDIA, 65_535, start + Duration::from_millis(20));
        receive(&mut nacks, MEDIA, 0, start + Duration::from_millis(20));
        assert_eq!(nacks.poll_timeout(), None);
    }

    #[test]
    fn a_retransmission_on_the_repair_ssrc_ends_the_nacks_by_its_original_sequence_number() {
        let start = Instant::now();
        let mut nacks = generator(true);
        receive(&mut nacks, MEDIA, 500, start);
        receive(&mut nacks, MEDIA, 502, start);
        nacks.handle_timeout(start + REORDER_WAIT).unwrap();
        assert_eq!(written(&mut nacks), vec![generic_nack(501, 0)]);
        // RTX: its own sequence number (7), the original one (501) first in
        // the payload. A padding-only probe (no payload) changes nothing.
        nacks.handle_read(rtp(REPAIR, 6, b"", start + Duration::from_millis(15))).unwrap();
        assert!(nacks.poll_timeout().is_some());
        nacks.handle_read(rtp(REPAIR, 7, &[0x01, 0xf5, b'v', b'p', b'8'], start + Duration::from_millis(20))).unwrap();
        assert_eq!(nacks.poll_timeout(), None);
        assert_eq!(std::iter::from_fn(|| nacks.poll_read()).count(), 2, "retransmissions go on too");
    }

    #[test]
    fn a_packet_is_given_up_after_max_nacks() {
        let start = Instant::now();
        let mut nacks = generator(false);
        receive(&mut nacks, MEDIA, 10, start);
        receive(&mut nacks, MEDIA, 12, start);
        let mut sent = 0;
        for _ in 0..(MAX_NACKS as usize + 5) {
            let Some(at) = nacks.poll_timeout() else { break };
            nacks.handle_timeout(at).unwrap();
            sent += written(&mut nacks).len();
        }
        assert_eq!(sent, usize::from(MAX_NACKS));
        assert_eq!(nacks.poll_timeout(), None);
    }

    #[test]
    fn nack_pairs_cover_16_packets_each_across_the_wrap_around() {
        let pair = |packet_id, lost_packets| NackPair { packet_id, lost_packets };
        assert_eq!(nack_pairs(&[]), vec![]);
        assert_eq!(nack_pairs(&[5, 6, 21, 22]), vec![pair(5, 0b1 | 1 << 15), pair(22, 0)]);
        assert_eq!(nack_pairs(&[65_530, 65_535, 0, 10]), vec![pair(65_530, 1 << 4 | 1 << 5 | 1 << 15)]);
        assert_eq!(nack_pairs(&[65_530, 11]), vec![pair(65_530, 0), pair(11, 0)]);
    }

    #[test]
    fn a_jump_larger_than_max_missing_is_not_asked_for() {
        let start = Instant::now();
        let mut nacks = generator(false);
        receive(&mut nacks, MEDIA, 1_000, start);
        receive(&mut nacks, MEDIA, 1_002, start);
        receive(&mut nacks, MEDIA, 1_002 + MAX_MISSING as u16 + 2, start);
        assert_eq!(nacks.poll_timeout(), None, "the earlier gap went with the jump");
        // A smaller gap after that is tracked again.
        receive(&mut nacks, MEDIA, 1_002 + MAX_MISSING as u16 + 4, start);
        assert_eq!(nacks.poll_timeout(), Some(start + REORDER_WAIT));
    }

    #[test]
    fn streams_without_nack_feedback_and_unknown_ssrcs_are_left_alone() {
        let start = Instant::now();
        let mut nacks = LossNacks::new(SENDER);
        nacks.bind_remote_stream(&StreamInfo { ssrc: MEDIA, ..Default::default() });
        receive(&mut nacks, MEDIA, 1, start);
        receive(&mut nacks, MEDIA, 5, start);
        receive(&mut nacks, 0x3333_3333, 1, start);
        receive(&mut nacks, 0x3333_3333, 5, start);
        assert_eq!(nacks.poll_timeout(), None);
        let mut nacks = generator(false);
        receive(&mut nacks, MEDIA, 1, start);
        receive(&mut nacks, MEDIA, 5, start);
        nacks.unbind_remote_stream(&StreamInfo { ssrc: MEDIA, ..Default::default() });
        assert_eq!(nacks.poll_timeout(), None);
    }
}
