// roboflowresultsrc in datachannel transport: every frame comes back, in
// order, with monotonic PTS and its result as a RoboflowInferenceMeta;
// flow control never drops and keeps the queue bounded.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::harness::*;
use common::worker::{Fault, TestWorker, WorkerConfig};
use gst::prelude::*;

/// What reached the appsink: (pts, frame-id from the meta, json present).
#[derive(Default, Debug)]
struct Received {
    frames: Vec<(Option<gst::ClockTime>, Option<u64>, bool)>,
    caps: Option<gst::Caps>,
}

fn collect(appsink: &gst_app::AppSink, delay: Duration) -> Arc<Mutex<Received>> {
    let received = Arc::new(Mutex::new(Received::default()));
    let sink_received = received.clone();
    appsink.set_callbacks(
        gst_app::AppSinkCallbacks::builder()
            .new_sample(move |sink| {
                let sample = sink.pull_sample().map_err(|_| gst::FlowError::Eos)?;
                let buffer = sample.buffer().unwrap();
                let meta = gst::meta::CustomMeta::from_buffer(buffer, gstroboflow::META_NAME).ok();
                let frame_id = meta.as_ref().and_then(|m| m.structure().get::<u64>("frame-id").ok());
                let has_json = meta
                    .as_ref()
                    .and_then(|m| m.structure().get::<String>("json").ok())
                    .is_some_and(|json| json.contains("video_metadata"));
                let mut received = sink_received.lock().unwrap();
                received.frames.push((buffer.pts(), frame_id, has_json));
                if received.caps.is_none() {
                    received.caps = sample.caps().map(|c| c.to_owned());
                }
                drop(received);
                if !delay.is_zero() {
                    std::thread::sleep(delay);
                }
                Ok(gst::FlowSuccess::Ok)
            })
            .build(),
    );
    received
}

fn upload_description(clip: &std::path::Path, worker: &TestWorker, session: &str, extra: &str) -> String {
    format!(
        "filesrc location={} ! roboflowuploadsink name=upload session={session} stream-output=image {} {extra}",
        clip.display(),
        sink_properties(&worker.url())
    )
}

fn appsink(pipeline: &gst::Pipeline) -> gst_app::AppSink {
    pipeline.by_name("out").unwrap().downcast::<gst_app::AppSink>().unwrap()
}

fn assert_every_frame(received: &Received, frames: usize) {
    assert_eq!(received.frames.len(), frames, "every frame is delivered");
    for (index, (pts, frame_id, has_json)) in received.frames.iter().enumerate() {
        assert_eq!(*frame_id, Some(index as u64 + 1), "frame {index} carries its own result");
        assert!(has_json, "frame {index} has the JSON meta");
        assert!(pts.is_some());
    }
    let pts: Vec<_> = received.frames.iter().map(|f| f.0.unwrap()).collect();
    assert!(pts.windows(2).all(|w| w[0] < w[1]), "PTS increase: {pts:?}");
    let caps = received.caps.as_ref().unwrap();
    let structure = caps.structure(0).unwrap();
    assert_eq!(structure.name(), "video/x-raw");
    assert_eq!(structure.get::<i32>("width").unwrap(), 160);
    assert_eq!(structure.get::<gst::Fraction>("framerate").unwrap(), gst::Fraction::new(30, 1));
}

#[test]
fn one_pipeline_returns_every_frame_in_order_with_its_meta() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let clip = make_clip(&dir.path().join("clip.mp4"), 40, 160, 120);
    let worker = TestWorker::start(WorkerConfig::default());
    let pipeline = launch(&format!(
        "{}  roboflowresultsrc name=results session=one ! videoconvert ! appsink name=out sync=false",
        upload_description(&clip, &worker, "one", "")
    ));
    let received = collect(&appsink(&pipeline), Duration::ZERO);
    let mut sources = Vec::new();
    let results = pipeline.by_name("results").unwrap();
    let mut stats = None;
    let outcome = run_with(&pipeline, Duration::from_secs(60), |_, message| {
        if let gst::MessageView::Element(element) = message.view()
            && element.structure().is_some_and(|s| s.name() == "roboflow-inference")
        {
            sources.push(message.src().map(|s| s.name().to_string()).unwrap_or_default());
        }
        if let gst::MessageView::Eos(_) = message.view() {
            stats = Some(results.property::<gst::Structure>("stats"));
        }
        false
    });
    assert!(outcome.eos, "no EOS: {:?}", outcome.error);
    assert_every_frame(&received.lock().unwrap(), 40);
    assert_eq!(outcome.named("roboflow-inference").len(), 40);
    assert!(sources.iter().all(|s| s == "results"), "only the result source posts: {sources:?}");
    let stats = stats.unwrap();
    assert_eq!(stats.get::<u64>("frames-received").unwrap(), 40);
    assert_eq!(stats.get::<u64>("frames-pushed").unwrap(), 40);
    assert_eq!(stats.get::<u64>("frames-paired").unwrap(), 40);
    assert_eq!(stats.get::<u64>("frames-unpaired").unwrap(), 0);
    assert_eq!(stats.get::<u64>("frames-dropped").unwrap(), 0);
    let summary = outcome.named("roboflow-result-summary");
    assert_eq!(summary.len(), 1, "one summary at EOS");
    assert_eq!(summary[0].get::<u64>("frames-pushed").unwrap(), 40);
    assert_eq!(summary[0].get::<u64>("frames-unpaired").unwrap(), 0);
    let report = &worker.wait_for_sessions(1, Duration::from_secs(5))[0];
    assert_eq!(report.request["stream_output"], serde_json::json!([]), "datachannel transport asks for no track");
    assert_eq!(report.request["data_output"], serde_json::json!(["image"]));
    assert!(report.acks.windows(2).all(|w| w[0] < w[1]), "acks are cumulative and in order: {:?}", report.acks);
    assert!(!report.acks.is_empty());
}

