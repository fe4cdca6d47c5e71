// Keyframe requests on the returned track (sans-IO): which RTP packet
// starts a keyframe, and when a request (RTCP PLI) that brought none is
// sent again.
//
// The server's encoder (aiortc) makes a keyframe only at the start and when
// asked. A request or the keyframe it brings can be lost like any packet;
// the depayloader asks again only at its next gap, so on an otherwise clean
// link the picture would stay frozen. The session therefore repeats the
// request until a keyframe arrives, as browsers do.

use std::time::{Duration, Instant};

/// How long to wait for the keyframe before asking again: the server's
/// encoder answers with its next frame, a few frame times plus the round
/// trip. A request repeated too early costs only one more keyframe.
pub const KEYFRAME_RETRY_INTERVAL: Duration = Duration::from_millis(500);

/// Requests sent for one keyframe before giving up (10 s): a server that
/// ignores them will not change its mind.
pub const MAX_KEYFRAME_REQUESTS: u32 = 20;

/// The codecs of the returned track whose keyframes can be recognised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrackCodec {
    Vp8,
    H264,
    Other,
}

impl TrackCodec {
    /// From the negotiated MIME type (`video/VP8`, `video/H264`).
    pub fn from_mime_type(mime_type: &str) -> TrackCodec {
        let name = mime_type.rsplit('/').next().unwrap_or_default();
        if name.eq_ignore_ascii_case("vp8") {
            TrackCodec::Vp8
        } else if name.eq_ignore_ascii_case("h264") {
            TrackCodec::H264
        } else {
            TrackCodec::Other
        }
    }
}

/// Whether this RTP payload starts a keyframe (an H.264 SPS or IDR slice
/// counts: the server sends them together).
pub fn starts_keyframe(codec: TrackCodec, payload: &[u8]) -> bool {
    match codec {
        TrackCodec::Vp8 => vp8_starts_keyframe(payload),
        TrackCodec::H264 => h264_starts_keyframe(payload),
        TrackCodec::Other => false,
    }
}

/// RFC 7741 §4.2: the payload descriptor, then, in the first packet of a
/// frame (S set, partition 0), the VP8 payload header, whose lowest bit is
/// 0 for a keyframe (RFC 6386 §9.1).
fn vp8_starts_keyframe(payload: &[u8]) -> bool {
    let Some(&first) = payload.first() else { return false };
    let (extended, start, partition) = (first & 0x80 != 0, first & 0x10 != 0, first & 0x07);
    if !start || partition != 0 {
        return false;
    }
    let mut at = 1;
    if extended {
        let Some(&flags) = payload.get(1) else { return false };
        at = 2;
        if flags & 0x80 != 0 {
            // PictureID: 15 bits when its first bit (M) is set, else 7.
            let Some(&picture_id) = payload.get(at) else { return false };
            at += if picture_id & 0x80 != 0 { 2 } else { 1 };
        }
        if flags & 0x40 != 0 {
            at += 1; // TL0PICIDX
        }
        if flags & 0x30 != 0 {
            at += 1; // TID / Y / KEYIDX
        }
    }
    payload.get(at).is_some_and(|header| header & 0x01 == 0)
}

const H264_IDR: u8 = 5;
const H264_SPS: u8 = 7;
const H264_STAP_A: u8 = 24;
const H264_FU_A: u8 = 28;

/// RFC 6184 §5: a single NAL unit, an aggregation (STAP-A) holding one, or
/// the first fragment (FU-A, S bit) of an IDR slice.
fn h264_starts_keyframe(payload: &[u8]) -> bool {
    let Some(&header) = payload.first() else { return false };
    let key = |nal_type: u8| nal_type == H264_IDR || nal_type == H264_SPS;
    match header & 0x1f {
        H264_STAP_A => {
            let mut at = 1;
            while let Some(size) = payload.get(at..at + 2).map(|b| usize::from(u16::from_be_bytes([b[0], b[1]]))) {
                match payload.get(at + 2) {
                    Some(&nal) if size > 0 && key(nal & 0x1f) => return true,
                    Some(_) => at += 2 + size,
                    None => return false,
                }
            }
            false
        }
        H264_FU_A => payload.get(1).is_some_and(|fu| fu & 0x80 != 0 && fu & 0x1f == H264_IDR),
        nal_type => key(nal_type),
    }
}

