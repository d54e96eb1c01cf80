//! QUIC (placeholder).
