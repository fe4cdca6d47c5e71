// Live video in (PROTOCOL.md §10): which caps make the sink send a WebRTC
// video track, and the small private pipeline that turns one buffer into
// its RTP packets (encoder and payloader, or payloader alone for VP8 and
// H.264 that arrive encoded).
//
// The private pipeline runs one frame at a time: the streaming thread pushes
// a buffer and pulls packets until the payloader's marker bit. Encoders are
// set for zero latency (no lookahead, no B-frames), so a frame's packets
// come out before the next frame goes in.

use gst::prelude::*;

use crate::protocol::live::LiveCodec;

/// Longest wait for one frame's packets. Encoding a frame takes
/// milliseconds; this only turns a stuck encoder into an error.
const ENCODE_TIMEOUT: gst::ClockTime = gst::ClockTime::from_seconds(5);
/// Bounds the packets of one frame (a 4K keyframe is far below).
const MAX_PACKETS_PER_FRAME: usize = 20_000;
/// RTP payload size: room for SRTP and header extensions in a 1280-byte
/// datagram (the IPv6 minimum MTU).
const RTP_MTU: u32 = 1200;
/// A keyframe at least this often (in frames): a server that lost a
/// keyframe decodes again within two seconds at 30 fps.
const KEYFRAME_INTERVAL: u32 = 60;

/// What the sink's caps ask of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CapsMode {
    /// Anything that is not elementary video: bytes of a file, uploaded.
    File,
    /// Raw video, encoded by the sink.
    Raw,
    /// Encoded video sent as it is.
    Encoded(LiveCodec),
}

impl CapsMode {
    pub fn is_live(self) -> bool {
        self != CapsMode::File
    }
}

/// Reads the sink's caps: file upload, raw video, or VP8/H.264 the server
/// takes. Elementary video the server cannot take is an error that says
/// what to do.
pub fn caps_mode(caps: &gst::CapsRef) -> Result<CapsMode, String> {
    let Some(structure) = caps.structure(0) else {
        return Ok(CapsMode::File);
    };
    match structure.name().as_str() {
        "video/x-raw" => Ok(CapsMode::Raw),
        "video/x-vp8" => Ok(CapsMode::Encoded(LiveCodec::Vp8)),
        "video/x-h264" => {
            let profile = structure.get::<&str>("profile").ok();
            match profile {
                Some("constrained-baseline" | "baseline") => {}
                Some(other) => {
                    return Err(format!(
                        "H.264 in profile '{other}' cannot be sent: the server accepts only constrained-baseline or baseline H.264 \
                         (re-encode it, e.g. x264enc ! video/x-h264,profile=constrained-baseline, or send raw video and let the sink encode)"
                    ));
                }
                None => {
                    return Err("the H.264 caps do not say its profile (the server accepts only constrained-baseline or baseline): put h264parse before roboflowuploadsink".to_owned());
                }
            }
            match structure.get::<&str>("alignment").ok() {
                Some("au") | None => Ok(CapsMode::Encoded(LiveCodec::H264)),
                Some(other) => Err(format!(
                    "H.264 with alignment={other} cannot be sent frame by frame: it needs alignment=au (put h264parse before roboflowuploadsink)"
                )),
            }
        }
        name @ ("video/x-h265" | "video/x-vp9" | "video/x-av1" | "video/x-theora" | "video/x-divx" | "video/x-xvid"
        | "image/jpeg" | "image/png") => Err(format!(
            "{name} cannot be sent: the server takes a video track in VP8 or H.264 only; decode it before \
             roboflowuploadsink (e.g. decodebin ! videoconvert) and the sink encodes the raw video"
        )),
        "video/mpeg" if !structure.get::<bool>("systemstream").unwrap_or(true) => Err(
            "MPEG elementary video cannot be sent: the server takes VP8 or H.264 only; decode it before roboflowuploadsink"
                .to_owned(),
        ),
        _ => Ok(CapsMode::File),
    }
}

