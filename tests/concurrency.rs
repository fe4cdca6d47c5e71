// Eight sink/source pairs in one process, all at once, against one test
// worker: every upload is byte-exact, every result lands on its own
// session. Each pair uploads a clip of a different length, so a crossed
// result would show as a wrong count.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::harness::*;
use common::worker::{TestWorker, WorkerConfig};
use gst::prelude::*;

const PAIRS: u32 = 8;

#[test]
fn eight_pairs_at_once_stay_apart() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let worker = TestWorker::start(WorkerConfig::default());
    let clips: Vec<_> = (0..PAIRS)
        .map(|i| {
            let frames = 10 + 3 * i;
            let clip = make_clip(&dir.path().join(format!("clip{i}.mp4")), frames, 160, 120);
            (frames, sha256_file(&clip), clip)
        })
        .collect();

    let jobs: Vec<_> = clips
        .iter()
        .enumerate()
        .map(|(i, (frames, _, clip))| {
            let pipeline = launch(&format!(
                "filesrc location={} ! roboflowuploadsink session=pair{i} stream-output=image {}  \
                 roboflowresultsrc session=pair{i} ! appsink name=out sync=false",
                clip.display(),
                sink_properties(&worker.url())
            ));
            let counted = Arc::new(AtomicUsize::new(0));
            let metas_ok = Arc::new(AtomicUsize::new(0));
            let appsink = pipeline.by_name("out").unwrap().downcast::<gst_app::AppSink>().unwrap();
            let (count, ok) = (counted.clone(), metas_ok.clone());
            let expected_frames = u64::from(*frames);
            appsink.set_callbacks(
                gst_app::AppSinkCallbacks::builder()
                    .new_sample(move |sink| {
                        let sample = sink.pull_sample().map_err(|_| gst::FlowError::Eos)?;
                        let buffer = sample.buffer().unwrap();
                        let index = count.fetch_add(1, Ordering::SeqCst) as u64 + 1;
                        let frame_id = gst::meta::CustomMeta::from_buffer(buffer, gstroboflow::META_NAME)
                            .ok()
                            .and_then(|meta| meta.structure().get::<u64>("frame-id").ok());
                        if frame_id == Some(index) && index <= expected_frames {
                            ok.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(gst::FlowSuccess::Ok)
                    })
                    .build(),
            );
            std::thread::spawn(move || {
                let outcome = run(&pipeline, Duration::from_secs(120));
                (outcome, counted.load(Ordering::SeqCst), metas_ok.load(Ordering::SeqCst))
            })
        })
        .collect();

    for (i, job) in jobs.into_iter().enumerate() {
        let (outcome, frames, metas_ok) = job.join().unwrap();
        let expected = clips[i].0 as usize;
        assert!(outcome.eos, "pair {i}: {:?} (warnings: {:?})", outcome.error, outcome.warnings);
        assert_eq!(frames, expected, "pair {i} got another session's frames");
        assert_eq!(metas_ok, expected, "pair {i}: every frame carries its own frame-id");
        assert_eq!(outcome.named("roboflow-inference").len(), expected, "pair {i}: one message per frame");
    }

    let sessions = worker.wait_for_sessions(PAIRS as usize, Duration::from_secs(10));
    assert_eq!(sessions.len(), PAIRS as usize);
    for (frames, sha, _) in &clips {
        let session = sessions
            .iter()
            .find(|s| s.upload_sha256.as_deref() == Some(sha.as_str()))
            .unwrap_or_else(|| panic!("no session received the clip with {frames} frames byte-exact"));
        assert_eq!(session.frames_decoded, *frames);
        assert_eq!(session.results_sent, *frames);
        assert!(session.header_errors.is_empty());
    }
}
