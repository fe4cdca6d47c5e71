//! Live video in (PROTOCOL §10): the test worker reads a video track the
//! client sends, as the server does for the SDK's WebcamSource/ManualSource.
//!
//! A child module of `worker.rs` (it shares the session, the results and the
//! returned track). The path of a frame:
//!
//! 1. [`run_live_track`] polls the webrtc-rs `TrackRemote` and assembles RTP
//!    packets into frames by timestamp as aiortc does: complete when the next
//!    timestamp starts ([`Assembler`]).
//!    The first complete frame's timestamp is `first_rtp`; a frame's `pts` is
//!    `(rtp − first_rtp) mod 2^32` at 90 kHz.
//! 2. A decoder thread ([`run_decoder`]) feeds each frame's packets to
//!    `appsrc ! rtpvp8depay ! vp8dec` (or `rtph264depay ! h264parse !
//!    avdec_h264`) `! videoconvert ! RGB ! appsink`. Until a keyframe has
//!    been decoded, frames are skipped and a PLI asks the client for one, as
//!    aiortc's decoder fails on them and its receiver requests a keyframe.
//! 3. Decoded pictures go to a [`LiveQueue`]: unbounded in order without
//!    realtime processing, a single newest-wins slot with it (aiortc's
//!    unbuffered relay).
//! 4. [`process_live`] takes one at a time, "runs the Workflow"
//!    (`live_process_delay`), sends the result like the file mode does, then
//!    hands the frame to the returned track, if any.
//!
//! The end: the client's RTCP BYE (webrtc-rs 0.21.1 does not end a remote
//! track on BYE, and delivers no inbound RTCP to the application unless an
//! interceptor marks it: [`ByeForwarder`] marks BYEs), or the track's
//! events ending. The queued frames are then finished (realtime: only the
//! one in progress), `processing_complete` is sent once, and the session
//! waits for the client to close.

use std::collections::{BTreeMap, VecDeque};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gst::prelude::*;
use rtc::interceptor::{
    Attribute, Interceptor, Packet as ChainPacket, Slot, StreamInfo, TaggedPacket,
};
use rtc::rtcp::goodbye::Goodbye;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtp;
use rtc::sansio::Protocol;
use rtc::shared::marshal::Marshal;
use tokio::sync::{Notify, mpsc};
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::peer_connection::Registry;

use super::{
    DecodedFrame, Fault, JpegEncoder, OfferedCodec, RtpEncoder, Session, TrackCodec,
    VIDEO_CLOCK_RATE, deliver_result, send_processing_complete,
};

/// The client's track as the offer described it.
#[derive(Clone, Debug)]
pub(super) struct LiveOffer {
    /// The offer's video direction: `sendrecv` or `sendonly`.
    pub direction: String,
    /// The format the worker accepted (see `live_track_format`).
    pub format: OfferedCodec,
}

/// Bounds the packets one frame may take before it is given up.
const MAX_PACKETS_PER_FRAME: usize = 20_000;
/// How long the decoder thread waits for a frame before it checks whether the session ended.
const DECODER_POLL: Duration = Duration::from_millis(100);
/// How long the decoder may take to drain at the end of the track.
const DECODER_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// The least time between two keyframe requests.
const PLI_INTERVAL: Duration = Duration::from_millis(200);
/// A PLI write only waits for the connection's driver to take it.
const RTCP_WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// The first result waits this long at most for the `inference` channel to
/// be known: the client starts its track once the channel is open, but the
/// worker learns of the channel a moment after the client does.
const CONTROL_CHANNEL_WAIT: Duration = Duration::from_secs(2);

// ---------------------------------------------------------------------------
// RTCP BYE reaches the application
// ---------------------------------------------------------------------------

/// The interceptor chain with [`ByeForwarder`] last (application-most), so
/// the other interceptors have seen every RTCP packet first.
pub(super) fn with_bye_forwarder(registry: Registry) -> Registry {
    registry.with(Slot::from(14_000), ByeForwarder::default())
}

