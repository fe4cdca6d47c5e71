// The webrtc-rs side of a session: builds the peer connection, does the
// offer/answer, and moves bytes and events between webrtc-rs and the
// sans-IO core (core.rs). Each channel is read by a task of its own, chunks
// leave through one upload task (a send is never cancelled midway), control
// messages through one sender task (acks stay in order), keepalives on a
// timer. The core lives behind a mutex that is never held across an await.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use rtc::ice::mdns::MulticastDnsMode;
use rtc::interceptor::{NackResponderBuilder, Slot};
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::media_stream::MediaStreamTrack;
use rtc::rtp_transceiver::rtp_sender::{
    RTCPFeedback, RTCRtpCodec, RTCRtpCodecParameters, RTCRtpCodingParameters, RTCRtpEncodingParameters, RtpCodecKind,
};
use rtc::rtp_transceiver::{RTCRtpTransceiverDirection, RTCRtpTransceiverInit};
use rtc::shared::marshal::{Marshal, Unmarshal};
use tokio::sync::{Notify, mpsc, watch};
use webrtc::data_channel::{DataChannel, DataChannelEvent, RTCDataChannelInit};
use webrtc::media_stream::track_local::{TrackLocal, TrackLocalEvent};
use webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP;
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::peer_connection::{
    MediaEngine, PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler, RTCConfigurationBuilder,
    RTCIceGatheringState, RTCIceServer, RTCPeerConnectionState, RTCSessionDescription, Registry,
    SettingEngineBuilder, configure_rtcp_reports, configure_simulcast_extension_headers, configure_twcc_receiver_only,
};

use crate::config::{CameraKind, SessionConfig};
use crate::protocol::keyframe::{self, KeyframeAction, KeyframeRequests, MAX_KEYFRAME_REQUESTS, TrackCodec};
use crate::protocol::live::LiveCodec;
use crate::protocol::upload::{KEEPALIVE_MESSAGE, UPLOAD_HEADER_LEN};
use crate::runtime::SessionRuntime;
use crate::signalling;

use super::early_checks::{EarlyCheckRuntime, EarlyChecks};
use super::core::{Input, Output, PeerState, ResultEvent, SessionCore, SessionStats, State};
use super::error::SessionError;

mod own_loop;

pub static CAT: LazyLock<gst::DebugCategory> = LazyLock::new(|| {
    gst::DebugCategory::new("roboflowsession", gst::DebugColorFlags::empty(), Some("Roboflow WebRTC session"))
});

pub const CONTROL_CHANNEL: &str = "inference";
pub const UPLOAD_CHANNEL: &str = "video_upload";
/// Results waiting for their consumer. Past this the control channel is not
/// read, which back-pressures the server through SCTP.
const RESULT_QUEUE: usize = 64;
/// Chunks handed to the upload task: kept tiny, so that the bytes in flight
/// are bounded by the channel's send-buffer limit.
const UPLOAD_QUEUE: usize = 2;
/// RTP packets of the returned track waiting for the result source (the
/// only queue they pass: roboflowresultsrc decodes them in its streaming
/// thread); past this they are dropped (and counted) rather than stalling
/// the connection. About 5 MiB of packets, seconds of 720p video.
const TRACK_QUEUE: usize = 4096;
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Frames of RTP packets handed to the track's sender task. The sink's
/// frames-in-flight window bounds what is sent; this only decouples.
const TRACK_OUT_QUEUE: usize = 4;
/// The payload type offered for the client's track.
const LIVE_PAYLOAD_TYPE: u8 = 96;
/// ICE consent: a check every second; no answer for this long is
/// "disconnected", and this much longer "failed". A dead server worker is
/// thus noticed within about 9 s (webrtc-rs's defaults: about 30 s). The
/// server answers ICE from its event loop while frames are processed in a
/// thread, so a slow Workflow does not look dead.
pub const ICE_DISCONNECTED_AFTER: Duration = Duration::from_secs(5);
const ICE_FAILED_AFTER: Duration = Duration::from_secs(4);
const ICE_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
/// The pace of connectivity checks while connecting: RFC 8445's Ta, 50 ms.
/// At webrtc-rs's 200 ms the nomination waited for the next tick, 200 ms
/// after the first check had succeeded, while a camera the server already
/// reads filled the server's queue (PROTOCOL.md §11). Connected, the agent
/// ticks at 200 ms whatever this is.
const ICE_CHECK_INTERVAL: Duration = Duration::from_millis(50);
/// Checks per candidate pair before it fails: 1.4 s, as webrtc-rs's
/// default (7 at 200 ms).
const ICE_MAX_BINDING_REQUESTS: u16 = 28;
/// While the inference channel waits to open after the transport is up:
/// a write wake-up every 2 ms, at most 50 (see `establish`).
const OPEN_NUDGE_INTERVAL: Duration = Duration::from_millis(2);
const OPEN_NUDGES: u32 = 50;

/// What the returned video track delivers to a result source.
#[derive(Debug, Clone)]
pub enum TrackItem {
    /// Sent once, before the first packet: the negotiated codec.
    Codec { mime_type: String, clock_rate: u32, payload_type: u8 },
    /// One RTP packet, serialized as it arrived.
    Packet(Bytes),
}

/// What the sink hands to the client track's sender task, in order.
#[derive(Debug)]
pub enum TrackOut {
    /// One frame's RTP packets (restamped, with the boundary packet).
    Frame(Vec<Vec<u8>>),
    /// The end: an RTCP BYE for the track's SSRC.
    End,
}

/// The client's video track (live video in).
#[derive(Clone)]
struct LiveTrack {
    local: Arc<TrackLocalStaticRTP>,
    ssrc: u32,
    payload_type: u8,
}