/// What to do after an input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyframeAction {
    /// Nothing to send.
    Wait,
    /// Send a keyframe request (PLI) now.
    Request,
    /// MAX_KEYFRAME_REQUESTS went unanswered: stop asking (until the next
    /// request from the depayloader).
    GiveUp,
}

/// The keyframe the session is waiting for, if any.
#[derive(Debug, Default)]
pub struct KeyframeRequests {
    pending: Option<Pending>,
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    last_sent: Instant,
    sent: u32,
}

impl KeyframeRequests {
    /// The depayloader asks for a keyframe. Asked again while one is
    /// awaited: the retry timer already covers it.
    pub fn on_request(&mut self, now: Instant) -> KeyframeAction {
        if self.pending.is_some() {
            return KeyframeAction::Wait;
        }
        self.pending = Some(Pending { last_sent: now, sent: 1 });
        KeyframeAction::Request
    }

    /// A packet arrived that starts a keyframe: nothing is awaited any more.
    pub fn on_keyframe(&mut self) {
        self.pending = None;
    }

    pub fn awaiting(&self) -> bool {
        self.pending.is_some()
    }

    /// When the awaited keyframe is late.
    pub fn deadline(&self) -> Option<Instant> {
        self.pending.map(|pending| pending.last_sent + KEYFRAME_RETRY_INTERVAL)
    }