/// Marks inbound RTCP BYE packets for the application (webrtc-rs 0.21.1 ends
/// the inbound RTCP path at the end of the chain otherwise). A compound
/// packet holding a BYE is narrowed to its BYEs, so that webrtc-rs routes
/// it by the BYE's SSRC to the client's track, where it arrives as
/// `TrackRemoteEvent::OnRtcpPacket`. Other RTCP passes unmarked.
#[derive(Default)]
pub(super) struct ByeForwarder {
    read_queue: VecDeque<TaggedPacket>,
    write_queue: VecDeque<TaggedPacket>,
}

impl Protocol<TaggedPacket, TaggedPacket, ()> for ByeForwarder {
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = rtc::shared::error::Error;
    type Time = Instant;

    fn handle_read(&mut self, mut msg: TaggedPacket) -> Result<(), Self::Error> {
        if let ChainPacket::Rtcp(packets) = &msg.message.packet {
            let byes: Vec<Box<dyn rtc::rtcp::Packet>> = packets
                .iter()
                .filter(|packet| packet.as_any().is::<Goodbye>())
                .cloned()
                .collect();
            if !byes.is_empty() {
                msg.message.packet = ChainPacket::Rtcp(byes);
                msg.message.add(Attribute::DeliverToApplication);
            }
        }
        self.read_queue.push_back(msg);
        Ok(())
    }

    fn poll_read(&mut self) -> Option<Self::Rout> {
        self.read_queue.pop_front()
    }

    fn handle_write(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        self.write_queue.push_back(msg);
        Ok(())
    }

    fn poll_write(&mut self) -> Option<Self::Wout> {
        self.write_queue.pop_front()
    }
}

impl Interceptor for ByeForwarder {
    fn bind_local_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_local_stream(&mut self, _info: &StreamInfo) {}
    fn bind_remote_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_remote_stream(&mut self, _info: &StreamInfo) {}
}

/// The BYE's sources, when `packets` hold one.
fn bye_sources(packets: &[Box<dyn rtc::rtcp::Packet>]) -> Option<Vec<u32>> {
    let byes: Vec<&Goodbye> = packets
        .iter()
        .filter_map(|packet| packet.as_any().downcast_ref::<Goodbye>())
        .collect();
    (!byes.is_empty()).then(|| byes.iter().flat_map(|bye| bye.sources.clone()).collect())
}

// ---------------------------------------------------------------------------
// Frame assembly
// ---------------------------------------------------------------------------

/// One frame's packets, in sequence order, up to the marker bit.
pub(super) struct AssembledFrame {
    pub rtp_timestamp: u32,
    /// RTP timestamp − the first assembled frame's, mod 2^32 (90 kHz).
    pub pts: u32,
    pub keyframe: bool,
    pub packets: Vec<rtp::Packet>,
}

enum Assembly {
    /// Every packet of the client's first frame is dropped (`live_lose_first_frame`).
    Discarded,
    Pending,
    Complete(AssembledFrame),
    /// A frame given up: a packet missing, or no start of frame.
    Broken(String),
}

/// Groups packets by RTP timestamp as aiortc's jitter buffer does: a frame
/// is complete when a packet with another timestamp arrives; the marker bit
/// is not looked at. So the newest frame waits for the next packet, and the
/// last frame of a stream is never complete unless a packet follows it (the
/// plugin sends a boundary packet after each frame for that reason).
struct Assembler {
    codec: TrackCodec,
    lose_first: bool,
    first_timestamp_seen: Option<u32>,
    first_rtp: Option<u32>,
    current: Option<(u32, Vec<rtp::Packet>)>,
}

impl Assembler {
    fn new(codec: TrackCodec, lose_first: bool) -> Assembler {
        Assembler {
            codec,
            lose_first,
            first_timestamp_seen: None,
            first_rtp: None,
            current: None,
        }
    }