/// The state the driver and the two endpoints share.
pub(crate) struct Shared {
    pub name: String,
    pub config: Arc<SessionConfig>,
    core: Mutex<SessionCore>,
    /// The core's state, for waiters.
    state: watch::Sender<State>,
    /// Live video: frames sent whose result has not come back, for waiters.
    in_flight: watch::Sender<u64>,
    /// The first failure, for waiters (also `Closed` after a close).
    failure: watch::Sender<Option<SessionError>>,
    /// Wakes the timer task when the core's next timeout may have moved.
    timer: Notify,
    warnings: Mutex<Vec<String>>,
    results_tx: mpsc::Sender<Sequenced<ResultEvent>>,
    track_tx: mpsc::Sender<Sequenced<TrackItem>>,
    /// Results and track items handed over so far: the next one's place.
    handed_over: AtomicU64,
    track_packets_dropped: AtomicU64,
    /// Live video: the server asked for a keyframe (PLI/FIR).
    keyframe_requested: AtomicBool,
    /// The returned track: the result source asks the server for a keyframe
    /// (its depayloader met a loss); sent as a PLI.
    keyframe_wanted: Notify,
    /// The peer connection is connected (ICE and DTLS up).
    transport_up: Notify,
    /// PLIs sent for the returned track.
    keyframe_requests_sent: AtomicU64,
    /// Chunks to the upload task, once the upload channel is open.
    upload_tx: Mutex<Option<mpsc::Sender<Bytes>>>,
    /// Frames to the client track's sender task, once connected (live).
    track_out_tx: Mutex<Option<mpsc::Sender<TrackOut>>>,
    /// Text messages to the control sender task, once the channel is open.
    control_tx: Mutex<Option<mpsc::UnboundedSender<String>>>,
    upload_channel: Mutex<Option<Arc<dyn DataChannel>>>,
    peer: Mutex<Option<Arc<dyn PeerConnection>>>,
    /// What the connect task is waiting for, to explain a connect timeout.
    stage: Mutex<&'static str>,
    tasks: Mutex<Vec<tokio::task::AbortHandle>>,
    closed: AtomicBool,
    /// The session's own thread, where all of the above runs.
    runtime: SessionRuntime,
    /// Our own connection loop, where it drives the session (own_loop.rs).
    own_loop: Mutex<Option<Arc<own_loop::LoopHandle>>>,
    /// The returned track: a keyframe was asked for (own loop).
    keyframe_asked: AtomicBool,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").field("name", &self.name).finish_non_exhaustive()
    }
}

/// A result event or a returned-track item with its place in the order the
/// session handed them over. The two travel on separate channels, and a
/// consumer that pairs the track's frames with their results merges them
/// back in this order (rtp_pairing.rs relies on arrival order).
pub type Sequenced<T> = (u64, T);

/// The receiving ends a new session hands to its result consumer.
pub(crate) struct Receivers {
    pub results: mpsc::Receiver<Sequenced<ResultEvent>>,
    pub track: mpsc::Receiver<Sequenced<TrackItem>>,
}

impl Shared {
    /// Creates the session and starts connecting in the background: the
    /// server takes seconds to start its worker, which overlaps with
    /// whatever upstream does meanwhile.
    pub fn start(name: String, config: SessionConfig) -> (Arc<Shared>, Receivers) {
        let (results_tx, results) = mpsc::channel(RESULT_QUEUE);
        let (track_tx, track) = mpsc::channel(TRACK_QUEUE);
        let runtime = SessionRuntime::start(&name);
        let shared = Arc::new(Shared {
            name,
            core: Mutex::new(SessionCore::new(&config)),
            config: Arc::new(config),
            state: watch::Sender::new(State::Connecting),
            in_flight: watch::Sender::new(0),
            failure: watch::Sender::new(None),
            timer: Notify::new(),
            warnings: Mutex::new(Vec::new()),
            results_tx,
            track_tx,
            handed_over: AtomicU64::new(0),
            track_packets_dropped: AtomicU64::new(0),
            keyframe_requested: AtomicBool::new(false),
            keyframe_wanted: Notify::new(),
            transport_up: Notify::new(),
            keyframe_requests_sent: AtomicU64::new(0),
            upload_tx: Mutex::new(None),
            track_out_tx: Mutex::new(None),
            control_tx: Mutex::new(None),
            upload_channel: Mutex::new(None),
            peer: Mutex::new(None),
            stage: Mutex::new("creating the peer connection"),
            tasks: Mutex::new(Vec::new()),
            closed: AtomicBool::new(false),
            runtime,
            own_loop: Mutex::new(None),
            keyframe_asked: AtomicBool::new(false),
        });
        // Not aborted by close(): a webrtc-rs connection dropped without
        // close() leaves its driver task running. The task notices the close
        // at its next await and closes what it built.
        let connecting = shared.clone();
        shared.runtime.handle().spawn(async move { connecting.connect().await });
        let timer = shared.clone();
        shared.spawn(async move { timer.run_timer().await });
        (shared, Receivers { results, track })
    }

    pub fn stats(&self) -> SessionStats {
        self.core.lock().unwrap().stats()
    }

    /// Live video: the window's occupancy, as the core last reported it.
    pub fn frames_in_flight(&self) -> u64 {
        *self.in_flight.borrow()
    }

    pub fn state(&self) -> State {
        *self.state.borrow()
    }

    pub fn failure(&self) -> Option<SessionError> {
        self.failure.borrow().clone()
    }

    pub fn track_packets_dropped(&self) -> u64 {
        self.track_packets_dropped.load(Ordering::Relaxed)
    }

    pub fn take_warnings(&self) -> Vec<String> {
        std::mem::take(&mut *self.warnings.lock().unwrap())
    }

