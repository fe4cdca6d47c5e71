//! The test worker's returned video track (PROTOCOL §6), the parts that need
//! no session: which codec an offer gets, the image the worker returns, and a
//! GStreamer encoder that turns one decoded frame into its RTP packets.
//!
//! The session side (adding the track to the answer, stamping and writing
//! the packets) lives in `worker.rs`.

#![allow(dead_code)]

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};

use gst::prelude::*;
use gst_video::prelude::*;
use rtc::rtp::Packet;
use rtc::shared::marshal::Unmarshal;

/// RTP clock of every video codec the worker sends.
pub const VIDEO_CLOCK_RATE: u32 = 90_000;
/// Bounds the packets one frame may produce (a 4K keyframe is well below).
const MAX_PACKETS_PER_FRAME: usize = 20_000;
const ENCODE_TIMEOUT_SECONDS: u64 = 10;
/// Frames between keyframes of the returned track.
pub const DEFAULT_KEYFRAME_INTERVAL: u32 = 30;
/// The track's payload size; leaves room for SRTP and header extensions.
const RTP_MTU: u32 = 1200;

/// The codec of the returned video track. Like aiortc, the worker sends VP8
/// or H.264; the preferred one is used when the offer has it, else the other.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TrackCodec {
    #[default]
    Vp8,
    H264,
}

impl TrackCodec {
    pub fn mime_type(self) -> &'static str {
        match self {
            TrackCodec::Vp8 => "video/VP8",
            TrackCodec::H264 => "video/H264",
        }
    }

    fn other(self) -> TrackCodec {
        match self {
            TrackCodec::Vp8 => TrackCodec::H264,
            TrackCodec::H264 => TrackCodec::Vp8,
        }
    }

    /// The offered format this codec would be sent as, in the offer's order.
    /// H.264 needs packetization-mode 1 (the payloader fragments with FU-A)
    /// and a baseline profile (what the encoder is asked for); constrained
    /// baseline (`42e0..`) is taken over plain baseline.
    fn pick(self, offered: &[OfferedCodec]) -> Option<&OfferedCodec> {
        let mut same_codec = offered.iter().filter(|codec| {
            codec.clock_rate == VIDEO_CLOCK_RATE
                && codec.mime_type.eq_ignore_ascii_case(self.mime_type())
        });
        match self {
            TrackCodec::Vp8 => same_codec.next(),
            TrackCodec::H264 => {
                let usable: Vec<&OfferedCodec> = same_codec
                    .filter(|codec| {
                        codec.fmtp_value("packetization-mode") == Some("1")
                            && codec.h264_profile().is_some_and(|p| p.starts_with("42"))
                    })
                    .collect();
                usable
                    .iter()
                    .find(|codec| codec.h264_profile().is_some_and(|p| p.starts_with("42e0")))
                    .or(usable.first())
                    .copied()
            }
        }
    }

    /// The codec whose RTP media type is `mime_type` (`video/VP8`, any case).
    pub fn from_mime(mime_type: &str) -> Option<TrackCodec> {
        [TrackCodec::Vp8, TrackCodec::H264]
            .into_iter()
            .find(|codec| codec.mime_type().eq_ignore_ascii_case(mime_type))
    }

    /// `appsrc` (raw video) to `appsink` (RTP packets), one frame in, its
    /// packets out; a keyframe at least every `keyframe_interval` frames.
    fn pipeline_description(self, payload_type: u8, keyframe_interval: u32) -> String {
        let encode = match self {
            // A higher bitrate than the default so tests can compare colours.
            TrackCodec::Vp8 => format!(
                "vp8enc deadline=1 keyframe-max-dist={keyframe_interval} target-bitrate=2000000 \
                 ! rtpvp8pay pt={payload_type} mtu={RTP_MTU}"
            ),
            TrackCodec::H264 => format!(
                "x264enc tune=zerolatency speed-preset=ultrafast key-int-max={keyframe_interval} \
                 ! video/x-h264,profile=constrained-baseline \
                 ! rtph264pay pt={payload_type} mtu={RTP_MTU} config-interval=-1 aggregate-mode=zero-latency"
            ),
        };
        format!(
            "appsrc name=src format=time ! videoconvert ! video/x-raw,format=I420 ! {encode} \
             ! appsink name=sink sync=false"
        )
    }
}

