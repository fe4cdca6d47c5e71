//! In-repo test worker: the server side of the Roboflow Inference Server's
//! WebRTC worker protocol (video file upload), re-implemented for the plugin's
//! integration tests, with fault injection.
//!
//! `/work/shared/PROTOCOL.md` is the authority; section numbers below refer
//! to it. The worker owns its own tokio runtime on a background thread, so
//! tests stay plain `#[test]` functions and never share a runtime with the
//! plugin. Everything binds to 127.0.0.1 and every wait is bounded.
//!
//! What a session does, in order: answer the POST (non-trickle, ICE fully
//! gathered), treat the channel labelled `video_upload` as the upload channel
//! and any other channel as the control channel, reassemble the upload,
//! decode it with GStreamer, send one result per frame on the control channel
//! (paced by `{"ack": N}` in batch mode), send `processing_complete` once, and
//! close the peer connection a little later.
//!
//! Video-track mode (§6): when the offer can receive video and `stream_output`
//! is null or non-empty, the answer carries an outgoing VP8 or H.264 track.
//! Each frame's JSON is sent first, then the frame (inverted, see
//! [`inverted_frame`]) is encoded and its RTP packets are written with the
//! timestamp origin + pts at 90 kHz.
//!
//! Live video in (§10): when the offer's video section carries a track the
//! client sends on, the worker reads that track instead of an upload (see
//! the `live` module, `live_track.rs`): it assembles, decodes and processes
//! the client's frames, reports `pts` = RTP timestamp − the first assembled
//! frame's, and sends `processing_complete` once the client's RTCP BYE
//! arrives, then waits for the client to close.
//!
//! Server-pull sources (§11): when the request names an `rtsp_url` or an
//! `mjpeg_url`, the worker reads that camera itself (see the `pull` module,
//! `pull_source.rs`): it opens the source before answering where the server
//! does, processes its frames, sends the results as in the other modes
//! (and the frames on a returned track), and `processing_complete` at the
//! end of the stream.
//!
//! [`WorkerConfig`] holds two kinds of deviation from the plain case: knobs
//! for things the real server does too (results spanning chunks, per-frame
//! `errors`, realtime drops, another time base, a lost first track frame),
//! and [`Fault`]s, which a correct server never does.

#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::io::{IoSliceMut, Write as _};
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use bytes::BytesMut;
use flate2::{Compress, Compression, FlushCompress};
use gst_video::prelude::*;
use rtc::ice::mdns::MulticastDnsMode;
use rtc::interceptor::{Interceptor, Packet as ChainPacket, Slot, StreamInfo, TaggedPacket};
use rtc::rtcp::payload_feedbacks::full_intra_request::FullIntraRequest;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::sansio::Protocol;
use rtc::media_stream::MediaStreamTrack;
use rtc::rtp_transceiver::RTCRtpTransceiverDirection;
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodec, RTCRtpCodecParameters, RTCRtpCodingParameters, RTCRtpEncodingParameters,
    RtpCodecKind,
};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch};
use webrtc::data_channel::{DataChannel, DataChannelEvent};
use webrtc::media_stream::track_local::TrackLocal;
use webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP;
use webrtc::peer_connection::{
    MediaEngine, PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler,
    RTCConfigurationBuilder, RTCIceGatheringState, RTCPeerConnectionState, RTCSessionDescription,
    Registry, SettingEngineBuilder, register_default_interceptors,
};
use webrtc::runtime::{
    AsyncInterval, AsyncTcpListener, AsyncTcpStream, AsyncUdpSocket, JoinHandle, RecvMeta, Runtime,
    TokioRuntime, Transmit,
};

use super::video_track::{
    DEFAULT_KEYFRAME_INTERVAL, OfferedCodec, RtpEncoder, VIDEO_CLOCK_RATE, choose_track_codec, inverted_frame,
    live_track_format, random_u32, stamp_frame, video_section,
};
#[allow(unused_imports)]
pub use super::video_track::{STAMP_ROWS, TrackCodec, frame_id_from_stamp, stamp_level};
use webrtc::media_stream::track_remote::TrackRemote;

#[path = "live_track.rs"]
mod live;
#[path = "pull_source.rs"]
mod pull;

// ---------------------------------------------------------------------------
// Public API
// ---------------------------------------------------------------------------

/// How the worker behaves. `Default` is the faithful server without faults.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    pub faults: Vec<Fault>,
    /// A slow server: the worker takes this long to read each 48 KiB upload
    /// chunk. Implemented below the SCTP stack (see [`ThrottledSocket`]) so the
    /// client really feels it: its sends are acknowledged at that pace, its
    /// buffered amount rises and its `send` waits. Sleeping in the channel's
    /// reader would not: webrtc-rs queues 256 messages per channel (12 MiB of
    /// chunks) before it stops acknowledging.
    pub upload_read_delay: Option<Duration>,
    /// Largest result chunk payload, 48 KiB like the server (§5).
    pub result_chunk_size: usize,
    /// Only produce results for the first N frames.
    pub max_frames: Option<u32>,
    /// The returned track's codec when the offer has it; else the other one (§6).
    pub track_codec: TrackCodec,
    /// Never hand every Nth frame (frame_id % N == 0) to the track's encoder,
    /// as aiortc does under load: its JSON is sent, no RTP follows, and the
    /// sequence numbers stay contiguous.
    pub track_drop_every: Option<u32>,
    /// A fixed RTP timestamp origin instead of a random one, e.g. just below
    /// `u32::MAX` to make the timestamps wrap.
    pub track_rtp_origin: Option<u32>,
    /// The least time from sending a frame's JSON to writing its first RTP
    /// packet: the server's encoder takes milliseconds, so its JSON normally
    /// arrives first. Measured on loopback with 320x240 frames (encoded in
    /// about 1 ms), 30-frame sessions: with zero, the plugin left 0-3 frames
    /// unpaired per session (their RTP won); with 5 ms, none in 12 sessions.
    /// Zero is the way to test that race.
    pub track_encode_latency: Duration,
    /// In track transport, the least time from a frame's last RTP packet to
    /// the next frame's JSON. The real server takes tens of milliseconds per
    /// frame (about 8 frames/s here), so a frame's RTP reaches the client
    /// long before the next frame's JSON; a worker with no gap lets the
    /// client's scheduling reorder the two, which no real session shows.
    pub track_frame_gap: Duration,
    /// Pads every frame's result with a `padding` text of this many bytes
    /// inside `serialized_output_data` (an object holding only it when the
    /// result would have none), so that results cross 48 KiB chunk
    /// boundaries (§5). The text is [`padding_text`] of the frame id, so a
    /// test can check that it arrived whole; it is base64-alphabet noise,
    /// which gzip (data outputs requested) shrinks to about 3/4. 0: none.
    pub result_padding: usize,
    /// Per-frame workflow errors (§5 `errors`): every frame whose id is a
    /// multiple of N carries `[text]`, the others `[]`, as the server
    /// reports a block that fails on some frames only.
    pub frame_errors: Option<(u32, String)>,
    /// Realtime processing (`webrtc_realtime_processing` true) only: every
    /// Nth decoded frame is skipped, as the server drops the frames that
    /// arrive while it is busy. A skipped frame is never processed: no
    /// result, no RTP, and `frame_id` (the server's count of processed
    /// frames) stays contiguous while `pts` keeps the gap. Applies to a live
    /// track too (every Nth decoded picture, deterministically, on top of
    /// the drops `live_process_delay` causes).
    pub realtime_drop_every: Option<u32>,
    /// `video_metadata.time_base` as (num, den) seconds per pts unit; `pts`
    /// is the frame's time in those units, rounded (PyAV reports the
    /// stream's own time base, e.g. 1/15360 for FFmpeg's MP4s). The track's
    /// RTP timestamps are converted from that pts, as aiortc does.
    pub time_base: (u32, u32),
    /// Track transport: frame 1's JSON is sent but the frame never reaches
    /// the encoder, like aiortc's encoder dropping the first frame; the
    /// track starts with frame 2 (a keyframe).
    pub track_lose_first_frame: bool,
    /// Track transport: these RTP packets of the returned track (1-based,
    /// counting first transmissions only) are lost on the wire after the
    /// NACK responder kept them, so a NACK can still have them resent.
    pub track_lose_packets: Vec<u32>,
    /// With `track_lose_packets`: every retransmission is lost too, so the
    /// loss is for good and only a keyframe (asked for with a PLI, which the
    /// worker answers as aiortc does) repairs the picture.
    pub track_lose_retransmissions: bool,
    /// With `track_lose_packets`: every retransmission leaves this much
    /// later (a server far away: the NACK's round trip).
    pub track_retransmission_delay: Duration,
    /// Track transport: frames between the encoder's own keyframes (30).
    pub track_keyframe_interval: u32,
    /// Track transport: the first N keyframe requests (PLI, FIR) are counted
    /// but bring no keyframe, as if each request or its keyframe were lost.
    pub track_ignore_keyframe_requests: u32,
    /// Track transport: paints the top [`STAMP_ROWS`] rows of each returned
    /// image with [`stamp_level`] of its frame id, so a test can tell which
    /// frame a decoded picture is, whatever the plugin paired it with.
    pub track_stamp_frame_id: bool,
    /// Live video in (§10): how long the Workflow takes per frame, slept
    /// before each frame's result. With realtime processing, frames that
    /// arrive meanwhile replace each other (only the newest waits); without
    /// it they queue up without bound, as on the real server.
    pub live_process_delay: Duration,
    /// Live video in: every packet of the client's first frame (the first
    /// RTP timestamp seen) is discarded, as if lost on the way, so the first
    /// assembled frame, and `pts` 0, is the client's second. Frames that need
    /// the lost one cannot be decoded: they are skipped and a PLI asks the
    /// client for a keyframe (aiortc does the same), see the `live` module.
    pub live_lose_first_frame: bool,
    /// Server-pull MJPEG (§11): the server's
    /// `WEBRTC_MJPEG_ALLOW_NON_GLOBAL_ADDRESSES`. False, like the server:
    /// an `mjpeg_url` on loopback, a private network or `localhost` is
    /// refused (HTTP 500). Test cameras run on 127.0.0.1, so tests that read
    /// one set this.
    pub mjpeg_allow_non_global_addresses: bool,
    /// Server-pull RTSP: the least time opening an RTSP source takes.
    /// FFmpeg probes the stream before `av.open` returns: 1.9-2.0 s here
    /// against the test camera (15 fps, a keyframe a second). A realtime
    /// session answers only then; the pictures read meanwhile wait in the
    /// queue. Without realtime processing the reader fails only then, so
    /// the client's `inference` channel is normally open by that time.
    pub rtsp_open_time: Duration,
    /// Detections outputs (PROTOCOL.md §12): a requested data output for
    /// which this gives a value (by output name and frame id) carries that
    /// value, e.g. `{"image": {...}, "predictions": [...]}`, in place of
    /// the dominant colour.
    pub detections: Option<fn(&str, u32) -> Option<Value>>,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            faults: Vec::new(),
            upload_read_delay: None,
            result_chunk_size: REFERENCE_CHUNK_SIZE,
            max_frames: None,
            track_codec: TrackCodec::default(),
            track_drop_every: None,
            track_rtp_origin: None,
            track_encode_latency: DEFAULT_TRACK_ENCODE_LATENCY,
            track_frame_gap: DEFAULT_TRACK_FRAME_GAP,
            result_padding: 0,
            frame_errors: None,
            realtime_drop_every: None,
            time_base: (1, PTS_CLOCK_RATE as u32),
            track_lose_first_frame: false,
            track_lose_packets: Vec::new(),
            track_lose_retransmissions: false,
            track_retransmission_delay: Duration::ZERO,
            track_keyframe_interval: DEFAULT_KEYFRAME_INTERVAL,
            track_ignore_keyframe_requests: 0,
            track_stamp_frame_id: false,
            live_process_delay: Duration::ZERO,
            live_lose_first_frame: false,
            mjpeg_allow_non_global_addresses: false,
            rtsp_open_time: DEFAULT_RTSP_OPEN_TIME,
            detections: None,
        }
    }
}

impl WorkerConfig {
    pub fn with_fault(mut self, fault: Fault) -> Self {
        self.faults.push(fault);
        self
    }

    fn has(&self, wanted: impl Fn(&Fault) -> bool) -> bool {
        self.faults.iter().any(wanted)
    }

    fn find<T>(&self, pick: impl Fn(&Fault) -> Option<T>) -> Option<T> {
        self.faults.iter().find_map(pick)
    }
}

