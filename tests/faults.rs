// The fault matrix: for every fault the user can cause or meet, the
// pipeline posts an ERROR naming the cause within the relevant timeout,
// reaches NULL without hanging, leaves no temp file, and the plugin
// runtime's live task count returns to its baseline.
//
// The tests share the plugin's runtime, whose task count they measure, so
// they run one at a time (SERIAL).

mod common;

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::harness::*;
use common::worker::{Fault, TestWorker, WorkerConfig};
use gst::prelude::*;

static SERIAL: Mutex<()> = Mutex::new(());

const CONNECT_TIMEOUT_MS: u32 = 3000;
const STALL_TIMEOUT_MS: u32 = 2000;

struct Case {
    worker: Option<WorkerConfig>,
    /// Pipeline head producing the upload's bytes.
    input: Input,
    extra: String,
    /// Every string must occur in the error text.
    expect: Vec<String>,
    /// The error must come within this long after PLAYING.
    within: Duration,
}

enum Input {
    Clip { frames: u32 },
    Random { bytes: usize },
    Empty,
}

impl Case {
    fn new(worker: Option<WorkerConfig>, expect: &[&str]) -> Self {
        Case {
            worker,
            input: Input::Clip { frames: 20 },
            extra: String::new(),
            expect: expect.iter().map(|s| s.to_string()).collect(),
            within: Duration::from_secs(15),
        }
    }

    fn faults(faults: Vec<Fault>, expect: &[&str]) -> Self {
        Case::new(Some(WorkerConfig { faults, ..Default::default() }), expect)
    }

    fn input(mut self, input: Input) -> Self {
        self.input = input;
        self
    }

    fn extra(mut self, extra: &str) -> Self {
        self.extra = extra.to_owned();
        self
    }

    fn within(mut self, within: Duration) -> Self {
        self.within = within;
        self
    }
}

fn make_input(input: &Input, dir: &Path) -> PathBuf {
    match input {
        Input::Clip { frames } => make_clip(&dir.join("clip.mp4"), *frames, 160, 120),
        Input::Random { bytes } => random_file(&dir.join("random.bin"), *bytes),
        Input::Empty => {
            let path = dir.join("empty.mp4");
            std::fs::write(&path, b"").unwrap();
            path
        }
    }
}

