//! The SDK from other languages, end to end, each against the release library built with this
//! test: the C header is current and the C example runs (gcc, static and dynamic, g++, valgrind);
//! the Python package passes its pytest suite, which trains with a real `starling serve` over
//! loopback QUIC; the Kotlin bindings compile with kotlinc and run on the JVM; the Swift bindings
//! are generated.
//!
//! A test whose tool is missing prints SKIPPED, or fails under `CI=true`. The tests run one at a
//! time (each loads both cores).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Cargo's own `release` directory (the bins of this package are uplifted there).
fn cargo_release_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_uniffi-bindgen")).parent().expect("target/release").to_path_buf()
}

/// A target directory for the scripts, `<target>/foreign`, whose `release/` links to exactly the
/// artifacts this test was built with. Cargo does not copy a dependency's cdylib and staticlib up
/// to `target/release` (only `target/release/deps` has the ones just built), so the scripts'
/// usual `$CARGO_TARGET_DIR/release/libstarling_sdk_ffi.so` could be stale there.
fn target_dir() -> PathBuf {
    static STAGED: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    STAGED
        .get_or_init(|| {
            let cargo = cargo_release_dir();
            let staged = cargo.parent().expect("target").join("foreign");
            let release = staged.join("release");
            std::fs::create_dir_all(&release).expect("create the staging directory");
            let links = [
                ("libstarling_sdk_ffi.so", cargo.join("deps/libstarling_sdk_ffi.so")),
                ("libstarling_sdk_ffi.a", cargo.join("deps/libstarling_sdk_ffi.a")),
                ("uniffi-bindgen", PathBuf::from(env!("CARGO_BIN_EXE_uniffi-bindgen"))),
                ("starling-cbindgen", PathBuf::from(env!("CARGO_BIN_EXE_starling-cbindgen"))),
                ("starling", cargo.join("starling")),
            ];
            for (name, source) in links {
                let link = release.join(name);
                let _ = std::fs::remove_file(&link);
                std::os::unix::fs::symlink(&source, &link).expect("link an artifact");
            }
            staged
        })
        .clone()
}

fn release_dir() -> PathBuf {
    target_dir().join("release")
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../..").canonicalize().expect("repository root")
}

fn have(tool: &str) -> bool {
    Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().is_ok_and(|o| o.status.success())
}

/// Whether the tools are there; if not, SKIPPED (or a failure under CI).
fn require(test: &str, tools: &[&str]) -> bool {
    let missing: Vec<_> = tools.iter().filter(|t| !have(t)).collect();
    if missing.is_empty() {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test}: missing {missing:?} (CI installs them in .ci/run)");
    }
    eprintln!("SKIPPED {test}: missing {missing:?}");
    false
}

/// Runs a script or program with the target directory set; fails with its output.
fn run(what: &str, cmd: &mut Command) {
    let out = cmd
        .env("CARGO_TARGET_DIR", target_dir())
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot start: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{what} failed ({}):\n{text}", out.status);
    println!("{what}:\n{text}");
}

#[test]
fn the_c_header_is_what_cbindgen_makes_of_the_c_abi() {
    run("starling-cbindgen --check", Command::new(env!("CARGO_BIN_EXE_starling-cbindgen")).arg("--check"));
}

#[test]
fn the_c_example_builds_static_and_dynamic_and_runs_cleanly() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    if !require("c example", &["gcc", "g++", "strip", "valgrind"]) {
        return;
    }
    run("examples/c/build-and-run.sh", &mut Command::new(repo().join("examples/c/build-and-run.sh")));
}

#[test]
fn the_python_package_trains_with_the_real_service() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    if !require("python package", &["python3", "strip"]) {
        return;
    }
    let starling = release_dir().join("starling");
    assert!(starling.exists(), "{} is missing (built by `cargo test --workspace`)", starling.display());
    let venv = target_dir().join("python/venv");
    let python = repo().join("client-sdk/ffi/python");
    run("python build.sh", Command::new(python.join("build.sh")).arg("--venv").arg(&venv));
    if !venv.join("bin/pytest").exists() {
        run(
            "pip install pytest",
            Command::new(venv.join("bin/python")).args(["-m", "pip", "install", "-q", "pytest"]),
        );
    }
    // From outside the source folder, so that the installed wheel is what gets imported.
    let scratch = tempfile::tempdir().expect("temporary directory");
    run(
        "pytest",
        Command::new(venv.join("bin/pytest"))
            .args(["-q", "-p", "no:cacheprovider"])
            .arg(python.join("tests"))
            .env("STARLING_BIN", &starling)
            .current_dir(scratch.path()),
    );
}

#[test]
fn the_kotlin_bindings_compile_and_run_on_the_jvm() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    if !require("kotlin bindings", &["java", "npm"]) {
        return;
    }
    run("client-sdk/ffi/kotlin/check.sh", &mut Command::new(repo().join("client-sdk/ffi/kotlin/check.sh")));
}

#[test]
fn the_swift_bindings_are_generated() {
    if !require("swift bindings", &["gcc"]) {
        return;
    }
    run("client-sdk/ffi/swift/check.sh", &mut Command::new(repo().join("client-sdk/ffi/swift/check.sh")));
}