/// A deliberate deviation from the faithful server.
#[derive(Clone, Debug)]
pub enum Fault {
    /// Answer the POST with this instead of an SDP answer.
    HttpError {
        status: u16,
        content_type: &'static str,
        body: String,
    },
    /// 200 with an answer whose `sdp` is garbage.
    MalformedSdp,
    /// 200 with a valid answer whose candidates point at a closed port.
    NeverConnect,
    /// Sleep before answering (the real server takes about 10 s).
    DelayAnswer(Duration),
    /// Close the `video_upload` channel after this many chunk messages.
    CloseUploadAfterChunks(u32),
    /// Close the peer connection once this many results are sent and
    /// acknowledged by SCTP (so the client holds exactly that many).
    DropPeerAfterFrames(u32),
    /// Never send `processing_complete` and never close the session (it
    /// still ends when the client closes the control channel).
    NeverComplete,
    /// Count keepalives but do not echo them.
    NoKeepaliveEcho,
    /// First result: `total_chunks` is 0 in its headers.
    ResultTotalChunksZero,
    /// First result: `total_chunks` is `u32::MAX` in its headers.
    ResultTotalChunksHuge,
    /// First result: sent as at least two chunks whose `total_chunks` differ.
    ResultTotalChunksChanging,
    /// First result: a gzip stream that inflates to 1 GiB of zeros (~1 MB on the wire).
    GzipBomb,
    /// First result: the payload is not JSON.
    InvalidJson,
    /// First result: padded to this many bytes on the wire (and as JSON).
    OversizeFrame(usize),
    /// Behave as if FFmpeg could not read the file: zero frames, then `processing_complete`.
    DecodeNothing,
    /// After this many results (delivered), the worker dies as a process
    /// does under `kill -9`: no close, no SCTP abort, no DTLS alert; its
    /// socket goes silent (nothing sent, everything received dropped).
    GoSilentAfterFrames(u32),
}

/// What the worker saw and did in one session: one per POST answered with
/// HTTP 200 (so also for the `MalformedSdp` and `NeverConnect` faults).
#[derive(Clone, Debug, Default)]
pub struct SessionReport {
    pub request: Value,
    pub authorization: Option<String>,
    pub channels: Vec<String>,
    pub total_chunks: Option<u32>,
    pub chunks_received: u32,
    pub duplicate_chunks: u32,
    pub header_errors: Vec<String>,
    pub max_chunk_message_len: usize,
    pub upload_complete: bool,
    pub upload_bytes: u64,
    pub upload_sha256: Option<String>,
    pub keepalives_received: u32,
    pub keepalives_echoed: u32,
    pub frames_decoded: u32,
    pub results_sent: u32,
    pub processing_complete_sent: bool,
    pub acks: Vec<u64>,
    pub control_messages: Vec<String>,
    pub closed: bool,
    /// The returned track's codec, e.g. `video/VP8`; `None` when no track was added.
    pub track_codec: Option<String>,
    /// The payload type its packets carry (the one in the answer).
    pub track_payload_type: Option<u8>,
    pub track_ssrc: Option<u32>,
    /// RTP timestamp of pts 0: a frame's timestamp is this + pts at 90 kHz, mod 2^32.
    pub rtp_origin: Option<u32>,
    /// Frames whose RTP was written, up to and including the marker-bit packet.
    pub track_frames_sent: u32,
    pub track_packets_sent: u32,
    /// `track_lose_packets`: packets lost on the wire (first transmissions).
    pub track_packets_lost: u32,
    /// Retransmissions of the returned track's packets seen on the wire (RTX
    /// or the same sequence number again), lost or not.
    pub track_retransmissions: u32,
    /// Keyframe requests (PLI, FIR) from the client for the returned track;
    /// each makes the next frame a keyframe.
    pub track_keyframe_requests: u32,
    /// Frames not handed to the encoder (`track_drop_every`).
    pub track_frames_dropped: u32,
    /// Encoder or write failures; the session goes on without that frame's RTP.
    pub track_errors: Vec<String>,
    /// Every frame result sent (not `processing_complete`), in sending order.
    pub results: Vec<SentResult>,
    /// Decoded frames skipped by `realtime_drop_every`.
    pub realtime_frames_dropped: u32,
    /// Frame ids whose RTP was written completely, in order.
    pub track_frame_ids: Vec<u32>,

    // Live video in (§10): the client's track. Zero/empty/`None` in file mode.
    /// The format the client's track was offered in, e.g. `video/VP8`.
    pub live_track_codec: Option<String>,
    /// Its `a=fmtp` parameters (empty for VP8).
    pub live_track_fmtp: Option<String>,
    /// The offer's video direction (`sendrecv` or `sendonly`) for a live offer.
    pub live_offer_direction: Option<String>,
    /// The answer's video direction: `sendrecv` with a returned track, else `recvonly`.
    pub live_answer_direction: Option<String>,
    /// The client's SSRC, from its first RTP packet.
    pub live_ssrc: Option<u32>,
    /// RTP packets received on the client's track, and those discarded by
    /// `live_lose_first_frame` (counted in both).
    pub live_packets_received: u32,
    pub live_packets_discarded: u32,
    /// Complete frames (every packet up to the marker bit) assembled.
    pub live_frames_assembled: u32,
    /// RTP timestamps of the assembled frames, in order.
    pub live_rtp_timestamps: Vec<u32>,
    /// RTP timestamp of the first assembled frame: `pts` is counted from it.
    pub live_first_rtp: Option<u32>,
    /// Assembled frames not handed to the decoder: no keyframe since the
    /// decoder started (or restarted after an error).
    pub live_frames_skipped: u32,
    /// Pictures out of the decoder.
    pub live_frames_decoded: u32,
    /// Decoded frames processed: each got a result (its `frame_id` is this count).
    pub live_frames_processed: u32,
    /// Realtime only: decoded frames replaced by a newer one while waiting,
    /// or still waiting when the track ended. Never processed.
    pub live_frames_dropped_realtime: u32,
    /// RTP timestamps of the processed frames, in order.
    pub live_processed_rtp: Vec<u32>,
    /// Mean RGB of each processed frame, in order (what `rgb_color` reports).
    pub live_colors: Vec<[u8; 3]>,
    /// Picture loss indications sent to the client.
    pub live_plis_sent: u32,
    /// An RTCP BYE for the client's SSRC arrived.
    pub live_bye_received: bool,
    /// The track ended without a BYE (webrtc-rs `OnEnded`, or its events stopped).
    pub live_track_ended: bool,
    /// Frames dropped as incomplete, skipped, or refused by the decoder, and
    /// decoder errors, as text.
    pub live_decode_errors: Vec<String>,

    // Server-pull sources (§11). Zero/empty/`None` in the other modes.
    /// `rtsp` or `mjpeg`.
    pub pull_kind: Option<String>,
    /// The URL as the request gave it.
    pub pull_url: Option<String>,
    /// When processing starts: `data_only` (at once), `on_connected` (the
    /// returned track's sender pulls frames), or `never` (a track was asked
    /// for but the offer receives no video: the sender never starts).
    pub pull_start: Option<String>,
    /// The source was opened (its first picture decoded).
    pub pull_opened: bool,
    /// Pictures the reader handed on (queued), all but RTSP's first.
    pub pull_frames_read: u32,
    /// RTSP: FFmpeg's first decoded frame has no pts; the server skips it
    /// (realtime) or fails on it (non-realtime). 0 or 1.
    pub pull_frames_without_pts: u32,
    /// Frames processed: `frame_id` counts them.
    pub pull_frames_processed: u32,
    /// Processed while the `inference` channel was not open: no result sent.
    pub pull_results_lost_before_channel: u32,
    /// Realtime: dropped from the queue (the oldest beyond 30).
    pub pull_frames_dropped_realtime: u32,
    /// Still queued when processing stopped (the client left, the timeout).
    pub pull_frames_waiting_at_end: u32,
    /// `pts` of each processed frame, in `pull_time_base` units: 90 kHz for
    /// RTSP, pictures (1/25 s) for MJPEG.
    pub pull_processed_pts: Vec<u64>,
    pub pull_time_base: Option<(u32, u32)>,
    /// Mean RGB of each processed frame, in order.
    pub pull_colors: Vec<[u8; 3]>,
    /// The source pipeline was torn down (NULL) within its bound.
    pub pull_source_stopped: bool,
    /// Read errors, the reason nothing was processed, a `processing_complete`
    /// that could not be sent, as text.
    pub pull_errors: Vec<String>,
}

/// One frame result as the worker sent it.
#[derive(Clone, Debug, PartialEq)]
pub struct SentResult {
    pub frame_id: u32,
    /// In units of `time_base`.
    pub pts: u64,
    /// `time_base` as (num, den).
    pub time_base: (u32, u32),
    /// Chunk messages the result took.
    pub chunks: u32,
    pub errors: Vec<String>,
}

impl SentResult {
    /// pts × time_base, in ns, rounded.
    pub fn pts_ns(&self) -> u64 {
        let (num, den) = self.time_base;
        ((u128::from(self.pts) * u128::from(num) * 1_000_000_000 + u128::from(den) / 2)
            / u128::from(den)) as u64
    }
}

/// One POST to `/initialise_webrtc_worker`, whatever its outcome.
#[derive(Clone, Debug)]
pub struct RequestRecord {
    /// The body parsed as JSON, or `Value::Null` when it was not JSON.
    pub body: Value,
    pub authorization: Option<String>,
    pub status: u16,
}

