//! TLS termination per SNI (SPEC §5) and TLS to backends.

mod accept;
mod backend;
mod server;

pub use accept::{accept, Accepted, ConnTls, HandshakeFailure};
pub use backend::backend_client_config;
pub use server::{TlsBuildError, TlsServer};
