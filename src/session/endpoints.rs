// The two ends of a session, each with one owner: the sink's upload writer
// and the one result stream (the sink's, or the roboflowresultsrc's that
// claimed the session before the sink started). Dropping an end is how its
// owner lets go; the session closes when nobody can use it any more.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::config::SessionConfig;

use super::core::{Input, Output, ResultEvent, SessionStats, State};
use super::driver::{Sequenced, Shared, TrackItem, TrackOut};
use super::error::SessionError;
use super::registry;

/// Closes the session once neither end holds it.
#[derive(Debug)]
pub(super) struct Alive(pub Arc<Shared>);

impl Drop for Alive {
    fn drop(&mut self) {
        registry::unregister(&self.0);
        self.0.close(SessionError::Closed);
    }
}

/// The sink's end: connects, frames and sends the upload.
#[derive(Debug)]
pub struct UploadWriter {
    shared: Arc<Shared>,
    /// Keeps the session open while this end lives.
    _alive: Arc<Alive>,
    /// Chunk messages framed but not yet queued for sending: a wait that was
    /// cancelled (a pause) resumes with them, so no byte is lost or repeated.
    pending: VecDeque<Bytes>,
}

impl UploadWriter {
    pub(super) fn new(shared: Arc<Shared>, alive: Arc<Alive>) -> Self {
        UploadWriter { shared, _alive: alive, pending: VecDeque::new() }
    }

    pub fn name(&self) -> &str {
        &self.shared.name
    }

    pub fn stats(&self) -> SessionStats {
        self.shared.stats()
    }

    /// Waits until both data channels are open.
    pub async fn connected(&self) -> Result<(), SessionError> {
        self.shared
            .wait_state(|state| matches!(state, State::Connected | State::Uploading | State::Receiving | State::Complete))
            .await
    }

    /// Declares the upload's size; returns the number of chunk messages.
    pub fn begin(&mut self, total_bytes: u64) -> Result<u64, SessionError> {
        self.feed(Input::BeginUpload { total_bytes })?;
        Ok(self.shared.stats().total_chunks)
    }

    /// Frames the next bytes of the upload; [`flush`](Self::flush) sends them.
    pub fn push(&mut self, data: &[u8]) -> Result<(), SessionError> {
        self.feed(Input::UploadData(data))
    }

    /// Chunks are framed and wait for [`flush`](Self::flush).
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Queues every framed chunk for sending, waiting while the channel is at
    /// its buffer limit. Cancel-safe: a cancelled flush loses nothing.
    pub async fn flush(&mut self) -> Result<(), SessionError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let sender = self.shared.upload_sender().ok_or_else(|| self.failure())?;
        while let Some(chunk) = self.pending.pop_front() {
            let permit = tokio::select! {
                biased;
                error = self.shared.failed() => Err(error),
                permit = sender.reserve() => permit.map_err(|_| self.failure()),
            };
            match permit {
                Ok(permit) => permit.send(chunk),
                Err(error) => {
                    self.pending.push_front(chunk);
                    return Err(error);
                }
            }
        }
        Ok(())
    }

    /// No more bytes: the declared size must have arrived.
    pub fn end(&mut self) -> Result<(), SessionError> {
        self.feed(Input::EndOfUpload)
    }

    /// Waits until every chunk was handed to the channel (after [`end`](Self::end)
    /// and a complete [`flush`](Self::flush)).
    pub async fn sent(&self) -> Result<(), SessionError> {
        self.shared.wait_state(|state| matches!(state, State::Receiving | State::Complete)).await
    }

    /// The session is connected (or further on).
    pub fn is_connected(&self) -> bool {
        !matches!(self.shared.state(), State::Connecting)
    }

    /// Resolves with the failure once the session has failed or closed.
    pub async fn failed(&self) -> SessionError {
        self.shared.failed().await
    }

    /// Live video: the track is up; frames follow.
    pub fn begin_live(&mut self) -> Result<(), SessionError> {
        self.feed(Input::BeginLive)
    }

    /// Live video: the window's occupancy: frames sent whose result has not
    /// come back, less one while a keyframe request grants a frame.
    pub fn frames_in_flight(&self) -> u64 {
        self.shared.frames_in_flight()
    }

    /// Live video: whether the server asked for a keyframe since the last call.
    pub fn take_keyframe_request(&self) -> bool {
        self.shared.take_keyframe_request()
    }

    /// Live video: waits until fewer than `max` frames are in flight.
    pub async fn wait_in_flight_below(&self, max: u64) -> Result<(), SessionError> {
        self.shared.wait_in_flight_below(max).await
    }

    /// Live video: the sink dropped a frame before sending it.
    pub fn frame_dropped(&mut self) -> Result<(), SessionError> {
        self.feed(Input::FrameDropped)
    }

    /// Live video: sends one frame's RTP packets (stamped by the caller's
    /// RtpPlan), waiting while the track's queue is full. Cancel-safe: a
    /// cancelled wait sends nothing and records nothing.
    pub async fn send_frame(
        &mut self,
        packets: Vec<Vec<u8>>,
        rtp_timestamp: u32,
        pts_ns: Option<u64>,
        arrived: std::time::Instant,
    ) -> Result<(), SessionError> {
        let permit = self.track_permit().await?;
        self.feed(Input::FrameSent { rtp_timestamp, pts_ns, arrived })?;
        permit.send(TrackOut::Frame(packets));
        Ok(())
    }

    /// Live video: no more frames. The track ends with an RTCP BYE, after
    /// every frame queued.
    pub async fn end_track(&mut self) -> Result<(), SessionError> {
        let permit = self.track_permit().await?;
        self.feed(Input::TrackEnded)?;
        permit.send(TrackOut::End);
        Ok(())
    }

    async fn track_permit(&self) -> Result<mpsc::OwnedPermit<TrackOut>, SessionError> {
        let sender = self.shared.track_sender().ok_or_else(|| self.failure())?;
        tokio::select! {
            biased;
            error = self.shared.failed() => Err(error),
            permit = sender.reserve_owned() => permit.map_err(|_| self.failure()),
        }
    }

    fn feed(&mut self, input: Input<'_>) -> Result<(), SessionError> {
        for output in self.shared.handle(input) {
            if let Output::SendChunk(chunk) = output {
                self.pending.push_back(chunk);
            }
        }
        match self.shared.failure() {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }

    fn failure(&self) -> SessionError {
        self.shared.failure().unwrap_or(SessionError::Closed)
    }
}

