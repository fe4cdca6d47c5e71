// Our own connection loop around webrtc-rs's sans-IO core (the `rtc`
// crate), for the sessions whose server reads the camera: no upload
// channel, no client track, only the results channel and the returned
// track coming in. The loop runs on a thread of its own and owns the peer
// connection and its UDP socket; it waits in one `epoll` (mio) on the
// socket and a waker, with the core's next deadline as the timeout: no
// timer wheel, no task to wake per packet. After every input it runs the
// core until nothing moves: events, then reads, then writes (webrtc-rs's
// driver writes first, so what the event pass queues, the inference
// channel's DCEP OPEN among it, waited for its next wake-up). The server's
// ICE checks that arrive before its answer are held and fed in after it.
// The session's runtime thread still does the HTTP offer/answer.
//
// Covered: `source-url` sessions with no ICE servers (no STUN/TURN
// gathering here) on a bind address that is not a wildcard (one socket,
// one host candidate). The rest keeps webrtc-rs's driver, as do all
// sessions with GST_ROBOFLOW_WEBRTC_DRIVER set.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token, Waker};
use rtc::data_channel::{RTCDataChannelId, RTCDataChannelInit};
use rtc::peer_connection::configuration::RTCConfigurationBuilder;
use rtc::peer_connection::configuration::media_engine::MediaEngine;
use rtc::peer_connection::event::{RTCDataChannelEvent, RTCPeerConnectionEvent, RTCTrackEvent};
use rtc::peer_connection::message::{RTCMessage, TaggedRTCMessage};
use rtc::peer_connection::sdp::RTCSessionDescription;
use rtc::peer_connection::state::RTCPeerConnectionState;
use rtc::peer_connection::transport::{CandidateConfig, CandidateHostConfig, RTCIceCandidate, RTCIceCandidateInit};
use rtc::peer_connection::{RTCPeerConnection, RTCPeerConnectionBuilder};
use rtc::rtp_transceiver::RTCRtpReceiverId;
use rtc::sansio::Protocol;
use rtc::shared::{TaggedBytesMut, TransportContext, TransportProtocol};
use tokio::sync::{mpsc, oneshot, watch};

use super::*;

const SOCKET: Token = Token(0);
const WAKE: Token = Token(1);
/// Datagrams of the server held while its answer is on its way (its first
/// ICE checks); more are dropped, the server resends them.
const EARLY_DATAGRAMS: usize = 16;
/// Room for one datagram: an SCTP MTU of 1500 plus DTLS, or RTP.
const DATAGRAM: usize = 2048;
/// Datagrams read per pass; more wait for the next pass (which then does
/// not sleep).
const RECEIVE_BURST: usize = 64;
/// An expired deadline is handled at most once per this much: the ICE
/// agent can report a past deadline while it wants a check sent.
const IMMEDIATE_TIMEOUT_GAP: Duration = Duration::from_millis(1);
/// How long a result waits for its frame's packets (see `deliver`).
const RESULT_HOLD: Duration = Duration::from_millis(15);
/// While results wait for room in the results channel: how often to look.
const ROOM_RETRY: Duration = Duration::from_millis(5);

/// Whether our own loop can drive a session with this configuration.
pub(super) fn covers(config: &SessionConfig) -> bool {
    config.camera.is_some()
        && config.live.is_none()
        && config.ice_servers.is_empty()
        && !config.udp_bind_address.ip().is_unspecified()
        && std::env::var_os("GST_ROBOFLOW_WEBRTC_DRIVER").is_none()
}

fn rtc_error(what: &str) -> impl FnOnce(rtc::shared::error::Error) -> SessionError + '_ {
    move |err| setup(what, err)
}

/// What the session's other threads hand the loop (then wake it).
pub(super) enum Command {
    /// The server's answer, and where to say whether it applied.
    Answer(Box<RTCSessionDescription>, oneshot::Sender<Result<(), SessionError>>),
    /// The session gave up before an answer.
    Stop,
}

/// The session's side of the loop.
pub(super) struct LoopHandle {
    waker: Waker,
    commands: Mutex<VecDeque<Command>>,
}

impl LoopHandle {
    pub(super) fn wake(&self) {
        let _ = self.waker.wake();
    }

    fn send(&self, command: Command) {
        self.commands.lock().unwrap().push_back(command);
        self.wake();
    }
}

