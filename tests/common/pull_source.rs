//! Server-pull sources (PROTOCOL §11): the test worker reads a camera
//! itself, as the server does for the SDK's RTSPSource and MJPEGSource.
//!
//! A child module of `worker.rs` (it shares the session, the results and
//! the returned track). What the real server (1.8.3) does, and so this:
//!
//! - **Opening.** `rtsp_url` with realtime processing, and `mjpeg_url` in
//!   either mode, are opened before the answer; a failure is HTTP 500
//!   `{"message":"Internal error."}`. MJPEG is fetched over HTTP (5 s
//!   timeout, at most 5 redirects, http/https only) and refused on a
//!   non-global address unless `mjpeg_allow_non_global_addresses`. RTSP
//!   without realtime processing is answered at once and read by a thread
//!   that fails at the first frame: FFmpeg gives the first decoded RTSP
//!   frame no pts and the server's reader raises on it. That session
//!   processes nothing.
//! - **Start.** With `stream_output: []` processing starts at once, before
//!   the client can have opened `inference`; otherwise the returned track's
//!   sender pulls frames once the connection is up. Results for frames
//!   processed while `inference` is not open are dropped silently, but the
//!   frames still count in `frame_id`.
//! - **Pacing.** Frames queue without bound (aiortc's MediaPlayer). Each is
//!   handed out no earlier than its time since the first one handed out
//!   (the player's playback throttle). Realtime processing trims the queue
//!   to the newest [`REALTIME_QUEUE_KEEP`] before each frame; otherwise
//!   acks pace the results as in file mode.
//! - **pts.** RTSP: 90 kHz, rebased to the first frame with a pts (the
//!   first decoded frame has none and is skipped, as the player does).
//!   MJPEG: FFmpeg's mpjpeg demuxer numbers the pictures in a 1/25 s time
//!   base whatever the camera's rate, so `pts` is the picture's index and
//!   `time_base` 0.04 (checked with PyAV against the test camera).
//! - **End.** End of stream or a read error: `processing_complete` with
//!   `termination_reason: null`, sent only if `inference` is open then (the
//!   server skips it otherwise, and the client never hears of the end).
//!   `processing_timeout`: `"timeout_reached"`, and the server closes. After
//!   the end of stream the server does not close: the client does (§5).

use std::collections::VecDeque;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, ToSocketAddrs as _};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gst::prelude::*;
use serde_json::{Value, json};
use tokio::sync::Notify;

use super::{
    CLOSE_LINGER, DecodedFrame, JpegEncoder, RtpEncoder, Session, WorkerConfig, deliver_result,
    iso_time_now, send_completion, send_track_frame, summarize_sample, wait_for_ack_window,
};

/// The server drains its player's queue to this many frames before each
/// frame in realtime mode (`webrtc.py`: `while qsize() > 30`).
const REALTIME_QUEUE_KEEP: usize = 30;
/// `inference/core/utils/mjpeg.py`: `MJPEG_TIMEOUT_SECONDS`, `MJPEG_MAX_REDIRECTS`.
const MJPEG_TIMEOUT: Duration = Duration::from_secs(5);
const MJPEG_MAX_REDIRECTS: usize = 5;
/// FFmpeg's mpjpeg demuxer: pts counts pictures in this time base.
const MJPEG_TIME_BASE: (u32, u32) = (1, 25);
const RTSP_TIME_BASE: (u32, u32) = (1, 90_000);
/// How long an open may take here before it counts as failed (FFmpeg's
/// 2 s socket timeout, a few times over).
const OPEN_TIMEOUT: Duration = Duration::from_secs(5);
/// Setting the source pipeline to NULL (rtspsrc sends a TEARDOWN) is
/// waited for this long at most.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
const HTTP_READ_CHUNK: usize = 64 * 1024;
const MAX_RESPONSE_HEAD: usize = 16 * 1024;

