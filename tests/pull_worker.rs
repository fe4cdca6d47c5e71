// The test worker's server-pull sources (PROTOCOL §11), tested on their own
// with the test cameras and a small webrtc-rs client written here: the
// `inference` channel, optionally a recvonly video transceiver, and a POST
// naming `rtsp_url` or `mjpeg_url`. The client is only there to test the
// worker.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::results::Results;
use common::cameras::{MjpegCamera, RtspCamera};
use common::live::{index_of, rgb_color};
use common::worker::{SessionReport, TestWorker, WorkerConfig};
use rtc::ice::mdns::MulticastDnsMode;
use rtc::rtp_transceiver::rtp_sender::RtpCodecKind;
use rtc::rtp_transceiver::{RTCRtpTransceiverDirection, RTCRtpTransceiverInit};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use webrtc::data_channel::DataChannelEvent;
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::peer_connection::{
    MediaEngine, PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler,
    RTCConfigurationBuilder, RTCIceGatheringState, RTCSessionDescription, Registry,
    SettingEngineBuilder, register_default_interceptors,
};

const WIDTH: u32 = 160;
const HEIGHT: u32 = 120;
const STEP_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Clone, Debug)]
struct ClientOptions {
    /// `rtsp_url` or `mjpeg_url`.
    source_field: &'static str,
    url: String,
    realtime: bool,
    stream_output: Value,
    /// Offer a recvonly video transceiver.
    receive_video: bool,
    /// `{"ack": N}` after each result.
    ack: bool,
    /// Close once this many results have arrived.
    close_after_results: Option<usize>,
    /// How long to wait for `processing_complete` in all.
    complete_wait: Duration,
    processing_timeout: Option<u64>,
}

impl ClientOptions {
    fn new(source_field: &'static str, url: String) -> ClientOptions {
        ClientOptions {
            source_field,
            url,
            realtime: true,
            stream_output: json!([]),
            receive_video: false,
            ack: false,
            close_after_results: None,
            complete_wait: Duration::from_secs(30),
            processing_timeout: None,
        }
    }
}

#[derive(Debug, Default)]
struct ClientRun {
    status: u16,
    error_body: Value,
    /// Frame results in arrival order.
    results: Vec<Value>,
    /// Every `processing_complete` message.
    completions: Vec<Value>,
    /// Frames (marker-bit packets) of the returned track.
    returned_frames: usize,
}

async fn bounded<T>(what: &str, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(STEP_TIMEOUT, future).await {
        Ok(value) => value,
        Err(_) => panic!("{what} took over {STEP_TIMEOUT:?}"),
    }
}

struct ClientEvents {
    gathered: watch::Sender<bool>,
    returned: Arc<Mutex<usize>>,
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for ClientEvents {
    async fn on_ice_gathering_state_change(&self, state: RTCIceGatheringState) {
        if state == RTCIceGatheringState::Complete {
            self.gathered.send_replace(true);
        }
    }

    async fn on_track(&self, track: Arc<dyn TrackRemote>) {
        let returned = self.returned.clone();
        tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            while Instant::now() < deadline {
                match tokio::time::timeout(Duration::from_secs(1), track.poll()).await {
                    Ok(Some(TrackRemoteEvent::OnRtpPacket(packet))) if packet.header.marker => {
                        *returned.lock().unwrap() += 1;
                    }
                    Ok(None) | Ok(Some(TrackRemoteEvent::OnEnded)) => return,
                    _ => {}
                }
            }
        });
    }
}

