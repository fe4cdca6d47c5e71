#!/usr/bin/env bash
# Called by meson.build: cargo SOURCE_DIR TARGET_DIR debug|release OUTPUT
set -euo pipefail
cargo="$1" source="$2" target="$3" profile="$4" output="$5"
args=(build --lib --manifest-path "$source/Cargo.toml" --target-dir "$target")
[ "$profile" = release ] && args+=(--release)
"$cargo" "${args[@]}"
cp "$target/$profile/libgstroboflow.so" "$output"
