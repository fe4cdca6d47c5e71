// filesrc ! roboflowuploadsink: the streamed upload is byte-exact, chunked
// as the protocol says, reports monotonic progress up to 100 %, and posts
// one roboflow-inference message per frame.

mod common;

use std::time::Duration;

use common::harness::*;
use common::worker::{TestWorker, WorkerConfig};
use gst::prelude::*;

#[test]
fn filesrc_upload_is_streamed_byte_exact_with_one_message_per_frame() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let clip = make_clip(&dir.path().join("clip.mp4"), 45, 320, 240);
    let size = std::fs::metadata(&clip).unwrap().len();
    let spool = tempfile::tempdir().unwrap();
    let worker = TestWorker::start(WorkerConfig::default());

    let pipeline = launch(&format!(
        "filesrc location={} blocksize=10000 ! roboflowuploadsink name=sink spool-dir={} data-output=rgb_color {}",
        clip.display(),
        spool.path().display(),
        sink_properties(&worker.url())
    ));
    let sink = sink_of(&pipeline, "sink");
    let mut stats_at_eos = None;
    let outcome = run_with(&pipeline, Duration::from_secs(60), |_, message| {
        if let gst::MessageView::Eos(_) = message.view() {
            stats_at_eos = Some(sink.property::<gst::Structure>("stats"));
        }
        false
    });
    assert!(outcome.eos, "no EOS: {:?}", outcome.error);

    let sessions = worker.wait_for_sessions(1, Duration::from_secs(5));
    let report = &sessions[0];
    assert_eq!(report.channels, vec!["inference", "video_upload"], "channels are created in protocol order");
    assert!(report.header_errors.is_empty(), "{:?}", report.header_errors);
    assert!(report.upload_complete);
    assert_eq!(report.upload_bytes, size);
    assert_eq!(report.upload_sha256.as_deref(), Some(sha256_file(&clip).as_str()));
    let expected_chunks = size.div_ceil(49152) as u32;
    assert_eq!(report.total_chunks, Some(expected_chunks));
    assert_eq!(report.chunks_received, expected_chunks);
    assert_eq!(report.duplicate_chunks, 0);
    assert!(report.max_chunk_message_len <= 49152 + 8);
    assert_eq!(report.request["api_key"], "test-key");
    assert_eq!(report.request["stream_output"], serde_json::json!([]));
    assert_eq!(report.request["data_output"], serde_json::json!(["rgb_color"]));
    assert_eq!(report.request["webrtc_realtime_processing"], false);

    let stats = stats_at_eos.expect("stats read at EOS");
    assert_eq!(stats.get::<&str>("upload-mode").unwrap(), "streamed");
    assert_eq!(stats.get::<&str>("phase").unwrap(), "complete");
    assert_eq!(stats.get::<u64>("bytes-sent").unwrap(), size);
    assert_eq!(stats.get::<u64>("frames-received").unwrap(), 45);
    assert!(common::harness::files_in(spool.path()).is_empty(), "streamed mode writes no spool file");

    // One message per frame, in order, with the per-frame JSON.
    assert_eq!(report.frames_decoded, 45);
    let inference = outcome.named("roboflow-inference");
    assert_eq!(inference.len(), 45);
    for (index, message) in inference.iter().enumerate() {
        assert_eq!(message.get::<u64>("frame-id").unwrap(), index as u64 + 1);
        let json: serde_json::Value = serde_json::from_str(message.get::<&str>("json").unwrap()).unwrap();
        assert_eq!(json["video_metadata"]["frame_id"], index as u64 + 1);
        assert!(json["serialized_output_data"]["rgb_color"].is_array(), "{json}");
        assert!(message.get::<Option<gst::ClockTime>>("pts").unwrap().is_some());
    }
    let pts: Vec<gst::ClockTime> = inference
        .iter()
        .map(|m| m.get::<Option<gst::ClockTime>>("pts").unwrap().unwrap())
        .collect();
    assert!(pts.windows(2).all(|w| w[0] < w[1]), "pts increase: {pts:?}");

    // Progress rises monotonically and ends with a final 100 % message.
    let progress = outcome.named("roboflow-upload-progress");
    assert!(progress.len() >= 2, "{progress:?}");
    let uploaded: Vec<u64> = progress.iter().map(|p| p.get::<u64>("uploaded-bytes").unwrap()).collect();
    assert!(uploaded.windows(2).all(|w| w[0] <= w[1]), "{uploaded:?}");
    let last = progress.last().unwrap();
    assert!(last.get::<bool>("final").unwrap());
    assert_eq!(last.get::<u64>("uploaded-bytes").unwrap(), size);
    assert_eq!(last.get::<u64>("total-bytes").unwrap(), size);
    assert_eq!(last.get::<u64>("uploaded-chunks").unwrap(), u64::from(expected_chunks));
    assert_eq!(last.get::<f64>("percent").unwrap(), 100.0);
    let finals = progress.iter().filter(|p| p.get::<bool>("final").unwrap()).count();
    assert_eq!(finals, 1);
}