/// The caps the sink prefers for live video, so that an encoder upstream
/// picks what the server takes (x264enc then chooses constrained baseline).
pub fn preferred_live_caps() -> gst::Caps {
    gst::Caps::builder_full()
        .structure(gst::Structure::new_empty("video/x-raw"))
        .structure(gst::Structure::new_empty("video/x-vp8"))
        .structure(
            gst::Structure::builder("video/x-h264")
                .field("profile", gst::List::new(["constrained-baseline", "baseline"]))
                .field("alignment", "au")
                .build(),
        )
        .build()
}

/// The frame rate of video caps, when it is fixed and not 0.
pub fn framerate(caps: &gst::CapsRef) -> Option<gst::Fraction> {
    let rate = caps.structure(0)?.get::<gst::Fraction>("framerate").ok()?;
    (rate.numer() > 0 && rate.denom() > 0).then_some(rate)
}

fn make(factory: &str, package: &str) -> Result<gst::Element, String> {
    gst::ElementFactory::make(factory).build().map_err(|_| {
        format!("the GStreamer element '{factory}' is not installed: live video needs it (Debian: {package})")
    })
}

/// A bitrate for the encoder: about 0.1 bit per pixel per frame, within
/// 0.3 to 8 Mbit/s (920 kbit/s for 640x480 at 30 fps).
fn bitrate(caps: &gst::CapsRef) -> u32 {
    let structure = caps.structure(0);
    let dimension = |name| structure.and_then(|s| s.get::<i32>(name).ok()).unwrap_or(0).max(0) as f64;
    let fps = framerate(caps).map_or(30.0, |f| f.numer() as f64 / f.denom() as f64);
    (dimension("width") * dimension("height") * fps * 0.1).clamp(300_000.0, 8_000_000.0) as u32
}

/// The private encoder/payloader pipeline of a live session.
pub struct LiveEncoder {
    pipeline: gst::Pipeline,
    src: gst_app::AppSrc,
    sink: gst_app::AppSink,
    codec: LiveCodec,
}

impl LiveEncoder {
    /// Builds the pipeline for `mode` (`codec` is the one raw video is
    /// encoded to) and starts it. Names the missing plugin when one is.
    pub fn new(mode: CapsMode, codec: LiveCodec, caps: &gst::Caps) -> Result<LiveEncoder, String> {
        let codec = match mode {
            CapsMode::Encoded(codec) => codec,
            CapsMode::Raw => codec,
            CapsMode::File => return Err("not live video".to_owned()),
        };
        let pipeline = gst::Pipeline::with_name("roboflow-live-encoder");
        let src = gst_app::AppSrc::builder()
            .caps(caps)
            .format(gst::Format::Time)
            .is_live(false)
            .build();
        let sink = gst_app::AppSink::builder().sync(false).build();
        let mut chain: Vec<gst::Element> = vec![src.clone().upcast()];
        if mode == CapsMode::Raw {
            chain.push(make("videoconvert", "gstreamer1.0-plugins-base")?);
            chain.extend(Self::encoder(codec, caps)?);
        }
        chain.push(match codec {
            LiveCodec::Vp8 => {
                let pay = make("rtpvp8pay", "gstreamer1.0-plugins-good")?;
                pay.set_property_from_str("picture-id-mode", "15-bit");
                pay
            }
            LiveCodec::H264 => {
                let pay = make("rtph264pay", "gstreamer1.0-plugins-good")?;
                // SPS and PPS before every keyframe; SPS/PPS/IDR aggregated.
                pay.set_property("config-interval", -1i32);
                pay.set_property_from_str("aggregate-mode", "zero-latency");
                pay
            }
        });
        chain[chain.len() - 1].set_property("mtu", RTP_MTU);
        chain.push(sink.clone().upcast());
        pipeline.add_many(&chain).map_err(|err| err.to_string())?;
        gst::Element::link_many(&chain).map_err(|err| format!("the live encoder cannot be linked: {err}"))?;
        pipeline
            .set_state(gst::State::Playing)
            .map_err(|_| "the live encoder pipeline does not start".to_owned())?;
        Ok(LiveEncoder { pipeline, src, sink, codec })
    }

