// Keepalives flow while the upload runs, the server echoes them, and the
// sink counts the echoes and their round-trip time.

mod common;

use std::time::Duration;

use common::harness::*;
use common::worker::{TestWorker, WorkerConfig};
use gst::prelude::*;

#[test]
fn keepalives_are_echoed_during_a_slow_upload_and_stop_after_it() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let file = random_file(&dir.path().join("blob.bin"), 30 * 49152);
    let worker = TestWorker::start(WorkerConfig {
        // 30 chunks at 100 ms each: the upload takes about 3 s.
        upload_read_delay: Some(Duration::from_millis(100)),
        ..Default::default()
    });
    let pipeline = launch(&format!(
        "filesrc location={} ! roboflowuploadsink name=sink keepalive-interval=300 buffer-limit=65536 {}",
        file.display(),
        sink_properties(&worker.url())
    ));
    let sink = sink_of(&pipeline, "sink");
    let mut stats_at_end = None;
    let outcome = run_with(&pipeline, Duration::from_secs(60), |_, message| {
        if matches!(message.view(), gst::MessageView::Error(_) | gst::MessageView::Eos(_)) {
            stats_at_end = Some(sink.property::<gst::Structure>("stats"));
        }
        false
    });
    // Random bytes decode to no frame: the job ends with that error, after the upload.
    assert!(outcome.error_text().contains("decoded no frames"), "{:?}", outcome.error);

    let report = &worker.wait_for_sessions(1, Duration::from_secs(5))[0];
    assert!(report.upload_complete);
    assert!(report.keepalives_received >= 3, "only {} keepalives", report.keepalives_received);
    assert_eq!(report.keepalives_echoed, report.keepalives_received);

    let stats = stats_at_end.unwrap();
    let sent = stats.get::<u64>("keepalives-sent").unwrap();
    let echoed = stats.get::<u64>("keepalives-echoed").unwrap();
    assert_eq!(sent, u64::from(report.keepalives_received), "every keepalive sent reached the server");
    assert_eq!(echoed, sent, "every echo was counted");
    assert!(stats.get::<Option<gst::ClockTime>>("last-echo-rtt").unwrap().is_some());
    // At most one keepalive per interval over the ~3 s upload (plus slack):
    // they stop when the upload ends instead of running through processing.
    assert!(sent <= 20, "{sent} keepalives for a ~3 s upload");
}
