// One upload-and-results session with the server over webrtc-rs, shared by
// roboflowuploadsink (which creates it and feeds the upload) and
// roboflowresultsrc (which consumes the results) through `registry`.

pub mod registry;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::FutureExt as _;
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot, watch};

use rtc::ice::mdns::MulticastDnsMode;
use rtc::rtp_transceiver::rtp_sender::RtpCodecKind;
use rtc::rtp_transceiver::{RTCRtpTransceiverDirection, RTCRtpTransceiverInit};
use webrtc::data_channel::{DataChannel, DataChannelEvent, RTCDataChannelInit};
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::peer_connection::{
    MediaEngine, PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler,
    RTCConfigurationBuilder, RTCIceGatheringState, RTCIceServer, RTCPeerConnectionState,
    RTCSessionDescription, Registry, SettingEngineBuilder, register_default_interceptors,
};

use crate::config::SessionConfig;
use crate::protocol::keepalive::KeepaliveTracker;
use crate::protocol::messages::FrameResult;
use crate::protocol::results::{ReassemblyLimits, ResultError, ResultReassembler};
use crate::protocol::upload::{KEEPALIVE_MESSAGE, UPLOAD_HEADER_LEN, is_keepalive};
use crate::runtime::RUNTIME;
use crate::signalling;
use rtc::shared::marshal::Marshal;

static CAT: LazyLock<gst::DebugCategory> = LazyLock::new(|| {
    gst::DebugCategory::new(
        "roboflowsession",
        gst::DebugColorFlags::empty(),
        Some("Roboflow WebRTC session"),
    )
});

pub const CONTROL_CHANNEL: &str = "inference";
pub const UPLOAD_CHANNEL: &str = "video_upload";
/// Results waiting for their consumer. Past this the control channel is not
/// read, which back-pressures the server through SCTP.
const EVENT_QUEUE: usize = 64;
/// Chunks handed from the sink to the upload task: kept tiny, so that the
/// bytes in flight are bounded by the channel's send-buffer limit.
const UPLOAD_QUEUE: usize = 2;
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Connecting,
    Connected,
    Uploading,
    Processing,
    Complete,
    Failed,
    Closed,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Connecting => "connecting",
            Phase::Connected => "connected",
            Phase::Uploading => "uploading",
            Phase::Processing => "processing",
            Phase::Complete => "complete",
            Phase::Failed => "failed",
            Phase::Closed => "closed",
        }
    }

    fn upload_in_progress(self) -> bool {
        matches!(self, Phase::Connecting | Phase::Connected | Phase::Uploading)
    }
}

/// One frame's result, as reassembled and parsed.
#[derive(Debug, Clone)]
pub struct FrameEvent {
    /// 1-based frame number (from the result's metadata, else its header).
    pub frame_id: u64,
    /// Presentation time on the source's timeline: pts × time_base.
    pub pts_seconds: Option<f64>,
    pub errors: Vec<String>,
    /// The whole result object.
    pub json: serde_json::Value,
}

#[derive(Debug, Clone)]
pub enum SessionEvent {
    Frame(Box<FrameEvent>),
    /// `processing_complete` arrived after `frames` results.
    Complete {
        frames: u64,
        termination_reason: Option<String>,
    },
    Failed(String),
}

/// What the returned video track delivers to a result source.
#[derive(Debug, Clone)]
pub enum TrackItem {
    /// Sent once, before the first packet: the negotiated codec.
    Codec {
        mime_type: String,
        clock_rate: u32,
        payload_type: u8,
    },
    /// One RTP packet, serialized as it arrived.
    Packet(Bytes),
}

/// RTP packets waiting for the result source; past this packets are dropped
/// (and counted) rather than stalling the connection.
const TRACK_QUEUE: usize = 1024;

/// A read-only picture of the session for `stats` properties.
#[derive(Debug, Clone)]
pub struct StatsSnapshot {
    pub phase: Phase,
    pub bytes_sent: u64,
    pub total_bytes: u64,
    pub chunks_sent: u64,
    pub total_chunks: u64,
    pub keepalives_sent: u64,
    pub keepalives_echoed: u64,
    pub last_echo_rtt: Option<Duration>,
    pub frames_received: u64,
}

#[derive(Default)]
struct Counters {
    bytes_sent: AtomicU64,
    chunks_sent: AtomicU64,
    total_bytes: AtomicU64,
    total_chunks: AtomicU64,
    frames_received: AtomicU64,
}