/// The real server's answer to a source it cannot open (its worker raises
/// before an answer exists, the HTTP layer hides why).
pub(super) fn open_failure_body() -> Value {
    json!({"message": "Internal error."})
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum PullKind {
    Rtsp,
    Mjpeg,
}

impl PullKind {
    pub(super) fn name(self) -> &'static str {
        match self {
            PullKind::Rtsp => "rtsp",
            PullKind::Mjpeg => "mjpeg",
        }
    }
}

/// The source a request names: `rtsp_url` first, as the server checks it first.
#[derive(Clone, Debug)]
pub(super) struct PullRequest {
    pub kind: PullKind,
    pub url: String,
}

pub(super) fn pull_request(request: &Value) -> Option<PullRequest> {
    let named = |field: &str| {
        request[field]
            .as_str()
            .filter(|url| !url.is_empty())
            .map(str::to_owned)
    };
    if let Some(url) = named("rtsp_url") {
        return Some(PullRequest {
            kind: PullKind::Rtsp,
            url,
        });
    }
    named("mjpeg_url").map(|url| PullRequest {
        kind: PullKind::Mjpeg,
        url,
    })
}

/// 422 entries for `rtsp_url`/`mjpeg_url` that are neither strings nor null.
pub(super) fn url_shape_errors(request: &Value) -> Vec<Value> {
    ["rtsp_url", "mjpeg_url"]
        .iter()
        .filter(|field| !matches!(request.get(**field), None | Some(Value::Null) | Some(Value::String(_))))
        .map(|field| json!({"loc": ["body", field], "msg": "str type expected", "type": "type_error.str"}))
        .collect()
}

// ---------------------------------------------------------------------------
// The frames read
// ---------------------------------------------------------------------------

/// A decoded RGB picture and its time since the first one, in the time
/// base its results report.
pub(super) struct PulledFrame {
    sample: gst::Sample,
    pts: u64,
}

/// The player's queue: every picture read waits here, in order.
#[derive(Default)]
pub(super) struct PullQueue {
    state: Mutex<QueueState>,
    changed: Notify,
}

#[derive(Default)]
struct QueueState {
    frames: VecDeque<PulledFrame>,
    /// Pictures out of the decoder, the first (no pts) one included.
    decoded: u32,
    /// Pictures put in the queue (all but RTSP's first).
    queued: u32,
    /// The first picture's buffer pts (RTSP), to rebase the others on.
    first_pts_ns: Option<u64>,
    ended: bool,
    error: Option<String>,
}

impl PullQueue {
    /// Streaming thread: a picture out of the decoder.
    fn push_picture(&self, kind: PullKind, sample: &gst::Sample) {
        let Some(buffer) = sample.buffer() else {
            return;
        };
        let mut state = self.state.lock().unwrap();
        if state.ended {
            return;
        }
        state.decoded += 1;
        let pts = match kind {
            // FFmpeg's first decoded RTSP frame has no pts; the player skips
            // it and rebases on the next one.
            PullKind::Rtsp if state.decoded == 1 => return,
            PullKind::Rtsp => {
                let pts_ns = buffer.pts().map_or(0, |pts| pts.nseconds());
                let first = *state.first_pts_ns.get_or_insert(pts_ns);
                pts_ns.saturating_sub(first) * 90_000 / 1_000_000_000
            }
            PullKind::Mjpeg => u64::from(state.decoded - 1),
        };
        // A copy, so waiting pictures hold no decoder buffers.
        let Ok(copy) = buffer.copy_deep() else { return };
        let caps = sample.caps().map(|caps| caps.to_owned());
        let mut builder = gst::Sample::builder().buffer(&copy);
        if let Some(caps) = &caps {
            builder = builder.caps(caps);
        }
        state.frames.push_back(PulledFrame {
            sample: builder.build(),
            pts,
        });
        state.queued += 1;
        drop(state);
        self.changed.notify_one();
    }

    fn end(&self, error: Option<String>) {
        let mut state = self.state.lock().unwrap();
        if !state.ended {
            state.ended = true;
            state.error = error;
        }
        drop(state);
        self.changed.notify_one();
    }