pub struct TestWorker {
    url: String,
    shared: Arc<Shared>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    stopped: std::sync::mpsc::Receiver<()>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TestWorker {
    /// Starts the HTTP server on 127.0.0.1 (ephemeral port) with its own runtime.
    pub fn start(config: WorkerConfig) -> TestWorker {
        let shared = Arc::new(Shared {
            config,
            silenced: Arc::new(AtomicBool::new(false)),
            sessions: Mutex::new(Vec::new()),
            requests: Mutex::new(Vec::new()),
        });
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<SocketAddr, String>>();
        let (shutdown_tx, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
        let (stopped_tx, stopped_rx) = std::sync::mpsc::channel::<()>();
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("test-worker".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .thread_name("test-worker-rt")
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(err) => {
                        let _ = ready_tx.send(Err(format!("tokio runtime: {err}")));
                        return;
                    }
                };
                runtime.block_on(serve(thread_shared, ready_tx, shutdown_rx));
                runtime.shutdown_timeout(Duration::from_secs(2));
                let _ = stopped_tx.send(());
            })
            .expect("spawn the test worker thread");
        let addr = match ready_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(addr)) => addr,
            Ok(Err(err)) => panic!("test worker failed to start: {err}"),
            Err(err) => panic!("test worker did not start within 10 s: {err}"),
        };
        TestWorker {
            url: format!("http://{addr}"),
            shared,
            shutdown: Some(shutdown_tx),
            stopped: stopped_rx,
            thread: Some(thread),
        }
    }

    /// Base URL, e.g. `http://127.0.0.1:41234`.
    pub fn url(&self) -> String {
        self.url.clone()
    }

    pub fn sessions(&self) -> Vec<SessionReport> {
        self.shared.snapshot()
    }

    /// Every POST received, including refused ones, in arrival order.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.shared.requests.lock().unwrap().clone()
    }

    /// Waits (bounded) until at least `n` sessions exist; returns the snapshot either way.
    pub fn wait_for_sessions(&self, n: usize, timeout: Duration) -> Vec<SessionReport> {
        self.wait_until(timeout, |sessions| sessions.len() >= n)
    }

    /// Waits (bounded) until `done` holds for the sessions; returns the snapshot either way.
    pub fn wait_until(
        &self,
        timeout: Duration,
        done: impl Fn(&[SessionReport]) -> bool,
    ) -> Vec<SessionReport> {
        let deadline = Instant::now() + timeout;
        loop {
            let sessions = self.sessions();
            if done(&sessions) || Instant::now() >= deadline {
                return sessions;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for TestWorker {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        // Join only a thread known to have finished, so a stuck runtime cannot hang the test.
        if self.stopped.recv_timeout(Duration::from_secs(8)).is_ok()
            && let Some(thread) = self.thread.take()
        {
            let _ = thread.join();
        }
    }
}

// ---------------------------------------------------------------------------
// Protocol constants
// ---------------------------------------------------------------------------

const REFERENCE_CHUNK_SIZE: usize = 48 * 1024;
const UPLOAD_CHANNEL_LABEL: &str = "video_upload";
const UPLOAD_HEADER_LEN: usize = 8;
const KEEPALIVE_MAX_LEN: usize = 1;
const RESULT_HEADER_LEN: usize = 12;
/// `time_base` of the `pts` we report: like RTP video, 90 kHz.
const PTS_CLOCK_RATE: u64 = 90_000;
const DEFAULT_PROCESSING_TIMEOUT: Duration = Duration::from_secs(3600);
/// Tests never need more; it bounds every session's lifetime.
const SESSION_LIFETIME_CAP: Duration = Duration::from_secs(900);
const SEND_BUFFER_LIMIT: usize = 1024 * 1024;
const ICE_GATHERING_TIMEOUT: Duration = Duration::from_secs(10);
const DRAIN_BEFORE_CLOSE_TIMEOUT: Duration = Duration::from_secs(10);
const CLOSE_LINGER: Duration = Duration::from_millis(300);
const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);
const DECODE_TIMEOUT: Duration = Duration::from_secs(300);
const JPEG_QUALITY: i32 = 80;
const DEFAULT_TRACK_ENCODE_LATENCY: Duration = Duration::from_millis(5);
const DEFAULT_TRACK_FRAME_GAP: Duration = Duration::from_millis(20);
const DEFAULT_RTSP_OPEN_TIME: Duration = Duration::from_secs(2);
/// A write only waits for the connection's driver to take the packet.
const TRACK_WRITE_TIMEOUT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------
// Worker state and HTTP signalling (§2)
// ---------------------------------------------------------------------------

struct Shared {
    config: WorkerConfig,
    /// Set by [`Fault::GoSilentAfterFrames`]: the sockets send and receive nothing.
    silenced: Arc<AtomicBool>,
    sessions: Mutex<Vec<Arc<Session>>>,
    requests: Mutex<Vec<RequestRecord>>,
}

impl Shared {
    fn snapshot(&self) -> Vec<SessionReport> {
        let sessions = self.sessions.lock().unwrap().clone();
        sessions
            .iter()
            .map(|s| {
                let mut report = s.report.lock().unwrap().clone();
                if let Some(track) = &s.track {
                    track.feedback.fill(&mut report);
                }
                report
            })
            .collect()
    }

    fn record_request(&self, body: &Value, authorization: &Option<String>, status: StatusCode) {
        self.requests.lock().unwrap().push(RequestRecord {
            body: body.clone(),
            authorization: authorization.clone(),
            status: status.as_u16(),
        });
    }
}

async fn serve(
    shared: Arc<Shared>,
    ready: std::sync::mpsc::Sender<Result<SocketAddr, String>>,
    shutdown: tokio::sync::oneshot::Receiver<()>,
) {
    let listener = match tokio::net::TcpListener::bind("127.0.0.1:0").await {
        Ok(listener) => listener,
        Err(err) => {
            let _ = ready.send(Err(format!("bind 127.0.0.1:0: {err}")));
            return;
        }
    };
    let addr = match listener.local_addr() {
        Ok(addr) => addr,
        Err(err) => {
            let _ = ready.send(Err(format!("local_addr: {err}")));
            return;
        }
    };
    let app = Router::new()
        .route("/initialise_webrtc_worker", post(initialise_webrtc_worker))
        .route("/info", get(info))
        .with_state(shared.clone());
    // Not a graceful shutdown: a request held by `DelayAnswer` must not delay Drop.
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let _ = ready.send(Ok(addr));
    let _ = shutdown.await;
    server.abort();

    let sessions = shared.sessions.lock().unwrap().clone();
    for session in &sessions {
        session.end();
    }
    // Session tasks close their peer connections; give them a bounded moment.
    let deadline = Instant::now() + CLOSE_TIMEOUT;
    while Instant::now() < deadline && !sessions.iter().all(|s| s.report.lock().unwrap().closed) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn info() -> Response {
    json_response(
        StatusCode::OK,
        json!({"name": "Roboflow Inference Server (test worker)", "version": "1.8.3"}),
    )
}

fn json_response(status: StatusCode, body: Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn missing_field(loc: &[&str]) -> Value {
    json!({"loc": loc, "msg": "field required", "type": "value_error.missing"})
}

/// Request-shape checks the way FastAPI/pydantic reports them (422 `detail`).
fn request_shape_errors(body: &Value) -> Vec<Value> {
    let Some(object) = body.as_object() else {
        return vec![
            json!({"loc": ["body"], "msg": "value is not a valid dict", "type": "type_error.dict"}),
        ];
    };
    let mut errors = Vec::new();
    match object.get("webrtc_offer") {
        None | Some(Value::Null) => errors.push(missing_field(&["body", "webrtc_offer"])),
        Some(offer) => {
            for field in ["type", "sdp"] {
                if !offer.get(field).is_some_and(Value::is_string) {
                    errors.push(missing_field(&["body", "webrtc_offer", field]));
                }
            }
        }
    }
    match object.get("workflow_configuration") {
        None | Some(Value::Null) => errors.push(missing_field(&["body", "workflow_configuration"])),
        Some(configuration) if !configuration.is_object() => errors.push(json!({
            "loc": ["body", "workflow_configuration"],
            "msg": "value is not a valid dict",
            "type": "type_error.dict",
        })),
        Some(_) => {}
    }
    errors.extend(pull::url_shape_errors(body));
    errors
}

/// The server compiles the workflow before answering; a bad one is refused with 400.
fn workflow_error(configuration: &Value) -> Option<Value> {
    match configuration.get("workflow_specification") {
        Some(specification) if !specification.is_null() => {
            if specification.get("steps").is_some_and(Value::is_array) {
                None
            } else {
                Some(json!({
                    "message": "Could not parse workflow definition: `steps` must be a list of step manifests",
                    "error_type": "WorkflowSyntaxError",
                    "context": "workflow_compilation | workflow_definition_parsing",
                    "inner_error_type": "ValidationError",
                    "inner_error_message": "steps: field required",
                    "blocks_errors": [],
                }))
            }
        }
        _ => {
            let named = configuration
                .get("workspace_name")
                .is_some_and(Value::is_string)
                && configuration
                    .get("workflow_id")
                    .is_some_and(Value::is_string);
            (!named).then(|| {
                json!({
                    "message": "workflow_configuration needs workflow_specification, or workspace_name and workflow_id",
                    "error_type": "InvalidInputTypeError",
                    "blocks_errors": [],
                })
            })
        }
    }
}

async fn initialise_webrtc_worker(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    raw_body: Bytes,
) -> Response {
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned);
    let config = &shared.config;

    if let Some(delay) = config.find(|f| match f {
        Fault::DelayAnswer(d) => Some(*d),
        _ => None,
    }) {
        tokio::time::sleep(delay).await;
    }

    let body: Value = match serde_json::from_slice(&raw_body) {
        Ok(body) => body,
        Err(err) => {
            let status = StatusCode::UNPROCESSABLE_ENTITY;
            shared.record_request(&Value::Null, &authorization, status);
            return json_response(
                status,
                json!({"detail": [{"loc": ["body", err.column()], "msg": format!("Expecting value: {err}"), "type": "value_error.jsondecode"}]}),
            );
        }
    };

    let shape_errors = request_shape_errors(&body);
    if !shape_errors.is_empty() {
        let status = StatusCode::UNPROCESSABLE_ENTITY;
        shared.record_request(&body, &authorization, status);
        return json_response(status, json!({"detail": shape_errors}));
    }

    if let Some((status, content_type, text)) = config.find(|f| match f {
        Fault::HttpError {
            status,
            content_type,
            body,
        } => Some((*status, *content_type, body.clone())),
        _ => None,
    }) {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        shared.record_request(&body, &authorization, status);
        return (status, [(header::CONTENT_TYPE, content_type)], text).into_response();
    }

    if let Some(error) = workflow_error(&body["workflow_configuration"]) {
        let status = StatusCode::BAD_REQUEST;
        shared.record_request(&body, &authorization, status);
        return json_response(status, error);
    }

    // A server-pull source the server opens before it answers (§11).
    let pull_request = pull::pull_request(&body);
    let realtime = body["webrtc_realtime_processing"].as_bool().unwrap_or(true);
    let pending_pull = match &pull_request {
        Some(request) if request.kind == pull::PullKind::Rtsp && !realtime => {
            Some(pull::PendingPull::RtspThread(request.url.clone()))
        }
        Some(request) => {
            let (request, config) = (request.clone(), config.clone());
            let opened =
                tokio::task::spawn_blocking(move || pull::PullSource::open(&request, &config))
                    .await
                    .unwrap_or_else(|err| Err(format!("open task: {err}")));
            match opened {
                Ok(source) => Some(pull::PendingPull::Opened(source)),
                Err(_) => {
                    let status = StatusCode::INTERNAL_SERVER_ERROR;
                    shared.record_request(&body, &authorization, status);
                    return json_response(status, pull::open_failure_body());
                }
            }
        }
        None => None,
    };

    let answer_sdp = if config.has(|f| matches!(f, Fault::MalformedSdp)) {
        let session = Session::detached(&shared, body.clone(), authorization.clone());
        session.report.lock().unwrap().closed = true;
        "this is not an SDP answer\r\n".to_owned()
    } else {
        match open_session(&shared, body.clone(), authorization.clone(), pending_pull).await {
            Ok(sdp) => sdp,
            Err(err) => {
                let status = StatusCode::INTERNAL_SERVER_ERROR;
                shared.record_request(&body, &authorization, status);
                return json_response(
                    status,
                    json!({"message": format!("test worker could not answer the offer: {err}"), "error_type": "WebRTCConfigurationError"}),
                );
            }
        }
    };

    shared.record_request(&body, &authorization, StatusCode::OK);
    json_response(
        StatusCode::OK,
        json!({
            "status": "success",
            "context": {"request_id": new_request_id(), "pipeline_id": null},
            "sdp": answer_sdp,
            "type": "answer",
        }),
    )
}

fn new_request_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64;
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{nanos:016x}{count:016x}")
}

// ---------------------------------------------------------------------------
// Peer connection set-up
// ---------------------------------------------------------------------------

enum PeerEvent {
    DataChannel(Arc<dyn DataChannel>),
    State(RTCPeerConnectionState),
    Track(Arc<dyn TrackRemote>),
}

/// Callbacks run on the connection's driver: only hand events on, never wait.
struct PeerEvents {
    events: mpsc::UnboundedSender<PeerEvent>,
    gathering_complete: watch::Sender<bool>,
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for PeerEvents {
    async fn on_ice_gathering_state_change(&self, state: RTCIceGatheringState) {
        if state == RTCIceGatheringState::Complete {
            self.gathering_complete.send_replace(true);
        }
    }

    async fn on_connection_state_change(&self, state: RTCPeerConnectionState) {
        let _ = self.events.send(PeerEvent::State(state));
    }

    async fn on_data_channel(&self, data_channel: Arc<dyn DataChannel>) {
        let _ = self.events.send(PeerEvent::DataChannel(data_channel));
    }

    async fn on_track(&self, track: Arc<dyn TrackRemote>) {
        let _ = self.events.send(PeerEvent::Track(track));
    }
}

/// Answers the offer in `request` and starts the session; returns the answer SDP.
async fn open_session(
    shared: &Arc<Shared>,
    request: Value,
    authorization: Option<String>,
    pending_pull: Option<pull::PendingPull>,
) -> Result<String, String> {
    let offer_sdp = request["webrtc_offer"]["sdp"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let section = video_section(&offer_sdp);
    // Live video in (§10): the client sends a track. Its format is checked
    // before anything else, as the server's worker fails before answering.
    let live = match section.as_ref().filter(|section| section.client_sends()) {
        Some(section) => {
            let format = live_track_format(&section.codecs).ok_or_else(|| {
                let offered: Vec<String> = section
                    .codecs
                    .iter()
                    .map(|c| format!("{} {}", c.mime_type, c.fmtp).trim().to_owned())
                    .collect();
                format!(
                    "the offer's video has no codec the server decodes (VP8, or H.264 \
                     packetization-mode=1 with profile-level-id 42e0xx or 4200xx); offered: [{}]",
                    offered.join(", ")
                )
            })?;
            Some(live::LiveOffer {
                direction: section.direction.clone(),
                format: format.clone(),
            })
        }
        None => None,
    };
    let offered_video = section
        .filter(|section| section.client_receives())
        .map(|section| section.codecs);
    let track_format = offered_video
        .as_deref()
        .filter(|_| stream_output_wanted(&request))
        .and_then(|offered| choose_track_codec(offered, shared.config.track_codec));
    let offer = RTCSessionDescription::offer(offer_sdp).map_err(|e| format!("offer: {e}"))?;

    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let (gathered_tx, mut gathered_rx) = watch::channel(false);
    let mut media_engine = MediaEngine::default();
    media_engine
        .register_default_codecs()
        .map_err(|e| format!("codecs: {e}"))?;
    let setting_engine = SettingEngineBuilder::new()
        .with_multicast_dns_mode(MulticastDnsMode::Disabled)
        .build();
    let mut builder = PeerConnectionBuilder::new();
    let feedback = Arc::new(TrackFeedback::new(&shared.config));
    if offered_video.is_some() || live.is_some() {
        // Sender reports and NACK handling for the video track, as aiortc has.
        let mut registry = register_default_interceptors(Registry::new(), &mut media_engine)
            .map_err(|e| format!("interceptors: {e}"))?;
        // Keyframe requests for the returned track, as aiortc answers them.
        registry = registry.with(Slot::from(13_500), KeyframeRequestCounter::new(feedback.clone()));
        if live.is_some() {
            // webrtc-rs hands inbound RTCP to the application only when an
            // interceptor marks it: this one marks the client's BYE.
            registry = live::with_bye_forwarder(registry);
        }
        builder = builder.with_interceptor_registry(registry);
    }
    let goes_silent = shared
        .config
        .has(|f| matches!(f, Fault::GoSilentAfterFrames(_)));
    if shared.config.upload_read_delay.is_some() || goes_silent || feedback.loss.is_some() {
        let delay = shared.config.upload_read_delay.unwrap_or_default();
        builder = builder.with_runtime(Arc::new(ThrottledRuntime::per_chunk(
            delay,
            shared.silenced.clone(),
            feedback.clone(),
        )));
    }
    let peer = builder
        .with_configuration(RTCConfigurationBuilder::new().build())
        .with_media_engine(media_engine)
        .with_setting_engine(setting_engine)
        .with_handler(Arc::new(PeerEvents {
            events: events_tx,
            gathering_complete: gathered_tx,
        }))
        .with_udp_addrs(vec!["127.0.0.1:0".to_string()])
        .with_data_channel_send_buffer_limit(SEND_BUFFER_LIMIT)
        .build()
        .await
        .map_err(|e| format!("peer connection: {e}"))?;
    let peer: Arc<dyn PeerConnection> = Arc::new(peer);

    let answered = async {
        peer.set_remote_description(offer)
            .await
            .map_err(|e| format!("set_remote_description: {e}"))?;
        // Added after the offer so that it takes the offer's recvonly video
        // section: the answer then says sendonly there.
        let track = match &track_format {
            Some((codec, format)) => {
                let origin = shared.config.track_rtp_origin.unwrap_or_else(random_u32);
                Some(add_outgoing_track(&peer, *codec, format, origin, feedback.clone()).await?)
            }
            None => {
                // A live track is received even without a returned one:
                // the answer is then recvonly.
                if offered_video.is_some() && live.is_none() {
                    refuse_video(&peer).await?;
                }
                None
            }
        };
        let answer = peer
            .create_answer(None)
            .await
            .map_err(|e| format!("create_answer: {e}"))?;
        peer.set_local_description(answer)
            .await
            .map_err(|e| format!("set_local_description: {e}"))?;
        tokio::time::timeout(ICE_GATHERING_TIMEOUT, gathered_rx.wait_for(|done| *done))
            .await
            .map_err(|_| {
                format!("ICE gathering did not complete within {ICE_GATHERING_TIMEOUT:?}")
            })?
            .map_err(|_| "ICE gathering state lost".to_owned())?;
        let sdp = peer
            .local_description()
            .await
            .map(|description| description.sdp)
            .ok_or_else(|| "no local description".to_owned())?;
        Ok((sdp, track))
    }
    .await;
    let (answer_sdp, track) = match answered {
        Ok(answered) => answered,
        Err(err) => {
            close_peer(&peer).await;
            return Err(err);
        }
    };

    if shared.config.has(|f| matches!(f, Fault::NeverConnect)) {
        // The real connection is closed at once, otherwise its own checks
        // towards the client would create peer-reflexive candidates.
        close_peer(&peer).await;
        let session = Session::detached(shared, request, authorization);
        session.report.lock().unwrap().closed = true;
        return Ok(point_candidates_at_closed_port(&answer_sdp));
    }

    let pull_start = pending_pull.as_ref().map(|_| {
        if !stream_output_wanted(&request) {
            pull::PullStart::DataOnly
        } else if track.is_some() {
            pull::PullStart::OnConnected
        } else {
            pull::PullStart::Never
        }
    });
    let session = Session::new(shared, request, authorization, Some(peer), track);
    if let (Some(pending), Some(start)) = (pending_pull, pull_start) {
        start_pull(&session, pending, start);
    }
    if let Some(offer) = &live {
        let answer_direction = video_section(&answer_sdp).map(|section| section.direction);
        session.update(|report| {
            report.live_track_codec = Some(offer.format.mime_type.clone());
            report.live_track_fmtp = Some(offer.format.fmtp.clone());
            report.live_offer_direction = Some(offer.direction.clone());
            report.live_answer_direction = answer_direction;
        });
    }
    *session.live.lock().unwrap() = live;
    tokio::spawn(run_session(session, events_rx));
    Ok(answer_sdp)
}

async fn close_peer(peer: &Arc<dyn PeerConnection>) {
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, peer.close()).await;
}

/// Server-pull (§11): records the source and starts processing now
/// (data-only), once connected (a returned track pulls frames), or never.
fn start_pull(session: &Arc<Session>, pending: pull::PendingPull, start: pull::PullStart) {
    let request = session.report.lock().unwrap().request.clone();
    let source = pull::pull_request(&request);
    session.update(|report| {
        report.pull_kind = source.as_ref().map(|s| s.kind.name().to_owned());
        report.pull_url = source.map(|s| s.url);
        report.pull_opened = matches!(pending, pull::PendingPull::Opened(_));
        report.pull_time_base = Some(match report.pull_kind.as_deref() {
            Some("mjpeg") => (1, 25),
            _ => (1, PTS_CLOCK_RATE as u32),
        });
        report.pull_start = Some(
            match start {
                pull::PullStart::DataOnly => "data_only",
                pull::PullStart::OnConnected => "on_connected",
                pull::PullStart::Never => "never",
            }
            .to_owned(),
        );
        if start == pull::PullStart::Never {
            report.pull_errors.push(
                "stream_output asks for a returned track but the offer receives no video: \
                 the server's sender never starts and nothing is processed"
                    .to_owned(),
            );
        }
    });
    match start {
        pull::PullStart::DataOnly => {
            tokio::spawn(pull::run_pull(session.clone(), pending));
        }
        pull::PullStart::OnConnected | pull::PullStart::Never => {
            *session.pending_pull.lock().unwrap() = Some((pending, start));
        }
    }
}

fn point_candidates_at_closed_port(sdp: &str) -> String {
    let closed_port = std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|socket| socket.local_addr())
        .map(|addr| addr.port())
        .unwrap_or(9);
    sdp.split("\r\n")
        .map(|line| {
            let Some(candidate) = line.strip_prefix("a=candidate:") else {
                return line.to_owned();
            };
            // foundation component transport priority address port typ ...
            let mut fields: Vec<String> = candidate.split(' ').map(str::to_owned).collect();
            if fields.len() > 5 {
                fields[5] = closed_port.to_string();
            }
            format!("a=candidate:{}", fields.join(" "))
        })
        .collect::<Vec<_>>()
        .join("\r\n")
}

// ---------------------------------------------------------------------------
// Session
// ---------------------------------------------------------------------------

/// Which outputs the client asked for (§2), changeable mid-session (§7).
#[derive(Clone, Debug, Default)]
struct Outputs {
    data_output: Option<Vec<String>>,
    stream_output: Option<Vec<String>>,
}

impl Outputs {
    fn from_request(request: &Value) -> Outputs {
        Outputs {
            data_output: string_list(&request["data_output"]),
            stream_output: string_list(&request["stream_output"]),
        }
    }

    /// Gzip whenever data outputs are requested (§5).
    fn gzipped(&self) -> bool {
        self.data_output
            .as_ref()
            .is_some_and(|names| !names.is_empty())
    }

    fn is_image_output(&self, name: &str) -> bool {
        name == "image"
            || name == "blurred"
            || name.ends_with("_image")
            || self
                .stream_output
                .as_ref()
                .is_some_and(|names| names.iter().any(|n| n == name))
    }

    fn wants_image(&self) -> bool {
        self.data_output.as_ref().is_some_and(|names| {
            names
                .iter()
                .any(|name| name != "*" && self.is_image_output(name))
        })
    }
}

fn string_list(value: &Value) -> Option<Vec<String>> {
    value.as_array().map(|items| {
        items
            .iter()
            .filter_map(|item| item.as_str().map(str::to_owned))
            .collect()
    })
}

struct Session {
    config: WorkerConfig,
    report: Mutex<SessionReport>,
    peer: Option<Arc<dyn PeerConnection>>,
    realtime: bool,
    outputs: Mutex<Outputs>,
    /// The first channel not labelled `video_upload`: results go there.
    control: Mutex<Option<Arc<dyn DataChannel>>>,
    /// Highest `{"ack": N}` so far; `None` until the first ack (§7).
    acked: watch::Sender<Option<u64>>,
    ended: watch::Sender<bool>,
    deadline: tokio::time::Instant,
    processing_started: AtomicBool,
    /// `declared_fps` from the request, reported instead of the file's rate.
    declared_fps: Option<f64>,
    /// The returned video track, when one was negotiated (§6).
    track: Option<OutgoingTrack>,
    /// See [`Fault::GoSilentAfterFrames`].
    silenced: Arc<AtomicBool>,
    /// Live video in: the client's track as offered (§10).
    live: Mutex<Option<live::LiveOffer>>,
    /// Server-pull: the source until the connection starts processing, or
    /// until the session ends when nothing will (§11).
    pending_pull: Mutex<Option<(pull::PendingPull, pull::PullStart)>>,
}

impl Session {
    fn new(
        shared: &Arc<Shared>,
        request: Value,
        authorization: Option<String>,
        peer: Option<Arc<dyn PeerConnection>>,
        track: Option<OutgoingTrack>,
    ) -> Arc<Session> {
        let realtime = request["webrtc_realtime_processing"]
            .as_bool()
            .unwrap_or(true);
        let declared_fps = request["declared_fps"].as_f64();
        let lifetime = request["processing_timeout"]
            .as_u64()
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_PROCESSING_TIMEOUT)
            .min(SESSION_LIFETIME_CAP);
        let session = Arc::new(Session {
            config: shared.config.clone(),
            outputs: Mutex::new(Outputs::from_request(&request)),
            report: Mutex::new(SessionReport {
                request,
                authorization,
                track_codec: track.as_ref().map(|t| t.codec.mime_type().to_owned()),
                track_payload_type: track.as_ref().map(|t| t.payload_type),
                track_ssrc: track.as_ref().map(|t| t.ssrc),
                rtp_origin: track.as_ref().map(|t| t.origin),
                ..SessionReport::default()
            }),
            peer,
            track,
            realtime,
            control: Mutex::new(None),
            acked: watch::Sender::new(None),
            ended: watch::Sender::new(false),
            deadline: tokio::time::Instant::now() + lifetime,
            processing_started: AtomicBool::new(false),
            declared_fps,
            silenced: shared.silenced.clone(),
            live: Mutex::new(None),
            pending_pull: Mutex::new(None),
        });
        shared.sessions.lock().unwrap().push(session.clone());
        session
    }

    /// A session that never gets a live peer connection (faults that break signalling).
    fn detached(
        shared: &Arc<Shared>,
        request: Value,
        authorization: Option<String>,
    ) -> Arc<Session> {
        Session::new(shared, request, authorization, None, None)
    }

    fn update(&self, change: impl FnOnce(&mut SessionReport)) {
        change(&mut self.report.lock().unwrap());
    }

    /// Asks the session task to close the peer connection and stop.
    fn end(&self) {
        self.ended.send_replace(true);
    }

    fn is_ended(&self) -> bool {
        *self.ended.borrow()
    }

    /// Resolves once the session is ended or past its deadline.
    async fn until_ended(&self) {
        let mut ended = self.ended.subscribe();
        tokio::select! {
            _ = ended.wait_for(|ended| *ended) => {}
            _ = tokio::time::sleep_until(self.deadline) => {}
        }
    }

    fn control_channel(&self) -> Option<Arc<dyn DataChannel>> {
        self.control.lock().unwrap().clone()
    }
}

