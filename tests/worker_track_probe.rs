// Scratch probe of the test worker's returned video track (PROTOCOL §6):
// a minimal webrtc-rs offerer, independent of the plugin.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use common::harness;
use common::worker::{SessionReport, TestWorker, TrackCodec, WorkerConfig};
use gst::prelude::*;
use rtc::ice::mdns::MulticastDnsMode;
use rtc::rtp_transceiver::rtp_sender::RtpCodecKind;
use rtc::rtp_transceiver::{RTCRtpTransceiverDirection, RTCRtpTransceiverInit};
use rtc::shared::marshal::Marshal;
use serde_json::{Value, json};
use tokio::sync::watch;
use webrtc::data_channel::DataChannelEvent;
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::peer_connection::{
    MediaEngine, PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler,
    RTCConfigurationBuilder, RTCIceGatheringState, RTCSessionDescription, Registry,
    SettingEngineBuilder, register_default_interceptors,
};

#[derive(Clone, Debug)]
struct RtpSeen {
    order: u64,
    seq: u16,
    ts: u32,
    marker: bool,
    pt: u8,
    ssrc: u32,
    bytes: Vec<u8>,
}

#[derive(Default)]
struct Seen {
    /// frame_id -> (order, pts)
    json: HashMap<u64, (u64, u64)>,
    rtp: Vec<RtpSeen>,
    complete: bool,
    codec: Option<String>,
}

