#!/usr/bin/env bash
# One command for every binding of the current API:
#   client-sdk/ffi/generate-bindings.sh [OUT]     (default OUT: $CARGO_TARGET_DIR/bindings)
# builds the workspace in release (the library and the generators), then writes
#   OUT/kotlin/uniffi/starling/starling.kt
#   OUT/swift/starling.swift, starlingFFI.h, starlingFFI.modulemap
#   OUT/python/starling.py
# and rewrites the checked-in C header client-sdk/ffi/include/starling.h.
# Set STARLING_NO_BUILD=1 to skip the cargo build (after one of your own).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
target="${CARGO_TARGET_DIR:-$repo/target}"
out="${1:-$target/bindings}"
if [ "${STARLING_NO_BUILD:-0}" != 1 ]; then
  (cd "$repo" && cargo build --release --workspace --locked)
fi
lib="$target/release/libstarling_sdk_ffi.so"
for language in kotlin swift python; do
  rm -rf "${out:?}/$language"
  "$target/release/uniffi-bindgen" generate --no-format --library "$lib" --language "$language" --out-dir "$out/$language" >/dev/null
done
"$target/release/starling-cbindgen"
find "$out" -type f | sort