impl Shared {
    pub(super) async fn establish_own_loop(self: Arc<Self>) -> Result<(), SessionError> {
        let config = self.config.clone();
        let mut media = MediaEngine::default();
        media.register_default_codecs().map_err(rtc_error("registering codecs failed"))?;
        let registry = interceptors(&mut media).map_err(rtc_error("registering interceptors failed"))?;
        let settings = connection_settings(&config);
        let mut pc = RTCPeerConnectionBuilder::new()
            .with_configuration(RTCConfigurationBuilder::new().build())
            .with_media_engine(media)
            .with_setting_engine(settings.build())
            .with_interceptor_registry(registry)
            .build(Instant::now())
            .map_err(rtc_error("creating the WebRTC peer connection failed"))?;
        let bind = config.udp_bind_address;
        let socket = std::net::UdpSocket::bind(bind)
            .map_err(|err| setup(&format!("binding a UDP socket on {bind} failed (udp-bind-address)"), err))?;
        socket.set_nonblocking(true).map_err(|err| setup("making the UDP socket non-blocking failed", err))?;
        let local = socket.local_addr().map_err(|err| setup("reading the UDP socket's address failed", err))?;
        let mut socket = UdpSocket::from_std(socket);
        let poll = Poll::new().map_err(|err| setup("creating the connection's poller failed", err))?;
        poll.registry()
            .register(&mut socket, SOCKET, Interest::READABLE)
            .map_err(|err| setup("watching the UDP socket failed", err))?;
        let waker = Waker::new(poll.registry(), WAKE).map_err(|err| setup("creating the connection's waker failed", err))?;

        let reliable = RTCDataChannelInit { ordered: true, ..Default::default() };
        let control = pc
            .create_data_channel(CONTROL_CHANNEL, Some(reliable))
            .map_err(rtc_error("creating the inference data channel failed"))?
            .id();
        if config.wants_video_track() {
            pc.add_transceiver_from_kind(RtpCodecKind::Video, Some(recvonly()))
            .map_err(rtc_error("adding the recvonly video transceiver failed"))?;
        }

        self.set_stage("gathering ICE candidates");
        let offer = pc.create_offer(None).map_err(rtc_error("creating the SDP offer failed"))?;
        pc.set_local_description(Instant::now(), offer).map_err(rtc_error("applying the SDP offer failed"))?;
        let host = CandidateHostConfig {
            base_config: CandidateConfig {
                network: "udp".to_owned(),
                address: local.ip().to_string(),
                port: local.port(),
                component: 1,
                ..Default::default()
            },
            ..Default::default()
        }
        .new_candidate_host()
        .map_err(|err| setup("making the host ICE candidate failed", err))?;
        let host = RTCIceCandidate::from(&host).to_json().map_err(rtc_error("making the host ICE candidate failed"))?;
        pc.add_local_candidate(host).map_err(rtc_error("adding the host ICE candidate failed"))?;
        pc.add_local_candidate(RTCIceCandidateInit::default())
            .map_err(rtc_error("ending ICE gathering failed"))?;
        let offer = pc
            .local_description()
            .ok_or_else(|| setup("gathering ICE candidates", "the peer connection has no local description"))?;

        // The loop starts now, so that the server's first ICE checks, which
        // come before its answer, are held rather than lost.
        let (open_tx, mut open) = watch::channel(false);
        let (control_tx, control_rx) = mpsc::unbounded_channel();
        let handle = Arc::new(LoopHandle { waker, commands: Mutex::new(VecDeque::new()) });
        *self.own_loop.lock().unwrap() = Some(handle.clone());
        let peer = OwnPeer {
            session: self.clone(),
            handle: handle.clone(),
            pc,
            socket,
            local,
            answered: false,
            early: Vec::new(),
            control,
            control_open: open_tx,
            control_rx,
            receiver: None,
            codec: None,
            media_ssrc: None,
            keyframes: KeyframeRequests::default(),
            pending: VecDeque::new(),
            held: Vec::new(),
            held_until: None,
            packets: 0,
        };
        std::thread::Builder::new()
            .name(format!("rf-net-{}", self.name))
            .spawn(move || peer.run(poll))
            .map_err(|err| setup("starting the connection's thread failed", err))?;

        self.set_stage("waiting for the server's SDP answer");
        let answer = async {
            let answer = self
                .unless_closed(signalling::exchange(&config, offer.sdp, config.connect_timeout))
                .await?
                .map_err(|error| camera_not_opened(&config, error))?;
            RTCSessionDescription::answer(answer).map_err(|err| SessionError::AnswerMalformed(err.to_string()))
        };
        let answer = match answer.await {
            Ok(answer) => answer,
            Err(error) => {
                handle.send(Command::Stop);
                return Err(error);
            }
        };
        let (applied_tx, applied) = oneshot::channel();
        handle.send(Command::Answer(Box::new(answer), applied_tx));
        self.unless_closed(applied).await?.map_err(|_| SessionError::Closed)??;

        self.set_stage("connecting to the server (ICE, DTLS, SCTP) and opening the inference channel");
        if self.unless_closed(open.wait_for(|open| *open)).await?.is_err() {
            // The loop ended (the connection failed and said why).
            return Err(self.failure().unwrap_or_else(|| setup("opening the inference channel", "the connection ended first")));
        }
        *self.control_tx.lock().unwrap() = Some(control_tx);
        Ok(())
    }
}