/// One format of the offer's video section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OfferedCodec {
    pub payload_type: u8,
    /// `video/<encoding name>` as the offer spells it.
    pub mime_type: String,
    pub clock_rate: u32,
    /// The `a=fmtp` parameters, empty when there are none.
    pub fmtp: String,
}

impl OfferedCodec {
    fn fmtp_value(&self, key: &str) -> Option<&str> {
        self.fmtp.split(';').find_map(|pair| {
            let (name, value) = pair.split_once('=')?;
            name.trim().eq_ignore_ascii_case(key).then(|| value.trim())
        })
    }

    fn h264_profile(&self) -> Option<String> {
        self.fmtp_value("profile-level-id")
            .map(str::to_ascii_lowercase)
    }
}

/// The offer's first video section, as far as the worker needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VideoSection {
    /// `a=sendrecv`, `a=sendonly`, `a=recvonly` or `a=inactive` (the
    /// offerer's view); `sendrecv` when the section names none.
    pub direction: String,
    /// Port 0: the offerer rejected the section.
    pub rejected: bool,
    /// The section announces a track of the offerer (`a=msid` or `a=ssrc`).
    pub has_track: bool,
    /// Its formats in the offer's order (its preference).
    pub codecs: Vec<OfferedCodec>,
}

impl VideoSection {
    /// The offerer sends video on it (live video in, PROTOCOL §10).
    pub fn client_sends(&self) -> bool {
        !self.rejected
            && self.has_track
            && (self.direction == "sendrecv" || self.direction == "sendonly")
    }

    /// The offerer can receive video on it (a returned track, §6).
    pub fn client_receives(&self) -> bool {
        !self.rejected && (self.direction == "sendrecv" || self.direction == "recvonly")
    }
}

/// The offer's first video section, or `None` when it has none.
pub fn video_section(sdp: &str) -> Option<VideoSection> {
    let mut formats: Option<Vec<u8>> = None;
    let mut rejected = false;
    let mut rtpmaps: HashMap<u8, (String, u32)> = HashMap::new();
    let mut fmtps: HashMap<u8, String> = HashMap::new();
    let mut direction = "sendrecv".to_owned();
    let mut has_track = false;
    for line in sdp.lines() {
        if let Some(media) = line.strip_prefix("m=") {
            if formats.is_some() {
                break;
            }
            let mut fields = media.split_whitespace();
            if fields.next() == Some("video") {
                rejected = fields.next().is_none_or(|port| port == "0");
                formats = Some(fields.skip(1).filter_map(|f| f.parse().ok()).collect());
            }
            continue;
        }
        if formats.is_none() {
            continue;
        }
        if let Some(map) = line.strip_prefix("a=rtpmap:") {
            let Some((pt, encoding)) = map.split_once(' ') else {
                continue;
            };
            let mut parts = encoding.trim().split('/');
            let (Ok(pt), Some(name), Some(Ok(rate))) =
                (pt.parse(), parts.next(), parts.next().map(str::parse))
            else {
                continue;
            };
            rtpmaps.insert(pt, (name.to_owned(), rate));
        } else if let Some(fmtp) = line.strip_prefix("a=fmtp:") {
            if let Some((pt, parameters)) = fmtp.split_once(' ')
                && let Ok(pt) = pt.parse()
            {
                fmtps.insert(pt, parameters.trim().to_owned());
            }
        } else if let Some(value) = line.strip_prefix("a=") {
            match value {
                "sendrecv" | "sendonly" | "recvonly" | "inactive" => direction = value.to_owned(),
                _ if value.starts_with("msid:") || value.starts_with("ssrc:") => has_track = true,
                _ => {}
            }
        }
    }
    let codecs = formats?
        .into_iter()
        .filter_map(|pt| {
            let (name, clock_rate) = rtpmaps.get(&pt)?;
            Some(OfferedCodec {
                payload_type: pt,
                mime_type: format!("video/{name}"),
                clock_rate: *clock_rate,
                fmtp: fmtps.get(&pt).cloned().unwrap_or_default(),
            })
        })
        .collect();
    Some(VideoSection {
        direction,
        rejected,
        has_track,
        codecs,
    })
}

/// The formats of the offer's first video section, in the offer's order
/// (its preference), or `None` when the offer cannot receive video: no video
/// section, a rejected one (port 0), or one the client only sends on.
pub fn offered_video_codecs(sdp: &str) -> Option<Vec<OfferedCodec>> {
    video_section(sdp)
        .filter(|section| section.client_receives())
        .map(|section| section.codecs)
}

