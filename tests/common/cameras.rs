//! Test cameras for server-pull sources (PROTOCOL §11): an RTSP camera and
//! an MJPEG-over-HTTP camera, both in-process on 127.0.0.1.
//!
//! Each plays `frames` frames from index 0 at `fps` and then ends, so a
//! session that reads one sees the end of the stream. Frame `i` is a solid
//! [`super::live::colour`]`(i)`: the dominant colour a Workflow reports
//! tells which camera frame the server processed.

#![allow(dead_code)]

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use gst::prelude::*;
use gst_rtsp_server::prelude::*;

use super::live::{COLOURS, colour};

/// How long Drop waits for a camera's thread before it gives up on it.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the cameras wait for their own set-up.
const START_TIMEOUT: Duration = Duration::from_secs(10);

fn init_gstreamer() {
    static INIT: Once = Once::new();
    INIT.call_once(|| gst::init().expect("GStreamer initialises"));
}

// ---------------------------------------------------------------------------
// RTSP
// ---------------------------------------------------------------------------

/// An RTSP server on 127.0.0.1 with one mount, `/cam`, serving H.264.
///
/// Every client gets a media of its own (not shared), which starts at
/// frame 0 when that client plays it. The frames are produced live, at
/// `fps`, and the stream ends after `frames` of them: the payloader's EOS
/// makes the server send an RTCP BYE, which RTSP clients (rtspsrc, FFmpeg)
/// take as the end of the stream. No authentication is configured.
pub struct RtspCamera {
    port: u16,
    frames: u32,
    counters: Arc<RtspCounters>,
    main_loop: glib::MainLoop,
    stopped: std::sync::mpsc::Receiver<()>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
struct RtspCounters {
    clients: AtomicU32,
    frames_pushed: AtomicU64,
    /// When the newest frame was fed to the encoder.
    last_frame_at: std::sync::Mutex<Option<std::time::Instant>>,
}

impl RtspCamera {
    pub fn start(frames: u32, fps: u32, width: u32, height: u32) -> RtspCamera {
        init_gstreamer();
        assert!(
            frames > 0 && fps > 0,
            "a camera needs frames and a frame rate"
        );
        let counters = Arc::new(RtspCounters::default());
        let (ready_tx, ready_rx) =
            std::sync::mpsc::channel::<Result<(u16, glib::MainLoop), String>>();
        let (stopped_tx, stopped_rx) = std::sync::mpsc::channel::<()>();
        let thread_counters = counters.clone();
        let thread = std::thread::Builder::new()
            .name("rtsp-camera".into())
            .spawn(move || {
                let context = glib::MainContext::new();
                let main_loop = glib::MainLoop::new(Some(&context), false);
                let served = serve_rtsp(&context, frames, fps, width, height, thread_counters);
                let (server, source) = match served {
                    Ok(served) => served,
                    Err(err) => {
                        let _ = ready_tx.send(Err(err));
                        return;
                    }
                };
                let port = server.bound_port();
                let ready = u16::try_from(port)
                    .map(|port| (port, main_loop.clone()))
                    .map_err(|_| format!("the RTSP server is bound to port {port}"));
                let _ = ready_tx.send(ready);
                main_loop.run();
                // No new connections, and every client (and its media) closed.
                // SourceId::remove() looks in the default context, not this one.
                if let Some(source) = context.find_source_by_id(&source) {
                    source.destroy();
                }
                server.client_filter(Some(&mut |_, _| gst_rtsp_server::RTSPFilterResult::Remove));
                // Let the clients' close callbacks run on this context.
                while context.iteration(false) {}
                drop(server);
                let _ = stopped_tx.send(());
            })
            .expect("spawn the RTSP camera thread");
        let (port, main_loop) = match ready_rx.recv_timeout(START_TIMEOUT) {
            Ok(Ok(ready)) => ready,
            Ok(Err(err)) => panic!("RTSP camera failed to start: {err}"),
            Err(err) => panic!("RTSP camera did not start within {START_TIMEOUT:?}: {err}"),
        };
        RtspCamera {
            port,
            frames,
            counters,
            main_loop,
            stopped: stopped_rx,
            thread: Some(thread),
        }
    }

    /// `rtsp://127.0.0.1:PORT/cam`
    pub fn url(&self) -> String {
        format!("rtsp://127.0.0.1:{}/cam", self.port)
    }

