// Element behaviour with gst-check's Harness: validation before any network,
// an empty input refused, the key never readable.

mod common;

use common::harness::init;
use gst::glib;
use gst::prelude::*;

/// A configured sink. Its state changes are synchronous (it does not
/// preroll), as gst_harness_play() wants.
fn element_with(properties: &[(&str, &str)]) -> gst::Element {
    init();
    let element = gst::ElementFactory::make("roboflowuploadsink").build().unwrap();
    for (name, value) in properties {
        let pspec = element.find_property(name).unwrap();
        if pspec.value_type() == glib::Type::STRING {
            element.set_property(name, *value);
        } else {
            element.set_property_from_str(name, value);
        }
    }
    element
}

/// Starts the element alone and returns the first error it posts.
fn first_error(element: &gst::Element) -> Option<String> {
    let bus = gst::Bus::new();
    element.set_bus(Some(&bus));
    let _ = element.set_state(gst::State::Playing);
    let mut error = None;
    while let Some(message) = bus.timed_pop(gst::ClockTime::from_mseconds(500)) {
        if let gst::MessageView::Error(err) = message.view() {
            error = Some(err.error().to_string());
            break;
        }
    }
    element.set_state(gst::State::Null).unwrap();
    error
}

#[test]
fn missing_workflow_is_refused_naming_the_property() {
    let element = element_with(&[("api-url", "http://127.0.0.1:9")]);
    let error = first_error(&element).expect("start fails");
    assert!(error.contains("workflow-spec"), "{error}");
}

#[test]
fn malformed_values_are_refused_naming_the_property() {
    for (property, value, expected) in [
        ("workflow-parameters", "[1,2]", "workflow-parameters"),
        ("workflow-spec", "{not json", "workflow-spec"),
        ("ice-servers", "turn:turn.example.com:3478", "ice-servers"),
        ("udp-bind-address", "somewhere", "udp-bind-address"),
        ("spool-dir", "/nonexistent/roboflow", "spool-dir"),
    ] {
        let mut properties = vec![("api-url", "http://127.0.0.1:9"), (property, value)];
        if property != "workflow-spec" {
            properties.push(("workflow-spec", common::harness::WORKFLOW));
        }
        let element = element_with(&properties);
        let error = first_error(&element).expect("start fails");
        assert!(error.contains(expected), "{property}={value}: {error}");
    }
}

#[test]
fn empty_input_is_refused() {
    // Nothing listens on port 9: the session fails in the background, but the
    // empty input is reported first, as the user's own mistake.
    let element = element_with(&[
        ("api-url", "http://127.0.0.1:9"),
        ("workflow-spec", common::harness::WORKFLOW),
    ]);
    let bus = gst::Bus::new();
    element.set_bus(Some(&bus));
    let mut harness = gst_check::Harness::with_element(&element, Some("sink"), None);
    harness.set_src_caps_str("video/quicktime");
    assert!(!harness.push_event(gst::event::Eos::new()));
    let mut error = None;
    while let Some(message) = bus.timed_pop(gst::ClockTime::from_seconds(2)) {
        if let gst::MessageView::Error(err) = message.view() {
            error = Some(err.error().to_string());
            break;
        }
    }
    let error = error.expect("an error is posted");
    assert!(error.contains("input is empty"), "{error}");
}

#[test]
fn the_api_key_is_write_only() {
    init();
    let element = gst::ElementFactory::make("roboflowuploadsink").build().unwrap();
    let pspec = element.find_property("api-key").unwrap();
    assert!(!pspec.flags().contains(glib::ParamFlags::READABLE));
    assert!(pspec.flags().contains(glib::ParamFlags::WRITABLE));
}

#[test]
fn every_documented_property_exists() {
    init();
    let element = gst::ElementFactory::make("roboflowuploadsink").build().unwrap();
    for name in [
        "api-url", "api-key", "api-key-transport", "workspace", "workflow-id", "workflow-version-id",
        "workflow-spec", "workflow-spec-file", "model-id", "task-type", "image-input-name",
        "workflow-parameters", "stream-output", "data-output", "video-transport",
        "realtime-processing", "declared-fps", "processing-timeout", "requested-plan",
        "requested-region", "ice-servers", "udp-bind-address", "connect-timeout", "stall-timeout",
        "chunk-size", "buffer-limit", "sctp-mtu", "keepalive-interval", "spool-dir", "session", "stats",
    ] {
        let pspec = element.find_property(name).unwrap_or_else(|| panic!("no property {name}"));
        assert!(!pspec.blurb().unwrap_or_default().is_empty(), "{name} has a blurb");
    }
    assert_eq!(element.property::<u32>("chunk-size"), 49152);
    assert_eq!(element.property::<u32>("buffer-limit"), 131072);
    assert_eq!(element.property::<u32>("sctp-mtu"), 0);
    assert_eq!(element.property::<u32>("keepalive-interval"), 5000);
    assert_eq!(element.property::<String>("api-url"), "http://127.0.0.1:9001");
}