    /// Takes one packet; the outcomes in order.
    fn push(&mut self, packet: rtp::Packet) -> Vec<Assembly> {
        let timestamp = packet.header.timestamp;
        let first_seen = *self.first_timestamp_seen.get_or_insert(timestamp);
        if self.lose_first && timestamp == first_seen {
            return vec![Assembly::Discarded];
        }
        let mut outcomes = Vec::new();
        if self.current.as_ref().is_some_and(|(current, _)| *current != timestamp) {
            let (current, packets) = self.current.take().expect("checked");
            outcomes.push(self.finish(current, packets));
        }
        let (_, packets) = self.current.get_or_insert_with(|| (timestamp, Vec::new()));
        packets.push(packet);
        if packets.len() > MAX_PACKETS_PER_FRAME {
            self.current = None;
            outcomes.push(Assembly::Broken(format!(
                "frame rtp {timestamp}: over {MAX_PACKETS_PER_FRAME} packets, given up"
            )));
        } else {
            outcomes.push(Assembly::Pending);
        }
        outcomes
    }

    fn finish(&mut self, timestamp: u32, mut packets: Vec<rtp::Packet>) -> Assembly {
        let base = packets[0].header.sequence_number;
        packets.sort_by_key(|p| p.header.sequence_number.wrapping_sub(base) as i16);
        let contiguous = packets.windows(2).all(|pair| {
            pair[1].header.sequence_number == pair[0].header.sequence_number.wrapping_add(1)
        });
        if !contiguous {
            return Assembly::Broken(format!("frame rtp {timestamp}: a packet is missing"));
        }
        // Packets that depayload to no bytes add nothing to the frame.
        let codec = self.codec;
        packets.retain(|packet| !depayloads_to_nothing(codec, &packet.payload));
        if packets.is_empty() {
            // aiortc would hand PyAV an empty packet: a flush, after which
            // its decoder decodes nothing more.
            return Assembly::Broken(format!(
                "frame rtp {timestamp}: no data (an empty frame would flush aiortc's decoder)"
            ));
        }
        if !starts_frame(self.codec, &packets[0].payload) {
            return Assembly::Broken(format!(
                "frame rtp {timestamp}: its first packet is missing"
            ));
        }
        let first_rtp = *self.first_rtp.get_or_insert(timestamp);
        Assembly::Complete(AssembledFrame {
            rtp_timestamp: timestamp,
            pts: timestamp.wrapping_sub(first_rtp),
            keyframe: is_keyframe(self.codec, &packets),
            packets,
        })
    }
}

/// aiortc's depayloader returns no bytes for this payload: a VP8 payload
/// descriptor alone, or an H.264 FU-A fragment that neither starts nor
/// carries data.
fn depayloads_to_nothing(codec: TrackCodec, payload: &[u8]) -> bool {
    match codec {
        TrackCodec::Vp8 => vp8_descriptor_len(payload).is_some_and(|len| len >= payload.len()),
        TrackCodec::H264 => {
            payload.len() <= 2 && payload.first().is_some_and(|b| b & 0x1f == 28) && payload.get(1).is_some_and(|fu| fu & 0x80 == 0)
        }
    }
}

/// The length of a VP8 payload descriptor (RFC 7741 §4.2).
fn vp8_descriptor_len(payload: &[u8]) -> Option<usize> {
    let descriptor = *payload.first()?;
    let mut len = 1;
    if descriptor & 0x80 != 0 {
        let extension = *payload.get(1)?;
        len = 2;
        if extension & 0x80 != 0 {
            // PictureID: 15 bits when its M bit is set, else 7.
            len += if payload.get(len)? & 0x80 != 0 { 2 } else { 1 };
        }
        if extension & 0x40 != 0 {
            len += 1;
        }
        if extension & 0x30 != 0 {
            len += 1;
        }
    }
    Some(len)
}

/// The packet starts a frame: VP8 (RFC 7741) S bit with partition 0; H.264
/// (RFC 6184) anything but a FU-A continuation.
fn starts_frame(codec: TrackCodec, payload: &[u8]) -> bool {
    let Some(&first) = payload.first() else {
        return false;
    };
    match codec {
        TrackCodec::Vp8 => first & 0x10 != 0 && first & 0x07 == 0,
        TrackCodec::H264 => first & 0x1f != 28 || payload.get(1).is_some_and(|fu| fu & 0x80 != 0),
    }
}

