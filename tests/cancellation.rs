// A change to NULL returns promptly from any phase and leaves no spool file.

mod common;

use std::time::{Duration, Instant};

use common::harness::*;
use common::worker::{Fault, TestWorker, WorkerConfig};
use gst::prelude::*;

/// Plays until `ready` says so, then measures the change to NULL.
fn null_when(pipeline: &gst::Pipeline, ready: impl Fn(&gst::Message) -> bool) -> Duration {
    pipeline.set_state(gst::State::Playing).unwrap();
    let bus = pipeline.bus().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut reached = false;
    while Instant::now() < deadline {
        let Some(message) = bus.timed_pop(gst::ClockTime::from_mseconds(100)) else { continue };
        if let gst::MessageView::Error(err) = message.view() {
            panic!("unexpected error before NULL: {}", err.error());
        }
        if ready(&message) {
            reached = true;
            break;
        }
    }
    assert!(reached, "the pipeline never reached the phase to interrupt");
    let started = Instant::now();
    pipeline.set_state(gst::State::Null).unwrap();
    started.elapsed()
}

#[test]
fn null_mid_upload_returns_within_a_second_and_deletes_the_spool_file() {
    init();
    let spool = tempfile::tempdir().unwrap();
    let worker = TestWorker::start(WorkerConfig {
        upload_read_delay: Some(Duration::from_millis(200)),
        ..Default::default()
    });
    // The muxer makes this a spooled upload; 3 MB at 5 chunks/s takes ~13 s.
    let pipeline = launch(&format!(
        "videotestsrc num-buffers=60 pattern=snow ! video/x-raw,width=640,height=480,framerate=30/1 \
         ! x264enc speed-preset=ultrafast bitrate=20000 ! mp4mux \
         ! roboflowuploadsink name=sink buffer-limit=65536 spool-dir={} {}",
        spool.path().display(),
        sink_properties(&worker.url())
    ));
    let elapsed = null_when(&pipeline, |message| {
        message.structure().is_some_and(|s| {
            s.name() == "roboflow-upload-progress" && s.get::<u64>("uploaded-chunks").unwrap_or(0) >= 2
        })
    });
    assert!(elapsed < Duration::from_secs(1), "NULL took {elapsed:?}");
    assert!(files_in(spool.path()).is_empty(), "spool file left: {:?}", files_in(spool.path()));
}

#[test]
fn null_while_connecting_returns_within_a_second() {
    init();
    let worker = TestWorker::start(WorkerConfig {
        faults: vec![Fault::DelayAnswer(Duration::from_secs(20))],
        ..Default::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let clip = make_clip(&dir.path().join("clip.mp4"), 5, 160, 120);
    let pipeline = launch(&format!(
        "filesrc location={} ! roboflowuploadsink {}",
        clip.display(),
        sink_properties(&worker.url())
    ));
    let elapsed = null_when(&pipeline, |message| {
        matches!(message.view(), gst::MessageView::StateChanged(change)
            if change.src().is_some_and(|s| s.is::<gst::Pipeline>()) && change.current() == gst::State::Playing)
    });
    assert!(elapsed < Duration::from_secs(1), "NULL took {elapsed:?}");
}
