//! Shared layers: being written.