    fn decoded(&self) -> u32 {
        self.state.lock().unwrap().decoded
    }

    fn queued(&self) -> u32 {
        self.state.lock().unwrap().queued
    }

    fn ended(&self) -> Option<Option<String>> {
        let state = self.state.lock().unwrap();
        state.ended.then(|| state.error.clone())
    }

    /// Realtime: drops the oldest waiting frames beyond `keep`; how many.
    fn trim(&self, keep: usize) -> u32 {
        let mut state = self.state.lock().unwrap();
        let excess = state.frames.len().saturating_sub(keep);
        state.frames.drain(..excess);
        excess as u32
    }

    /// The next frame, or `None` once the source has ended and nothing waits.
    async fn pop(&self) -> Option<PulledFrame> {
        loop {
            let changed = self.changed.notified();
            {
                let mut state = self.state.lock().unwrap();
                if let Some(frame) = state.frames.pop_front() {
                    return Some(frame);
                }
                if state.ended {
                    return None;
                }
            }
            changed.await;
        }
    }

    fn waiting(&self) -> usize {
        self.state.lock().unwrap().frames.len()
    }
}

// ---------------------------------------------------------------------------
// Opening a source
// ---------------------------------------------------------------------------

/// A source being read: its pipeline runs on its own threads and fills the queue.
pub(super) struct PullSource {
    pub kind: PullKind,
    pipeline: gst::Pipeline,
    pub queue: Arc<PullQueue>,
    /// MJPEG: the HTTP connection, shut down to stop its reader at once.
    http: Option<TcpStream>,
    stop: Arc<AtomicBool>,
}

