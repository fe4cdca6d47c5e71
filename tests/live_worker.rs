// The test worker's live video in (PROTOCOL §10), tested on its own with a
// small webrtc-rs client written here: the `inference` channel, then one
// sendrecv video transceiver carrying solid-colour frames as RTP, then an
// RTCP BYE. The client is only there to test the worker.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::results::Results;
use common::video_track::{RtpEncoder, TrackCodec};
use common::worker::{SessionReport, TestWorker, WorkerConfig};
use rtc::ice::mdns::MulticastDnsMode;
use rtc::media_stream::MediaStreamTrack;
use rtc::rtcp::goodbye::Goodbye;
use rtc::rtp;
use rtc::rtp_transceiver::rtp_sender::{
    RTCPFeedback, RTCRtpCodec, RTCRtpCodecParameters, RTCRtpCodingParameters,
    RTCRtpEncodingParameters, RtpCodecKind,
};
use rtc::rtp_transceiver::{RTCRtpTransceiverDirection, RTCRtpTransceiverInit};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use webrtc::data_channel::DataChannelEvent;
use webrtc::media_stream::track_local::TrackLocal;
use webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP;
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::peer_connection::{
    MediaEngine, PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler,
    RTCConfigurationBuilder, RTCIceGatheringState, RTCSessionDescription, Registry,
    SettingEngineBuilder, register_default_interceptors,
};

const WIDTH: usize = 160;
const HEIGHT: usize = 120;
/// 30 fps at 90 kHz.
const TICKS_PER_FRAME: u32 = 3000;
/// Per channel, between the colour sent and the mean the worker reports
/// (RGB → I420 → codec → RGB on flat frames).
const COLOR_TOLERANCE: i32 = 12;
const STEP_TIMEOUT: Duration = Duration::from_secs(15);

/// What the client offers and sends.
#[derive(Clone, Copy, Debug, PartialEq)]
enum ClientCodec {
    Vp8,
    /// Constrained baseline, packetization-mode 1: what the plugin offers.
    H264,
    /// High profile: the server has no decoder for it.
    H264High,
}

impl ClientCodec {
    fn rtp_codec(self) -> RTCRtpCodec {
        let (mime_type, fmtp) = match self {
            ClientCodec::Vp8 => ("video/VP8", ""),
            ClientCodec::H264 => (
                "video/H264",
                "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f",
            ),
            ClientCodec::H264High => (
                "video/H264",
                "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=640032",
            ),
        };
        RTCRtpCodec {
            mime_type: mime_type.to_owned(),
            clock_rate: 90_000,
            channels: 0,
            sdp_fmtp_line: fmtp.to_owned(),
            rtcp_feedback: vec![
                RTCPFeedback {
                    typ: "nack".to_owned(),
                    parameter: String::new(),
                },
                RTCPFeedback {
                    typ: "nack".to_owned(),
                    parameter: "pli".to_owned(),
                },
            ],
        }
    }

    fn track_codec(self) -> TrackCodec {
        match self {
            ClientCodec::Vp8 => TrackCodec::Vp8,
            ClientCodec::H264 | ClientCodec::H264High => TrackCodec::H264,
        }
    }
}