/// The frame can be decoded on its own: a VP8 key frame (P bit 0 in the
/// frame header after the payload descriptor), or an H.264 IDR slice.
fn is_keyframe(codec: TrackCodec, packets: &[rtp::Packet]) -> bool {
    match codec {
        TrackCodec::Vp8 => packets.first().is_some_and(|p| vp8_keyframe(&p.payload)),
        TrackCodec::H264 => packets.iter().any(|p| h264_has_idr(&p.payload)),
    }
}

fn vp8_keyframe(payload: &[u8]) -> bool {
    vp8_descriptor_len(payload).and_then(|len| payload.get(len)).is_some_and(|header| header & 0x01 == 0)
}

fn h264_has_idr(payload: &[u8]) -> bool {
    const IDR: u8 = 5;
    let Some(&first) = payload.first() else {
        return false;
    };
    match first & 0x1f {
        24 => {
            // STAP-A: [size: u16 BE][NAL unit]...
            let mut offset = 1;
            while offset + 2 < payload.len() {
                let size = usize::from(u16::from_be_bytes([payload[offset], payload[offset + 1]]));
                if payload[offset + 2] & 0x1f == IDR {
                    return true;
                }
                offset += 2 + size;
            }
            false
        }
        28 => payload.get(1).is_some_and(|fu| fu & 0x1f == IDR),
        nal_type => nal_type == IDR,
    }
}

// ---------------------------------------------------------------------------
// Reading the client's track
// ---------------------------------------------------------------------------

/// Reads the client's track until its BYE, the end of its events, or the
/// end of the session; the decoder and the processing run beside it.
pub(super) async fn run_live_track(
    session: Arc<Session>,
    track: Arc<dyn TrackRemote>,
    offer: LiveOffer,
) {
    let Some(codec) = TrackCodec::from_mime(&offer.format.mime_type) else {
        let error = format!("no decoder for {}", offer.format.mime_type);
        session.update(|report| report.live_decode_errors.push(error));
        return;
    };
    let queue = Arc::new(LiveQueue::new(session.realtime));
    let (frames_tx, frames_rx) = std_mpsc::channel::<AssembledFrame>();
    let (pli_tx, mut pli_rx) = mpsc::unbounded_channel::<()>();
    let decoder_session = session.clone();
    let decoder_queue = queue.clone();
    let decoder_pli = pli_tx.clone();
    tokio::task::spawn_blocking(move || {
        run_decoder(
            &decoder_session,
            codec,
            frames_rx,
            &decoder_queue,
            &decoder_pli,
        )
    });
    tokio::spawn(process_live(session.clone(), queue));

    let mut assembler = Assembler::new(codec, session.config.live_lose_first_frame);
    let mut client_ssrc: Option<u32> = None;
    let mut last_pli: Option<Instant> = None;
    loop {
        tokio::select! {
            event = track.poll() => match event {
                None | Some(TrackRemoteEvent::OnEnded) => {
                    session.update(|report| report.live_track_ended = true);
                    break;
                }
                Some(TrackRemoteEvent::OnRtpPacket(packet)) => {
                    let ssrc = *client_ssrc.get_or_insert(packet.header.ssrc);
                    session.update(|report| {
                        report.live_ssrc = Some(ssrc);
                        report.live_packets_received += 1;
                    });
                    for outcome in assembler.push(packet) {
                        match outcome {
                            Assembly::Pending => {}
                            Assembly::Discarded => {
                                session.update(|report| report.live_packets_discarded += 1);
                            }
                            Assembly::Broken(error) => {
                                session.update(|report| report.live_decode_errors.push(error));
                                let _ = pli_tx.send(());
                            }
                            Assembly::Complete(frame) => {
                                session.update(|report| {
                                    report.live_frames_assembled += 1;
                                    report.live_rtp_timestamps.push(frame.rtp_timestamp);
                                    report.live_first_rtp.get_or_insert(frame.rtp_timestamp);
                                });
                                // The decoder thread only goes away with the session.
                                let _ = frames_tx.send(frame);
                            }
                        }
                    }
                }
                Some(TrackRemoteEvent::OnRtcpPacket(packets)) => {
                    let ended = bye_sources(&packets).is_some_and(|sources| {
                        client_ssrc.is_none_or(|ssrc| sources.contains(&ssrc))
                    });
                    if ended {
                        session.update(|report| report.live_bye_received = true);
                        break;
                    }
                }
                Some(_) => {}
            },
            Some(()) = pli_rx.recv() => {
                let due = last_pli.is_none_or(|at| at.elapsed() >= PLI_INTERVAL);
                if let (true, Some(media_ssrc)) = (due, client_ssrc) {
                    last_pli = Some(Instant::now());
                    send_pli(&session, &track, media_ssrc).await;
                }
            }
            _ = session.until_ended() => break,
        }
    }
    // The decoder finishes what it holds, then ends the queue.
    drop(frames_tx);
}