async fn run_client(worker_url: &str, options: &ClientOptions) -> ClientRun {
    let mut run = ClientRun::default();
    let mut media_engine = MediaEngine::default();
    media_engine.register_default_codecs().unwrap();
    let registry = register_default_interceptors(Registry::new(), &mut media_engine).unwrap();
    let (gathered_tx, mut gathered_rx) = watch::channel(false);
    let returned = Arc::new(Mutex::new(0));
    let peer = PeerConnectionBuilder::new()
        .with_configuration(RTCConfigurationBuilder::new().build())
        .with_media_engine(media_engine)
        .with_interceptor_registry(registry)
        .with_setting_engine(
            SettingEngineBuilder::new().with_multicast_dns_mode(MulticastDnsMode::Disabled).build(),
        )
        .with_handler(Arc::new(ClientEvents { gathered: gathered_tx, returned: returned.clone() }))
        .with_udp_addrs(vec!["127.0.0.1:0".to_string()])
        .build()
        .await
        .unwrap();
    let peer: Arc<dyn PeerConnection> = Arc::new(peer);
    let inference = peer.create_data_channel("inference", None).await.unwrap();
    if options.receive_video {
        peer.add_transceiver_from_kind(
            RtpCodecKind::Video,
            Some(RTCRtpTransceiverInit {
                direction: RTCRtpTransceiverDirection::Recvonly,
                streams: Vec::new(),
                send_encodings: Vec::new(),
            }),
        )
        .await
        .unwrap();
    }
    let offer = peer.create_offer(None).await.unwrap();
    peer.set_local_description(offer).await.unwrap();
    bounded("ICE gathering", gathered_rx.wait_for(|done| *done)).await.unwrap();
    let offer_sdp = peer.local_description().await.unwrap().sdp;

    let mut request = json!({
        "api_key": "test-key",
        "workflow_configuration": {
            "type": "WorkflowConfiguration",
            "workflow_specification": {"version": "1.0", "inputs": [], "steps": [], "outputs": []},
            "image_input_name": "image",
        },
        "webrtc_offer": {"type": "offer", "sdp": offer_sdp},
        "webrtc_realtime_processing": options.realtime,
        "stream_output": options.stream_output,
        "data_output": ["rgb_color"],
    });
    request[options.source_field] = json!(options.url);
    if let Some(timeout) = options.processing_timeout {
        request["processing_timeout"] = json!(timeout);
    }
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
    let answer = RTCSessionDescription::answer(body["sdp"].as_str().unwrap().to_owned()).unwrap();
    peer.set_remote_description(answer).await.unwrap();

    let (messages_tx, mut messages_rx) = mpsc::unbounded_channel::<Bytes>();
    let reader_channel = inference.clone();
    tokio::spawn(async move {
        while let Ok(Some(event)) =
            tokio::time::timeout(Duration::from_secs(60), reader_channel.poll()).await
        {
            match event {
                DataChannelEvent::OnMessage(message)
                    if messages_tx.send(Bytes::copy_from_slice(&message.data)).is_err() =>
                {
                    return;
                }
                DataChannelEvent::OnClose => return,
                _ => {}
            }
        }
    });

    let mut results = Results::default();
    let overall = tokio::time::Instant::now() + options.complete_wait;
    let mut complete_deadline: Option<tokio::time::Instant> = None;
    loop {
        let until = complete_deadline.unwrap_or(overall).min(overall);
        let message = match tokio::time::timeout_at(until, messages_rx.recv()).await {
            Ok(Some(message)) => message,
            Ok(None) | Err(_) => break,
        };
        let Some(result) = results.take(&message) else { continue };
        if result["processing_complete"] == json!(true) {
            run.completions.push(result);
            // A little longer, to catch a second one.
            complete_deadline.get_or_insert(tokio::time::Instant::now() + Duration::from_millis(500));
            continue;
        }
        let frame_id = result["video_metadata"]["frame_id"].as_u64().unwrap();
        run.results.push(result);
        if options.ack {
            bounded("ack", inference.send_text(&json!({"ack": frame_id}).to_string())).await.unwrap();
        }
        if options.close_after_results.is_some_and(|n| run.results.len() >= n) {
            break;
        }
    }
    run.returned_frames = *returned.lock().unwrap();
    let _ = bounded("close", peer.close()).await;
    run
}

fn client_run(worker: &TestWorker, options: ClientOptions) -> ClientRun {
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
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
        "worker: {:?} start {:?} opened {}, read {}, no pts {}, processed {}, lost {}, dropped {}, \
         waiting {}, stopped {}, errors {:?}",
        report.pull_kind,
        report.pull_start,
        report.pull_opened,
        report.pull_frames_read,
        report.pull_frames_without_pts,
        report.pull_frames_processed,
        report.pull_results_lost_before_channel,
        report.pull_frames_dropped_realtime,
        report.pull_frames_waiting_at_end,
        report.pull_source_stopped,
        report.pull_errors,
    );
    report
}