#[derive(Clone, Debug)]
struct ClientOptions {
    codec: ClientCodec,
    frames: u32,
    realtime: bool,
    stream_output: Value,
    data_output: Value,
    frame_interval: Duration,
    keyframe_interval: u32,
    /// The transceiver's direction: sendrecv like the plugin, or sendonly.
    direction: RTCRtpTransceiverDirection,
    /// Ends with an RTCP BYE; without, the client waits a moment and closes.
    bye: bool,
    /// After the BYE, how long to wait for `processing_complete`.
    complete_wait: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            codec: ClientCodec::Vp8,
            frames: 30,
            realtime: false,
            stream_output: json!([]),
            data_output: json!(["rgb_color"]),
            frame_interval: Duration::from_millis(33),
            keyframe_interval: 30,
            direction: RTCRtpTransceiverDirection::Sendrecv,
            bye: true,
            complete_wait: Duration::from_secs(60),
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct SentFrame {
    rtp: u32,
    color: [u8; 3],
}

#[derive(Debug, Default)]
struct ClientRun {
    status: u16,
    error_body: Value,
    answer_sdp: String,
    ssrc: u32,
    sent: Vec<SentFrame>,
    /// Frame results in arrival order (the JSON objects).
    results: Vec<Value>,
    processing_complete: u32,
    /// RTP timestamps of the frames of the worker's returned track, in arrival order.
    returned_timestamps: Vec<u32>,
}

/// Ends a step that took too long with a message saying which.
async fn bounded<T>(what: &str, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(STEP_TIMEOUT, future).await {
        Ok(value) => value,
        Err(_) => panic!("{what} took over {STEP_TIMEOUT:?}"),
    }
}

struct ClientEvents {
    gathered: watch::Sender<bool>,
    returned: Arc<Mutex<Vec<u32>>>,
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for ClientEvents {
    async fn on_ice_gathering_state_change(&self, state: RTCIceGatheringState) {
        if state == RTCIceGatheringState::Complete {
            self.gathered.send_replace(true);
        }
    }

    /// The worker's returned track: records each frame's timestamp (marker bit).
    async fn on_track(&self, track: Arc<dyn TrackRemote>) {
        let returned = self.returned.clone();
        tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(120);
            while Instant::now() < deadline {
                match tokio::time::timeout(Duration::from_secs(1), track.poll()).await {
                    Ok(Some(TrackRemoteEvent::OnRtpPacket(packet))) if packet.header.marker => {
                        returned.lock().unwrap().push(packet.header.timestamp);
                    }
                    Ok(None) | Ok(Some(TrackRemoteEvent::OnEnded)) => return,
                    _ => {}
                }
            }
        });
    }
}

/// A solid RGB frame.
fn solid_frame(color: [u8; 3], index: u32) -> gst::Sample {
    let mut data = Vec::with_capacity(WIDTH * HEIGHT * 3);
    for _ in 0..WIDTH * HEIGHT {
        data.extend_from_slice(&color);
    }
    let mut buffer = gst::Buffer::from_mut_slice(data);
    buffer
        .get_mut()
        .unwrap()
        .set_pts(gst::ClockTime::from_mseconds(u64::from(index) * 1000 / 30));
    let caps = gst::Caps::builder("video/x-raw")
        .field("format", "RGB")
        .field("width", WIDTH as i32)
        .field("height", HEIGHT as i32)
        .field("framerate", gst::Fraction::new(30, 1))
        .build();
    gst::Sample::builder().buffer(&buffer).caps(&caps).build()
}

/// Distinct, mid-range colours (away from the clipping ends).
fn color_of(index: u32) -> [u8; 3] {
    [
        (40 + (index * 53) % 176) as u8,
        (40 + (index * 97 + 60) % 176) as u8,
        (40 + (index * 31 + 120) % 176) as u8,
    ]
}

/// Encodes the frames up front (the payload type is set when sending).
fn encode_frames(options: &ClientOptions) -> Vec<(Vec<rtp::Packet>, [u8; 3])> {
    gst::init().unwrap();
    let mut encoder = RtpEncoder::with_keyframe_interval(
        options.codec.track_codec(),
        96,
        options.keyframe_interval,
    )
    .expect("client encoder");
    (0..options.frames)
        .map(|index| {
            let color = color_of(index);
            let packets = encoder
                .encode(&solid_frame(color, index))
                .expect("encode a frame");
            (packets, color)
        })
        .collect()
}

