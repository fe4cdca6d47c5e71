// Live video in (PROTOCOL.md §10) against the test worker: caps decide the
// mode, every frame's result pairs with its own buffer, the window of frames
// in flight blocks (lossless) or drops (realtime), EOS drains, NULL ends it.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::harness::*;
use common::live::{check_pairing, paint_frames};
use common::worker::{SessionReport, TestWorker, WorkerConfig};
use gst::prelude::*;

const LIMIT: Duration = Duration::from_secs(60);

fn raw_source(frames: u64, live: bool) -> String {
    format!(
        "videotestsrc name=src is-live={live} num-buffers={frames} \
         ! video/x-raw,format=RGB,width=160,height=120,framerate=30/1"
    )
}

fn live_sink(worker: &TestWorker, extra: &str) -> String {
    format!("roboflowuploadsink name=sink {} data-output=rgb_color {extra}", sink_properties(&worker.url()))
}

/// Runs `pipeline`, keeping the sink's stats at EOS; checks every result's
/// pairing against the painted frames.
fn run_live(pipeline: &gst::Pipeline) -> (Outcome, gst::Structure, Vec<u64>) {
    let painted = paint_frames(&pipeline.by_name("src").unwrap());
    let (outcome, stats) = run_with_stats_at_eos(pipeline, LIMIT, "sink");
    assert!(outcome.eos, "no EOS: {:?}", outcome.error);
    let indices = check_pairing(&outcome, &painted);
    (outcome, stats.expect("stats at EOS"), indices)
}

fn only_session(worker: &TestWorker) -> SessionReport {
    let sessions = worker.wait_for_sessions(1, Duration::from_secs(5));
    assert_eq!(sessions.len(), 1);
    sessions.into_iter().next().unwrap()
}

fn stat(stats: &gst::Structure, name: &str) -> u64 {
    stats.get::<u64>(name).unwrap_or_else(|_| panic!("no {name} in {stats}"))
}

#[test]
fn lossless_every_frame_pairs_with_its_own_result() {
    init();
    let worker = TestWorker::start(WorkerConfig::default());
    let frames = 300;
    let pipeline = launch(&format!("{} ! {}", raw_source(frames, false), live_sink(&worker, "")));
    let (outcome, stats, indices) = run_live(&pipeline);
    assert_eq!(indices, (0..frames).collect::<Vec<_>>(), "every frame's result, in order");
    assert!(outcome.named("roboflow-inference").iter().all(|m| m.get::<u64>("frames-skipped").unwrap() == 0));
    assert_eq!(stats.get::<&str>("upload-mode").unwrap(), "live");
    assert_eq!(stats.get::<&str>("phase").unwrap(), "complete");
    assert_eq!((stat(&stats, "frames-sent"), stat(&stats, "frames-dropped"), stat(&stats, "frames-in-flight")), (frames, 0, 0));
    let report = only_session(&worker);
    assert_eq!(report.request["video_file_upload"], serde_json::Value::Null, "no file upload: {}", report.request);
    assert_eq!(report.request["stream_output"], serde_json::json!([]));
    assert_eq!(report.request["declared_fps"], serde_json::json!(30.0));
    assert_eq!(report.request["webrtc_realtime_processing"], false);
    assert!(report.channels.iter().all(|c| c != "video_upload"), "{:?}", report.channels);
    assert_eq!(report.live_track_codec.as_deref(), Some("video/VP8"));
    assert_eq!(report.live_offer_direction.as_deref(), Some("sendrecv"));
    assert_eq!(report.live_frames_processed as u64, frames);
    assert!(report.live_bye_received, "the track ends with an RTCP BYE");
    assert!(report.processing_complete_sent);
    assert!(report.live_decode_errors.is_empty(), "{:?}", report.live_decode_errors);
}

