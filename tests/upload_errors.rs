// One failure, one ERROR: once the sink has posted an ERROR it reports
// nothing else for that job. Upstream reacts to the refused data (filesrc
// posts its own "Internal data stream error" and pushes EOS), and the sink
// must not answer that EOS with a second, misleading ERROR such as "the input
// is empty" or "upstream ended early". Also: with a roboflowresultsrc taking
// the results, the sink's job (and its EOS) ends with the upload.

mod common;

use std::time::{Duration, Instant};

use common::harness::*;
use common::worker::{Fault, TestWorker, WorkerConfig};
use gst::prelude::*;

fn streamed_upload(input: &std::path::Path, worker: &TestWorker, extra: &str) -> gst::Pipeline {
    launch(&format!(
        "filesrc location={} ! roboflowuploadsink name=sink {} {extra}",
        input.display(),
        sink_properties(&worker.url())
    ))
}

#[test]
fn an_http_500_is_the_only_error() {
    init();
    let worker = TestWorker::start(WorkerConfig::default().with_fault(Fault::HttpError {
        status: 500,
        content_type: "application/json",
        body: r#"{"message":"worker pool exhausted","error_type":"ServiceUnavailable"}"#.into(),
    }));
    let dir = tempfile::tempdir().unwrap();
    let clip = make_clip(&dir.path().join("clip.mp4"), 5, 160, 120);
    let pipeline = streamed_upload(&clip, &worker, "");
    let (errors, first_is_sink) = sink_errors(&pipeline, "sink");
    assert!(first_is_sink, "the sink's error comes first");
    assert_eq!(errors.len(), 1, "one failure, one ERROR: {errors:#?}");
    assert!(errors[0].contains("500") && errors[0].contains("worker pool exhausted"), "{}", errors[0]);
}

#[test]
fn an_upload_closed_mid_way_is_the_only_error() {
    init();
    let worker = TestWorker::start(WorkerConfig {
        upload_read_delay: Some(Duration::from_millis(50)),
        ..WorkerConfig::default().with_fault(Fault::CloseUploadAfterChunks(3))
    });
    let dir = tempfile::tempdir().unwrap();
    // 86 chunks: the server closes the channel long before the end.
    let input = random_file(&dir.path().join("random.bin"), 86 * 49152);
    let pipeline = streamed_upload(&input, &worker, "buffer-limit=65536");
    let (errors, first_is_sink) = sink_errors(&pipeline, "sink");
    assert!(first_is_sink, "the sink's error comes first");
    assert_eq!(errors.len(), 1, "one failure, one ERROR: {errors:#?}");
    assert!(errors[0].contains("video_upload"), "{}", errors[0]);
}

#[test]
fn a_stalled_upload_is_the_only_error() {
    init();
    let worker = TestWorker::start(WorkerConfig {
        upload_read_delay: Some(Duration::from_secs(3)),
        ..Default::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let input = random_file(&dir.path().join("random.bin"), 40 * 49152);
    // The later stall-timeout wins over sink_properties' one.
    let pipeline = streamed_upload(&input, &worker, "buffer-limit=65536 stall-timeout=1000");
    let (errors, first_is_sink) = sink_errors(&pipeline, "sink");
    assert!(first_is_sink, "the sink's error comes first");
    assert_eq!(errors.len(), 1, "one failure, one ERROR: {errors:#?}");
    assert!(errors[0].contains("made no progress"), "{}", errors[0]);
}

#[test]
fn with_a_result_source_the_sink_ends_with_the_upload() {
    init();
    // processing_complete never comes: a sink that waited for the results
    // would never post EOS.
    let worker = TestWorker::start(WorkerConfig::default().with_fault(Fault::NeverComplete));
    let dir = tempfile::tempdir().unwrap();
    let clip = make_clip(&dir.path().join("clip.mp4"), 5, 160, 120);
    let source = launch("roboflowresultsrc session=early ! fakesink");
    source.set_state(gst::State::Playing).unwrap();
    let upload = launch(&format!(
        "filesrc location={} ! roboflowuploadsink session=early {}",
        clip.display(),
        sink_properties(&worker.url())
    ));
    let outcome = run(&upload, Duration::from_secs(30));
    assert!(outcome.eos, "the upload pipeline ends with its upload: {outcome:?}");
    assert!(outcome.named("roboflow-inference").is_empty(), "the source reports the results");
    assert!(
        outcome.named("roboflow-upload-progress").iter().any(|s| s.get::<bool>("final").unwrap()),
        "the upload completed"
    );

    // The sink, now in NULL, left the session open for the source.
    let bus = source.bus().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut frames = 0;
    while frames < 5 && Instant::now() < deadline {
        let Some(message) = bus.timed_pop(gst::ClockTime::from_mseconds(100)) else { continue };
        if let gst::MessageView::Error(err) = message.view() {
            panic!("the source failed: {} ({:?})", err.error(), err.debug());
        }
        if message.structure().is_some_and(|s| s.name() == "roboflow-inference") {
            frames += 1;
        }
    }
    assert_eq!(frames, 5, "the source reports every frame");
    source.set_state(gst::State::Null).unwrap();
}