async fn run_session(session: Arc<Session>, mut events: mpsc::UnboundedReceiver<PeerEvent>) {
    loop {
        let event = tokio::select! {
            event = events.recv() => event,
            _ = session.until_ended() => break,
        };
        match event {
            None => break,
            Some(PeerEvent::DataChannel(channel)) => attach_channel(&session, channel).await,
            Some(PeerEvent::Track(track)) => {
                let offer = session.live.lock().unwrap().clone();
                let Some(offer) = offer else { continue };
                if session.processing_started.swap(true, Ordering::SeqCst) {
                    continue;
                }
                let request = session.report.lock().unwrap().request.clone();
                if offer.direction == "sendonly" && stream_output_wanted(&request) {
                    // aiortc pulls frames through the returned track's
                    // sender, which a sendonly offer never starts (§10).
                    session.update(|report| {
                        report.live_decode_errors.push(
                            "sendonly offer with a returned track asked for: the server's \
                             sender never starts and nothing is processed"
                                .to_owned(),
                        )
                    });
                    continue;
                }
                tokio::spawn(live::run_live_track(session.clone(), track, offer));
            }
            Some(PeerEvent::State(
                RTCPeerConnectionState::Closed | RTCPeerConnectionState::Failed,
            )) => {
                break;
            }
            Some(PeerEvent::State(RTCPeerConnectionState::Connected)) => {
                // The returned track's sender starts pulling frames (§11).
                let mut pending = session.pending_pull.lock().unwrap();
                if pending
                    .as_ref()
                    .is_some_and(|(_, start)| *start == pull::PullStart::OnConnected)
                    && let Some((pending, _)) = pending.take()
                {
                    tokio::spawn(pull::run_pull(session.clone(), pending));
                }
            }
            Some(PeerEvent::State(_)) => {}
        }
    }
    session.end();
    if let Some(peer) = &session.peer {
        close_peer(peer).await;
    }
    // A source whose processing never started is still open.
    let pending = session.pending_pull.lock().unwrap().take();
    if let Some((pull::PendingPull::Opened(source), _)) = pending {
        let stopped = pull::stop_source(source).await;
        session.update(|report| report.pull_source_stopped = stopped);
    }
    session.update(|report| report.closed = true);
}

async fn attach_channel(session: &Arc<Session>, channel: Arc<dyn DataChannel>) {
    let label = match tokio::time::timeout(Duration::from_secs(2), channel.label()).await {
        Ok(Ok(label)) => label,
        _ => return,
    };
    session.update(|report| report.channels.push(label.clone()));
    if label == UPLOAD_CHANNEL_LABEL {
        tokio::spawn(run_upload_channel(session.clone(), channel));
    } else {
        session
            .control
            .lock()
            .unwrap()
            .get_or_insert_with(|| channel.clone());
        tokio::spawn(run_control_channel(session.clone(), channel));
    }
}

// ---------------------------------------------------------------------------
// Upload channel (§4)
// ---------------------------------------------------------------------------

#[derive(Default)]
struct UploadAssembly {
    total_chunks: Option<u32>,
    chunks: HashMap<u32, Bytes>,
    bytes: u64,
}

enum ChunkOutcome {
    Stored,
    Duplicate,
    Refused(String),
}