async fn send_pli(session: &Session, track: &Arc<dyn TrackRemote>, media_ssrc: u32) {
    let sender_ssrc = session.track.as_ref().map_or(1, |t| t.ssrc);
    let pli: Box<dyn rtc::rtcp::Packet> = Box::new(PictureLossIndication {
        sender_ssrc,
        media_ssrc,
    });
    let written = tokio::time::timeout(RTCP_WRITE_TIMEOUT, track.write_rtcp(vec![pli])).await;
    match written {
        Ok(Ok(())) => session.update(|report| report.live_plis_sent += 1),
        Ok(Err(err)) => {
            session.update(|report| report.live_decode_errors.push(format!("PLI: {err}")))
        }
        Err(_) => {
            session.update(|report| report.live_decode_errors.push("PLI write timed out".into()))
        }
    }
}

// ---------------------------------------------------------------------------
// Decoding
// ---------------------------------------------------------------------------

/// One decoded picture of the client's track.
pub(super) struct LiveDecoded {
    rtp_timestamp: u32,
    pts: u32,
    /// RGB, copied out of the decoder's pool.
    sample: gst::Sample,
}

/// Which frame a decoded picture is: the buffer pts (ns) the decoder keeps
/// → (RTP timestamp, pts in ticks).
type PtsMap = Arc<Mutex<BTreeMap<u64, (u32, u32)>>>;

/// `appsrc` (RTP) → depayloader → decoder → RGB `appsink`, whose pictures
/// go to the queue from the streaming thread.
struct LiveDecoder {
    pipeline: gst::Pipeline,
    source: gst_app::AppSrc,
    bus: gst::Bus,
    pts_map: PtsMap,
}

impl LiveDecoder {
    fn new(
        session: &Arc<Session>,
        codec: TrackCodec,
        payload_type: u8,
        queue: &Arc<LiveQueue>,
    ) -> Result<LiveDecoder, String> {
        gst::init().map_err(|e| e.to_string())?;
        let (encoding, decode) = match codec {
            TrackCodec::Vp8 => ("VP8", "rtpvp8depay ! vp8dec"),
            // One thread: frame threading would hold pictures back until the end.
            TrackCodec::H264 => (
                "H264",
                "rtph264depay ! h264parse ! avdec_h264 max-threads=1",
            ),
        };
        let description = format!(
            "appsrc name=src format=time ! {decode} ! videoconvert ! video/x-raw,format=RGB \
             ! appsink name=sink sync=false"
        );
        let pipeline = gst::parse::launch(&description)
            .map_err(|e| format!("live decoder '{description}': {e}"))?
            .downcast::<gst::Pipeline>()
            .map_err(|_| "live decoder is not a pipeline".to_owned())?;
        let source = pipeline
            .by_name("src")
            .and_then(|e| e.downcast::<gst_app::AppSrc>().ok())
            .ok_or("live decoder has no appsrc")?;
        let sink = pipeline
            .by_name("sink")
            .and_then(|e| e.downcast::<gst_app::AppSink>().ok())
            .ok_or("live decoder has no appsink")?;
        source.set_caps(Some(
            &gst::Caps::builder("application/x-rtp")
                .field("media", "video")
                .field("clock-rate", VIDEO_CLOCK_RATE as i32)
                .field("encoding-name", encoding)
                .field("payload", i32::from(payload_type))
                .build(),
        ));
        let pts_map: PtsMap = Arc::default();
        let callback_session = session.clone();
        let callback_queue = queue.clone();
        let callback_map = pts_map.clone();
        sink.set_callbacks(
            gst_app::AppSinkCallbacks::builder()
                .new_sample(move |sink| {
                    let sample = sink.pull_sample().map_err(|_| gst::FlowError::Eos)?;
                    deliver_picture(&callback_session, &callback_queue, &callback_map, &sample);
                    Ok(gst::FlowSuccess::Ok)
                })
                .build(),
        );
        let bus = pipeline.bus().ok_or("live decoder has no bus")?;
        pipeline
            .set_state(gst::State::Playing)
            .map_err(|e| format!("live decoder does not start: {e}"))?;
        Ok(LiveDecoder {
            pipeline,
            source,
            bus,
            pts_map,
        })
    }

