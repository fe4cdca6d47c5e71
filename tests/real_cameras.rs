// Cameras the real Roboflow Inference Server 1.8.3 reads itself (PROTOCOL.md
// §11), through roboflowresultsrc's source-url, with loopback test cameras.
//
// #[ignore]d in a plain `cargo test`: scripts/test.sh starts the servers and
// runs them with --ignored, one at a time. ROBOFLOW_TEST_SERVER keeps the
// server's default policy (MJPEG on loopback refused);
// ROBOFLOW_TEST_SERVER_MJPEG runs with WEBRTC_MJPEG_ALLOW_NON_GLOBAL_ADDRESSES.

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::cameras::{MjpegCamera, RtspCamera, result_indices, result_summary, stat};
use common::harness::*;
use gst::prelude::*;

const LIMIT: Duration = Duration::from_secs(240);
const WIDTH: u32 = 320;
const HEIGHT: u32 = 240;
const PASSWORD: &str = "real-pa55-secret";

fn server(variable: &str) -> String {
    std::env::var(variable).unwrap_or_else(|_| {
        panic!("{variable} is not set: scripts/test.sh starts the servers and sets it (see its header)")
    })
}

fn workflow(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/workflows").join(name)
}

/// Where the returned video goes: an application's appsink, or a video sink
/// that syncs to the clock and accepts GstVideoMeta (as a display does).
#[derive(Clone, Copy, Debug)]
enum Tail {
    AppSink,
    VideoSink,
}

impl Tail {
    fn launch_line(self) -> &'static str {
        match self {
            Tail::AppSink => "videoconvert ! video/x-raw,format=RGB ! appsink name=out sync=false",
            Tail::VideoSink => "fakevideosink name=out",
        }
    }
}

/// roboflowresultsrc on `url` with the blur + dominant colour Workflow:
/// `rgb_color` tells which camera frame the server processed.
fn camera_pipeline(api_url: &str, url: &str, extra: &str) -> gst::Pipeline {
    camera_pipeline_into(api_url, url, extra, Tail::AppSink)
}

/// [`camera_pipeline`] into `tail`.
fn camera_pipeline_into(api_url: &str, url: &str, extra: &str, tail: Tail) -> gst::Pipeline {
    launch(&format!(
        "roboflowresultsrc name=src source-url=\"{url}\" api-url={api_url} api-key=offline-test-key \
         connect-timeout=120000 stall-timeout=60000 workflow-spec-file={} data-output=rgb_color stream-output=blurred {extra} \
         ! {}",
        workflow("blur-dominant-color.json").display(),
        tail.launch_line()
    ))
}

/// (pts, has its result) of each buffer out of the source.
type Frames = Arc<Mutex<Vec<(Option<gst::ClockTime>, bool)>>>;

fn collect(pipeline: &gst::Pipeline) -> Frames {
    let frames: Frames = Arc::default();
    let record = frames.clone();
    let out = pipeline.by_name("out").unwrap();
    let Ok(appsink) = out.clone().downcast::<gst_app::AppSink>() else {
        // Any other sink: each buffer as it reaches the sink's pad.
        out.static_pad("sink").unwrap().add_probe(gst::PadProbeType::BUFFER, move |_, info| {
            if let Some(buffer) = info.buffer() {
                let paired = gst::meta::CustomMeta::from_buffer(buffer, gstroboflow::META_NAME).is_ok();
                record.lock().unwrap().push((buffer.pts(), paired));
            }
            gst::PadProbeReturn::Ok
        });
        return frames;
    };
    appsink.set_callbacks(
        gst_app::AppSinkCallbacks::builder()
            .new_sample(move |sink| {
                let sample = sink.pull_sample().map_err(|_| gst::FlowError::Eos)?;
                let buffer = sample.buffer().unwrap();
                let paired = gst::meta::CustomMeta::from_buffer(buffer, gstroboflow::META_NAME).is_ok();
                record.lock().unwrap().push((buffer.pts(), paired));
                Ok(gst::FlowSuccess::Ok)
            })
            .build(),
    );
    frames
}




