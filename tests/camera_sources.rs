// Cameras the server reads (PROTOCOL.md §11) against the test worker:
// roboflowresultsrc with source-url runs a session of its own; the URL
// reaches the server whole and is shown nowhere with its credentials; every
// frame the server processed is accounted for (a result, or missed before
// the results channel opened); EOS at the end of the camera's stream; errors
// that name the camera; NULL stops the server's reading.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::cameras::{MjpegCamera, RtspCamera, result_indices, result_summary, stat};
use common::harness::*;
use common::live::index_of;
use common::worker::{SessionReport, TestWorker, WorkerConfig};
use gst::prelude::*;

const LIMIT: Duration = Duration::from_secs(60);
const WIDTH: u32 = 160;
const HEIGHT: u32 = 120;
const PASSWORD: &str = "pa55-w0rd-secret";

/// The worker as the server, but opening RTSP in 300 ms instead of FFmpeg's
/// 2 s of probing, so that short test streams are not over meanwhile.
fn worker(edit: impl FnOnce(&mut WorkerConfig)) -> TestWorker {
    let mut config = WorkerConfig { rtsp_open_time: Duration::from_millis(300), ..WorkerConfig::default() };
    edit(&mut config);
    TestWorker::start(config)
}

/// roboflowresultsrc on `url` through `worker`, its video into an appsink.
fn camera_pipeline(worker: &TestWorker, url: &str, extra: &str) -> gst::Pipeline {
    launch(&format!(
        "roboflowresultsrc name=src source-url=\"{url}\" {} data-output=rgb_color stream-output=image {extra} \
         ! videoconvert ! video/x-raw,format=RGB ! appsink name=out sync=false",
        sink_properties(&worker.url())
    ))
}

/// (pts, frame-id of the meta, index the picture's colour tells) per buffer.
type Frames = Arc<Mutex<Vec<(Option<gst::ClockTime>, Option<u64>, Option<u64>)>>>;

fn collect(pipeline: &gst::Pipeline) -> Frames {
    let frames: Frames = Arc::default();
    let record = frames.clone();
    let appsink = pipeline.by_name("out").unwrap().downcast::<gst_app::AppSink>().unwrap();
    appsink.set_callbacks(
        gst_app::AppSinkCallbacks::builder()
            .new_sample(move |sink| {
                let sample = sink.pull_sample().map_err(|_| gst::FlowError::Eos)?;
                let buffer = sample.buffer().unwrap();
                let frame_id = gst::meta::CustomMeta::from_buffer(buffer, gstroboflow::META_NAME)
                    .ok()
                    .and_then(|meta| meta.structure().get::<u64>("frame-id").ok());
                let map = buffer.map_readable().unwrap();
                let pixels = map.len() / 3;
                let mut sum = [0f64; 3];
                for pixel in map.chunks_exact(3) {
                    for k in 0..3 {
                        sum[k] += f64::from(pixel[k]);
                    }
                }
                let mean = sum.map(|s| s / pixels as f64);
                record.lock().unwrap().push((buffer.pts(), frame_id, index_of(mean)));
                Ok(gst::FlowSuccess::Ok)
            })
            .build(),
    );
    frames
}

fn only_session(worker: &TestWorker) -> SessionReport {
    let sessions = worker.wait_until(Duration::from_secs(5), |sessions| sessions.first().is_some_and(|s| s.closed));
    assert_eq!(sessions.len(), 1, "one session");
    sessions.into_iter().next().unwrap()
}




/// Every frame the worker processed is a result or counted as missed; the
/// results are the camera's frames in order, each once.
fn check_accounted(outcome: &Outcome, report: &SessionReport) -> Vec<u64> {
    let results = outcome.named("roboflow-inference").len() as u64;
    let summary = result_summary(outcome);
    assert_eq!(stat(&summary, "frames-received"), results);
    assert_eq!(
        results + stat(&summary, "results-missed"),
        u64::from(report.pull_frames_processed),
        "every frame the server processed: a result, or missed before the channel opened ({summary})"
    );
    assert_eq!(stat(&summary, "results-missed"), u64::from(report.pull_results_lost_before_channel));
    let indices = result_indices(outcome);
    assert!(indices.windows(2).all(|w| w[0] < w[1]), "camera frames in order, each once: {indices:?}");
    let ids: Vec<u64> = outcome.named("roboflow-inference").iter().map(|m| m.get::<u64>("frame-id").unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[1] == w[0] + 1), "frame ids without gaps after the first: {ids:?}");
    indices
}

