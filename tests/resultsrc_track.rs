// roboflowresultsrc in track transport: the returned WebRTC video track
// (VP8, and H.264 when negotiated) is depayloaded and decoded, every frame
// is paired with its result by PTS, in one pipeline and across two.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::harness::*;
use common::worker::{TestWorker, TrackCodec, WorkerConfig};
use gst::prelude::*;

#[derive(Default, Debug)]
struct Received {
    frame_ids: Vec<Option<u64>>,
    pts: Vec<gst::ClockTime>,
    /// Mean byte value of the first frame: the worker inverts the image.
    first_mean: Option<f64>,
    /// The streaming threads the frames arrived in.
    threads: std::collections::BTreeSet<String>,
}

fn collect(appsink: &gst_app::AppSink) -> Arc<Mutex<Received>> {
    collect_slowly(appsink, Duration::ZERO)
}

/// Collects the frames, holding the streaming thread `delay` per frame (a
/// slow or syncing downstream).
fn collect_slowly(appsink: &gst_app::AppSink, delay: Duration) -> Arc<Mutex<Received>> {
    let received = Arc::new(Mutex::new(Received::default()));
    let sink_received = received.clone();
    appsink.set_callbacks(
        gst_app::AppSinkCallbacks::builder()
            .new_sample(move |sink| {
                let sample = sink.pull_sample().map_err(|_| gst::FlowError::Eos)?;
                std::thread::sleep(delay);
                let buffer = sample.buffer().unwrap();
                let frame_id = gst::meta::CustomMeta::from_buffer(buffer, gstroboflow::META_NAME)
                    .ok()
                    .and_then(|m| m.structure().get::<u64>("frame-id").ok());
                let mut received = sink_received.lock().unwrap();
                // GStreamer names its streaming threads (Rust's name() does
                // not see names given outside std).
                let thread = std::fs::read_to_string("/proc/thread-self/comm").unwrap_or_default();
                received.threads.insert(thread.trim().to_owned());
                received.frame_ids.push(frame_id);
                received.pts.extend(buffer.pts());
                if received.first_mean.is_none() {
                    let map = buffer.map_readable().unwrap();
                    received.first_mean = Some(map.iter().map(|b| f64::from(*b)).sum::<f64>() / map.len() as f64);
                }
                Ok(gst::FlowSuccess::Ok)
            })
            .build(),
    );
    received
}

const SINK_TAIL: &str = "video-transport=track stream-output=image";
const SOURCE_TAIL: &str = "! videoconvert ! video/x-raw,format=GRAY8 ! appsink name=out sync=false";

/// One upload with its result source in one pipeline, the returned video
/// collected; bounded to 90 s.
fn track_job(clip: &std::path::Path, worker: &TestWorker, session: &str) -> (Arc<Mutex<Received>>, Outcome) {
    track_job_with(clip, worker, session, "", Duration::ZERO)
}

/// [`track_job`] with `source_properties` on the result source, and a
/// downstream that holds the streaming thread `delay` per frame.
fn track_job_with(
    clip: &std::path::Path,
    worker: &TestWorker,
    session: &str,
    source_properties: &str,
    delay: Duration,
) -> (Arc<Mutex<Received>>, Outcome) {
    let pipeline = launch(&format!(
        "filesrc location={} ! roboflowuploadsink session={session} {SINK_TAIL} {}  \
         roboflowresultsrc name=results session={session} {source_properties} {SOURCE_TAIL}",
        clip.display(),
        sink_properties(&worker.url())
    ));
    let received = collect_slowly(&pipeline.by_name("out").unwrap().downcast::<gst_app::AppSink>().unwrap(), delay);
    let outcome = run(&pipeline, Duration::from_secs(90));
    (received, outcome)
}