/// One live session against `worker`: offer, POST, frames, BYE, wait for
/// `processing_complete` (bounded), close.
async fn run_client(worker_url: &str, options: &ClientOptions) -> ClientRun {
    let frames = {
        let options = options.clone();
        tokio::task::spawn_blocking(move || encode_frames(&options))
            .await
            .unwrap()
    };
    let mut run = ClientRun::default();
    let rtp_codec = options.codec.rtp_codec();
    let mut media_engine = MediaEngine::default();
    media_engine
        .register_codec(
            RTCRtpCodecParameters {
                rtp_codec: rtp_codec.clone(),
                payload_type: 96,
            },
            RtpCodecKind::Video,
        )
        .unwrap();
    let registry = register_default_interceptors(Registry::new(), &mut media_engine).unwrap();
    let (gathered_tx, mut gathered_rx) = watch::channel(false);
    let returned = Arc::new(Mutex::new(Vec::new()));
    let peer = PeerConnectionBuilder::new()
        .with_configuration(RTCConfigurationBuilder::new().build())
        .with_media_engine(media_engine)
        .with_interceptor_registry(registry)
        .with_setting_engine(
            SettingEngineBuilder::new()
                .with_multicast_dns_mode(MulticastDnsMode::Disabled)
                .build(),
        )
        .with_handler(Arc::new(ClientEvents {
            gathered: gathered_tx,
            returned: returned.clone(),
        }))
        .with_udp_addrs(vec!["127.0.0.1:0".to_string()])
        .build()
        .await
        .unwrap();
    let peer: Arc<dyn PeerConnection> = Arc::new(peer);

    let inference = peer.create_data_channel("inference", None).await.unwrap();
    run.ssrc = 0x1234_5678;
    let track = Arc::new(TrackLocalStaticRTP::new(MediaStreamTrack::new(
        "live-client".to_owned(),
        "live-client-video".to_owned(),
        "camera".to_owned(),
        RtpCodecKind::Video,
        vec![RTCRtpEncodingParameters {
            rtp_coding_parameters: RTCRtpCodingParameters {
                ssrc: Some(run.ssrc),
                ..Default::default()
            },
            active: true,
            codec: rtp_codec,
            ..Default::default()
        }],
    )));
    let transceiver = peer
        .add_transceiver_from_track(
            track.clone() as Arc<dyn TrackLocal>,
            Some(RTCRtpTransceiverInit {
                direction: options.direction,
                streams: Vec::new(),
                send_encodings: Vec::new(),
            }),
        )
        .await
        .unwrap();
    let offer = peer.create_offer(None).await.unwrap();
    peer.set_local_description(offer).await.unwrap();
    bounded("ICE gathering", gathered_rx.wait_for(|done| *done))
        .await
        .unwrap();
    let offer_sdp = peer.local_description().await.unwrap().sdp;

    let request = json!({
        "api_key": "test-key",
        "workflow_configuration": {
            "type": "WorkflowConfiguration",
            "workflow_specification": {"version": "1.0", "inputs": [], "steps": [], "outputs": []},
            "image_input_name": "image",
        },
        "webrtc_offer": {"type": "offer", "sdp": offer_sdp},
        "webrtc_realtime_processing": options.realtime,
        "stream_output": options.stream_output,
        "data_output": options.data_output,
        "declared_fps": 30,
    });
    let response = bounded(
        "the POST",
        reqwest::Client::new()
            .post(format!("{worker_url}/initialise_webrtc_worker"))
            .json(&request)
            .send(),
    )
    .await
    .unwrap();
    run.status = response.status().as_u16();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    if run.status != 200 {
        run.error_body = body;
        let _ = peer.close().await;
        return run;
    }
    run.answer_sdp = body["sdp"].as_str().unwrap().to_owned();
    peer.set_remote_description(RTCSessionDescription::answer(run.answer_sdp.clone()).unwrap())
        .await
        .unwrap();

    // The `inference` channel's events, read by one task.
    let (messages_tx, mut messages_rx) = mpsc::unbounded_channel::<Option<Bytes>>();
    let reader_channel = inference.clone();
    tokio::spawn(async move {
        while let Ok(Some(event)) =
            tokio::time::timeout(Duration::from_secs(120), reader_channel.poll()).await
        {
            let forwarded = match event {
                DataChannelEvent::OnOpen => messages_tx.send(None),
                DataChannelEvent::OnMessage(message) => {
                    messages_tx.send(Some(Bytes::copy_from_slice(&message.data)))
                }
                DataChannelEvent::OnClose => return,
                _ => Ok(()),
            };
            if forwarded.is_err() {
                return;
            }
        }
    });
    // Frames only once `inference` is open, as the plugin does.
    let opened = bounded("the inference channel to open", messages_rx.recv()).await;
    assert_eq!(opened, Some(None), "inference channel did not open first");

    // The payload type of the codec as negotiated.
    let sender = transceiver.sender().await.unwrap().unwrap();
    let parameters = sender.get_parameters().await.unwrap();
    let payload_type = parameters.rtp_parameters.codecs[0].payload_type;

    let origin: u32 = 0xffff_0000; // wraps after a few frames
    let mut next_send = tokio::time::Instant::now();
    let mut last_sequence = 0u16;
    'frames: for (index, (packets, color)) in frames.into_iter().enumerate() {
        let rtp = origin.wrapping_add(index as u32 * TICKS_PER_FRAME);
        for mut packet in packets {
            last_sequence = packet.header.sequence_number;
            packet.header.timestamp = rtp;
            packet.header.ssrc = run.ssrc;
            packet.header.payload_type = payload_type;
            // Fails only once the worker has gone (a fault test).
            if bounded("write_rtp", track.write_rtp(packet)).await.is_err() {
                break 'frames;
            }
        }
        run.sent.push(SentFrame { rtp, color });
        next_send += options.frame_interval;
        tokio::time::sleep_until(next_send).await;
    }
    // The server completes a frame when the next timestamp starts: a last
    // packet with a new timestamp and no data lets the last frame through.
    if let Some(last) = run.sent.last() {
        let payload: &[u8] = match options.codec.track_codec() {
            TrackCodec::Vp8 => &[0x00],
            TrackCodec::H264 => &[0x1c, 0x01],
        };
        let mut boundary = rtp::Packet::default();
        boundary.header.version = 2;
        boundary.header.timestamp = last.rtp.wrapping_add(TICKS_PER_FRAME);
        boundary.header.sequence_number = last_sequence.wrapping_add(1);
        boundary.header.ssrc = run.ssrc;
        boundary.header.payload_type = payload_type;
        boundary.payload = Bytes::copy_from_slice(payload);
        let _ = bounded("write_rtp (boundary)", track.write_rtp(boundary)).await;
    }
    if options.bye {
        let bye: Box<dyn rtc::rtcp::Packet> = Box::new(Goodbye {
            sources: vec![run.ssrc],
            reason: Bytes::new(),
        });
        let _ = bounded("write_rtcp (BYE)", track.write_rtcp(vec![bye])).await;
    }

    // Results until processing_complete, then a little longer to catch a second one.
    let mut results = Results::default();
    let mut complete_deadline: Option<tokio::time::Instant> = None;
    let overall = tokio::time::Instant::now()
        + if options.bye {
            options.complete_wait
        } else {
            Duration::from_secs(1)
        };
    loop {
        let until = complete_deadline.unwrap_or(overall).min(overall);
        let message = match tokio::time::timeout_at(until, messages_rx.recv()).await {
            Ok(Some(Some(message))) => message,
            Ok(Some(None)) => continue,
            Ok(None) | Err(_) => break,
        };
        if let Some(result) = results.take(&message) {
            if result["processing_complete"] == json!(true) {
                run.processing_complete += 1;
                complete_deadline
                    .get_or_insert(tokio::time::Instant::now() + Duration::from_millis(500));
            } else {
                run.results.push(result);
            }
        }
    }
    run.returned_timestamps = returned.lock().unwrap().clone();
    let _ = bounded("close", peer.close()).await;
    run
}