impl Drop for UploadWriter {
    fn drop(&mut self) {
        // Without the rest of the upload the server never finishes: nobody
        // can use the session any more.
        if matches!(self.shared.state(), State::Connecting | State::Connected | State::Uploading) {
            self.shared.close(SessionError::UploadAbandoned { session: self.shared.name.clone() });
        }
    }
}

/// Who reads a session's results, for the error a writer sees when it stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reader {
    Sink,
    ResultSource,
}

/// The one consumer's end: each frame's result in order, then completion;
/// the returned video track's packets; acks back to the server.
#[derive(Debug)]
pub struct ResultStream {
    shared: Arc<Shared>,
    /// Keeps the session open while this end lives.
    _alive: Arc<Alive>,
    events: mpsc::Receiver<Sequenced<ResultEvent>>,
    track: Option<mpsc::Receiver<Sequenced<TrackItem>>>,
    reader: Reader,
}

impl ResultStream {
    pub(super) fn new(
        shared: Arc<Shared>,
        alive: Arc<Alive>,
        events: mpsc::Receiver<Sequenced<ResultEvent>>,
        track: mpsc::Receiver<Sequenced<TrackItem>>,
    ) -> Self {
        ResultStream { shared, _alive: alive, events, track: Some(track), reader: Reader::Sink }
    }

    pub(super) fn set_reader(&mut self, reader: Reader) {
        self.reader = reader;
    }

    pub fn name(&self) -> &str {
        &self.shared.name
    }

    pub fn config(&self) -> &SessionConfig {
        &self.shared.config
    }

    pub fn stats(&self) -> SessionStats {
        self.shared.stats()
    }

    pub fn track_packets_dropped(&self) -> u64 {
        self.shared.track_packets_dropped()
    }

    /// The returned video track's codec and packets (track transport), each
    /// with its place among the results (see [`Sequenced`]).
    pub fn take_track(&mut self) -> Option<mpsc::Receiver<Sequenced<TrackItem>>> {
        self.track.take()
    }

    /// The next result, or the failure that ended the session. Results that
    /// arrived before a failure come first. Cancel-safe.
    pub async fn next(&mut self) -> Result<ResultEvent, SessionError> {
        self.next_sequenced().await.map(|(_, event)| event)
    }

    /// [`next`](Self::next) with the result's place among the track items.
    pub async fn next_sequenced(&mut self) -> Result<Sequenced<ResultEvent>, SessionError> {
        tokio::select! {
            biased;
            event = self.events.recv() => event.ok_or_else(|| self.shared.failure().unwrap_or(SessionError::Closed)),
            error = self.shared.failed() => Err(error),
        }
    }

    /// A result already waiting, with its place, taken without a wait (None
    /// when none is; [`next_sequenced`](Self::next_sequenced) reports a
    /// failure).
    pub fn try_next_sequenced(&mut self) -> Option<Sequenced<ResultEvent>> {
        self.events.try_recv().ok()
    }

    /// Turns on acks (flow control), `lead` frames ahead of the handled ones.
    pub fn enable_acks(&self, lead: u64) {
        self.shared.handle(Input::EnableAcks { lead });
    }

    /// The consumer is done with this frame (it acks when acks are on).
    pub fn frame_handled(&self, frame_id: u64) {
        self.shared.handle(Input::FrameHandled(frame_id));
    }
}

impl Drop for ResultStream {
    fn drop(&mut self) {
        if !self.shared.state().is_final() {
            let reader = match self.reader {
                Reader::Sink => "its roboflowuploadsink",
                Reader::ResultSource => "its roboflowresultsrc",
            };
            self.shared.close(SessionError::ResultsAbandoned { session: self.shared.name.clone(), reader });
        }
    }
}

/// A read-only view of a session for `stats` properties and warnings; it
/// does not keep the session open.
#[derive(Debug, Clone)]
pub struct SessionProbe(Arc<Shared>);

impl SessionProbe {
    pub fn name(&self) -> &str {
        &self.0.name
    }

    pub fn stats(&self) -> SessionStats {
        self.0.stats()
    }

    /// Warnings gathered since the last call (e.g. keepalives without echo).
    pub fn take_warnings(&self) -> Vec<String> {
        self.0.take_warnings()
    }

    pub fn track_packets_dropped(&self) -> u64 {
        self.0.track_packets_dropped()
    }

    /// Asks the server for a keyframe of the returned track.
    pub fn request_keyframe(&self) {
        self.0.request_keyframe();
    }

    /// Keyframe requests (PLI) sent for the returned track.
    pub fn keyframe_requests_sent(&self) -> u64 {
        self.0.keyframe_requests_sent()
    }
}

impl UploadWriter {
    pub fn probe(&self) -> SessionProbe {
        SessionProbe(self.shared.clone())
    }
}

impl ResultStream {
    pub fn probe(&self) -> SessionProbe {
        SessionProbe(self.shared.clone())
    }
}