#[test]
fn two_pipelines_source_started_first() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let clip = make_clip(&dir.path().join("clip.mp4"), 25, 160, 120);
    let worker = TestWorker::start(WorkerConfig::default());
    let source = launch("roboflowresultsrc session=two ! videoconvert ! appsink name=out sync=false");
    let received = collect(&appsink(&source), Duration::ZERO);
    let source_thread = {
        let source = source.clone();
        std::thread::spawn(move || run(&source, Duration::from_secs(60)))
    };
    // The source waits for the sink's session to appear.
    std::thread::sleep(Duration::from_millis(300));
    let upload = launch(&upload_description(&clip, &worker, "two", ""));
    let upload_outcome = run(&upload, Duration::from_secs(60));
    assert!(upload_outcome.eos, "upload: {:?}", upload_outcome.error);
    assert!(upload_outcome.named("roboflow-inference").is_empty(), "the sink stays silent once a source is attached");
    let source_outcome = source_thread.join().unwrap();
    assert!(source_outcome.eos, "source: {:?}", source_outcome.error);
    assert_every_frame(&received.lock().unwrap(), 25);
    assert_eq!(source_outcome.named("roboflow-inference").len(), 25);
}

#[test]
fn slow_consumer_gets_every_frame_with_a_bounded_queue() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let clip = make_clip(&dir.path().join("clip.mp4"), 30, 160, 120);
    let worker = TestWorker::start(WorkerConfig::default());
    let pipeline = launch(&format!(
        "{}  roboflowresultsrc name=results session=slow max-queued-frames=3 ! videoconvert ! appsink name=out sync=false max-buffers=1",
        upload_description(&clip, &worker, "slow", "")
    ));
    let received = collect(&appsink(&pipeline), Duration::from_millis(40));
    let (outcome, stats) = run_with_stats_at_eos(&pipeline, Duration::from_secs(90), "results");
    assert!(outcome.eos, "no EOS: {:?}", outcome.error);
    assert_every_frame(&received.lock().unwrap(), 30);
    let stats = stats.unwrap();
    let depth = stats.get::<u64>("max-queue-depth").unwrap();
    assert!(depth <= 3, "queue depth {depth} exceeds max-queued-frames");
    assert!(depth >= 2, "the slow consumer did fill the queue (depth {depth})");
    assert_eq!(stats.get::<u64>("frames-dropped").unwrap(), 0);
    let report = &worker.wait_for_sessions(1, Duration::from_secs(5))[0];
    assert!(report.acks.windows(2).all(|w| w[0] < w[1]), "acks are cumulative: {:?}", report.acks);
    // Acks run max-queued-frames (3) ahead of the frames the queue took: at
    // least frame 1 + 3, never past the last frame + 3. The server closes
    // the session right after processing_complete, so the acks of the last
    // frames may arrive after it stopped listening.
    assert!(!report.acks.is_empty() && report.acks.iter().all(|&ack| (4..=33).contains(&ack)), "{:?}", report.acks);
    assert!(stats.get::<u64>("acks-sent").unwrap() >= 1);
}

#[test]
fn realtime_processing_sends_no_acks() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let clip = make_clip(&dir.path().join("clip.mp4"), 20, 160, 120);
    let worker = TestWorker::start(WorkerConfig::default());
    let pipeline = launch(&format!(
        "{}  roboflowresultsrc session=rt ! videoconvert ! appsink name=out sync=false",
        upload_description(&clip, &worker, "rt", "realtime-processing=true")
    ));
    let received = collect(&appsink(&pipeline), Duration::ZERO);
    let outcome = run(&pipeline, Duration::from_secs(60));
    assert!(outcome.eos, "no EOS: {:?}", outcome.error);
    let report = &worker.wait_for_sessions(1, Duration::from_secs(5))[0];
    assert_eq!(report.request["webrtc_realtime_processing"], true);
    assert!(report.acks.is_empty(), "realtime mode acks nothing: {:?}", report.acks);
    assert!(!received.lock().unwrap().frames.is_empty());
}

