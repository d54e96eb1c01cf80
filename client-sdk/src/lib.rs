//! Starling client SDK. (Filled in by the SDK issue.)