/// The camera frame index each result's colour encodes.
fn indices(run: &ClientRun) -> Vec<u64> {
    run.results
        .iter()
        .map(|result| {
            let rgb = rgb_color(result).unwrap_or_else(|| panic!("no rgb_color in {result}"));
            index_of(rgb).unwrap_or_else(|| panic!("colour {rgb:?} is no frame's"))
        })
        .collect()
}

fn frame_ids(run: &ClientRun) -> Vec<u64> {
    run.results.iter().map(|r| r["video_metadata"]["frame_id"].as_u64().unwrap()).collect()
}

fn assert_increasing(values: &[u64], what: &str) {
    assert!(values.windows(2).all(|pair| pair[0] < pair[1]), "{what} not increasing: {values:?}");
}

fn pull_config() -> WorkerConfig {
    WorkerConfig {
        mjpeg_allow_non_global_addresses: true,
        // Short: the tests need no FFmpeg-like probe unless they say so.
        rtsp_open_time: Duration::from_millis(300),
        ..WorkerConfig::default()
    }
}

/// The closed port of a socket bound and dropped at once.
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[test]
fn rtsp_realtime_data_only_processes_the_camera_then_completes() {
    let frames = 45;
    let camera = RtspCamera::start(frames, 15, WIDTH, HEIGHT);
    let worker = TestWorker::start(pull_config());
    let run = client_run(&worker, ClientOptions::new("rtsp_url", camera.url()));
    let report = session_report(&worker);
    assert_eq!(run.status, 200);
    assert_eq!(report.pull_kind.as_deref(), Some("rtsp"));
    assert_eq!(report.pull_url, Some(camera.url()));
    assert_eq!(report.pull_start.as_deref(), Some("data_only"));
    assert!(report.pull_opened);
    assert!(!run.results.is_empty(), "no results");
    // Frame 0 has no pts in FFmpeg: the server skips it.
    assert_eq!(report.pull_frames_without_pts, 1);
    assert_eq!(report.pull_frames_read, frames - 1);
    let seen = indices(&run);
    assert_increasing(&seen, "camera frame indices");
    assert!(seen[0] >= 1, "frame 0 was processed: {seen:?}");
    assert_eq!(*seen.last().unwrap(), u64::from(frames) - 1, "the last frame's result");
    let ids = frame_ids(&run);
    assert_increasing(&ids, "frame ids");
    assert_eq!(ids[0], u64::from(report.pull_results_lost_before_channel) + 1);
    assert_eq!(
        run.results.len() as u32
            + report.pull_results_lost_before_channel
            + report.pull_frames_dropped_realtime,
        report.pull_frames_read
    );
    // pts: 90 kHz since camera frame 1.
    for result in &run.results {
        let metadata = &result["video_metadata"];
        assert_eq!(metadata["time_base"].as_f64().unwrap(), 1.0 / 90_000.0);
        let index = index_of(rgb_color(result).unwrap()).unwrap();
        let expected = (index - 1) * 6000;
        let pts = metadata["pts"].as_u64().unwrap();
        assert!(pts.abs_diff(expected) <= 90, "frame {index}: pts {pts}, expected {expected}");
    }
    assert_eq!(run.completions.len(), 1, "{:?}", run.completions);
    let complete = &run.completions[0];
    assert_eq!(complete["termination_reason"], Value::Null);
    assert_eq!(complete["video_metadata"]["frame_id"], json!(report.pull_frames_processed));
    assert!(report.pull_source_stopped);
    assert_eq!(camera.clients(), 1);
}

#[test]
fn rtsp_realtime_with_a_returned_track_starts_when_connected() {
    let camera = RtspCamera::start(30, 15, WIDTH, HEIGHT);
    let worker = TestWorker::start(pull_config());
    let mut options = ClientOptions::new("rtsp_url", camera.url());
    options.stream_output = Value::Null;
    options.receive_video = true;
    let run = client_run(&worker, options);
    let report = session_report(&worker);
    assert_eq!(run.status, 200);
    assert_eq!(report.pull_start.as_deref(), Some("on_connected"));
    assert!(report.track_codec.is_some(), "no returned track");
    assert!(!run.results.is_empty(), "no results");
    assert!(run.returned_frames > 0, "no RTP on the returned track");
    // Frames processed before the results channel opened go out on the
    // track too (their results do not).
    assert_eq!(report.track_frames_sent, run.results.len() as u32 + report.pull_results_lost_before_channel);
    assert_increasing(&indices(&run), "camera frame indices");
    assert_eq!(run.completions.len(), 1);
    assert_eq!(run.completions[0]["termination_reason"], Value::Null);
}