impl PullSource {
    /// Opens `url` and waits (blocking, bounded) for its first picture or
    /// its failure. `config` decides what MJPEG may reach.
    pub(super) fn open(request: &PullRequest, config: &WorkerConfig) -> Result<PullSource, String> {
        gst::init().map_err(|e| e.to_string())?;
        let source = match request.kind {
            PullKind::Rtsp => PullSource::start_rtsp(&request.url)?,
            PullKind::Mjpeg => {
                let (stream, already_read) =
                    http_get_mjpeg(&request.url, config.mjpeg_allow_non_global_addresses)?;
                PullSource::start_mjpeg(stream, already_read)?
            }
        };
        let opened_at = Instant::now();
        let deadline = opened_at + OPEN_TIMEOUT;
        loop {
            if source.queue.decoded() > 0 {
                break;
            }
            if let Some(error) = source.queue.ended() {
                source.stop();
                return Err(
                    error.unwrap_or_else(|| "the stream ended before its first picture".to_owned())
                );
            }
            if Instant::now() >= deadline {
                source.stop();
                return Err(format!("no picture within {OPEN_TIMEOUT:?}"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        // FFmpeg probes an RTSP stream before av.open returns: the
        // pictures read meanwhile wait in the queue.
        if request.kind == PullKind::Rtsp
            && let Some(rest) = config.rtsp_open_time.checked_sub(opened_at.elapsed())
        {
            std::thread::sleep(rest);
        }
        Ok(source)
    }

    fn start_rtsp(url: &str) -> Result<PullSource, String> {
        let pipeline = gst::Pipeline::new();
        let source = gst::ElementFactory::make("rtspsrc")
            .property("location", url)
            .property_from_str("protocols", "tcp")
            .property("latency", 0u32)
            // The pts from the RTP timestamps alone, as FFmpeg has them (the
            // default mode smooths arrival times into them).
            .property_from_str("buffer-mode", "none")
            .build()
            .map_err(|e| format!("rtspsrc: {e}"))?;
        let decode = gst::ElementFactory::make("decodebin")
            .build()
            .map_err(|e| format!("decodebin: {e}"))?;
        link_when_added(&source, &decode);
        pipeline
            .add_many([&source, &decode])
            .map_err(|e| e.to_string())?;
        PullSource::finish(PullKind::Rtsp, pipeline, decode, None)
    }

    fn start_mjpeg(stream: TcpStream, already_read: Vec<u8>) -> Result<PullSource, String> {
        let pipeline = gst::Pipeline::new();
        let appsrc = gst_app::AppSrc::builder()
            .is_live(true)
            .caps(&gst::Caps::new_empty_simple("multipart/x-mixed-replace"))
            .build();
        let demux = gst::ElementFactory::make("multipartdemux")
            .build()
            .map_err(|e| format!("multipartdemux: {e}"))?;
        let decode = gst::ElementFactory::make("decodebin")
            .build()
            .map_err(|e| format!("decodebin: {e}"))?;
        link_when_added(&demux, &decode);
        pipeline
            .add_many([appsrc.upcast_ref(), &demux, &decode])
            .map_err(|e| e.to_string())?;
        appsrc.link(&demux).map_err(|e| e.to_string())?;
        let reader = stream.try_clone().map_err(|e| e.to_string())?;
        let source = PullSource::finish(PullKind::Mjpeg, pipeline, decode, Some(stream))?;
        let stop = source.stop.clone();
        let queue = source.queue.clone();
        std::thread::Builder::new()
            .name("pull-mjpeg-http".into())
            .spawn(move || feed_http_body(reader, already_read, &appsrc, &stop, &queue))
            .map_err(|e| format!("spawn the HTTP reader: {e}"))?;
        Ok(source)
    }

    /// decodebin ! videoconvert ! RGB ! appsink into the queue, then PLAYING.
    fn finish(
        kind: PullKind,
        pipeline: gst::Pipeline,
        decode: gst::Element,
        http: Option<TcpStream>,
    ) -> Result<PullSource, String> {
        let convert = gst::ElementFactory::make("videoconvert")
            .build()
            .map_err(|e| format!("videoconvert: {e}"))?;
        let sink = gst_app::AppSink::builder()
            .caps(
                &gst::Caps::builder("video/x-raw")
                    .field("format", "RGB")
                    .build(),
            )
            .sync(false)
            .build();
        pipeline
            .add_many([&convert, sink.upcast_ref()])
            .map_err(|e| e.to_string())?;
        convert.link(&sink).map_err(|e| e.to_string())?;
        decode.connect_pad_added({
            let convert = convert.downgrade();
            move |_, pad| {
                let is_video = pad
                    .current_caps()
                    .and_then(|caps| caps.structure(0).map(|s| s.name().starts_with("video/")))
                    .unwrap_or(false);
                if let Some(sink) = convert
                    .upgrade()
                    .and_then(|convert| convert.static_pad("sink"))
                    && is_video
                    && !sink.is_linked()
                {
                    let _ = pad.link(&sink);
                }
            }
        });
        let queue = Arc::new(PullQueue::default());
        sink.set_callbacks(
            gst_app::AppSinkCallbacks::builder()
                .new_sample({
                    let queue = queue.clone();
                    move |sink| {
                        let sample = sink.pull_sample().map_err(|_| gst::FlowError::Eos)?;
                        queue.push_picture(kind, &sample);
                        Ok(gst::FlowSuccess::Ok)
                    }
                })
                .eos({
                    let queue = queue.clone();
                    move |_| queue.end(None)
                })
                .build(),
        );
        let bus = pipeline.bus().ok_or("the source pipeline has no bus")?;
        bus.set_sync_handler({
            let queue = queue.clone();
            move |_, message| {
                if let gst::MessageView::Error(error) = message.view() {
                    queue.end(Some(format!(
                        "{} ({})",
                        error.error(),
                        error.debug().unwrap_or_default()
                    )));
                }
                gst::BusSyncReply::Drop
            }
        });
        let source = PullSource {
            kind,
            pipeline,
            queue,
            http,
            stop: Arc::new(AtomicBool::new(false)),
        };
        if let Err(err) = source.pipeline.set_state(gst::State::Playing) {
            source.stop();
            return Err(format!("the source pipeline does not start: {err}"));
        }
        Ok(source)
    }

    /// Stops reading: the HTTP connection is cut, the pipeline goes to
    /// NULL (blocking; rtspsrc sends its TEARDOWN).
    pub(super) fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(stream) = &self.http {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
        self.queue.end(None);
        let _ = self.pipeline.set_state(gst::State::Null);
    }
}

impl Drop for PullSource {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Stops `source` off the runtime's threads, bounded; true once stopped.
pub(super) async fn stop_source(source: PullSource) -> bool {
    let stopping = tokio::task::spawn_blocking(move || drop(source));
    matches!(
        tokio::time::timeout(STOP_TIMEOUT, stopping).await,
        Ok(Ok(()))
    )
}

// ---------------------------------------------------------------------------
// MJPEG over HTTP, the way the server fetches it
// ---------------------------------------------------------------------------

/// GETs `url` following at most 5 redirects, each hop checked like the
/// server's SSRF-protected adapter; returns the connection positioned in
/// the 2xx body, and the body bytes already read with the head.
fn http_get_mjpeg(url: &str, allow_non_global: bool) -> Result<(TcpStream, Vec<u8>), String> {
    let mut url = url::Url::parse(url).map_err(|e| format!("MJPEG URL '{url}': {e}"))?;
    for redirect in 0..=MJPEG_MAX_REDIRECTS {
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err("MJPEG requires an HTTP(S) URL with a valid host".to_owned());
        }
        if url.scheme() == "https" {
            return Err("the test worker fetches no https MJPEG streams".to_owned());
        }
        let address = resolve_checked(&url, allow_non_global)?;
        let mut stream = TcpStream::connect_timeout(&address, MJPEG_TIMEOUT)
            .map_err(|e| format!("connect {address}: {e}"))?;
        stream
            .set_read_timeout(Some(MJPEG_TIMEOUT))
            .map_err(|e| e.to_string())?;
        stream
            .set_write_timeout(Some(MJPEG_TIMEOUT))
            .map_err(|e| e.to_string())?;
        let mut target = url.path().to_owned();
        if let Some(query) = url.query() {
            target = format!("{target}?{query}");
        }
        let host = match url.port() {
            Some(port) => format!("{}:{port}", url.host_str().unwrap_or_default()),
            None => url.host_str().unwrap_or_default().to_owned(),
        };
        write!(
            stream,
            "GET {target} HTTP/1.1\r\nHost: {host}\r\nAccept: */*\r\nConnection: close\r\n\r\n"
        )
        .map_err(|e| format!("send the request: {e}"))?;
        let mut reader = BufReader::new(stream.try_clone().map_err(|e| e.to_string())?);
        let mut status_line = String::new();
        reader
            .read_line(&mut status_line)
            .map_err(|e| format!("read the status: {e}"))?;
        let status: u16 = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| format!("not an HTTP status line: {status_line:?}"))?;
        let mut location = None;
        let mut head_len = status_line.len();
        loop {
            let mut line = String::new();
            let read = reader
                .read_line(&mut line)
                .map_err(|e| format!("read the headers: {e}"))?;
            head_len += read;
            if read == 0 || line == "\r\n" || line == "\n" {
                break;
            }
            if head_len > MAX_RESPONSE_HEAD {
                return Err("response head too long".to_owned());
            }
            if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("location")
            {
                location = Some(value.trim().to_owned());
            }
        }
        if matches!(status, 301 | 302 | 303 | 307 | 308) {
            if redirect == MJPEG_MAX_REDIRECTS {
                return Err("Too many MJPEG redirects".to_owned());
            }
            let location = location.ok_or("redirect without Location")?;
            url = url
                .join(&location)
                .map_err(|e| format!("redirect to '{location}': {e}"))?;
            continue;
        }
        if !(200..300).contains(&status) {
            return Err(format!("HTTP {status}"));
        }
        let already_read = reader.buffer().to_vec();
        return Ok((stream, already_read));
    }
    Err("Too many MJPEG redirects".to_owned())
}

/// The address to connect to for `url`, refused when non-global unless
/// allowed. Only IP literals and `localhost` are resolved: the test worker
/// talks to nothing but loopback.
fn resolve_checked(url: &url::Url, allow_non_global: bool) -> Result<SocketAddr, String> {
    let port = url.port_or_known_default().ok_or("no port")?;
    let ip: IpAddr = match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.into(),
        Some(url::Host::Ipv6(ip)) => ip.into(),
        Some(url::Host::Domain(name)) if name.eq_ignore_ascii_case("localhost") => {
            ("localhost", port)
                .to_socket_addrs()
                .map_err(|e| format!("resolve localhost: {e}"))?
                .next()
                .ok_or("localhost resolves to nothing")?
                .ip()
        }
        Some(url::Host::Domain(name)) => {
            return Err(format!(
                "the test worker resolves no names but localhost ('{name}')"
            ));
        }
        None => return Err("no host".to_owned()),
    };
    if !allow_non_global && !is_global(ip) {
        return Err(format!("URL points to non-global address '{ip}'."));
    }
    Ok(SocketAddr::new(ip, port))
}

/// Python's `ipaddress.is_global` (and not multicast), as the server checks.
fn is_global(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(ip) => is_global_v4(ip),
        IpAddr::V6(ip) => match ip.to_ipv4_mapped() {
            Some(mapped) => is_global_v4(mapped),
            None => is_global_v6(ip),
        },
    }
}

fn is_global_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    let shared = a == 100 && (64..128).contains(&b);
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_broadcast()
        || ip.is_documentation()
        || ip.is_multicast()
        || shared
        || a == 0
        || a >= 240
        || (a == 192 && b == 0 && ip.octets()[2] == 0)
        || (a == 198 && (18..20).contains(&b)))
}

