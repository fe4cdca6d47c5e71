// The network side of the configuration: ICE servers, the local UDP bind
// address and the SCTP packet size.

use std::net::{IpAddr, SocketAddr};

use percent_encoding::percent_decode_str;
use url::Url;

use super::{ConfigError, IceServer, config_error, non_empty, split_list};

/// `sctp-mtu` 0: chosen from the path (see [`sctp_mtu`]).
pub const AUTO_SCTP_MTU: u32 = 0;
pub const MIN_SCTP_MTU: u32 = 512;
/// The largest SCTP packet the server takes: aiortc reads each DTLS record
/// with `recv(1500)` and loses what lies beyond.
pub const MAX_SCTP_MTU: u32 = 1500;

pub(super) fn is_loopback_host(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(domain)) => domain.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

/// Parses `ice-servers`: a comma-separated list of `stun:host:port`,
/// `turn:host:port`, `turns:...`, optionally with credentials written as
/// `turn://user:password@host:port?transport=udp` (percent-encoded where
/// they contain `:` or `@`).
pub(super) fn parse_ice_servers(value: &Option<String>) -> Result<Vec<IceServer>, ConfigError> {
    let mut servers = Vec::new();
    for item in split_list(value) {
        let (scheme, rest) = item.split_once(':').ok_or_else(|| {
            config_error(
                "ice-servers",
                format!("'{item}' is not a stun:, turn: or turns: URI"),
            )
        })?;
        let scheme = scheme.to_ascii_lowercase();
        if !matches!(scheme.as_str(), "stun" | "stuns" | "turn" | "turns") {
            return Err(config_error(
                "ice-servers",
                format!("'{item}' has scheme '{scheme}'; use stun:, stuns:, turn: or turns:"),
            ));
        }
        let rest = rest.trim_start_matches("//");
        let (credentials, address) = match rest.rsplit_once('@') {
            Some((credentials, address)) => (Some(credentials), address),
            None => (None, rest),
        };
        if address.is_empty() {
            return Err(config_error(
                "ice-servers",
                format!("'{scheme}:' URI without a host"),
            ));
        }
        let (username, credential) = match credentials {
            Some(credentials) => {
                let (user, password) = credentials.split_once(':').ok_or_else(|| {
                    config_error(
                        "ice-servers",
                        format!(
                            "credentials of a {scheme}: server must be written user:password@host"
                        ),
                    )
                })?;
                (Some(percent_decode(user)), Some(percent_decode(password)))
            }
            None => (None, None),
        };
        if scheme.starts_with("turn") && username.is_none() {
            return Err(config_error(
                "ice-servers",
                format!(
                    "the {scheme}: server {address} needs credentials: {scheme}://user:password@{address}"
                ),
            ));
        }
        servers.push(IceServer {
            urls: vec![format!("{scheme}:{address}")],
            username,
            credential,
        });
    }
    Ok(servers)
}

/// `%40` becomes `@`; a `+` stays a `+` (this is a URI, not a form).
fn percent_decode(text: &str) -> String {
    percent_decode_str(text).decode_utf8_lossy().into_owned()
}

/// `udp-bind-address`, or the loopback when the server is on this host (a
/// wildcard address would skip the loopback), else the wildcard.
pub(super) fn udp_bind_address(
    setting: &Option<String>,
    api_url: &Url,
) -> Result<SocketAddr, ConfigError> {
    Ok(match non_empty(setting) {
        Some(text) => parse_bind_address(text)?,
        None if is_loopback_host(api_url) => SocketAddr::from(([127, 0, 0, 1], 0)),
        None => SocketAddr::from(([0, 0, 0, 0], 0)),
    })
}

fn parse_bind_address(text: &str) -> Result<SocketAddr, ConfigError> {
    if let Ok(address) = text.parse::<SocketAddr>() {
        return Ok(address);
    }
    text.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, 0))
        .map_err(|_| {
            config_error(
                "udp-bind-address",
                format!("'{text}' is not an IP address or IP:port (e.g. 127.0.0.1:0)"),
            )
        })
}

/// Checks `sctp-mtu` as set: 0 (automatic) or within the range the server takes.
pub(super) fn check_sctp_mtu(setting: u32) -> Result<(), ConfigError> {
    if setting != AUTO_SCTP_MTU && !(MIN_SCTP_MTU..=MAX_SCTP_MTU).contains(&setting) {
        return Err(config_error(
            "sctp-mtu",
            format!(
                "{setting} is out of range {MIN_SCTP_MTU}..={MAX_SCTP_MTU} (0: automatic); the server reads at most {MAX_SCTP_MTU} bytes of each packet"
            ),
        ));
    }
    Ok(())
}