/// The format a live client track may be sent in (§10): the offer's first
/// VP8, or H.264 with `packetization-mode=1` and a Constrained Baseline
/// (`42e0xx`) or Baseline (`4200xx`) profile-level-id. `None`: the server
/// fails before answering.
pub fn live_track_format(offered: &[OfferedCodec]) -> Option<&OfferedCodec> {
    offered.iter().find(|codec| {
        if codec.clock_rate != VIDEO_CLOCK_RATE {
            return false;
        }
        if codec
            .mime_type
            .eq_ignore_ascii_case(TrackCodec::Vp8.mime_type())
        {
            return true;
        }
        codec
            .mime_type
            .eq_ignore_ascii_case(TrackCodec::H264.mime_type())
            && codec.fmtp_value("packetization-mode") == Some("1")
            && codec
                .h264_profile()
                .is_some_and(|p| p.starts_with("42e0") || p.starts_with("4200"))
    })
}

/// The codec to send and the offered format it goes as: `preferred` when
/// the offer has it, else the other one, else none (no track).
pub fn choose_track_codec(
    offered: &[OfferedCodec],
    preferred: TrackCodec,
) -> Option<(TrackCodec, OfferedCodec)> {
    [preferred, preferred.other()]
        .into_iter()
        .find_map(|codec| codec.pick(offered).map(|format| (codec, format.clone())))
}

/// A fresh random value (SSRCs, RTP origins) without a `rand` dependency:
/// std's `RandomState` is randomly keyed per process.
pub fn random_u32() -> u32 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let hash = RandomState::new().hash_one(COUNTER.fetch_add(1, Ordering::Relaxed));
    (hash >> 32) as u32
}

/// `ns` in units of the 90 kHz video clock, rounded to nearest.
pub fn ns_to_90k(ns: u64) -> u64 {
    ((u128::from(ns) * u128::from(VIDEO_CLOCK_RATE) + 500_000_000) / 1_000_000_000) as u64
}

/// What the worker returns as the stream output: the decoded frame with
/// every byte inverted, same size and format, so a test can tell that the
/// video went through the worker (and compare colours: 255 - original).
pub fn inverted_frame(sample: &gst::Sample) -> Result<gst::Sample, String> {
    let buffer = sample.buffer().ok_or("decoded sample without buffer")?;
    let caps = sample.caps().ok_or("decoded sample without caps")?;
    let mut copy = buffer
        .copy_deep()
        .map_err(|e| format!("copying a decoded frame: {e}"))?;
    {
        let copy = copy.get_mut().ok_or("fresh copy is shared")?;
        let mut map = copy
            .map_writable()
            .map_err(|e| format!("mapping a frame copy: {e}"))?;
        for byte in map.as_mut_slice() {
            *byte = !*byte;
        }
    }
    Ok(gst::Sample::builder()
        .buffer(&copy)
        .caps(&caps.to_owned())
        .build())
}

/// Rows at the top of a returned image that [`stamp_frame`] paints: two
/// 16-pixel macroblock rows, flat, so that the codec keeps their level.
pub const STAMP_ROWS: usize = 32;
/// Levels are this far apart, several times the codec's error on a flat band.
const STAMP_STEP: u32 = 7;
/// Frame ids repeat their level with this period.
const STAMP_PERIOD: u32 = 32;

/// The grey level that stands for `frame_id` (16..=233).
pub fn stamp_level(frame_id: u32) -> u8 {
    (16 + STAMP_STEP * (frame_id % STAMP_PERIOD)) as u8
}

/// The frame id (modulo 32) a measured band level stands for.
pub fn frame_id_from_stamp(level: f64) -> u32 {
    let steps = ((level - 16.0) / f64::from(STAMP_STEP)).round().max(0.0) as u32;
    steps % STAMP_PERIOD
}

/// `image` with its top [`STAMP_ROWS`] rows set to `level` in every byte
/// (grey in any RGB-like packed format).
pub fn stamp_frame(image: &gst::Sample, level: u8) -> Result<gst::Sample, String> {
    let caps = image.caps().ok_or("image without caps")?;
    let info = gst_video::VideoInfo::from_caps(caps).map_err(|e| format!("image caps: {e}"))?;
    let mut buffer = image.buffer_owned().ok_or("image without buffer")?;
    {
        let buffer = buffer.make_mut();
        let mut frame = gst_video::VideoFrameRef::from_buffer_ref_writable(buffer, &info)
            .map_err(|_| "mapping the image to stamp it".to_owned())?;
        let stride = frame.plane_stride()[0] as usize;
        let row_bytes = info.width() as usize * info.format_info().pixel_stride()[0] as usize;
        let rows = STAMP_ROWS.min(info.height() as usize);
        let data = frame.plane_data_mut(0).map_err(|e| e.to_string())?;
        for row in 0..rows {
            data[row * stride..row * stride + row_bytes].fill(level);
        }
    }
    Ok(gst::Sample::builder()
        .buffer(&buffer)
        .caps(&caps.to_owned())
        .build())
}