fn is_global_v6(ip: Ipv6Addr) -> bool {
    let first = ip.segments()[0];
    let unique_local = first & 0xfe00 == 0xfc00;
    let link_local = first & 0xffc0 == 0xfe80;
    let documentation = first == 0x2001 && ip.segments()[1] == 0x0db8;
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        || unique_local
        || link_local
        || documentation)
}

/// The HTTP reader thread: the body into appsrc until the connection ends
/// or the source stops.
fn feed_http_body(
    mut stream: TcpStream,
    already_read: Vec<u8>,
    appsrc: &gst_app::AppSrc,
    stop: &AtomicBool,
    queue: &PullQueue,
) {
    if !already_read.is_empty()
        && appsrc
            .push_buffer(gst::Buffer::from_mut_slice(already_read))
            .is_err()
    {
        return;
    }
    let mut chunk = vec![0u8; HTTP_READ_CHUNK];
    while !stop.load(Ordering::SeqCst) {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(read) => {
                if appsrc
                    .push_buffer(gst::Buffer::from_mut_slice(chunk[..read].to_vec()))
                    .is_err()
                {
                    return;
                }
            }
            Err(err)
                if matches!(
                    err.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                // The server's reader times out the same way.
                queue.end(Some(
                    "Could not read MJPEG stream (failed or timed out)".to_owned(),
                ));
                return;
            }
            Err(_) => break,
        }
    }
    let _ = appsrc.end_of_stream();
}

