// The properties of a session, defined once: every element that runs a
// session has them (roboflowuploadsink, and roboflowresultsrc for a camera
// the server reads), with the same names, limits and texts. Each element adds
// its own beside them. Two differ for roboflowresultsrc (see
// `camera_session_properties`).

use gst::glib;
use gst::prelude::*;

use super::{ApiKeyTransport, UploadSettings, VideoTransport};
use crate::config;

pub(crate) fn string_property(name: &str, nick: &str, blurb: &str, default: Option<&str>) -> glib::ParamSpec {
    glib::ParamSpecString::builder(name)
        .nick(nick)
        .blurb(blurb)
        .default_value(default)
        .mutable_ready()
        .build()
}

pub(crate) fn ms_property(name: &str, nick: &str, blurb: &str, min: u32, default: u32) -> glib::ParamSpec {
    glib::ParamSpecUInt::builder(name)
        .nick(nick)
        .blurb(blurb)
        .minimum(min)
        .default_value(default)
        .mutable_ready()
        .build()
}

/// The ParamSpecs of the session's properties.
pub fn session_properties() -> Vec<glib::ParamSpec> {
    vec![
        string_property("api-url", "API URL", "Base URL of the Roboflow Inference Server (POST {api-url}/initialise_webrtc_worker)", Some(config::DEFAULT_API_URL)),
        glib::ParamSpecString::builder("api-key")
            .nick("API key")
            .blurb("Roboflow API key (write-only, never logged). Default: the ROBOFLOW_API_KEY environment variable")
            .write_only()
            .mutable_ready()
            .build(),
        glib::ParamSpecEnum::builder_with_default("api-key-transport", ApiKeyTransport::Body)
            .nick("API key transport")
            .blurb("Where the API key travels: in the JSON body, an Authorization: Bearer header, or both")
            .mutable_ready()
            .build(),
        string_property("workspace", "Workspace", "Roboflow workspace of workflow-id", None),
        string_property("workflow-id", "Workflow id", "Id of a Workflow saved in the workspace (needs workspace)", None),
        string_property("workflow-version-id", "Workflow version id", "Optional version of workflow-id", None),
        string_property("workflow-spec", "Workflow specification", "Inline Workflow specification (JSON object)", None),
        string_property("workflow-spec-file", "Workflow specification file", "Path to a JSON file holding the Workflow specification", None),
        string_property("model-id", "Model id", "Run a single model (e.g. rfdetr-nano): builds a one-block Workflow with outputs 'predictions' and 'image'", None),
        string_property("task-type", "Task type", "Task type of model-id: object-detection, instance-segmentation, classification, multi-label-classification, keypoint-detection, semantic-segmentation", Some(config::DEFAULT_TASK_TYPE)),
        string_property("image-input-name", "Image input name", "Name of the Workflow's image input", Some(config::DEFAULT_IMAGE_INPUT_NAME)),
        string_property("workflow-parameters", "Workflow parameters", "Extra Workflow inputs as a JSON object", None),
        string_property("stream-output", "Stream output", "Comma-separated image outputs to return as video (empty: none in datachannel mode, auto-detect in track mode)", None),
        string_property("data-output", "Data output", "Comma-separated Workflow outputs to return in each frame's JSON; '*' for all (empty: metadata only)", None),
        glib::ParamSpecEnum::builder_with_default("video-transport", VideoTransport::Datachannel)
            .nick("Video transport")
            .blurb("How the returned video travels: JPEG on the data channel (every frame) or a WebRTC video track")
            .mutable_ready()
            .build(),
        glib::ParamSpecBoolean::builder("realtime-processing")
            .nick("Realtime processing")
            .blurb("Let the server play the video at its own rate and drop frames (false: every frame, as fast as possible)")
            .default_value(false)
            .mutable_ready()
            .build(),
        glib::ParamSpecDouble::builder("declared-fps")
            .nick("Declared FPS")
            .blurb("Frame rate to declare to the server (0: not sent)")
            .minimum(0.0)
            .maximum(1000.0)
            .default_value(0.0)
            .mutable_ready()
            .build(),
        glib::ParamSpecUInt::builder("processing-timeout")
            .nick("Processing timeout")
            .blurb("Server-side session limit in seconds (0: the server's default, 3600)")
            .default_value(0)
            .mutable_ready()
            .build(),
        string_property("requested-plan", "Requested plan", "Plan for Roboflow's hosted serverless WebRTC", None),
        string_property("requested-region", "Requested region", "Region for Roboflow's hosted serverless WebRTC", None),
        string_property("ice-servers", "ICE servers", "Comma-separated STUN/TURN servers: stun:host:port, turn://user:password@host:port", None),
        string_property("udp-bind-address", "UDP bind address", "Local address for ICE host candidates, IP or IP:port (empty: 127.0.0.1:0 when api-url is loopback, else 0.0.0.0:0)", None),
        ms_property("connect-timeout", "Connect timeout", "Milliseconds allowed to set up the session: offer, the server's answer (its worker starts in ~10 s), ICE and data channels", 1, config::DEFAULT_CONNECT_TIMEOUT_MS),
        ms_property("stall-timeout", "Stall timeout", "Milliseconds without upload progress or without a result before the job fails", 1, config::DEFAULT_STALL_TIMEOUT_MS),
        glib::ParamSpecUInt::builder("sctp-mtu")
            .nick("SCTP MTU")
            .blurb("Bytes in each SCTP packet sent to the server (one UDP datagram plus DTLS overhead). 0: 1500 when udp-bind-address is a loopback address and no ice-servers are set (a loopback path), else 1191 (safe on any path, TURN and IPv6 included)")
            .minimum(0)
            .maximum(config::MAX_SCTP_MTU)
            .default_value(config::AUTO_SCTP_MTU)
            .mutable_ready()
            .build(),
        glib::ParamSpecUInt64::builder("max-result-size")
            .nick("Max result size")
            .blurb("Largest result of one frame the server may send, in bytes (decompressed: 4x); larger is an error")
            .minimum(config::MIN_MAX_RESULT_SIZE)
            .default_value(config::DEFAULT_MAX_RESULT_SIZE)
            .mutable_ready()
            .build(),
    ]
}

