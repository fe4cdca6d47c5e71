//! The sans-IO core of the Roboflow WebRTC worker protocol: byte framing,
//! reassembly, JSON messages and timing bookkeeping. No sockets, threads or
//! clocks; callers pass data and the current time in and send what comes out.
//! See PROTOCOL.md (sections 2-5 and 7) for the wire protocol.

pub mod detections;
pub mod error_body;
pub mod frame;
pub mod initialise;
pub mod keepalive;
pub mod keyframe;
pub mod live;
pub mod results;
pub mod rtp_order;
pub mod rtp_pairing;
pub mod upload;

pub use error_body::describe_error_body;
pub use frame::{FrameResult, ack_message, find_image, pts_seconds_to_ns, redact_images};
pub use initialise::{
    DEFAULT_IMAGE_INPUT_NAME, IceServer, InitialiseAnswer, InitialiseRequest,
    SessionDescriptionJson, WebrtcConfig, WorkflowConfiguration, WorkflowSource,
};
pub use keepalive::DEFAULT_KEEPALIVE_INTERVAL;