#[test]
fn rtsp_returned_track_without_a_video_section_processes_nothing() {
    let camera = RtspCamera::start(15, 15, WIDTH, HEIGHT);
    let worker = TestWorker::start(pull_config());
    let mut options = ClientOptions::new("rtsp_url", camera.url());
    options.stream_output = Value::Null;
    options.complete_wait = Duration::from_secs(3);
    let run = client_run(&worker, options);
    let report = session_report(&worker);
    assert_eq!(run.status, 200);
    assert_eq!(report.pull_start.as_deref(), Some("never"));
    assert!(run.results.is_empty() && run.completions.is_empty());
    assert_eq!(report.pull_frames_processed, 0);
    assert!(report.pull_source_stopped, "the source outlived the session");
}

#[test]
fn rtsp_without_realtime_processing_processes_nothing() {
    let camera = RtspCamera::start(45, 15, WIDTH, HEIGHT);
    // The reader fails at its first frame, after FFmpeg's probe: by then
    // the client's `inference` channel is open.
    let worker = TestWorker::start(WorkerConfig {
        rtsp_open_time: WorkerConfig::default().rtsp_open_time,
        ..pull_config()
    });
    let mut options = ClientOptions::new("rtsp_url", camera.url());
    options.realtime = false;
    let run = client_run(&worker, options);
    let report = session_report(&worker);
    assert_eq!(run.status, 200);
    assert!(run.results.is_empty(), "{:?}", run.results);
    assert_eq!(run.completions.len(), 1);
    assert_eq!(run.completions[0]["termination_reason"], Value::Null);
    assert_eq!(run.completions[0]["video_metadata"]["frame_id"], json!(0));
    assert!(report.pull_opened, "the reader reached the camera");
    assert_eq!(report.pull_frames_processed, 0);
    assert_eq!(camera.clients(), 1);
}

#[test]
fn rtsp_without_realtime_processing_unreachable_says_nothing_at_all() {
    // The reader fails before `inference` opens, so the server has nowhere
    // to send processing_complete: the client hears nothing (checked
    // against the real server).
    let worker = TestWorker::start(pull_config());
    let mut options = ClientOptions::new("rtsp_url", format!("rtsp://127.0.0.1:{}/cam", closed_port()));
    options.realtime = false;
    options.complete_wait = Duration::from_secs(3);
    let run = client_run(&worker, options);
    let report = session_report(&worker);
    assert_eq!(run.status, 200);
    assert!(run.results.is_empty() && run.completions.is_empty(), "{run:?}");
    assert!(!report.pull_opened);
}

#[test]
fn rtsp_unreachable_realtime_fails_before_the_answer() {
    let worker = TestWorker::start(pull_config());
    let url = format!("rtsp://127.0.0.1:{}/cam", closed_port());
    let run = client_run(&worker, ClientOptions::new("rtsp_url", url));
    assert_eq!(run.status, 500);
    assert_eq!(run.error_body, json!({"message": "Internal error."}));
    assert!(worker.sessions().is_empty());
    assert_eq!(worker.requests()[0].status, 500);
}

#[test]
fn rtsp_wrong_path_realtime_fails_before_the_answer() {
    let camera = RtspCamera::start(15, 15, WIDTH, HEIGHT);
    let worker = TestWorker::start(pull_config());
    let url = camera.url().replace("/cam", "/nothing-here");
    let run = client_run(&worker, ClientOptions::new("rtsp_url", url));
    assert_eq!(run.status, 500);
    assert_eq!(run.error_body, json!({"message": "Internal error."}));
}

#[test]
fn mjpeg_on_loopback_is_refused_by_default() {
    let camera = MjpegCamera::start(10, 15, WIDTH, HEIGHT);
    let worker = TestWorker::start(WorkerConfig::default());
    for url in [camera.url(), camera.url().replace("127.0.0.1", "localhost")] {
        let run = client_run(&worker, ClientOptions::new("mjpeg_url", url.clone()));
        assert_eq!(run.status, 500, "{url}");
        assert_eq!(run.error_body, json!({"message": "Internal error."}));
    }
    assert_eq!(camera.requests(), 0, "the worker reached the camera");
}