#[test]
fn raw_video_in_h264_and_pre_encoded_vp8_and_h264() {
    init();
    for (encode, extra, codec) in [
        ("", "video-codec=h264", "video/H264"),
        ("! vp8enc deadline=1 lag-in-frames=0 keyframe-max-dist=30 target-bitrate=2000000", "", "video/VP8"),
        // The sink's caps steer x264enc to constrained baseline.
        ("! x264enc tune=zerolatency speed-preset=ultrafast key-int-max=30 bitrate=2000", "", "video/H264"),
    ] {
        let worker = TestWorker::start(WorkerConfig::default());
        let frames = 40;
        let pipeline = launch(&format!("{} ! videoconvert {encode} ! {}", raw_source(frames, false), live_sink(&worker, extra)));
        let (_, stats, indices) = run_live(&pipeline);
        assert_eq!(indices, (0..frames).collect::<Vec<_>>(), "{codec} {encode}");
        assert_eq!(stat(&stats, "frames-sent"), frames);
        let report = only_session(&worker);
        assert_eq!(report.live_track_codec.as_deref(), Some(codec), "{encode}");
        assert!(report.live_decode_errors.is_empty(), "{encode}: {:?}", report.live_decode_errors);
    }
}

#[test]
fn a_high_profile_h264_is_refused_at_caps_time() {
    init();
    let worker = TestWorker::start(WorkerConfig::default());
    let pipeline = launch(&format!(
        "{} ! videoconvert ! x264enc ! video/x-h264,profile=high ! {}",
        raw_source(10, false),
        live_sink(&worker, "")
    ));
    let outcome = run(&pipeline, LIMIT);
    let error = outcome.error.expect("an error");
    assert!(error.contains("profile 'high'") && error.contains("constrained-baseline or baseline"), "{error}");
    assert!(worker.sessions().is_empty(), "no session for caps the server cannot take");
}

#[test]
fn elementary_video_the_server_cannot_take_is_refused_naming_the_way_out() {
    init();
    let worker = TestWorker::start(WorkerConfig::default());
    let pipeline = launch(&format!("{} ! jpegenc ! {}", raw_source(5, false), live_sink(&worker, "")));
    let error = run(&pipeline, LIMIT).error.expect("an error");
    assert!(error.contains("image/jpeg cannot be sent") && error.contains("decode"), "{error}");
}

#[test]
fn a_slow_worker_blocks_upstream_and_the_window_holds() {
    init();
    let worker = TestWorker::start(WorkerConfig { live_process_delay: Duration::from_millis(40), ..Default::default() });
    let frames = 40;
    let pipeline = launch(&format!("{} ! {}", raw_source(frames, false), live_sink(&worker, "max-frames-in-flight=3")));
    let sink = sink_of(&pipeline, "sink");
    let most = Arc::new(Mutex::new(0u64));
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let watcher = {
        let most = most.clone();
        let sink = sink.clone();
        std::thread::spawn(move || {
            while stop_rx.recv_timeout(Duration::from_millis(5)).is_err() {
                let stats = sink.property::<gst::Structure>("stats");
                if let Ok(in_flight) = stats.get::<u64>("frames-in-flight") {
                    let mut most = most.lock().unwrap();
                    *most = (*most).max(in_flight);
                }
            }
        })
    };
    let (_, stats, indices) = run_live(&pipeline);
    stop_tx.send(()).unwrap();
    watcher.join().unwrap();
    assert_eq!(indices, (0..frames).collect::<Vec<_>>(), "lossless at the worker's pace");
    assert_eq!(stat(&stats, "frames-dropped"), 0);
    let most = *most.lock().unwrap();
    assert_eq!(most, 3, "the window fills and never overflows");
}

#[test]
fn realtime_drops_before_encoding_and_counts_every_frame() {
    init();
    let worker = TestWorker::start(WorkerConfig { live_process_delay: Duration::from_millis(100), ..Default::default() });
    let frames = 60;
    let pipeline = launch(&format!("{} ! {}", raw_source(frames, true), live_sink(&worker, "realtime-processing=true")));
    let (outcome, stats, indices) = run_live(&pipeline);
    let (sent, dropped, skipped) = (stat(&stats, "frames-sent"), stat(&stats, "frames-dropped"), stat(&stats, "frames-skipped"));
    assert_eq!(sent + dropped, frames, "{stats}");
    assert!(dropped > 0, "a 100 ms Workflow cannot take 30 fps: {stats}");
    assert_eq!(indices.len() as u64 + skipped + stat(&stats, "frames-in-flight"), sent, "{stats}");
    assert!(indices.windows(2).all(|w| w[0] < w[1]), "{indices:?}");
    let summary = outcome.named("roboflow-upload-summary");
    assert_eq!(summary.len(), 1, "one summary before EOS");
    assert_eq!(stat(summary[0], "frames-dropped"), dropped, "the summary counts the drops");
    let report = only_session(&worker);
    assert_eq!(report.request["webrtc_realtime_processing"], true);
    assert_eq!(report.live_frames_processed as usize, outcome.named("roboflow-inference").len());
}