/// The SCTP packet size to use; `None`: webrtc-rs's default.
///
/// A loopback path carries datagrams far larger than any Ethernet MTU, and
/// a loopback host candidate can only reach the loopback (unless a TURN
/// relay, from ice-servers, stands between): there, the largest packet the
/// server takes cuts the packet count by a fifth, and with it both sides'
/// per-packet work.
pub(super) fn sctp_mtu(
    setting: u32,
    udp_bind_address: SocketAddr,
    ice_servers: &[IceServer],
) -> Option<u32> {
    match setting {
        AUTO_SCTP_MTU if udp_bind_address.ip().is_loopback() && ice_servers.is_empty() => {
            Some(MAX_SCTP_MTU)
        }
        AUTO_SCTP_MTU => None,
        mtu => Some(mtu),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::UploadSettings;
    use crate::config::test_support::with_spec;

    #[test]
    fn sctp_mtu_is_the_servers_largest_only_on_a_loopback_path() {
        let mtu = |settings: UploadSettings| settings.validate().unwrap().sctp_mtu;
        // The default: a loopback server, so a loopback bind address.
        assert_eq!(mtu(with_spec()), Some(MAX_SCTP_MTU));
        assert_eq!(
            mtu(UploadSettings {
                udp_bind_address: Some("127.0.0.1:0".into()),
                ..with_spec()
            }),
            Some(MAX_SCTP_MTU)
        );
        // A path that may leave the host keeps webrtc-rs's safe default.
        assert_eq!(
            mtu(UploadSettings {
                api_url: "https://example.com".into(),
                ..with_spec()
            }),
            None
        );
        assert_eq!(
            mtu(UploadSettings {
                udp_bind_address: Some("0.0.0.0:0".into()),
                ..with_spec()
            }),
            None
        );
        assert_eq!(
            mtu(UploadSettings {
                ice_servers: Some("turn://user:password@127.0.0.1:3478".into()),
                ..with_spec()
            }),
            None
        );
        // An explicit value wins, either way.
        assert_eq!(
            mtu(UploadSettings {
                sctp_mtu: 1200,
                ..with_spec()
            }),
            Some(1200)
        );
        assert_eq!(
            mtu(UploadSettings {
                sctp_mtu: 1400,
                api_url: "https://example.com".into(),
                ..with_spec()
            }),
            Some(1400)
        );
    }

    #[test]
    fn bind_address_follows_the_server_host() {
        for (url, expected) in [
            ("http://localhost:9001", "127.0.0.1:0"),
            ("http://127.0.0.7:9001", "127.0.0.1:0"),
            ("http://[::1]:9001", "127.0.0.1:0"),
            ("https://serverless.roboflow.com", "0.0.0.0:0"),
        ] {
            let config = UploadSettings {
                api_url: url.into(),
                ..with_spec()
            }
            .validate()
            .unwrap();
            assert_eq!(
                config.udp_bind_address,
                expected.parse::<SocketAddr>().unwrap(),
                "{url}"
            );
        }
        let explicit = UploadSettings {
            udp_bind_address: Some("127.0.0.1".into()),
            ..with_spec()
        };
        assert_eq!(
            explicit.validate().unwrap().udp_bind_address,
            "127.0.0.1:0".parse::<SocketAddr>().unwrap()
        );
    }

    #[test]
    fn ice_servers_parse_with_credentials() {
        let servers = parse_ice_servers(&Some(
            "stun:stun.example.com:3478, turn://user:p%40ss@turn.example.com:3478?transport=udp"
                .into(),
        ))
        .unwrap();
        assert_eq!(servers[0].urls, vec!["stun:stun.example.com:3478"]);
        assert_eq!(servers[0].username, None);
        assert_eq!(
            servers[1].urls,
            vec!["turn:turn.example.com:3478?transport=udp"]
        );
        assert_eq!(servers[1].username.as_deref(), Some("user"));
        assert_eq!(servers[1].credential.as_deref(), Some("p@ss"));
        assert!(parse_ice_servers(&Some("turn:turn.example.com".into())).is_err());
        assert!(parse_ice_servers(&Some("http://x".into())).is_err());
    }

    #[test]
    fn credentials_decode_percent_escapes_but_keep_plus() {
        let servers = parse_ice_servers(&Some(
            "turns://us%3Aer:a+b%2Bc%25@turn.example.com:5349".into(),
        ))
        .unwrap();
        assert_eq!(servers[0].username.as_deref(), Some("us:er"));
        assert_eq!(servers[0].credential.as_deref(), Some("a+b+c%"));
    }
}
