//! Docker Engine API client used by the Docker backend.
//!
//! Talks HTTP/1.1 to the engine over a unix socket, plain TCP or TLS
//! (`transport.rs`, `client.rs`), exposes the endpoints the backend needs
//! (`api.rs` for images and containers, `exec.rs` for exec instances) and
//! handles hijacked attach/exec streams (`stream.rs`) and their multiplexed
//! framing (`demux.rs`); `archive.rs` builds tar streams and uploads them
//! into containers. One connection is opened per request; hijacked
//! requests keep theirs for the life of the stream.

mod api;
mod archive;
mod client;
pub mod config;
mod demux;
mod exec;
pub mod session;
mod stream;
mod transport;

#[cfg(test)]
pub(crate) mod engine_tests;
#[cfg(test)]
mod fake_tests;

pub use api::{split_image_reference, ContainerInfo, WaitCondition};
pub use archive::{build_tar, ArchiveError, TarData, TarEntry};
pub use client::DockerClient;
pub use demux::{
    fuzz_demux, parse_frames, DemuxError, DemuxState, Demuxer, ReadSizer, Step, StreamKind,
};
pub use exec::{ExecInfo, ExecSpec};
pub use stream::{Hijacked, HijackedReader, HijackedWriter};

/// Oldest engine API we accept: Docker 19.03; older engines lack endpoints we rely on.
pub const MIN_API_VERSION: &str = "1.40";
/// Newest API version we speak; newer engines are addressed at this version.
pub const MAX_API_VERSION: &str = "1.47";
/// Cap on any buffered response body, so a broken or hostile engine cannot exhaust memory.
pub const MAX_RESPONSE_BYTES: usize = 4 * 1024 * 1024;
/// Cap on one line of the image pull progress stream (lines are small JSON objects).
pub const MAX_PROGRESS_LINE_BYTES: usize = 256 * 1024;
/// Largest payload chunk handed out by the demuxer; bigger frames are split, keeping memory bounded.
pub const MAX_FRAME_BYTES: usize = 64 * 1024;
/// Cap on an error message copied from a response, so logs stay readable.
pub const MAX_ERROR_MESSAGE_BYTES: usize = 4 * 1024;
/// Cap on a request body uploaded to the engine (tar archives for `put_archive`), which is
/// held in memory whole.
pub const MAX_UPLOAD_BYTES: usize = 64 * 1024 * 1024;

/// Where and how to reach the Docker engine (ContainerSSH `docker.connection`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DockerConnection {
    /// `unix:///var/run/docker.sock` or `tcp://host:port`.
    pub host: String,
    /// PEM text of the CA certificate that signed the engine's certificate.
    pub cacert: Option<String>,
    /// PEM text of the client certificate.
    pub cert: Option<String>,
    /// PEM text of the client private key.
    pub key: Option<String>,
}

/// Everything that can go wrong talking to the engine; variants name the failed step.
#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    /// The `host` setting is not a supported engine address.
    #[error("invalid Docker host {host:?}: {reason}")]
    InvalidHost { host: String, reason: &'static str },
    /// The CA certificate, client certificate or key could not be used.
    #[error("invalid Docker TLS configuration: {0}")]
    TlsConfig(#[source] crate::http::tls::TlsError),
    /// The exchange with the engine failed: no connection, TLS, HTTP, an oversized body.
    #[error("Docker request {op} failed: {source}")]
    Http {
        op: &'static str,
        #[source]
        source: crate::http::HttpError,
    },
    /// The engine answered with an unexpected status code.
    #[error("Docker request {op} failed with status {status}: {message}")]
    Status {
        op: &'static str,
        status: u16,
        message: String,
    },
    /// A request body exceeded [`MAX_UPLOAD_BYTES`]; nothing was sent.
    #[error("Docker request {op} body of {size} bytes exceeds {limit} bytes")]
    UploadTooLarge {
        op: &'static str,
        size: usize,
        limit: usize,
    },
    /// A line of the image pull's progress stream exceeded [`MAX_PROGRESS_LINE_BYTES`].
    #[error("Docker response to {op} exceeds {limit} bytes")]
    ResponseTooLarge { op: &'static str, limit: usize },
    /// Reading a streamed response body failed.
    #[error("reading the Docker response stream of {op} failed: {source}")]
    Stream {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The response body was not the JSON we expected.
    #[error("decoding Docker response to {op} failed: {source}")]
    Decode {
        op: &'static str,
        #[source]
        source: serde_json::Error,
    },
    /// The engine's API is older than [`MIN_API_VERSION`].
    #[error("Docker API version {server} is older than the minimum supported {minimum}")]
    ApiTooOld {
        server: String,
        minimum: &'static str,
    },
    /// The engine reported an API version we cannot parse.
    #[error("Docker reported an unparsable API version {version:?}")]
    BadApiVersion { version: String },
    /// The image is not present locally (container create answered 404).
    #[error("image {image} not found")]
    ImageNotFound { image: String },
    /// The image pull stream reported an error.
    #[error("pulling image {image} failed: {message}")]
    PullFailed { image: String, message: String },
    /// No container with that id or name exists.
    #[error("no such container: {id}")]
    NoSuchContainer { id: String },
    /// No exec instance with that id exists.
    #[error("no such exec instance: {id}")]
    NoSuchExec { id: String },
    /// The container is not running (or paused), so the operation is impossible.
    #[error("Docker request {op} failed: container {id} is not running: {message}")]
    NotRunning {
        op: &'static str,
        id: String,
        message: String,
    },
    /// The wait endpoint returned an error instead of an exit code.
    #[error("waiting for container {id} failed: {message}")]
    WaitFailed { id: String, message: String },
    /// The exec instance was still running when the deadline passed.
    #[error("exec {id} still running after its output ended")]
    ExecStillRunning { id: String },
    /// The engine did not answer within the HTTP timeout.
    #[error("Docker request {op} timed out")]
    Timeout { op: &'static str },
    /// The agent to inject could not be read again (or changed since the start).
    #[error("reading the agent to inject failed: {0}")]
    AgentFile(#[source] std::io::Error),
}

impl DockerError {
    /// The engine could not be reached at all (its socket or port answers nothing).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, DockerError::Http { source, .. } if source.is_unreachable())
    }
}
