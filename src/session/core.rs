// The session's protocol logic without I/O (str0m's "sans I/O"): events go
// in with the current time, actions come out. The driver (driver.rs) moves
// bytes between this core and webrtc-rs; the tests below drive it event by
// event, without sockets, threads or sleeping.
//
// It owns the upload framing (PROTOCOL.md §4), result reassembly and
// parsing (§5), acks (§7), keepalives and the session's single state.

use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Deserialize as _;

use crate::config::SessionConfig;
use crate::protocol::keepalive::{AckTracker, KeepaliveTracker};
use crate::protocol::live::{LivePairing, SentFrame};
use crate::protocol::{FrameResult, ack_message, pts_seconds_to_ns};
use crate::protocol::results::{ReassemblyLimits, ResultReassembler};
use crate::protocol::upload::{UploadError, UploadFramer, is_keepalive};

use super::error::SessionError;

/// Where the session stands. Every other piece of session state is derived
/// from this and the core's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Offer, answer, ICE, DTLS, SCTP and the data channels.
    Connecting,
    /// Both channels are open; no upload has begun.
    Connected,
    /// Chunks are leaving on `video_upload`.
    Uploading,
    /// Every chunk was handed to the channel; results arrive.
    Receiving,
    /// `processing_complete` arrived.
    Complete,
    Failed,
    /// Closed on purpose before it completed.
    Closed,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Connecting => "connecting",
            State::Connected => "connected",
            State::Uploading => "uploading",
            State::Receiving => "receiving",
            State::Complete => "complete",
            State::Failed => "failed",
            State::Closed => "closed",
        }
    }

    /// The session has ended, one way or another.
    pub fn is_final(self) -> bool {
        matches!(self, State::Complete | State::Failed | State::Closed)
    }

    fn upload_unfinished(self) -> bool {
        matches!(self, State::Connecting | State::Connected | State::Uploading)
    }
}

/// One frame's result, as reassembled and parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct FrameEvent {
    /// 1-based frame number (from the result's metadata, else its header).
    pub frame_id: u64,
    /// Presentation time on the source's timeline: pts × time_base.
    pub pts_seconds: Option<f64>,
    pub errors: Vec<String>,
    /// The whole result object.
    pub json: serde_json::Value,
    /// The pts in 90 kHz ticks (mod 2^32), for pairing with RTP.
    pub pts_90khz: Option<u32>,
    /// Live video: the frame sent that this result belongs to.
    pub live: Option<LiveMatch>,
}

/// Live video: which frame sent a result belongs to.
#[derive(Debug, Clone, PartialEq)]
pub struct LiveMatch {
    /// None: no frame sent matches the result's pts.
    pub frame: Option<SentFrame>,
    /// From the buffer reaching the sink to the result's arrival.
    pub latency: Option<Duration>,
    /// Frames sent before this one that got no result.
    pub skipped: u64,
}

impl FrameEvent {
    /// The pts on the server's timeline in nanoseconds (pts x time_base),
    /// when the result carries a usable one.
    pub fn pts_ns(&self) -> Option<u64> {
        self.pts_seconds.and_then(pts_seconds_to_ns)
    }

    /// The PTS of the buffer the result belongs to: the server's pts for a
    /// file (its timeline is the file's), the paired buffer's for live video.
    pub fn source_pts_ns(&self) -> Option<u64> {
        match &self.live {
            Some(live) => live.frame.and_then(|frame| frame.pts_ns),
            None => self.pts_ns(),
        }
    }
}

/// What the result consumer receives, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum ResultEvent {
    Frame(Box<FrameEvent>),
    /// `processing_complete` arrived after `frames` results.
    Complete { frames: u64, termination_reason: Option<String> },
}

/// What the peer connection reports (RTCPeerConnectionState, reduced).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerState {
    Connected,
    Disconnected,
    Failed,
    Closed,
}

