#!/usr/bin/env bash
# Generates the Swift bindings from the release library and checks what can be checked without a
# Swift toolchain: the three files are there and not empty, the module map names the header, and
# the C header (starlingFFI.h) compiles, and every function it declares is exported by the
# library.
#
# NOTE: Swift itself is NOT compiled here (there is no Swift toolchain for this machine); compile
# starling.swift on macOS (swiftc or an Xcode project with the XCFramework) to check it.
#
#   cargo build --release --workspace   # once, beforehand (the library and uniffi-bindgen)
#   client-sdk/ffi/swift/check.sh
#
# CARGO_TARGET_DIR: the cargo target directory (default: <repo>/target). CC: the C compiler
# (default: gcc).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../../.." && pwd)"
target="${CARGO_TARGET_DIR:-$repo/target}"
lib="$target/release/libstarling_sdk_ffi.so"
bindgen="$target/release/uniffi-bindgen"
cc="${CC:-gcc}"

for f in "$lib" "$bindgen"; do
    [[ -f "$f" ]] || { echo "check.sh: missing $f (build the release library and uniffi-bindgen first)" >&2; exit 1; }
done

out="$(mktemp -d "${TMPDIR:-/tmp}/starling-swift.XXXXXX")"
trap 'rm -rf "$out"' EXIT

echo "== generating the Swift bindings"
"$bindgen" generate --no-format --library "$lib" --language swift --out-dir "$out"

for f in starling.swift starlingFFI.h starlingFFI.modulemap; do
    [[ -s "$out/$f" ]] || { echo "check.sh: $f is missing or empty" >&2; exit 1; }
    printf '  %-24s %8d bytes\n' "$f" "$(stat -c %s "$out/$f")"
done

grep -q 'header "starlingFFI.h"' "$out/starlingFFI.modulemap" ||
    { echo "check.sh: starlingFFI.modulemap does not name starlingFFI.h" >&2; exit 1; }
grep -q 'import starlingFFI' "$out/starling.swift" ||
    { echo "check.sh: starling.swift does not import the starlingFFI module" >&2; exit 1; }
grep -q 'class StarlingDevice: StarlingDeviceProtocol' "$out/starling.swift" ||
    { echo "check.sh: starling.swift has no StarlingDevice class" >&2; exit 1; }

# starlingFFI.h is C with Clang's nullability qualifiers (_Nonnull, _Nullable), which Swift's
# Clang importer understands and GCC does not: under GCC they are defined away. The header is
# included twice to check its include guard (#pragma once).
echo "== compiling starlingFFI.h as C ($cc -fsyntax-only)"
cat >"$out/header-check.c" <<'C'
#if !defined(__clang__)
#define _Nonnull
#define _Nullable
#define _Null_unspecified
#endif
#include "starlingFFI.h"
#include "starlingFFI.h"
C
"$cc" -std=c11 -Wall -Wextra -Werror -pedantic -fsyntax-only -I "$out" -x c "$out/header-check.c"

# Every function the header declares is exported by the library (the Swift code calls them all
# through the header; a missing one would fail only at link time on iOS).
echo "== checking the header's functions against the library's exports"
grep -oE '\b(uniffi|ffi)_starling_sdk_ffi_[a-z0-9_]+\(' "$out/starlingFFI.h" | tr -d '(' | sort -u >"$out/declared"
nm -D --defined-only "$lib" | awk '{ print $NF }' | sort -u >"$out/exported"
missing="$(comm -23 "$out/declared" "$out/exported")"
if [[ -n "$missing" ]]; then
    echo "check.sh: declared in starlingFFI.h but not exported by $lib:" >&2
    echo "$missing" >&2
    exit 1
fi
echo "  $(wc -l <"$out/declared") functions, all exported"

echo "== Swift bindings generated; the C header compiles (Swift itself was not compiled)"