fn check_all_paired(received: &Received, frames: usize, stats: &gst::Structure) {
    assert_eq!(received.frame_ids.len(), frames, "every frame decoded: {:?}", received.frame_ids);
    let ids: Vec<u64> = received.frame_ids.iter().map(|id| id.expect("every frame paired")).collect();
    assert_eq!(ids, (1..=frames as u64).collect::<Vec<_>>(), "paired in order");
    assert!(received.pts.windows(2).all(|w| w[0] < w[1]), "PTS increase: {:?}", received.pts);
    // The clip is a dark test pattern; the worker returns it inverted.
    assert!(received.first_mean.unwrap() > 128.0, "the server's image, not the upload: {:?}", received.first_mean);
    assert_eq!(stats.get::<u64>("frames-paired").unwrap(), frames as u64);
    assert_eq!(stats.get::<u64>("frames-unpaired").unwrap(), 0);
    // No queue between the frame source and the decoder: the frames cross
    // no thread after the session hands over their packets.
    let threads: Vec<&str> = received.threads.iter().map(String::as_str).collect();
    assert_eq!(threads, ["framesrc:src"], "decoded in the frame source's streaming thread");
    assert_eq!(stats.get::<u64>("frames-dropped").unwrap(), 0);
}

/// The worker's default: its JSON leads its RTP by 5 ms, as the server's
/// encoder takes that long.
fn with_encode_latency() -> WorkerConfig {
    WorkerConfig::default()
}

/// A frame's RTP may overtake its JSON (the race the server's encoder
/// latency normally hides).
fn without_encode_latency() -> WorkerConfig {
    WorkerConfig { track_encode_latency: Duration::ZERO, ..Default::default() }
}

fn one_pipeline(codec: TrackCodec, expected_codec: &str, config: WorkerConfig) {
    init();
    let dir = tempfile::tempdir().unwrap();
    let clip = make_clip(&dir.path().join("clip.mp4"), 30, 320, 240);
    let latency = config.track_encode_latency;
    let worker = TestWorker::start(WorkerConfig { track_codec: codec, ..config });
    let session = format!("track-{expected_codec}-{}", latency.as_millis());
    let (received, outcome) = track_job(&clip, &worker, &session);
    assert!(outcome.eos, "{:?}", outcome.error);
    let summary = outcome.named("roboflow-result-summary");
    assert_eq!(summary.len(), 1);
    check_all_paired(&received.lock().unwrap(), 30, summary[0]);
    assert_eq!(outcome.named("roboflow-inference").len(), 30, "every JSON result is posted");
    let report = &worker.wait_for_sessions(1, Duration::from_secs(5))[0];
    assert_eq!(report.track_codec.as_deref(), Some(expected_codec));
    assert_eq!(report.request["stream_output"], serde_json::json!(["image"]));
}

#[test]
fn vp8_track_in_one_pipeline() {
    one_pipeline(TrackCodec::Vp8, "video/VP8", with_encode_latency());
}

#[test]
fn h264_track_in_one_pipeline() {
    one_pipeline(TrackCodec::H264, "video/H264", with_encode_latency());
}

#[test]
fn vp8_track_in_one_pipeline_without_encode_latency() {
    one_pipeline(TrackCodec::Vp8, "video/VP8", without_encode_latency());
}

#[test]
fn h264_track_in_one_pipeline_without_encode_latency() {
    one_pipeline(TrackCodec::H264, "video/H264", without_encode_latency());
}

#[test]
fn track_across_two_pipelines() {
    across_two_pipelines(with_encode_latency(), "track-two");
}

#[test]
fn track_across_two_pipelines_without_encode_latency() {
    across_two_pipelines(without_encode_latency(), "track-two-0");
}

fn across_two_pipelines(config: WorkerConfig, session: &str) {
    init();
    let dir = tempfile::tempdir().unwrap();
    let clip = make_clip(&dir.path().join("clip.mp4"), 24, 320, 240);
    let worker = TestWorker::start(config);
    let upload = launch(&format!(
        "filesrc location={} ! roboflowuploadsink session={session} {SINK_TAIL} {}",
        clip.display(),
        sink_properties(&worker.url())
    ));
    let source = launch(&format!("roboflowresultsrc name=results session={session} {SOURCE_TAIL}"));
    let received = collect(&source.by_name("out").unwrap().downcast::<gst_app::AppSink>().unwrap());
    // The source claims the session's results in READY, before the sink
    // starts; then the upload pipeline runs first.
    source.set_state(gst::State::Ready).unwrap();
    let upload_thread = std::thread::spawn(move || run(&upload, Duration::from_secs(90)));
    let source_outcome = run(&source, Duration::from_secs(90));
    let upload_outcome = upload_thread.join().unwrap();
    assert!(upload_outcome.eos, "{:?}", upload_outcome.error);
    assert!(source_outcome.eos, "{:?}", source_outcome.error);
    let summary = source_outcome.named("roboflow-result-summary");
    check_all_paired(&received.lock().unwrap(), 24, summary[0]);
}