// ---------------------------------------------------------------------------
// The session's side
// ---------------------------------------------------------------------------

/// A pull session's source between the answer and the start of processing.
pub(super) enum PendingPull {
    /// Opened before the answer (realtime RTSP, MJPEG).
    Opened(PullSource),
    /// RTSP without realtime processing: read by a thread started with processing.
    RtspThread(String),
}

/// How processing starts (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum PullStart {
    /// `stream_output: []`: at once.
    DataOnly,
    /// The returned track's sender pulls frames once the connection is up.
    OnConnected,
    /// A returned track was asked for but the offer receives no video: the
    /// sender that would pull frames never starts.
    Never,
}

/// Processes the source's frames until it ends, the timeout, or the
/// session's end; then stops the source.
pub(super) async fn run_pull(session: Arc<Session>, pending: PendingPull) {
    let source = match pending {
        PendingPull::Opened(source) => Some(source),
        PendingPull::RtspThread(url) => {
            open_rtsp_thread(&session, url).await;
            None
        }
    };
    let outcome = match &source {
        Some(source) => process(&session, source).await,
        None => Outcome::Ended(0),
    };
    if let Some(source) = source {
        let stopped = stop_source(source).await;
        session.update(|report| report.pull_source_stopped = stopped);
    }
    let (last_frame_id, reason) = match outcome {
        Outcome::SessionEnded => return,
        Outcome::Ended(last) => (last, None),
        Outcome::Timeout(last) => (last, Some("timeout_reached")),
    };
    match session.control_channel() {
        Some(control) => {
            let message = completion_message(last_frame_id, reason);
            // Plain JSON: the server never gzips its processing_complete.
            send_completion(&session, &control, last_frame_id, message, false).await;
        }
        None => session.update(|report| {
            report
                .pull_errors
                .push("processing_complete not sent: the inference channel is not open".to_owned())
        }),
    }
    if reason.is_some() {
        // The timeout also ends the server's session: it closes.
        tokio::time::sleep(CLOSE_LINGER).await;
        session.end();
    }
}