impl UploadAssembly {
    fn accept(&mut self, message: &[u8]) -> (ChunkOutcome, Option<String>) {
        if message.len() < UPLOAD_HEADER_LEN {
            return (
                ChunkOutcome::Refused(format!(
                    "message of {} bytes is shorter than the 8-byte chunk header",
                    message.len()
                )),
                None,
            );
        }
        let index = u32::from_le_bytes(message[0..4].try_into().unwrap());
        let total = u32::from_le_bytes(message[4..8].try_into().unwrap());
        if total == 0 {
            return (
                ChunkOutcome::Refused(format!("chunk {index}: total_chunks is 0")),
                None,
            );
        }
        let mut warning = None;
        let expected = *self.total_chunks.get_or_insert(total);
        if total != expected {
            warning = Some(format!(
                "chunk {index}: total_chunks changed from {expected} to {total}"
            ));
        }
        if index >= expected {
            let error = format!("chunk_index {index} >= total_chunks {expected}");
            return (ChunkOutcome::Refused(error), warning);
        }
        if self.chunks.contains_key(&index) {
            return (ChunkOutcome::Duplicate, warning);
        }
        let payload = Bytes::copy_from_slice(&message[UPLOAD_HEADER_LEN..]);
        self.bytes += payload.len() as u64;
        self.chunks.insert(index, payload);
        (ChunkOutcome::Stored, warning)
    }

    fn is_complete(&self) -> bool {
        self.total_chunks
            .is_some_and(|total| self.chunks.len() as u64 == u64::from(total))
    }

    fn file(&mut self) -> Vec<u8> {
        let total = self.total_chunks.unwrap_or(0);
        let mut file = Vec::with_capacity(self.bytes as usize);
        for index in 0..total {
            if let Some(chunk) = self.chunks.remove(&index) {
                file.extend_from_slice(&chunk);
            }
        }
        file
    }
}

async fn run_upload_channel(session: Arc<Session>, channel: Arc<dyn DataChannel>) {
    let close_after = session.config.find(|f| match f {
        Fault::CloseUploadAfterChunks(n) => Some(*n),
        _ => None,
    });
    let echo_keepalives = !session.config.has(|f| matches!(f, Fault::NoKeepaliveEcho));
    let mut assembly = UploadAssembly::default();
    let mut chunk_messages = 0u32;
    let mut closed_by_us = false;
    loop {
        let event = tokio::select! {
            event = channel.poll() => event,
            _ = session.until_ended() => break,
        };
        let message = match event {
            None | Some(DataChannelEvent::OnClose) => break,
            Some(DataChannelEvent::OnMessage(message)) => message,
            Some(_) => continue,
        };
        if message.data.len() <= KEEPALIVE_MAX_LEN {
            session.update(|report| report.keepalives_received += 1);
            if echo_keepalives && channel.send(message.data.clone()).await.is_ok() {
                session.update(|report| report.keepalives_echoed += 1);
            }
            continue;
        }
        if closed_by_us {
            continue;
        }
        chunk_messages += 1;
        let (outcome, warning) = assembly.accept(&message.data);
        let complete = assembly.is_complete();
        session.update(|report| {
            report.max_chunk_message_len = report.max_chunk_message_len.max(message.data.len());
            report.total_chunks = assembly.total_chunks;
            report.upload_bytes = assembly.bytes;
            report.header_errors.extend(warning);
            match outcome {
                ChunkOutcome::Stored => report.chunks_received += 1,
                ChunkOutcome::Duplicate => report.duplicate_chunks += 1,
                ChunkOutcome::Refused(error) => report.header_errors.push(error),
            }
        });
        if complete && !session.processing_started.swap(true, Ordering::SeqCst) {
            tokio::spawn(process_upload(session.clone(), assembly.file()));
        }
        if close_after.is_some_and(|n| chunk_messages >= n) {
            let _ = channel.close().await;
            closed_by_us = true;
        }
    }
}

// ---------------------------------------------------------------------------
// Control channel (§7)
// ---------------------------------------------------------------------------

/// Results can no longer be delivered once the control channel closes (the
/// client went away), so that ends the session.
async fn run_control_channel(session: Arc<Session>, channel: Arc<dyn DataChannel>) {
    loop {
        let event = tokio::select! {
            event = channel.poll() => event,
            _ = session.until_ended() => return,
        };
        let message = match event {
            None | Some(DataChannelEvent::OnClose) => {
                let is_results_channel = session
                    .control_channel()
                    .is_some_and(|control| control.id() == channel.id());
                if is_results_channel {
                    session.end();
                }
                return;
            }
            Some(DataChannelEvent::OnMessage(message)) => message,
            Some(_) => continue,
        };
        let text = String::from_utf8_lossy(&message.data).into_owned();
        let parsed: Option<Value> = serde_json::from_str(&text).ok();
        let ack = parsed
            .as_ref()
            .and_then(|value| value.get("ack"))
            .and_then(Value::as_u64);
        if let Some(value) = &parsed {
            let mut outputs = session.outputs.lock().unwrap();
            if let Some(names) = value.get("data_output") {
                outputs.data_output = string_list(names);
            }
            if let Some(names) = value.get("stream_output") {
                outputs.stream_output = string_list(names);
            }
        }
        session.update(|report| {
            if message.is_string {
                report.control_messages.push(text);
            }
            report.acks.extend(ack);
        });
        if let Some(ack) = ack {
            session
                .acked
                .send_modify(|highest| *highest = Some(highest.map_or(ack, |h| h.max(ack))));
        }
    }
}

// ---------------------------------------------------------------------------
// Processing and results (§5)
// ---------------------------------------------------------------------------

/// One decoded frame, reduced to what the results need.
struct DecodedFrame {
    pts_ns: Option<u64>,
    width: u32,
    height: u32,
    fps: Option<f64>,
    mean_rgb: [u8; 3],
    jpeg: Option<Vec<u8>>,
    /// The stream output for the video track, when one was negotiated.
    image: Option<gst::Sample>,
    /// Live video in and server-pull: the pts and the time base it is
    /// reported in, whatever `time_base` says (live: RTP timestamp − the
    /// first frame's, 1/90000; pull: see the `pull` module).
    stream_pts: Option<(u64, (u32, u32))>,
}

async fn process_upload(session: Arc<Session>, file: Vec<u8>) {
    let stored =
        tokio::task::spawn_blocking(move || -> Result<(tempfile::TempPath, String), String> {
            let sha256 = hex(&Sha256::digest(&file));
            let mut temp = tempfile::Builder::new()
                .prefix("roboflow-test-upload-")
                .tempfile()
                .map_err(|e| e.to_string())?;
            temp.write_all(&file).map_err(|e| e.to_string())?;
            temp.flush().map_err(|e| e.to_string())?;
            Ok((temp.into_temp_path(), sha256))
        })
        .await;
    let Ok(Ok((path, sha256))) = stored else {
        session.end();
        return;
    };
    session.update(|report| {
        report.upload_complete = true;
        report.upload_sha256 = Some(sha256);
    });

    // Capacity 1: the decoder runs at most a frame ahead, as acks pace the sender.
    let (frames_tx, mut frames_rx) = mpsc::channel::<DecodedFrame>(1);
    if session.config.has(|f| matches!(f, Fault::DecodeNothing)) {
        drop(frames_tx);
        drop(path);
    } else {
        let decoder_session = session.clone();
        let limit = session.config.max_frames;
        let track_image = session.track.is_some();
        tokio::task::spawn_blocking(move || {
            let wants_jpeg = || decoder_session.outputs.lock().unwrap().wants_image();
            let _ = decode_video(&path, &frames_tx, wants_jpeg, limit, track_image);
            drop(path);
        });
    }

    let mut last_frame_id = 0u32;
    let mut decoded = 0u32;
    let mut encoder: Option<RtpEncoder> = None;
    loop {
        let frame = tokio::select! {
            frame = frames_rx.recv() => frame,
            _ = session.until_ended() => return,
        };
        let Some(mut frame) = frame else { break };
        decoded += 1;
        session.update(|report| report.frames_decoded += 1);
        let skipped = session.realtime
            && session
                .config
                .realtime_drop_every
                .is_some_and(|n| n > 0 && decoded.is_multiple_of(n));
        if skipped {
            session.update(|report| report.realtime_frames_dropped += 1);
            continue;
        }
        let frame_id = last_frame_id + 1;
        last_frame_id = frame_id;
        if !wait_for_ack_window(&session, frame_id).await {
            return;
        }
        let Some(control) = session.control_channel() else {
            continue;
        };
        if !deliver_result(&session, &control, frame_id, &mut frame, &mut encoder).await {
            return;
        }
    }

    if let Some(encoder) = encoder.take() {
        // Stopping a pipeline may block briefly: not on the runtime's threads.
        let _ = tokio::task::spawn_blocking(move || drop(encoder)).await;
    }
    if session.config.has(|f| matches!(f, Fault::NeverComplete)) {
        return;
    }
    send_processing_complete(&session, last_frame_id).await;
    tokio::time::sleep(CLOSE_LINGER).await;
    session.end();
}

/// `processing_complete` (§5), header frame_id = the last frame's + 1, once
/// the results before it are delivered.
async fn send_processing_complete(session: &Session, last_frame_id: u32) {
    if let Some(control) = session.control_channel() {
        let message = json!({
            "serialized_output_data": null,
            "video_metadata": null,
            "errors": [],
            "processing_complete": true,
            "termination_reason": "end_of_stream",
        });
        let gzipped = session.outputs.lock().unwrap().gzipped();
        send_completion(session, &control, last_frame_id, message, gzipped).await;
    }
}

/// Sends a `processing_complete` message (header frame_id = the last
/// frame's + 1) and waits until it is delivered, bounded; false when the
/// channel refused it.
async fn send_completion(
    session: &Session,
    control: &Arc<dyn DataChannel>,
    last_frame_id: u32,
    message: Value,
    gzipped: bool,
) -> bool {
    let payload = encode_payload(
        message.to_string().into_bytes(),
        gzipped,
        Compression::fast(),
    );
    let messages = split_result(
        last_frame_id + 1,
        &payload,
        session.config.result_chunk_size,
        None,
    );
    let sent = send_all(control, messages).await;
    if sent {
        session.update(|report| report.processing_complete_sent = true);
    }
    wait_drained(control).await;
    sent
}

/// Batch mode (§7): once acks have started, frame K waits for ack >= K - 1.
/// Returns false when the session ended while waiting.
async fn wait_for_ack_window(session: &Session, frame_id: u32) -> bool {
    if session.realtime {
        return true;
    }
    let mut acked = session.acked.subscribe();
    let allowed = |highest: &Option<u64>| match highest {
        None => true,
        Some(n) => u64::from(frame_id) <= n + 1,
    };
    tokio::select! {
        result = acked.wait_for(allowed) => result.is_ok(),
        _ = session.until_ended() => false,
    }
}

/// Sends a processed frame's result, then its frame on the returned track,
/// and applies the faults that end a session after N results (file and
/// live mode alike). False: the session is over.
async fn deliver_result(
    session: &Arc<Session>,
    control: &Arc<dyn DataChannel>,
    frame_id: u32,
    frame: &mut DecodedFrame,
    encoder: &mut Option<RtpEncoder>,
) -> bool {
    let outputs = session.outputs.lock().unwrap().clone();
    let (messages, sent) = frame_messages(session, &outputs, frame_id, frame);
    if !send_all(control, messages).await {
        session.end();
        return false;
    }
    session.update(|report| {
        report.results_sent += 1;
        report.results.push(sent);
    });
    // After the JSON, as the server does (§6, §10).
    if let Some(track) = &session.track {
        send_track_frame(session, track, frame_id, frame, encoder).await;
        tokio::time::sleep(session.config.track_frame_gap).await;
    }
    let silent_after = session.config.find(|f| match f {
        Fault::GoSilentAfterFrames(n) => Some(*n),
        _ => None,
    });
    if silent_after.is_some_and(|n| frame_id >= n) {
        wait_drained(control).await;
        session.silenced.store(true, Ordering::Relaxed);
        // Dead: no more frames, no close, nothing.
        return false;
    }
    let dropped = session.config.find(|f| match f {
        Fault::DropPeerAfterFrames(n) => Some(*n),
        _ => None,
    });
    if dropped.is_some_and(|n| frame_id >= n) {
        // Delivered first, so the client deterministically holds N results.
        wait_drained(control).await;
        session.end();
        return false;
    }
    true
}

async fn send_all(channel: &Arc<dyn DataChannel>, messages: Vec<BytesMut>) -> bool {
    for message in messages {
        if channel.send(message).await.is_err() {
            return false;
        }
    }
    true
}