/// The session's properties as roboflowresultsrc has them: a camera is live,
/// so realtime processing is on by default (as in Roboflow's SDK, and the
/// only way the server reads RTSP), and the video comes back as a track (the
/// server then processes from the connection on, not from before its answer:
/// no result lost at the start, PROTOCOL.md §11); `connect-timeout` also
/// bounds the wait for a roboflowuploadsink when the source reads another
/// element's session.
pub fn camera_session_properties() -> Vec<glib::ParamSpec> {
    session_properties()
        .into_iter()
        .map(|pspec| match pspec.name() {
            "realtime-processing" => glib::ParamSpecBoolean::builder("realtime-processing")
                .nick("Realtime processing")
                .blurb("With source-url: the server reads the camera in real time and skips the frames it has no time for (false: every frame, in order; MJPEG only, the server cannot read RTSP that way)")
                .default_value(true)
                .mutable_ready()
                .build(),
            "video-transport" => glib::ParamSpecEnum::builder_with_default("video-transport", VideoTransport::Track)
                .nick("Video transport")
                .blurb("With source-url: how the returned video travels. track (default): a WebRTC video track; the server then starts processing once the connection is up, so no result is lost at the start. datachannel: JPEG on the data channel, every frame processed; the server starts processing before its answer and the results of the first frames (1-3 s of the camera) are lost")
                .mutable_ready()
                .build(),
            "connect-timeout" => ms_property(
                "connect-timeout",
                "Connect timeout",
                "Milliseconds allowed to set up the session with source-url (the server's answer, ICE and data channels); with session, to wait for a roboflowuploadsink of that session to start",
                1,
                config::DEFAULT_CONNECT_TIMEOUT_MS,
            ),
            _ => pspec,
        })
        .collect()
}

/// Settings with roboflowresultsrc's defaults (see `camera_session_properties`).
pub fn camera_settings() -> UploadSettings {
    UploadSettings { realtime_processing: true, video_transport: VideoTransport::Track, ..UploadSettings::default() }
}