/// An RTSP camera of `frames` frames at 30 fps read by `worker` for
/// roboflowresultsrc (`extra` properties): the run, which must end in EOS,
/// the worker's one session and the frames that came out.
fn rtsp_session(worker: &TestWorker, frames: u32, extra: &str) -> (Outcome, SessionReport, Frames) {
    let camera = RtspCamera::start(frames, 30, WIDTH, HEIGHT);
    let pipeline = camera_pipeline(worker, &camera.url(), extra);
    let received = collect(&pipeline);
    let outcome = run(&pipeline, LIMIT);
    assert!(outcome.eos, "EOS at the end of the camera's stream: {:?}", outcome.error);
    let report = only_session(worker);
    assert_eq!(report.request["rtsp_url"], camera.url());
    (outcome, report, received)
}

#[test]
fn rtsp_camera_returns_its_frames_with_results_and_ends_with_the_stream() {
    init();
    let worker = worker(|_| {});
    let frames = 90;
    let (outcome, report, received) = rtsp_session(&worker, frames, "video-transport=datachannel");

    assert!(report.request.get("mjpeg_url").is_none());
    assert!(report.request.get("video_file_upload").is_none_or(|v| v == false), "nothing is uploaded");
    assert_eq!(report.request["webrtc_realtime_processing"], true, "realtime by default for a camera");
    assert!(report.channels.iter().all(|c| c != "video_upload"), "no upload channel: {:?}", report.channels);
    assert!(report.processing_complete_sent);

    let indices = check_accounted(&outcome, &report);
    assert!(indices.len() as u32 >= frames / 2, "most of the camera's {frames} frames: {indices:?}");
    let received = received.lock().unwrap();
    assert_eq!(received.len(), indices.len(), "a buffer per result");
    for ((pts, frame_id, index), expected) in received.iter().zip(&indices) {
        assert!(frame_id.is_some(), "every buffer carries its result");
        assert_eq!(*index, Some(*expected), "each buffer shows the frame its result describes");
        assert!(pts.is_some());
    }
    assert!(received.windows(2).all(|w| w[0].0 < w[1].0), "PTS increase");
}

#[test]
fn rtsp_camera_comes_back_over_a_track_by_default_and_pairs_every_frame_with_its_result() {
    init();
    let worker = worker(|_| {});
    let (outcome, report, received) = rtsp_session(&worker, 60, "");
    assert_eq!(report.request["stream_output"], serde_json::json!(["image"]));
    assert_eq!(report.pull_start.as_deref(), Some("on_connected"), "a recvonly transceiver: processing starts with the connection");
    assert!(report.track_codec.is_some(), "the worker returned a track");
    let indices = check_accounted(&outcome, &report);
    let received = received.lock().unwrap();
    let summary = result_summary(&outcome);
    // The frames processed before the results channel opened come back
    // without a result; every other frame carries its own.
    let missed = stat(&summary, "results-missed");
    assert!(missed > 0, "the worker processed frames before the channel opened: {summary}");
    assert_eq!(stat(&summary, "frames-paired"), indices.len() as u64, "{summary}");
    assert!(stat(&summary, "frames-unpaired") <= missed, "{summary}");
    let with_result: Vec<_> = received.iter().filter(|(_, frame_id, _)| frame_id.is_some()).collect();
    assert_eq!(with_result.len(), indices.len(), "a returned frame for every result");
    for ((_, _, index), expected) in with_result.iter().zip(&indices) {
        // The worker's track returns each picture inverted (its Workflow's
        // image output): colour code 124 - i.
        assert_eq!(*index, Some(124 - expected % 125), "each frame shows the camera frame its result describes");
    }
}

#[test]
fn camera_credentials_reach_the_server_and_nothing_else() {
    init();
    let worker = worker(|_| {});
    let camera = RtspCamera::start(60, 30, WIDTH, HEIGHT);
    let url = camera.url_with_credentials("admin", PASSWORD);
    let pipeline = camera_pipeline(&worker, &url, "");
    let source = pipeline.by_name("src").unwrap();
    let shown = source.property::<Option<String>>("source-url").unwrap();
    assert_eq!(shown, camera.url(), "read back without the credentials");
    let _frames = collect(&pipeline);
    let outcome = run(&pipeline, LIMIT);
    assert!(outcome.eos, "{:?}", outcome.error);
    let report = only_session(&worker);
    assert_eq!(report.request["rtsp_url"], url, "the server gets the URL whole");
    for message in &outcome.messages {
        assert!(!message.to_string().contains(PASSWORD), "a bus message shows the password: {message}");
    }

    // An error about that camera shows it without them too.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("rtsp://admin:{PASSWORD}@127.0.0.1:{closed}/cam");
    let outcome = run(&camera_pipeline(&worker, &url, ""), LIMIT);
    let error = outcome.error.expect("an error");
    assert!(error.contains(&format!("rtsp://127.0.0.1:{closed}/cam")), "{error}");
    assert!(!error.contains(PASSWORD), "{error}");
}