/// Lets the client receive everything before the connection is closed.
async fn wait_drained(channel: &Arc<dyn DataChannel>) {
    let deadline = Instant::now() + DRAIN_BEFORE_CLOSE_TIMEOUT;
    while Instant::now() < deadline {
        match channel.outstanding_bytes().await {
            Ok(0) | Err(_) => return,
            Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// `ns` in units of `time_base` (num/den seconds), rounded to nearest.
fn ns_to_units(ns: u64, (num, den): (u32, u32)) -> u64 {
    let divisor = u128::from(num.max(1)) * 1_000_000_000;
    ((u128::from(ns) * u128::from(den) + divisor / 2) / divisor) as u64
}

/// A pts in `time_base` units as 90 kHz ticks, rounded (aiortc converts
/// the frame's pts and time base the same way).
fn units_to_90k(units: u64, (num, den): (u32, u32)) -> u64 {
    let den = u128::from(den.max(1));
    ((u128::from(units) * u128::from(num) * u128::from(VIDEO_CLOCK_RATE) + den / 2) / den) as u64
}

/// The frame's pts in units of [`frame_time_base`].
fn frame_pts(session: &Session, frame: &DecodedFrame) -> u64 {
    match frame.stream_pts {
        Some((pts, _)) => pts,
        None => ns_to_units(frame.pts_ns.unwrap_or(0), session.config.time_base),
    }
}

/// The time base a frame's result reports: its stream's (live: the RTP
/// clock), else the configured one.
fn frame_time_base(session: &Session, frame: &DecodedFrame) -> (u32, u32) {
    match frame.stream_pts {
        Some((_, time_base)) => time_base,
        None => session.config.time_base,
    }
}

fn video_metadata(session: &Session, frame_id: u32, frame: &DecodedFrame) -> Value {
    let fps = frame.fps.unwrap_or(30.0);
    let (num, den) = frame_time_base(session, frame);
    json!({
        "frame_id": frame_id,
        "received_at": iso_time_now(),
        "pts": frame_pts(session, frame),
        "time_base": f64::from(num) / f64::from(den.max(1)),
        "declared_fps": session.declared_fps.unwrap_or(fps),
        "measured_fps": fps,
        "width": frame.width,
        "height": frame.height,
    })
}

fn serialized_output_data(outputs: &Outputs, frame: &DecodedFrame, metadata: &Value) -> Value {
    let Some(names) = outputs
        .data_output
        .as_ref()
        .filter(|names| !names.is_empty())
    else {
        return Value::Null;
    };
    let color = json!(frame.mean_rgb);
    let mut data = serde_json::Map::new();
    for name in names {
        if name == "*" {
            data.insert("rgb_color".into(), color.clone());
        } else if outputs.is_image_output(name) {
            let value = match &frame.jpeg {
                Some(jpeg) => json!({
                    "type": "base64",
                    "value": base64::engine::general_purpose::STANDARD.encode(jpeg),
                    "video_metadata": metadata,
                }),
                None => Value::Null,
            };
            data.insert(name.clone(), value);
        } else {
            data.insert(name.clone(), color.clone());
        }
    }
    Value::Object(data)
}

#[derive(Clone, Copy)]
enum HeaderFault {
    Zero,
    Huge,
    Changing,
}

/// The chunk messages of one frame's result, with first-frame faults
/// applied, and what was sent.
fn frame_messages(
    session: &Session,
    outputs: &Outputs,
    frame_id: u32,
    frame: &DecodedFrame,
) -> (Vec<BytesMut>, SentResult) {
    let config = &session.config;
    let metadata = video_metadata(session, frame_id, frame);
    let errors: Vec<String> = match &config.frame_errors {
        Some((every, text)) if *every > 0 && frame_id.is_multiple_of(*every) => vec![text.clone()],
        _ => Vec::new(),
    };
    let mut data = serialized_output_data(outputs, frame, &metadata);
    if let (Some(detections), Some(data)) = (config.detections, data.as_object_mut()) {
        for (name, value) in data.iter_mut() {
            if let Some(boxes) = detections(name, frame_id) {
                *value = boxes;
            }
        }
    }
    if config.result_padding > 0 {
        if !data.is_object() {
            data = json!({});
        }
        data["padding"] = Value::String(padding_text(frame_id, config.result_padding));
    }
    let result = json!({
        "serialized_output_data": data,
        "video_metadata": metadata,
        "errors": errors,
        "processing_complete": false,
        "termination_reason": null,
    });
    let first = frame_id == 1;
    let mut json_bytes = result.to_string().into_bytes();
    let mut level = Compression::fast();
    if first && config.has(|f| matches!(f, Fault::InvalidJson)) {
        json_bytes = b"{\"serialized_output_data\": this is not JSON".to_vec();
    }
    let oversize = config.find(|f| match f {
        Fault::OversizeFrame(n) => Some(*n),
        _ => None,
    });
    if first && let Some(size) = oversize {
        json_bytes = padded_json(result, size);
        // Stored deflate blocks: the wire size stays close to the JSON size.
        level = Compression::none();
    }
    let mut payload = encode_payload(json_bytes, outputs.gzipped(), level);
    if first && config.has(|f| matches!(f, Fault::GzipBomb)) {
        payload = gzip_bomb().to_vec();
    }
    let header_fault = if !first {
        None
    } else if config.has(|f| matches!(f, Fault::ResultTotalChunksZero)) {
        Some(HeaderFault::Zero)
    } else if config.has(|f| matches!(f, Fault::ResultTotalChunksHuge)) {
        Some(HeaderFault::Huge)
    } else if config.has(|f| matches!(f, Fault::ResultTotalChunksChanging)) {
        Some(HeaderFault::Changing)
    } else {
        None
    };
    let messages = split_result(frame_id, &payload, config.result_chunk_size, header_fault);
    let sent = SentResult {
        frame_id,
        pts: frame_pts(session, frame),
        time_base: frame_time_base(session, frame),
        chunks: messages.len() as u32,
        errors,
    };
    (messages, sent)
}

fn encode_payload(json_bytes: Vec<u8>, gzipped: bool, level: Compression) -> Vec<u8> {
    if !gzipped {
        return json_bytes;
    }
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), level);
    encoder.write_all(&json_bytes).expect("gzip into memory");
    encoder.finish().expect("gzip into memory")
}

/// The result with a `padding` field of incompressible text so the JSON is `size` bytes.
fn padded_json(mut result: Value, size: usize) -> Vec<u8> {
    result["padding"] = Value::String(String::new());
    let base = result.to_string().len();
    result["padding"] = Value::String(noise_text(0, size.saturating_sub(base)));
    result.to_string().into_bytes()
}

/// The `padding` text of frame `frame_id`'s result under `result_padding`:
/// `len` bytes, different for every frame.
pub fn padding_text(frame_id: u32, len: usize) -> String {
    noise_text(u64::from(frame_id), len)
}

/// Base64-alphabet noise (xorshift64), 6 bits of entropy per byte.
fn noise_text(seed: u64, len: usize) -> String {
    let mut state = 0x2545_f491_4f6c_dd1du64 ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            alphabet[(state % 64) as usize] as char
        })
        .collect()
}