/// An event for the core.
#[derive(Debug)]
pub enum Input<'a> {
    /// Both data channels are open.
    Connected,
    /// Setting up the session failed.
    ConnectFailed(SessionError),
    /// The upload's size is known: `total_bytes` in chunks of the configured size.
    BeginUpload { total_bytes: u64 },
    /// The next bytes of the upload.
    UploadData(&'a [u8]),
    /// No more bytes will come.
    EndOfUpload,
    /// The driver handed a chunk message of this many payload bytes to the channel.
    ChunkSent { payload: usize },
    /// A message on `video_upload` (the server echoes keepalives there).
    UploadMessage(&'a [u8]),
    UploadChannelClosed,
    /// A message on the `inference` channel.
    ControlMessage(&'a [u8]),
    ControlChannelClosed,
    Peer(PeerState),
    /// The consumer wants acks (flow control, §7), running `lead` frames
    /// ahead of the frames it has handled. Ignored in realtime processing.
    EnableAcks { lead: u64 },
    /// The consumer has fully handled this frame.
    FrameHandled(u64),
    /// Live video: the track is set up; frames follow.
    BeginLive,
    /// Live video: a frame's packets were handed to the track.
    FrameSent { rtp_timestamp: u32, pts_ns: Option<u64>, arrived: Instant },
    /// Live video: the sink dropped a frame (window full, realtime).
    FrameDropped,
    /// Live video: no more frames; the track ended.
    TrackEnded,
    /// Live video: the server asked for a keyframe (it cannot decode).
    KeyframeRequested,
    /// The time returned by [`SessionCore::poll_timeout`] has come.
    Timeout,
    /// A failure the driver saw (e.g. a send that failed).
    Fail(SessionError),
    /// Closed on purpose.
    Close,
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Send this chunk message on `video_upload`, in order.
    SendChunk(Bytes),
    /// Send a keepalive on `video_upload`.
    SendKeepalive,
    /// Send this text on the `inference` channel, in order.
    SendControl(String),
    /// Hand this to the result consumer.
    Deliver(ResultEvent),
    /// Tell the user; the session goes on.
    Warning(String),
    /// The session failed (reported once).
    Failed(SessionError),
}

/// A read-only picture of the session, for `stats` properties.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionStats {
    pub state: State,
    pub bytes_sent: u64,
    pub total_bytes: u64,
    pub chunks_sent: u64,
    pub total_chunks: u64,
    pub keepalives_sent: u64,
    pub keepalives_echoed: u64,
    pub last_echo_rtt: Option<Duration>,
    pub frames_received: u64,
    pub acks_sent: u64,
    /// Live video (all 0 for a file).
    pub frames_sent: u64,
    pub frames_dropped: u64,
    pub frames_skipped: u64,
    pub frames_in_flight: u64,
    pub results_unpaired: u64,
    pub keyframe_requests: u64,
    /// Frames the server processed whose result never came: gaps in its
    /// frame count. A camera the server reads loses those processed before
    /// the `inference` channel opened (§11).
    pub results_missed: u64,
}

/// The settings the core acts on, taken from the session's configuration.
#[derive(Debug, Clone)]
struct Settings {
    api_url: String,
    udp_bind_address: String,
    chunk_size: usize,
    keepalive_interval: Duration,
    realtime: bool,
    stall_timeout: Duration,
    /// A camera the server reads, as shown: nothing to upload.
    camera: Option<String>,
}

/// Live video: the frames sent and their results.
struct LiveCore {
    /// Results with the instant they arrived (a result may be held).
    pairing: LivePairing<(FrameEvent, Instant)>,
    /// Frames are in flight, and no result came since then.
    waiting_since: Option<Instant>,
    /// The server asked for a keyframe: one more frame may go, whatever
    /// the window, so that the server can decode again (the frames in
    /// flight may never get a result).
    keyframe_credit: bool,
    keyframe_requests: u64,
}

pub struct SessionCore {
    settings: Settings,
    state: State,
    failure: Option<SessionError>,
    framer: Option<UploadFramer>,
    input_ended: bool,
    bytes_sent: u64,
    chunks_sent: u64,
    keepalive: KeepaliveTracker,
    missed_echoes_reported: u32,
    reassembler: ResultReassembler,
    frames_received: u64,
    acks: Option<AckTracker>,
    peer_was_connected: bool,
    disconnected_since: Option<Instant>,
    live: Option<LiveCore>,
    /// Live video: frames the sink dropped (also while connecting).
    frames_dropped: u64,
    /// The highest frame_id of a result so far, and the gaps below it.
    last_frame_id: u64,
    results_missed: u64,
    /// The gaps seen while acks were off, for when they are turned on.
    missed_ranges: Vec<(u64, u64)>,
}

impl SessionCore {
    pub fn new(config: &SessionConfig) -> Self {
        let max = config.max_result_size;
        SessionCore {
            settings: Settings {
                api_url: config.api_url.to_string(),
                udp_bind_address: config.udp_bind_address.to_string(),
                chunk_size: config.chunk_size,
                keepalive_interval: config.keepalive_interval,
                realtime: config.realtime_processing,
                stall_timeout: config.stall_timeout,
                camera: config.camera.as_ref().map(|camera| camera.shown()),
            },
            state: State::Connecting,
            failure: None,
            framer: None,
            input_ended: false,
            bytes_sent: 0,
            chunks_sent: 0,
            keepalive: KeepaliveTracker::new(config.keepalive_interval),
            missed_echoes_reported: 0,
            reassembler: ResultReassembler::new(ReassemblyLimits {
                max_frame_bytes: max,
                max_decompressed_bytes: max.saturating_mul(4),
                ..ReassemblyLimits::default()
            }),
            frames_received: 0,
            acks: None,
            peer_was_connected: false,
            disconnected_since: None,
            live: None,
            frames_dropped: 0,
            last_frame_id: 0,
            results_missed: 0,
            missed_ranges: Vec::new(),
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    #[cfg(test)]
    pub fn failure(&self) -> Option<&SessionError> {
        self.failure.as_ref()
    }

    /// When [`Input::Timeout`] is due next, if ever.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if let Some(live) = &self.live {
            let waiting = matches!(self.state, State::Uploading | State::Receiving);
            return waiting.then(|| live.waiting_since.map(|since| since + self.settings.stall_timeout)).flatten();
        }
        (self.state == State::Uploading).then(|| self.keepalive.next_deadline()).flatten()
    }

    /// Live video: frames sent whose result has not come back.
    /// Less one while a keyframe request grants a frame.
    pub fn frames_in_flight(&self) -> u64 {
        self.live.as_ref().map_or(0, |live| live.pairing.in_flight().saturating_sub(u64::from(live.keyframe_credit)))
    }

    pub fn stats(&self) -> SessionStats {
        SessionStats {
            state: self.state,
            bytes_sent: self.bytes_sent,
            total_bytes: self.framer.as_ref().map_or(0, UploadFramer::total_bytes),
            chunks_sent: self.chunks_sent,
            total_chunks: self.framer.as_ref().map_or(0, |framer| u64::from(framer.total_chunks())),
            keepalives_sent: self.keepalive.sent(),
            keepalives_echoed: self.keepalive.echoed(),
            last_echo_rtt: self.keepalive.last_rtt(),
            frames_received: self.frames_received,
            acks_sent: self.acks.as_ref().map_or(0, AckTracker::acks_sent),
            frames_sent: self.live.as_ref().map_or(0, |live| live.pairing.frames_sent()),
            frames_dropped: self.frames_dropped,
            frames_skipped: self.live.as_ref().map_or(0, |live| live.pairing.frames_skipped()),
            frames_in_flight: self.live.as_ref().map_or(0, |live| live.pairing.in_flight()),
            keyframe_requests: self.live.as_ref().map_or(0, |live| live.keyframe_requests),
            results_unpaired: self.live.as_ref().map_or(0, |live| live.pairing.results_unpaired()),
            results_missed: self.results_missed,
        }
    }

    pub fn handle(&mut self, input: Input<'_>, now: Instant) -> Vec<Output> {
        let mut out = Vec::new();
        if let Err(error) = self.step(input, now, &mut out) {
            self.fail(error, &mut out);
        }
        out
    }

    fn step(&mut self, input: Input<'_>, now: Instant, out: &mut Vec<Output>) -> Result<(), SessionError> {
        match input {
            Input::Connected => {
                if self.state == State::Connecting {
                    // A camera the server reads: nothing to send, results come.
                    self.state = if self.settings.camera.is_some() { State::Receiving } else { State::Connected };
                }
            }
            Input::ConnectFailed(error) | Input::Fail(error) => return Err(error),
            Input::BeginUpload { total_bytes } => self.begin_upload(total_bytes, now)?,
            Input::UploadData(data) => {
                let framer = self.upload_framer()?;
                let chunks = framer.push(data).map_err(upload_mismatch)?;
                out.extend(chunks.into_iter().map(Output::SendChunk));
            }
            Input::EndOfUpload => {
                self.upload_framer()?.finish().map_err(upload_mismatch)?;
                self.input_ended = true;
                self.check_upload_done();
            }
            Input::ChunkSent { payload } => {
                self.bytes_sent += payload as u64;
                self.chunks_sent += 1;
                self.check_upload_done();
            }
            Input::UploadMessage(data) => {
                if is_keepalive(data) {
                    self.keepalive.on_echo(now);
                }
            }
            Input::UploadChannelClosed => {
                if self.state.upload_unfinished() {
                    let stats = self.stats();
                    return Err(SessionError::UploadChannelClosed {
                        sent: stats.chunks_sent,
                        total: stats.total_chunks,
                    });
                }
            }
            Input::ControlMessage(data) => {
                if !self.state.is_final()
                    && let Some(event) = self.on_result_message(data, out)?
                {
                    self.deliver(event, now, out);
                }
            }
            Input::BeginLive => match self.state {
                State::Connected => {
                    self.state = State::Uploading;
                    self.live = Some(LiveCore { pairing: LivePairing::new(), waiting_since: None, keyframe_credit: false, keyframe_requests: 0 });
                }
                State::Connecting => {
                    return Err(SessionError::UploadMismatch("live video began before the session was connected".to_owned()));
                }
                _ => return Err(SessionError::UploadMismatch("live video began twice".to_owned())),
            },
            Input::FrameSent { rtp_timestamp, pts_ns, arrived } => {
                let live = self.live_frames()?;
                live.pairing.on_frame_sent(rtp_timestamp, pts_ns, arrived);
                live.waiting_since.get_or_insert(now);
                live.keyframe_credit = false;
            }
            Input::FrameDropped => self.frames_dropped += 1,
            Input::KeyframeRequested => {
                if let Some(live) = self.live.as_mut() {
                    live.keyframe_credit = true;
                    live.keyframe_requests += 1;
                }
            }
            Input::TrackEnded => {
                self.live_frames()?;
                self.state = State::Receiving;
            }
            Input::ControlChannelClosed => {
                if !self.state.is_final() {
                    return Err(SessionError::ControlChannelClosed { results: self.frames_received });
                }
            }
            Input::Peer(state) => self.on_peer_state(state, now)?,
            Input::EnableAcks { lead } => {
                if !self.settings.realtime && self.acks.is_none() {
                    let mut acks = AckTracker::with_lead(lead);
                    for (first, last) in &self.missed_ranges {
                        acks.skip(*first, *last);
                    }
                    self.acks = Some(acks);
                }
            }
            Input::FrameHandled(frame_id) => {
                // Also after processing_complete: the consumer may still be
                // handling frames that arrived before it, and the server
                // takes a late ack as it takes any other.
                if let Some(ack) = self.acks.as_mut().and_then(|acks| acks.on_frame_handled(frame_id))
                    && !matches!(self.state, State::Failed | State::Closed)
                {
                    out.push(Output::SendControl(ack_message(ack)));
                }
            }
            Input::Timeout => self.on_timeout(now, out)?,
            Input::Close => {
                if !self.state.is_final() {
                    self.state = State::Closed;
                    self.failure = Some(SessionError::Closed);
                }
            }
        }
        Ok(())
    }

    /// The live state while frames may still be sent.
    fn live_frames(&mut self) -> Result<&mut LiveCore, SessionError> {
        match (&mut self.live, self.state) {
            (Some(live), State::Uploading) => Ok(live),
            (_, state) => Err(SessionError::UploadMismatch(format!("a live frame came while the session is {}", state.as_str()))),
        }
    }

    /// Hands a result to the consumer; live results first find their frame.
    fn deliver(&mut self, event: ResultEvent, now: Instant, out: &mut Vec<Output>) {
        let Some(live) = self.live.as_mut() else {
            out.push(Output::Deliver(event));
            return;
        };
        let (paired, complete) = match event {
            ResultEvent::Frame(frame) => {
                let ticks = frame.pts_90khz;
                (live.pairing.on_result(ticks, (*frame, now)), None)
            }
            complete @ ResultEvent::Complete { .. } => (live.pairing.finish(), Some(complete)),
        };
        for paired in paired {
            let (mut frame, arrived) = paired.result;
            frame.live = Some(LiveMatch {
                frame: paired.frame,
                latency: paired.frame.map(|sent| arrived.saturating_duration_since(sent.arrived)),
                skipped: paired.skipped,
            });
            out.push(Output::Deliver(ResultEvent::Frame(Box::new(frame))));
        }
        // The stall clock restarts with each result, while frames remain.
        live.waiting_since = (live.pairing.in_flight() > 0).then_some(now);
        if let Some(complete) = complete {
            out.push(Output::Deliver(complete));
        }
    }

    fn fail(&mut self, error: SessionError, out: &mut Vec<Output>) {
        // Once ended, later trouble (a connection torn down after
        // processing_complete, a close) is a consequence, not news.
        if self.state.is_final() {
            return;
        }
        self.state = State::Failed;
        self.keepalive.stop();
        self.failure = Some(error.clone());
        out.push(Output::Failed(error));
    }

    fn begin_upload(&mut self, total_bytes: u64, now: Instant) -> Result<(), SessionError> {
        match self.state {
            State::Connected => {}
            State::Connecting => {
                return Err(SessionError::UploadMismatch("the upload began before the session was connected".to_owned()));
            }
            _ => return Err(SessionError::UploadMismatch("the upload began twice".to_owned())),
        }
        let framer = UploadFramer::new(total_bytes, self.settings.chunk_size).map_err(upload_mismatch)?;
        self.framer = Some(framer);
        self.state = State::Uploading;
        self.keepalive.start(now);
        Ok(())
    }

    fn upload_framer(&mut self) -> Result<&mut UploadFramer, SessionError> {
        match (self.state, self.framer.as_mut()) {
            (State::Uploading, Some(framer)) if !self.input_ended => Ok(framer),
            _ => Err(SessionError::UploadMismatch(format!(
                "upload bytes arrived while the session is {}",
                self.state.as_str()
            ))),
        }
    }

    fn check_upload_done(&mut self) {
        let all_sent = self
            .framer
            .as_ref()
            .is_some_and(|framer| self.chunks_sent >= u64::from(framer.total_chunks()));
        if self.state == State::Uploading && self.input_ended && all_sent {
            self.state = State::Receiving;
            self.keepalive.stop();
        }
    }

    fn on_result_message(&mut self, data: &[u8], out: &mut Vec<Output>) -> Result<Option<ResultEvent>, SessionError> {
        let Some(completed) = self.reassembler.push(data)? else {
            return Ok(None);
        };
        let json: serde_json::Value = serde_json::from_slice(&completed.json).map_err(|err| SessionError::ResultNotJson {
            frame: completed.frame_id,
            detail: err.to_string(),
            start: String::from_utf8_lossy(&completed.json[..completed.json.len().min(60)]).into_owned(),
        })?;
        let result = FrameResult::deserialize(&json).map_err(|err| SessionError::ResultShape {
            frame: completed.frame_id,
            detail: err.to_string(),
        })?;
        if result.processing_complete {
            if self.frames_received == 0 {
                return Err(match (&self.live, &self.settings.camera) {
                    (Some(live), _) => SessionError::NothingProcessed {
                        sent: live.pairing.frames_sent(),
                        reason: result.termination_reason,
                    },
                    (None, Some(camera)) => SessionError::NothingRead { camera: camera.clone(), reason: result.termination_reason },
                    (None, None) => SessionError::NothingDecoded { reason: result.termination_reason },
                });
            }
            self.state = State::Complete;
            self.keepalive.stop();
            return Ok(Some(ResultEvent::Complete {
                frames: self.frames_received,
                termination_reason: result.termination_reason,
            }));
        }
        self.frames_received += 1;
        let metadata = result.video_metadata.as_ref();
        let frame_id = metadata.and_then(|m| m.frame_id).unwrap_or(u64::from(completed.frame_id));
        if frame_id > self.last_frame_id {
            let missed = frame_id - self.last_frame_id - 1;
            if missed > 0 {
                self.results_missed += missed;
                // They will never be handled: acks must not wait for them
                // (kept for acks turned on later).
                let (first, last) = (self.last_frame_id + 1, frame_id - 1);
                match self.acks.as_mut() {
                    Some(acks) => {
                        if let Some(ack) = acks.skip(first, last) {
                            out.push(Output::SendControl(ack_message(ack)));
                        }
                    }
                    None => self.missed_ranges.push((first, last)),
                }
            }
            self.last_frame_id = frame_id;
        }
        Ok(Some(ResultEvent::Frame(Box::new(FrameEvent {
            frame_id,
            pts_seconds: metadata.and_then(|m| m.pts_seconds()),
            pts_90khz: metadata.and_then(|m| m.pts_90khz()),
            live: None,
            errors: result.errors,
            json,
        }))))
    }

    fn on_peer_state(&mut self, state: PeerState, now: Instant) -> Result<(), SessionError> {
        match state {
            PeerState::Connected => {
                self.peer_was_connected = true;
                self.disconnected_since = None;
            }
            PeerState::Disconnected => {
                self.disconnected_since.get_or_insert(now);
            }
            PeerState::Failed if self.state.is_final() => {}
            PeerState::Failed if self.peer_was_connected => {
                return Err(SessionError::PeerLost {
                    url: self.settings.api_url.clone(),
                    silent_for: self.disconnected_since.map(|since| now.saturating_duration_since(since)).unwrap_or_default()
                        + crate::session::driver::ICE_DISCONNECTED_AFTER,
                    results: self.frames_received,
                });
            }
            PeerState::Failed => {
                return Err(SessionError::ConnectionFailed {
                    url: self.settings.api_url.clone(),
                    bind: self.settings.udp_bind_address.clone(),
                });
            }
            PeerState::Closed => {
                if !self.state.is_final() {
                    return Err(SessionError::PeerClosed { results: self.frames_received });
                }
            }
        }
        Ok(())
    }

    fn on_timeout(&mut self, now: Instant, out: &mut Vec<Output>) -> Result<(), SessionError> {
        if self.live.is_some() {
            if self.poll_timeout().is_some_and(|deadline| now >= deadline) {
                return Err(SessionError::ResultsStalled {
                    timeout: self.settings.stall_timeout,
                    results: self.frames_received,
                });
            }
            return Ok(());
        }
        if self.state != State::Uploading || !self.keepalive.poll_send(now) {
            return Ok(());
        }
        out.push(Output::SendKeepalive);
        // An echo normally takes milliseconds; two intervals is generous.
        let grace = self.settings.keepalive_interval * 2;
        let missed = self.keepalive.missed_echoes(now, grace);
        if missed > self.missed_echoes_reported {
            self.missed_echoes_reported = missed;
            out.push(Output::Warning(format!(
                "{missed} keepalive(s) on the video_upload channel got no echo from the server within {:.1} s",
                grace.as_secs_f64()
            )));
        }
        Ok(())
    }
}

fn upload_mismatch(error: UploadError) -> SessionError {
    match error {
        UploadError::TooLittleData { .. } => SessionError::UploadMismatch(format!("upstream ended early: {error}")),
        UploadError::TooMuchData { .. } => {
            SessionError::UploadMismatch(format!("the upload does not match the size upstream reported: {error}"))
        }
        other => SessionError::UploadMismatch(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::UploadSettings;
    use crate::protocol::results::encode_result_header;
    use crate::protocol::upload::{UPLOAD_HEADER_LEN, decode_upload_header};
    use std::io::Write as _;

    fn config(edit: impl FnOnce(&mut UploadSettings)) -> SessionConfig {
        let mut settings = UploadSettings {
            workflow_spec: Some(r#"{"steps":[]}"#.into()),
            chunk_size: 1024,
            keepalive_interval_ms: 1000,
            ..Default::default()
        };
        edit(&mut settings);
        settings.validate().unwrap()
    }

    fn core() -> SessionCore {
        SessionCore::new(&config(|_| {}))
    }

    fn result_message(frame_id: u32, json: &serde_json::Value, gzip: bool) -> Vec<u8> {
        let mut payload = serde_json::to_vec(json).unwrap();
        if gzip {
            let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            encoder.write_all(&payload).unwrap();
            payload = encoder.finish().unwrap();
        }
        let mut message = encode_result_header(frame_id, 0, 1).to_vec();
        message.extend_from_slice(&payload);
        message
    }

    fn frame_json(frame_id: u64) -> serde_json::Value {
        serde_json::json!({
            "video_metadata": {"frame_id": frame_id, "pts": frame_id * 3000, "time_base": 1.0 / 90000.0},
            "serialized_output_data": {"rgb_color": [1, 2, 3]},
            "errors": [],
            "processing_complete": false,
        })
    }

    fn complete_json() -> serde_json::Value {
        serde_json::json!({"processing_complete": true, "termination_reason": null, "errors": []})
    }

    fn connected(now: Instant) -> SessionCore {
        let mut core = core();
        assert!(core.handle(Input::Connected, now).is_empty());
        assert_eq!(core.state(), State::Connected);
        core
    }

    fn chunks(outputs: &[Output]) -> Vec<Bytes> {
        outputs
            .iter()
            .filter_map(|output| match output {
                Output::SendChunk(chunk) => Some(chunk.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn an_upload_is_framed_sent_and_ends_in_receiving() {
        let now = Instant::now();
        let mut core = connected(now);
        assert!(core.handle(Input::BeginUpload { total_bytes: 2500 }, now).is_empty());
        assert_eq!(core.state(), State::Uploading);
        let first = chunks(&core.handle(Input::UploadData(&[7u8; 1500]), now));
        assert_eq!(first.len(), 1, "one full chunk of 1024, 476 bytes held");
        assert_eq!(decode_upload_header(&first[0]), Some((0, 3)));
        assert_eq!(first[0].len(), UPLOAD_HEADER_LEN + 1024);
        let rest = chunks(&core.handle(Input::UploadData(&[8u8; 1000]), now));
        assert_eq!(rest.iter().map(|c| decode_upload_header(c).unwrap()).collect::<Vec<_>>(), vec![(1, 3), (2, 3)]);
        assert_eq!(rest[1].len(), UPLOAD_HEADER_LEN + 452, "the last chunk holds the remainder");
        assert!(core.handle(Input::EndOfUpload, now).is_empty());
        for payload in [1024, 1024] {
            core.handle(Input::ChunkSent { payload }, now);
            assert_eq!(core.state(), State::Uploading, "a chunk is still in flight");
        }
        core.handle(Input::ChunkSent { payload: 452 }, now);
        assert_eq!(core.state(), State::Receiving);
        let stats = core.stats();
        assert_eq!((stats.bytes_sent, stats.total_bytes, stats.chunks_sent, stats.total_chunks), (2500, 2500, 3, 3));
    }

    #[test]
    fn an_input_shorter_than_declared_fails_with_upstream_ended_early() {
        let now = Instant::now();
        let mut core = connected(now);
        core.handle(Input::BeginUpload { total_bytes: 4096 }, now);
        core.handle(Input::UploadData(&[0u8; 100]), now);
        let outputs = core.handle(Input::EndOfUpload, now);
        assert_eq!(
            outputs,
            vec![Output::Failed(SessionError::UploadMismatch(
                "upstream ended early: the upload was declared as 4096 bytes but the input ended after 100 bytes".into()
            ))]
        );
        assert_eq!(core.state(), State::Failed);
    }

    #[test]
    fn more_bytes_than_declared_fail_and_nothing_is_sent() {
        let now = Instant::now();
        let mut core = connected(now);
        core.handle(Input::BeginUpload { total_bytes: 10 }, now);
        let outputs = core.handle(Input::UploadData(&[0u8; 11]), now);
        assert!(matches!(&outputs[..], [Output::Failed(SessionError::UploadMismatch(text))] if text.contains("at least 11 bytes")));
    }

    #[test]
    fn an_upload_before_the_connection_is_refused() {
        let now = Instant::now();
        let mut core = core();
        let outputs = core.handle(Input::BeginUpload { total_bytes: 10 }, now);
        assert!(matches!(&outputs[..], [Output::Failed(SessionError::UploadMismatch(_))]));
    }

    #[test]
    fn an_empty_upload_is_refused() {
        let now = Instant::now();
        let mut core = connected(now);
        let outputs = core.handle(Input::BeginUpload { total_bytes: 0 }, now);
        assert!(matches!(&outputs[..], [Output::Failed(SessionError::UploadMismatch(text))] if text.contains("empty")));
    }

    #[test]
    fn keepalives_go_out_each_interval_while_uploading_and_missing_echoes_warn_once_per_new_miss() {
        let start = Instant::now();
        let mut core = connected(start);
        assert_eq!(core.poll_timeout(), None, "no keepalive before the upload");
        core.handle(Input::BeginUpload { total_bytes: 100 }, start);
        let second = Duration::from_secs(1);
        assert_eq!(core.poll_timeout(), Some(start + second));
        assert!(core.handle(Input::Timeout, start + second / 2).is_empty(), "not due yet");
        assert_eq!(core.handle(Input::Timeout, start + second), vec![Output::SendKeepalive]);
        core.handle(Input::UploadMessage(&[0]), start + second + Duration::from_millis(3));
        assert_eq!(core.stats().keepalives_echoed, 1);
        assert_eq!(core.stats().last_echo_rtt, Some(Duration::from_millis(3)));
        // Echoes stop: the third keepalive finds the second unanswered for over 2 s.
        assert_eq!(core.handle(Input::Timeout, start + 2 * second), vec![Output::SendKeepalive]);
        let outputs = core.handle(Input::Timeout, start + 5 * second);
        assert_eq!(outputs[0], Output::SendKeepalive);
        assert!(matches!(&outputs[1], Output::Warning(text) if text.starts_with("1 keepalive(s)")), "{outputs:?}");
        let outputs = core.handle(Input::Timeout, start + 6 * second);
        assert_eq!(outputs, vec![Output::SendKeepalive], "the same missed echo is not reported again");
        // The upload ends: no more keepalives.
        core.handle(Input::UploadData(&[0u8; 100]), start + 6 * second);
        core.handle(Input::EndOfUpload, start + 6 * second);
        core.handle(Input::ChunkSent { payload: 100 }, start + 6 * second);
        assert_eq!(core.state(), State::Receiving);
        assert_eq!(core.poll_timeout(), None);
        assert!(core.handle(Input::Timeout, start + 60 * second).is_empty());
    }

    fn receiving(now: Instant) -> SessionCore {
        let mut core = connected(now);
        core.handle(Input::BeginUpload { total_bytes: 10 }, now);
        core.handle(Input::UploadData(&[1u8; 10]), now);
        core.handle(Input::EndOfUpload, now);
        core.handle(Input::ChunkSent { payload: 10 }, now);
        assert_eq!(core.state(), State::Receiving);
        core
    }

    #[test]
    fn results_are_delivered_in_order_then_complete() {
        let now = Instant::now();
        let mut core = receiving(now);
        for frame in 1..=2u64 {
            let outputs = core.handle(Input::ControlMessage(&result_message(frame as u32, &frame_json(frame), frame == 2)), now);
            let [Output::Deliver(ResultEvent::Frame(event))] = &outputs[..] else { panic!("{outputs:?}") };
            assert_eq!(event.frame_id, frame);
            assert_eq!(event.pts_ns(), Some((frame as f64 / 30.0 * 1e9).round() as u64));
            assert_eq!(event.json["serialized_output_data"]["rgb_color"], serde_json::json!([1, 2, 3]));
        }
        let outputs = core.handle(Input::ControlMessage(&result_message(3, &complete_json(), false)), now);
        assert_eq!(outputs, vec![Output::Deliver(ResultEvent::Complete { frames: 2, termination_reason: None })]);
        assert_eq!(core.state(), State::Complete);
        // The connection going away afterwards is no failure.
        assert!(core.handle(Input::ControlChannelClosed, now).is_empty());
        assert!(core.handle(Input::Peer(PeerState::Closed), now).is_empty());
        assert!(core.handle(Input::Peer(PeerState::Failed), now).is_empty());
        assert_eq!(core.state(), State::Complete);
    }

    #[test]
    fn a_result_in_two_chunks_is_delivered_once_whole() {
        let now = Instant::now();
        let mut core = receiving(now);
        let payload = serde_json::to_vec(&frame_json(1)).unwrap();
        let (a, b) = payload.split_at(payload.len() / 2);
        let mut first = encode_result_header(1, 0, 2).to_vec();
        first.extend_from_slice(a);
        let mut second = encode_result_header(1, 1, 2).to_vec();
        second.extend_from_slice(b);
        assert!(core.handle(Input::ControlMessage(&first), now).is_empty());
        let outputs = core.handle(Input::ControlMessage(&second), now);
        assert!(matches!(&outputs[..], [Output::Deliver(ResultEvent::Frame(event))] if event.frame_id == 1));
    }

    #[test]
    fn processing_complete_after_no_result_means_nothing_was_decoded() {
        let now = Instant::now();
        let mut core = receiving(now);
        let outputs = core.handle(Input::ControlMessage(&result_message(1, &complete_json(), false)), now);
        assert_eq!(outputs, vec![Output::Failed(SessionError::NothingDecoded { reason: None })]);
        assert!(outputs[0].to_string_for_test().contains("decoded no frames"));
    }

    #[test]
    fn a_corrupt_result_fails_with_its_reason() {
        let now = Instant::now();
        let mut core = receiving(now);
        let mut message = encode_result_header(1, 0, 1).to_vec();
        message.extend_from_slice(b"{not json");
        let outputs = core.handle(Input::ControlMessage(&message), now);
        let [Output::Failed(error @ SessionError::ResultNotJson { frame: 1, .. })] = &outputs[..] else { panic!("{outputs:?}") };
        assert!(error.to_string().contains("\"{not json\""), "{error}");
        let outputs = core.handle(Input::ControlMessage(&[1, 2, 3]), now);
        assert!(outputs.is_empty(), "one failure is reported once");
    }

    #[test]
    fn a_result_over_max_result_size_names_the_property() {
        let now = Instant::now();
        let mut core = SessionCore::new(&config(|s| s.max_result_size = crate::config::MIN_MAX_RESULT_SIZE));
        core.handle(Input::Connected, now);
        let mut message = encode_result_header(1, 0, 1).to_vec();
        message.extend(std::iter::repeat_n(b' ', (crate::config::MIN_MAX_RESULT_SIZE + 1) as usize));
        let outputs = core.handle(Input::ControlMessage(&message), now);
        let [Output::Failed(error)] = &outputs[..] else { panic!("{outputs:?}") };
        assert!(error.to_string().ends_with("(max-result-size)"), "{error}");
    }

    #[test]
    fn channels_closing_early_name_where_the_session_stood() {
        let now = Instant::now();
        let mut core = connected(now);
        core.handle(Input::BeginUpload { total_bytes: 5000 }, now);
        core.handle(Input::UploadData(&[0u8; 3000]), now);
        core.handle(Input::ChunkSent { payload: 1024 }, now);
        core.handle(Input::ChunkSent { payload: 1024 }, now);
        let outputs = core.handle(Input::UploadChannelClosed, now);
        assert_eq!(outputs, vec![Output::Failed(SessionError::UploadChannelClosed { sent: 2, total: 5 })]);
        assert_eq!(
            outputs[0].to_string_for_test(),
            "the server closed the video_upload channel during the upload, after 2 of 5 chunks"
        );

        let mut core = receiving(now);
        core.handle(Input::ControlMessage(&result_message(1, &frame_json(1), false)), now);
        assert!(core.handle(Input::UploadChannelClosed, now).is_empty(), "the upload was over");
        let outputs = core.handle(Input::ControlChannelClosed, now);
        assert_eq!(outputs, vec![Output::Failed(SessionError::ControlChannelClosed { results: 1 })]);
    }

    #[test]
    fn a_peer_that_goes_silent_after_connecting_is_lost() {
        let now = Instant::now();
        let mut core = receiving(now);
        core.handle(Input::Peer(PeerState::Connected), now);
        core.handle(Input::Peer(PeerState::Disconnected), now);
        core.handle(Input::Peer(PeerState::Disconnected), now + Duration::from_secs(1));
        let outputs = core.handle(Input::Peer(PeerState::Failed), now + Duration::from_secs(4));
        let [Output::Failed(SessionError::PeerLost { silent_for, results: 0, .. })] = &outputs[..] else {
            panic!("{outputs:?}")
        };
        assert_eq!(*silent_for, Duration::from_secs(4) + crate::session::driver::ICE_DISCONNECTED_AFTER);
        assert!(outputs[0].to_string_for_test().contains("stopped answering"));
    }

    #[test]
    fn a_peer_that_never_connects_fails_naming_the_bind_address() {
        let now = Instant::now();
        let mut core = core();
        let outputs = core.handle(Input::Peer(PeerState::Failed), now);
        let [Output::Failed(error @ SessionError::ConnectionFailed { .. })] = &outputs[..] else { panic!("{outputs:?}") };
        assert!(error.to_string().contains("udp-bind-address"));
    }

    #[test]
    fn acks_lead_the_handled_frames_and_only_when_asked_and_not_realtime() {
        let now = Instant::now();
        let mut core = receiving(now);
        assert!(core.handle(Input::FrameHandled(1), now).is_empty(), "no acks unless asked");
        core.handle(Input::EnableAcks { lead: 3 }, now);
        assert!(core.handle(Input::FrameHandled(2), now).is_empty(), "frame 1 was handled before acks began");
        assert_eq!(core.handle(Input::FrameHandled(1), now), vec![Output::SendControl(ack_message(5))]);
        assert_eq!(core.stats().acks_sent, 1);

        let mut realtime = SessionCore::new(&config(|s| s.realtime_processing = true));
        realtime.handle(Input::EnableAcks { lead: 3 }, now);
        assert!(realtime.handle(Input::FrameHandled(1), now).is_empty(), "the server ignores acks in realtime");
    }

    #[test]
    fn a_close_ends_the_session_without_a_failure_report() {
        let now = Instant::now();
        let mut core = receiving(now);
        assert!(core.handle(Input::Close, now).is_empty());
        assert_eq!(core.state(), State::Closed);
        assert_eq!(core.failure(), Some(&SessionError::Closed));
        assert!(core.handle(Input::ControlChannelClosed, now).is_empty());
    }

    impl Output {
        fn to_string_for_test(&self) -> String {
            match self {
                Output::Failed(error) => error.to_string(),
                other => format!("{other:?}"),
            }
        }
    }

    fn live_result(frame_id: u64, pts: u32) -> Vec<u8> {
        let json = serde_json::json!({
            "video_metadata": {"frame_id": frame_id, "pts": pts, "time_base": 1.0 / 90000.0},
            "serialized_output_data": {"rgb_color": [1, 2, 3]},
            "errors": [],
            "processing_complete": false,
        });
        result_message(frame_id as u32, &json, false)
    }

    fn delivered(outputs: &[Output]) -> Vec<(u64, Option<u64>, Option<Duration>)> {
        outputs
            .iter()
            .filter_map(|output| match output {
                Output::Deliver(ResultEvent::Frame(frame)) => {
                    let live = frame.live.as_ref().expect("a live result");
                    Some((frame.frame_id, frame.source_pts_ns(), live.latency))
                }
                _ => None,
            })
            .collect()
    }

    fn live_core(now: Instant) -> SessionCore {
        let mut core = SessionCore::new(&config(|s| s.stall_timeout_ms = 5000));
        core.handle(Input::Connected, now);
        assert!(core.handle(Input::BeginLive, now).is_empty());
        assert_eq!(core.state(), State::Uploading);
        core
    }

    #[test]
    fn live_results_carry_their_buffer_pts_and_latency() {
        let start = Instant::now();
        let mut core = live_core(start);
        let timestamps = [1000u32, 4001, 7003];
        for (i, rtp) in timestamps.iter().enumerate() {
            let arrived = start + Duration::from_millis(33 * i as u64);
            core.handle(Input::FrameSent { rtp_timestamp: *rtp, pts_ns: Some(500 + i as u64), arrived }, arrived);
        }
        assert_eq!(core.frames_in_flight(), 3);
        assert_eq!(core.poll_timeout(), Some(start + Duration::from_secs(5)), "the stall clock runs from the first frame");
        // pts 0 names the anchor, ambiguous among the frames sent: held.
        let at = start + Duration::from_millis(100);
        assert!(delivered(&core.handle(Input::ControlMessage(&live_result(1, 0)), at)).is_empty());
        let at2 = start + Duration::from_millis(140);
        let out = core.handle(Input::ControlMessage(&live_result(2, 3001)), at2);
        assert_eq!(
            delivered(&out),
            [(1, Some(500), Some(Duration::from_millis(100))), (2, Some(501), Some(Duration::from_millis(107)))]
        );
        assert_eq!(core.frames_in_flight(), 1);
        assert_eq!(core.poll_timeout(), Some(at2 + Duration::from_secs(5)), "the stall clock restarts with a result");
        assert!(core.handle(Input::TrackEnded, at2).is_empty());
        assert_eq!(core.state(), State::Receiving);
        let out = core.handle(Input::ControlMessage(&live_result(3, 6003)), at2);
        assert_eq!(delivered(&out), [(3, Some(502), Some(Duration::from_millis(74)))]);
        assert_eq!(core.poll_timeout(), None, "nothing in flight");
        let out = core.handle(Input::ControlMessage(&result_message(4, &complete_json(), false)), at2);
        assert!(matches!(out.last(), Some(Output::Deliver(ResultEvent::Complete { frames: 3, .. }))), "{out:?}");
        let stats = core.stats();
        assert_eq!((stats.frames_sent, stats.frames_skipped, stats.results_unpaired), (3, 0, 0));
    }

    #[test]
    fn a_live_session_without_results_stalls_after_stall_timeout() {
        let start = Instant::now();
        let mut core = live_core(start);
        core.handle(Input::FrameSent { rtp_timestamp: 1, pts_ns: None, arrived: start }, start);
        let deadline = core.poll_timeout().unwrap();
        assert!(core.handle(Input::Timeout, deadline - Duration::from_millis(1)).is_empty());
        let out = core.handle(Input::Timeout, deadline);
        assert_eq!(out, [Output::Failed(SessionError::ResultsStalled { timeout: Duration::from_secs(5), results: 0 })]);
        assert_eq!(core.state(), State::Failed);
    }

    #[test]
    fn a_keyframe_request_lets_one_frame_past_the_window() {
        let now = Instant::now();
        let mut core = live_core(now);
        for rtp in [10, 3011] {
            core.handle(Input::FrameSent { rtp_timestamp: rtp, pts_ns: None, arrived: now }, now);
        }
        assert_eq!(core.frames_in_flight(), 2);
        core.handle(Input::KeyframeRequested, now);
        assert_eq!(core.frames_in_flight(), 1, "one frame may go");
        core.handle(Input::FrameSent { rtp_timestamp: 6013, pts_ns: None, arrived: now }, now);
        assert_eq!(core.frames_in_flight(), 3, "the grant is used up");
        assert_eq!(core.stats().keyframe_requests, 1);
    }

    #[test]
    fn frames_before_the_track_is_up_are_refused_but_drops_count() {
        let now = Instant::now();
        let mut core = connected(now);
        assert!(core.handle(Input::FrameDropped, now).is_empty());
        assert_eq!(core.stats().frames_dropped, 1, "a drop while connecting counts");
        let out = core.handle(Input::FrameSent { rtp_timestamp: 1, pts_ns: None, arrived: now }, now);
        assert!(matches!(&out[..], [Output::Failed(SessionError::UploadMismatch(text))] if text.contains("live frame")), "{out:?}");
    }

    #[test]
    fn a_live_session_that_processed_nothing_says_so() {
        let now = Instant::now();
        let mut core = live_core(now);
        core.handle(Input::FrameSent { rtp_timestamp: 1, pts_ns: None, arrived: now }, now);
        core.handle(Input::TrackEnded, now);
        let out = core.handle(Input::ControlMessage(&result_message(1, &complete_json(), false)), now);
        assert_eq!(out, [Output::Failed(SessionError::NothingProcessed { sent: 1, reason: None })]);
        assert!(SessionError::NothingProcessed { sent: 1, reason: None }.to_string().contains("none of the 1 frames of the live video"));
    }

    #[test]
    fn a_camera_session_receives_once_connected_and_counts_results_missed_before_the_channel_opened() {
        let now = Instant::now();
        let mut core = SessionCore::new(&config(|s| {
            s.source_url = Some("rtsp://user:pw@127.0.0.1:8554/cam".into());
            s.realtime_processing = true;
        }));
        assert!(core.handle(Input::Connected, now).is_empty());
        assert_eq!(core.state(), State::Receiving, "nothing to upload: results come");
        assert_eq!(core.poll_timeout(), None, "no keepalive, no upload stall timer");
        // The server processed frames 1-3 before the inference channel opened.
        for frame_id in [4, 5, 7] {
            let outputs = core.handle(Input::ControlMessage(&result_message(frame_id as u32, &frame_json(frame_id), false)), now);
            assert!(matches!(outputs.as_slice(), [Output::Deliver(ResultEvent::Frame(_))]), "{outputs:?}");
        }
        assert_eq!(core.stats().results_missed, 4, "frames 1-3 and 6 were processed without a result reaching us");
        let outputs = core.handle(Input::ControlMessage(&result_message(8, &complete_json(), false)), now);
        assert!(matches!(outputs.as_slice(), [Output::Deliver(ResultEvent::Complete { frames: 3, .. })]), "{outputs:?}");
        assert_eq!(core.state(), State::Complete);
    }

    #[test]
    fn a_camera_that_gave_no_frame_names_the_camera_without_credentials() {
        let now = Instant::now();
        let mut core = SessionCore::new(&config(|s| s.source_url = Some("http://user:pw@127.0.0.1:8080/cam.mjpg?token=t".into())));
        core.handle(Input::Connected, now);
        let outputs = core.handle(Input::ControlMessage(&result_message(1, &complete_json(), false)), now);
        let [Output::Failed(error)] = outputs.as_slice() else { panic!("{outputs:?}") };
        let text = error.to_string();
        assert!(text.starts_with("the server read no frames from http://127.0.0.1:8080/cam.mjpg?…"), "{text}");
        assert!(!text.contains("pw") && !text.contains("token"), "{text}");
    }


    #[test]
    fn acks_go_past_frames_whose_results_never_came_even_when_turned_on_after_the_gap() {
        let now = Instant::now();
        let mut core = SessionCore::new(&config(|s| s.source_url = Some("http://127.0.0.1:8080/m.mjpg".into())));
        core.handle(Input::Connected, now);
        // Frames 1-4 were processed before the channel opened; acks come on later.
        core.handle(Input::ControlMessage(&result_message(5, &frame_json(5), false)), now);
        core.handle(Input::EnableAcks { lead: 2 }, now);
        assert_eq!(core.handle(Input::FrameHandled(5), now), vec![Output::SendControl(ack_message(7))]);
        // A gap later, acks on: the ack moves at once when frame 7 shows 6 lost.
        let outputs = core.handle(Input::ControlMessage(&result_message(7, &frame_json(7), false)), now);
        assert_eq!(outputs[0], Output::SendControl(ack_message(8)), "{outputs:?}");
        assert_eq!(core.handle(Input::FrameHandled(7), now), vec![Output::SendControl(ack_message(9))]);
    }

}
