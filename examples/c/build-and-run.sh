#!/usr/bin/env bash
# Builds examples/c/main.c against the Starling C ABI and runs it: linked with the shared library,
# linked statically, on disk (a storage directory), under valgrind if installed, and compiled once
# as C++ to check the header's C++ compatibility. Fails on the first error.
#
#   cargo build --release --workspace   # beforehand: libstarling_sdk_ffi.{so,a}
#   examples/c/build-and-run.sh
#
# CARGO_TARGET_DIR: the cargo target directory (default: <repo>/target). CC, CXX: the compilers
# (default: gcc, g++).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
target="${CARGO_TARGET_DIR:-$repo/target}"
[[ -d "$target/release" ]] ||
    { echo "build-and-run.sh: no $target/release (cargo build --release --workspace)" >&2; exit 1; }
lib_dir="$(cd "$target/release" && pwd)"
include="$repo/client-sdk/ffi/include"
cc="${CC:-gcc}"
cxx="${CXX:-g++}"

for f in "$lib_dir/libstarling_sdk_ffi.so" "$lib_dir/libstarling_sdk_ffi.a" "$include/starling.h"; do
    [[ -f "$f" ]] || { echo "build-and-run.sh: missing $f (cargo build --release --workspace)" >&2; exit 1; }
done

out="$(mktemp -d "${TMPDIR:-/tmp}/starling-c-example.XXXXXX")"
trap 'rm -rf "$out"' EXIT
cflags=(-std=c11 -Wall -Wextra -Werror -pedantic -O2 -I "$include")

# The example calls starling_debug_panic on purpose: Rust's panic hook prints the panic on stderr
# ("thread '<unnamed>' panicked at ... starling_debug_panic was called"); that line is expected.
export RUST_BACKTRACE=0 # one line for that panic, not a backtrace

echo "== dynamic: $cc, linked with libstarling_sdk_ffi.so"
"$cc" "${cflags[@]}" "$here/main.c" -L "$lib_dir" -lstarling_sdk_ffi -Wl,-rpath,"$lib_dir" \
    -o "$out/example-dynamic"
"$out/example-dynamic"

echo "== dynamic, on disk (storage_dir = a temporary directory)"
"$out/example-dynamic" "$out/store"
[[ -d "$out/store" ]] || { echo "build-and-run.sh: no store was created in $out/store" >&2; exit 1; }
echo "== dynamic, reopening the same storage directory"
"$out/example-dynamic" "$out/store" >/dev/null

echo "== static: $cc, linked with libstarling_sdk_ffi.a"
# The Rust standard library needs libpthread, libdl and libm besides libc (with glibc 2.34 and
# later the first two are stubs in libc, but older systems need them).
"$cc" "${cflags[@]}" "$here/main.c" "$lib_dir/libstarling_sdk_ffi.a" -lpthread -ldl -lm \
    -Wl,--gc-sections -o "$out/example-static"
"$out/example-static"

echo "== C++: $cxx -x c++ (the header's cpp_compat)"
"$cxx" -x c++ -std=c++17 -Wall -Wextra -Werror -pedantic -O2 -I "$include" "$here/main.c" \
    -L "$lib_dir" -lstarling_sdk_ffi -Wl,-rpath,"$lib_dir" -o "$out/example-cxx"
"$out/example-cxx" >/dev/null

if command -v valgrind >/dev/null; then
    echo "== valgrind (dynamic build): memory errors and definite leaks fail the run"
    # Rust's runtime keeps some allocations until exit (thread-locals, the panic hook's state):
    # valgrind lists them as "still reachable", which is not counted.
    valgrind -q --error-exitcode=1 --leak-check=full --errors-for-leak-kinds=definite \
        "$out/example-dynamic" >/dev/null
    echo "valgrind: no memory errors, no definite leaks"
else
    echo "== valgrind is not installed: skipped"
fi

echo "== sizes"
strip -o "$out/example-static.stripped" "$out/example-static"
strip -o "$out/libstarling_sdk_ffi.stripped.so" "$lib_dir/libstarling_sdk_ffi.so"
size_of() { stat -c %s "$1" | numfmt --to=iec --suffix=B; }
printf '%-44s %10s (stripped %s)\n' "static executable" "$(size_of "$out/example-static")" \
    "$(size_of "$out/example-static.stripped")"
printf '%-44s %10s (+ libstarling_sdk_ffi.so: %s, stripped %s)\n' "dynamic executable" \
    "$(size_of "$out/example-dynamic")" "$(size_of "$lib_dir/libstarling_sdk_ffi.so")" \
    "$(size_of "$out/libstarling_sdk_ffi.stripped.so")"
echo "== C example: all builds passed"
