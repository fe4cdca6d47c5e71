// Why an element's streaming thread stopped its work, shared by both
// elements: each turns it into its flow return (and, for an error, its one
// ERROR message).

use std::fmt::Display;

use crate::runtime::WaitError;
use crate::session::SessionError;

pub(crate) enum Stop {
    /// A flush or a state change: not an error.
    Flushing,
    /// The work is over without an error: nobody reads the results any
    /// more, or downstream took all it wanted.
    Eos,
    /// Downstream is not linked.
    NotLinked,
    Error(gst::ErrorMessage),
}

impl Stop {
    pub(crate) fn failed(message: impl Display) -> Stop {
        Stop::Error(gst::error_msg!(gst::ResourceError::Failed, ("{}", message)))
    }
}

impl From<gst::ErrorMessage> for Stop {
    fn from(message: gst::ErrorMessage) -> Self {
        Stop::Error(message)
    }
}

impl From<SessionError> for Stop {
    fn from(error: SessionError) -> Self {
        match error {
            // The roboflowresultsrc reading the results let go (its
            // downstream ended): the job ends without an error of its own.
            SessionError::ResultsAbandoned { .. } => Stop::Eos,
            error => Stop::failed(error),
        }
    }
}

/// A bounded, cancellable wait on the runtime in the streaming thread's
/// terms: cancelled is Flushing, running out of time is the error
/// `timed_out` describes.
pub(crate) fn waited<T, E: Display>(outcome: Result<T, WaitError>, timed_out: impl FnOnce() -> E) -> Result<T, Stop> {
    match outcome {
        Ok(value) => Ok(value),
        Err(WaitError::Cancelled) => Err(Stop::Flushing),
        Err(WaitError::TimedOut(_)) => Err(Stop::failed(timed_out())),
    }
}
