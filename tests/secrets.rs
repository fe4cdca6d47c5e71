// The API key never leaks: a whole job at the highest debug level, with a
// recognisable key in both the body and the header, and the key appears in
// no debug line, no bus message, no error text and no stats.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::harness::*;
use common::worker::{Fault, TestWorker, WorkerConfig};
use gst::prelude::*;

const KEY: &str = "RFKEY-do-not-leak-7f3a9c21";

#[test]
fn the_api_key_appears_nowhere() {
    init();
    // Everything GStreamer and the plugin log, at every level.
    let lines = Arc::new(AtomicUsize::new(0));
    let leaks = Arc::new(Mutex::new(Vec::<String>::new()));
    {
        let (lines, leaks) = (lines.clone(), leaks.clone());
        gst::log::remove_default_log_function();
        gst::log::add_log_function(move |category, _level, _file, _function, _line, _object, message| {
            lines.fetch_add(1, Ordering::Relaxed);
            if let Some(text) = message.get()
                && text.contains(KEY)
            {
                leaks.lock().unwrap().push(format!("{}: {text}", category.name()));
            }
        });
        gst::log::set_active(true);
        gst::log::set_default_threshold(gst::DebugLevel::Memdump);
    }

    let dir = tempfile::tempdir().unwrap();
    let clip = make_clip(&dir.path().join("clip.mp4"), 12, 160, 120);
    let worker = TestWorker::start(WorkerConfig::default());
    let mut everything_said = String::new();

    let mut job = |worker: &TestWorker, extra: &str| {
        let pipeline = launch(&format!(
            "filesrc location={} ! roboflowuploadsink name=upload session=secret stream-output=image \
             api-url={} workflow-spec-file={} api-key-transport=both {extra}  \
             roboflowresultsrc name=results session=secret ! fakesink",
            clip.display(),
            worker.url(),
            workflow_file().display()
        ));
        // Set programmatically: a launch line is itself logged by GStreamer.
        pipeline.by_name("upload").unwrap().set_property("api-key", KEY);
        let upload = pipeline.by_name("upload").unwrap();
        let results = pipeline.by_name("results").unwrap();
        let mut stats = Vec::new();
        let outcome = run_with(&pipeline, Duration::from_secs(60), |_, message| {
            if matches!(message.view(), gst::MessageView::Eos(_) | gst::MessageView::Error(_)) {
                stats.push(upload.property::<gst::Structure>("stats").to_string());
                stats.push(results.property::<gst::Structure>("stats").to_string());
            }
            false
        });
        for structure in &outcome.messages {
            everything_said.push_str(&structure.to_string());
        }
        everything_said.push_str(&outcome.error.clone().unwrap_or_default());
        everything_said.push_str(&outcome.warnings.join("\n"));
        everything_said.push_str(&stats.join("\n"));
        outcome
    };

    let outcome = job(&worker, "");
    assert!(outcome.eos, "{:?}", outcome.error);
    // A failing job too: its error texts must not carry the key either.
    let refusing = TestWorker::start(WorkerConfig {
        faults: vec![Fault::HttpError { status: 401, content_type: "application/json", body: r#"{"message":"Unauthorized api_key","error_type":"Unauthorized"}"#.into() }],
        ..Default::default()
    });
    let failed = job(&refusing, "");
    assert!(failed.error_text().contains("401"), "{:?}", failed.error);

    gst::log::set_default_threshold(gst::DebugLevel::None);
    // The key did travel, where it belongs.
    let report = &worker.wait_for_sessions(1, Duration::from_secs(5))[0];
    assert_eq!(report.request["api_key"], KEY);
    assert_eq!(report.authorization.as_deref(), Some(format!("Bearer {KEY}").as_str()));

    assert!(lines.load(Ordering::Relaxed) > 1000, "the debug log was really captured");
    assert!(leaks.lock().unwrap().is_empty(), "the key is in the debug log: {:?}", leaks.lock().unwrap());
    assert!(!everything_said.is_empty());
    assert!(!everything_said.contains(KEY), "the key is in a message, error or stats");
}