#[test]
fn a_lost_first_frame_does_not_shift_any_result() {
    init();
    let worker = TestWorker::start(WorkerConfig { live_lose_first_frame: true, ..Default::default() });
    let frames = 90;
    let pipeline = launch(&format!("{} ! {}", raw_source(frames, false), live_sink(&worker, "")));
    let (_, stats, indices) = run_live(&pipeline);
    // Frames before the next keyframe cannot be decoded; every result that
    // comes is its own frame's (check_pairing), none shifted.
    assert!(!indices.is_empty() && indices[0] > 0, "{indices:?}");
    assert_eq!(*indices.last().unwrap(), frames - 1);
    assert_eq!(stat(&stats, "results-unpaired"), 0, "{stats}");
    // The worker's keyframe request (PLI) gets a keyframe at once, and a
    // frame past the full window: no wait for the periodic keyframe, no stall.
    assert!(stat(&stats, "keyframe-requests") >= 1, "{stats}");
    assert!(indices[0] < 10, "decoding resumed at frame {}", indices[0]);
    assert_eq!(indices.len() as u64 + stat(&stats, "frames-skipped"), frames, "{stats}");
}

#[test]
fn null_mid_stream_returns_within_a_second_and_leaves_nothing_running() {
    init();
    let baseline = gstroboflow::live_tasks();
    let worker = TestWorker::start(WorkerConfig { live_process_delay: Duration::from_millis(20), ..Default::default() });
    let pipeline = launch(&format!("{} ! {}", raw_source(100_000, true), live_sink(&worker, "")));
    let bus = pipeline.bus().unwrap();
    pipeline.set_state(gst::State::Playing).unwrap();
    let deadline = Instant::now() + LIMIT;
    let mut results = 0;
    while results < 10 && Instant::now() < deadline {
        let Some(message) = bus.timed_pop(gst::ClockTime::from_mseconds(100)) else { continue };
        match message.view() {
            gst::MessageView::Error(err) => panic!("{}", err.error()),
            gst::MessageView::Element(m) if m.structure().is_some_and(|s| s.name() == "roboflow-inference") => results += 1,
            _ => {}
        }
    }
    assert_eq!(results, 10, "results while frames flow");
    let started = Instant::now();
    pipeline.set_state(gst::State::Null).unwrap();
    assert!(started.elapsed() < Duration::from_secs(1), "NULL took {:?}", started.elapsed());
    let deadline = Instant::now() + Duration::from_secs(5);
    while gstroboflow::live_tasks() > baseline && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(gstroboflow::live_tasks() <= baseline, "{} tasks alive, {baseline} before", gstroboflow::live_tasks());
    let report = worker.wait_until(Duration::from_secs(5), |sessions| sessions.first().is_some_and(|s| s.closed));
    assert!(report.first().is_some_and(|s| s.closed), "the worker saw the session close");
}

#[test]
fn eos_before_the_first_frame_is_an_error_that_says_so() {
    init();
    let worker = TestWorker::start(WorkerConfig::default());
    let pipeline = launch(&format!("{} ! {}", raw_source(0, false), live_sink(&worker, "")));
    let error = run(&pipeline, LIMIT).error.expect("an error");
    assert!(error.contains("before its first frame"), "{error}");
}

#[test]
fn a_resolution_change_mid_stream_renegotiates_the_encoder() {
    init();
    let worker = TestWorker::start(WorkerConfig::default());
    // Two streams one after the other, in two sizes, through one sink.
    let pipeline = launch(&format!(
        "concat name=c ! {} \
         videotestsrc num-buffers=20 ! video/x-raw,format=RGB,width=160,height=120,framerate=30/1 ! c. \
         videotestsrc num-buffers=20 ! video/x-raw,format=RGB,width=320,height=240,framerate=30/1 ! c.",
        live_sink(&worker, "")
    ));
    let outcome = run(&pipeline, LIMIT);
    assert!(outcome.eos, "{:?}", outcome.error);
    assert_eq!(outcome.named("roboflow-inference").len(), 40);
    let report = only_session(&worker);
    assert!(report.live_decode_errors.is_empty(), "{:?}", report.live_decode_errors);
}

