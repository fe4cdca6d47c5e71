// Every way a session can fail, as the user reads it. The elements turn a
// `SessionError` into the text of their GStreamer ERROR message; README's
// "Failure modes" table lists the same cases.

use std::time::Duration;

use crate::protocol::results::ResultError;
use crate::signalling::SignallingError;

/// Names the property that raises the limit a result ran into.
fn size_limit_hint(error: &ResultError) -> &'static str {
    match error {
        ResultError::FrameTooLarge { .. } | ResultError::DecompressedTooLarge { .. } => " (max-result-size)",
        _ => "",
    }
}

fn seconds(duration: &Duration) -> String {
    format!("{:.1}", duration.as_secs_f64())
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SessionError {
    /// The HTTP offer/answer failed; the text names the URL and the server's
    /// own explanation.
    #[error(transparent)]
    Signalling(#[from] SignallingError),

    /// A local WebRTC step failed before anything reached the server.
    #[error("{what}: {detail}")]
    Setup { what: String, detail: String },

    #[error("the server's SDP answer is malformed: {0}")]
    AnswerMalformed(String),

    #[error("the server's SDP answer was refused: {0}")]
    AnswerRefused(String),

    #[error(
        "no session with the server at {url} within {} s (connect-timeout) while {stage}",
        seconds(timeout)
    )]
    ConnectTimeout { url: String, timeout: Duration, stage: &'static str },

    #[error(
        "the WebRTC connection to the server at {url} failed (ICE/DTLS); check that its UDP ports are reachable from {bind} (udp-bind-address, ice-servers)"
    )]
    ConnectionFailed { url: String, bind: String },

    /// ICE consent stopped after the connection was up: the peer is gone.
    #[error(
        "the server at {url} stopped answering: no ICE response for about {} s after {results} results; its worker process may have died or the network path is gone",
        seconds(silent_for)
    )]
    PeerLost { url: String, silent_for: Duration, results: u64 },

    #[error("the server closed the WebRTC connection before processing_complete, after {results} results")]
    PeerClosed { results: u64 },

    #[error("the server closed the video_upload channel during the upload, after {sent} of {total} chunks")]
    UploadChannelClosed { sent: u64, total: u64 },

    #[error("sending chunk {chunk} of {total} on the video_upload channel failed: {detail}")]
    UploadSendFailed { chunk: u64, total: u64, detail: String },

    #[error(
        "the upload made no progress for {} s (stall-timeout) after {sent} of {total} chunks: the server stopped reading the video_upload channel",
        seconds(timeout)
    )]
    UploadStalled { timeout: Duration, sent: u64, total: u64 },

    /// The bytes given to the upload do not match the size it declared.
    #[error("sending frame {frame} on the video track failed: {detail}")]
    TrackSendFailed { frame: u64, detail: String },

    #[error("{0}")]
    UploadMismatch(String),

    #[error("the server closed the inference channel before processing_complete, after {results} results")]
    ControlChannelClosed { results: u64 },

    #[error("sending on the inference channel failed: {0}")]
    ControlSendFailed(String),

    #[error("no result from the server for {} s (stall-timeout) after {results} frames", seconds(timeout))]
    ResultsStalled { timeout: Duration, results: u64 },

    #[error("a result message from the server is invalid: {error}{}", size_limit_hint(error))]
    InvalidResultMessage { error: ResultError },

    #[error("the result of frame {frame} is not valid JSON ({detail}); it starts with {start:?}")]
    ResultNotJson { frame: u32, detail: String, start: String },

    #[error("the result of frame {frame} does not have the expected shape: {detail}")]
    ResultShape { frame: u32, detail: String },

    #[error(
        "the server decoded no frames from the upload (processing_complete after 0 results{}); is the input a video FFmpeg can read?",
        reason.as_deref().map(|reason| format!(", termination_reason {reason}")).unwrap_or_default()
    )]
    NothingDecoded { reason: Option<String> },

    #[error(
        "the server processed none of the {sent} frames of the live video (processing_complete after 0 results{}); \
         its decoder may not have received a keyframe, or realtime processing dropped them all",
        reason.as_deref().map(|reason| format!(", termination_reason {reason}")).unwrap_or_default()
    )]
    NothingProcessed { sent: u64, reason: Option<String> },

    /// A camera the server reads: the server failed before answering, which
    /// it does when it cannot open the URL (PROTOCOL.md §11; it says only
    /// "Internal error.").
    #[error("the server at {api_url} could not start a session on the {kind} camera {camera} ({description}): {hint}")]
    CameraNotOpened { api_url: String, kind: &'static str, camera: String, description: String, hint: String },

    /// A camera the server reads: processing_complete before any result.
    #[error(
        "the server read no frames from {camera} (processing_complete after 0 results{}); check that the URL serves video the server can decode",
        reason.as_deref().map(|reason| format!(", termination_reason {reason}")).unwrap_or_default()
    )]
    NothingRead { camera: String, reason: Option<String> },

    /// The result consumer (the sink, or its roboflowresultsrc) let go before
    /// processing_complete: nobody reads the results any more.
    #[error("the results of session '{session}' are no longer read: {reader} stopped before processing_complete")]
    ResultsAbandoned { session: String, reader: &'static str },

    /// The sink let go before its upload was complete.
    #[error("the roboflowuploadsink of session '{session}' stopped before its upload was complete")]
    UploadAbandoned { session: String },

    #[error("session name '{session}' is already used by another running roboflowuploadsink; give each sink its own 'session'")]
    NameInUse { session: String },

    /// A roboflowresultsrc came after the sink had started the session.
    #[error(
        "the results of session '{session}' already go to its roboflowuploadsink, which started before this roboflowresultsrc: bring the result source to READY before the sink's pipeline goes to PAUSED"
    )]
    ResultsTaken { session: String },

    #[error("another roboflowresultsrc already reads the results of session '{session}'")]
    ResultsClaimed { session: String },

    #[error("the session was closed")]
    Closed,
}

impl From<ResultError> for SessionError {
    fn from(error: ResultError) -> Self {
        SessionError::InvalidResultMessage { error }
    }
}