fn client_run(worker: &TestWorker, options: ClientOptions) -> ClientRun {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run_client(&worker.url(), &options))
}

/// The worker's report of the session, once it has seen the client close.
fn session_report(worker: &TestWorker) -> SessionReport {
    let sessions = worker.wait_until(Duration::from_secs(10), |sessions| {
        sessions.len() == 1 && sessions[0].closed
    });
    assert_eq!(sessions.len(), 1, "one session");
    let report = sessions[0].clone();
    eprintln!(
        "worker: assembled {}, skipped {}, decoded {}, processed {}, dropped (realtime) {}, \
         PLIs {}, BYE {}, errors {:?}",
        report.live_frames_assembled,
        report.live_frames_skipped,
        report.live_frames_decoded,
        report.live_frames_processed,
        report.live_frames_dropped_realtime,
        report.live_plis_sent,
        report.live_bye_received,
        report.live_decode_errors,
    );
    report
}

fn close(a: [u8; 3], b: &Value) -> bool {
    let b: Vec<i32> = b
        .as_array()
        .unwrap_or_else(|| panic!("rgb_color {b}"))
        .iter()
        .map(|v| v.as_i64().unwrap() as i32)
        .collect();
    b.len() == 3 && (0..3).all(|i| (i32::from(a[i]) - b[i]).abs() <= COLOR_TOLERANCE)
}