/// An upload whose last chunk is queued (see [`Session::end_upload`]).
pub struct UploadEnd(futures::future::Shared<oneshot::Receiver<Result<(), String>>>);

/// The sink's end of an upload in progress.
pub struct Upload {
    chunks: mpsc::Sender<Bytes>,
    finished: oneshot::Receiver<Result<(), String>>,
}

pub struct Session {
    name: String,
    config: SessionConfig,
    phase: Mutex<Phase>,
    /// What the connect task is waiting for, to explain a connect timeout.
    stage: Mutex<&'static str>,
    connected: watch::Sender<bool>,
    complete: watch::Sender<bool>,
    failure: watch::Sender<Option<String>>,
    counters: Counters,
    keepalive: Mutex<KeepaliveTracker>,
    warnings: Mutex<Vec<String>>,
    peer: Mutex<Option<Arc<dyn PeerConnection>>>,
    upload_channel: Mutex<Option<Arc<dyn DataChannel>>>,
    control_channel: Mutex<Option<Arc<dyn DataChannel>>>,
    events_tx: mpsc::Sender<SessionEvent>,
    events_rx: Mutex<Option<mpsc::Receiver<SessionEvent>>>,
    source_attached: watch::Sender<bool>,
    /// The sink, plus the result source once attached; the last to let go
    /// closes the session.
    holders: std::sync::atomic::AtomicUsize,
    track_tx: mpsc::Sender<TrackItem>,
    track_rx: Mutex<Option<mpsc::Receiver<TrackItem>>>,
    track_packets_dropped: AtomicU64,
    tasks: Mutex<Vec<tokio::task::AbortHandle>>,
    closed: AtomicBool,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("name", &self.name)
            .field("phase", &self.phase())
            .finish_non_exhaustive()
    }
}

fn webrtc_error(what: &str, err: impl std::fmt::Display) -> String {
    format!("{what}: {err}")
}