    /// Pushes the frame's packets, all stamped with its pts.
    fn push(&self, frame: &AssembledFrame) -> Result<(), String> {
        let pts_ns = u64::from(frame.pts) * 1_000_000_000 / u64::from(VIDEO_CLOCK_RATE);
        self.pts_map
            .lock()
            .unwrap()
            .insert(pts_ns, (frame.rtp_timestamp, frame.pts));
        for packet in &frame.packets {
            let bytes = packet.marshal().map_err(|e| format!("RTP marshal: {e}"))?;
            let mut buffer = gst::Buffer::from_mut_slice(bytes.to_vec());
            buffer
                .get_mut()
                .expect("a fresh buffer")
                .set_pts(gst::ClockTime::from_nseconds(pts_ns));
            self.source
                .push_buffer(buffer)
                .map_err(|e| format!("live decoder push: {e}"))?;
        }
        Ok(())
    }

    /// The decoder's first error since the last call, if any.
    fn error(&self) -> Option<String> {
        error_text(&self.bus.pop_filtered(&[gst::MessageType::Error])?)
    }

    /// Drains the decoder (every picture it holds goes out), bounded;
    /// returns its error, if it ended with one.
    fn finish(self) -> Option<String> {
        self.source.end_of_stream().ok()?;
        let message = self.bus.timed_pop_filtered(
            gst::ClockTime::from_nseconds(DECODER_DRAIN_TIMEOUT.as_nanos() as u64),
            &[gst::MessageType::Eos, gst::MessageType::Error],
        );
        match message {
            Some(message) => error_text(&message),
            None => Some(format!(
                "the decoder did not drain within {DECODER_DRAIN_TIMEOUT:?}"
            )),
        }
    }
}

fn error_text(message: &gst::Message) -> Option<String> {
    match message.view() {
        gst::MessageView::Error(error) => Some(format!(
            "decoder error: {} ({})",
            error.error(),
            error.debug().unwrap_or_default()
        )),
        _ => None,
    }
}

impl Drop for LiveDecoder {
    fn drop(&mut self) {
        let _ = self.pipeline.set_state(gst::State::Null);
    }
}