/// Every result's pts names a frame sent, later than the one before, with
/// that frame's colour; frame ids count 1, 2, ... Returns the client's
/// indexes of the frames processed.
fn check_results(run: &ClientRun, first_rtp: u32) -> Vec<usize> {
    let mut indexes = Vec::new();
    for (position, result) in run.results.iter().enumerate() {
        let metadata = &result["video_metadata"];
        assert_eq!(
            metadata["frame_id"],
            json!(position + 1),
            "frame ids count processed frames"
        );
        let time_base = metadata["time_base"].as_f64().unwrap();
        assert!(
            (time_base - 1.0 / 90_000.0).abs() < 1e-12,
            "time_base {time_base}"
        );
        let pts = metadata["pts"].as_u64().unwrap();
        let index = run
            .sent
            .iter()
            .position(|sent| u64::from(sent.rtp.wrapping_sub(first_rtp)) == pts)
            .unwrap_or_else(|| panic!("result {} has pts {pts}: no frame sent", position + 1));
        assert!(
            indexes.last().is_none_or(|last| *last < index),
            "result {} (client frame {index}) out of order",
            position + 1
        );
        let color = &result["serialized_output_data"]["rgb_color"];
        assert!(
            close(run.sent[index].color, color),
            "result {}: colour {color} for client frame {index} sent as {:?}",
            position + 1,
            run.sent[index].color
        );
        indexes.push(index);
    }
    indexes
}

#[test]
fn vp8_track_every_frame_in_order() {
    let worker = TestWorker::start(WorkerConfig::default());
    let run = client_run(&worker, ClientOptions::default());
    assert_eq!(run.status, 200, "{}", run.error_body);
    assert_eq!(run.processing_complete, 1, "processing_complete once");
    let indexes = check_results(&run, run.sent[0].rtp);
    assert_eq!(
        indexes,
        (0..30).collect::<Vec<_>>(),
        "every frame, in order"
    );

    let report = session_report(&worker);
    assert_eq!(report.live_track_codec.as_deref(), Some("video/VP8"));
    assert_eq!(report.live_offer_direction.as_deref(), Some("sendrecv"));
    assert_eq!(report.live_answer_direction.as_deref(), Some("recvonly"));
    assert_eq!(report.live_ssrc, Some(run.ssrc));
    assert_eq!(report.live_frames_assembled, 30);
    assert_eq!(report.live_frames_processed, 30);
    assert_eq!(report.live_first_rtp, Some(run.sent[0].rtp));
    let sent_rtp: Vec<u32> = run.sent.iter().map(|s| s.rtp).collect();
    assert_eq!(report.live_rtp_timestamps, sent_rtp);
    assert!(report.live_bye_received, "BYE seen");
    assert!(report.processing_complete_sent);
    assert_eq!(report.results.len(), 30);
    assert!(
        report.live_decode_errors.is_empty(),
        "{:?}",
        report.live_decode_errors
    );
    assert_eq!(
        report.track_codec, None,
        "no returned track with stream_output []"
    );
}

#[test]
fn realtime_keeps_only_the_newest_frame_while_busy() {
    let worker = TestWorker::start(WorkerConfig {
        live_process_delay: Duration::from_millis(100),
        ..WorkerConfig::default()
    });
    let run = client_run(
        &worker,
        ClientOptions {
            realtime: true,
            ..ClientOptions::default()
        },
    );
    assert_eq!(run.status, 200, "{}", run.error_body);
    assert_eq!(run.processing_complete, 1, "processing_complete once");
    let indexes = check_results(&run, run.sent[0].rtp);
    let report = session_report(&worker);
    assert_eq!(report.live_frames_assembled, 30);
    assert_eq!(report.live_frames_decoded, 30);
    assert_eq!(report.live_frames_processed as usize, indexes.len());
    assert!(
        (8..=16).contains(&indexes.len()),
        "about one frame in three processed at 100 ms each: {indexes:?}"
    );
    assert_eq!(
        report.live_frames_processed + report.live_frames_dropped_realtime,
        30,
        "each decoded frame processed or dropped"
    );
    assert_eq!(indexes[0], 0, "the first frame finds the worker idle");
}

