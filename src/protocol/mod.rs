//! The sans-IO core of the Roboflow WebRTC worker protocol: byte framing,
//! reassembly, JSON messages and timing bookkeeping. No sockets, threads or
//! clocks; callers pass data and the current time in and send what comes out.
//! See PROTOCOL.md (sections 2-5 and 7) for the wire protocol.

pub mod keepalive;
pub mod messages;
pub mod results;
pub mod rtp_pairing;
pub mod upload;

pub use keepalive::{AckTracker, DEFAULT_KEEPALIVE_INTERVAL, KeepaliveTracker};
pub use messages::{
    FrameResult, IceServer, InitialiseAnswer, InitialiseRequest, SessionDescriptionJson,
    VideoMetadata, WebrtcConfig, WorkflowConfiguration, WorkflowSource, ack_message,
    data_output_message, describe_error_body, find_image, redact_images, stream_output_message,
};
pub use results::{
    CompletedResult, RESULT_HEADER_LEN, ReassemblyLimits, ResultError, ResultReassembler,
    decode_result_header, encode_result_header, is_gzip,
};
pub use upload::{
    DEFAULT_CHUNK_SIZE, KEEPALIVE_MESSAGE, MAX_CHUNK_SIZE, UPLOAD_HEADER_LEN, UploadError,
    UploadFramer, decode_upload_header, encode_upload_header, is_keepalive, total_chunks,
};