impl Session {
    /// Creates the session and starts connecting in the background: the
    /// server takes seconds to start its worker, which overlaps with
    /// whatever upstream is doing meanwhile.
    pub fn start(name: String, config: SessionConfig) -> Arc<Session> {
        let (events_tx, events_rx) = mpsc::channel(EVENT_QUEUE);
        let (track_tx, track_rx) = mpsc::channel(TRACK_QUEUE);
        let keepalive = KeepaliveTracker::new(config.keepalive_interval);
        let session = Arc::new(Session {
            name,
            config,
            phase: Mutex::new(Phase::Connecting),
            stage: Mutex::new("creating the peer connection"),
            connected: watch::Sender::new(false),
            complete: watch::Sender::new(false),
            failure: watch::Sender::new(None),
            counters: Counters::default(),
            keepalive: Mutex::new(keepalive),
            warnings: Mutex::new(Vec::new()),
            peer: Mutex::new(None),
            upload_channel: Mutex::new(None),
            control_channel: Mutex::new(None),
            events_tx,
            events_rx: Mutex::new(Some(events_rx)),
            source_attached: watch::Sender::new(false),
            holders: std::sync::atomic::AtomicUsize::new(1),
            track_tx,
            track_rx: Mutex::new(Some(track_rx)),
            track_packets_dropped: AtomicU64::new(0),
            tasks: Mutex::new(Vec::new()),
            closed: AtomicBool::new(false),
        });
        let task = session.clone();
        // Not aborted by close(): dropping a webrtc-rs connection that was
        // never closed leaves its driver task running. The task stops at its
        // next await once the session is closed, and closes what it built.
        RUNTIME.spawn(async move { task.connect().await });
        session
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn config(&self) -> &SessionConfig {
        &self.config
    }

    pub fn phase(&self) -> Phase {
        *self.phase.lock().unwrap()
    }

    fn set_phase(&self, phase: Phase) {
        let mut current = self.phase.lock().unwrap();
        if !matches!(*current, Phase::Failed | Phase::Closed) {
            gst::debug!(CAT, "session {}: {} -> {}", self.name, current.as_str(), phase.as_str());
            *current = phase;
        }
    }

    fn spawn<F>(&self, future: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let handle = RUNTIME.spawn(future);
        let mut tasks = self.tasks.lock().unwrap();
        tasks.retain(|task| !task.is_finished());
        tasks.push(handle.abort_handle());
    }

    pub fn stats(&self) -> StatsSnapshot {
        let keepalive = self.keepalive.lock().unwrap();
        StatsSnapshot {
            phase: self.phase(),
            bytes_sent: self.counters.bytes_sent.load(Ordering::Relaxed),
            total_bytes: self.counters.total_bytes.load(Ordering::Relaxed),
            chunks_sent: self.counters.chunks_sent.load(Ordering::Relaxed),
            total_chunks: self.counters.total_chunks.load(Ordering::Relaxed),
            keepalives_sent: keepalive.sent(),
            keepalives_echoed: keepalive.echoed(),
            last_echo_rtt: keepalive.last_rtt(),
            frames_received: self.counters.frames_received.load(Ordering::Relaxed),
        }
    }

    /// Warnings the session gathered (e.g. keepalive echoes that never came)
    /// for the element to post; each is returned once.
    pub fn take_warnings(&self) -> Vec<String> {
        std::mem::take(&mut *self.warnings.lock().unwrap())
    }

    /// Records the first fatal error; later ones are consequences of it.
    pub fn fail(&self, message: String) {
        if self.closed.load(Ordering::Acquire) {
            return;
        }
        let first = self.failure.send_if_modified(|failure| {
            if failure.is_none() {
                *failure = Some(message.clone());
                true
            } else {
                false
            }
        });
        if first {
            gst::warning!(CAT, "session {} failed: {message}", self.name);
            *self.phase.lock().unwrap() = Phase::Failed;
            let _ = self.events_tx.try_send(SessionEvent::Failed(message));
        }
    }

    pub fn failure(&self) -> Option<String> {
        self.failure.borrow().clone()
    }

    /// Resolves with the failure message once the session has failed.
    pub async fn failed(&self) -> String {
        let mut failure = self.failure.subscribe();
        match failure.wait_for(Option::is_some).await {
            Ok(message) => message.clone().unwrap_or_default(),
            Err(_) => "the session was dropped".to_owned(),
        }
    }

    /// Waits until both data channels are open, or the session failed.
    pub async fn wait_connected(&self) -> Result<(), String> {
        let mut connected = self.connected.subscribe();
        tokio::select! {
            biased;
            message = self.failed() => Err(message),
            result = connected.wait_for(|up| *up) => result.map(|_| ()).map_err(|_| "the session was dropped".to_owned()),
        }
    }

    /// Waits until the server reported processing_complete, or the session failed.
    pub async fn wait_complete(&self) -> Result<(), String> {
        let mut complete = self.complete.subscribe();
        tokio::select! {
            biased;
            result = complete.wait_for(|done| *done) => result.map(|_| ()).map_err(|_| "the session was dropped".to_owned()),
            message = self.failed() => Err(message),
        }
    }

    /// Hands the result stream to one consumer: the result source once one
    /// attaches, otherwise the sink itself.
    pub fn take_events(&self, by_result_source: bool) -> Option<mpsc::Receiver<SessionEvent>> {
        let taken = self.events_rx.lock().unwrap().take();
        if taken.is_some() && by_result_source {
            self.holders.fetch_add(1, Ordering::AcqRel);
            self.source_attached.send_replace(true);
        }
        taken
    }

    /// The returned video track's codec and packets (track transport).
    pub fn take_track(&self) -> Option<mpsc::Receiver<TrackItem>> {
        self.track_rx.lock().unwrap().take()
    }

    pub fn track_packets_dropped(&self) -> u64 {
        self.track_packets_dropped.load(Ordering::Relaxed)
    }

    /// Resolves once a result source has taken the results.
    pub async fn wait_result_source(&self) {
        let _ = self.source_attached.subscribe().wait_for(|attached| *attached).await;
    }

    pub fn has_result_source(&self) -> bool {
        *self.source_attached.borrow()
    }

    /// Next result event; a failure ends the stream even when the queue is
    /// empty, and queued results are delivered before it.
    pub async fn next_event(&self, events: &mut mpsc::Receiver<SessionEvent>) -> SessionEvent {
        tokio::select! {
            biased;
            event = events.recv() => event.unwrap_or_else(|| SessionEvent::Failed("the session ended without processing_complete".to_owned())),
            message = self.failed() => SessionEvent::Failed(message),
        }
    }

    /// Sends a text message (e.g. `{"ack": N}`) on the control channel.
    pub async fn send_control(&self, text: String) -> Result<(), String> {
        let channel = self.control_channel.lock().unwrap().clone();
        let channel = channel.ok_or_else(|| "the inference channel is not open".to_owned())?;
        channel
            .send_text(&text)
            .await
            .map_err(|err| webrtc_error("sending on the inference channel failed", err))
    }

    /// Starts the upload of `total_bytes` in `total_chunks` chunk messages.
    pub fn begin_upload(self: &Arc<Self>, total_bytes: u64, total_chunks: u32) -> Result<Upload, String> {
        let channel = self
            .upload_channel
            .lock()
            .unwrap()
            .clone()
            .ok_or_else(|| "the video_upload channel is not open".to_owned())?;
        self.counters.total_bytes.store(total_bytes, Ordering::Relaxed);
        self.counters.total_chunks.store(total_chunks.into(), Ordering::Relaxed);
        self.set_phase(Phase::Uploading);
        let (chunks_tx, chunks_rx) = mpsc::channel(UPLOAD_QUEUE);
        let (finished_tx, finished_rx) = oneshot::channel();
        let (uploading_tx, uploading_rx) = watch::channel(true);
        if !self.config.keepalive_interval.is_zero() {
            let session = self.clone();
            let channel = channel.clone();
            self.spawn(async move { session.keepalive_task(channel, uploading_rx).await });
        }
        let session = self.clone();
        self.spawn(async move {
            let outcome = session.upload_task(channel, chunks_rx).await;
            uploading_tx.send_replace(false);
            if let Err(message) = &outcome {
                session.fail(message.clone());
            } else {
                session.set_phase(Phase::Processing);
            }
            let _ = finished_tx.send(outcome);
        });
        Ok(Upload {
            chunks: chunks_tx,
            finished: finished_rx,
        })
    }

    /// Queues one chunk message; waits while the channel is at its buffer limit.
    pub async fn send_chunk(&self, upload: &Upload, message: Bytes) -> Result<(), String> {
        tokio::select! {
            biased;
            message = self.failed() => Err(message),
            sent = upload.chunks.send(message) => sent.map_err(|_| {
                self.failure().unwrap_or_else(|| "the upload task stopped".to_owned())
            }),
        }
    }

    /// No more chunks: the upload task ends once the queued ones are sent.
    pub fn end_upload(upload: Upload) -> UploadEnd {
        let Upload { chunks, finished } = upload;
        drop(chunks);
        UploadEnd(finished.shared())
    }

    /// Waits until every queued chunk has been handed to the data channel;
    /// may be called again after a cancelled wait.
    pub async fn upload_ended(&self, end: &UploadEnd) -> Result<(), String> {
        tokio::select! {
            biased;
            message = self.failed() => Err(message),
            outcome = end.0.clone() => outcome.unwrap_or_else(|_| Err("the upload task was cancelled".to_owned())),
        }
    }

    async fn upload_task(
        &self,
        channel: Arc<dyn DataChannel>,
        mut chunks: mpsc::Receiver<Bytes>,
    ) -> Result<(), String> {
        while let Some(chunk) = chunks.recv().await {
            let payload = chunk.len().saturating_sub(UPLOAD_HEADER_LEN) as u64;
            // Runs to completion: a send cancelled midway may leave the
            // channel in an undefined state.
            if let Err(err) = channel.send(BytesMut::from(&chunk[..])).await {
                let message = format!(
                    "sending chunk {} of {} on the video_upload channel failed: {err}",
                    self.counters.chunks_sent.load(Ordering::Relaxed) + 1,
                    self.counters.total_chunks.load(Ordering::Relaxed)
                );
                // Recorded while `chunks` is still open, so that the sink,
                // whose next send now fails, finds the reason.
                self.fail(message.clone());
                return Err(message);
            }
            self.counters.bytes_sent.fetch_add(payload, Ordering::Relaxed);
            self.counters.chunks_sent.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Sends a keepalive every interval until `uploading` turns false. It
    /// runs beside the upload task, so that a keepalive competes for buffer
    /// room with the chunks instead of queueing behind all of them; it is
    /// never aborted in the middle of a send.
    async fn keepalive_task(&self, channel: Arc<dyn DataChannel>, mut uploading: watch::Receiver<bool>) {
        let interval = self.config.keepalive_interval;
        self.keepalive.lock().unwrap().start(Instant::now());
        loop {
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = uploading.wait_for(|up| !*up) => return,
            }
            if !*uploading.borrow() {
                return;
            }
            if !self.keepalive.lock().unwrap().poll_send(Instant::now()) {
                continue;
            }
            if let Err(err) = channel.send(BytesMut::from(KEEPALIVE_MESSAGE)).await {
                gst::debug!(CAT, "session {}: keepalive not sent: {err}", self.name);
                return;
            }
            self.check_missed_echoes();
        }
    }

    fn check_missed_echoes(&self) {
        let grace = self.config.keepalive_interval * 2;
        let missed = self.keepalive.lock().unwrap().missed_echoes(Instant::now(), grace);
        if missed > 0 {
            self.warnings.lock().unwrap().push(format!(
                "{missed} keepalive(s) on the video_upload channel got no echo from the server within {:.1} s",
                grace.as_secs_f64()
            ));
        }
    }

    fn on_keepalive_echo(&self) {
        let rtt = self.keepalive.lock().unwrap().on_echo(Instant::now());
        gst::trace!(CAT, "session {}: keepalive echo, rtt {rtt:?}", self.name);
    }

    /// The sink lets go after its upload. A session whose results a result
    /// source is reading stays open until that source lets go too (its
    /// results and video may still be in flight); any other session closes now.
    pub fn release_by_sink(&self) {
        if self.has_result_source() {
            self.release();
        } else {
            self.close();
        }
    }

    /// One holder lets go; the last one closes the session.
    pub fn release(&self) {
        if self.holders.fetch_sub(1, Ordering::AcqRel) <= 1 {
            self.close();
        }
    }

    /// Closes the peer connection and stops every task; returns at once.
    pub fn close(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        {
            let mut phase = self.phase.lock().unwrap();
            if !matches!(*phase, Phase::Complete | Phase::Failed) {
                *phase = Phase::Closed;
            }
        }
        for task in self.tasks.lock().unwrap().drain(..) {
            task.abort();
        }
        self.upload_channel.lock().unwrap().take();
        self.control_channel.lock().unwrap().take();
        self.events_rx.lock().unwrap().take();
        if let Some(peer) = self.peer.lock().unwrap().take() {
            let name = self.name.clone();
            RUNTIME.spawn(async move {
                if tokio::time::timeout(CLOSE_TIMEOUT, peer.close()).await.is_err() {
                    gst::warning!(CAT, "session {name}: the peer connection did not close within {CLOSE_TIMEOUT:?}");
                }
            });
        }
        // Wake anyone waiting on the session, failed before or not.
        self.failure.send_modify(|failure| {
            if failure.is_none() {
                *failure = Some("the session was closed".to_owned());
            }
        });
    }

    /// Runs `future` unless the session closes first.
    async fn unless_closed<T>(&self, future: impl Future<Output = T>) -> Result<T, String> {
        let mut failure = self.failure.subscribe();
        tokio::select! {
            value = future => Ok(value),
            _ = failure.wait_for(|_| self.closed.load(Ordering::Acquire)) => Err("the session was closed".to_owned()),
        }
    }

    async fn connect(self: Arc<Self>) {
        let timeout = self.config.connect_timeout;
        match tokio::time::timeout(timeout, self.clone().establish()).await {
            Ok(Ok(())) => {
                self.set_phase(Phase::Connected);
                self.connected.send_replace(true);
                gst::info!(CAT, "session {}: connected to {}", self.name, self.config.api_url);
            }
            Ok(Err(message)) => self.fail(message),
            Err(_) => {
                let stage = *self.stage.lock().unwrap();
                self.fail(format!(
                    "no session with the server at {} within {:.1} s (connect-timeout) while {stage}",
                    self.config.api_url,
                    timeout.as_secs_f64()
                ));
            }
        }
    }

    fn set_stage(&self, stage: &'static str) {
        gst::debug!(CAT, "session {}: {stage}", self.name);
        *self.stage.lock().unwrap() = stage;
    }

    async fn establish(self: Arc<Self>) -> Result<(), String> {
        let config = &self.config;
        let mut media = MediaEngine::default();
        media
            .register_default_codecs()
            .map_err(|err| webrtc_error("registering codecs failed", err))?;
        let registry = register_default_interceptors(Registry::new(), &mut media)
            .map_err(|err| webrtc_error("registering interceptors failed", err))?;
        // mDNS candidates would hide our address from the server and can make
        // building the connection fail on hosts without multicast.
        let mut settings = SettingEngineBuilder::new().with_multicast_dns_mode(MulticastDnsMode::Disabled);
        if let Some(mtu) = config.sctp_mtu {
            settings = settings.with_sctp_mtu(mtu);
        }
        let settings = settings.build();
        let ice_servers = config
            .ice_servers
            .iter()
            .map(|server| RTCIceServer {
                urls: server.urls.clone(),
                username: server.username.clone().unwrap_or_default(),
                credential: server.credential.clone().unwrap_or_default(),
            })
            .collect();
        let (gathered_tx, mut gathered_rx) = watch::channel(false);
        let handler = Arc::new(Handler {
            session: Arc::downgrade(&self),
            gathered: gathered_tx,
        });
        // The gate admits a message while the outstanding bytes are below it,
        // so leave room for one whole message under buffer-limit.
        let largest_message = config.chunk_size + UPLOAD_HEADER_LEN;
        let send_limit = (config.buffer_limit - largest_message + 1).max(1);
        let bind = config.udp_bind_address.to_string();
        let peer = PeerConnectionBuilder::new()
            .with_configuration(RTCConfigurationBuilder::new().with_ice_servers(ice_servers).build())
            .with_media_engine(media)
            .with_setting_engine(settings)
            .with_interceptor_registry(registry)
            .with_handler(handler)
            .with_udp_addrs(vec![bind.clone()])
            .with_data_channel_send_buffer_limit(send_limit)
            .build()
            .await
            .map_err(|err| {
                webrtc_error(&format!("creating the WebRTC peer connection on {bind} failed (udp-bind-address)"), err)
            })?;
        let peer: Arc<dyn PeerConnection> = Arc::new(peer);
        {
            // Decided under the lock close() takes the peer with: either
            // close() sees the peer and closes it, or we see the close.
            let mut slot = self.peer.lock().unwrap();
            if self.closed.load(Ordering::Acquire) {
                drop(slot);
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, peer.close()).await;
                return Err("the session was closed".to_owned());
            }
            *slot = Some(peer.clone());
        }

        let reliable = RTCDataChannelInit {
            ordered: true,
            ..Default::default()
        };
        let control = peer
            .create_data_channel(CONTROL_CHANNEL, Some(reliable.clone()))
            .await
            .map_err(|err| webrtc_error("creating the inference data channel failed", err))?;
        let (control_open_tx, mut control_open) = watch::channel(false);
        {
            let session = self.clone();
            let channel = control.clone();
            self.spawn(async move { session.poll_control(channel, control_open_tx).await });
        }

        if config.wants_video_track() {
            peer.add_transceiver_from_kind(
                RtpCodecKind::Video,
                Some(RTCRtpTransceiverInit {
                    direction: RTCRtpTransceiverDirection::Recvonly,
                    streams: Vec::new(),
                    send_encodings: Vec::new(),
                }),
            )
            .await
            .map_err(|err| webrtc_error("adding the recvonly video transceiver failed", err))?;
        }

        self.set_stage("gathering ICE candidates");
        let offer = peer
            .create_offer(None)
            .await
            .map_err(|err| webrtc_error("creating the SDP offer failed", err))?;
        peer.set_local_description(offer)
            .await
            .map_err(|err| webrtc_error("applying the SDP offer failed", err))?;
        let _ = self.unless_closed(gathered_rx.wait_for(|done| *done)).await?;
        let offer = peer
            .local_description()
            .await
            .ok_or_else(|| "the peer connection has no local description after gathering".to_owned())?;

        self.set_stage("waiting for the server's SDP answer");
        let answer_sdp = self
            .unless_closed(signalling::exchange(config, offer.sdp, config.connect_timeout))
            .await??;
        let answer = RTCSessionDescription::answer(answer_sdp)
            .map_err(|err| webrtc_error("the server's SDP answer is malformed", err))?;
        peer.set_remote_description(answer)
            .await
            .map_err(|err| webrtc_error("the server's SDP answer was refused", err))?;

        self.set_stage("connecting to the server (ICE, DTLS, SCTP) and opening the inference channel");
        let _ = self.unless_closed(control_open.wait_for(|open| *open)).await?;
        // Opened only now, so that the server sees the channels in protocol
        // order: inference, then video_upload (channels created before the
        // connection open in no defined order).
        self.set_stage("opening the video_upload channel");
        let upload = peer
            .create_data_channel(UPLOAD_CHANNEL, Some(reliable))
            .await
            .map_err(|err| webrtc_error("creating the video_upload data channel failed", err))?;
        let (upload_open_tx, mut upload_open) = watch::channel(false);
        {
            let session = self.clone();
            let channel = upload.clone();
            self.spawn(async move { session.poll_upload(channel, upload_open_tx).await });
        }
        let _ = self.unless_closed(upload_open.wait_for(|open| *open)).await?;
        *self.control_channel.lock().unwrap() = Some(control);
        *self.upload_channel.lock().unwrap() = Some(upload);
        Ok(())
    }

    async fn poll_upload(self: Arc<Self>, channel: Arc<dyn DataChannel>, open: watch::Sender<bool>) {
        while let Some(event) = channel.poll().await {
            match event {
                DataChannelEvent::OnOpen => {
                    open.send_replace(true);
                }
                DataChannelEvent::OnMessage(message) if is_keepalive(&message.data) => {
                    self.on_keepalive_echo();
                }
                DataChannelEvent::OnMessage(message) => {
                    gst::debug!(CAT, "session {}: ignoring a {}-byte message on video_upload", self.name, message.data.len());
                }
                DataChannelEvent::OnClose => break,
                _ => {}
            }
        }
        if self.phase().upload_in_progress() {
            let stats = self.stats();
            self.fail(format!(
                "the server closed the video_upload channel during the upload, after {} of {} chunks",
                stats.chunks_sent, stats.total_chunks
            ));
        }
    }

    async fn poll_control(self: Arc<Self>, channel: Arc<dyn DataChannel>, open: watch::Sender<bool>) {
        let max = self.config.max_result_size;
        let mut reassembler = ResultReassembler::new(ReassemblyLimits {
            max_frame_bytes: max,
            max_decompressed_bytes: max.saturating_mul(4),
            ..ReassemblyLimits::default()
        });
        while let Some(event) = channel.poll().await {
            match event {
                DataChannelEvent::OnOpen => {
                    open.send_replace(true);
                }
                DataChannelEvent::OnMessage(message) => {
                    match self.on_result_message(&mut reassembler, &message.data).await {
                        Ok(true) => break,
                        Ok(false) => {}
                        Err(message) => {
                            self.fail(message);
                            return;
                        }
                    }
                }
                DataChannelEvent::OnClose => break,
                _ => {}
            }
        }
        if self.phase() != Phase::Complete {
            self.fail(format!(
                "the server closed the inference channel before processing_complete, after {} results",
                self.counters.frames_received.load(Ordering::Relaxed)
            ));
            return;
        }
        // After processing_complete the server closes the session; keep the
        // channel polled until it does so that webrtc-rs never stalls.
        while channel.poll().await.is_some() {}
    }

    /// Handles one result message; Ok(true) once processing is complete.
    async fn on_result_message(&self, reassembler: &mut ResultReassembler, data: &[u8]) -> Result<bool, String> {
        let Some(completed) = reassembler
            .push(data)
            .map_err(|err| {
                let hint = match err {
                    ResultError::FrameTooLarge { .. } | ResultError::DecompressedTooLarge { .. } => {
                        " (max-result-size)"
                    }
                    _ => "",
                };
                format!("a result message from the server is invalid: {err}{hint}")
            })?
        else {
            return Ok(false);
        };
        let json: serde_json::Value = serde_json::from_slice(&completed.json).map_err(|err| {
            format!(
                "the result of frame {} is not valid JSON ({err}); it starts with {:?}",
                completed.frame_id,
                String::from_utf8_lossy(&completed.json[..completed.json.len().min(60)])
            )
        })?;
        let result = FrameResult::deserialize(&json).map_err(|err| {
            format!("the result of frame {} does not have the expected shape: {err}", completed.frame_id)
        })?;

        if result.processing_complete {
            let frames = self.counters.frames_received.load(Ordering::Relaxed);
            if frames == 0 {
                return Err(format!(
                    "the server decoded no frames from the upload (processing_complete after 0 results{}); is the input a video FFmpeg can read?",
                    result
                        .termination_reason
                        .as_deref()
                        .map(|reason| format!(", termination_reason {reason}"))
                        .unwrap_or_default()
                ));
            }
            gst::info!(CAT, "session {}: processing complete after {frames} frames", self.name);
            self.set_phase(Phase::Complete);
            // Queued before wait_complete() learns of it: a sink waiting there
            // may close the session as soon as it does.
            let _ = self
                .events_tx
                .send(SessionEvent::Complete {
                    frames,
                    termination_reason: result.termination_reason,
                })
                .await;
            self.complete.send_replace(true);
            return Ok(true);
        }

        self.counters.frames_received.fetch_add(1, Ordering::Relaxed);
        let metadata = result.video_metadata.as_ref();
        let event = FrameEvent {
            frame_id: metadata
                .and_then(|m| m.frame_id)
                .unwrap_or(u64::from(completed.frame_id)),
            pts_seconds: metadata.and_then(|m| m.pts_seconds()),
            errors: result.errors,
            json,
        };
        // Waits while the consumer is behind: that back-pressures the server.
        let _ = self.events_tx.send(SessionEvent::Frame(Box::new(event))).await;
        Ok(false)
    }

    fn on_connection_state(&self, state: RTCPeerConnectionState) {
        gst::debug!(CAT, "session {}: peer connection {state}", self.name);
        match state {
            RTCPeerConnectionState::Failed if self.phase() != Phase::Complete => {
                self.fail(format!(
                    "the WebRTC connection to the server at {} failed (ICE/DTLS); check that its UDP ports are reachable from {} (udp-bind-address, ice-servers)",
                    self.config.api_url, self.config.udp_bind_address
                ));
            }
            RTCPeerConnectionState::Closed
                if !matches!(self.phase(), Phase::Complete | Phase::Closed) =>
            {
                self.fail("the server closed the WebRTC connection before processing_complete".to_owned());
            }
            _ => {}
        }
    }

    fn on_track(self: Arc<Self>, track: Arc<dyn TrackRemote>) {
        // Keep the track polled whether or not a result source reads it:
        // webrtc-rs stalls every stream when one is not read.
        let session = self.clone();
        self.spawn(async move {
            let mut packets = 0u64;
            let mut codec_sent = false;
            while let Some(event) = track.poll().await {
                match event {
                    TrackRemoteEvent::OnRtpPacket(packet) => {
                        packets += 1;
                        if !codec_sent {
                            codec_sent = true;
                            let codec = track.codec(packet.header.ssrc).await;
                            let (mime_type, clock_rate) = codec
                                .map(|c| (c.mime_type, c.clock_rate))
                                .unwrap_or_else(|| (String::new(), 90_000));
                            gst::info!(CAT, "session {}: returned track carries {mime_type} (payload type {})", session.name, packet.header.payload_type);
                            session.deliver_track(TrackItem::Codec {
                                mime_type,
                                clock_rate,
                                payload_type: packet.header.payload_type,
                            });
                        }
                        match packet.marshal() {
                            Ok(bytes) => session.deliver_track(TrackItem::Packet(bytes.freeze())),
                            Err(err) => gst::warning!(CAT, "session {}: cannot serialize an RTP packet: {err}", session.name),
                        }
                    }
                    TrackRemoteEvent::OnEnded => break,
                    _ => {}
                }
            }
            gst::debug!(CAT, "session {}: returned track ended after {packets} RTP packets", session.name);
        });
    }

    fn deliver_track(&self, item: TrackItem) {
        if self.track_tx.try_send(item).is_err() {
            self.track_packets_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.close();
    }
}

struct Handler {
    session: Weak<Session>,
    gathered: watch::Sender<bool>,
}

// Callbacks run on the connection's driver task: never block or wait in them.
#[async_trait::async_trait]
impl PeerConnectionEventHandler for Handler {
    async fn on_ice_gathering_state_change(&self, state: RTCIceGatheringState) {
        if state == RTCIceGatheringState::Complete {
            self.gathered.send_replace(true);
        }
    }

    async fn on_connection_state_change(&self, state: RTCPeerConnectionState) {
        if let Some(session) = self.session.upgrade() {
            session.on_connection_state(state);
        }
    }

    async fn on_track(&self, track: Arc<dyn TrackRemote>) {
        if let Some(session) = self.session.upgrade() {
            session.on_track(track);
        }
    }
}

/// Unique default session names.
pub fn default_name(element_name: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    format!("{element_name}-{}", COUNTER.fetch_add(1, Ordering::Relaxed))
}

pub fn stats_structure(stats: &StatsSnapshot, extra: impl FnOnce(&mut gst::structure::StructureRef)) -> gst::Structure {
    let mut structure = gst::Structure::builder("roboflow-stats")
        .field("phase", stats.phase.as_str())
        .field("bytes-sent", stats.bytes_sent)
        .field("total-bytes", stats.total_bytes)
        .field("chunks-sent", stats.chunks_sent)
        .field("total-chunks", stats.total_chunks)
        .field("keepalives-sent", stats.keepalives_sent)
        .field("keepalives-echoed", stats.keepalives_echoed)
        .field(
            "last-echo-rtt",
            stats
                .last_echo_rtt
                .map(|rtt| gst::ClockTime::from_nseconds(rtt.as_nanos() as u64)),
        )
        .field("frames-received", stats.frames_received)
        .build();
    extra(&mut structure);
    structure
}