#[test]
fn an_rtsp_camera_the_server_cannot_open_is_an_error_naming_it() {
    init();
    let worker = worker(|_| {});
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("rtsp://127.0.0.1:{closed}/cam");
    let started = Instant::now();
    let outcome = run(&camera_pipeline(&worker, &url, ""), LIMIT);
    assert!(started.elapsed() < Duration::from_secs(30));
    let error = outcome.error.expect("an error, not a silent end");
    assert!(error.contains(&url) && error.contains("could not start a session on the RTSP camera"), "{error}");
    assert!(error.contains("HTTP 500"), "the server's answer: {error}");
    assert!(!outcome.eos);
    assert_eq!(worker.requests().len(), 1);
    assert_eq!(worker.requests()[0].status, 500);
}

#[test]
fn mjpeg_on_loopback_refused_by_the_servers_default_names_its_setting() {
    init();
    let worker = worker(|_| {});
    let camera = MjpegCamera::start(10, 30, WIDTH, HEIGHT);
    let outcome = run(&camera_pipeline(&worker, &camera.url(), ""), LIMIT);
    let error = outcome.error.expect("an error");
    assert!(error.contains(&camera.url()), "{error}");
    assert!(error.contains("WEBRTC_MJPEG_ALLOW_NON_GLOBAL_ADDRESSES=True"), "{error}");
}

#[test]
fn mjpeg_without_realtime_processes_every_frame_in_order() {
    init();
    let worker = worker(|config| config.mjpeg_allow_non_global_addresses = true);
    let frames = 40;
    let camera = MjpegCamera::start(frames, 30, WIDTH, HEIGHT);
    let pipeline = camera_pipeline(&worker, &camera.url(), "realtime-processing=false");
    let received = collect(&pipeline);
    let outcome = run(&pipeline, LIMIT);
    assert!(outcome.eos, "{:?}", outcome.error);
    let report = only_session(&worker);
    assert_eq!(report.request["mjpeg_url"], camera.url());
    assert_eq!(report.request["webrtc_realtime_processing"], false);
    let indices = check_accounted(&outcome, &report);
    let missed = stat(&result_summary(&outcome), "results-missed");
    assert_eq!(indices, (missed..u64::from(frames)).collect::<Vec<_>>(), "every frame after those missed at the start");
    assert_eq!(report.pull_frames_dropped_realtime, 0);
    assert!(stat(&result_summary(&outcome), "acks-sent") > 0, "acks pace the server");
    let received = received.lock().unwrap();
    let with_result = received.iter().filter(|(_, frame_id, _)| frame_id.is_some()).count();
    assert_eq!(with_result, indices.len(), "a returned frame for every result");
    assert!(received.len() as u64 <= indices.len() as u64 + missed, "and at most the missed frames without one");
    // MJPEG frames take the time they arrived (the server's pts counts
    // pictures at a nominal 25 fps): increasing, and the caps say nothing of
    // a frame rate they cannot know.
    assert!(received.windows(2).all(|w| w[0].0 < w[1].0));
}

#[test]
fn rtsp_without_realtime_is_refused_with_the_reason_before_any_request() {
    init();
    let worker = worker(|_| {});
    let outcome = run(&camera_pipeline(&worker, "rtsp://127.0.0.1:554/cam", "realtime-processing=false"), LIMIT);
    let error = outcome.error.expect("an error");
    assert!(error.contains("realtime-processing") && error.contains("no timestamp"), "{error}");
    assert!(worker.requests().is_empty(), "nothing was sent");
}

#[test]
fn source_url_and_session_exclude_each_other_and_one_is_needed() {
    init();
    let workflow = workflow_file();
    for (properties, expected) in [
        ("source-url=rtsp://127.0.0.1:554/cam session=a".to_owned(), "exclude each other"),
        (String::new(), "set 'source-url'"),
        ("session=b workflow-spec-file=/tmp/x.json".to_owned(), "apply only with source-url (workflow-spec-file)"),
        (format!("source-url=ftp://127.0.0.1/cam workflow-spec-file={}", workflow.display()), "not a camera the server reads"),
    ] {
        let pipeline = launch(&format!("roboflowresultsrc {properties} ! fakesink"));
        let outcome = run(&pipeline, Duration::from_secs(10));
        let error = outcome.error.unwrap_or_else(|| panic!("{properties}: no error"));
        assert!(error.contains(expected), "{properties}: {error}");
    }
}

