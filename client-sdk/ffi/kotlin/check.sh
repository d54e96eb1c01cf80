#!/usr/bin/env bash
# Compiles the generated Kotlin bindings with SmokeTest.kt and runs them on the JVM (JNA), against
# the release cdylib. Needs Java 17+, npm (for the Kotlin compiler) and JNA.
#
#   cargo build --release --workspace   # once, beforehand (the cdylib and uniffi-bindgen)
#   client-sdk/ffi/kotlin/check.sh            # fetch the tools if missing, compile, run
#   client-sdk/ffi/kotlin/check.sh --tools     # only fetch the tools (CI does this up front)
#
# Environment:
#   CARGO_TARGET_DIR     the cargo target directory (default: <repo>/target)
#   STARLING_TOOLS_DIR   where the Kotlin compiler is cached (default: ~/.cache/starling-tools)
#   KOTLIN_VERSION       the kotlin-compiler npm package version (default: 2.4.20)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../../.." && pwd)"
target="${CARGO_TARGET_DIR:-$repo/target}"
lib_dir="$target/release"
lib="$lib_dir/libstarling_sdk_ffi.so"
bindgen="$lib_dir/uniffi-bindgen"
tools="${STARLING_TOOLS_DIR:-$HOME/.cache/starling-tools}"
kotlin_version="${KOTLIN_VERSION:-2.4.20}"
kotlin_home="$tools/kotlin-compiler-$kotlin_version"
tools_only=0
[[ "${1:-}" == "--tools" ]] && tools_only=1

command -v java >/dev/null || { echo "check.sh: java is not installed" >&2; exit 1; }

# The Kotlin compiler, from npm (the kotlin-compiler package ships kotlinc and its jars).
if [[ ! -x "$kotlin_home/bin/kotlinc" ]]; then
    command -v npm >/dev/null || { echo "check.sh: npm is needed to fetch the Kotlin compiler" >&2; exit 1; }
    echo "== fetching kotlin-compiler@$kotlin_version into $kotlin_home"
    mkdir -p "$tools"
    dl="$(mktemp -d "$tools/.download.XXXXXX")"
    (cd "$dl" && npm pack --silent "kotlin-compiler@$kotlin_version" >/dev/null)
    tar xzf "$dl"/kotlin-compiler-*.tgz -C "$dl"
    chmod +x "$dl"/package/bin/*
    rm -rf "$kotlin_home"
    mv "$dl/package" "$kotlin_home"
    rm -rf "$dl"
fi
kotlinc="$kotlin_home/bin/kotlinc"

# JNA (the generated code calls the library through it).
jna=/usr/share/java/jna.jar
if [[ ! -f "$jna" ]]; then
    echo "== installing libjna-java"
    sudo_cmd=()
    [[ "$(id -u)" -eq 0 ]] || sudo_cmd=(sudo)
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -q libjna-java
fi

if [[ $tools_only == 1 ]]; then
    echo "== Kotlin tools ready: $kotlinc, $jna"
    exit 0
fi
for f in "$lib" "$bindgen"; do
    [[ -x "$f" || -f "$f" ]] || { echo "check.sh: missing $f (build the release library and uniffi-bindgen first)" >&2; exit 1; }
done
# Only needed if the bindings ever use async functions; harmless otherwise.
classpath="$jna"
coroutines="$(ls "$kotlin_home"/lib/kotlinx-coroutines-core-jvm*.jar 2>/dev/null | head -n 1 || true)"
[[ -n "$coroutines" ]] && classpath="$classpath:$coroutines"

work="$(mktemp -d "${TMPDIR:-/tmp}/starling-kotlin.XXXXXX")"
trap 'rm -rf "$work"' EXIT

echo "== generating the Kotlin bindings"
"$bindgen" generate --no-format --library "$lib" --language kotlin --out-dir "$work/gen"
bindings="$work/gen/uniffi/starling/starling.kt"
[[ -s "$bindings" ]] || { echo "check.sh: $bindings was not generated" >&2; exit 1; }

echo "== compiling the bindings and SmokeTest.kt"
"$kotlinc" -nowarn -include-runtime -cp "$classpath" -d "$work/smoke.jar" \
    "$bindings" "$here/SmokeTest.kt"

echo "== running SmokeTest"
java -Djna.library.path="$lib_dir" -cp "$work/smoke.jar:$classpath" SmokeTestKt
echo "== Kotlin smoke test passed"