struct Probe {
    seen: Arc<Mutex<Seen>>,
    order: Arc<AtomicU64>,
    gathered: watch::Sender<bool>,
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for Probe {
    async fn on_ice_gathering_state_change(&self, state: RTCIceGatheringState) {
        if state == RTCIceGatheringState::Complete {
            self.gathered.send_replace(true);
        }
    }
    async fn on_track(&self, track: Arc<dyn TrackRemote>) {
        let seen = self.seen.clone();
        let order = self.order.clone();
        tokio::spawn(async move {
            for _ in 0..1_000_000 {
                let Some(event) = track.poll().await else { break };
                match event {
                    TrackRemoteEvent::OnRtpPacket(packet) => {
                        if seen.lock().unwrap().codec.is_none() {
                            let codec = track.codec(packet.header.ssrc).await;
                            seen.lock().unwrap().codec = codec.map(|c| c.mime_type);
                        }
                        let bytes = packet.marshal().unwrap().to_vec();
                        seen.lock().unwrap().rtp.push(RtpSeen {
                            order: order.fetch_add(1, Ordering::SeqCst),
                            seq: packet.header.sequence_number,
                            ts: packet.header.timestamp,
                            marker: packet.header.marker,
                            pt: packet.header.payload_type,
                            ssrc: packet.header.ssrc,
                            bytes,
                        });
                    }
                    TrackRemoteEvent::OnEnded => break,
                    _ => {}
                }
            }
        });
    }
}

struct Run {
    seen: Seen,
    report: SessionReport,
    elapsed: Duration,
}

fn run_probe(config: WorkerConfig, stream_output: Value, clip: &std::path::Path) -> Run {
    let worker = TestWorker::start(config);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let started = Instant::now();
    let file = std::fs::read(clip).unwrap();
    let url = worker.url();
    runtime.block_on(async {
        let mut media = MediaEngine::default();
        media.register_default_codecs().unwrap();
        let registry = register_default_interceptors(Registry::new(), &mut media).unwrap();
        let (gathered_tx, mut gathered_rx) = watch::channel(false);
        let order = Arc::new(AtomicU64::new(0));
        let peer = PeerConnectionBuilder::new()
            .with_configuration(RTCConfigurationBuilder::new().build())
            .with_media_engine(media)
            .with_setting_engine(
                SettingEngineBuilder::new()
                    .with_multicast_dns_mode(MulticastDnsMode::Disabled)
                    .build(),
            )
            .with_interceptor_registry(registry)
            .with_handler(Arc::new(Probe {
                seen: seen.clone(),
                order: order.clone(),
                gathered: gathered_tx,
            }))
            .with_udp_addrs(vec!["127.0.0.1:0".to_string()])
            .build()
            .await
            .unwrap();
        let peer: Arc<dyn PeerConnection> = Arc::new(peer);
        peer.add_transceiver_from_kind(
            RtpCodecKind::Video,
            Some(RTCRtpTransceiverInit {
                direction: RTCRtpTransceiverDirection::Recvonly,
                streams: Vec::new(),
                send_encodings: Vec::new(),
            }),
        )
        .await
        .unwrap();
        let inference = peer.create_data_channel("inference", None).await.unwrap();
        let upload = peer.create_data_channel("video_upload", None).await.unwrap();
        let offer = peer.create_offer(None).await.unwrap();
        peer.set_local_description(offer).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), gathered_rx.wait_for(|g| *g))
            .await
            .unwrap()
            .unwrap();
        let offer = peer.local_description().await.unwrap();
        let body = json!({
            "api_key": "k",
            "workflow_configuration": {"type": "WorkflowConfiguration", "workflow_specification": {"steps": []}},
            "webrtc_offer": {"type": "offer", "sdp": offer.sdp},
            "webrtc_realtime_processing": false,
            "stream_output": stream_output,
            "data_output": [],
        });
        let answer: Value = reqwest::Client::new()
            .post(format!("{url}/initialise_webrtc_worker"))
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let answer_sdp = answer["sdp"].as_str().unwrap().to_owned();
        eprintln!(
            "answer video section: {:?}",
            answer_sdp
                .lines()
                .skip_while(|l| !l.starts_with("m=video"))
                .take_while(|l| !l.starts_with("m=application"))
                .filter(|l| l.starts_with("m=") || l.starts_with("a=rtpmap") || l.starts_with("a=send") || l.starts_with("a=recv") || l.starts_with("a=inactive") || l.starts_with("a=ssrc:") )
                .collect::<Vec<_>>()
        );
        peer.set_remote_description(RTCSessionDescription::answer(answer_sdp).unwrap())
            .await
            .unwrap();

        // Results: reassemble, record, ack each frame.
        let results = {
            let seen = seen.clone();
            let order = order.clone();
            let inference = inference.clone();
            tokio::spawn(async move {
                let mut parts: HashMap<u32, Vec<Vec<u8>>> = HashMap::new();
                for _ in 0..100_000 {
                    let Ok(Some(event)) = tokio::time::timeout(Duration::from_secs(60), inference.poll()).await else { break };
                    let DataChannelEvent::OnMessage(message) = event else {
                        if matches!(event, DataChannelEvent::OnClose) { break }
                        continue;
                    };
                    let data = &message.data;
                    let frame_id = u32::from_le_bytes(data[0..4].try_into().unwrap());
                    let total = u32::from_le_bytes(data[8..12].try_into().unwrap()) as usize;
                    let chunks = parts.entry(frame_id).or_default();
                    chunks.push(data[12..].to_vec());
                    if chunks.len() < total {
                        continue;
                    }
                    let payload: Vec<u8> = parts.remove(&frame_id).unwrap().concat();
                    let value: Value = serde_json::from_slice(&payload).unwrap();
                    let at = order.fetch_add(1, Ordering::SeqCst);
                    if value["processing_complete"].as_bool() == Some(true) {
                        seen.lock().unwrap().complete = true;
                        break;
                    }
                    let pts = value["video_metadata"]["pts"].as_u64().unwrap();
                    let id = value["video_metadata"]["frame_id"].as_u64().unwrap();
                    seen.lock().unwrap().json.insert(id, (at, pts));
                    let ack = BytesMut::from(json!({"ack": id}).to_string().as_bytes());
                    let _ = inference.send(ack).await;
                }
            })
        };

        // Upload once the upload channel is open.
        for _ in 0..1000 {
            match tokio::time::timeout(Duration::from_secs(10), upload.poll()).await {
                Ok(Some(DataChannelEvent::OnOpen)) => break,
                Ok(Some(_)) => continue,
                _ => panic!("upload channel did not open"),
            }
        }
        let chunks: Vec<&[u8]> = file.chunks(48 * 1024).collect();
        let total = chunks.len() as u32;
        for (index, chunk) in chunks.iter().enumerate() {
            let mut message = BytesMut::new();
            message.extend_from_slice(&(index as u32).to_le_bytes());
            message.extend_from_slice(&total.to_le_bytes());
            message.extend_from_slice(chunk);
            upload.send(message).await.unwrap();
        }
        let upload_poller = tokio::spawn(async move {
            for _ in 0..1000 {
                if upload.poll().await.is_none() {
                    break;
                }
            }
        });
        let _ = tokio::time::timeout(Duration::from_secs(90), results).await;
        // Let trailing RTP land.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let _ = tokio::time::timeout(Duration::from_secs(3), peer.close()).await;
        upload_poller.abort();
    });
    let elapsed = started.elapsed();
    let report = worker
        .wait_until(Duration::from_secs(5), |s| s.first().is_some_and(|s| s.closed))
        .into_iter()
        .next()
        .unwrap();
    drop(worker);
    runtime.shutdown_timeout(Duration::from_secs(2));
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    Run {
        seen,
        report,
        elapsed,
    }
}