/// Sets `name` if it is a session property; false if it is not one.
pub fn set_session_property(settings: &mut UploadSettings, name: &str, value: &glib::Value) -> bool {
    let text = || value.get::<Option<String>>().expect("type checked upstream");
    match name {
        "api-url" => settings.api_url = text().unwrap_or_else(|| config::DEFAULT_API_URL.to_owned()),
        "api-key" => settings.api_key = text(),
        "api-key-transport" => settings.api_key_transport = value.get().expect("type checked upstream"),
        "workspace" => settings.workspace = text(),
        "workflow-id" => settings.workflow_id = text(),
        "workflow-version-id" => settings.workflow_version_id = text(),
        "workflow-spec" => settings.workflow_spec = text(),
        "workflow-spec-file" => settings.workflow_spec_file = text(),
        "model-id" => settings.model_id = text(),
        "task-type" => settings.task_type = text().unwrap_or_else(|| config::DEFAULT_TASK_TYPE.to_owned()),
        "image-input-name" => settings.image_input_name = text().unwrap_or_else(|| config::DEFAULT_IMAGE_INPUT_NAME.to_owned()),
        "workflow-parameters" => settings.workflow_parameters = text(),
        "stream-output" => settings.stream_output = text(),
        "data-output" => settings.data_output = text(),
        "video-transport" => settings.video_transport = value.get().expect("type checked upstream"),
        "realtime-processing" => settings.realtime_processing = value.get().expect("type checked upstream"),
        "declared-fps" => settings.declared_fps = value.get().expect("type checked upstream"),
        "processing-timeout" => settings.processing_timeout = value.get().expect("type checked upstream"),
        "requested-plan" => settings.requested_plan = text(),
        "requested-region" => settings.requested_region = text(),
        "ice-servers" => settings.ice_servers = text(),
        "udp-bind-address" => settings.udp_bind_address = text(),
        "connect-timeout" => settings.connect_timeout_ms = value.get().expect("type checked upstream"),
        "stall-timeout" => settings.stall_timeout_ms = value.get().expect("type checked upstream"),
        "sctp-mtu" => settings.sctp_mtu = value.get().expect("type checked upstream"),
        "max-result-size" => settings.max_result_size = value.get().expect("type checked upstream"),
        _ => return false,
    }
    true
}

/// The value of `name` if it is a session property.
pub fn session_property(settings: &UploadSettings, name: &str) -> Option<glib::Value> {
    Some(match name {
        "api-url" => settings.api_url.to_value(),
        "api-key-transport" => settings.api_key_transport.to_value(),
        "workspace" => settings.workspace.to_value(),
        "workflow-id" => settings.workflow_id.to_value(),
        "workflow-version-id" => settings.workflow_version_id.to_value(),
        "workflow-spec" => settings.workflow_spec.to_value(),
        "workflow-spec-file" => settings.workflow_spec_file.to_value(),
        "model-id" => settings.model_id.to_value(),
        "task-type" => settings.task_type.to_value(),
        "image-input-name" => settings.image_input_name.to_value(),
        "workflow-parameters" => settings.workflow_parameters.to_value(),
        "stream-output" => settings.stream_output.to_value(),
        "data-output" => settings.data_output.to_value(),
        "video-transport" => settings.video_transport.to_value(),
        "realtime-processing" => settings.realtime_processing.to_value(),
        "declared-fps" => settings.declared_fps.to_value(),
        "processing-timeout" => settings.processing_timeout.to_value(),
        "requested-plan" => settings.requested_plan.to_value(),
        "requested-region" => settings.requested_region.to_value(),
        "ice-servers" => settings.ice_servers.to_value(),
        "udp-bind-address" => settings.udp_bind_address.to_value(),
        "connect-timeout" => settings.connect_timeout_ms.to_value(),
        "stall-timeout" => settings.stall_timeout_ms.to_value(),
        "sctp-mtu" => settings.sctp_mtu.to_value(),
        "max-result-size" => settings.max_result_size.to_value(),
        _ => return None,
    })
}