#[test]
fn frames_the_codec_never_sends_are_counted_not_guessed() {
    codec_gaps(with_encode_latency(), "track-gaps");
}

#[test]
fn frames_the_codec_never_sends_are_counted_not_guessed_without_encode_latency() {
    codec_gaps(without_encode_latency(), "track-gaps-0");
}

fn codec_gaps(config: WorkerConfig, session: &str) {
    init();
    let dir = tempfile::tempdir().unwrap();
    let clip = make_clip(&dir.path().join("clip.mp4"), 30, 320, 240);
    // Every third frame gets its JSON but no video, across an RTP timestamp wrap.
    let worker = TestWorker::start(WorkerConfig {
        track_drop_every: Some(3),
        track_rtp_origin: Some(u32::MAX - 45_000),
        ..config
    });
    let (received, outcome) = track_job(&clip, &worker, session);
    assert!(outcome.eos, "{:?}", outcome.error);
    assert_eq!(outcome.named("roboflow-inference").len(), 30, "results of dropped frames still arrive");
    let received = received.lock().unwrap();
    assert_eq!(received.frame_ids.len(), 20);
    let ids: Vec<u64> = received.frame_ids.iter().map(|id| id.expect("every decoded frame pairs")).collect();
    let expected: Vec<u64> = (1..=30).filter(|id| id % 3 != 0).collect();
    assert_eq!(ids, expected, "each frame pairs with its own result, not a neighbour's");
    let summary = outcome.named("roboflow-result-summary")[0];
    assert_eq!(summary.get::<u64>("frames-received").unwrap(), 30);
    assert_eq!(summary.get::<u64>("frames-paired").unwrap(), 20);
}

#[test]
fn rtp_racing_its_json_still_pairs_every_frame() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let clip = make_clip(&dir.path().join("clip.mp4"), 30, 320, 240);
    // No encoder latency: a frame's RTP can reach the client before its JSON.
    // The race goes either way, so several sessions.
    let worker = TestWorker::start(WorkerConfig { track_encode_latency: Duration::ZERO, ..Default::default() });
    for run_index in 0..4 {
        let session = format!("track-race{run_index}");
        let (received, outcome) = track_job(&clip, &worker, &session);
        assert!(outcome.eos, "run {run_index}: {:?}", outcome.error);
        let summary = outcome.named("roboflow-result-summary");
        assert_eq!(summary.len(), 1, "run {run_index}");
        check_all_paired(&received.lock().unwrap(), 30, summary[0]);
    }
}

/// Downstream holds the streaming thread longer than the frame source's
/// hold (250 ms) while the worker runs ahead: the frames and results that
/// queued up meanwhile must still pair. Before, the source took every
/// waiting packet first and the results one at a time, one per frame pushed,
/// so the later frames of the backlog ran out their hold with their results
/// already waiting (seen with fakevideosink on the real server: 838 of 898
/// frames unpaired).
#[test]
fn a_slow_downstream_still_gets_every_frame_paired() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let clip = make_clip(&dir.path().join("clip.mp4"), 30, 320, 240);
    let worker = TestWorker::start(WorkerConfig::default());
    // 60 ms a frame: the 8 frames the acks let the worker run ahead take
    // 480 ms downstream, twice the hold.
    let (received, outcome) = track_job_with(&clip, &worker, "track-slow", "", Duration::from_millis(60));
    assert!(outcome.eos, "{:?}", outcome.error);
    let summary = outcome.named("roboflow-result-summary");
    assert_eq!(summary.len(), 1);
    check_all_paired(&received.lock().unwrap(), 30, summary[0]);
}

