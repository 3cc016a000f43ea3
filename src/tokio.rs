//! Spawning tokio tasks in the current group (feature `tokio`).