/// Waits (bounded) until the plugin runtime is back to `baseline` tasks.
fn tasks_settle(baseline: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let live = gstroboflow::live_tasks();
        if live <= baseline || Instant::now() > deadline {
            return live;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs the case and checks the four promises; returns the error text.
fn check(case: Case) -> String {
    let _serial = SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    init();
    let baseline = gstroboflow::live_tasks();
    let dir = tempfile::tempdir().unwrap();
    let spool = tempfile::tempdir().unwrap();
    let input = make_input(&case.input, dir.path());
    let worker = case.worker.map(TestWorker::start);
    let url = match &worker {
        Some(worker) => worker.url(),
        None => {
            // Nobody listens here.
            let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            format!("http://127.0.0.1:{port}")
        }
    };
    let pipeline = launch(&format!(
        "filesrc location={} ! roboflowuploadsink upload-mode=spool spool-dir={} api-url={url} api-key=k \
         workflow-spec-file={} connect-timeout={CONNECT_TIMEOUT_MS} stall-timeout={STALL_TIMEOUT_MS} {}",
        input.display(),
        spool.path().display(),
        workflow_file().display(),
        case.extra
    ));
    let started = Instant::now();
    let outcome = run(&pipeline, case.within + Duration::from_secs(20));
    let elapsed = started.elapsed();
    let text = outcome.error.clone().unwrap_or_else(|| panic!("expected an error, got {outcome:?}"));
    for expected in &case.expect {
        assert!(text.contains(expected.as_str()), "error {text:?} does not name {expected:?}");
    }
    assert!(elapsed < case.within, "the error took {elapsed:?} (allowed {:?}): {text}", case.within);
    // run() set the pipeline to NULL; a second change must be immediate.
    let null_started = Instant::now();
    pipeline.set_state(gst::State::Null).unwrap();
    assert!(null_started.elapsed() < Duration::from_secs(1));
    drop(pipeline);
    assert!(files_in(spool.path()).is_empty(), "temp files left: {:?}", files_in(spool.path()));
    drop(worker);
    let live = tasks_settle(baseline);
    assert!(live <= baseline, "runtime tasks: {live} alive after the job, {baseline} before");
    text
}

#[test]
fn connection_refused() {
    check(Case::new(None, &["could not connect", "127.0.0.1"]));
}

#[test]
fn http_500_with_a_json_body() {
    check(Case::faults(
        vec![Fault::HttpError {
            status: 500,
            content_type: "application/json",
            body: r#"{"message":"worker pool exhausted","error_type":"ServiceUnavailable"}"#.into(),
        }],
        &["500", "worker pool exhausted"],
    ));
}

#[test]
fn http_422_with_detail() {
    check(Case::faults(
        vec![Fault::HttpError {
            status: 422,
            content_type: "application/json",
            body: r#"{"detail":[{"loc":["body","workflow_configuration"],"msg":"field required","type":"value_error.missing"}]}"#.into(),
        }],
        &["422", "workflow_configuration", "field required"],
    ));
}

#[test]
fn a_non_json_error_body() {
    check(Case::faults(
        vec![Fault::HttpError {
            status: 502,
            content_type: "text/html",
            body: "<html><body><h1>502 Bad Gateway</h1><p>upstream went away</p></body></html>".into(),
        }],
        &["502", "Bad Gateway"],
    ));
}

#[test]
fn a_malformed_sdp_answer() {
    // The answer does not parse: "malformed", not "refused" (which is an
    // answer that parses but does not fit the offer).
    let text = check(Case::faults(vec![Fault::MalformedSdp], &["the server's SDP answer is malformed"]));
    assert!(!text.contains("refused"), "{text}");
}

#[test]
fn ice_that_never_connects() {
    check(
        Case::faults(
            vec![Fault::NeverConnect],
            &[&format!(
                "within {:.1} s (connect-timeout) while connecting to the server (ICE, DTLS, SCTP) and opening the inference channel",
                f64::from(CONNECT_TIMEOUT_MS) / 1000.0
            )],
        )
        .within(Duration::from_millis(u64::from(CONNECT_TIMEOUT_MS) + 6000)),
    );
}

/// N and M of "<prefix>N of M" in `text`.
fn n_of_m(text: &str, prefix: &str) -> (u64, u64) {
    let start = text.find(prefix).unwrap_or_else(|| panic!("{text:?} does not say {prefix:?}")) + prefix.len();
    let words: Vec<&str> = text[start..].splitn(4, ' ').collect();
    match words.as_slice() {
        [n, "of", m, ..] => match (n.parse(), m.parse()) {
            (Ok(n), Ok(m)) => (n, m),
            _ => panic!("{text:?}: no 'N of M' after {prefix:?}"),
        },
        _ => panic!("{text:?}: no 'N of M' after {prefix:?}"),
    }
}

#[test]
fn the_server_closes_video_upload_mid_upload() {
    // Read slowly, so that the client cannot run far ahead of the two
    // chunks the worker reads before it closes the channel; a 64 KiB
    // buffer-limit holds one chunk message in flight.
    let text = check(
        Case::new(
            Some(WorkerConfig {
                faults: vec![Fault::CloseUploadAfterChunks(2)],
                upload_read_delay: Some(Duration::from_millis(100)),
                ..Default::default()
            }),
            &[],
        )
        .input(Input::Random { bytes: 20 * 49152 })
        .extra("buffer-limit=65536"),
    );
    // The upload task's failing send and the channel's close event race
    // to report it; either way it names the chunks sent and the total.
    let closed = "the server closed the video_upload channel during the upload, after ";
    let (sent, total) = if text.contains(closed) {
        n_of_m(&text, closed)
    } else {
        let (failed, total) = n_of_m(&text, "sending chunk ");
        let failure = format!("sending chunk {failed} of {total} on the video_upload channel failed: data channel closed");
        assert!(text.contains(&failure), "{text}");
        (failed - 1, total)
    };
    assert!(text.contains(&format!("{sent} of {total} chunks")) || !text.contains(closed), "{text}");
    assert_eq!(total, 20, "{text}");
    assert!((2..=4).contains(&sent), "the worker closed after reading 2 chunks; the client had sent {sent}: {text}");
}

#[test]
fn the_server_stops_reading_the_upload() {
    // 10 s per chunk: the first chunk message fills buffer-limit and is
    // still unread when stall-timeout (2 s) runs out.
    let text = check(
        Case::new(Some(WorkerConfig { upload_read_delay: Some(Duration::from_secs(10)), ..Default::default() }), &[])
            .input(Input::Random { bytes: 20 * 49152 })
            .extra("buffer-limit=65536")
            .within(Duration::from_millis(u64::from(CONNECT_TIMEOUT_MS + STALL_TIMEOUT_MS) + 6000)),
    );
    let expected = format!(
        "the upload made no progress for {:.1} s (stall-timeout) after ",
        f64::from(STALL_TIMEOUT_MS) / 1000.0
    );
    let (sent, total) = n_of_m(&text, &expected);
    assert_eq!((sent, total), (1, 20), "one chunk message fits buffer-limit: {text}");
    assert!(text.contains("after 1 of 20 chunks: the server stopped reading the video_upload channel"), "{text}");
}

#[test]
fn the_peer_connection_drops_while_results_flow() {
    check(Case::faults(
        vec![Fault::DropPeerAfterFrames(3)],
        &["the server closed the inference channel before processing_complete, after 3 results"],
    ));
}

#[test]
fn a_server_worker_that_dies_mid_job_is_noticed_by_ice_not_by_stall_timeout() {
    // The worker goes silent after 4 results, as a process killed with
    // SIGKILL: no close, no abort. The stall timer is set far beyond the
    // allowed time, so the error can only come from the connection itself
    // (ICE consent: about 9 s).
    let text = check(
        Case::faults(
            vec![Fault::GoSilentAfterFrames(4)],
            &["stopped answering", "after 4 results", "its worker process may have died"],
        )
        .extra("stall-timeout=60000")
        .within(Duration::from_secs(20)),
    );
    assert!(!text.contains("stall-timeout"), "{text}");
}

#[test]
fn processing_complete_never_comes() {
    // All 20 results arrive, then nothing: the result stall, not the upload's.
    check(
        Case::faults(
            vec![Fault::NeverComplete],
            &[&format!(
                "no result from the server for {:.1} s (stall-timeout) after 20 frames",
                f64::from(STALL_TIMEOUT_MS) / 1000.0
            )],
        )
        .within(Duration::from_millis(u64::from(STALL_TIMEOUT_MS) + 12000)),
    );
}

#[test]
fn result_total_chunks_zero() {
    check(Case::faults(vec![Fault::ResultTotalChunksZero], &["invalid", "total_chunks 0"]));
}

#[test]
fn result_total_chunks_huge() {
    check(Case::faults(vec![Fault::ResultTotalChunksHuge], &["invalid", "more than the limit"]));
}

#[test]
fn result_total_chunks_changing() {
    check(Case::faults(vec![Fault::ResultTotalChunksChanging], &["invalid", "earlier chunks said"]));
}

#[test]
fn a_gzip_bomb() {
    // A 2 MB limit (8 MB inflated) stops the 1 GiB bomb as surely as the
    // default, with less to inflate.
    check(
        Case::faults(vec![Fault::GzipBomb], &["invalid", "decompress to more than", "max-result-size"])
            // Building the bomb (1 GiB of zeros) takes the debug-built
            // worker seconds on a loaded machine: not a stall of ours.
            .extra("max-result-size=2000000 stall-timeout=30000")
            .within(Duration::from_secs(40)),
    );
}

#[test]
fn invalid_json() {
    check(Case::faults(vec![Fault::InvalidJson], &["not valid JSON"]));
}

#[test]
fn a_frame_over_the_size_limit() {
    check(
        Case::faults(vec![Fault::OversizeFrame(2_000_000)], &["invalid", "max-result-size"])
            .extra("max-result-size=1000000"),
    );
}

#[test]
fn an_empty_input() {
    check(Case::new(Some(WorkerConfig::default()), &["input is empty"]).input(Input::Empty));
}

#[test]
fn zero_frames_decoded() {
    check(Case::faults(vec![Fault::DecodeNothing], &["decoded no frames"]));
}

#[test]
fn an_unwritable_spool_dir() {
    // Root ignores permission bits, but nobody can create files in /proc.
    let readonly = tempfile::tempdir().unwrap();
    let dir = if is_root() {
        PathBuf::from("/proc")
    } else {
        let mut permissions = std::fs::metadata(readonly.path()).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut permissions, 0o555);
        std::fs::set_permissions(readonly.path(), permissions).unwrap();
        readonly.path().to_owned()
    };
    // The case's own spool-dir is replaced by this later property.
    let text = check(
        Case::new(Some(WorkerConfig::default()), &["spool-dir", "cannot create a spool file"])
            .extra(&format!("spool-dir={}", dir.display())),
    );
    assert!(text.contains(&dir.display().to_string()), "{text}");
}

#[test]
fn a_spool_over_max_spool_size() {
    check(
        Case::new(Some(WorkerConfig::default()), &["max-spool-size"])
            .input(Input::Random { bytes: 300_000 })
            .extra("max-spool-size=100000"),
    );
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|status| status.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0")))
        .unwrap_or(false)
}

/// A spool-dir that really runs out of space: a 256 KiB tmpfs, which only
/// root can mount (CI runs as root). Elsewhere max-spool-size covers it.
#[test]
fn a_spool_dir_that_runs_out_of_space() {
    if !is_root() {
        eprintln!("SKIPPED: mounting a small tmpfs needs root; a_spool_over_max_spool_size covers the limit");
        return;
    }
    let mount = tempfile::tempdir().unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=256k", "tmpfs"])
        .arg(mount.path())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(mounted, "mount -t tmpfs failed although running as root");
    let result = std::panic::catch_unwind(|| {
        check(
            Case::new(Some(WorkerConfig::default()), &["spool file", "No space left on device"])
                .input(Input::Random { bytes: 1_000_000 })
                .extra(&format!("spool-dir={}", mount.path().display())),
        )
    });
    let leftover = files_in(mount.path());
    let _ = std::process::Command::new("umount").arg(mount.path()).status();
    assert!(leftover.is_empty(), "spool file left on the full tmpfs: {leftover:?}");
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

#[test]
fn missing_keepalive_echoes_are_a_warning_not_an_error() {
    let _serial = SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    init();
    let dir = tempfile::tempdir().unwrap();
    // Snow at a high bitrate: about 1 MB, so that the slowed upload lasts
    // several keepalive intervals.
    let blob = dir.path().join("noisy.mp4");
    let maker = launch(&format!(
        "videotestsrc num-buffers=30 pattern=snow ! video/x-raw,width=320,height=240,framerate=30/1 \
         ! x264enc speed-preset=ultrafast bitrate=8000 ! mp4mux ! filesink location={}",
        blob.display()
    ));
    assert!(run(&maker, Duration::from_secs(60)).eos);
    let worker = TestWorker::start(WorkerConfig {
        faults: vec![Fault::NoKeepaliveEcho],
        upload_read_delay: Some(Duration::from_millis(150)),
        ..Default::default()
    });
    let pipeline = launch(&format!(
        "filesrc location={} ! roboflowuploadsink chunk-size=4096 buffer-limit=65536 keepalive-interval=200 {}",
        blob.display(),
        sink_properties(&worker.url())
    ));
    let outcome = run(&pipeline, Duration::from_secs(60));
    assert!(outcome.eos, "the job still completes: {outcome:?}");
    assert!(
        outcome.warnings.iter().any(|w| w.contains("no echo")),
        "a warning names the missing echoes: {:?}",
        outcome.warnings
    );
}

/// NULL from each phase: returns within a second, no temp file, tasks back.
fn null_during(phase: &str, worker: WorkerConfig, ready: impl Fn(&gst::Message) -> bool) {
    let _serial = SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    init();
    let baseline = gstroboflow::live_tasks();
    let dir = tempfile::tempdir().unwrap();
    let spool = tempfile::tempdir().unwrap();
    let clip = make_clip(&dir.path().join("clip.mp4"), 60, 320, 240);
    let worker = TestWorker::start(worker);
    let pipeline = launch(&format!(
        "filesrc location={} ! roboflowuploadsink upload-mode=spool spool-dir={} buffer-limit=65536 {}",
        clip.display(),
        spool.path().display(),
        sink_properties(&worker.url())
    ));
    pipeline.set_state(gst::State::Playing).unwrap();
    let bus = pipeline.bus().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut reached = false;
    while Instant::now() < deadline && !reached {
        let Some(message) = bus.timed_pop(gst::ClockTime::from_mseconds(50)) else { continue };
        if let gst::MessageView::Error(err) = message.view() {
            panic!("{phase}: unexpected error {}", err.error());
        }
        reached = ready(&message);
    }
    assert!(reached, "{phase}: the phase was never reached");
    let started = Instant::now();
    pipeline.set_state(gst::State::Null).unwrap();
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(1), "{phase}: NULL took {elapsed:?}");
    drop(pipeline);
    assert!(files_in(spool.path()).is_empty(), "{phase}: temp files left");
    drop(worker);
    let live = tasks_settle(baseline);
    assert!(live <= baseline, "{phase}: {live} tasks alive, {baseline} before");
}

fn is_message(message: &gst::Message, name: &str) -> bool {
    message.structure().is_some_and(|s| s.name() == name)
}

#[test]
fn null_during_connect() {
    null_during(
        "connect",
        WorkerConfig { faults: vec![Fault::DelayAnswer(Duration::from_secs(20))], ..Default::default() },
        |message| matches!(message.view(), gst::MessageView::StreamStart(_)),
    );
}

#[test]
fn null_during_upload() {
    null_during(
        "upload",
        WorkerConfig { upload_read_delay: Some(Duration::from_millis(300)), ..Default::default() },
        |message| is_message(message, "roboflow-upload-progress") && message.structure().unwrap().get::<u64>("uploaded-chunks").unwrap_or(0) >= 1,
    );
}

#[test]
fn null_during_results() {
    null_during(
        "results",
        WorkerConfig { faults: vec![Fault::NeverComplete], ..Default::default() },
        |message| is_message(message, "roboflow-inference"),
    );
}