/// The server's non-realtime RTSP reader: it opens the URL, and its first
/// decoded frame has no pts, on which it raises ("Failed to decode RTSP
/// stream"). Nothing is processed.
async fn open_rtsp_thread(session: &Arc<Session>, url: String) {
    let config = session.config.clone();
    let request = PullRequest {
        kind: PullKind::Rtsp,
        url,
    };
    let opened = tokio::task::spawn_blocking(move || {
        let source = PullSource::open(&request, &config)?;
        let decoded = source.queue.decoded();
        drop(source);
        Ok::<u32, String>(decoded)
    })
    .await
    .unwrap_or_else(|err| Err(format!("reader task: {err}")));
    session.update(|report| match opened {
        Ok(decoded) => {
            report.pull_opened = true;
            report.pull_source_stopped = true;
            report.pull_frames_without_pts += decoded.min(1);
            report
                .pull_errors
                .push("Failed to decode RTSP stream (RTSP frame has no timestamp)".to_owned());
        }
        Err(err) => report
            .pull_errors
            .push(format!("Failed to decode RTSP stream ({err})")),
    });
}

enum Outcome {
    /// The client went away (or the session was ended): nothing more is sent.
    SessionEnded,
    /// End of stream or a read error, after this many frames.
    Ended(u32),
    Timeout(u32),
}

