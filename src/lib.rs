//! ContainerSSH, rebuilt in Rust: an SSH server that gives every login its own throw-away
//! container.
//!
//! # Layout
//! - [`config`]: the ContainerSSH-compatible config file, strict parsing, validation.
//! - [`front`]: the front door: startup limits, per-source penalties, PROXY protocol.
//! - [`server`]: accept loop, per-connection lifecycle, drain on shutdown.
//! - [`shared`]: what every connection shares (settings, credentials, backend, budgets).
//! - [`ssh`]: russh configuration, the thin handler, one file per lifecycle (connection,
//!   session channel, forwarded channel), flow control and timeouts, host keys.
//! - [`auth`]: authentication (`authorized_keys` files, password hashes, certificates, the
//!   auth webhook).
//! - [`webhook`]: the auth and config webhooks' client (retries, redirects).
//! - [`http`]: HTTP client plumbing the webhooks, Docker and Kubernetes share (connections,
//!   TLS settings, capped reads, one error type).
//! - [`backend`]: the seam to container backends ([`backend::Backend`],
//!   [`backend::Container`], [`backend::Process`]), [`backend::docker`] and
//!   [`backend::kubernetes`] behind it, and (tests) an in-memory fake.
//! - [`forward`]: port, socket, X11 and agent forwarding through the in-container agent.
//! - [`agent`]: the in-container agent's side (its own binary) and its wire protocol.
//! - [`sandbox`]: privilege dropping and seccomp; the only room with `unsafe`.
//! - [`dirfd`]: the directories files are created in after the sandbox (audit, log file).
//! - [`metrics`]: what operators see: Prometheus metrics and the health endpoint.
//! - [`audit`]: audit recordings (asciicast files per session, ContainerSSH's binary format per
//!   connection; to files or S3) and their decoder.
//! - [`log`]: log setup and formats.
//! - [`utc`]: calendar dates from Unix time (syslog stamps, S3 signatures).
//! - [`limits`]: every bound on what clients and containers can make us hold.
//! - `testing` (feature `test-support`): the server in-process, for tests with the fake.
#![deny(unsafe_code)]
// House rules: no unwrap, expect, unchecked indexing or panic in the product (tests may,
// clippy.toml); a broken assumption becomes an error the caller handles.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

pub mod agent;
pub mod audit;
pub mod auth;
pub mod backend;
pub mod config;
pub mod dirfd;
pub mod forward;
pub mod front;
pub mod http;
pub mod limits;
pub mod log;
pub mod metrics;
// The only module allowed `unsafe` (each block carries a `// SAFETY:` line).
#[allow(unsafe_code)]
pub mod sandbox;
pub mod server;
pub mod shared;
pub mod ssh;
#[cfg(feature = "test-support")]
pub mod testing;
pub mod utc;
pub mod webhook;

#[doc(hidden)]
pub mod fuzzing;
