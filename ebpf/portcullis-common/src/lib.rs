//! Types, names and limits shared by the XDP program and the daemon.
//!
//! Everything here crosses the kernel boundary or must agree on both sides, so it is `no_std`,
//! `#[repr(C)]` and free of allocation.
#![no_std]

/// Longest SNI host name either side handles (RFC 6066 allows 2^16-1; DNS names stop at 253).
pub const MAX_SNI_LEN: usize = 253;
