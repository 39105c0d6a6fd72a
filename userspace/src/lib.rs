//! portcullis: an identity-aware mTLS gateway.
//!
//! ```text
//! accept → ClientHello (SNI) → per-SNI ServerConfig → handshake (client cert on mTLS domains)
//!        → identity from the verified leaf → hyper (h1/h2) → route lookup → binding check
//!        → authorization with endpoint selection → proxy → one access-log record
//! ```
//!
//! Everything is testable through this library; `main.rs` only parses the command line.

pub mod accesslog;
pub mod admin;
pub mod authz;
pub mod config;
mod cork;
pub mod demo;
pub mod echo;
pub mod explain;
pub mod gateway;
pub mod identity;
pub mod liveness;
pub mod logfilter;
pub mod metrics;
pub mod names;
mod park;
pub mod pki;
mod prefix;
pub mod proxy;
pub mod proxy_protocol;
pub mod registry;
pub mod routing;
pub mod state;
pub mod tls;
pub mod xdp;
