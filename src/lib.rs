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
//! - [`auth`]: authentication (`authorized_keys` files, password hashes, the auth webhook).
//! - [`webhook`]: the HTTP client of the auth and config webhooks.
//! - [`backend`]: container backends; [`backend::docker`] talks to the Docker engine.
//! - [`limits`]: every bound on what clients and containers can make us hold.
#![deny(unsafe_code)]

pub mod agent;
pub mod auth;
pub mod backend;
pub mod config;
pub mod forward;
pub mod front;
pub mod limits;
pub mod log;
// The only module allowed `unsafe` (each block carries a `// SAFETY:` line).
#[allow(unsafe_code)]
pub mod sandbox;
pub mod server;
pub mod shared;
pub mod ssh;
pub mod webhook;

#[doc(hidden)]
pub mod fuzzing;