/// Packets of the returned track lost on the way (first transmissions only):
/// the source NACKs them, waits for the retransmission, puts it back in its
/// place, and every frame decodes. Nothing is given up, no keyframe asked.
#[test]
fn lost_packets_are_resent_on_nack_and_every_frame_decodes() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let clip = make_clip(&dir.path().join("clip.mp4"), 30, 320, 240);
    let worker = TestWorker::start(WorkerConfig { track_lose_packets: vec![3, 12, 13, 25], ..Default::default() });
    let (received, outcome) = track_job(&clip, &worker, "track-nack");
    assert!(outcome.eos, "{:?}", outcome.error);
    let summary = outcome.named("roboflow-result-summary");
    check_all_paired(&received.lock().unwrap(), 30, summary[0]);
    assert_eq!(summary[0].get::<u64>("track-packets-lost").unwrap(), 0, "every loss repaired: {:?}", summary[0]);
    assert_eq!(summary[0].get::<u64>("keyframe-requests").unwrap(), 0);
    let report = &worker.wait_for_sessions(1, Duration::from_secs(5))[0];
    assert_eq!(report.track_packets_lost, 4, "the worker lost them on the wire");
    assert!(report.track_retransmissions >= 4, "each was NACKed and resent: {} retransmissions", report.track_retransmissions);
    assert_eq!(report.track_keyframe_requests, 0);
}

/// A packet lost for good (its retransmissions too) breaks its frame and
/// every frame after it up to a keyframe, which the server's encoder sends
/// only when asked: the source gives the packet up after its loss wait,
/// drops the broken frames rather than showing them corrupted, asks for a
/// keyframe (PLI), and decodes again from it. The dropped frames' results
/// still arrive, and the statistics say what happened.
/// One packet of the returned track is lost for good (its retransmissions
/// too) and the worker, like aiortc, makes no keyframe unless asked
/// (`ignored`: how many requests bring none). The frames from the loss to
/// the requested keyframe are dropped, every other one decodes and pairs,
/// and every result is posted. Returns the keyframe requests sent.
fn lost_for_good(codec: TrackCodec, ignored: u32, session: &str) -> u64 {
    init();
    let dir = tempfile::tempdir().unwrap();
    let frames = 90;
    let clip = make_clip(&dir.path().join("clip.mp4"), frames, 320, 240);
    let worker = TestWorker::start(WorkerConfig {
        track_codec: codec,
        track_lose_packets: vec![40],
        track_lose_retransmissions: true,
        // No keyframe but the first and the ones asked for, as aiortc.
        track_keyframe_interval: 10_000,
        track_ignore_keyframe_requests: ignored,
        // About 30 fps, so that a repeated request (after 500 ms) comes
        // while frames are still being sent.
        track_frame_gap: Duration::from_millis(30),
        ..Default::default()
    });
    let (received, outcome) = track_job(&clip, &worker, session);
    assert!(outcome.eos, "{:?}", outcome.error);
    assert_eq!(outcome.named("roboflow-inference").len(), frames as usize, "every result still arrives");
    let summary = outcome.named("roboflow-result-summary")[0];
    assert_eq!(summary.get::<u64>("track-packets-lost").unwrap(), 1, "{summary:?}");
    let requests = summary.get::<u64>("keyframe-requests").unwrap();
    assert!(requests > u64::from(ignored), "{summary:?}");
    let report = &worker.wait_for_sessions(1, Duration::from_secs(5))[0];
    assert_eq!(u64::from(report.track_keyframe_requests), requests, "the worker got every request");
    let received = received.lock().unwrap();
    let ids: Vec<u64> = received.frame_ids.iter().map(|id| id.expect("every decoded frame pairs")).collect();
    // Decoded: the frames before the loss, then from the keyframe on, to the end.
    let resumed = ids.windows(2).position(|pair| pair[1] != pair[0] + 1).expect("frames were dropped after the loss");
    assert!(ids[..=resumed].iter().copied().eq(1..=ids[resumed]), "every frame before the loss: {ids:?}");
    assert!(ids[resumed + 1..].iter().copied().eq(ids[resumed + 1]..=frames as u64), "every frame from the keyframe to the end: {ids:?}");
    assert_eq!(summary.get::<u64>("frames-pushed").unwrap(), ids.len() as u64);
    assert_eq!(summary.get::<u64>("frames-unpaired").unwrap(), 0);
    eprintln!("{session}: {requests} keyframe requests; frames {} to {} dropped", ids[resumed] + 1, ids[resumed + 1] - 1);
    requests
}