#[test]
fn a_harness_pushes_a_clip_and_sees_every_result_then_eos() {
    use common::worker::{TestWorker, WorkerConfig};
    init();
    let worker = TestWorker::start(WorkerConfig::default());
    let dir = tempfile::tempdir().unwrap();
    let clip = common::harness::make_clip(&dir.path().join("clip.mp4"), 5, 160, 120);
    let workflow = common::harness::workflow_file();
    let url = worker.url();
    let element = element_with(&[
        ("api-url", url.as_str()),
        ("api-key", "test-key"),
        ("workflow-spec-file", workflow.to_str().unwrap()),
        ("stall-timeout", "20000"),
    ]);
    let bus = gst::Bus::new();
    element.set_bus(Some(&bus));
    // Plays the element: no preroll, so the change is synchronous.
    let mut harness = gst_check::Harness::with_element(&element, Some("sink"), None);
    assert_eq!(element.current_state(), gst::State::Playing);
    harness.set_src_caps_str("video/quicktime");
    // No source element upstream to report a size: the bytes are spooled.
    let bytes = std::fs::read(&clip).unwrap();
    for piece in bytes.chunks(10_000) {
        assert_eq!(harness.push(gst::Buffer::from_slice(piece.to_vec())), Ok(gst::FlowSuccess::Ok));
    }
    // Returns once the job is finished.
    assert!(harness.push_event(gst::event::Eos::new()));
    let mut frames = Vec::new();
    let mut eos = 0;
    while let Some(message) = bus.timed_pop(gst::ClockTime::from_mseconds(300)) {
        match message.view() {
            gst::MessageView::Error(err) => panic!("unexpected error: {}", err.error()),
            gst::MessageView::Eos(_) => {
                assert_eq!(message.src(), Some(element.upcast_ref::<gst::Object>()));
                eos += 1;
            }
            _ => {}
        }
        if let Some(structure) = message.structure().filter(|s| s.name() == "roboflow-inference") {
            assert_eq!(eos, 0, "every result comes before EOS");
            frames.push(structure.get::<u64>("frame-id").unwrap());
        }
    }
    assert_eq!(frames, (1..=5).collect::<Vec<u64>>());
    assert_eq!(eos, 1, "one EOS message");
    let stats = element.property::<gst::Structure>("stats");
    assert_eq!(stats.get::<&str>("upload-mode").unwrap(), "spooled");
    assert_eq!(stats.get::<&str>("phase").unwrap(), "complete");
    // Data after EOS is refused.
    assert_eq!(harness.push(gst::Buffer::from_slice(vec![0u8; 4])), Err(gst::FlowError::Eos));
    drop(harness);
    let sessions = worker.wait_for_sessions(1, std::time::Duration::from_secs(5));
    assert_eq!(sessions[0].upload_sha256.as_deref(), Some(common::harness::sha256_file(&clip).as_str()));
}

#[test]
fn the_latency_query_is_answered_not_live() {
    init();
    let element = gst::ElementFactory::make("roboflowuploadsink").build().unwrap();
    let mut query = gst::query::Latency::new();
    assert!(element.query(&mut query), "the element answers");
    assert_eq!(query.result(), (false, gst::ClockTime::ZERO, gst::ClockTime::NONE));
    let pad = element.static_pad("sink").unwrap();
    let mut query = gst::query::Latency::new();
    assert!(pad.query(&mut query), "the pad answers");
    assert_eq!(query.result(), (false, gst::ClockTime::ZERO, gst::ClockTime::NONE));
}

/// FLUSH_START ends the EOS wait at once and refuses data; after
/// FLUSH_STOP the job goes on with the bytes already spooled.
#[test]
fn a_flush_cancels_the_eos_wait_and_the_job_goes_on_after_it() {
    use common::worker::{Fault, TestWorker, WorkerConfig};
    use std::time::Duration;
    init();
    let worker = TestWorker::start(WorkerConfig::default().with_fault(Fault::DelayAnswer(Duration::from_secs(3))));
    let dir = tempfile::tempdir().unwrap();
    let clip = common::harness::make_clip(&dir.path().join("clip.mp4"), 5, 160, 120);
    let workflow = common::harness::workflow_file();
    let url = worker.url();
    let element = element_with(&[
        ("api-url", url.as_str()),
        ("api-key", "test-key"),
        ("workflow-spec-file", workflow.to_str().unwrap()),
    ]);
    let bus = gst::Bus::new();
    element.set_bus(Some(&bus));
    let mut harness = gst_check::Harness::with_element(&element, Some("sink"), None);
    harness.set_src_caps_str("video/quicktime");
    for piece in std::fs::read(&clip).unwrap().chunks(10_000) {
        assert_eq!(harness.push(gst::Buffer::from_slice(piece.to_vec())), Ok(gst::FlowSuccess::Ok));
    }
    // EOS waits for the delayed answer on another thread.
    let src = harness.srcpad().unwrap().clone();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let eos_thread = std::thread::spawn(move || {
        done_tx.send(src.push_event(gst::event::Eos::new())).unwrap();
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(done_rx.try_recv().is_err(), "EOS is still waiting for the answer");
    assert!(harness.push_event(gst::event::FlushStart::new()));
    let handled = done_rx.recv_timeout(Duration::from_secs(2)).expect("FLUSH_START ends the EOS wait");
    assert!(!handled, "a flushed EOS is not handled");
    eos_thread.join().unwrap();
    assert_eq!(harness.push(gst::Buffer::from_slice(vec![0u8; 4])), Err(gst::FlowError::Flushing));
    assert!(harness.push_event(gst::event::FlushStop::new(false)));

    // The job goes on: the same spooled bytes are uploaded at the next EOS.
    assert!(harness.push_event(gst::event::Eos::new()));
    let mut frames = 0;
    let mut eos = 0;
    while let Some(message) = bus.timed_pop(gst::ClockTime::from_mseconds(300)) {
        match message.view() {
            gst::MessageView::Error(err) => panic!("unexpected error: {}", err.error()),
            gst::MessageView::Eos(_) => eos += 1,
            _ => {}
        }
        if message.structure().is_some_and(|s| s.name() == "roboflow-inference") {
            frames += 1;
        }
    }
    assert_eq!((frames, eos), (5, 1));
    drop(harness);
    let sessions = worker.wait_for_sessions(1, Duration::from_secs(5));
    assert_eq!(sessions[0].upload_sha256.as_deref(), Some(common::harness::sha256_file(&clip).as_str()));
}
