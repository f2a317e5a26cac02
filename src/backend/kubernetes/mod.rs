//! The Kubernetes backend (ContainerSSH's `kubernetes` backend): a hand-rolled client over
//! rustls and hyper, exec/attach over WebSocket (`v5.channel.k8s.io`, falling back to v4), and
//! pods per connection, per session or persistent. Wire facts: `shared/docs/kubernetes.md`.
//!
//! - [`wire`]: the channel frames, `Status` and watch-event decoding, pod state evaluation.
//! - [`kubeconfig`], [`connection`]: where the cluster is (config block, in-cluster service
//!   account, kubeconfig files) resolved into a [`ClusterConnection`].
//! - [`client`], [`ws`]: HTTPS requests, watches and the WebSocket upgrade.

use std::path::PathBuf;

pub mod backend;
pub mod client;
pub mod config;
pub mod connection;
pub mod exec;
pub mod kubeconfig;
pub mod pods;
pub mod session;
pub mod wire;
pub mod ws;

/// How to reach and authenticate to one cluster, whatever it was configured from.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ClusterConnection {
    /// `https://host:port` with an optional path prefix, no trailing slash.
    pub server: String,
    /// The TLS server name to verify instead of the URL's host (`tls-server-name`).
    pub server_name: Option<String>,
    /// PEM bundle of the CA(s) that sign the API server's certificate; `None`: the server's
    /// certificate cannot be verified and connecting fails (no system roots, no insecure mode).
    pub ca_pem: Option<Vec<u8>>,
    /// PEM client certificate (chain) and its private key, for mTLS.
    pub client_cert_pem: Option<Vec<u8>>,
    pub client_key_pem: Option<Vec<u8>>,
    /// Bearer token.
    pub token: Option<TokenSource>,
    /// HTTP basic authentication (ContainerSSH's `username`/`password`).
    pub basic: Option<(String, String)>,
    /// The namespace the source suggests (kubeconfig context, in-cluster namespace file).
    pub namespace: Option<String>,
}

impl std::fmt::Debug for ClusterConnection {
    // Keys, tokens and passwords never reach logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterConnection")
            .field("server", &self.server)
            .field("server_name", &self.server_name)
            .field("ca", &self.ca_pem.is_some())
            .field("client_cert", &self.client_cert_pem.is_some())
            .field("token", &self.token.as_ref().map(TokenSource::kind))
            .field("basic", &self.basic.is_some())
            .field("namespace", &self.namespace)
            .finish()
    }
}

/// Where the bearer token comes from.
#[derive(Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// A fixed token.
    Static(String),
    /// A file re-read periodically and after a 401 (service-account tokens rotate); the last
    /// good token is kept when a read fails.
    File(PathBuf),
}

impl TokenSource {
    fn kind(&self) -> &'static str {
        match self {
            TokenSource::Static(_) => "static",
            TokenSource::File(_) => "file",
        }
    }
}
