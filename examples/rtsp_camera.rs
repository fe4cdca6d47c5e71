//! A loopback RTSP camera: serves `rtsp://127.0.0.1:PORT/cam` (H.264,
//! constrained baseline) with gst-rtsp-server, for `scripts/bench_camera.sh`
//! and for trying `roboflowresultsrc source-url=...` without a camera.
//!
//! ```sh
//! cargo run --release --example rtsp_camera -- --port 8554 --frames 900 \
//!     --fps 15 --width 640 --height 480 [--pattern coded|ball]
//! # in another shell:
//! gst-launch-1.0 -m roboflowresultsrc source-url=rtsp://127.0.0.1:8554/cam \
//!     api-url=http://127.0.0.1:9001 workflow-spec-file=examples/workflows/blur-dominant-color.json \
//!     data-output=rgb_color stream-output=blurred video-transport=track ! fakesink
//! ```
//!
//! It binds 127.0.0.1 only. `--port 0` lets the system pick a free port.
//! Once it listens it prints the URL on a line of its own on stdout; after
//! that, one line per event (a client's stream starting and ending), each
//! prefixed with the seconds since the camera started.
//!
//! Every client gets a media of its own (not shared), which starts at frame
//! 0 when that client plays it: `videotestsrc is-live=true` paces the frames
//! by the clock, and after `--frames` frames its EOS ends the stream (the
//! server sends an RTCP BYE, which FFmpeg and rtspsrc take as the end).
//! The camera itself runs until it is stopped (Ctrl-C, SIGTERM), or, with
//! `--exit-after N`, exits 2 s after N streams ended.
//!
//! Encoding: `x264enc tune=zerolatency speed-preset=ultrafast
//! key-int-max=FPS sliced-threads=false threads=1` (a keyframe a second;
//! one slice per frame: with sliced threads, FFmpeg on the server decodes
//! each keyframe twice), `rtph264pay config-interval=-1` (SPS/PPS before
//! every keyframe, so a client that joins late decodes from the next one).
//!
//! Patterns (`--pattern`):
//! - `coded` (default): frame i is one solid colour that names its index
//!   mod 125: 3 channels x 5 levels (20, 75, 130, 185, 240), r = i / 25 % 5,
//!   g = i / 5 % 5, b = i % 5, the code the tests use. A Workflow that
//!   reports the dominant colour (examples/workflows/blur-dominant-color.json)
//!   then tells which frame the server processed; results come in order, so
//!   indices past 125 unwrap.
//! - `ball`: videotestsrc's moving ball (edges and motion for the encoders
//!   and decoders to work on) on the same colour-coded background: the
//!   background stays the dominant colour.

#![recursion_limit = "256"]

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Instant;

use gst::prelude::*;
use gst_rtsp_server::prelude::*;

const LEVELS: [u8; 5] = [20, 75, 130, 185, 240];
const COLOURS: u64 = 125;

/// The colour of frame `index` (mod [`COLOURS`]).
fn colour(index: u64) -> [u8; 3] {
    let i = (index % COLOURS) as usize;
    [LEVELS[i / 25], LEVELS[(i / 5) % 5], LEVELS[i % 5]]
}

#[derive(Clone, Copy, PartialEq)]
enum Pattern {
    Coded,
    Ball,
}

struct Options {
    port: u16,
    frames: u32,
    fps: u32,
    width: u32,
    height: u32,
    pattern: Pattern,
    exit_after: Option<u32>,
}

fn usage() -> ! {
    eprintln!(
        "usage: rtsp_camera [--port N (8554; 0: any free port)] [--frames N (900)] [--fps N (15)] \
         [--width N (640)] [--height N (480)] [--pattern coded|ball] [--exit-after STREAMS]"
    );
    std::process::exit(2)
}

fn parse_options() -> Options {
    let mut options = Options { port: 8554, frames: 900, fps: 15, width: 640, height: 480, pattern: Pattern::Coded, exit_after: None };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| usage());
        fn number<T: std::str::FromStr>(text: String) -> T {
            text.parse().unwrap_or_else(|_| usage())
        }
        match arg.as_str() {
            "--port" => options.port = number(value()),
            "--frames" => options.frames = number(value()),
            "--fps" => options.fps = number(value()),
            "--width" => options.width = number(value()),
            "--height" => options.height = number(value()),
            "--exit-after" => options.exit_after = Some(number(value())),
            "--pattern" => {
                options.pattern = match value().as_str() {
                    "coded" => Pattern::Coded,
                    "ball" => Pattern::Ball,
                    _ => usage(),
                }
            }
            _ => usage(),
        }
    }
    if options.frames == 0 || options.fps == 0 || options.width < 16 || options.height < 16 {
        usage();
    }
    options
}