#[test]
fn a_gap_in_timestamps_is_carried_through_to_the_results() {
    init();
    let worker = TestWorker::start(WorkerConfig::default());
    let frames = 30;
    let pipeline = launch(&format!("{} ! {}", raw_source(frames, false), live_sink(&worker, "")));
    // Frames from 15 on come 5 s later: a camera that stalled.
    let gap = gst::ClockTime::from_seconds(5);
    pipeline.by_name("src").unwrap().static_pad("src").unwrap().add_probe(gst::PadProbeType::BUFFER, move |_, info| {
        if let Some(buffer) = info.buffer_mut()
            && buffer.offset() >= 15
        {
            let buffer = buffer.make_mut();
            buffer.set_pts(buffer.pts().map(|pts| pts + gap));
        }
        gst::PadProbeReturn::Ok
    });
    let (outcome, _, indices) = run_live(&pipeline);
    assert_eq!(indices, (0..frames).collect::<Vec<_>>());
    let pts: Vec<u64> = outcome
        .named("roboflow-inference")
        .iter()
        .map(|m| m.get::<Option<gst::ClockTime>>("pts").unwrap().unwrap().nseconds())
        .collect();
    let step = pts[15] - pts[14];
    assert!(step.abs_diff(5_000_000_000 + 1_000_000_000 / 30) <= 1, "the gap is in the results' pts: {step} ns");
}

#[test]
fn realtime_eos_while_connecting_is_an_error_that_counts_the_frames() {
    init();
    let worker = TestWorker::start(WorkerConfig::default().with_fault(common::worker::Fault::DelayAnswer(Duration::from_secs(3))));
    let pipeline = launch(&format!("{} ! {}", raw_source(30, true), live_sink(&worker, "realtime-processing=true")));
    let error = run(&pipeline, LIMIT).error.expect("an error");
    assert!(error.contains("still connecting: its 30 frames were dropped"), "{error}");
}

/// roboflowresultsrc in a live session: every frame sent comes back, with
/// the PTS of the buffer it came from, as JPEG and through a returned track.
#[test]
fn live_frames_come_back_through_roboflowresultsrc_with_their_source_pts() {
    init();
    for transport in ["datachannel", "track"] {
        let worker = TestWorker::start(WorkerConfig::default());
        let frames = 30;
        let session = format!("live-back-{transport}");
        let pipeline = launch(&format!(
            "{} ! {} session={session} stream-output=image video-transport={transport} \
             roboflowresultsrc session={session} ! videoconvert ! appsink name=out sync=false",
            raw_source(frames, false),
            live_sink(&worker, "")
        ));
        let painted = paint_frames(&pipeline.by_name("src").unwrap());
        let out = pipeline.by_name("out").unwrap().downcast::<gst_app::AppSink>().unwrap();
        let returned: Arc<Mutex<Vec<Option<u64>>>> = Arc::default();
        let record = returned.clone();
        out.set_callbacks(
            gst_app::AppSinkCallbacks::builder()
                .new_sample(move |sink| {
                    let sample = sink.pull_sample().map_err(|_| gst::FlowError::Eos)?;
                    record.lock().unwrap().push(sample.buffer().unwrap().pts().map(|p| p.nseconds()));
                    Ok(gst::FlowSuccess::Ok)
                })
                .build(),
        );
        let outcome = run(&pipeline, LIMIT);
        assert!(outcome.eos, "{transport}: {:?}", outcome.error);
        let painted = painted.lock().unwrap();
        let mut expected: Vec<u64> = painted.keys().copied().collect();
        expected.sort_unstable();
        let returned: Vec<u64> = returned.lock().unwrap().iter().map(|pts| pts.expect("a pts")).collect();
        assert_eq!(returned, expected, "{transport}: every frame back, with its source PTS");
    }
}

