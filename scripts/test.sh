#!/usr/bin/env bash
# Runs every test of gst-roboflow: the plugin smoke check, unit tests,
# gst-check element tests and the integration tests against the in-repo
# test worker.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

echo "== build"
cargo build --lib --locked

echo "== smoke: gst-inspect-1.0 roboflowuploadsink"
export GST_PLUGIN_PATH="$PWD/target/debug${GST_PLUGIN_PATH:+:$GST_PLUGIN_PATH}"
# A private registry: a stale system cache must not hide a broken plugin.
export GST_REGISTRY="$PWD/target/gst-registry.bin"
rm -f "$GST_REGISTRY"
if ! gst-inspect-1.0 roboflowuploadsink > target/gst-inspect.txt 2>&1; then
    cat target/gst-inspect.txt
    gst-inspect-1.0 -b || true
    echo "FAILED: the plugin does not load (see above; gst-inspect-1.0 -b lists blacklisted plugins)" >&2
    exit 1
fi
grep -q "stall-timeout" target/gst-inspect.txt
echo "roboflowuploadsink loads: $(grep -c 'flags:' target/gst-inspect.txt) properties listed"

echo "== cargo test"
# Integration tests each run a WebRTC server and GStreamer pipelines: two at a
# time suits a 2-core machine.
cargo test --locked --all-targets --no-fail-fast -- --test-threads=2