/// Runs `pipeline` and returns the outcome and the time from the camera's
/// last frame to the EOS.
fn run_camera(pipeline: &gst::Pipeline, camera_ended: impl Fn() -> Option<Instant>) -> (Outcome, Option<Duration>) {
    let mut eos_at = None;
    let outcome = run_with(pipeline, LIMIT, |_, message| {
        if let gst::MessageView::Eos(_) = message.view() {
            eos_at = Some(Instant::now());
        }
        false
    });
    let after_end = match (camera_ended(), eos_at) {
        (Some(ended), Some(eos)) => Some(eos.saturating_duration_since(ended)),
        _ => None,
    };
    (outcome, after_end)
}

/// The goal: 300 frames at 15 fps, at least 99 % of the frames after
/// the first result, EOS within 5 s of the stream's end; every result in
/// order, the server's processed frames all accounted for.
fn rtsp_camera(transport: &str, tail: Tail) {
    init();
    let frames = 300u64;
    let camera = RtspCamera::start(frames as u32, 15, WIDTH, HEIGHT);
    let url = camera.url_with_credentials("admin", PASSWORD);
    let pipeline = camera_pipeline_into(&server("ROBOFLOW_TEST_SERVER"), &url, &format!("video-transport={transport}"), tail);
    let received = collect(&pipeline);
    let (outcome, after_end) = run_camera(&pipeline, || camera.finished_at());
    assert!(outcome.eos, "EOS when the camera's stream ends: {:?}", outcome.error);

    let indices = result_indices(&outcome);
    assert!(indices.windows(2).all(|w| w[0] < w[1]), "camera frames in order, each once: {indices:?}");
    let first = *indices.first().expect("results");
    let after_first = frames - first;
    let share = indices.len() as f64 / after_first as f64;
    let summary = result_summary(&outcome);
    eprintln!(
        "{transport} into {tail:?}: {} results of {frames} frames; first result: frame {first} ({} processed before the results channel opened); \
         {:.1} % of the frames after it; EOS {after_end:?} after the camera's last frame; {summary}",
        indices.len(),
        stat(&summary, "results-missed"),
        share * 100.0
    );
    // Issue #10's goal: 99 % of the frames from the first result on. The
    // server keeps at most 30 camera frames queued and drops the oldest;
    // while the session connected in 0.5 s (an early ICE check dropped),
    // up to 7 went right after the first result. Connected in about 50 ms,
    // none does (here 99.6-99.7 %); the steady state is checked apart.
    let steady_from = first + 15;
    let steady = indices.iter().filter(|index| **index >= steady_from).count() as f64 / (frames - steady_from) as f64;
    assert!(share >= 0.99, "{} of the {after_first} frames from the first result on: {indices:?}", indices.len());
    assert!(steady >= 0.99, "{:.1} % of the frames from {steady_from} on: {indices:?}", steady * 100.0);
    let after_end = after_end.expect("the camera finished and EOS came");
    assert!(after_end < Duration::from_secs(5), "EOS {after_end:?} after the camera's last frame");

    let received = received.lock().unwrap();
    assert!(received.iter().all(|(pts, _)| pts.is_some()), "every frame out has a PTS");
    // Frames processed before the results channel opened may come back
    // (returned track) without a result; every other carries its own.
    let unpaired = received.iter().filter(|(_, paired)| !paired).count() as u64;
    assert!(unpaired <= stat(&summary, "results-missed") + 1, "{unpaired} frames without their result: {summary}");
    assert!(received.windows(2).all(|w| w[0].0 < w[1].0), "PTS increase");
    assert!(received.len() + 3 >= indices.len(), "the returned video: {} frames for {} results", received.len(), indices.len());
    for message in &outcome.messages {
        assert!(!message.to_string().contains(PASSWORD), "a message shows the camera's password: {message}");
    }
}

#[test]
#[ignore = "needs the real server: scripts/test.sh"]
fn rtsp_camera_realtime_returns_nearly_every_frame_and_ends_with_the_stream() {
    rtsp_camera("datachannel", Tail::AppSink);
}

#[test]
#[ignore = "needs the real server: scripts/test.sh"]
fn rtsp_camera_over_a_returned_track() {
    rtsp_camera("track", Tail::AppSink);
}

