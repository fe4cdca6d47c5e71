// videotestsrc ! x264enc ! mp4mux ! roboflowuploadsink: the muxer seeks back
// to rewrite its header, so the sink spools; what it uploads is exactly what
// filesink writes from the same muxer, and the spool file is gone afterwards.

mod common;

use std::time::Duration;

use common::harness::*;
use common::worker::{TestWorker, WorkerConfig};
use gst::prelude::*;

#[test]
fn encoder_pipeline_is_spooled_and_byte_exact_with_filesink() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let spool = tempfile::tempdir().unwrap();
    let reference = dir.path().join("reference.mp4");
    let worker = TestWorker::start(WorkerConfig::default());

    // One muxer feeding both: filesink honours the same seeks the sink must.
    let pipeline = launch(&format!(
        "videotestsrc num-buffers=60 ! video/x-raw,width=320,height=240,framerate=30/1 \
         ! x264enc speed-preset=ultrafast ! mp4mux ! tee name=t \
         t. ! queue ! filesink location={} \
         t. ! queue ! roboflowuploadsink name=sink spool-dir={} {}",
        reference.display(),
        spool.path().display(),
        sink_properties(&worker.url())
    ));
    let sink = sink_of(&pipeline, "sink");
    let mut saw_spool_file = false;
    let mut stats_at_eos = None;
    let outcome = run_with(&pipeline, Duration::from_secs(90), |_, message| {
        if let gst::MessageView::Element(_) = message.view() {
            saw_spool_file |= !files_in(spool.path()).is_empty();
        }
        if let gst::MessageView::Eos(_) = message.view() {
            stats_at_eos = Some(sink.property::<gst::Structure>("stats"));
        }
        false
    });
    assert!(outcome.eos, "no EOS: {:?}", outcome.error);
    assert!(saw_spool_file, "the upload was spooled to spool-dir while it ran");
    assert!(files_in(spool.path()).is_empty(), "the spool file is deleted");
    let stats = stats_at_eos.unwrap();
    assert_eq!(stats.get::<&str>("upload-mode").unwrap(), "spooled");

    let report = &worker.wait_for_sessions(1, Duration::from_secs(5))[0];
    assert!(report.header_errors.is_empty(), "{:?}", report.header_errors);
    assert_eq!(report.upload_bytes, std::fs::metadata(&reference).unwrap().len());
    assert_eq!(report.upload_sha256.as_deref(), Some(sha256_file(&reference).as_str()));
    assert_eq!(report.frames_decoded, 60);
    assert_eq!(outcome.named("roboflow-inference").len(), 60);
}