fn tagged(now: Instant, local: SocketAddr, peer: SocketAddr, message: BytesMut) -> TaggedBytesMut {
    TaggedBytesMut {
        now,
        transport: TransportContext {
            local_addr: local,
            peer_addr: peer,
            transport_protocol: TransportProtocol::UDP,
            ecn: None,
        },
        message,
    }
}

struct OwnPeer {
    session: Arc<Shared>,
    handle: Arc<LoopHandle>,
    pc: RTCPeerConnection,
    socket: UdpSocket,
    local: SocketAddr,
    /// The answer is applied; until then datagrams wait in `early`.
    answered: bool,
    early: Vec<(Instant, SocketAddr, BytesMut)>,
    control: RTCDataChannelId,
    control_open: watch::Sender<bool>,
    control_rx: mpsc::UnboundedReceiver<String>,
    receiver: Option<RTCRtpReceiverId>,
    codec: Option<TrackCodec>,
    media_ssrc: Option<u32>,
    keyframes: KeyframeRequests,
    /// Results the results channel had no room for: data is not read
    /// until they go, which back-pressures the server through SCTP.
    pending: VecDeque<ResultEvent>,
    /// Results waiting for the packets of their frame (see `deliver`).
    held: Vec<ResultEvent>,
    held_until: Option<Instant>,
    packets: u64,
}

impl OwnPeer {
    fn run(mut self, mut poll: Poll) {
        let session = self.session.clone();
        let mut events = Events::with_capacity(8);
        let mut buf = vec![0u8; DATAGRAM];
        let mut last_immediate: Option<Instant> = None;
        // More datagrams may wait than one pass read: look again at once.
        let mut more = false;
        loop {
            if session.is_closed() {
                break;
            }
            if self.take_commands() {
                break;
            }
            if self.answered {
                self.retry_pending();
                self.pump();
            }
            let now = Instant::now();
            let deadline = if self.answered {
                let room = (!self.pending.is_empty()).then(|| now + ROOM_RETRY);
                [self.pc.poll_timeout(), self.keyframes.deadline(), self.held_until, room].into_iter().flatten().min()
            } else {
                None
            };
            let wait = match deadline {
                _ if more => Duration::ZERO,
                Some(deadline) if deadline <= now => match last_immediate {
                    Some(last) if now.duration_since(last) < IMMEDIATE_TIMEOUT_GAP => {
                        last_immediate = None;
                        IMMEDIATE_TIMEOUT_GAP - now.duration_since(last)
                    }
                    _ => {
                        last_immediate = Some(now);
                        if let Err(err) = self.on_timeout(now) {
                            session.handle(Input::Fail(setup("the WebRTC connection failed", err)));
                            break;
                        }
                        continue;
                    }
                },
                Some(deadline) => {
                    last_immediate = None;
                    deadline - now
                }
                None => Duration::from_secs(1),
            };
            if let Err(err) = poll.poll(&mut events, Some(wait))
                && err.kind() != std::io::ErrorKind::Interrupted
            {
                session.handle(Input::Fail(setup("waiting on the UDP socket failed", err)));
                break;
            }
            more = false;
            let now = Instant::now();
            // Read whether or not the socket's event came: cheap, and no
            // edge is ever missed.
            let mut read = 0;
            loop {
                if read == RECEIVE_BURST {
                    more = true;
                    break;
                }
                read += 1;
                match self.socket.recv_from(&mut buf) {
                    Ok((n, from)) => self.on_datagram(now, from, BytesMut::from(&buf[..n])),
                    Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => break,
                    // Interrupted, or the ICMP error of an earlier send.
                    Err(_) => {}
                }
            }
            if self.answered
                && deadline.is_some_and(|deadline| deadline <= Instant::now())
                && let Err(err) = self.on_timeout(Instant::now())
            {
                session.handle(Input::Fail(setup("the WebRTC connection failed", err)));
                break;
            }
        }
        let _ = self.pc.close();
        while let Some(datagram) = self.pc.poll_write() {
            let _ = self.socket.send_to(&datagram.message, datagram.transport.peer_addr);
        }
        *session.own_loop.lock().unwrap() = None;
        gst::debug!(CAT, "session {}: connection loop ended after {} RTP packets", session.name, self.packets);
    }

