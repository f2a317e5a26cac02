//! The integration suite, one test binary (as rustls runs one): every room's tests as a module,
//! sharing one build of the harness in `tests/support/`. Three stay binaries of their own:
//! `tests/front_door.rs` and `tests/audit.rs` flood the server and measure it, so they run
//! alone (cargo runs test binaries one after another), and `tests/seccomp.rs` has a harness
//! of its own (a child process that installs the filter).

#[path = "../support/mod.rs"]
mod support;

mod agent;
mod agent_forward;
mod agent_sessions;
mod agent_volume;
mod audit_s3;
mod auth;
mod auth_flow;
mod certificates;
mod channels;
mod embedded_default;
mod files;
mod flow;
mod forward_bounds;
mod forwarding;
mod image;
mod kube_backend;
mod kube_pool;
mod kube_ssh;
mod kubefake;
mod lifecycle;
mod logging;
mod manifests;
mod metadata;
mod metrics;
mod persistent;
mod pool;
mod proxy_protocol;
mod recordings;
mod sandbox;
mod security;
mod session;
mod signals;
mod smoke;
mod timeouts;
mod webhook_auth;
mod webhook_config;