/// `appsrc ! videoconvert ! <encoder> ! <payloader> ! appsink`. Both encoders
/// are set for zero latency, so each frame's packets come out before the
/// next frame goes in; the last packet of a frame has the marker bit. The
/// packets' own timestamps are of no use (x264enc shifts pts by 1000 h to
/// keep DTS positive): the caller stamps them with the frame's pts.
pub struct RtpEncoder {
    pipeline: gst::Pipeline,
    source: gst_app::AppSrc,
    sink: gst_app::AppSink,
}

impl RtpEncoder {
    pub fn new(codec: TrackCodec, payload_type: u8) -> Result<RtpEncoder, String> {
        RtpEncoder::with_keyframe_interval(codec, payload_type, DEFAULT_KEYFRAME_INTERVAL)
    }

    /// An encoder that makes a keyframe at least every `keyframe_interval` frames
    /// (1: every frame is one).
    pub fn with_keyframe_interval(
        codec: TrackCodec,
        payload_type: u8,
        keyframe_interval: u32,
    ) -> Result<RtpEncoder, String> {
        gst::init().map_err(|e| e.to_string())?;
        let description = codec.pipeline_description(payload_type, keyframe_interval.max(1));
        let pipeline = gst::parse::launch(&description)
            .map_err(|e| format!("track encoder '{description}': {e}"))?
            .downcast::<gst::Pipeline>()
            .map_err(|_| "track encoder is not a pipeline".to_owned())?;
        let source = pipeline
            .by_name("src")
            .and_then(|e| e.downcast::<gst_app::AppSrc>().ok())
            .ok_or("track encoder has no appsrc")?;
        let sink = pipeline
            .by_name("sink")
            .and_then(|e| e.downcast::<gst_app::AppSink>().ok())
            .ok_or("track encoder has no appsink")?;
        pipeline
            .set_state(gst::State::Playing)
            .map_err(|e| format!("track encoder does not start: {e}"))?;
        Ok(RtpEncoder {
            pipeline,
            source,
            sink,
        })
    }

    /// Makes the next frame a keyframe (a PLI or FIR asked for one). Without
    /// all-headers: x264enc then sends its SPS/PPS ahead of the frame with a
    /// marker bit of their own, which `encode` would take for the frame's end.
    pub fn force_keyframe(&mut self) {
        let event = gst_video::DownstreamForceKeyUnitEvent::builder().all_headers(false).build();
        self.source.send_event(event);
    }

    /// Encodes one frame and returns its packets, up to the marker bit.
    pub fn encode(&mut self, image: &gst::Sample) -> Result<Vec<Packet>, String> {
        self.source
            .push_sample(image)
            .map_err(|e| format!("track encoder push: {e}"))?;
        let mut packets = Vec::new();
        while packets.len() < MAX_PACKETS_PER_FRAME {
            let sample = self
                .sink
                .try_pull_sample(gst::ClockTime::from_seconds(ENCODE_TIMEOUT_SECONDS))
                .ok_or_else(|| {
                    format!(
                        "track encoder gave no end of frame within {ENCODE_TIMEOUT_SECONDS} s \
                         ({} packets so far)",
                        packets.len()
                    )
                })?;
            let buffer = sample.buffer().ok_or("RTP sample without buffer")?;
            let map = buffer.map_readable().map_err(|e| e.to_string())?;
            let packet = Packet::unmarshal(&mut map.as_slice())
                .map_err(|e| format!("payloader output is not RTP: {e}"))?;
            let end_of_frame = packet.header.marker;
            packets.push(packet);
            if end_of_frame {
                return Ok(packets);
            }
        }
        Err(format!(
            "track encoder made {MAX_PACKETS_PER_FRAME} packets without an end of frame"
        ))
    }
}

impl Drop for RtpEncoder {
    fn drop(&mut self) {
        let _ = self.pipeline.set_state(gst::State::Null);
    }
}