#[test]
fn null_mid_stream_returns_at_once_and_the_server_stops_reading() {
    init();
    let worker = worker(|_| {});
    let camera = RtspCamera::start(600, 30, WIDTH, HEIGHT);
    let pipeline = camera_pipeline(&worker, &camera.url(), "");
    let mut results = 0;
    let mut stopped_at = None;
    let outcome = run_with(&pipeline, LIMIT, |_, message| {
        if let gst::MessageView::Element(element) = message.view()
            && element.structure().is_some_and(|s| s.name() == "roboflow-inference")
        {
            results += 1;
        }
        if results >= 5 {
            stopped_at = Some(Instant::now());
        }
        results >= 5
    });
    // run_with set the pipeline to NULL when it stopped.
    let to_null = stopped_at.expect("5 results").elapsed();
    assert!(to_null < Duration::from_secs(1), "NULL took {to_null:?}");
    assert!(outcome.error.is_none(), "{:?}", outcome.error);
    assert_eq!(results, 5);
    let sessions = worker.wait_until(Duration::from_secs(10), |sessions| sessions.first().is_some_and(|s| s.pull_source_stopped));
    let report = &sessions[0];
    assert!(report.closed, "the worker saw the session close");
    assert!(report.pull_source_stopped, "the server stopped reading the camera");
    assert!(camera.frames_pushed() < 600, "the camera was not read to its end");
}

/// Runs the two RTSP tests above in a child process of this test binary
/// with `env`, and returns its output (stdout and GStreamer's debug log).
fn rerun_rtsp_tests(env: &[(&str, &str)]) -> String {
    let mut command = std::process::Command::new(std::env::current_exe().unwrap());
    command
        .args(["--test-threads=1", "--exact"])
        .args([
            "rtsp_camera_returns_its_frames_with_results_and_ends_with_the_stream",
            "rtsp_camera_comes_back_over_a_track_by_default_and_pairs_every_frame_with_its_result",
        ])
        .env("GST_DEBUG", "roboflowsession:5")
        .env("GST_DEBUG_NO_COLOR", "1");
    for (name, value) in env {
        command.env(name, value);
    }
    let output = command.output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "the RTSP tests failed with {env:?}:\n{}", &text[text.len().saturating_sub(4000)..]);
    assert!(text.contains("2 passed"), "both tests ran with {env:?}:\n{}", &text[text.len().saturating_sub(2000)..]);
    text
}

#[test]
fn camera_sessions_run_on_our_own_loop_and_on_webrtc_rs_s_driver_when_asked() {
    // Our own loop around the rtc core by default (own_loop.rs)...
    let own = rerun_rtsp_tests(&[]);
    assert_eq!(own.matches("connection loop ended").count(), 2, "one own loop per session, each ended");
    // ...and webrtc-rs's async driver with GST_ROBOFLOW_WEBRTC_DRIVER set.
    let webrtc = rerun_rtsp_tests(&[("GST_ROBOFLOW_WEBRTC_DRIVER", "1")]);
    assert!(!webrtc.contains("own_loop.rs"), "no own loop with GST_ROBOFLOW_WEBRTC_DRIVER");
    assert_eq!(webrtc.matches("peer connection connected").count(), 2, "webrtc-rs's driver connected both sessions");
}

#[test]
fn a_packet_of_the_returned_camera_track_lost_for_good_brings_a_keyframe_request() {
    init();
    // Packet 20 and its retransmissions are lost, and the worker's encoder
    // makes no keyframe of its own within the stream: only a PLI from the
    // client repairs the picture.
    let worker = worker(|config| {
        config.track_lose_packets = vec![20];
        config.track_lose_retransmissions = true;
        config.track_keyframe_interval = 1000;
    });
    let (outcome, report, received) = rtsp_session(&worker, 60, "");
    let summary = result_summary(&outcome);
    assert!(report.track_keyframe_requests >= 1, "the worker got a keyframe request: {summary}");
    assert!(stat(&summary, "keyframe-requests") >= 1, "{summary}");
    assert!(stat(&summary, "track-packets-lost") >= 1, "{summary}");
    // Frames after the keyframe came back decoded, with their results.
    let received = received.lock().unwrap();
    let last = check_accounted(&outcome, &report).last().copied().unwrap();
    assert!(
        received.iter().any(|(_, frame_id, _)| *frame_id == Some(last)),
        "the last result's frame was shown after the repair: {summary}"
    );
}