    /// Feeds one event to the core and carries out what it says, except the
    /// chunks and deliveries, which go back to the caller (they need waiting).
    pub fn handle(&self, input: Input<'_>) -> Vec<Output> {
        let (outputs, state, timeout_moved) = {
            let mut core = self.core.lock().unwrap();
            let before = core.poll_timeout();
            let outputs = core.handle(input, Instant::now());
            let in_flight = core.frames_in_flight();
            self.in_flight.send_if_modified(|current| std::mem::replace(current, in_flight) != in_flight);
            (outputs, core.state(), core.poll_timeout() != before)
        };
        self.state.send_if_modified(|current| std::mem::replace(current, state) != state);
        if timeout_moved {
            self.timer.notify_one();
        }
        let mut rest = Vec::new();
        for output in outputs {
            match output {
                Output::SendKeepalive => self.send_keepalive(),
                Output::SendControl(text) => self.send_control(text),
                Output::Warning(text) => {
                    gst::warning!(CAT, "session {}: {text}", self.name);
                    self.warnings.lock().unwrap().push(text);
                }
                Output::Failed(error) => {
                    gst::warning!(CAT, "session {} failed: {error}", self.name);
                    self.failure.send_if_modified(|failure| failure.is_none().then(|| *failure = Some(error)).is_some());
                }
                chunk_or_delivery => rest.push(chunk_or_delivery),
            }
        }
        rest
    }

    /// Resolves with the failure once the session has failed or closed.
    pub async fn failed(&self) -> SessionError {
        let mut failure = self.failure.subscribe();
        match failure.wait_for(Option::is_some).await {
            Ok(failure) => failure.clone().unwrap_or(SessionError::Closed),
            Err(_) => SessionError::Closed,
        }
    }

    /// Live video: waits until fewer than `max` frames are in flight, or the
    /// session failed.
    pub async fn wait_in_flight_below(&self, max: u64) -> Result<(), SessionError> {
        let mut in_flight = self.in_flight.subscribe();
        tokio::select! {
            biased;
            error = self.failed() => Err(error),
            result = in_flight.wait_for(|n| *n < max) => result.map(|_| ()).map_err(|_| SessionError::Closed),
        }
    }

    /// Waits until the state satisfies `reached`, or the session failed.
    pub async fn wait_state(&self, reached: impl Fn(State) -> bool) -> Result<(), SessionError> {
        let mut state = self.state.subscribe();
        tokio::select! {
            biased;
            result = state.wait_for(|state| reached(*state)) => result.map(|_| ()).map_err(|_| SessionError::Closed),
            error = self.failed() => Err(error),
        }
    }

    /// Chunks to the upload task, once connected.
    pub fn upload_sender(&self) -> Option<mpsc::Sender<Bytes>> {
        self.upload_tx.lock().unwrap().clone()
    }

    /// Frames to the client track's sender task, once connected (live).
    pub fn track_sender(&self) -> Option<mpsc::Sender<TrackOut>> {
        self.track_out_tx.lock().unwrap().clone()
    }

    /// Closes the peer connection and stops every task; returns at once.
    /// `reason` is what waiters that have not seen a failure yet are told.
    pub fn close(&self, reason: SessionError) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        gst::debug!(CAT, "session {}: closing ({reason})", self.name);
        self.handle(Input::Close);
        self.failure.send_if_modified(|failure| failure.is_none().then(|| *failure = Some(reason)).is_some());
        for task in self.tasks.lock().unwrap().drain(..) {
            task.abort();
        }
        self.upload_tx.lock().unwrap().take();
        self.track_out_tx.lock().unwrap().take();
        self.control_tx.lock().unwrap().take();
        self.upload_channel.lock().unwrap().take();
        if let Some(peer) = self.peer.lock().unwrap().take() {
            let name = self.name.clone();
            self.runtime.handle().spawn(async move {
                if tokio::time::timeout(CLOSE_TIMEOUT, peer.close()).await.is_err() {
                    gst::warning!(CAT, "session {name}: the peer connection did not close within {CLOSE_TIMEOUT:?}");
                }
            });
        }
        self.wake_own_loop();
        self.runtime.stop();
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    fn spawn<F>(&self, future: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let handle = self.runtime.handle().spawn(future);
        let mut tasks = self.tasks.lock().unwrap();
        tasks.retain(|task| !task.is_finished());
        if self.is_closed() {
            handle.abort();
        } else {
            tasks.push(handle.abort_handle());
        }
    }

    fn send_keepalive(&self) {
        let Some(channel) = self.upload_channel.lock().unwrap().clone() else { return };
        let name = self.name.clone();
        // Its own task: a keepalive competes with the chunks for buffer room
        // instead of queueing behind them, and is never cancelled midway.
        self.spawn(async move {
            if let Err(err) = channel.send(BytesMut::from(KEEPALIVE_MESSAGE)).await {
                gst::debug!(CAT, "session {name}: keepalive not sent: {err}");
            }
        });
    }

    fn send_control(&self, text: String) {
        if let Some(control) = self.control_tx.lock().unwrap().as_ref() {
            let _ = control.send(text);
        }
        self.wake_own_loop();
    }

    fn wake_own_loop(&self) {
        if let Some(own_loop) = self.own_loop.lock().unwrap().as_ref() {
            own_loop.wake();
        }
    }

