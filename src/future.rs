//! Futures that run in a group.