/// Decodes the received packets with GStreamer; returns (frames, mean luma-ish of frame 1).
fn decode_received(run: &Run, encoding: &str) -> (usize, Vec<f64>) {
    harness::init();
    let pt = run.seen.rtp.first().map(|p| p.pt).unwrap_or(96);
    let (depay, dec) = match encoding {
        "VP8" => ("rtpvp8depay", "vp8dec"),
        _ => ("rtph264depay", "avdec_h264"),
    };
    let pipeline = harness::launch(&format!(
        "appsrc name=src format=time caps=application/x-rtp,media=video,encoding-name={encoding},clock-rate=90000,payload={pt} \
         ! rtpjitterbuffer latency=0 ! {depay} ! {dec} ! videoconvert ! video/x-raw,format=RGB ! appsink name=sink sync=false"
    ));
    let src = pipeline.by_name("src").unwrap().downcast::<gst_app::AppSrc>().unwrap();
    let sink = pipeline.by_name("sink").unwrap().downcast::<gst_app::AppSink>().unwrap();
    pipeline.set_state(gst::State::Playing).unwrap();
    let first_ts = run.seen.rtp.first().map(|p| p.ts).unwrap_or(0);
    for packet in &run.seen.rtp {
        let mut buffer = gst::Buffer::from_slice(packet.bytes.clone());
        let units = packet.ts.wrapping_sub(first_ts) as u64;
        buffer.get_mut().unwrap().set_pts(gst::ClockTime::from_nseconds(units * 1_000_000_000 / 90_000));
        src.push_buffer(buffer).unwrap();
    }
    src.end_of_stream().unwrap();
    let mut means = Vec::new();
    for _ in 0..10_000 {
        let Some(sample) = sink.try_pull_sample(gst::ClockTime::from_seconds(5)) else { break };
        let buffer = sample.buffer().unwrap();
        let map = buffer.map_readable().unwrap();
        let sum: u64 = map.iter().map(|b| u64::from(*b)).sum();
        means.push(sum as f64 / map.len() as f64);
    }
    pipeline.set_state(gst::State::Null).unwrap();
    (means.len(), means)
}

fn summarize(name: &str, run: &Run, frames_expected: u32) {
    let seen = &run.seen;
    let report = &run.report;
    let origin = report.rtp_origin.expect("an origin");
    let markers = seen.rtp.iter().filter(|p| p.marker).count();
    let mut distinct_ts: Vec<u32> = seen.rtp.iter().map(|p| p.ts).collect();
    distinct_ts.dedup();
    // Every RTP timestamp is origin + the pts of a JSON frame.
    let pts_of: HashMap<u64, (u64, u64)> =
        seen.json.iter().map(|(id, (order, pts))| (*pts, (*id, *order))).collect();
    let mut unmatched = 0;
    let mut rtp_before_json = 0;
    let mut first_packet_order: HashMap<u32, u64> = HashMap::new();
    for packet in &seen.rtp {
        first_packet_order.entry(packet.ts).or_insert(packet.order);
    }
    for (ts, order) in &first_packet_order {
        let pts = ts.wrapping_sub(origin) as u64;
        match pts_of.get(&pts) {
            None => unmatched += 1,
            Some((id, json_order)) if json_order > order => {
                rtp_before_json += 1;
                eprintln!("  frame {id}: RTP recorded before its JSON");
            }
            _ => {}
        }
    }
    let seq_gaps = seen
        .rtp
        .windows(2)
        .filter(|w| w[1].seq != w[0].seq.wrapping_add(1))
        .count();
    let ssrcs: std::collections::BTreeSet<u32> = seen.rtp.iter().map(|p| p.ssrc).collect();
    let pts: std::collections::BTreeSet<u8> = seen.rtp.iter().map(|p| p.pt).collect();
    eprintln!(
        "[{name}] {:.1}s json={} complete={} rtp_packets={} marker_frames={} distinct_ts={} \
         unmatched_ts={unmatched} rtp_before_json={rtp_before_json} seq_gaps={seq_gaps} ssrcs={ssrcs:?} pts={pts:?} \
         codec_seen={:?} | report: codec={:?} pt={:?} ssrc={:?} origin={:?} frames_sent={} packets_sent={} dropped={} errors={:?} expected={frames_expected}",
        run.elapsed.as_secs_f64(),
        seen.json.len(),
        seen.complete,
        seen.rtp.len(),
        markers,
        first_packet_order.len(),
        seen.codec,
        report.track_codec,
        report.track_payload_type,
        report.track_ssrc,
        report.rtp_origin,
        report.track_frames_sent,
        report.track_packets_sent,
        report.track_frames_dropped,
        report.track_errors,
    );
}