    async fn run_timer(self: Arc<Self>) {
        loop {
            let deadline = self.core.lock().unwrap().poll_timeout();
            match deadline {
                Some(deadline) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(deadline.into()) => {
                            self.handle(Input::Timeout);
                        }
                        _ = self.timer.notified() => {}
                    }
                }
                None => self.timer.notified().await,
            }
        }
    }

    /// Runs `future` unless the session closes first.
    async fn unless_closed<T>(&self, future: impl Future<Output = T>) -> Result<T, SessionError> {
        let mut failure = self.failure.subscribe();
        tokio::select! {
            value = future => Ok(value),
            _ = failure.wait_for(|_| self.is_closed()) => Err(SessionError::Closed),
        }
    }

    fn set_stage(&self, stage: &'static str) {
        gst::debug!(CAT, "session {}: {stage}", self.name);
        *self.stage.lock().unwrap() = stage;
    }

    async fn connect(self: Arc<Self>) {
        let timeout = self.config.connect_timeout;
        let outcome = match tokio::time::timeout(timeout, self.clone().establish()).await {
            Ok(outcome) => outcome,
            Err(_) => Err(SessionError::ConnectTimeout {
                url: self.config.api_url.to_string(),
                timeout,
                stage: *self.stage.lock().unwrap(),
            }),
        };
        match outcome {
            Ok(()) => {
                gst::info!(CAT, "session {}: connected to {}", self.name, self.config.api_url);
                self.handle(Input::Connected);
            }
            Err(error) => {
                self.handle(Input::ConnectFailed(error));
            }
        }
    }

    async fn establish(self: Arc<Self>) -> Result<(), SessionError> {
        if own_loop::covers(&self.config) {
            return self.establish_own_loop().await;
        }
        let config = self.config.clone();
        let mut media = MediaEngine::default();
        match config.live {
            // Only the codec sent: the server's returned track, if any, uses
            // the offer's first codec too (§10).
            Some(codec) => media
                .register_codec(live_codec_parameters(codec), RtpCodecKind::Video)
                .map_err(|err| setup("registering the video codec failed", err))?,
            None => media.register_default_codecs().map_err(|err| setup("registering codecs failed", err))?,
        }
        let mut registry = interceptors(&mut media).map_err(|err| setup("registering interceptors failed", err))?;
        if config.live.is_some() {
            registry = super::rtcp::with_keyframe_requests(registry);
        }
        let settings = connection_settings(&config);
        let ice_servers = config
            .ice_servers
            .iter()
            .map(|server| RTCIceServer {
                urls: server.urls.clone(),
                username: server.username.clone().unwrap_or_default(),
                credential: server.credential.clone().unwrap_or_default(),
            })
            .collect();
        let (gathered_tx, mut gathered) = watch::channel(false);
        let handler = Arc::new(Handler { session: Arc::downgrade(&self), gathered: gathered_tx });
        // The gate admits a message while the outstanding bytes are below it,
        // so leave room for one whole message under buffer-limit.
        let largest_message = config.chunk_size + UPLOAD_HEADER_LEN;
        let send_limit = (config.buffer_limit - largest_message + 1).max(1);
        let bind = config.udp_bind_address.to_string();
        let early_checks = Arc::new(EarlyChecks::default());
        let peer = PeerConnectionBuilder::new()
            .with_runtime(Arc::new(EarlyCheckRuntime::new(early_checks.clone())))
            .with_configuration(RTCConfigurationBuilder::new().with_ice_servers(ice_servers).build())
            .with_media_engine(media)
            .with_setting_engine(settings.build())
            .with_interceptor_registry(registry)
            .with_handler(handler)
            .with_udp_addrs(vec![bind.clone()])
            .with_data_channel_send_buffer_limit(send_limit)
            .build()
            .await
            .map_err(|err| setup(&format!("creating the WebRTC peer connection on {bind} failed (udp-bind-address)"), err))?;
        let peer: Arc<dyn PeerConnection> = Arc::new(peer);
        {
            // Decided under the lock close() takes the peer with: either
            // close() sees the peer and closes it, or we see the close.
            let mut slot = self.peer.lock().unwrap();
            if self.is_closed() {
                drop(slot);
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, peer.close()).await;
                return Err(SessionError::Closed);
            }
            *slot = Some(peer.clone());
        }

        let reliable = RTCDataChannelInit { ordered: true, ..Default::default() };
        let control = peer
            .create_data_channel(CONTROL_CHANNEL, Some(reliable.clone()))
            .await
            .map_err(|err| setup("creating the inference data channel failed", err))?;
        let (control_open_tx, control_open) = watch::channel(false);
        {
            let session = self.clone();
            let channel = control.clone();
            self.spawn(async move { session.read_control(channel, control_open_tx).await });
        }

        let live_track = match config.live {
            // After the inference channel, as the server expects (§10).
            Some(codec) => Some(add_live_track(&peer, codec).await?),
            None => None,
        };
        if live_track.is_none() && config.wants_video_track() {
            peer.add_transceiver_from_kind(RtpCodecKind::Video, Some(recvonly()))
            .await
            .map_err(|err| setup("adding the recvonly video transceiver failed", err))?;
        }

        self.set_stage("gathering ICE candidates");
        let offer = peer.create_offer(None).await.map_err(|err| setup("creating the SDP offer failed", err))?;
        peer.set_local_description(offer)
            .await
            .map_err(|err| setup("applying the SDP offer failed", err))?;
        let _ = self.unless_closed(gathered.wait_for(|done| *done)).await?;
        let offer = peer
            .local_description()
            .await
            .ok_or_else(|| setup("gathering ICE candidates", "the peer connection has no local description"))?;

        self.set_stage("waiting for the server's SDP answer");
        let answer_sdp = self
            .unless_closed(signalling::exchange(&config, offer.sdp, config.connect_timeout))
            .await?
            .map_err(|error| camera_not_opened(&config, error))?;
        let answer =
            RTCSessionDescription::answer(answer_sdp).map_err(|err| SessionError::AnswerMalformed(err.to_string()))?;
        peer.set_remote_description(answer)
            .await
            .map_err(|err| SessionError::AnswerRefused(err.to_string()))?;
        early_checks.answer_applied();

        self.set_stage("connecting to the server (ICE, DTLS, SCTP) and opening the inference channel");
        // webrtc-rs 0.21.1 queues the channel's DCEP OPEN when the SCTP
        // association comes up, but sends it only at its driver's next
        // wake-up: about 40 ms later on loopback (the next datagram), while
        // the server, connected, already processes frame 1 and drops its
        // result. A write wake-up right after the transport is up flushes it
        // (the channel then opened 2.5-9 ms after, frame 1's result arrived).
        let opened = async {
            let open = |watch: &watch::Receiver<bool>| {
                let mut watch = watch.clone();
                async move { watch.wait_for(|open| *open).await.map(|_| ()) }
            };
            tokio::select! {
                _ = open(&control_open) => return,
                _ = self.transport_up.notified() => {}
            }
            for _ in 0..OPEN_NUDGES {
                tokio::select! {
                    _ = open(&control_open) => return,
                    _ = tokio::time::sleep(OPEN_NUDGE_INTERVAL) => {
                        // Changes nothing but wakes the driver's writes.
                        let _ = control.set_buffered_amount_low_threshold(0).await;
                    }
                }
            }
            let _ = open(&control_open).await;
        };
        self.unless_closed(opened).await?;
        let (control_tx, control_rx) = mpsc::unbounded_channel();
        {
            let session = self.clone();
            self.spawn(async move { session.send_controls(control, control_rx).await });
        }
        *self.control_tx.lock().unwrap() = Some(control_tx);

        if let (Some((track, sender)), Some(codec)) = (live_track, config.live) {
            let payload_type = negotiated_payload_type(&sender, codec).await?;
            let track = LiveTrack { payload_type, ..track };
            let (track_tx, track_rx) = mpsc::channel(TRACK_OUT_QUEUE);
            let session = self.clone();
            let local = track.local.clone();
            self.spawn(async move { session.send_track(track, track_rx).await });
            let session = self.clone();
            self.spawn(async move { session.read_track_feedback(local).await });
            *self.track_out_tx.lock().unwrap() = Some(track_tx);
            return Ok(());
        }

        if config.camera.is_some() {
            // The server reads the camera: nothing to send.
            return Ok(());
        }

        // Opened only now, so that the server sees the channels in protocol
        // order: inference, then video_upload (channels created before the
        // connection opens in no defined order).
        self.set_stage("opening the video_upload channel");
        let upload = peer
            .create_data_channel(UPLOAD_CHANNEL, Some(reliable))
            .await
            .map_err(|err| setup("creating the video_upload data channel failed", err))?;
        let (upload_open_tx, mut upload_open) = watch::channel(false);
        {
            let session = self.clone();
            let channel = upload.clone();
            self.spawn(async move { session.read_upload(channel, upload_open_tx).await });
        }
        let _ = self.unless_closed(upload_open.wait_for(|open| *open)).await?;
        let (upload_tx, upload_rx) = mpsc::channel(UPLOAD_QUEUE);
        {
            let session = self.clone();
            let channel = upload.clone();
            self.spawn(async move { session.send_chunks(channel, upload_rx).await });
        }
        *self.upload_tx.lock().unwrap() = Some(upload_tx);
        *self.upload_channel.lock().unwrap() = Some(upload);
        Ok(())
    }

    async fn read_control(self: Arc<Self>, channel: Arc<dyn DataChannel>, open: watch::Sender<bool>) {
        while let Some(event) = channel.poll().await {
            match event {
                DataChannelEvent::OnOpen => {
                    open.send_replace(true);
                }
                DataChannelEvent::OnMessage(message) => {
                    for output in self.handle(Input::ControlMessage(&message.data)) {
                        if let Output::Deliver(event) = output {
                            // Waits while the consumer is behind: the channel
                            // is not read meanwhile, which back-pressures the
                            // server. A consumer that let go closed the session.
                            // Numbered once there is room, right as it goes
                            // in: no track item is handed over in between.
                            if let Ok(permit) = self.results_tx.reserve().await {
                                permit.send((self.next_place(), event));
                            }
                        }
                    }
                }
                DataChannelEvent::OnClose => break,
                _ => {}
            }
        }
        self.handle(Input::ControlChannelClosed);
    }

    async fn read_upload(self: Arc<Self>, channel: Arc<dyn DataChannel>, open: watch::Sender<bool>) {
        while let Some(event) = channel.poll().await {
            match event {
                DataChannelEvent::OnOpen => {
                    open.send_replace(true);
                }
                DataChannelEvent::OnMessage(message) => {
                    self.handle(Input::UploadMessage(&message.data));
                }
                DataChannelEvent::OnClose => break,
                _ => {}
            }
        }
        self.handle(Input::UploadChannelClosed);
    }

    async fn send_chunks(self: Arc<Self>, channel: Arc<dyn DataChannel>, mut chunks: mpsc::Receiver<Bytes>) {
        while let Some(chunk) = chunks.recv().await {
            let payload = chunk.len().saturating_sub(UPLOAD_HEADER_LEN);
            let message = chunk.try_into_mut().unwrap_or_else(|shared| BytesMut::from(&shared[..]));
            if let Err(err) = channel.send(message).await {
                let stats = self.stats();
                self.handle(Input::Fail(SessionError::UploadSendFailed {
                    chunk: stats.chunks_sent + 1,
                    total: stats.total_chunks,
                    detail: err.to_string(),
                }));
                return;
            }
            self.handle(Input::ChunkSent { payload });
        }
    }

    /// Writes the client track's frames, then its BYE. A write waits while
    /// the connection's queue is full; it is never cancelled midway.
    async fn send_track(self: Arc<Self>, track: LiveTrack, mut frames: mpsc::Receiver<TrackOut>) {
        let mut frame = 0u64;
        while let Some(out) = frames.recv().await {
            match out {
                TrackOut::Frame(packets) => {
                    frame += 1;
                    for bytes in packets {
                        let written = match rtc::rtp::Packet::unmarshal(&mut bytes.as_slice()) {
                            Ok(mut packet) => {
                                packet.header.ssrc = track.ssrc;
                                packet.header.payload_type = track.payload_type;
                                track.local.write_rtp(packet).await.map_err(|err| err.to_string())
                            }
                            Err(err) => Err(format!("the payloader's output is not RTP: {err}")),
                        };
                        if let Err(detail) = written {
                            self.handle(Input::Fail(SessionError::TrackSendFailed { frame, detail }));
                            return;
                        }
                    }
                }
                TrackOut::End => {
                    let bye = rtc::rtcp::goodbye::Goodbye { sources: vec![track.ssrc], reason: Bytes::new() };
                    if let Err(err) = track.local.write_rtcp(vec![Box::new(bye)]).await {
                        gst::warning!(CAT, "session {}: the RTCP BYE was not sent: {err}", self.name);
                    }
                    gst::debug!(CAT, "session {}: track ended after {frame} frames (RTCP BYE)", self.name);
                    return;
                }
            }
        }
    }

    /// The server's keyframe requests about the client's track.
    async fn read_track_feedback(self: Arc<Self>, local: Arc<TrackLocalStaticRTP>) {
        while let Some(event) = local.poll().await {
            let TrackLocalEvent::OnRtcpPacket(packets) = event else { continue };
            if super::rtcp::asks_for_keyframe(&packets) {
                gst::debug!(CAT, "session {}: the server asks for a keyframe", self.name);
                self.keyframe_requested.store(true, Ordering::Release);
                self.handle(Input::KeyframeRequested);
            }
        }
    }

    /// Whether the server asked for a keyframe since the last call.
    pub fn take_keyframe_request(&self) -> bool {
        self.keyframe_requested.swap(false, Ordering::AcqRel)
    }

    async fn send_controls(self: Arc<Self>, channel: Arc<dyn DataChannel>, mut texts: mpsc::UnboundedReceiver<String>) {
        while let Some(text) = texts.recv().await {
            if let Err(err) = channel.send_text(&text).await {
                gst::debug!(CAT, "session {}: {text} not sent: {err}", self.name);
                return;
            }
        }
    }

    fn on_track(self: Arc<Self>, track: Arc<dyn TrackRemote>) {
        // Keep the track polled whether or not a result source reads it:
        // webrtc-rs stalls every stream when one is not read.
        let session = self.clone();
        self.spawn(async move {
            let mut packets = 0u64;
            let mut codec = None;
            let mut media_ssrc = None;
            let mut keyframes = KeyframeRequests::default();
            loop {
                let retry = keyframes.deadline();
                let late = async move {
                    match retry {
                        Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
                        None => std::future::pending().await,
                    }
                };
                let action = tokio::select! {
                    event = track.poll() => {
                        let Some(event) = event else { break };
                        match event {
                            TrackRemoteEvent::OnRtpPacket(packet) => {
                                packets += 1;
                                media_ssrc = Some(packet.header.ssrc);
                                let codec = match codec {
                                    Some(codec) => codec,
                                    None => *codec.insert(session.announce_track_codec(&track, &packet.header).await),
                                };
                                if keyframes.awaiting() && keyframe::starts_keyframe(codec, &packet.payload) {
                                    gst::debug!(CAT, "session {}: the keyframe asked for arrived", session.name);
                                    keyframes.on_keyframe();
                                }
                                match packet.marshal() {
                                    Ok(bytes) => session.deliver_track(TrackItem::Packet(bytes.freeze())),
                                    Err(err) => gst::warning!(CAT, "session {}: cannot serialize an RTP packet: {err}", session.name),
                                }
                                KeyframeAction::Wait
                            }
                            TrackRemoteEvent::OnEnded => break,
                            _ => KeyframeAction::Wait,
                        }
                    }
                    _ = session.keyframe_wanted.notified() => keyframes.on_request(Instant::now()),
                    _ = late => keyframes.on_timeout(Instant::now()),
                };
                match (action, media_ssrc) {
                    (KeyframeAction::Request, Some(media_ssrc)) => session.send_picture_loss(&track, media_ssrc).await,
                    // Nothing received yet: nothing to ask a keyframe of.
                    (KeyframeAction::Request, None) => keyframes.on_keyframe(),
                    (KeyframeAction::GiveUp, _) => session.no_keyframe_came(),
                    (KeyframeAction::Wait, _) => {}
                }
            }
            gst::debug!(CAT, "session {}: returned track ended after {packets} RTP packets", session.name);
        });
    }

    /// Hands the frame source the returned track's codec (before its first
    /// packet) and returns it.
    async fn announce_track_codec(&self, track: &Arc<dyn TrackRemote>, header: &rtc::rtp::header::Header) -> TrackCodec {
        let codec = track.codec(header.ssrc).await.map(|c| (c.mime_type, c.clock_rate));
        self.announce_codec(codec, header.payload_type)
    }

    /// Hands the frame source the returned track's codec (mime type and
    /// clock rate, if negotiated) and returns it.
    fn announce_codec(&self, codec: Option<(String, u32)>, payload_type: u8) -> TrackCodec {
        let (mime_type, clock_rate) = codec.unwrap_or_else(|| (String::new(), 90_000));
        gst::info!(CAT, "session {}: returned track carries {mime_type} (payload type {payload_type})", self.name);
        let kind = TrackCodec::from_mime_type(&mime_type);
        self.deliver_track(TrackItem::Codec { mime_type, clock_rate, payload_type });
        kind
    }

    /// The server sent no keyframe after every request.
    fn no_keyframe_came(&self) {
        gst::warning!(
            CAT,
            "session {}: the server sent no keyframe of the returned track after {MAX_KEYFRAME_REQUESTS} requests; \
             its frames stay dropped until one comes",
            self.name
        );
    }

    /// Asks the server for a keyframe of the returned track (RFC 4585 PLI):
    /// its encoder sends one only at the start and when asked.
    pub fn request_keyframe(&self) {
        self.keyframe_wanted.notify_one();
        self.keyframe_asked.store(true, Ordering::Release);
        self.wake_own_loop();
    }

    pub fn keyframe_requests_sent(&self) -> u64 {
        self.keyframe_requests_sent.load(Ordering::Relaxed)
    }

    async fn send_picture_loss(&self, track: &Arc<dyn TrackRemote>, media_ssrc: u32) {
        let pli = PictureLossIndication { sender_ssrc: 0, media_ssrc };
        self.picture_loss_sent(track.write_rtcp(vec![Box::new(pli)]).await);
    }

    /// Counts a keyframe request (PLI) sent, or says why it was not.
    fn picture_loss_sent(&self, outcome: Result<(), impl std::fmt::Display>) {
        match outcome {
            Ok(()) => {
                let sent = self.keyframe_requests_sent.fetch_add(1, Ordering::Relaxed) + 1;
                gst::info!(CAT, "session {}: asked the server for a keyframe of the returned track ({sent} so far)", self.name);
            }
            Err(err) => gst::warning!(CAT, "session {}: the keyframe request (PLI) could not be sent: {err}", self.name),
        }
    }

    /// The place of the next result or track item handed over.
    fn next_place(&self) -> u64 {
        self.handed_over.fetch_add(1, Ordering::Relaxed)
    }

    fn deliver_track(&self, item: TrackItem) {
        if self.track_tx.try_send((self.next_place(), item)).is_err() {
            self.track_packets_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The transceiver offered to receive the server's returned video only.
fn recvonly() -> RTCRtpTransceiverInit {
    RTCRtpTransceiverInit { direction: RTCRtpTransceiverDirection::Recvonly, streams: Vec::new(), send_encodings: Vec::new() }
}

/// The ICE, mDNS and SCTP settings of every session's peer connection.
fn connection_settings(config: &SessionConfig) -> SettingEngineBuilder {
    // mDNS candidates would hide our address from the server and can make
    // building the connection fail on hosts without multicast.
    let settings = SettingEngineBuilder::new()
        .with_multicast_dns_mode(MulticastDnsMode::Disabled)
        .with_ice_timeouts(Some(ICE_DISCONNECTED_AFTER), Some(ICE_FAILED_AFTER), Some(ICE_KEEPALIVE_INTERVAL))
        .with_ice_connection_attempts(Some(ICE_CHECK_INTERVAL), Some(ICE_MAX_BINDING_REQUESTS));
    match config.sctp_mtu {
        Some(mtu) => settings.with_sctp_mtu(mtu),
        None => settings,
    }
}

/// The interceptors of every session: webrtc-rs's defaults (NACK responder,
/// RTCP reports, TWCC receiver, the simulcast header extensions), with our
/// NACK generator in place of theirs, which woke the session every 100 ms
/// whether anything was lost or not (nack.rs).
fn interceptors(media: &mut MediaEngine) -> Result<Registry, rtc::shared::error::Error> {
    for parameter in ["", "pli"] {
        media.register_feedback(RTCPFeedback { typ: "nack".to_owned(), parameter: parameter.to_owned() }, RtpCodecKind::Video);
    }
    let registry = Registry::new()
        .with(Slot::NackResponder, NackResponderBuilder::new().build())
        .with(Slot::NackGenerator, super::nack::LossNacks::new(random_u32()));
    configure_simulcast_extension_headers(media)?;
    let registry = configure_twcc_receiver_only(registry, media)?;
    Ok(configure_rtcp_reports(registry))
}

/// The one video codec of a live session's media engine.
fn live_codec_parameters(codec: LiveCodec) -> RTCRtpCodecParameters {
    let feedback = |typ: &str, parameter: &str| RTCPFeedback { typ: typ.to_owned(), parameter: parameter.to_owned() };
    RTCRtpCodecParameters {
        rtp_codec: RTCRtpCodec {
            mime_type: codec.mime_type().to_owned(),
            clock_rate: 90_000,
            channels: 0,
            sdp_fmtp_line: codec.sdp_fmtp_line().to_owned(),
            rtcp_feedback: vec![feedback("nack", ""), feedback("nack", "pli"), feedback("ccm", "fir")],
        },
        payload_type: LIVE_PAYLOAD_TYPE,
    }
}

/// Adds the client's track: a sendrecv transceiver, so that the server can
/// return its own track on it (§10).
async fn add_live_track(
    peer: &Arc<dyn PeerConnection>,
    codec: LiveCodec,
) -> Result<(LiveTrack, Arc<dyn webrtc::rtp_transceiver::RtpSender>), SessionError> {
    let ssrc = random_u32();
    let parameters = live_codec_parameters(codec);
    let local = Arc::new(TrackLocalStaticRTP::new(MediaStreamTrack::new(
        "gst-roboflow".to_owned(),
        "gst-roboflow-video".to_owned(),
        "video".to_owned(),
        RtpCodecKind::Video,
        vec![RTCRtpEncodingParameters {
            rtp_coding_parameters: RTCRtpCodingParameters { ssrc: Some(ssrc), ..Default::default() },
            active: true,
            codec: parameters.rtp_codec,
            ..Default::default()
        }],
    )));
    let sender = peer
        .add_track(local.clone() as Arc<dyn TrackLocal>)
        .await
        .map_err(|err| setup("adding the video track failed", err))?;
    Ok((LiveTrack { local, ssrc, payload_type: LIVE_PAYLOAD_TYPE }, sender))
}

/// The payload type the answer gave the track's codec.
async fn negotiated_payload_type(
    sender: &Arc<dyn webrtc::rtp_transceiver::RtpSender>,
    codec: LiveCodec,
) -> Result<u8, SessionError> {
    let parameters = sender.get_parameters().await.map_err(|err| setup("reading the video sender's parameters failed", err))?;
    parameters
        .rtp_parameters
        .codecs
        .iter()
        .find(|c| c.rtp_codec.mime_type.eq_ignore_ascii_case(codec.mime_type()))
        .map(|c| c.payload_type)
        .ok_or_else(|| SessionError::AnswerRefused(format!("the answer does not accept {}", codec.mime_type())))
}

/// A random 32-bit number (SSRC, RTP origin) without a random-number crate.
pub fn random_u32() -> u32 {
    use std::hash::BuildHasher;
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let hash = std::collections::hash_map::RandomState::new().hash_one(COUNTER.fetch_add(1, Ordering::Relaxed));
    (hash >> 32) as u32
}

/// A camera the server reads: the server fails before its answer when it
/// cannot open the URL, with nothing but "Internal error." (§11); say which
/// URL, and what usually stops it.
fn camera_not_opened(config: &SessionConfig, error: signalling::SignallingError) -> SessionError {
    let Some(camera) = config.camera.as_ref() else { return error.into() };
    let signalling::SignallingError::Refused { status, description, .. } = &error else { return error.into() };
    if *status < 500 {
        return error.into();
    }
    let hint = match camera.kind {
        CameraKind::Rtsp => "it most likely could not open the URL: check that the server's host can reach it (the server \
             connects over TCP with a 2 s timeout) and that the path and credentials are right"
            .to_owned(),
        CameraKind::Mjpeg if camera.is_non_global() => "the address is loopback or private, which the server refuses for \
             MJPEG cameras unless it runs with WEBRTC_MJPEG_ALLOW_NON_GLOBAL_ADDRESSES=True; otherwise it could not \
             open the URL (check that the server's host can reach it)"
            .to_owned(),
        CameraKind::Mjpeg => "it most likely could not open the URL: check that the server's host can reach it (HTTP, \
             5 s timeout) and that it serves MJPEG (multipart/x-mixed-replace)"
            .to_owned(),
    };
    SessionError::CameraNotOpened {
        api_url: config.api_url.as_str().trim_end_matches('/').to_owned(),
        kind: camera.kind.as_str(),
        camera: camera.shown(),
        description: description.clone(),
        hint,
    }
}

fn setup(what: &str, err: impl std::fmt::Display) -> SessionError {
    SessionError::Setup { what: what.to_owned(), detail: err.to_string() }
}

struct Handler {
    session: Weak<Shared>,
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
        let Some(session) = self.session.upgrade() else { return };
        gst::debug!(CAT, "session {}: peer connection {state}", session.name);
        let state = match state {
            RTCPeerConnectionState::Connected => {
                session.transport_up.notify_one();
                PeerState::Connected
            }
            RTCPeerConnectionState::Disconnected => PeerState::Disconnected,
            RTCPeerConnectionState::Failed => PeerState::Failed,
            RTCPeerConnectionState::Closed if !session.is_closed() => PeerState::Closed,
            _ => return,
        };
        session.handle(Input::Peer(state));
    }

    async fn on_track(&self, track: Arc<dyn TrackRemote>) {
        if let Some(session) = self.session.upgrade() {
            session.on_track(track);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::UploadSettings;
    use crate::signalling::SignallingError;

    fn camera(url: &str) -> SessionConfig {
        UploadSettings { workflow_spec: Some(r#"{"steps":[]}"#.into()), source_url: Some(url.into()), ..crate::config::camera_settings() }
            .validate()
            .unwrap()
    }

    fn refused(status: u16) -> SignallingError {
        SignallingError::Refused {
            url: "http://127.0.0.1:9001/initialise_webrtc_worker".into(),
            status,
            description: format!("HTTP {status}: Internal error."),
        }
    }

    #[test]
    fn a_server_error_before_the_answer_names_the_camera_and_what_usually_stops_it() {
        let text = camera_not_opened(&camera("rtsp://admin:pw@10.0.0.5/live"), refused(500)).to_string();
        assert!(
            text.starts_with("the server at http://127.0.0.1:9001 could not start a session on the RTSP camera rtsp://10.0.0.5/live (HTTP 500: Internal error.)"),
            "{text}"
        );
        assert!(!text.contains("pw"), "{text}");
        let text = camera_not_opened(&camera("http://127.0.0.1:8080/m.mjpg"), refused(500)).to_string();
        assert!(text.contains("WEBRTC_MJPEG_ALLOW_NON_GLOBAL_ADDRESSES=True"), "{text}");
        let text = camera_not_opened(&camera("http://cam.example/m.mjpg"), refused(500)).to_string();
        assert!(!text.contains("WEBRTC_MJPEG"), "a global address: {text}");
        // Not about the camera: a key refused, a Workflow error.
        let text = camera_not_opened(&camera("rtsp://10.0.0.5/live"), refused(401)).to_string();
        assert!(text.starts_with("the server at http://127.0.0.1:9001/initialise_webrtc_worker refused the session"), "{text}");
    }
}