#[test]
fn zero_frames_is_an_error() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let clip = make_clip(&dir.path().join("clip.mp4"), 5, 160, 120);
    let worker = TestWorker::start(WorkerConfig { faults: vec![Fault::DecodeNothing], ..Default::default() });
    let pipeline = launch(&format!(
        "{}  roboflowresultsrc session=zero ! videoconvert ! appsink name=out sync=false",
        upload_description(&clip, &worker, "zero", "")
    ));
    let outcome = run(&pipeline, Duration::from_secs(60));
    assert!(outcome.error_text().contains("decoded no frames"), "{outcome:?}");
}

#[test]
fn no_stream_output_posts_messages_and_ends_without_buffers() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let clip = make_clip(&dir.path().join("clip.mp4"), 12, 160, 120);
    let worker = TestWorker::start(WorkerConfig::default());
    let pipeline = launch(&format!(
        "filesrc location={} ! roboflowuploadsink session=data {}  roboflowresultsrc session=data ! appsink name=out sync=false",
        clip.display(),
        sink_properties(&worker.url())
    ));
    let received = collect(&appsink(&pipeline), Duration::ZERO);
    let outcome = run(&pipeline, Duration::from_secs(60));
    assert!(outcome.eos, "no EOS: {:?}", outcome.error);
    assert!(received.lock().unwrap().frames.is_empty());
    assert_eq!(outcome.named("roboflow-inference").len(), 12);
}

#[test]
fn a_session_that_never_starts_is_named_in_the_error() {
    init();
    let pipeline = launch("roboflowresultsrc session=nobody connect-timeout=300 ! appsink name=out sync=false");
    let outcome = run(&pipeline, Duration::from_secs(10));
    let text = outcome.error_text();
    assert!(text.contains("'nobody'"), "{text}");
    assert!(text.contains("connect-timeout"), "{text}");
}

#[test]
fn null_while_frames_flow_returns_within_a_second() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let clip = make_clip(&dir.path().join("clip.mp4"), 60, 160, 120);
    let worker = TestWorker::start(WorkerConfig::default());
    let pipeline = launch(&format!(
        "{}  roboflowresultsrc session=stop ! videoconvert ! appsink name=out sync=false",
        upload_description(&clip, &worker, "stop", "")
    ));
    let received = collect(&appsink(&pipeline), Duration::from_millis(50));
    pipeline.set_state(gst::State::Playing).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while received.lock().unwrap().frames.len() < 5 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(received.lock().unwrap().frames.len() >= 5, "frames are flowing");
    let started = Instant::now();
    pipeline.set_state(gst::State::Null).unwrap();
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(1), "NULL took {elapsed:?}");
}

#[test]
fn a_source_that_claimed_the_session_gets_the_results_and_the_sink_does_not_wait_for_them() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let clip = make_clip(&dir.path().join("clip.mp4"), 10, 160, 120);
    let worker = TestWorker::start(WorkerConfig::default());
    // In READY it claims the session's results, but it does not run yet.
    let idle = launch("roboflowresultsrc session=claimed ! fakesink");
    idle.set_state(gst::State::Ready).unwrap();
    let upload = launch(&format!(
        "filesrc location={} ! roboflowuploadsink session=claimed {}",
        clip.display(),
        sink_properties(&worker.url())
    ));
    let outcome = run(&upload, Duration::from_secs(60));
    assert!(outcome.eos, "the sink ends after its upload: {:?}", outcome.error);
    assert!(outcome.named("roboflow-inference").is_empty(), "the results are the source's, not the sink's");
    // The upload pipeline is gone; the source still holds the session, and
    // letting go of it closes the session on the server.
    assert!(!worker.sessions()[0].closed, "the claimed results keep the session open");
    idle.set_state(gst::State::Null).unwrap();
    let sessions = worker.wait_until(Duration::from_secs(5), |sessions| sessions.first().is_some_and(|s| s.closed));
    assert!(sessions[0].closed, "the session closes when its result source lets go");
}

#[test]
fn a_second_source_for_the_same_session_is_refused_by_name() {
    init();
    let first = launch("roboflowresultsrc session=twice ! fakesink");
    first.set_state(gst::State::Ready).unwrap();
    let second = launch("roboflowresultsrc session=twice ! fakesink");
    let outcome = run(&second, Duration::from_secs(10));
    first.set_state(gst::State::Null).unwrap();
    assert!(outcome.error_text().contains("another roboflowresultsrc already reads the results of session 'twice'"), "{outcome:?}");
}