#[test]
fn the_server_closing_mid_stream_is_one_error_naming_it() {
    init();
    let worker = TestWorker::start(WorkerConfig::default().with_fault(common::worker::Fault::DropPeerAfterFrames(10)));
    let pipeline = launch(&format!("{} ! {}", raw_source(100_000, true), live_sink(&worker, "")));
    let (errors, first_is_sink) = sink_errors(&pipeline, "sink");
    assert!(first_is_sink, "the sink's ERROR comes first: {errors:?}");
    assert_eq!(errors.len(), 1, "one ERROR: {errors:?}");
    assert!(errors[0].contains("after 10 results"), "{errors:?}");
}

/// A sink that syncs shows the returned live video: roboflowresultsrc
/// reports its latency, so frames whose result comes within it are on time.
#[test]
fn returned_live_frames_are_on_time_for_a_syncing_sink() {
    on_time_for_a_syncing_sink("datachannel");
}

/// The same through a returned track: its decoder works on the server's pts
/// until the result source restamps the frames, so the sink's QoS must not
/// reach it (vp8dec dropped all but two frames as late before).
#[test]
fn returned_live_track_frames_are_on_time_for_a_syncing_sink() {
    on_time_for_a_syncing_sink("track");
}

fn on_time_for_a_syncing_sink(transport: &str) {
    init();
    let rendered = |latency_ms: u32| -> (u64, u64) {
        let worker = TestWorker::start(WorkerConfig { live_process_delay: Duration::from_millis(50), ..Default::default() });
        let session = format!("on-time-{transport}-{latency_ms}");
        let pipeline = launch(&format!(
            "{} ! {} session={session} stream-output=image realtime-processing=true video-transport={transport} \
             roboflowresultsrc session={session} latency={latency_ms} ! videoconvert \
             ! fakesink name=out sync=true qos=true max-lateness=20000000",
            raw_source(90, true),
            live_sink(&worker, "")
        ));
        let out = sink_of(&pipeline, "out");
        let mut stats = None;
        let outcome = run_with(&pipeline, LIMIT, |_, message| {
            if let gst::MessageView::Eos(_) = message.view() {
                stats = Some(out.property::<gst::Structure>("stats"));
            }
            false
        });
        assert!(outcome.eos, "{:?}", outcome.error);
        let stats = stats.unwrap();
        (stats.get::<u64>("rendered").unwrap(), stats.get::<u64>("dropped").unwrap())
    };
    let (on_time, late) = rendered(300);
    assert!(on_time > 20, "{on_time} of 90 frames rendered (the worker takes 50 ms a frame, realtime: about half)");
    assert_eq!(late, 0, "every frame within 300 ms is rendered");
    let (_, late) = rendered(0);
    assert!(late > 0, "with no latency reported, frames 50 ms behind are late");
}

/// Pre-encoded VP8 whose keyframe went by while the session connected
/// (realtime drops): the sink drops delta frames and asks upstream for a
/// keyframe instead of sending what the server cannot decode.
#[test]
fn pre_encoded_video_starts_on_a_keyframe_after_realtime_drops() {
    init();
    let worker = TestWorker::start(WorkerConfig::default().with_fault(common::worker::Fault::DelayAnswer(Duration::from_secs(1))));
    let frames = 90;
    let pipeline = launch(&format!(
        // A bitrate that keeps solid colours within a level of their code
        // even when libvpx's realtime deadline cuts quality under load.
        "{} ! videoconvert ! vp8enc deadline=1 lag-in-frames=0 keyframe-max-dist=1000 target-bitrate=2000000 ! {}",
        raw_source(frames, true),
        live_sink(&worker, "realtime-processing=true")
    ));
    let (_, stats, indices) = run_live(&pipeline);
    assert!(indices.len() > 10, "{} results: {stats}", indices.len());
    let report = only_session(&worker);
    assert_eq!(report.live_frames_skipped, 0, "nothing sent that the server could not decode: {stats}");
    assert!(report.live_decode_errors.is_empty(), "{:?}", report.live_decode_errors);
    // A frame the busy worker replaced by a newer one (realtime, a loaded
    // machine) is the only frame sent without a result.
    assert_eq!(stat(&stats, "frames-skipped"), u64::from(report.live_frames_dropped_realtime), "{stats}");
    assert_eq!(report.live_plis_sent, 0, "the first frame sent was a keyframe");
}