#[test]
fn a_packet_lost_for_good_drops_frames_until_the_keyframe_the_source_asks_for() {
    assert_eq!(lost_for_good(TrackCodec::Vp8, 0, "track-pli"), 1, "one request, answered");
}

#[test]
fn h264_a_packet_lost_for_good_drops_frames_until_the_keyframe_the_source_asks_for() {
    // rtph264depay also asks for a keyframe at its first packet: one more.
    let requests = lost_for_good(TrackCodec::H264, 0, "track-pli-h264");
    assert!((1..=2).contains(&requests), "{requests}");
}

#[test]
fn a_keyframe_request_that_brings_no_keyframe_is_repeated() {
    // The first request brings nothing (lost, or its keyframe lost): the
    // session asks again 500 ms later, and the picture comes back.
    assert_eq!(lost_for_good(TrackCodec::Vp8, 1, "track-pli-again"), 2, "the request, then one repeat");
}

/// A server far away: each retransmission comes 400 ms after its NACK.
/// Returns the summary of a 60-frame job with `loss-wait` set or not, and
/// the frame ids decoded.
fn far_away(loss_wait: Option<u32>, session: &str) -> (gst::Structure, Vec<Option<u64>>) {
    init();
    let dir = tempfile::tempdir().unwrap();
    let clip = make_clip(&dir.path().join("clip.mp4"), 60, 320, 240);
    let worker = TestWorker::start(WorkerConfig {
        track_lose_packets: vec![12],
        track_retransmission_delay: Duration::from_millis(400),
        // No keyframe but the first and the ones asked for, as aiortc.
        track_keyframe_interval: 10_000,
        track_frame_gap: Duration::from_millis(30),
        ..Default::default()
    });
    let wait = loss_wait.map(|ms| format!("loss-wait={ms}")).unwrap_or_default();
    let (received, outcome) = track_job_with(&clip, &worker, session, &wait, Duration::ZERO);
    assert!(outcome.eos, "{:?}", outcome.error);
    let report = &worker.wait_for_sessions(1, Duration::from_secs(5))[0];
    assert_eq!(report.track_packets_lost, 1, "the worker lost one packet on the wire");
    assert!(report.track_retransmissions >= 1, "it was NACKed and resent");
    let summary = outcome.named("roboflow-result-summary")[0].clone();
    let ids = received.lock().unwrap().frame_ids.clone();
    (summary, ids)
}

#[test]
fn a_retransmission_slower_than_the_loss_wait_is_given_up() {
    // The default loss wait (150 ms) is shorter than the round trip: the
    // packet is given up, its frames dropped, a keyframe asked for.
    let (summary, ids) = far_away(None, "track-far-default");
    let source = gst::ElementFactory::make("roboflowresultsrc").build().unwrap();
    assert_eq!(source.property::<u32>("loss-wait"), 150, "the default");
    assert_eq!(summary.get::<u64>("track-packets-lost").unwrap(), 1, "{summary:?}");
    assert!(summary.get::<u64>("keyframe-requests").unwrap() >= 1, "{summary:?}");
    assert!(ids.len() < 60, "frames dropped until the keyframe: {ids:?}");
}

#[test]
fn a_loss_wait_longer_than_the_round_trip_waits_for_the_retransmission() {
    let (summary, ids) = far_away(Some(1000), "track-far-waits");
    assert_eq!(summary.get::<u64>("track-packets-lost").unwrap(), 0, "{summary:?}");
    assert_eq!(summary.get::<u64>("keyframe-requests").unwrap(), 0, "{summary:?}");
    let ids: Vec<u64> = ids.iter().map(|id| id.expect("every frame paired")).collect();
    assert_eq!(ids, (1..=60).collect::<Vec<_>>(), "every frame decodes, in order");
    assert_eq!(summary.get::<u64>("frames-unpaired").unwrap(), 0);
}
