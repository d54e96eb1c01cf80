//! Writes the C header of the SDK's C ABI (`client-sdk/ffi/src/c_api.rs`) with cbindgen.
//!
//! `starling-cbindgen [OUT]` writes `OUT` (default: `client-sdk/ffi/include/starling.h`);
//! `starling-cbindgen --check` fails if the checked-in header is not what the source gives.

use anyhow::{Context, bail};
use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let ffi = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").canonicalize()?;
    let header = ffi.join("include/starling.h");
    let config = cbindgen::Config::from_file(ffi.join("cbindgen.toml"))
        .map_err(|e| anyhow::anyhow!("{e}"))
        .context("reading cbindgen.toml")?;
    // Only the C ABI module: the rest of the crate is Rust or UniFFI.
    let bindings = cbindgen::Builder::new()
        .with_config(config)
        .with_src(ffi.join("src/c_api.rs"))
        .generate()
        .context("generating the C header")?;
    let mut text = Vec::new();
    bindings.write(&mut text);
    match std::env::args().nth(1).as_deref() {
        Some("--check") => {
            let current = std::fs::read(&header).with_context(|| format!("reading {}", header.display()))?;
            if current != text {
                bail!("{} is out of date: run `starling-cbindgen` and commit it", header.display());
            }
            println!("{} is up to date", header.display());
        }
        out => {
            let out = out.map(PathBuf::from).unwrap_or(header);
            std::fs::write(&out, &text).with_context(|| format!("writing {}", out.display()))?;
            println!("wrote {}", out.display());
        }
    }
    Ok(())
}
