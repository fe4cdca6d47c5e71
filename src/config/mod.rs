// What the user configures on roboflowuploadsink, and its validation into a
// session configuration. Pure functions: every check runs before any network.
//
// settings.rs: the properties as set, their limits, and `validate`;
// workflow.rs: which Workflow runs and which of its outputs come back;
// camera.rs: a camera the server reads (source-url);
// network.rs: ICE servers, the UDP bind address and the SCTP packet size;
// session_config.rs: the validated result, and how it reads on the wire.

mod camera;
mod network;
mod properties;
mod session_config;
mod settings;
mod workflow;

pub use crate::protocol::{DEFAULT_IMAGE_INPUT_NAME, IceServer, WorkflowSource};
pub use camera::{CameraKind, CameraSource};
pub use network::{AUTO_SCTP_MTU, MAX_SCTP_MTU};
pub(crate) use properties::{
    camera_session_properties, camera_settings, ms_property, session_properties, session_property, set_session_property,
    string_property,
};
pub use session_config::SessionConfig;
pub use settings::{
    ApiKeyTransport, DEFAULT_API_URL, DEFAULT_BUFFER_LIMIT, DEFAULT_CHUNK_SIZE_U32,
    DEFAULT_CONNECT_TIMEOUT_MS, DEFAULT_KEEPALIVE_INTERVAL_MS, DEFAULT_MAX_RESULT_SIZE,
    DEFAULT_STALL_TIMEOUT_MS, MAX_CHUNK_SIZE_U32, MIN_BUFFER_LIMIT, MIN_CHUNK_SIZE,
    MIN_MAX_RESULT_SIZE, UploadMode, UploadSettings, VideoTransport, VideoCodec,
    DEFAULT_MAX_FRAMES_IN_FLIGHT, MAX_MAX_FRAMES_IN_FLIGHT,
};
pub use workflow::DEFAULT_TASK_TYPE;

/// A configuration error, naming the property the user has to fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub property: &'static str,
    pub message: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "property '{}': {}", self.property, self.message)
    }
}

impl std::error::Error for ConfigError {}

fn config_error(property: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        property,
        message: message.into(),
    }
}

/// The trimmed value of a string property, `None` when unset or blank.
fn non_empty(value: &Option<String>) -> Option<&str> {
    value.as_deref().map(str::trim).filter(|v| !v.is_empty())
}

/// Splits a comma-separated list property into its trimmed, non-empty items.
fn split_list(value: &Option<String>) -> Vec<String> {
    non_empty(value)
        .map(|v| {
            v.split(',')
                .map(str::trim)
                .filter(|item| !item.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod test_support {
    use super::UploadSettings;

    /// Default settings with a minimal inline Workflow and no API key.
    pub fn with_spec() -> UploadSettings {
        UploadSettings {
            api_key: None,
            workflow_spec: Some(r#"{"version":"1.0","steps":[]}"#.into()),
            ..Default::default()
        }
    }
}