    fn encoder(codec: LiveCodec, caps: &gst::Caps) -> Result<Vec<gst::Element>, String> {
        let bitrate = bitrate(caps);
        match codec {
            LiveCodec::Vp8 => {
                let enc = make("vp8enc", "gstreamer1.0-plugins-good")?;
                enc.set_property("deadline", 1i64);
                enc.set_property("lag-in-frames", 0i32);
                enc.set_property("cpu-used", 4i32);
                enc.set_property("keyframe-max-dist", KEYFRAME_INTERVAL as i32);
                enc.set_property("target-bitrate", bitrate as i32);
                enc.set_property_from_str("end-usage", "cbr");
                enc.set_property("threads", 2i32);
                Ok(vec![enc])
            }
            LiveCodec::H264 => {
                let enc = match make("x264enc", "gstreamer1.0-plugins-ugly") {
                    Ok(enc) => {
                        enc.set_property_from_str("tune", "zerolatency");
                        enc.set_property_from_str("speed-preset", "ultrafast");
                        enc.set_property("key-int-max", KEYFRAME_INTERVAL);
                        enc.set_property("bitrate", bitrate / 1000);
                        enc
                    }
                    Err(x264) => {
                        let enc = make("openh264enc", "gstreamer1.0-plugins-bad").map_err(|_| {
                            format!("{x264}; or 'openh264enc' (gstreamer1.0-plugins-bad); or set video-codec=vp8")
                        })?;
                        enc.set_property("gop-size", KEYFRAME_INTERVAL);
                        enc.set_property("bitrate", bitrate);
                        enc
                    }
                };
                let filter = make("capsfilter", "gstreamer1.0-plugins-base")?;
                filter.set_property(
                    "caps",
                    gst::Caps::builder("video/x-h264")
                        .field("profile", "constrained-baseline")
                        .field("stream-format", "byte-stream")
                        .field("alignment", "au")
                        .build(),
                );
                Ok(vec![enc, filter])
            }
        }
    }

    pub fn codec(&self) -> LiveCodec {
        self.codec
    }

    /// New caps mid-stream (e.g. another resolution): the encoder is
    /// renegotiated and starts again with a keyframe.
    pub fn set_caps(&self, caps: &gst::Caps) {
        self.src.set_caps(Some(caps));
    }

    /// The next frame is encoded as a keyframe (raw video only).
    pub fn force_keyframe(&self) {
        let event = gst_video::DownstreamForceKeyUnitEvent::builder().all_headers(true).build();
        if !self.src.send_event(event) {
            gst::warning!(super::imp::CAT, "the live encoder did not take a keyframe request");
        }
    }

    /// Encodes and payloads one buffer; returns its RTP packets in order.
    pub fn encode(&self, buffer: gst::Buffer) -> Result<Vec<Vec<u8>>, String> {
        self.src.push_buffer(buffer).map_err(|flow| self.failure(&format!("{flow:?}")))?;
        let mut packets = Vec::new();
        while packets.len() < MAX_PACKETS_PER_FRAME {
            let Some(sample) = self.sink.try_pull_sample(ENCODE_TIMEOUT) else {
                return Err(self.failure(&format!(
                    "no complete frame came out within {} s ({} packets)",
                    ENCODE_TIMEOUT.seconds(),
                    packets.len()
                )));
            };
            let Some(buffer) = sample.buffer() else { continue };
            let map = buffer.map_readable().map_err(|_| "an RTP packet cannot be read".to_owned())?;
            let marker = map.len() > 1 && map[1] & 0x80 != 0;
            packets.push(map.to_vec());
            if marker {
                return Ok(packets);
            }
        }
        Err(format!("the payloader made {MAX_PACKETS_PER_FRAME} packets without ending the frame"))
    }

