// roboflowuploadsink's live video job (PROTOCOL.md §10): each buffer becomes
// one frame on the client's WebRTC video track, within a window of frames
// in flight (sent, result not back yet).
//
// - realtime-processing=false: a full window blocks upstream, so every
//   frame is processed, at the Workflow's pace (GStreamer backpressure; a
//   live source's own queue decides what to drop).
// - realtime-processing=true: a full window drops the frame before it is
//   encoded, and counts it; so are frames that come while the session is
//   still connecting.
// Either way the memory held is bounded by the window, whatever the rate.
//
// With no roboflowresultsrc, a task on the runtime posts each result as it
// arrives; the streaming thread never waits for results except at EOS.

use std::time::Instant;

use gst::subclass::prelude::*;

use tokio::sync::watch;

use super::imp::{CAT, UploadSink};
use super::live::{CapsMode, LiveEncoder, framerate};
use crate::config::SessionConfig;
use crate::protocol::live::RtpPlan;
use crate::runtime::RUNTIME;
use crate::session::{self, ResultEvent, ResultStream, SessionError, UploadWriter};
use crate::stop::Stop;

pub(super) struct LiveJob {
    writer: UploadWriter,
    config: SessionConfig,
    mode: CapsMode,
    encoder: LiveEncoder,
    plan: RtpPlan,
    /// The track is up and frames are sent.
    begun: bool,
    /// The track ended (RTCP BYE sent).
    ended: bool,
    /// Buffers received, sent or not.
    buffers: u64,
    /// Encoded input: no keyframe went since the start or since the server
    /// asked for one.
    need_keyframe: bool,
    /// Upstream was asked for that keyframe.
    keyframe_asked: bool,
    /// Posts the results when no roboflowresultsrc reads them.
    results: Option<ResultsReader>,
}

impl LiveJob {
    pub fn start(sink: &UploadSink, name: &str, mut config: SessionConfig, mode: CapsMode, caps: &gst::Caps) -> Result<LiveJob, Stop> {
        let encoder = LiveEncoder::new(mode, config.video_codec, caps).map_err(|message| {
            let missing = message.contains("is not installed");
            Stop::Error(if missing {
                gst::error_msg!(gst::CoreError::MissingPlugin, ("{}", message))
            } else {
                gst::error_msg!(gst::LibraryError::Init, ("{}", message))
            })
        })?;
        let codec = encoder.codec();
        config.live = Some(codec);
        let rate = framerate(caps);
        if config.declared_fps.is_none() {
            config.declared_fps = rate.map(|rate| f64::from(rate.numer()) / f64::from(rate.denom()));
        }
        *sink.upload_mode.lock().unwrap() = "live";
        gst::info!(
            CAT,
            imp = sink,
            "starting session '{name}' with {}: live video as a {} track ({})",
            config.api_url,
            codec.mime_type(),
            if mode == CapsMode::Raw { "encoded here" } else { "sent as it is" }
        );
        let (writer, results) = sink.start_named(name, config.clone())?;
        let results = results.map(|stream| ResultsReader::spawn(sink, stream));
        let origin = session::random_u32();
        Ok(LiveJob {
            writer,
            config,
            mode,
            encoder,
            plan: RtpPlan::new(codec, origin, session::random_u32() as u16, rate.and_then(ticks_per_frame)),
            begun: false,
            ended: false,
            buffers: 0,
            need_keyframe: true,
            keyframe_asked: false,
            results,
        })
    }

    /// New caps mid-stream: raw video renegotiates the encoder (a new
    /// resolution starts with a keyframe); a change of kind is an error.
    pub fn set_caps(&mut self, mode: CapsMode, caps: &gst::Caps) -> Result<(), Stop> {
        if mode != self.mode {
            return Err(Stop::Error(gst::error_msg!(
                gst::StreamError::Format,
                ("the caps changed mid-stream to {}: a live session keeps the kind of video it started with ({:?})", caps, self.mode)
            )));
        }
        if mode == CapsMode::Raw {
            gst::info!(CAT, "live video: new caps {caps}, the encoder starts again");
            self.encoder.set_caps(caps);
        }
        Ok(())
    }