/// Streaming thread: a picture out of the decoder goes to the queue, with
/// the RTP timestamp of the frame it came from.
fn deliver_picture(session: &Session, queue: &LiveQueue, pts_map: &PtsMap, sample: &gst::Sample) {
    let Some(buffer) = sample.buffer() else {
        return;
    };
    let Some(pts_ns) = buffer.pts().map(|pts| pts.nseconds()) else {
        session.update(|report| report.live_decode_errors.push("picture without pts".into()));
        return;
    };
    let Some((rtp_timestamp, pts)) = pts_map.lock().unwrap().remove(&pts_ns) else {
        let error = format!("picture with pts {pts_ns} ns matches no frame fed");
        session.update(|report| report.live_decode_errors.push(error));
        return;
    };
    // A copy, so the pictures waiting in the queue hold no decoder buffers.
    let Ok(copy) = buffer.copy_deep() else {
        return;
    };
    let caps = sample.caps().map(|caps| caps.to_owned());
    let mut builder = gst::Sample::builder().buffer(&copy);
    if let Some(caps) = &caps {
        builder = builder.caps(caps);
    }
    let decoded = {
        let mut report = session.report.lock().unwrap();
        report.live_frames_decoded += 1;
        let skipped = session.realtime
            && session
                .config
                .realtime_drop_every
                .is_some_and(|n| n > 0 && report.live_frames_decoded.is_multiple_of(n));
        if skipped {
            report.realtime_frames_dropped += 1;
        }
        !skipped
    };
    if decoded {
        let dropped = queue.push(LiveDecoded {
            rtp_timestamp,
            pts,
            sample: builder.build(),
        });
        if dropped > 0 {
            session.update(|report| report.live_frames_dropped_realtime += dropped);
        }
    }
}

/// The decoder thread: feeds frames in order until the track ends (its
/// sender is dropped) or the session ends, then drains and ends the queue.
fn run_decoder(
    session: &Arc<Session>,
    codec: TrackCodec,
    frames: std_mpsc::Receiver<AssembledFrame>,
    queue: &Arc<LiveQueue>,
    pli: &mpsc::UnboundedSender<()>,
) {
    let mut decoder: Option<LiveDecoder> = None;
    let error = |text: String| session.update(|report| report.live_decode_errors.push(text));
    loop {
        let frame = match frames.recv_timeout(DECODER_POLL) {
            Ok(frame) => frame,
            Err(std_mpsc::RecvTimeoutError::Timeout) if session.is_ended() => break,
            Err(std_mpsc::RecvTimeoutError::Timeout) => continue,
            Err(std_mpsc::RecvTimeoutError::Disconnected) => break,
        };
        // Without a keyframe since the decoder (re)started, the frame
        // cannot be decoded: skip it and ask for a keyframe.
        if decoder.is_none() && !frame.keyframe {
            session.update(|report| {
                report.live_frames_skipped += 1;
                report.live_decode_errors.push(format!(
                    "frame rtp {}: not decodable without a keyframe, skipped (PLI)",
                    frame.rtp_timestamp
                ));
            });
            let _ = pli.send(());
            continue;
        }
        if decoder.is_none() {
            let payload_type = frame.packets[0].header.payload_type;
            match LiveDecoder::new(session, codec, payload_type, queue) {
                Ok(started) => decoder = Some(started),
                Err(err) => {
                    error(err);
                    continue;
                }
            }
        }
        let Some(active) = &decoder else { continue };
        let failure = active.push(&frame).err().or_else(|| active.error());
        if let Some(failure) = failure {
            // A fresh decoder, from the next keyframe on.
            error(format!("frame rtp {}: {failure}", frame.rtp_timestamp));
            decoder = None;
            let _ = pli.send(());
        }
    }
    if let Some(failure) = decoder.take().and_then(LiveDecoder::finish) {
        error(failure);
    }
    let dropped = queue.end();
    if dropped > 0 {
        session.update(|report| report.live_frames_dropped_realtime += dropped);
    }
}

// ---------------------------------------------------------------------------
// The queue between decoder and Workflow
// ---------------------------------------------------------------------------

/// Decoded pictures waiting for the Workflow. Without realtime processing
/// every picture waits, in order, without bound (aiortc's buffered relay);
/// with it only the newest waits (its unbuffered relay), and the end of the
/// track replaces a picture still waiting, as aiortc's relay hands on the
/// end in the same slot.
pub(super) struct LiveQueue {
    realtime: bool,
    state: Mutex<QueueState>,
    changed: Notify,
}

#[derive(Default)]
struct QueueState {
    pictures: VecDeque<LiveDecoded>,
    ended: bool,
}

