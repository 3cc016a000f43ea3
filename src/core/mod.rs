//! The concurrent core: hierarchical counters, per-CPU stocks and per-thread pockets.
//!
//! It knows nothing of `GlobalAlloc`, libc, threads' current groups or the two designs; it
//! takes CPU numbers and group ids as arguments. Its atomics come from `crate::sync`, so
//! `loom-tests/` compiles these very files against loom.

pub(crate) mod charge;
pub(crate) mod counter;
pub(crate) mod doorbell;
pub(crate) mod drain;
pub(crate) mod pocket;
pub(crate) mod stock;
