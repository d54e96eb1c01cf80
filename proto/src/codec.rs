//! Placeholder: replaced by the real codec in the same commit series.
/// Default maximum frame size.
pub const DEFAULT_MAX_FRAME_BYTES: u32 = 64 << 20;
/// Current protocol version.
pub const PROTOCOL_VERSION: u16 = 1;
/// Oldest protocol version still spoken.
pub const MIN_PROTOCOL_VERSION: u16 = 1;