    pub fn on_timeout(&mut self, now: Instant) -> KeyframeAction {
        let Some(pending) = self.pending.as_mut() else { return KeyframeAction::Wait };
        if now < pending.last_sent + KEYFRAME_RETRY_INTERVAL {
            return KeyframeAction::Wait;
        }
        if pending.sent >= MAX_KEYFRAME_REQUESTS {
            self.pending = None;
            return KeyframeAction::GiveUp;
        }
        pending.sent += 1;
        pending.last_sent = now;
        KeyframeAction::Request
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codecs_from_mime_types() {
        assert_eq!(TrackCodec::from_mime_type("video/VP8"), TrackCodec::Vp8);
        assert_eq!(TrackCodec::from_mime_type("video/h264"), TrackCodec::H264);
        assert_eq!(TrackCodec::from_mime_type("video/AV1"), TrackCodec::Other);
    }

    #[test]
    fn vp8_keyframes_are_told_from_their_payload_header() {
        // S=1, PID=0, no extension; payload header 0x10 (P=0): keyframe.
        assert!(starts_keyframe(TrackCodec::Vp8, &[0x10, 0x10, 0x02, 0x00]));
        // The same with P=1: an interframe.
        assert!(!starts_keyframe(TrackCodec::Vp8, &[0x10, 0x11, 0x02, 0x00]));
        // Not the frame's first packet (S=0), whatever follows.
        assert!(!starts_keyframe(TrackCodec::Vp8, &[0x00, 0x10]));
        // S=1 but partition 1.
        assert!(!starts_keyframe(TrackCodec::Vp8, &[0x11, 0x10]));
        // Extended: I with a 15-bit PictureID (2 bytes), L (TL0PICIDX), T/K.
        assert!(starts_keyframe(TrackCodec::Vp8, &[0x90, 0xf0, 0x81, 0x23, 0x05, 0x20, 0x50]));
        assert!(!starts_keyframe(TrackCodec::Vp8, &[0x90, 0xf0, 0x81, 0x23, 0x05, 0x20, 0x51]));
        // Extended with a 7-bit PictureID only.
        assert!(starts_keyframe(TrackCodec::Vp8, &[0x90, 0x80, 0x17, 0x9c]));
        assert!(!starts_keyframe(TrackCodec::Vp8, &[0x90, 0x80, 0x17, 0x9d]));
        // Truncated: never a keyframe, never a panic.
        for cut in [&[][..], &[0x90], &[0x90, 0x80], &[0x90, 0x80, 0x97], &[0x10]] {
            assert!(!starts_keyframe(TrackCodec::Vp8, cut), "{cut:?}");
        }
    }

    #[test]
    fn h264_keyframes_in_single_aggregated_and_fragmented_packets() {
        // Single NAL units: IDR (0x65), SPS (0x67) yes; non-IDR slice (0x41), PPS (0x68) no.
        assert!(starts_keyframe(TrackCodec::H264, &[0x65, 0x88]));
        assert!(starts_keyframe(TrackCodec::H264, &[0x67, 0x42]));
        assert!(!starts_keyframe(TrackCodec::H264, &[0x41, 0x9a]));
        assert!(!starts_keyframe(TrackCodec::H264, &[0x68, 0xce]));
        // STAP-A (0x78) with SEI (0x06, 2 bytes) then SPS (3 bytes).
        assert!(starts_keyframe(TrackCodec::H264, &[0x78, 0x00, 0x02, 0x06, 0x05, 0x00, 0x03, 0x67, 0x42, 0x00]));
        // STAP-A with only a PPS; and one whose size runs past the end.
        assert!(!starts_keyframe(TrackCodec::H264, &[0x78, 0x00, 0x02, 0x68, 0xce]));
        assert!(!starts_keyframe(TrackCodec::H264, &[0x78, 0x00, 0x09, 0x06, 0x05]));
        // FU-A (0x7c): start of an IDR (0x85) yes; its middle (0x05) or a
        // non-IDR start (0x81) no.
        assert!(starts_keyframe(TrackCodec::H264, &[0x7c, 0x85, 0xb8]));
        assert!(!starts_keyframe(TrackCodec::H264, &[0x7c, 0x05, 0xb8]));
        assert!(!starts_keyframe(TrackCodec::H264, &[0x7c, 0x81, 0x9a]));
        assert!(!starts_keyframe(TrackCodec::H264, &[0x7c]));
        assert!(!starts_keyframe(TrackCodec::H264, &[]));
        assert!(!starts_keyframe(TrackCodec::Other, &[0x65]));
    }

    #[test]
    fn a_request_is_repeated_until_a_keyframe_comes() {
        let t0 = Instant::now();
        let mut requests = KeyframeRequests::default();
        assert_eq!(requests.deadline(), None);
        assert_eq!(requests.on_timeout(t0), KeyframeAction::Wait, "nothing awaited");
        assert_eq!(requests.on_request(t0), KeyframeAction::Request);
        assert_eq!(requests.deadline(), Some(t0 + KEYFRAME_RETRY_INTERVAL));
        // Asked again meanwhile: the retry timer covers it.
        assert_eq!(requests.on_request(t0 + Duration::from_millis(100)), KeyframeAction::Wait);
        assert_eq!(requests.on_timeout(t0 + Duration::from_millis(499)), KeyframeAction::Wait, "too early");
        let t1 = t0 + KEYFRAME_RETRY_INTERVAL;
        assert_eq!(requests.on_timeout(t1), KeyframeAction::Request);
        assert_eq!(requests.deadline(), Some(t1 + KEYFRAME_RETRY_INTERVAL));
        requests.on_keyframe();
        assert!(!requests.awaiting());
        assert_eq!(requests.deadline(), None);
        assert_eq!(requests.on_timeout(t1 + Duration::from_secs(5)), KeyframeAction::Wait);
        // The next request starts afresh.
        assert_eq!(requests.on_request(t1 + Duration::from_secs(6)), KeyframeAction::Request);
    }

    #[test]
    fn unanswered_requests_stop_after_the_last_one() {
        let t0 = Instant::now();
        let mut requests = KeyframeRequests::default();
        assert_eq!(requests.on_request(t0), KeyframeAction::Request);
        let mut now = t0;
        for _ in 1..MAX_KEYFRAME_REQUESTS {
            now += KEYFRAME_RETRY_INTERVAL;
            assert_eq!(requests.on_timeout(now), KeyframeAction::Request);
        }
        now += KEYFRAME_RETRY_INTERVAL;
        assert_eq!(requests.on_timeout(now), KeyframeAction::GiveUp);
        assert!(!requests.awaiting());
        assert_eq!(requests.on_request(now), KeyframeAction::Request, "a new loss asks again");
    }
}
