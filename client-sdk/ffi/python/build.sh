#!/usr/bin/env bash
# Builds the Python package from the compiled Rust library:
#   1. generates the bindings (starling.py) with the workspace's uniffi-bindgen,
#   2. copies the shared library next to them (stripped),
#   3. builds a wheel into $TARGET/python/dist and, with --venv DIR, installs it there.
# Needs `cargo build --release --workspace` first (or pass --cargo to run it).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../../.." && pwd)"
target="${CARGO_TARGET_DIR:-$repo/target}"
venv=""
while [ $# -gt 0 ]; do
  case "$1" in
    --cargo) (cd "$repo" && cargo build --release --workspace --locked) ;;
    --venv) venv="$2"; shift ;;
    *) echo "usage: build.sh [--cargo] [--venv DIR]" >&2; exit 2 ;;
  esac
  shift
done
lib="$target/release/libstarling_sdk_ffi.so"
bindgen="$target/release/uniffi-bindgen"
for f in "$lib" "$bindgen"; do
  [ -e "$f" ] || { echo "missing $f: run cargo build --release --workspace" >&2; exit 1; }
done

stage="$target/python/stage"
rm -rf "$stage" && mkdir -p "$stage"
cp -r "$here/pyproject.toml" "$here/setup.py" "$here/starling_sdk" "$stage/"
rm -f "$stage/starling_sdk/starling.py" "$stage/starling_sdk/"*.so
"$bindgen" generate --no-format --library "$lib" --language python --out-dir "$stage/starling_sdk" >/dev/null
cp "$lib" "$stage/starling_sdk/"
strip --strip-unneeded "$stage/starling_sdk/libstarling_sdk_ffi.so"

mkdir -p "$target/python/dist"
python3 -m pip wheel --quiet --no-deps --wheel-dir "$target/python/dist" "$stage"
wheel="$(ls -t "$target/python/dist"/starling_sdk-*.whl | head -1)"
echo "built $wheel"
if [ -n "$venv" ]; then
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --force-reinstall --no-deps "$wheel"
  echo "installed into $venv"
fi