async fn process(session: &Arc<Session>, source: &PullSource) -> Outcome {
    let queue = &source.queue;
    let time_base = match source.kind {
        PullKind::Rtsp => RTSP_TIME_BASE,
        PullKind::Mjpeg => MJPEG_TIME_BASE,
    };
    // The server's termination date: the timeout less its shutdown reserve
    // (WEBRTC_MODAL_SHUTDOWN_RESERVE, 1 s), so it still has time to say so.
    let timeout_at = session
        .deadline
        .checked_sub(Duration::from_secs(1))
        .unwrap_or(session.deadline);
    let mut last_frame_id = 0u32;
    let mut throttle_start: Option<tokio::time::Instant> = None;
    let mut jpeg: Option<JpegEncoder> = None;
    let mut encoder: Option<RtpEncoder> = None;
    let outcome = loop {
        session.update(|report| report.pull_frames_read = queue.queued());
        if tokio::time::Instant::now() >= timeout_at {
            break Outcome::Timeout(last_frame_id);
        }
        if session.realtime {
            let dropped = queue.trim(REALTIME_QUEUE_KEEP);
            if dropped > 0 {
                session.update(|report| report.pull_frames_dropped_realtime += dropped);
            }
        }
        let frame = tokio::select! {
            biased;
            _ = session.until_ended() => break Outcome::SessionEnded,
            _ = tokio::time::sleep_until(timeout_at) => break Outcome::Timeout(last_frame_id),
            frame = queue.pop() => frame,
        };
        let Some(frame) = frame else {
            break Outcome::Ended(last_frame_id);
        };
        // The player hands a frame out no earlier than its time since the first.
        let frame_time = Duration::from_nanos(units_to_ns(frame.pts, time_base));
        let start = *throttle_start.get_or_insert_with(|| tokio::time::Instant::now() - frame_time);
        tokio::select! {
            _ = tokio::time::sleep_until(start + frame_time) => {}
            _ = session.until_ended() => break Outcome::SessionEnded,
        }
        let frame_id = last_frame_id + 1;
        if !wait_for_ack_window(session, frame_id).await {
            break Outcome::SessionEnded;
        }
        if !session.config.live_process_delay.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep(session.config.live_process_delay) => {}
                _ = session.until_ended() => break Outcome::SessionEnded,
            }
        }
        last_frame_id = frame_id;
        let mut summary: DecodedFrame = match summarize_sample(session, frame.sample, &mut jpeg).await {
            Ok(summary) => summary,
            Err(err) => {
                session
                    .update(|report| report.pull_errors.push(format!("frame {frame_id}: {err}")));
                continue;
            }
        };
        summary.pts_ns = None;
        summary.fps = session.declared_fps;
        summary.stream_pts = Some((frame.pts, time_base));
        session.update(|report| {
            report.pull_frames_processed += 1;
            report.pull_processed_pts.push(frame.pts);
            report.pull_colors.push(summary.mean_rgb);
        });
        // The server sends a result only while `inference` is open; the
        // frame itself still goes to its outgoing track (its recv() returns
        // it to the sender whatever became of the JSON).
        let Some(control) = session.control_channel() else {
            session.update(|report| report.pull_results_lost_before_channel += 1);
            if let Some(track) = &session.track {
                send_track_frame(session, track, frame_id, &mut summary, &mut encoder).await;
            }
            continue;
        };
        if !deliver_result(session, &control, frame_id, &mut summary, &mut encoder).await {
            break Outcome::SessionEnded;
        }
    };
    if let Some(encoder) = encoder.take() {
        let _ = tokio::task::spawn_blocking(move || drop(encoder)).await;
    }
    if let Some(jpeg) = jpeg.take() {
        let _ = tokio::task::spawn_blocking(move || drop(jpeg)).await;
    }
    if let Some(Some(error)) = queue.ended() {
        session.update(|report| report.pull_errors.push(error));
    }
    let without_pts = u32::from(source.kind == PullKind::Rtsp && queue.decoded() > 0);
    session.update(|report| {
        report.pull_frames_read = queue.queued();
        report.pull_frames_without_pts = without_pts;
        report.pull_frames_waiting_at_end = queue.waiting() as u32;
    });
    outcome
}

fn units_to_ns(units: u64, (num, den): (u32, u32)) -> u64 {
    (u128::from(units) * u128::from(num) * 1_000_000_000 / u128::from(den.max(1))) as u64
}

/// The server's `processing_complete`: `video_metadata` carries only the
/// count of frames processed and the time.
fn completion_message(last_frame_id: u32, reason: Option<&str>) -> Value {
    json!({
        "serialized_output_data": null,
        "video_metadata": {
            "frame_id": last_frame_id,
            "received_at": iso_time_now(),
            "pts": null,
            "time_base": null,
            "declared_fps": null,
            "measured_fps": null,
            "width": null,
            "height": null,
        },
        "errors": [],
        "processing_complete": true,
        "termination_reason": reason,
    })
}

/// Links `from`'s first pad that appears to `decode`'s sink pad.
fn link_when_added(from: &gst::Element, decode: &gst::Element) {
    let decode = decode.downgrade();
    from.connect_pad_added(move |_, pad| {
        if let Some(sink) = decode.upgrade().and_then(|decode| decode.static_pad("sink"))
            && !sink.is_linked()
        {
            let _ = pad.link(&sink);
        }
    });
}
