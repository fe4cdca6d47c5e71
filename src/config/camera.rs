// A camera the server reads itself (PROTOCOL.md §11): roboflowresultsrc's
// `source-url`. The URL travels to the server whole, credentials included;
// everywhere else (errors, logs, the property read back) it is shown
// without them.

use std::net::IpAddr;

use url::{Host, Url};

use super::{ConfigError, config_error};

/// How the server reads the camera.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CameraKind {
    /// `rtsp_url`: FFmpeg over TCP.
    Rtsp,
    /// `mjpeg_url`: an HTTP multipart (or plain MJPEG) stream.
    Mjpeg,
}

impl CameraKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CameraKind::Rtsp => "RTSP",
            CameraKind::Mjpeg => "MJPEG",
        }
    }
}

/// The camera URL, validated.
#[derive(Clone, PartialEq)]
pub struct CameraSource {
    pub kind: CameraKind,
    /// As given, credentials included: only the signalling request holds it.
    url: Url,
}

impl std::fmt::Debug for CameraSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.kind.as_str(), self.shown())
    }
}

impl CameraSource {
    /// Parses `source-url`: rtsp:// or rtsps:// is an RTSP camera, http://
    /// or https:// an MJPEG stream.
    pub fn parse(text: &str) -> Result<CameraSource, ConfigError> {
        let text = text.trim();
        let url = Url::parse(text).map_err(|err| {
            config_error("source-url", format!("'{}' is not a URL: {err}", redact_text(text)))
        })?;
        let kind = match url.scheme() {
            "rtsp" | "rtsps" => CameraKind::Rtsp,
            "http" | "https" => CameraKind::Mjpeg,
            other => {
                return Err(config_error(
                    "source-url",
                    format!(
                        "'{other}://' is not a camera the server reads: use rtsp:// or rtsps:// (RTSP), or http:// or https:// (MJPEG)"
                    ),
                ));
            }
        };
        if url.host().is_none_or(|host| matches!(host, Host::Domain(name) if name.is_empty())) {
            return Err(config_error("source-url", format!("'{}' has no host", shown(&url))));
        }
        Ok(CameraSource { kind, url })
    }

    /// The URL for the server, credentials included.
    pub fn url(&self) -> &str {
        self.url.as_str()
    }

    /// The URL as shown to people: no user, password, query or fragment.
    pub fn shown(&self) -> String {
        shown(&self.url)
    }

    /// Whether the server's default policy refuses this MJPEG address:
    /// loopback, private, link-local and other non-global addresses, and
    /// `localhost` (names are not resolved here).
    pub fn is_non_global(&self) -> bool {
        match self.url.host() {
            Some(Host::Ipv4(ip)) => !is_global(IpAddr::V4(ip)),
            Some(Host::Ipv6(ip)) => !is_global(IpAddr::V6(ip)),
            Some(Host::Domain(name)) => {
                let name = name.trim_end_matches('.').to_ascii_lowercase();
                name == "localhost" || name.ends_with(".localhost")
            }
            None => false,
        }
    }
}

fn shown(url: &Url) -> String {
    let mut shown = url.clone();
    let _ = shown.set_username("");
    let _ = shown.set_password(None);
    let hidden_query = shown.query().is_some_and(|query| !query.is_empty());
    shown.set_query(None);
    shown.set_fragment(None);
    let mut text = shown.to_string();
    if hidden_query {
        text.push_str("?…");
    }
    text
}

/// A URL that did not parse, shown without what looks like credentials.
fn redact_text(text: &str) -> String {
    match (text.find("://"), text.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => format!("{}://…@{}", &text[..scheme_end], &text[at + 1..]),
        _ => text.to_owned(),
    }
}

/// Python's `ipaddress.is_global`, as far as cameras go.
fn is_global(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(ip) => {
            let [a, b, ..] = ip.octets();
            !(ip.is_loopback()
                || ip.is_private()
                || ip.is_link_local()
                || ip.is_unspecified()
                || ip.is_broadcast()
                || ip.is_documentation()
                || a == 0
                || (a == 100 && (64..128).contains(&b))
                || (a == 192 && b == 0)
                || (a == 198 && (18..20).contains(&b))
                || a >= 240)
        }
        IpAddr::V6(ip) => {
            let first = ip.segments()[0];
            !(ip.is_loopback()
                || ip.is_unspecified()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
                || ip.to_ipv4_mapped().is_some_and(|v4| !is_global(IpAddr::V4(v4))))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes_choose_the_kind() {
        assert_eq!(CameraSource::parse("rtsp://cam.example/stream").unwrap().kind, CameraKind::Rtsp);
        assert_eq!(CameraSource::parse("rtsps://cam.example:322/s").unwrap().kind, CameraKind::Rtsp);
        assert_eq!(CameraSource::parse("http://cam.example/video.mjpg").unwrap().kind, CameraKind::Mjpeg);
        assert_eq!(CameraSource::parse(" https://cam.example/v ").unwrap().kind, CameraKind::Mjpeg);
        for bad in ["file:///dev/video0", "udp://239.0.0.1:5000", "cam.example/stream", "rtsp://", ""] {
            assert_eq!(CameraSource::parse(bad).unwrap_err().property, "source-url", "{bad}");
        }
    }

    #[test]
    fn credentials_are_never_shown() {
        let camera = CameraSource::parse("rtsp://admin:s3cret@10.0.0.5:554/live?token=abc#x").unwrap();
        assert_eq!(camera.url(), "rtsp://admin:s3cret@10.0.0.5:554/live?token=abc#x");
        assert_eq!(camera.shown(), "rtsp://10.0.0.5:554/live?…");
        assert!(!format!("{camera:?}").contains("s3cret"));
        let error = CameraSource::parse("rtsp://admin:s3cret@[bad/live").unwrap_err();
        assert!(!error.to_string().contains("s3cret"), "{error}");
        let error = CameraSource::parse("ftp://admin:s3cret@host/live").unwrap_err();
        assert!(!error.to_string().contains("s3cret"), "{error}");
    }

    #[test]
    fn non_global_addresses_as_the_server_sees_them() {
        for url in [
            "http://127.0.0.1:8080/s",
            "http://10.1.2.3/s",
            "http://172.16.0.1/s",
            "http://192.168.1.10/s",
            "http://169.254.0.1/s",
            "http://100.64.0.1/s",
            "http://0.0.0.0/s",
            "http://[::1]/s",
            "http://[fd00::1]/s",
            "http://[fe80::1]/s",
            "http://localhost:8080/s",
            "http://cam.localhost/s",
        ] {
            assert!(CameraSource::parse(url).unwrap().is_non_global(), "{url}");
        }
        for url in ["http://8.8.8.8/s", "http://[2001:4860::8888]/s", "http://cam.example.com/s"] {
            assert!(!CameraSource::parse(url).unwrap().is_non_global(), "{url}");
        }
    }
}
