#!/usr/bin/env bash
# The main job, from a fresh Debian 12 machine: installs what is missing
# (Debian packages, Rust, the local Roboflow Inference Server), builds the
# plugin, starts the server on 127.0.0.1:9001 and runs a clip through a
# Workflow, leaving annotated.mp4 (the video the Workflow returns) and
# results.jsonl (one JSON result per frame), then prints a summary.
#   scripts/demo.sh              detection: a model-free template-matching
#                                Workflow finds a moving ball in a generated
#                                10 s 720p clip; annotated.mp4 shows the
#                                boxes the server drew; prints how many
#                                frames had a detection
#   scripts/demo.sh blur [CLIP]  the blur Workflow (the blurred video and
#                                each frame's dominant colour) on CLIP, by
#                                default the same generated clip
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

mode="${1:-detect}"
case "$mode" in
    detect) [ "$#" -le 1 ] || { echo "usage: scripts/demo.sh [detect | blur [CLIP]]" >&2; exit 2; } ;;
    blur) ;;
    *) echo "usage: scripts/demo.sh [detect | blur [CLIP]]" >&2; exit 2 ;;
esac

# The generated clip: videotestsrc's ball, 39 px across, moving over black.
mkdir -p target/demo
generated=target/demo/clip.mp4
if [ ! -s "$generated" ]; then
    echo "== making a 10 s 720p clip with a moving ball (GStreamer)"
    gst-launch-1.0 -q videotestsrc num-buffers=300 pattern=ball \
        ! video/x-raw,width=1280,height=720,framerate=30/1 \
        ! x264enc speed-preset=veryfast bitrate=4000 key-int-max=60 ! mp4mux \
        ! filesink location="$generated"
fi

run_example() {
    GST_PLUGIN_PATH="$PWD/target/release${GST_PLUGIN_PATH:+:$GST_PLUGIN_PATH}" \
        target/release/examples/annotate_file "$@" --output annotated.mp4 --results results.jsonl
}

if [ "$mode" = detect ]; then
    # The template: the ball where videotestsrc draws it first, the centre
    # of the frame, a 44x44 PNG passed as a Workflow parameter.
    template=target/demo/ball-template.png
    gst-launch-1.0 -q videotestsrc num-buffers=1 pattern=ball ! video/x-raw,width=1280,height=720 \
        ! videocrop left=618 right=618 top=338 bottom=338 ! videoconvert ! pngenc \
        ! filesink location="$template"
    parameters="{\"template\": {\"type\": \"base64\", \"value\": \"$(base64 -w0 "$template")\"}}"
    echo "== detecting the ball in $generated (template matching, no model weights)"
    run_example "$generated" \
        --workflow-spec-file examples/workflows/template-match.json \
        --workflow-parameters "$parameters" \
        --stream-output annotated --data-output predictions | tee target/demo/summary.txt
    detected="$(grep -o '[0-9]* of [0-9]* frames' target/demo/summary.txt | head -1)"
    echo "== done: the ball was detected in $detected"
    echo "   annotated.mp4 (the boxes the server drew) and results.jsonl are in $PWD"
else
    clip="${2:-$generated}"
    echo "== blurring $clip"
    run_example "$clip" \
        --workflow-spec-file examples/workflows/blur-dominant-color.json \
        --stream-output blurred --data-output rgb_color
    echo "== done: annotated.mp4 and results.jsonl are in $PWD"
fi
echo "   (the server keeps running; stop it with scripts/roboflow-server.sh stop)"