/// Splits a payload into `[frame_id][chunk_index][total_chunks]` + at most `chunk_size` bytes.
fn split_result(
    frame_id: u32,
    payload: &[u8],
    chunk_size: usize,
    fault: Option<HeaderFault>,
) -> Vec<BytesMut> {
    let chunk_size = chunk_size.max(1);
    let mut pieces: Vec<&[u8]> = if payload.is_empty() {
        vec![payload]
    } else {
        payload.chunks(chunk_size).collect()
    };
    if matches!(fault, Some(HeaderFault::Changing)) && pieces.len() == 1 && payload.len() >= 2 {
        let (head, tail) = payload.split_at(payload.len() / 2);
        pieces = vec![head, tail];
    }
    let real_total = pieces.len() as u32;
    pieces
        .iter()
        .enumerate()
        .map(|(index, piece)| {
            let total = match fault {
                None => real_total,
                Some(HeaderFault::Zero) => 0,
                Some(HeaderFault::Huge) => u32::MAX,
                Some(HeaderFault::Changing) if index == 0 => real_total,
                Some(HeaderFault::Changing) => real_total + 1,
            };
            let mut message = BytesMut::with_capacity(RESULT_HEADER_LEN + piece.len());
            message.extend_from_slice(&frame_id.to_le_bytes());
            message.extend_from_slice(&(index as u32).to_le_bytes());
            message.extend_from_slice(&total.to_le_bytes());
            message.extend_from_slice(piece);
            message
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Returned video track (§6)
// ---------------------------------------------------------------------------

/// `stream_output` null (auto: the first image output) or absent, or naming
/// outputs, asks for the track; `[]` refuses it (§2).
fn stream_output_wanted(request: &Value) -> bool {
    match &request["stream_output"] {
        Value::Array(names) => !names.is_empty(),
        _ => true,
    }
}

/// The sender side of the returned track, fixed at answer time.
struct OutgoingTrack {
    local: Arc<TrackLocalStaticRTP>,
    /// Losses on the wire and keyframe requests.
    feedback: Arc<TrackFeedback>,
    codec: TrackCodec,
    /// As negotiated: webrtc-rs refuses packets with another one.
    payload_type: u8,
    /// As announced in the answer: webrtc-rs refuses packets with another one.
    ssrc: u32,
    origin: u32,
}

impl OutgoingTrack {
    /// origin + pts at 90 kHz, mod 2^32 (§6), from the pts (in `time_base`
    /// units) the frame's JSON reports.
    fn rtp_timestamp(&self, pts: u64, time_base: (u32, u32)) -> u32 {
        self.origin
            .wrapping_add(units_to_90k(pts, time_base) as u32)
    }
}

/// No track for an offer that can receive one: answer `inactive`, as
/// aiortc does (webrtc-rs would say `sendonly` and send nothing).
async fn refuse_video(peer: &Arc<dyn PeerConnection>) -> Result<(), String> {
    for transceiver in peer.get_transceivers().await {
        if matches!(transceiver.sender().await, Ok(None)) {
            transceiver
                .set_direction(RTCRtpTransceiverDirection::Inactive)
                .await
                .map_err(|e| format!("video transceiver direction: {e}"))?;
        }
    }
    Ok(())
}

async fn add_outgoing_track(
    peer: &Arc<dyn PeerConnection>,
    codec: TrackCodec,
    format: &OfferedCodec,
    origin: u32,
    feedback: Arc<TrackFeedback>,
) -> Result<OutgoingTrack, String> {
    let ssrc = random_u32();
    let rtp_codec = RTCRtpCodec {
        mime_type: codec.mime_type().to_owned(),
        clock_rate: VIDEO_CLOCK_RATE,
        channels: 0,
        sdp_fmtp_line: format.fmtp.clone(),
        rtcp_feedback: Vec::new(),
    };
    let local = Arc::new(TrackLocalStaticRTP::new(MediaStreamTrack::new(
        "roboflow-test-worker".to_owned(),
        "roboflow-test-worker-video".to_owned(),
        "stream_output".to_owned(),
        RtpCodecKind::Video,
        vec![RTCRtpEncodingParameters {
            rtp_coding_parameters: RTCRtpCodingParameters {
                ssrc: Some(ssrc),
                ..Default::default()
            },
            active: true,
            // Named here so the interceptors (sender reports, NACK) bind the stream.
            codec: rtp_codec,
            ..Default::default()
        }],
    )));
    let sender = peer
        .add_track(local.clone() as Arc<dyn TrackLocal>)
        .await
        .map_err(|e| format!("add_track: {e}"))?;
    let parameters = sender
        .get_parameters()
        .await
        .map_err(|e| format!("video sender parameters: {e}"))?;
    // The sender's codecs are the offer's, renumbered to this side's media
    // engine (webrtc-rs), and the answer lists them with those numbers.
    let codecs = &parameters.rtp_parameters.codecs;
    let same_mime = |c: &&RTCRtpCodecParameters| {
        c.rtp_codec
            .mime_type
            .eq_ignore_ascii_case(codec.mime_type())
    };
    let payload_type = codecs
        .iter()
        .filter(same_mime)
        .find(|c| c.rtp_codec.sdp_fmtp_line == format.fmtp)
        .or_else(|| codecs.iter().find(same_mime))
        .map(|c| c.payload_type)
        .ok_or_else(|| format!("no negotiated payload type for {}", codec.mime_type()))?;
    Ok(OutgoingTrack {
        local,
        feedback,
        codec,
        payload_type,
        ssrc,
        origin,
    })
}

/// Hands a frame to the track's encoder and writes its packets, after the
/// frame's JSON is sent (as the server does). A failure is recorded and
/// costs only this frame's video.
async fn send_track_frame(
    session: &Session,
    track: &OutgoingTrack,
    frame_id: u32,
    frame: &mut DecodedFrame,
    encoder: &mut Option<RtpEncoder>,
) {
    let Some(image) = frame.image.take() else {
        return;
    };
    let first_packet_at = tokio::time::Instant::now() + session.config.track_encode_latency;
    let config = &session.config;
    let dropped = config
        .track_drop_every
        .is_some_and(|n| n > 0 && frame_id.is_multiple_of(n));
    if dropped || (config.track_lose_first_frame && frame_id == 1) {
        session.update(|report| report.track_frames_dropped += 1);
        return;
    }
    let (codec, payload_type) = (track.codec, track.payload_type);
    let stamp = config.track_stamp_frame_id.then(|| stamp_level(frame_id));
    let keyframe_interval = config.track_keyframe_interval;
    let force_keyframe = track.feedback.keyframe_wanted.swap(false, Ordering::Relaxed);
    let idle = encoder.take();
    // The encoder comes back only after a clean frame: after a failure the
    // next frame starts a fresh one (new sequence numbers, a keyframe).
    let encoded = tokio::task::spawn_blocking(move || {
        let image = match stamp {
            Some(level) => stamp_frame(&image, level)?,
            None => image,
        };
        let mut encoder = match idle {
            Some(encoder) => encoder,
            None => RtpEncoder::with_keyframe_interval(codec, payload_type, keyframe_interval)?,
        };
        if force_keyframe {
            encoder.force_keyframe();
        }
        let packets = encoder.encode(&image)?;
        Ok::<_, String>((encoder, packets))
    })
    .await;
    let packets = match encoded {
        Ok(Ok((idle, packets))) => {
            *encoder = Some(idle);
            packets
        }
        Ok(Err(err)) => return track_error(session, frame_id, err),
        Err(err) => return track_error(session, frame_id, format!("encoder task: {err}")),
    };
    tokio::time::sleep_until(first_packet_at).await;
    let timestamp = track.rtp_timestamp(frame_pts(session, frame), frame_time_base(session, frame));
    for mut packet in packets {
        packet.header.timestamp = timestamp;
        packet.header.ssrc = track.ssrc;
        packet.header.payload_type = track.payload_type;
        let end_of_frame = packet.header.marker;
        let written =
            tokio::time::timeout(TRACK_WRITE_TIMEOUT, track.local.write_rtp(packet)).await;
        match written {
            Ok(Ok(())) => session.update(|report| {
                report.track_packets_sent += 1;
                if end_of_frame {
                    report.track_frames_sent += 1;
                    report.track_frame_ids.push(frame_id);
                }
            }),
            Ok(Err(err)) => return track_error(session, frame_id, format!("write_rtp: {err}")),
            Err(_) => {
                let err = format!("write_rtp took over {TRACK_WRITE_TIMEOUT:?}");
                return track_error(session, frame_id, err);
            }
        }
    }
}

fn track_error(session: &Session, frame_id: u32, err: String) {
    session.update(|report| report.track_errors.push(format!("frame {frame_id}: {err}")));
}

// ---------------------------------------------------------------------------
// Decoding with GStreamer (stands in for the server's PyAV)
// ---------------------------------------------------------------------------

/// Decodes `path`, sending each frame to `frames` (blocking). Stops at `limit`
/// frames, at end of stream, on error (a file FFmpeg cannot read gives zero
/// frames, §4), or when the receiver is gone.
fn decode_video(
    path: &Path,
    frames: &mpsc::Sender<DecodedFrame>,
    wants_jpeg: impl Fn() -> bool,
    limit: Option<u32>,
    track_image: bool,
) -> Result<u32, String> {
    gst::init().map_err(|e| e.to_string())?;
    let pipeline = gst::parse::launch(
        "filesrc name=src ! decodebin ! videoconvert ! video/x-raw,format=RGB ! appsink name=sink sync=false max-buffers=2",
    )
    .map_err(|e| e.to_string())?
    .downcast::<gst::Pipeline>()
    .map_err(|_| "not a pipeline".to_owned())?;
    let source = pipeline.by_name("src").ok_or("no filesrc")?;
    source.set_property("location", path.to_str().ok_or("temp path is not UTF-8")?);
    let sink = pipeline
        .by_name("sink")
        .ok_or("no appsink")?
        .downcast::<gst_app::AppSink>()
        .map_err(|_| "not an appsink".to_owned())?;
    let bus = pipeline.bus().ok_or("no bus")?;

    let result = (|| {
        pipeline
            .set_state(gst::State::Playing)
            .map_err(|e| e.to_string())?;
        let mut encoder: Option<JpegEncoder> = None;
        let mut count = 0u32;
        let deadline = Instant::now() + DECODE_TIMEOUT;
        while Instant::now() < deadline && limit.is_none_or(|limit| count < limit) {
            if let Some(sample) = sink.try_pull_sample(gst::ClockTime::from_mseconds(100)) {
                let jpeg = if wants_jpeg() {
                    let encoder = match &mut encoder {
                        Some(encoder) => encoder,
                        None => encoder.insert(JpegEncoder::new()?),
                    };
                    Some(encoder.encode(&sample)?)
                } else {
                    None
                };
                let mut frame = summarize_frame(&sample, jpeg)?;
                if track_image {
                    frame.image = Some(inverted_frame(&sample)?);
                }
                if frames.blocking_send(frame).is_err() {
                    break;
                }
                count += 1;
                continue;
            }
            if sink.is_eos() {
                break;
            }
            if let Some(message) = bus.pop_filtered(&[gst::MessageType::Error])
                && let gst::MessageView::Error(error) = message.view()
            {
                return Err(format!("decode error: {}", error.error()));
            }
        }
        Ok(count)
    })();
    let _ = pipeline.set_state(gst::State::Null);
    result
}

/// A decoded picture as the Workflow sees it, summarized off the runtime's
/// threads: its JPEG when the outputs want images (with the session's idle
/// encoder, kept in `jpeg`), and the inverted image for a returned track.
async fn summarize_sample(
    session: &Session,
    sample: gst::Sample,
    jpeg: &mut Option<JpegEncoder>,
) -> Result<DecodedFrame, String> {
    let wants_jpeg = session.outputs.lock().unwrap().wants_image();
    let track_image = session.track.is_some();
    let idle = jpeg.take();
    let (summary, idle) = tokio::task::spawn_blocking(move || {
        let mut idle = idle;
        let jpeg_bytes = if wants_jpeg {
            let encoder = match &mut idle {
                Some(encoder) => encoder,
                None => idle.insert(JpegEncoder::new()?),
            };
            Some(encoder.encode(&sample)?)
        } else {
            None
        };
        let mut summary = summarize_frame(&sample, jpeg_bytes)?;
        if track_image {
            summary.image = Some(inverted_frame(&sample)?);
        }
        Ok::<_, String>((summary, idle))
    })
    .await
    .map_err(|err| format!("summary task: {err}"))??;
    *jpeg = idle;
    Ok(summary)
}

fn summarize_frame(sample: &gst::Sample, jpeg: Option<Vec<u8>>) -> Result<DecodedFrame, String> {
    let caps = sample.caps().ok_or("sample without caps")?;
    let info = gst_video::VideoInfo::from_caps(caps).map_err(|e| e.to_string())?;
    let buffer = sample.buffer().ok_or("sample without buffer")?;
    let frame = gst_video::VideoFrameRef::from_buffer_ref_readable(buffer, &info)
        .map_err(|_| "map video frame".to_owned())?;
    let data = frame.plane_data(0).map_err(|e| e.to_string())?;
    let stride = frame.plane_stride()[0] as usize;
    let (width, height) = (info.width() as usize, info.height() as usize);
    // A 1-in-4 grid is plenty for a mean colour and keeps debug builds fast.
    const STEP: usize = 4;
    let mut sums = [0u64; 3];
    let mut pixels = 0u64;
    for row in (0..height).step_by(STEP) {
        let line = &data[row * stride..row * stride + width * 3];
        for pixel in line.chunks_exact(3).step_by(STEP) {
            sums[0] += u64::from(pixel[0]);
            sums[1] += u64::from(pixel[1]);
            sums[2] += u64::from(pixel[2]);
            pixels += 1;
        }
    }
    let pixels = pixels.max(1);
    let fps = info.fps();
    Ok(DecodedFrame {
        pts_ns: buffer.pts().map(|pts| pts.nseconds()),
        width: info.width(),
        height: info.height(),
        fps: (fps.numer() > 0 && fps.denom() > 0)
            .then(|| f64::from(fps.numer()) / f64::from(fps.denom())),
        mean_rgb: sums.map(|sum| (sum / pixels) as u8),
        jpeg,
        image: None,
        stream_pts: None,
    })
}

/// `appsrc ! jpegenc ! appsink`, one JPEG out per frame in.
struct JpegEncoder {
    pipeline: gst::Pipeline,
    source: gst_app::AppSrc,
    sink: gst_app::AppSink,
}

impl JpegEncoder {
    fn new() -> Result<JpegEncoder, String> {
        let pipeline = gst::parse::launch(&format!(
            "appsrc name=src format=time ! videoconvert ! jpegenc quality={JPEG_QUALITY} ! appsink name=sink sync=false"
        ))
        .map_err(|e| e.to_string())?
        .downcast::<gst::Pipeline>()
        .map_err(|_| "not a pipeline".to_owned())?;
        let source = pipeline
            .by_name("src")
            .and_then(|e| e.downcast::<gst_app::AppSrc>().ok())
            .ok_or("no appsrc")?;
        let sink = pipeline
            .by_name("sink")
            .and_then(|e| e.downcast::<gst_app::AppSink>().ok())
            .ok_or("no appsink")?;
        pipeline
            .set_state(gst::State::Playing)
            .map_err(|e| e.to_string())?;
        Ok(JpegEncoder {
            pipeline,
            source,
            sink,
        })
    }

    fn encode(&mut self, sample: &gst::Sample) -> Result<Vec<u8>, String> {
        self.source
            .push_sample(sample)
            .map_err(|e| format!("jpegenc push: {e}"))?;
        let encoded = self
            .sink
            .try_pull_sample(gst::ClockTime::from_seconds(10))
            .ok_or("jpegenc produced nothing within 10 s")?;
        let buffer = encoded.buffer().ok_or("jpeg sample without buffer")?;
        let map = buffer.map_readable().map_err(|e| e.to_string())?;
        Ok(map.as_slice().to_vec())
    }
}

impl Drop for JpegEncoder {
    fn drop(&mut self) {
        let _ = self.pipeline.set_state(gst::State::Null);
    }
}

// ---------------------------------------------------------------------------
// A slow server: throttled inbound datagrams
// ---------------------------------------------------------------------------

/// The tokio runtime, except that UDP sockets deliver DTLS datagrams (which
/// carry SCTP) at a limited rate.
#[derive(Debug)]
struct ThrottledRuntime {
    inner: TokioRuntime,
    time_per_byte: Duration,
    silenced: Arc<AtomicBool>,
    feedback: Arc<TrackFeedback>,
}

impl ThrottledRuntime {
    /// One reference chunk (with its header) per `delay`; nothing at all
    /// once `silenced` is set; the returned track's packets lost as
    /// `feedback` says.
    fn per_chunk(delay: Duration, silenced: Arc<AtomicBool>, feedback: Arc<TrackFeedback>) -> ThrottledRuntime {
        ThrottledRuntime {
            inner: TokioRuntime,
            time_per_byte: delay / (REFERENCE_CHUNK_SIZE + UPLOAD_HEADER_LEN) as u32,
            silenced,
            feedback,
        }
    }
}

impl Runtime for ThrottledRuntime {
    fn spawn(&self, future: Pin<Box<dyn Future<Output = ()> + Send>>) -> Box<dyn JoinHandle> {
        self.inner.spawn(future)
    }

    fn spawn_reactor(
        &self,
        reactor_pool_size: usize,
        future: Pin<Box<dyn Future<Output = ()> + Send>>,
    ) -> Box<dyn JoinHandle> {
        self.inner.spawn_reactor(reactor_pool_size, future)
    }

    fn wrap_udp_socket(
        &self,
        socket: std::net::UdpSocket,
    ) -> std::io::Result<Arc<dyn AsyncUdpSocket>> {
        let inner = self.inner.wrap_udp_socket(socket)?;
        Ok(Arc::new(ThrottledSocket {
            inner,
            time_per_byte: self.time_per_byte,
            silenced: self.silenced.clone(),
            feedback: self.feedback.clone(),
            state: Mutex::new(ThrottleState::default()),
        }))
    }

    fn wrap_tcp_listener(
        &self,
        listener: std::net::TcpListener,
    ) -> std::io::Result<Arc<dyn AsyncTcpListener>> {
        self.inner.wrap_tcp_listener(listener)
    }

    fn connect_tcp<'a>(
        &'a self,
        remote_addr: SocketAddr,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<Arc<dyn AsyncTcpStream>>> + Send + 'a>> {
        self.inner.connect_tcp(remote_addr)
    }

    fn resolve_host<'a>(
        &'a self,
        host: &'a str,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<SocketAddr>>> + Send + 'a>> {
        self.inner.resolve_host(host)
    }

    fn now(&self) -> Instant {
        self.inner.now()
    }

    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>> {
        self.inner.sleep(duration)
    }

    fn interval(&self, period: Duration) -> Box<dyn AsyncInterval> {
        self.inner.interval(period)
    }

    fn block_on(&self, future: Pin<Box<dyn Future<Output = ()> + '_>>) {
        self.inner.block_on(future)
    }

    fn yield_now(&self) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>> {
        self.inner.yield_now()
    }
}

/// Drains the kernel socket at once (nothing is dropped) into a queue, and
/// hands DTLS datagrams to the connection no faster than `time_per_byte`.
/// The client's SCTP data is then acknowledged at that pace, which is what
/// a slow server looks like from the client. STUN (ICE checks and consent)
/// is never held back.
#[derive(Debug)]
struct ThrottledSocket {
    inner: Arc<dyn AsyncUdpSocket>,
    time_per_byte: Duration,
    silenced: Arc<AtomicBool>,
    feedback: Arc<TrackFeedback>,
    state: Mutex<ThrottleState>,
}

#[derive(Default)]
struct ThrottleState {
    queue: VecDeque<(Vec<u8>, RecvMeta)>,
    next_release: Option<tokio::time::Instant>,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    scratch: Vec<u8>,
}

impl std::fmt::Debug for ThrottleState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThrottleState")
            .field("queued", &self.queue.len())
            .finish()
    }
}

/// Bounds one drain of the kernel socket, so a flood cannot starve the driver.
const THROTTLE_DRAIN_BATCH: usize = 256;
const MAX_DATAGRAM: usize = 64 * 1024;

