//! UniFFI's code generator, built at this workspace's UniFFI version:
//! `uniffi-bindgen generate --library target/release/libstarling_sdk_ffi.so --language kotlin --out-dir DIR`
//! (also `swift`, `python`). See `client-sdk/ffi/README.md`.

fn main() {
    uniffi::uniffi_bindgen_main()
}
