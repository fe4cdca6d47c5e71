#!/usr/bin/env bash
# The main job, from a fresh Debian 12 machine: installs what is missing
# (Debian packages, Rust, the local Roboflow Inference Server), builds the
# plugin, starts the server on 127.0.0.1:9001, uploads a clip and writes
# annotated.mp4 (the blurred video the Workflow returns) and results.jsonl
# (one JSON result per frame), then prints a summary.
#   scripts/demo.sh [CLIP]      (default: a 10 s 720p clip made with GStreamer)
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO=sudo
PACKAGES=(build-essential pkg-config curl ca-certificates
    libgstreamer1.0-dev libgstreamer-plugins-base1.0-dev gstreamer1.0-tools
    gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-bad
    gstreamer1.0-plugins-ugly gstreamer1.0-libav python3-venv)

missing=()
for package in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "== installing ${missing[*]}"
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${missing[@]}"
fi

if ! command -v cargo >/dev/null; then
    if [ -x "$HOME/.cargo/bin/cargo" ]; then
        export PATH="$HOME/.cargo/bin:$PATH"
    else
        echo "== installing Rust (rustup)"
        curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
        export PATH="$HOME/.cargo/bin:$PATH"
    fi
fi

echo "== building the plugin and the example (release)"
cargo build --release --locked --lib --example annotate_file

echo "== starting the local Roboflow Inference Server (first time: installs it, several GB)"
scripts/roboflow-server.sh start

clip="${1:-}"
if [ -z "$clip" ]; then
    clip=target/demo/clip.mp4
    if [ ! -s "$clip" ]; then
        mkdir -p target/demo
        echo "== making a 10 s 720p clip with GStreamer"
        gst-launch-1.0 -q videotestsrc num-buffers=300 pattern=ball \
            ! video/x-raw,width=1280,height=720,framerate=30/1 \
            ! x264enc speed-preset=veryfast bitrate=4000 key-int-max=60 ! mp4mux \
            ! filesink location="$clip"
    fi
fi

echo "== annotating $clip"
GST_PLUGIN_PATH="$PWD/target/release${GST_PLUGIN_PATH:+:$GST_PLUGIN_PATH}" \
target/release/examples/annotate_file "$clip" \
    --workflow-spec-file examples/workflows/blur-dominant-color.json \
    --stream-output blurred --data-output rgb_color \
    --output annotated.mp4 --results results.jsonl

echo "== done: annotated.mp4 and results.jsonl are in $PWD"
echo "   (the server keeps running; stop it with scripts/roboflow-server.sh stop)"