struct Camera {
    started: Instant,
    streams: AtomicU32,
    ended: AtomicU32,
    frames_painted: AtomicU64,
}

impl Camera {
    fn event(&self, text: &str) {
        println!("{:.3} {text}", self.started.elapsed().as_secs_f64());
    }
}

fn main() {
    let options = parse_options();
    gst::init().expect("GStreamer initialises");
    let camera = Arc::new(Camera { started: Instant::now(), streams: AtomicU32::new(0), ended: AtomicU32::new(0), frames_painted: AtomicU64::new(0) });
    let main_loop = glib::MainLoop::new(None, false);

    let server = gst_rtsp_server::RTSPServer::new();
    server.set_address("127.0.0.1");
    server.set_service(&options.port.to_string());
    let mounts = server.mount_points().expect("the RTSP server has mount points");
    let factory = gst_rtsp_server::RTSPMediaFactory::new();
    let (fps, frames, width, height) = (options.fps, options.frames, options.width, options.height);
    let pattern = if options.pattern == Pattern::Ball { "ball" } else { "black" };
    factory.set_launch(&format!(
        "( videotestsrc name=frames is-live=true num-buffers={frames} pattern={pattern} \
         ! video/x-raw,format=RGB,width={width},height={height},framerate={fps}/1 \
         ! videoconvert ! video/x-raw,format=I420 \
         ! x264enc tune=zerolatency speed-preset=ultrafast key-int-max={fps} sliced-threads=false threads=1 \
         ! video/x-h264,profile=constrained-baseline \
         ! rtph264pay name=pay0 pt=96 config-interval=-1 )"
    ));
    factory.set_shared(false);
    let media_camera = camera.clone();
    let ball = options.pattern == Pattern::Ball;
    let exit_after = options.exit_after;
    let exit_loop = main_loop.clone();
    factory.connect_media_configure(move |_, media| {
        let stream = media_camera.streams.fetch_add(1, Ordering::SeqCst) + 1;
        let element = media.element();
        let Some(source) = element.downcast_ref::<gst::Bin>().and_then(|bin| bin.by_name_recurse_up("frames")) else {
            media_camera.event(&format!("stream {stream}: no videotestsrc in the media"));
            return;
        };
        let Some(pad) = source.static_pad("src") else { return };
        let camera = media_camera.clone();
        let exit_loop = exit_loop.clone();
        pad.add_probe(gst::PadProbeType::BUFFER | gst::PadProbeType::EVENT_DOWNSTREAM, move |_, info| {
            if let Some(buffer) = info.buffer_mut() {
                let index = buffer.offset();
                let rgb = colour(index);
                if let Ok(mut map) = buffer.make_mut().map_writable() {
                    for pixel in map.chunks_exact_mut(3) {
                        // Ball: only the black background takes the colour.
                        if !ball || (pixel[0] < 16 && pixel[1] < 16 && pixel[2] < 16) {
                            pixel.copy_from_slice(&rgb);
                        }
                    }
                }
                camera.frames_painted.fetch_add(1, Ordering::Relaxed);
                if index == 0 {
                    camera.event(&format!("stream {stream}: first frame"));
                }
            } else if let Some(gst::PadProbeData::Event(event)) = &info.data
                && event.type_() == gst::EventType::Eos
            {
                let ended = camera.ended.fetch_add(1, Ordering::SeqCst) + 1;
                camera.event(&format!("stream {stream}: ended (EOS after {frames} frames)"));
                if exit_after.is_some_and(|n| ended >= n) {
                    // Give the payloader's BYE a moment to leave.
                    let exit_loop = exit_loop.clone();
                    glib::timeout_add_once(std::time::Duration::from_secs(2), move || exit_loop.quit());
                }
            }
            gst::PadProbeReturn::Ok
        });
        media_camera.event(&format!("stream {stream}: media for a client"));
    });
    mounts.add_factory("/cam", factory);
    let _source = server.attach(None).unwrap_or_else(|err| {
        eprintln!("rtsp_camera: cannot listen on 127.0.0.1:{}: {err}", options.port);
        std::process::exit(1)
    });
    println!("rtsp://127.0.0.1:{}/cam", server.bound_port());

    main_loop.run();
    camera.event(&format!(
        "stopping: {} stream(s) started, {} ended, {} frames",
        camera.streams.load(Ordering::SeqCst),
        camera.ended.load(Ordering::SeqCst),
        camera.frames_painted.load(Ordering::SeqCst)
    ));
}