impl ThrottledSocket {
    /// Moves whatever the kernel holds into the queue, splitting GRO batches.
    /// Returns an error only when nothing is queued to deliver instead.
    fn drain_kernel(
        &self,
        cx: &mut Context<'_>,
        state: &mut ThrottleState,
    ) -> Option<std::io::Error> {
        if state.scratch.len() < MAX_DATAGRAM {
            state.scratch.resize(MAX_DATAGRAM, 0);
        }
        for _ in 0..THROTTLE_DRAIN_BATCH {
            let mut meta = [RecvMeta::default()];
            let received = {
                let mut bufs = [IoSliceMut::new(&mut state.scratch)];
                self.inner.poll_recv(cx, &mut bufs, &mut meta)
            };
            match received {
                Poll::Pending => return None,
                Poll::Ready(Err(err)) => return Some(err),
                Poll::Ready(Ok(0)) => return None,
                Poll::Ready(Ok(_)) => {
                    let meta = meta[0];
                    let stride = meta.stride.max(1);
                    for datagram in state.scratch[..meta.len].chunks(stride) {
                        let mut single = meta;
                        single.len = datagram.len();
                        single.stride = datagram.len().max(1);
                        state.queue.push_back((datagram.to_vec(), single));
                    }
                }
            }
        }
        None
    }
}

impl AsyncUdpSocket for ThrottledSocket {
    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn poll_send(
        &self,
        cx: &mut Context<'_>,
        transmit: &Transmit<'_>,
    ) -> Poll<std::io::Result<usize>> {
        if self.silenced.load(Ordering::Relaxed) {
            // Lost on the way, as to a dead process.
            return Poll::Ready(Ok(transmit.contents.len()));
        }
        if let Some(loss) = &self.feedback.loss {
            match loss.fate(transmit.contents) {
                Fate::Sent => {}
                Fate::Lost => return Poll::Ready(Ok(transmit.contents.len())),
                Fate::Delayed(delay) => {
                    let inner = self.inner.clone();
                    let (destination, ecn, src_ip) = (transmit.destination, transmit.ecn, transmit.src_ip);
                    let contents = transmit.contents.to_vec();
                    tokio::spawn(async move {
                        tokio::time::sleep(delay).await;
                        let later = Transmit { destination, ecn, contents: &contents, segment_size: None, src_ip };
                        let _ = std::future::poll_fn(|cx| inner.poll_send(cx, &later)).await;
                    });
                    return Poll::Ready(Ok(transmit.contents.len()));
                }
            }
        }
        self.inner.poll_send(cx, transmit)
    }

    fn max_gso_segments(&self) -> usize {
        // One datagram per send when packets are to be lost one by one.
        if self.feedback.loss.is_some() {
            1
        } else {
            self.inner.max_gso_segments()
        }
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<std::io::Result<usize>> {
        let mut state = self.state.lock().unwrap();
        let error = self.drain_kernel(cx, &mut state);
        if self.silenced.load(Ordering::Relaxed) {
            state.queue.clear();
            return Poll::Pending;
        }
        loop {
            if state.queue.is_empty() {
                return match error {
                    Some(err) => Poll::Ready(Err(err)),
                    None => Poll::Pending,
                };
            }
            let now = tokio::time::Instant::now();
            let held_until = state.next_release.filter(|release| *release > now);
            let next = match held_until {
                None => Some(0),
                Some(_) => state
                    .queue
                    .iter()
                    .position(|(datagram, _)| !is_dtls(datagram)),
            };
            let Some(index) = next else {
                let release = held_until.unwrap();
                let timer = state
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(release)));
                if timer.deadline() != release {
                    timer.as_mut().reset(release);
                }
                if timer.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                continue;
            };
            let (datagram, mut datagram_meta) = state.queue.remove(index).unwrap();
            if is_dtls(&datagram) {
                let start = state.next_release.map_or(now, |release| release.max(now));
                state.next_release = Some(start + self.time_per_byte * datagram.len() as u32);
            }
            let Some(buf) = bufs.first_mut() else {
                return Poll::Ready(Ok(0));
            };
            let len = datagram.len().min(buf.len());
            buf[..len].copy_from_slice(&datagram[..len]);
            datagram_meta.len = len;
            datagram_meta.stride = len.max(1);
            meta[0] = datagram_meta;
            return Poll::Ready(Ok(1));
        }
    }
}

/// The returned track's feedback path: the packets lost on the wire
/// (`track_lose_packets`), the retransmissions seen, the client's keyframe
/// requests.
#[derive(Debug)]
struct TrackFeedback {
    loss: Option<TrackLoss>,
    keyframe_requests: std::sync::atomic::AtomicU32,
    /// Requests answered with no keyframe (`track_ignore_keyframe_requests`).
    ignore_keyframe_requests: u32,
    /// The next frame is encoded as a keyframe.
    keyframe_wanted: AtomicBool,
}

impl TrackFeedback {
    fn new(config: &WorkerConfig) -> TrackFeedback {
        TrackFeedback {
            loss: (!config.track_lose_packets.is_empty()).then(|| TrackLoss {
                lose: config.track_lose_packets.clone(),
                retransmissions_too: config.track_lose_retransmissions,
                retransmission_delay: config.track_retransmission_delay,
                state: Mutex::new(TrackLossState::default()),
            }),
            keyframe_requests: Default::default(),
            ignore_keyframe_requests: config.track_ignore_keyframe_requests,
            keyframe_wanted: AtomicBool::new(false),
        }
    }

    fn fill(&self, report: &mut SessionReport) {
        report.track_keyframe_requests = self.keyframe_requests.load(Ordering::Relaxed);
        if let Some(loss) = &self.loss {
            let state = loss.state.lock().unwrap();
            report.track_packets_lost = state.lost;
            report.track_retransmissions = state.retransmissions;
        }
    }
}

/// What the worker's wire does with an outgoing datagram.
enum Fate {
    Sent,
    Lost,
    Delayed(Duration),
}

#[derive(Debug)]
struct TrackLoss {
    lose: Vec<u32>,
    retransmissions_too: bool,
    retransmission_delay: Duration,
    state: Mutex<TrackLossState>,
}

#[derive(Debug, Default)]
struct TrackLossState {
    /// The track's SSRC: the first RTP packet's; another is RTX.
    media_ssrc: Option<u32>,
    first_transmissions: u32,
    sent: std::collections::HashSet<u16>,
    lost: u32,
    retransmissions: u32,
}

impl TrackLoss {
    /// What becomes of this outgoing datagram. Only RTP is lost or delayed
    /// (RFC 7983: 128-191, and not RTCP's packet types 192-223 in the
    /// second byte); SRTP leaves the header, so its SSRC and sequence
    /// number, in clear.
    fn fate(&self, datagram: &[u8]) -> Fate {
        if datagram.len() < 12 || !(128..=191).contains(&datagram[0]) || (192..=223).contains(&datagram[1]) {
            return Fate::Sent;
        }
        let sequence = u16::from_be_bytes([datagram[2], datagram[3]]);
        let ssrc = u32::from_be_bytes([datagram[8], datagram[9], datagram[10], datagram[11]]);
        let mut state = self.state.lock().unwrap();
        let media_ssrc = *state.media_ssrc.get_or_insert(ssrc);
        if ssrc != media_ssrc || !state.sent.insert(sequence) {
            state.retransmissions += 1;
            return match (self.retransmissions_too, self.retransmission_delay) {
                (true, _) => Fate::Lost,
                (false, Duration::ZERO) => Fate::Sent,
                (false, delay) => Fate::Delayed(delay),
            };
        }
        state.first_transmissions += 1;
        let lost = self.lose.contains(&state.first_transmissions);
        state.lost += u32::from(lost);
        if lost { Fate::Lost } else { Fate::Sent }
    }
}

/// Counts the client's keyframe requests (PLI, FIR) and has the next frame
/// encoded as a keyframe, as aiortc's sender does.
struct KeyframeRequestCounter {
    feedback: Arc<TrackFeedback>,
    inbound: VecDeque<TaggedPacket>,
    outbound: VecDeque<TaggedPacket>,
}

impl KeyframeRequestCounter {
    fn new(feedback: Arc<TrackFeedback>) -> KeyframeRequestCounter {
        KeyframeRequestCounter { feedback, inbound: VecDeque::new(), outbound: VecDeque::new() }
    }
}

impl Protocol<TaggedPacket, TaggedPacket, ()> for KeyframeRequestCounter {
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = rtc::shared::error::Error;
    type Time = Instant;

    fn handle_read(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        if let ChainPacket::Rtcp(packets) = &msg.message.packet {
            let requests = packets
                .iter()
                .filter(|packet| packet.as_any().is::<PictureLossIndication>() || packet.as_any().is::<FullIntraRequest>())
                .count() as u32;
            if requests > 0 {
                let before = self.feedback.keyframe_requests.fetch_add(requests, Ordering::Relaxed);
                if before + requests > self.feedback.ignore_keyframe_requests {
                    self.feedback.keyframe_wanted.store(true, Ordering::Relaxed);
                }
            }
        }
        self.inbound.push_back(msg);
        Ok(())
    }

    fn poll_read(&mut self) -> Option<Self::Rout> {
        self.inbound.pop_front()
    }

    fn handle_write(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        self.outbound.push_back(msg);
        Ok(())
    }

    fn poll_write(&mut self) -> Option<Self::Wout> {
        self.outbound.pop_front()
    }
}

impl Interceptor for KeyframeRequestCounter {
    fn bind_local_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_local_stream(&mut self, _info: &StreamInfo) {}
    fn bind_remote_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_remote_stream(&mut self, _info: &StreamInfo) {}
}

/// RFC 7983 demultiplexing: 20-63 is DTLS (everything but STUN, 0-3, here).
fn is_dtls(datagram: &[u8]) -> bool {
    matches!(datagram.first(), Some(20..=63))
}

// ---------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// UTC now as ISO 8601 with microseconds, like Python's `datetime.isoformat()`.
fn iso_time_now() -> String {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let seconds = since_epoch.as_secs();
    let (year, month, day) = civil_date(seconds / 86_400);
    let time_of_day = seconds % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}+00:00",
        time_of_day / 3600,
        time_of_day / 60 % 60,
        time_of_day % 60,
        since_epoch.subsec_micros()
    )
}

/// Gregorian (year, month, day) of a count of days since 1970-01-01.
fn civil_date(days_since_epoch: u64) -> (u64, u64, u64) {
    // Count from 0000-03-01 so that the leap day ends each 4/100/400-year cycle.
    let days = days_since_epoch + 719_468;
    let era = days / 146_097;
    let day_of_era = days % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

const BOMB_BLOCK: usize = 1 << 20;
const BOMB_BLOCKS: usize = 1024;

/// A single-member gzip stream of 1 GiB of zeros, about 1 MB long, built once.
pub fn gzip_bomb() -> &'static [u8] {
    static BOMB: OnceLock<Vec<u8>> = OnceLock::new();
    BOMB.get_or_init(build_gzip_bomb)
}

/// Compressing 1 GiB is slow in a debug build. Each 1 MiB block of zeros,
/// sync-flushed, compresses to the same bytes once the window is all zeros,
/// so a few blocks are compressed and the steady one is repeated; the CRC is
/// combined the same way.
fn build_gzip_bomb() -> Vec<u8> {
    let zeros = vec![0u8; BOMB_BLOCK];
    let mut compressor = Compress::new(Compression::best(), false);
    let mut deflate = Vec::new();
    let mut previous: Option<Vec<u8>> = None;
    let mut steady: Option<Vec<u8>> = None;
    let mut blocks_done = 0;
    while blocks_done < BOMB_BLOCKS {
        if let Some(block) = &steady {
            deflate.extend_from_slice(block);
        } else {
            let block = deflate_step(&mut compressor, &zeros, FlushCompress::Sync);
            deflate.extend_from_slice(&block);
            if previous.as_ref() == Some(&block) {
                steady = Some(block);
            } else {
                previous = Some(block);
            }
        }
        blocks_done += 1;
    }
    // Only ends the stream: an empty final block, whatever the compressor saw.
    deflate.extend_from_slice(&deflate_step(&mut compressor, &[], FlushCompress::Finish));
    let mut block_crc = flate2::Crc::new();
    block_crc.update(&zeros);
    let mut crc = flate2::Crc::new();
    for _ in 0..BOMB_BLOCKS {
        crc.combine(&block_crc);
    }
    let mut gzip = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];
    gzip.extend_from_slice(&deflate);
    gzip.extend_from_slice(&crc.sum().to_le_bytes());
    gzip.extend_from_slice(&((BOMB_BLOCK * BOMB_BLOCKS) as u32).to_le_bytes());
    gzip
}

fn deflate_step(compressor: &mut Compress, input: &[u8], flush: FlushCompress) -> Vec<u8> {
    let start = compressor.total_in();
    let mut output = Vec::with_capacity(64 * 1024);
    loop {
        let consumed = (compressor.total_in() - start) as usize;
        if output.capacity() - output.len() < 1024 {
            output.reserve(64 * 1024);
        }
        let status = compressor
            .compress_vec(&input[consumed..], &mut output, flush)
            .expect("deflate into memory");
        let all_in = (compressor.total_in() - start) as usize == input.len();
        let room_left = output.capacity() - output.len() >= 1024;
        match flush {
            FlushCompress::Finish if status == flate2::Status::StreamEnd => return output,
            FlushCompress::Finish => {}
            _ if all_in && room_left => return output,
            _ => {}
        }
    }
}