#[test]
fn batch_processes_a_backlog_in_order() {
    let worker = TestWorker::start(WorkerConfig {
        live_process_delay: Duration::from_millis(60),
        ..WorkerConfig::default()
    });
    let run = client_run(&worker, ClientOptions::default());
    assert_eq!(run.status, 200, "{}", run.error_body);
    assert_eq!(run.processing_complete, 1);
    let indexes = check_results(&run, run.sent[0].rtp);
    assert_eq!(
        indexes,
        (0..30).collect::<Vec<_>>(),
        "every frame after the BYE too"
    );
    let report = session_report(&worker);
    assert_eq!(report.live_frames_dropped_realtime, 0);
}

#[test]
fn lost_first_frame_counts_pts_from_the_second() {
    let worker = TestWorker::start(WorkerConfig {
        live_lose_first_frame: true,
        ..WorkerConfig::default()
    });
    let run = client_run(
        &worker,
        ClientOptions {
            keyframe_interval: 10,
            ..ClientOptions::default()
        },
    );
    assert_eq!(run.status, 200, "{}", run.error_body);
    assert_eq!(run.processing_complete, 1);
    let report = session_report(&worker);
    assert_eq!(
        report.live_first_rtp,
        Some(run.sent[1].rtp),
        "first assembled: the second frame"
    );
    assert_eq!(report.live_frames_assembled, 29);
    assert!(report.live_packets_discarded > 0);
    // Delta frames before the next keyframe cannot be decoded: skipped, with PLIs.
    assert!(report.live_frames_skipped >= 1, "{report:?}");
    assert!(report.live_plis_sent >= 1);
    let indexes = check_results(&run, run.sent[1].rtp);
    assert_eq!(indexes.len() as u32, 29 - report.live_frames_skipped);
    let first = indexes[0];
    assert_eq!(
        indexes,
        (first..30).collect::<Vec<_>>(),
        "every frame from the keyframe on"
    );
}

#[test]
fn h264_track_with_a_returned_track() {
    let worker = TestWorker::start(WorkerConfig::default());
    let run = client_run(
        &worker,
        ClientOptions {
            codec: ClientCodec::H264,
            stream_output: Value::Null,
            ..ClientOptions::default()
        },
    );
    assert_eq!(run.status, 200, "{}", run.error_body);
    assert_eq!(run.processing_complete, 1);
    let indexes = check_results(&run, run.sent[0].rtp);
    assert_eq!(indexes, (0..30).collect::<Vec<_>>());
    let report = session_report(&worker);
    assert_eq!(report.live_track_codec.as_deref(), Some("video/H264"));
    assert!(
        report
            .live_track_fmtp
            .as_deref()
            .is_some_and(|fmtp| fmtp.contains("profile-level-id=42e01f")),
        "{:?}",
        report.live_track_fmtp
    );
    assert_eq!(report.live_answer_direction.as_deref(), Some("sendrecv"));
    assert_eq!(report.track_codec.as_deref(), Some("video/H264"));
    // The returned track: RTP ts = origin + pts.
    let origin = report.rtp_origin.unwrap();
    let expected: Vec<u32> = run
        .results
        .iter()
        .map(|r| origin.wrapping_add(r["video_metadata"]["pts"].as_u64().unwrap() as u32))
        .collect();
    assert!(
        !run.returned_timestamps.is_empty(),
        "returned track frames arrived"
    );
    for timestamp in &run.returned_timestamps {
        assert!(
            expected.contains(timestamp),
            "returned frame ts {timestamp} is no origin + pts"
        );
    }
    assert_eq!(report.track_frames_sent, 30);
}

#[test]
fn a_codec_the_server_cannot_decode_is_refused_with_500() {
    let worker = TestWorker::start(WorkerConfig::default());
    let run = client_run(
        &worker,
        ClientOptions {
            codec: ClientCodec::H264High,
            frames: 1,
            ..ClientOptions::default()
        },
    );
    assert_eq!(run.status, 500);
    assert!(
        run.error_body["message"]
            .as_str()
            .is_some_and(|m| m.contains("codec")),
        "{}",
        run.error_body
    );
    assert!(worker.sessions().is_empty(), "no session");
    assert_eq!(worker.requests().last().map(|r| r.status), Some(500));
}