    /// Carries out what the session's other threads asked; true to stop.
    fn take_commands(&mut self) -> bool {
        let commands = std::mem::take(&mut *self.handle.commands.lock().unwrap());
        for command in commands {
            match command {
                Command::Stop => return true,
                Command::Answer(answer, applied) => {
                    let outcome = self
                        .pc
                        .set_remote_description(Instant::now(), *answer)
                        .map_err(|err| SessionError::AnswerRefused(err.to_string()));
                    if outcome.is_ok() {
                        self.answered = true;
                        for (at, from, datagram) in std::mem::take(&mut self.early) {
                            let _ = self.pc.handle_read(tagged(at, self.local, from, datagram));
                        }
                    }
                    let _ = applied.send(outcome);
                }
            }
        }
        while let Ok(text) = self.control_rx.try_recv() {
            if let Some(mut channel) = self.pc.data_channel(self.control)
                && let Err(err) = channel.send_text(Instant::now(), text)
            {
                gst::warning!(CAT, "session {}: a control message was not sent: {err}", self.session.name);
            }
        }
        if self.session.keyframe_asked.swap(false, Ordering::AcqRel) {
            let action = self.keyframes.on_request(Instant::now());
            self.keyframe_action(action);
        }
        false
    }

    fn on_datagram(&mut self, now: Instant, from: SocketAddr, datagram: BytesMut) {
        if self.answered {
            let _ = self.pc.handle_read(tagged(now, self.local, from, datagram));
        } else if self.early.len() < EARLY_DATAGRAMS {
            self.early.push((now, from, datagram));
        }
    }

    /// Results that found no room go first, in order, as room comes.
    fn retry_pending(&mut self) {
        while !self.pending.is_empty() {
            match self.session.results_tx.try_reserve() {
                Ok(permit) => {
                    let event = self.pending.pop_front().expect("not empty");
                    permit.send((self.session.next_place(), event));
                }
                Err(mpsc::error::TrySendError::Full(())) => return,
                Err(mpsc::error::TrySendError::Closed(())) => {
                    self.pending.clear();
                    return;
                }
            }
        }
    }

    /// Hands over a result: at once, or, while the returned track flows,
    /// held until the frame's packets (which the server sends right after
    /// its result) or RESULT_HOLD, so that both reach the result source in
    /// one wake-up of its thread.
    fn deliver(&mut self, event: ResultEvent) {
        if self.packets > 0 && self.pending.is_empty() {
            self.held.push(event);
            self.held_until.get_or_insert_with(|| Instant::now() + RESULT_HOLD);
            return;
        }
        self.hand_over(event);
    }

    fn release_held(&mut self) {
        self.held_until = None;
        for event in std::mem::take(&mut self.held) {
            self.hand_over(event);
        }
    }

    fn hand_over(&mut self, event: ResultEvent) {
        if !self.pending.is_empty() {
            self.pending.push_back(event);
            return;
        }
        match self.session.results_tx.try_reserve() {
            Ok(permit) => permit.send((self.session.next_place(), event)),
            Err(mpsc::error::TrySendError::Full(())) => self.pending.push_back(event),
            Err(mpsc::error::TrySendError::Closed(())) => {}
        }
    }

    fn on_timeout(&mut self, now: Instant) -> Result<(), rtc::shared::error::Error> {
        if self.held_until.is_some_and(|until| until <= now) {
            self.release_held();
        }
        if self.keyframes.deadline().is_some_and(|deadline| deadline <= now) {
            let action = self.keyframes.on_timeout(now);
            self.keyframe_action(action);
        }
        self.pc.handle_timeout(now)
    }

    fn keyframe_action(&mut self, action: KeyframeAction) {
        match (action, self.media_ssrc, self.receiver) {
            (KeyframeAction::Request, Some(media_ssrc), Some(receiver)) => {
                let pli = PictureLossIndication { sender_ssrc: 0, media_ssrc };
                let sent = self
                    .pc
                    .rtp_receiver(receiver)
                    .map(|mut receiver| receiver.write_rtcp(Instant::now(), vec![Box::new(pli)]));
                if let Some(outcome) = sent {
                    self.session.picture_loss_sent(outcome);
                }
            }
            (KeyframeAction::Request, _, _) => self.keyframes.on_keyframe(),
            (KeyframeAction::GiveUp, _, _) => self.session.no_keyframe_came(),
            (KeyframeAction::Wait, _, _) => {}
        }
    }