    pub fn chain(&mut self, sink: &UploadSink, buffer: gst::Buffer) -> Result<(), Stop> {
        let arrived = Instant::now();
        self.buffers += 1;
        let realtime = self.config.realtime_processing;
        if !self.begun {
            if realtime && !self.writer.is_connected() {
                // Low latency: a frame that cannot go now is not kept.
                self.writer.frame_dropped()?;
                return Ok(());
            }
            sink.wait_connected(&self.writer, &self.config)?;
            self.writer.begin_live()?;
            self.begun = true;
        }
        sink.gate.wait_playing()?;
        let max = u64::from(self.config.max_frames_in_flight);
        let stall = self.config.stall_timeout;
        let probe = self.writer.probe();
        let stalled = || SessionError::ResultsStalled { timeout: stall, results: probe.stats().frames_received };
        let encoded = self.mode != CapsMode::Raw;
        if encoded && self.writer.take_keyframe_request() {
            self.need_keyframe = true;
            self.keyframe_asked = false;
        }
        // Encoded input: until a keyframe has gone (at the start, and after
        // the server asked for one), a frame that depends on others cannot
        // be decoded: it is dropped, and upstream is asked for a keyframe,
        // which then goes whatever the window.
        let keyframe_wanted = encoded && self.need_keyframe;
        if keyframe_wanted && buffer.flags().contains(gst::BufferFlags::DELTA_UNIT) {
            if !self.keyframe_asked {
                self.keyframe_asked = true;
                let event = gst_video::UpstreamForceKeyUnitEvent::builder().all_headers(true).build();
                sink.request_upstream_keyframe(event);
            }
            self.writer.frame_dropped()?;
            return Ok(());
        }
        if !keyframe_wanted {
            if realtime {
                if self.writer.frames_in_flight() >= max {
                    self.writer.frame_dropped()?;
                    return Ok(());
                }
            } else {
                sink.wait(Some(stall), stalled, self.writer.wait_in_flight_below(max))?;
            }
        }
        if !encoded && self.writer.take_keyframe_request() {
            // The server cannot decode: this frame goes as a keyframe (the
            // session let it past a full window).
            self.encoder.force_keyframe();
        }
        let pts = buffer.pts().map(gst::ClockTime::nseconds);
        let mut packets = self.encoder.encode(buffer).map_err(Stop::failed)?;
        let before = self.plan.clone();
        let timestamp = self.plan.stamp_frame(&mut packets).map_err(Stop::failed)?;
        let sent = sink.wait(Some(stall), stalled, self.writer.send_frame(packets, timestamp, pts, arrived));
        match sent {
            Ok(()) => self.need_keyframe = false,
            // Not sent: the next frame takes this one's timestamp, the one
            // the last boundary packet announced.
            Err(_) => self.plan = before,
        }
        sent
    }

    /// At EOS: the results of every frame sent (realtime off), the track's
    /// end, and processing_complete when the sink reads the results.
    pub fn finish(&mut self, sink: &UploadSink) -> Result<(), Stop> {
        if !self.begun {
            let message = if self.buffers == 0 {
                "the stream ended before its first frame: there is nothing to process".to_owned()
            } else {
                format!(
                    "the stream ended while the session was still connecting: its {} frames were dropped \
                     (realtime-processing=true drops frames until the server is ready)",
                    self.buffers
                )
            };
            return Err(Stop::Error(gst::error_msg!(gst::StreamError::Failed, ("{}", message))));
        }
        let stall = self.config.stall_timeout;
        let probe = self.writer.probe();
        let stalled = || SessionError::ResultsStalled { timeout: stall, results: probe.stats().frames_received };
        if !self.config.realtime_processing {
            sink.wait(Some(stall), stalled, self.writer.wait_in_flight_below(1))?;
        }
        if !self.ended {
            sink.wait(Some(stall), stalled, self.writer.end_track())?;
            self.ended = true;
        }
        if let Some(results) = &self.results {
            let frames = sink.wait(Some(stall), stalled, results.completed(&self.writer))?;
            gst::info!(CAT, imp = sink, "processing complete: {frames} results");
        }
        Ok(sink.gate.wait_playing()?)
    }
}

/// 90 kHz ticks per frame at `rate`.
fn ticks_per_frame(rate: gst::Fraction) -> Option<u32> {
    let ticks = 90_000u64 * rate.denom() as u64 / rate.numer() as u64;
    u32::try_from(ticks).ok().filter(|t| *t > 0)
}

/// The task that posts each result as it arrives.
struct ResultsReader {
    task: tokio::task::AbortHandle,
    /// The number of results, once processing_complete came.
    complete: watch::Receiver<Option<u64>>,
}

impl ResultsReader {
    fn spawn(sink: &UploadSink, mut stream: ResultStream) -> ResultsReader {
        let element = sink.obj().downgrade();
        let (complete_tx, complete) = watch::channel(None);
        let task = RUNTIME.spawn(async move {
            loop {
                let event = stream.next().await;
                let Some(element) = element.upgrade() else { return };
                match event {
                    Ok(ResultEvent::Frame(frame)) => element.imp().post_inference(&frame),
                    Ok(ResultEvent::Complete { frames, .. }) => {
                        complete_tx.send_replace(Some(frames));
                        return;
                    }
                    Err(error) => {
                        if let Stop::Error(message) = Stop::from(error) {
                            element.imp().fail(message);
                        }
                        return;
                    }
                }
            }
        });
        ResultsReader { task: task.abort_handle(), complete }
    }

    /// Resolves with the number of results once processing_complete came,
    /// or with the session's failure.
    async fn completed(&self, writer: &UploadWriter) -> Result<u64, SessionError> {
        let mut complete = self.complete.clone();
        tokio::select! {
            biased;
            done = complete.wait_for(Option::is_some) => Ok(done.map_err(|_| SessionError::Closed)?.unwrap_or_default()),
            error = writer.failed() => Err(error),
        }
    }
}

impl Drop for ResultsReader {
    fn drop(&mut self) {
        self.task.abort();
    }
}
