//! TLS termination per SNI (SPEC §5) and TLS to backends.

mod accept;
mod backend;
pub mod expiry;
mod kernel;
pub mod kstream;
pub mod nats;
mod server;
mod unbuffered;

pub use accept::{accept, Accepted, Alpn, ConnTls, HandshakeFailure};
pub use backend::backend_client_config;
pub use kernel::{gcm_aes_driver, probe as probe_kernel_tls, KernelTls};
pub use server::{
    admin_server_config, client_config, client_verifier, provider, TlsBuildError, TlsServer,
};
pub use unbuffered::{accept_kernel, connect_kernel, KernelPending};