    /// Runs the core until nothing moves: events, reads, writes, again.
    fn pump(&mut self) {
        loop {
            let mut moved = false;
            while let Some(event) = self.pc.poll_event() {
                moved = true;
                self.on_event(event);
            }
            // In the order they arrived, until a result finds no room;
            // then media only, and the server's data waits in SCTP.
            while self.pending.is_empty() {
                let Some(message) = self.pc.poll_read() else { break };
                moved = true;
                self.on_message(message);
            }
            if !self.pending.is_empty() {
                while let Some(message) = self.pc.poll_media_read() {
                    moved = true;
                    self.on_message(message);
                }
            }
            while let Some(datagram) = self.pc.poll_write() {
                match self.socket.send_to(&datagram.message, datagram.transport.peer_addr) {
                    Ok(_) => {}
                    // A full socket buffer loses the datagram, as the network
                    // may: SCTP and NACK resend what matters.
                    Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(err) => {
                        gst::debug!(CAT, "session {}: sending to {} failed: {err}", self.session.name, datagram.transport.peer_addr)
                    }
                }
            }
            if !moved {
                return;
            }
        }
    }

    fn on_event(&mut self, event: RTCPeerConnectionEvent) {
        let session = &self.session;
        match event {
            RTCPeerConnectionEvent::OnConnectionStateChangeEvent(state) => {
                gst::debug!(CAT, "session {}: peer connection {state}", session.name);
                let state = match state {
                    RTCPeerConnectionState::Connected => PeerState::Connected,
                    RTCPeerConnectionState::Disconnected => PeerState::Disconnected,
                    RTCPeerConnectionState::Failed => PeerState::Failed,
                    RTCPeerConnectionState::Closed if !session.is_closed() => PeerState::Closed,
                    _ => return,
                };
                session.handle(Input::Peer(state));
            }
            RTCPeerConnectionEvent::OnDataChannel(RTCDataChannelEvent::OnOpen(id)) if id == self.control => {
                self.control_open.send_replace(true);
            }
            RTCPeerConnectionEvent::OnDataChannel(RTCDataChannelEvent::OnClose(id)) if id == self.control => {
                session.handle(Input::ControlChannelClosed);
            }
            RTCPeerConnectionEvent::OnTrack(RTCTrackEvent::OnOpen(init)) => {
                self.receiver = Some(init.receiver_id);
            }
            RTCPeerConnectionEvent::OnTrack(RTCTrackEvent::OnClose(_)) => {
                gst::debug!(CAT, "session {}: returned track ended after {} RTP packets", session.name, self.packets);
            }
            _ => {}
        }
    }

    fn on_message(&mut self, message: TaggedRTCMessage) {
        let session = self.session.clone();
        match message.message {
            RTCMessage::RtpPacket(_, packet) => {
                self.packets += 1;
                self.media_ssrc = Some(packet.header.ssrc);
                let codec = match self.codec {
                    Some(codec) => codec,
                    None => {
                        let codec = self.announce_codec(&packet.header);
                        *self.codec.insert(codec)
                    }
                };
                if self.keyframes.awaiting() && keyframe::starts_keyframe(codec, &packet.payload) {
                    gst::debug!(CAT, "session {}: the keyframe asked for arrived", session.name);
                    self.keyframes.on_keyframe();
                }
                self.release_held();
                match packet.marshal() {
                    Ok(bytes) => session.deliver_track(TrackItem::Packet(bytes.freeze())),
                    Err(err) => gst::warning!(CAT, "session {}: cannot serialize an RTP packet: {err}", session.name),
                }
            }
            RTCMessage::DataChannelMessage(id, message) if id == self.control => {
                for output in session.handle(Input::ControlMessage(&message.data)) {
                    if let Output::Deliver(event) = output {
                        self.deliver(event);
                    }
                }
            }
            _ => {}
        }
    }

    fn announce_codec(&mut self, header: &rtc::rtp::header::Header) -> TrackCodec {
        let codec = self
            .receiver
            .and_then(|id| self.pc.rtp_receiver(id))
            .and_then(|receiver| receiver.track().codec(header.ssrc).map(|c| (c.mime_type.clone(), c.clock_rate)));
        self.session.announce_codec(codec, header.payload_type)
    }
}