    /// The same stream with credentials in the URL; the camera accepts any.
    pub fn url_with_credentials(&self, user: &str, password: &str) -> String {
        format!("rtsp://{user}:{password}@127.0.0.1:{}/cam", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Medias made, one per client session that asked for the stream.
    pub fn clients(&self) -> u32 {
        self.counters.clients.load(Ordering::SeqCst)
    }

    /// Frames fed to the encoder, by all medias together.
    pub fn frames_pushed(&self) -> u64 {
        self.counters.frames_pushed.load(Ordering::SeqCst)
    }

    /// When the last frame of a stream was fed to the encoder, once a whole
    /// stream (`frames`, for one client) has been played.
    pub fn finished_at(&self) -> Option<std::time::Instant> {
        (self.frames_pushed() >= u64::from(self.frames)).then(|| *self.counters.last_frame_at.lock().unwrap()).flatten()
    }
}

impl Drop for RtspCamera {
    fn drop(&mut self) {
        self.main_loop.quit();
        // Join only a thread known to have finished: a stuck one cannot hang the test.
        if self.stopped.recv_timeout(STOP_TIMEOUT).is_ok()
            && let Some(thread) = self.thread.take()
        {
            let _ = thread.join();
        }
    }
}

fn serve_rtsp(
    context: &glib::MainContext,
    frames: u32,
    fps: u32,
    width: u32,
    height: u32,
    counters: Arc<RtspCounters>,
) -> Result<(gst_rtsp_server::RTSPServer, glib::SourceId), String> {
    let server = gst_rtsp_server::RTSPServer::new();
    server.set_address("127.0.0.1");
    // Port 0: the system picks a free one, read back with bound_port().
    server.set_service("0");
    let mounts = server
        .mount_points()
        .ok_or("the RTSP server has no mount points")?;
    let factory = gst_rtsp_server::RTSPMediaFactory::new();
    // videotestsrc is-live paces the frames by the clock and ends after
    // num-buffers; the probe below paints each one. key-int-max=fps: a
    // keyframe every second, so a client that joins late decodes soon.
    // One slice per frame: with zerolatency's sliced threads, FFmpeg (the
    // real server's reader) decoded our stream's first second as green
    // garbage and gave 159 pictures for 150 frames; with one, all in order.
    factory.set_launch(&format!(
        "( videotestsrc name=frames is-live=true num-buffers={frames} pattern=black \
         ! video/x-raw,format=RGB,width={width},height={height},framerate={fps}/1 \
         ! videoconvert ! video/x-raw,format=I420 \
         ! x264enc tune=zerolatency speed-preset=ultrafast key-int-max={fps} \
         sliced-threads=false threads=1 ! video/x-h264,profile=constrained-baseline \
         ! rtph264pay name=pay0 pt=96 config-interval=-1 )"
    ));
    factory.set_shared(false);
    factory.connect_media_configure(move |_, media| {
        counters.clients.fetch_add(1, Ordering::SeqCst);
        let element = media.element();
        let Some(source) = element
            .downcast_ref::<gst::Bin>()
            .and_then(|bin| bin.by_name_recurse_up("frames"))
        else {
            return;
        };
        paint_and_count(&source, counters.clone());
    });
    mounts.add_factory("/cam", factory);
    let source = server
        .attach(Some(context))
        .map_err(|e| format!("attach the RTSP server: {e}"))?;
    Ok((server, source))
}

/// Paints each RGB buffer leaving `source` with the colour of its offset
/// (videotestsrc numbers its buffers from 0) and counts them.
fn paint_and_count(source: &gst::Element, counters: Arc<RtspCounters>) {
    let Some(pad) = source.static_pad("src") else {
        return;
    };
    pad.add_probe(gst::PadProbeType::BUFFER, move |_, info| {
        if let Some(buffer) = info.buffer_mut() {
            let [r, g, b] = colour(buffer.offset());
            if let Ok(mut map) = buffer.make_mut().map_writable() {
                for pixel in map.chunks_exact_mut(3) {
                    pixel.copy_from_slice(&[r, g, b]);
                }
            }
            counters.frames_pushed.fetch_add(1, Ordering::SeqCst);
            *counters.last_frame_at.lock().unwrap() = Some(std::time::Instant::now());
        }
        gst::PadProbeReturn::Ok
    });
}

// ---------------------------------------------------------------------------
// MJPEG over HTTP
// ---------------------------------------------------------------------------

const MJPEG_PATH: &str = "/stream.mjpg";
const MJPEG_BOUNDARY: &str = "frame";
const JPEG_QUALITY: u32 = 90;
/// How long a connection may take to send its request head.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one write may block on a client that stopped reading.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the accept loop looks at the stop flag.
const ACCEPT_POLL: Duration = Duration::from_millis(20);
/// Longest request head read.
const MAX_REQUEST_HEAD: usize = 16 * 1024;

/// An HTTP/1.1 camera on 127.0.0.1: `GET /stream.mjpg` answers
/// `multipart/x-mixed-replace; boundary=frame` and sends `frames` JPEGs at
/// `fps`, then closes the connection. Any other path is 404. Each
/// connection is served on a thread of its own, bounded in time.
pub struct MjpegCamera {
    port: u16,
    shared: Arc<MjpegShared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct MjpegShared {
    frames: u32,
    fps: u32,
    /// One JPEG per distinct colour (frame i sends `jpegs[i % COLOURS]`).
    jpegs: Vec<Vec<u8>>,
    stop: AtomicBool,
    requests: AtomicU32,
    frames_sent: AtomicU64,
}

impl MjpegCamera {
    pub fn start(frames: u32, fps: u32, width: u32, height: u32) -> MjpegCamera {
        init_gstreamer();
        assert!(
            frames > 0 && fps > 0,
            "a camera needs frames and a frame rate"
        );
        let distinct = u64::from(frames).min(COLOURS) as u32;
        let jpegs = encode_jpegs(distinct, width, height)
            .unwrap_or_else(|err| panic!("MJPEG camera: encoding its frames failed: {err}"));
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let port = listener.local_addr().expect("local address").port();
        let shared = Arc::new(MjpegShared {
            frames,
            fps,
            jpegs,
            stop: AtomicBool::new(false),
            requests: AtomicU32::new(0),
            frames_sent: AtomicU64::new(0),
        });
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("mjpeg-camera".into())
            .spawn(move || accept_loop(&listener, &thread_shared))
            .expect("spawn the MJPEG camera thread");
        MjpegCamera {
            port,
            shared,
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:PORT/stream.mjpg`
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}{MJPEG_PATH}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// HTTP requests received, whatever their path.
    pub fn requests(&self) -> u32 {
        self.shared.requests.load(Ordering::SeqCst)
    }

    /// JPEG parts written, over all connections.
    pub fn frames_sent(&self) -> u64 {
        self.shared.frames_sent.load(Ordering::SeqCst)
    }
}

impl Drop for MjpegCamera {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // The accept loop polls the flag; connection threads stop at their
        // next frame (or write timeout) on their own and are not joined.
        if let Some(thread) = self.thread.take() {
            let deadline = Instant::now() + STOP_TIMEOUT;
            while !thread.is_finished() && Instant::now() < deadline {
                std::thread::sleep(ACCEPT_POLL);
            }
            if thread.is_finished() {
                let _ = thread.join();
            }
        }
    }
}

fn accept_loop(listener: &TcpListener, shared: &Arc<MjpegShared>) {
    while !shared.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                let connection_shared = shared.clone();
                let _ = std::thread::Builder::new()
                    .name("mjpeg-camera-client".into())
                    .spawn(move || {
                        let _ = serve_mjpeg_client(stream, &connection_shared);
                    });
            }
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(ACCEPT_POLL);
            }
            Err(_) => std::thread::sleep(ACCEPT_POLL),
        }
    }
}

fn serve_mjpeg_client(stream: TcpStream, shared: &MjpegShared) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    // The rest of the head up to the blank line; its headers do not matter.
    let mut head_len = request_line.len();
    loop {
        let mut line = String::new();
        let read = reader.read_line(&mut line)?;
        head_len += read;
        if read == 0 || line == "\r\n" || line == "\n" || head_len > MAX_REQUEST_HEAD {
            break;
        }
    }
    shared.requests.fetch_add(1, Ordering::SeqCst);
    let mut stream = stream;
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if method != "GET" || path != MJPEG_PATH {
        let body = "not found\n";
        write!(
            stream,
            "HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )?;
        return stream.flush();
    }
    write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Type: multipart/x-mixed-replace; boundary={MJPEG_BOUNDARY}\r\n\
         Cache-Control: no-cache\r\nConnection: close\r\n\r\n"
    )?;
    let start = Instant::now();
    let interval = Duration::from_secs(1) / shared.fps;
    for index in 0..shared.frames {
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        // Paced from the start, so slow writes do not add up.
        let due = start + interval * index;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let jpeg = &shared.jpegs[(u64::from(index) % COLOURS) as usize];
        write!(
            stream,
            "--{MJPEG_BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {}\r\n\r\n",
            jpeg.len()
        )?;
        stream.write_all(jpeg)?;
        stream.write_all(b"\r\n")?;
        stream.flush()?;
        shared.frames_sent.fetch_add(1, Ordering::SeqCst);
    }
    // No closing delimiter: a camera's stream never ends on its own, so
    // readers take the closed connection as the end (FFmpeg's mpjpeg
    // demuxer reports a closing `--frame--` as invalid data).
    let _ = stream.shutdown(std::net::Shutdown::Both);
    Ok(())
}

/// JPEGs of frames 0..count, each a solid `colour(i)`.
fn encode_jpegs(count: u32, width: u32, height: u32) -> Result<Vec<Vec<u8>>, String> {
    let description = format!(
        "videotestsrc name=frames num-buffers={count} pattern=black \
         ! video/x-raw,format=RGB,width={width},height={height},framerate=30/1 \
         ! videoconvert ! jpegenc quality={JPEG_QUALITY} ! appsink name=sink sync=false"
    );
    let pipeline = gst::parse::launch(&description)
        .map_err(|e| format!("'{description}': {e}"))?
        .downcast::<gst::Pipeline>()
        .map_err(|_| "not a pipeline".to_owned())?;
    let source = pipeline.by_name("frames").ok_or("no videotestsrc")?;
    paint_and_count(&source, Arc::default());
    let sink = pipeline
        .by_name("sink")
        .and_then(|e| e.downcast::<gst_app::AppSink>().ok())
        .ok_or("no appsink")?;
    let result = (|| {
        pipeline
            .set_state(gst::State::Playing)
            .map_err(|e| format!("start: {e}"))?;
        let mut jpegs = Vec::with_capacity(count as usize);
        let deadline = Instant::now() + START_TIMEOUT;
        while jpegs.len() < count as usize {
            if Instant::now() >= deadline {
                return Err(format!(
                    "only {} of {count} JPEGs within {START_TIMEOUT:?}",
                    jpegs.len()
                ));
            }
            let Some(sample) = sink.try_pull_sample(gst::ClockTime::from_mseconds(100)) else {
                if sink.is_eos() {
                    return Err(format!(
                        "end of stream after {} of {count} JPEGs",
                        jpegs.len()
                    ));
                }
                continue;
            };
            let buffer = sample.buffer().ok_or("sample without buffer")?;
            let map = buffer.map_readable().map_err(|e| e.to_string())?;
            jpegs.push(map.as_slice().to_vec());
        }
        Ok(jpegs)
    })();
    let _ = pipeline.set_state(gst::State::Null);
    result
}

// ---------------------------------------------------------------------------
// Checks on a camera session's outcome
// ---------------------------------------------------------------------------

/// The camera frame each `roboflow-inference` message's dominant colour
/// (`rgb_color`) tells, in order. The colours repeat every
/// [`super::live::COLOURS`] frames: each index is the first one at or after
/// the previous with that colour (a server skips far fewer), so a frame
/// processed twice shows as an index that does not increase.
pub fn result_indices(outcome: &super::harness::Outcome) -> Vec<u64> {
    use super::live::{COLOURS, index_of, rgb_color};
    let mut previous: Option<u64> = None;
    outcome
        .named("roboflow-inference")
        .iter()
        .map(|message| {
            let json: serde_json::Value = serde_json::from_str(message.get::<&str>("json").unwrap()).unwrap();
            let rgb = rgb_color(&json).unwrap_or_else(|| panic!("no rgb_color in {json}"));
            let colour = index_of(rgb).unwrap_or_else(|| panic!("colour {rgb:?} is no camera frame's"));
            let index = match previous {
                None => colour,
                Some(previous) => previous + (colour + COLOURS - previous % COLOURS) % COLOURS,
            };
            previous = Some(index);
            index
        })
        .collect()
}

/// The result source's `roboflow-result-summary` message.
pub fn result_summary(outcome: &super::harness::Outcome) -> gst::Structure {
    outcome
        .named("roboflow-result-summary")
        .first()
        .map(|s| (*s).clone())
        .expect("a roboflow-result-summary message")
}

pub fn stat(structure: &gst::Structure, name: &str) -> u64 {
    structure
        .get::<u64>(name)
        .unwrap_or_else(|_| panic!("no {name} in {structure}"))
}