#[test]
fn realtime_without_delay_keeps_up() {
    let worker = TestWorker::start(WorkerConfig::default());
    let run = client_run(
        &worker,
        ClientOptions {
            realtime: true,
            ..ClientOptions::default()
        },
    );
    assert_eq!(run.status, 200, "{}", run.error_body);
    assert_eq!(run.processing_complete, 1);
    let indexes = check_results(&run, run.sent[0].rtp);
    let report = session_report(&worker);
    assert_eq!(
        report.live_frames_processed + report.live_frames_dropped_realtime,
        30
    );
    // A frame every 33 ms and a worker that needs a few: at most the last
    // one can be lost, when it is still waiting as the BYE ends the track.
    assert!(indexes.len() >= 29, "{indexes:?}");
}

#[test]
fn sendonly_offer_and_images_on_the_data_channel() {
    let worker = TestWorker::start(WorkerConfig::default());
    let run = client_run(
        &worker,
        ClientOptions {
            direction: RTCRtpTransceiverDirection::Sendonly,
            data_output: json!(["rgb_color", "image"]),
            frames: 10,
            ..ClientOptions::default()
        },
    );
    assert_eq!(run.status, 200, "{}", run.error_body);
    assert_eq!(run.processing_complete, 1);
    let indexes = check_results(&run, run.sent[0].rtp);
    assert_eq!(indexes, (0..10).collect::<Vec<_>>());
    for result in &run.results {
        let image = &result["serialized_output_data"]["image"];
        assert_eq!(image["type"], json!("base64"), "{image}");
        assert!(
            image["value"]
                .as_str()
                .is_some_and(|v| v.starts_with("/9j/")),
            "a JPEG"
        );
    }
    let report = session_report(&worker);
    assert_eq!(report.live_offer_direction.as_deref(), Some("sendonly"));
    assert_eq!(report.live_answer_direction.as_deref(), Some("recvonly"));
}

#[test]
fn a_client_that_closes_without_bye_ends_the_session() {
    let worker = TestWorker::start(WorkerConfig::default());
    let run = client_run(
        &worker,
        ClientOptions {
            bye: false,
            frames: 10,
            ..ClientOptions::default()
        },
    );
    assert_eq!(run.status, 200, "{}", run.error_body);
    assert_eq!(
        run.processing_complete, 0,
        "no BYE, no processing_complete before the close"
    );
    let report = session_report(&worker);
    assert!(report.closed);
    assert!(!report.live_bye_received);
    assert_eq!(report.live_frames_assembled, 10);
}

#[test]
fn sendonly_offer_asking_for_a_returned_track_gets_nothing() {
    let worker = TestWorker::start(WorkerConfig::default());
    let run = client_run(
        &worker,
        ClientOptions {
            direction: RTCRtpTransceiverDirection::Sendonly,
            stream_output: Value::Null,
            frames: 5,
            complete_wait: Duration::from_secs(2),
            ..ClientOptions::default()
        },
    );
    assert_eq!(run.status, 200, "{}", run.error_body);
    assert!(run.results.is_empty());
    assert_eq!(run.processing_complete, 0);
    let report = session_report(&worker);
    assert_eq!(report.live_frames_processed, 0);
    assert_eq!(
        report.live_decode_errors.len(),
        1,
        "{:?}",
        report.live_decode_errors
    );
}

#[test]
fn drop_peer_after_frames_applies_to_a_live_track() {
    let worker = TestWorker::start(
        WorkerConfig::default().with_fault(common::worker::Fault::DropPeerAfterFrames(5)),
    );
    let run = client_run(
        &worker,
        ClientOptions {
            complete_wait: Duration::from_secs(3),
            ..ClientOptions::default()
        },
    );
    assert_eq!(run.status, 200, "{}", run.error_body);
    assert_eq!(run.results.len(), 5);
    assert_eq!(run.processing_complete, 0);
    assert!(session_report(&worker).closed);
}