fn clip(dir: &std::path::Path) -> std::path::PathBuf {
    harness::init();
    harness::make_clip(&dir.join("clip.mp4"), 30, 320, 240)
}

#[test]
fn vp8_by_default_with_pts_timestamps() {
    let dir = tempfile::tempdir().unwrap();
    let clip = clip(dir.path());
    let run = run_probe(WorkerConfig::default(), Value::Null, &clip);
    summarize("vp8", &run, 30);
    let (decoded, means) = decode_received(&run, "VP8");
    eprintln!("[vp8] decoded {decoded} frames, first means {:?}", &means[..means.len().min(3)]);
    assert_eq!(run.report.track_codec.as_deref(), Some("video/VP8"));
    assert_eq!(run.seen.rtp.iter().filter(|p| p.marker).count(), 30);
}

#[test]
fn h264_when_forced() {
    let dir = tempfile::tempdir().unwrap();
    let clip = clip(dir.path());
    let config = WorkerConfig { track_codec: TrackCodec::H264, ..WorkerConfig::default() };
    let run = run_probe(config, json!(["image"]), &clip);
    summarize("h264", &run, 30);
    let (decoded, means) = decode_received(&run, "H264");
    eprintln!("[h264] decoded {decoded} frames, first means {:?}", &means[..means.len().min(3)]);
    assert_eq!(run.report.track_codec.as_deref(), Some("video/H264"));
    assert_eq!(run.seen.rtp.iter().filter(|p| p.marker).count(), 30);
}

#[test]
fn drops_and_wraps() {
    let dir = tempfile::tempdir().unwrap();
    let clip = clip(dir.path());
    let config = WorkerConfig {
        track_drop_every: Some(3),
        track_rtp_origin: Some(u32::MAX - 45_000),
        ..WorkerConfig::default()
    };
    let run = run_probe(config, json!(["image"]), &clip);
    summarize("drop3+wrap", &run, 20);
    let (decoded, _) = decode_received(&run, "VP8");
    eprintln!("[drop3+wrap] decoded {decoded} frames");
    assert_eq!(run.seen.rtp.iter().filter(|p| p.marker).count(), 20);
}

#[test]
fn no_track_when_stream_output_is_empty() {
    let dir = tempfile::tempdir().unwrap();
    let clip = clip(dir.path());
    let run = run_probe(WorkerConfig::default(), json!([]), &clip);
    summarize_no_track(&run);
    assert!(run.report.track_codec.is_none());
    assert!(run.seen.rtp.is_empty());
    assert_eq!(run.seen.json.len(), 30);
}

fn summarize_no_track(run: &Run) {
    eprintln!(
        "[none] json={} complete={} rtp={} report codec={:?}",
        run.seen.json.len(),
        run.seen.complete,
        run.seen.rtp.len(),
        run.report.track_codec
    );
}

// --- End to end with the plugin (track transport) ---------------------------

