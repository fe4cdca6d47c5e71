# Loaded by every Python process of the local test server (the HTTP app and
# each spawned WebRTC worker): keeps aiortc's ICE host candidates on loopback,
# so a local server never offers or contacts any other address.
import os

if os.environ.get("ROBOFLOW_ICE_LOOPBACK_ONLY") == "1":
    try:
        import aioice.ice as _ice

        def _loopback_only(use_ipv4: bool, use_ipv6: bool) -> list:
            return ["127.0.0.1"] if use_ipv4 else []

        _ice.get_host_addresses = _loopback_only
    except Exception as error:  # the server must not start half-patched
        raise SystemExit(f"could not force aioice onto loopback: {error}")