    /// What went wrong inside, from the private pipeline's bus.
    fn failure(&self, what: &str) -> String {
        let bus = self.pipeline.bus().expect("a pipeline has a bus");
        while let Some(message) = bus.pop_filtered(&[gst::MessageType::Error]) {
            if let gst::MessageView::Error(err) = message.view() {
                let source = err.src().map(|s| s.name().to_string()).unwrap_or_default();
                return format!("the live encoder failed ({what}): {source}: {}", err.error());
            }
        }
        format!("the live encoder failed: {what}")
    }
}

impl Drop for LiveEncoder {
    fn drop(&mut self) {
        let _ = self.pipeline.set_state(gst::State::Null);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(caps: &str) -> Result<CapsMode, String> {
        gst::init().unwrap();
        caps_mode(&caps.parse::<gst::Caps>().unwrap())
    }

    #[test]
    fn caps_decide_the_mode() {
        assert_eq!(mode("video/x-raw,format=I420,width=64,height=48"), Ok(CapsMode::Raw));
        assert_eq!(mode("video/x-vp8"), Ok(CapsMode::Encoded(LiveCodec::Vp8)));
        assert_eq!(
            mode("video/x-h264,profile=constrained-baseline,stream-format=avc,alignment=au"),
            Ok(CapsMode::Encoded(LiveCodec::H264))
        );
        assert_eq!(mode("video/x-h264,profile=baseline,stream-format=byte-stream"), Ok(CapsMode::Encoded(LiveCodec::H264)));
        for file in ["video/quicktime", "video/x-matroska", "video/mpegts,systemstream=true", "application/octet-stream", "video/mpeg,systemstream=true"] {
            assert_eq!(mode(file), Ok(CapsMode::File), "{file}");
        }
    }

    #[test]
    fn what_the_server_cannot_take_is_refused_with_the_way_out() {
        let high = mode("video/x-h264,profile=high,alignment=au").unwrap_err();
        assert!(high.contains("profile 'high'") && high.contains("constrained-baseline or baseline"), "{high}");
        assert!(mode("video/x-h264,alignment=au").unwrap_err().contains("h264parse"));
        assert!(mode("video/x-h264,profile=baseline,alignment=nal").unwrap_err().contains("alignment=au"));
        for name in ["video/x-vp9", "video/x-h265", "image/jpeg"] {
            let err = mode(name).unwrap_err();
            assert!(err.contains("VP8 or H.264") && err.contains("decode"), "{err}");
        }
        assert!(mode("video/mpeg,mpegversion=2,systemstream=false").is_err());
    }

    fn raw_frame(width: u32, height: u32, pts: u64) -> (gst::Caps, gst::Buffer) {
        let info = gst_video::VideoInfo::builder(gst_video::VideoFormat::Rgb, width, height)
            .fps(gst::Fraction::new(30, 1))
            .build()
            .unwrap();
        let mut buffer = gst::Buffer::from_mut_slice(vec![128u8; info.size()]);
        buffer.get_mut().unwrap().set_pts(gst::ClockTime::from_mseconds(pts));
        (info.to_caps().unwrap(), buffer)
    }

    #[test]
    fn each_raw_frame_becomes_its_packets_in_either_codec() {
        gst::init().unwrap();
        for codec in [LiveCodec::Vp8, LiveCodec::H264] {
            let (caps, _) = raw_frame(320, 240, 0);
            let encoder = LiveEncoder::new(CapsMode::Raw, codec, &caps).unwrap();
            for i in 0..5u64 {
                let (_, buffer) = raw_frame(320, 240, i * 33);
                let packets = encoder.encode(buffer).unwrap();
                assert!(!packets.is_empty());
                let markers: Vec<bool> = packets.iter().map(|p| p[1] & 0x80 != 0).collect();
                assert_eq!(markers.iter().filter(|m| **m).count(), 1, "{codec:?}: one end of frame, last");
                assert!(markers.last().unwrap());
            }
            // Another resolution: the encoder starts again.
            let (caps, buffer) = raw_frame(160, 120, 200);
            encoder.set_caps(&caps);
            assert!(!encoder.encode(buffer).unwrap().is_empty(), "{codec:?} after a resolution change");
        }
    }
}