/// A video sink that syncs holds the frame source's thread frame by frame
/// while the server, draining the camera's start-up backlog in realtime
/// mode, runs ahead. Before the frame source took the waiting results with
/// the waiting packets, this lost the pairing of nearly every frame (838 of
/// 898 unpaired in the camera benchmark with fakevideosink).
#[test]
#[ignore = "needs the real server: scripts/test.sh"]
fn rtsp_camera_over_a_returned_track_into_a_syncing_video_sink() {
    rtsp_camera("track", Tail::VideoSink);
}

#[test]
#[ignore = "needs the real server: scripts/test.sh"]
fn an_unreachable_rtsp_camera_is_an_error_naming_it_within_60_s() {
    init();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("rtsp://admin:{PASSWORD}@127.0.0.1:{closed}/cam");
    let started = Instant::now();
    let outcome = run(&camera_pipeline(&server("ROBOFLOW_TEST_SERVER"), &url, ""), LIMIT);
    let took = started.elapsed();
    let error = outcome.error.expect("an ERROR, not a silent end");
    eprintln!("after {took:?}: {error}");
    assert!(took < Duration::from_secs(60), "{took:?}");
    assert!(error.contains(&format!("rtsp://127.0.0.1:{closed}/cam")), "{error}");
    assert!(!error.contains(PASSWORD), "{error}");
}

#[test]
#[ignore = "needs the real server: scripts/test.sh"]
fn mjpeg_on_loopback_is_refused_by_the_servers_default_and_the_error_says_so() {
    init();
    let camera = MjpegCamera::start(30, 15, WIDTH, HEIGHT);
    let outcome = run(&camera_pipeline(&server("ROBOFLOW_TEST_SERVER"), &camera.url(), ""), LIMIT);
    let error = outcome.error.expect("an error");
    eprintln!("{error}");
    assert!(error.contains(&camera.url()), "{error}");
    assert!(error.contains("WEBRTC_MJPEG_ALLOW_NON_GLOBAL_ADDRESSES=True"), "{error}");
    assert_eq!(camera.frames_sent(), 0, "the server refused before reading");
}

#[test]
#[ignore = "needs the real server: scripts/test.sh"]
fn mjpeg_camera_without_realtime_processes_every_frame() {
    init();
    let frames = 90u64;
    let camera = MjpegCamera::start(frames as u32, 15, WIDTH, HEIGHT);
    let pipeline = camera_pipeline(&server("ROBOFLOW_TEST_SERVER_MJPEG"), &camera.url(), "realtime-processing=false");
    let received = collect(&pipeline);
    let outcome = run(&pipeline, LIMIT);
    assert!(outcome.eos, "{:?}", outcome.error);
    let indices = result_indices(&outcome);
    let summary = result_summary(&outcome);
    let missed = stat(&summary, "results-missed");
    eprintln!("{} results, {missed} missed at the start; {summary}", indices.len());
    assert_eq!(indices, (missed..frames).collect::<Vec<_>>(), "every frame after those processed before the channel opened");
    assert!(stat(&summary, "acks-sent") > 0);
    let received = received.lock().unwrap();
    let paired = received.iter().filter(|(_, paired)| *paired).count();
    assert_eq!(paired, indices.len(), "a returned frame for every result: {summary}");
    assert!(received.len() as u64 <= indices.len() as u64 + missed, "and at most the missed frames without one");
}

#[test]
#[ignore = "needs the real server: scripts/test.sh"]
fn camera_null_mid_stream_returns_within_a_second() {
    init();
    let camera = RtspCamera::start(600, 15, WIDTH, HEIGHT);
    let pipeline = camera_pipeline(&server("ROBOFLOW_TEST_SERVER"), &camera.url(), "");
    let mut results = 0;
    let mut stopped_at = None;
    let outcome = run_with(&pipeline, LIMIT, |_, message| {
        if let gst::MessageView::Element(element) = message.view()
            && element.structure().is_some_and(|s| s.name() == "roboflow-inference")
        {
            results += 1;
        }
        if results >= 10 && stopped_at.is_none() {
            stopped_at = Some(Instant::now());
        }
        results >= 10
    });
    let to_null = stopped_at.expect("10 results").elapsed();
    assert!(outcome.error.is_none(), "{:?}", outcome.error);
    assert!(to_null < Duration::from_secs(1), "NULL took {to_null:?}");
}
