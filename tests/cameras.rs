// The test cameras of tests/common/cameras.rs, read with plain GStreamer
// clients: every frame arrives, in order, with its colour.

mod common;

use std::time::{Duration, Instant};

use common::cameras::{MjpegCamera, RtspCamera};
use common::live::index_of;
use gst_video::prelude::*;

const WIDTH: u32 = 160;
const HEIGHT: u32 = 120;

/// Runs `description` (ending in `appsink name=sink`) until EOS, an error
/// or `timeout`; returns the frame index each picture's colour encodes, and
/// whether the stream ended.
fn read_indices(description: &str, timeout: Duration) -> (Vec<Option<u64>>, bool) {
    gst::init().unwrap();
    let pipeline = gst::parse::launch(description)
        .unwrap()
        .downcast::<gst::Pipeline>()
        .unwrap();
    let sink = pipeline
        .by_name("sink")
        .unwrap()
        .downcast::<gst_app::AppSink>()
        .unwrap();
    let bus = pipeline.bus().unwrap();
    pipeline.set_state(gst::State::Playing).unwrap();
    let deadline = Instant::now() + timeout;
    let mut indices = Vec::new();
    let mut ended = false;
    while Instant::now() < deadline {
        if let Some(sample) = sink.try_pull_sample(gst::ClockTime::from_mseconds(50)) {
            indices.push(index_of(centre_rgb(&sample)));
            continue;
        }
        if sink.is_eos() {
            ended = true;
            break;
        }
        if let Some(message) = bus.pop_filtered(&[gst::MessageType::Error]) {
            panic!("{description}: {message:?}");
        }
    }
    pipeline.set_state(gst::State::Null).unwrap();
    (indices, ended)
}

fn centre_rgb(sample: &gst::Sample) -> [f64; 3] {
    let info = gst_video::VideoInfo::from_caps(sample.caps().unwrap()).unwrap();
    let buffer = sample.buffer().unwrap();
    let frame = gst_video::VideoFrameRef::from_buffer_ref_readable(buffer, &info).unwrap();
    let stride = frame.plane_stride()[0] as usize;
    let data = frame.plane_data(0).unwrap();
    let offset = (info.height() as usize / 2) * stride + (info.width() as usize / 2) * 3;
    [0, 1, 2].map(|k| f64::from(data[offset + k]))
}

fn expected(frames: u32) -> Vec<Option<u64>> {
    (0..u64::from(frames)).map(Some).collect()
}

#[test]
fn rtsp_camera_plays_every_frame_in_order_then_ends() {
    let frames = 20;
    let camera = RtspCamera::start(frames, 20, WIDTH, HEIGHT);
    let description = format!(
        "rtspsrc location={} protocols=tcp latency=0 ! rtph264depay ! avdec_h264 \
         ! videoconvert ! video/x-raw,format=RGB ! appsink name=sink sync=false",
        camera.url()
    );
    let (indices, ended) = read_indices(&description, Duration::from_secs(15));
    assert_eq!(indices, expected(frames));
    assert!(ended, "no end of stream after the last frame");
    assert_eq!(camera.clients(), 1);
    assert_eq!(camera.frames_pushed(), u64::from(frames));
}

#[test]
fn rtsp_camera_gives_each_client_its_own_stream_from_frame_0() {
    let frames = 10;
    let camera = RtspCamera::start(frames, 20, WIDTH, HEIGHT);
    for url in [camera.url(), camera.url_with_credentials("user", "secret")] {
        let description = format!(
            "rtspsrc location={url} protocols=tcp latency=0 ! rtph264depay ! avdec_h264 \
             ! videoconvert ! video/x-raw,format=RGB ! appsink name=sink sync=false"
        );
        let (indices, ended) = read_indices(&description, Duration::from_secs(15));
        assert_eq!(indices, expected(frames), "{url}");
        assert!(ended, "{url}: no end of stream");
    }
    assert_eq!(camera.clients(), 2);
    assert_eq!(camera.frames_pushed(), 2 * u64::from(frames));
}

#[test]
fn mjpeg_camera_sends_every_frame_in_order_then_closes() {
    let frames = 15;
    let camera = MjpegCamera::start(frames, 30, WIDTH, HEIGHT);
    let description = format!(
        "souphttpsrc location={} ! multipartdemux ! jpegdec ! videoconvert \
         ! video/x-raw,format=RGB ! appsink name=sink sync=false",
        camera.url()
    );
    let (indices, ended) = read_indices(&description, Duration::from_secs(15));
    assert_eq!(indices, expected(frames));
    assert!(ended, "no end of stream after the last part");
    assert_eq!(camera.requests(), 1);
    assert_eq!(camera.frames_sent(), u64::from(frames));
}

#[test]
fn mjpeg_camera_answers_404_elsewhere_and_paces_at_its_rate() {
    use std::io::{Read as _, Write as _};
    let frames = 10;
    let camera = MjpegCamera::start(frames, 20, WIDTH, HEIGHT);
    let address = format!("127.0.0.1:{}", camera.port());

    let mut other = std::net::TcpStream::connect(&address).unwrap();
    other
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    other
        .write_all(b"GET /other HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    other.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");

    let started = Instant::now();
    let mut stream = std::net::TcpStream::connect(&address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream
        .write_all(b"GET /stream.mjpg HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut body = Vec::new();
    stream.read_to_end(&mut body).unwrap();
    let elapsed = started.elapsed();
    let text = String::from_utf8_lossy(&body);
    assert!(
        text.starts_with("HTTP/1.1 200 OK\r\n"),
        "{}",
        &text[..60.min(text.len())]
    );
    assert!(text.contains("Content-Type: multipart/x-mixed-replace; boundary=frame\r\n"));
    assert_eq!(
        text.matches("--frame\r\nContent-Type: image/jpeg\r\nContent-Length: ")
            .count(),
        frames as usize
    );
    assert!(text.ends_with("\r\n"), "the last part is cut");
    // 10 frames at 20 fps: the last is due 450 ms after the first.
    assert!(
        elapsed >= Duration::from_millis(400),
        "not paced: {elapsed:?}"
    );
    assert_eq!(camera.requests(), 2);
}
