//! Replay (placeholder)