impl LiveQueue {
    fn new(realtime: bool) -> LiveQueue {
        LiveQueue {
            realtime,
            state: Mutex::default(),
            changed: Notify::new(),
        }
    }

    /// Adds a picture; returns how many waiting ones it replaced (realtime).
    fn push(&self, picture: LiveDecoded) -> u32 {
        let mut state = self.state.lock().unwrap();
        let dropped = if self.realtime {
            let dropped = state.pictures.len() as u32;
            state.pictures.clear();
            dropped
        } else {
            0
        };
        state.pictures.push_back(picture);
        drop(state);
        self.changed.notify_one();
        dropped
    }

    /// No more pictures; returns how many waiting ones it dropped (realtime).
    fn end(&self) -> u32 {
        let mut state = self.state.lock().unwrap();
        state.ended = true;
        let dropped = if self.realtime {
            let dropped = state.pictures.len() as u32;
            state.pictures.clear();
            dropped
        } else {
            0
        };
        drop(state);
        self.changed.notify_one();
        dropped
    }

    /// The next picture, or `None` once the queue has ended and is empty.
    async fn pop(&self) -> Option<LiveDecoded> {
        loop {
            let changed = self.changed.notified();
            {
                let mut state = self.state.lock().unwrap();
                if let Some(picture) = state.pictures.pop_front() {
                    return Some(picture);
                }
                if state.ended {
                    return None;
                }
            }
            changed.await;
        }
    }
}

// ---------------------------------------------------------------------------
// The Workflow
// ---------------------------------------------------------------------------

/// Processes pictures one at a time, then sends `processing_complete` once
/// the queue ends, and leaves the session open: the client closes (§10).
async fn process_live(session: Arc<Session>, queue: Arc<LiveQueue>) {
    let mut last_frame_id = 0u32;
    let mut jpeg: Option<JpegEncoder> = None;
    let mut encoder: Option<RtpEncoder> = None;
    loop {
        let picture = tokio::select! {
            picture = queue.pop() => picture,
            _ = session.until_ended() => return,
        };
        let Some(picture) = picture else { break };
        if !session.config.live_process_delay.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep(session.config.live_process_delay) => {}
                _ = session.until_ended() => return,
            }
        }
        let frame_id = last_frame_id + 1;
        last_frame_id = frame_id;
        let mut frame: DecodedFrame = match super::summarize_sample(&session, picture.sample, &mut jpeg).await {
            Ok(frame) => frame,
            Err(err) => {
                let error = format!("frame {frame_id}: {err}");
                session.update(|report| report.live_decode_errors.push(error));
                continue;
            }
        };
        frame.pts_ns = None;
        frame.fps = session.declared_fps;
        frame.stream_pts = Some((u64::from(picture.pts), (1, VIDEO_CLOCK_RATE)));
        session.update(|report| {
            report.live_frames_processed += 1;
            report.live_processed_rtp.push(picture.rtp_timestamp);
            report.live_colors.push(frame.mean_rgb);
        });
        let Some(control) = wait_for_control_channel(&session).await else {
            continue;
        };
        if !deliver_result(&session, &control, frame_id, &mut frame, &mut encoder).await {
            return;
        }
    }
    if let Some(encoder) = encoder.take() {
        let _ = tokio::task::spawn_blocking(move || drop(encoder)).await;
    }
    if let Some(jpeg) = jpeg.take() {
        let _ = tokio::task::spawn_blocking(move || drop(jpeg)).await;
    }
    if session.config.has(|f| matches!(f, Fault::NeverComplete)) {
        return;
    }
    send_processing_complete(&session, last_frame_id).await;
}

/// The `inference` channel, waiting a little for the worker to learn of it.
async fn wait_for_control_channel(
    session: &Session,
) -> Option<Arc<dyn webrtc::data_channel::DataChannel>> {
    let deadline = Instant::now() + CONTROL_CHANNEL_WAIT;
    loop {
        if let Some(control) = session.control_channel() {
            return Some(control);
        }
        if Instant::now() >= deadline || session.is_ended() {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