fn plugin_run(config: WorkerConfig, frames: u32, width: u32, extra: &str) -> (usize, Vec<Option<u64>>, Vec<f64>, Option<gst::Structure>, SessionReport, harness::Outcome) {
    harness::init();
    let dir = tempfile::tempdir().unwrap();
    let clip = harness::make_clip(&dir.path().join("clip.mp4"), frames, width, width * 3 / 4);
    let worker = TestWorker::start(config);
    let pipeline = harness::launch(&format!(
        "filesrc location={} ! roboflowuploadsink session=e2e video-transport=track stream-output=image {} {extra} \
         roboflowresultsrc name=results session=e2e ! videoconvert ! video/x-raw,format=RGB ! appsink name=out sync=false",
        clip.display(),
        harness::sink_properties(&worker.url())
    ));
    let appsink = pipeline.by_name("out").unwrap().downcast::<gst_app::AppSink>().unwrap();
    let received: Arc<Mutex<(Vec<Option<u64>>, Vec<f64>)>> = Arc::default();
    let sink_received = received.clone();
    appsink.set_callbacks(
        gst_app::AppSinkCallbacks::builder()
            .new_sample(move |sink| {
                let sample = sink.pull_sample().map_err(|_| gst::FlowError::Eos)?;
                let buffer = sample.buffer().unwrap();
                let meta = gst::meta::CustomMeta::from_buffer(buffer, gstroboflow::META_NAME).ok();
                let frame_id = meta.as_ref().and_then(|m| m.structure().get::<u64>("frame-id").ok());
                let map = buffer.map_readable().unwrap();
                let mean = map.iter().map(|b| u64::from(*b)).sum::<u64>() as f64 / map.len() as f64;
                let mut received = sink_received.lock().unwrap();
                received.0.push(frame_id);
                received.1.push(mean);
                Ok(gst::FlowSuccess::Ok)
            })
            .build(),
    );
    let results = pipeline.by_name("results").unwrap();
    let mut stats = None;
    let outcome = harness::run_with(&pipeline, Duration::from_secs(120), |_, message| {
        if let gst::MessageView::Eos(_) = message.view() {
            stats = Some(results.property::<gst::Structure>("stats"));
        }
        false
    });
    let report = worker
        .wait_until(Duration::from_secs(5), |s| s.first().is_some_and(|s| s.closed))
        .into_iter()
        .next()
        .unwrap();
    let (ids, means) = std::mem::take(&mut *received.lock().unwrap());
    (ids.len(), ids, means, stats, report, outcome)
}

fn plugin_case(name: &str, config: WorkerConfig, frames: u32, width: u32) -> usize {
    plugin_case_with(name, config, frames, width, "")
}

fn plugin_case_with(name: &str, config: WorkerConfig, frames: u32, width: u32, extra: &str) -> usize {
    let started = Instant::now();
    let (count, ids, means, stats, report, outcome) = plugin_run(config, frames, width, extra);
    let paired = ids.iter().filter(|id| id.is_some()).count();
    eprintln!(
        "[e2e {name}] {:.1}s eos={} error={:?} frames_out={count} paired={paired} first_ids={:?} mean0={:?} \
         | worker: codec={:?} pt={:?} origin={:?} frames_sent={} dropped={} results={} acks={} errors={:?}\n  stats={stats:?}",
        started.elapsed().as_secs_f64(),
        outcome.eos,
        outcome.error,
        &ids[..ids.len().min(5)],
        means.first(),
        report.track_codec,
        report.track_payload_type,
        report.rtp_origin,
        report.track_frames_sent,
        report.track_frames_dropped,
        report.results_sent,
        report.acks.len(),
        report.track_errors,
    );
    count
}

#[test]
fn e2e_plugin_vp8() {
    plugin_case("vp8", WorkerConfig::default(), 30, 320);
}

#[test]
fn e2e_plugin_h264() {
    plugin_case("h264", WorkerConfig { track_codec: TrackCodec::H264, ..WorkerConfig::default() }, 30, 320);
}

#[test]
fn e2e_plugin_drop3_wrap() {
    plugin_case(
        "drop3+wrap",
        WorkerConfig { track_drop_every: Some(3), track_rtp_origin: Some(u32::MAX - 45_000), ..WorkerConfig::default() },
        30,
        320,
    );
}

#[test]
fn e2e_plugin_300_frames_720p() {
    plugin_case("300x720p", WorkerConfig::default(), 300, 1280);
}

#[test]
fn e2e_plugin_300_frames_720p_realtime() {
    plugin_case_with("300x720p realtime", WorkerConfig::default(), 300, 1280, "realtime-processing=true");
}

#[test]
fn e2e_plugin_300_frames_720p_h264() {
    plugin_case("300x720p h264", WorkerConfig { track_codec: TrackCodec::H264, ..WorkerConfig::default() }, 300, 1280);
}
