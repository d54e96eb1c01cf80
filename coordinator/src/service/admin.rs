//! Admin HTTP (placeholder).