#[test]
fn mjpeg_unreachable_or_404_fails_before_the_answer() {
    let camera = MjpegCamera::start(10, 15, WIDTH, HEIGHT);
    let worker = TestWorker::start(pull_config());
    let closed = format!("http://127.0.0.1:{}/stream.mjpg", closed_port());
    let missing = camera.url().replace("/stream.mjpg", "/other.mjpg");
    for url in [closed, missing] {
        let run = client_run(&worker, ClientOptions::new("mjpeg_url", url.clone()));
        assert_eq!(run.status, 500, "{url}");
        assert_eq!(run.error_body, json!({"message": "Internal error."}));
    }
}

#[test]
fn mjpeg_without_realtime_processing_delivers_every_frame_with_acks() {
    let frames = 30;
    let camera = MjpegCamera::start(frames, 20, WIDTH, HEIGHT);
    let worker = TestWorker::start(pull_config());
    let mut options = ClientOptions::new("mjpeg_url", camera.url());
    options.realtime = false;
    options.ack = true;
    let run = client_run(&worker, options);
    let report = session_report(&worker);
    assert_eq!(run.status, 200);
    assert_eq!(report.pull_kind.as_deref(), Some("mjpeg"));
    assert_eq!(report.pull_frames_read, frames);
    assert_eq!(report.pull_frames_dropped_realtime, 0);
    assert_eq!(report.pull_frames_processed, frames);
    // The frames processed before `inference` opened have no result; the
    // others all arrive, in order.
    let lost = report.pull_results_lost_before_channel as u64;
    assert_eq!(run.results.len() as u64 + lost, u64::from(frames));
    assert_eq!(indices(&run), (lost..u64::from(frames)).collect::<Vec<_>>());
    assert_eq!(frame_ids(&run), (lost + 1..=u64::from(frames)).collect::<Vec<_>>());
    // FFmpeg's mpjpeg demuxer: the picture's index, in 1/25 s.
    for result in &run.results {
        let metadata = &result["video_metadata"];
        assert_eq!(metadata["time_base"].as_f64().unwrap(), 1.0 / 25.0);
        assert_eq!(metadata["pts"].as_u64().unwrap() + 1, metadata["frame_id"].as_u64().unwrap());
    }
    assert!(!report.acks.is_empty(), "no acks reached the worker");
    assert_eq!(run.completions.len(), 1);
    assert_eq!(run.completions[0]["termination_reason"], Value::Null);
    assert_eq!(camera.requests(), 1);
}

#[test]
fn client_closing_mid_stream_stops_the_source() {
    let camera = RtspCamera::start(300, 15, WIDTH, HEIGHT);
    let worker = TestWorker::start(pull_config());
    let mut options = ClientOptions::new("rtsp_url", camera.url());
    options.close_after_results = Some(5);
    let closed_at = Instant::now();
    let run = client_run(&worker, options);
    assert_eq!(run.results.len(), 5);
    let sessions = worker.wait_until(Duration::from_secs(10), |sessions| {
        sessions.len() == 1 && sessions[0].closed && sessions[0].pull_source_stopped
    });
    let report = &sessions[0];
    assert!(report.pull_source_stopped, "the source still runs");
    assert!(run.completions.is_empty());
    // The camera stops being read long before its 20 s are over.
    let pushed = camera.frames_pushed();
    std::thread::sleep(Duration::from_millis(500));
    assert!(camera.frames_pushed() <= pushed + 1, "the camera is still read");
    assert!(closed_at.elapsed() < Duration::from_secs(15));
}

#[test]
fn processing_timeout_completes_with_timeout_reached_and_closes() {
    let camera = RtspCamera::start(150, 15, WIDTH, HEIGHT);
    let worker = TestWorker::start(pull_config());
    let mut options = ClientOptions::new("rtsp_url", camera.url());
    options.processing_timeout = Some(3);
    options.complete_wait = Duration::from_secs(8);
    let run = client_run(&worker, options);
    let report = session_report(&worker);
    assert!(!run.results.is_empty());
    assert_eq!(run.completions.len(), 1);
    assert_eq!(run.completions[0]["termination_reason"], json!("timeout_reached"));
    assert!(report.pull_source_stopped);
}
