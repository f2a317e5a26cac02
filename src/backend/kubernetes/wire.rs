//! Pure decoders and encoders for what the API server sends and expects, with no I/O
//! (`shared/docs/kubernetes.md` §1.2, §1.3, §2.1, §2.2).
//!
//! - The exec/attach channel protocol (`v5.channel.k8s.io`, falling back to
//!   `v4.channel.k8s.io`): one channel byte in front of every WebSocket message's payload.
//!   [`decode`] reads server messages, [`stdin`], [`resize`] and [`close_stdin`] build client
//!   messages, [`ErrorChannel`] collects the channel-3 `Status` and [`exit_from_status`] turns
//!   it into an exit code.
//! - `metav1.Status` ([`Status`]), and [`ApiError`] for REST calls answered with one.
//! - Watch streams: [`LineSplitter`] cuts the chunked body into lines, [`decode_event`] reads
//!   one event.
//! - A minimal typed [`Pod`] and [`evaluate`], which decides whether a pod is ready for exec or
//!   attach, still starting, or never going to be.
//!
//! Everything here is lenient about what it does not need (unknown fields are ignored, absent
//! or `null` fields take their defaults), bounded in memory, and never panics on input.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer};

/// The WebSocket subprotocols to offer, best first (`Sec-WebSocket-Protocol`).
pub const OFFER: &str = "v5.channel.k8s.io, v4.channel.k8s.io";

/// The most bytes of channel-3 data kept: a `Status` is a few hundred bytes; anything larger
/// is refused rather than buffered.
pub const MAX_STATUS_BYTES: usize = 64 * 1024;

/// The longest watch-event line accepted. Events carry one whole object; a pod is a few KiB,
/// one with very large annotations may reach a few hundred.
pub const MAX_WATCH_LINE_BYTES: usize = 4 * 1024 * 1024;

/// The most characters of a server-provided text kept in an [`ApiError`] built from a body
/// that is not a `Status`, and shown by its `Display`.
pub const MAX_ERROR_MESSAGE_CHARS: usize = 1024;

/// Channel numbers: the first byte of every WebSocket message.
pub mod channel {
    /// Client to server: standard input.
    pub const STDIN: u8 = 0;
    /// Server to client: standard output (and, with a tty, standard error).
    pub const STDOUT: u8 = 1;
    /// Server to client: standard error, never sent with a tty.
    pub const STDERR: u8 = 2;
    /// Server to client: the final `metav1.Status` (JSON in v4 and v5).
    pub const ERROR: u8 = 3;
    /// Client to server: a terminal size as JSON.
    pub const RESIZE: u8 = 4;
    /// Client to server, v5 only: `[CLOSE, channel]` half-closes that channel.
    pub const CLOSE: u8 = 255;
}

/// Malformed or oversized input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("empty WebSocket message: no channel byte")]
    EmptyMessage,
    #[error("message on channel {0}, which the server does not send on")]
    UnexpectedChannel(u8),
    #[error("the error channel carried more than {max} bytes", max = MAX_STATUS_BYTES)]
    StatusTooLarge,
    #[error("the error channel did not carry a valid Status: {0}")]
    BadStatus(String),
    #[error("watch event line longer than {max} bytes", max = MAX_WATCH_LINE_BYTES)]
    LineTooLong,
    #[error("invalid watch event: {0}")]
    BadEvent(String),
    #[error("unknown watch event type {0:?}")]
    UnknownEventType(String),
}

/// The channel protocol the server chose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// `v5.channel.k8s.io`: as v4, plus half-closing stdin.
    V5,
    /// `v4.channel.k8s.io`: JSON `Status` on channel 3, no way to signal stdin EOF.
    V4,
}

impl Protocol {
    /// Same as the module's [`OFFER`].
    pub const OFFER: &'static str = OFFER;

    /// The protocol named by the server's `Sec-WebSocket-Protocol` answer; anything but an
    /// exact match of one we offered is `None` (the upgrade must then be refused).
    pub fn from_header(value: &str) -> Option<Protocol> {
        match value {
            "v5.channel.k8s.io" => Some(Protocol::V5),
            "v4.channel.k8s.io" => Some(Protocol::V4),
            _ => None,
        }
    }

    /// The subprotocol's name.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::V5 => "v5.channel.k8s.io",
            Protocol::V4 => "v4.channel.k8s.io",
        }
    }

    /// Whether stdin EOF can be signalled without closing the whole connection.
    pub fn can_close_stdin(self) -> bool {
        self == Protocol::V5
    }
}

/// A stdin message carrying `data`.
pub fn stdin(data: &[u8]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(1 + data.len());
    msg.push(channel::STDIN);
    msg.extend_from_slice(data);
    msg
}

/// A resize message, as client-go writes it: `{"Width":W,"Height":H}` and a newline.
pub fn resize(cols: u16, rows: u16) -> Vec<u8> {
    let mut msg = vec![channel::RESIZE];
    msg.extend_from_slice(format!("{{\"Width\":{cols},\"Height\":{rows}}}\n").as_bytes());
    msg
}

/// The message half-closing stdin: `[0xFF, 0x00]` on v5; `None` on v4, which cannot.
pub fn close_stdin(protocol: Protocol) -> Option<Vec<u8>> {
    match protocol {
        Protocol::V5 => Some(vec![channel::CLOSE, channel::STDIN]),
        Protocol::V4 => None,
    }
}

/// One decoded server message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Incoming<'a> {
    /// Output for stdout (non-empty).
    Stdout(&'a [u8]),
    /// Output for stderr (non-empty).
    Stderr(&'a [u8]),
    /// A piece of the channel-3 `Status` (non-empty); feed it to an [`ErrorChannel`].
    Error(&'a [u8]),
    /// A message with no payload, such as the first `[0x01]` ("connected"): ignore it.
    Empty,
}

/// Decodes one binary WebSocket message from the server.
pub fn decode(msg: &[u8]) -> Result<Incoming<'_>, WireError> {
    let (&ch, payload) = msg.split_first().ok_or(WireError::EmptyMessage)?;
    match ch {
        channel::STDOUT | channel::STDERR | channel::ERROR if payload.is_empty() => {
            Ok(Incoming::Empty)
        }
        channel::STDOUT => Ok(Incoming::Stdout(payload)),
        channel::STDERR => Ok(Incoming::Stderr(payload)),
        channel::ERROR => Ok(Incoming::Error(payload)),
        other => Err(WireError::UnexpectedChannel(other)),
    }
}

/// Collects channel 3, which may arrive in several messages, up to [`MAX_STATUS_BYTES`].
#[derive(Debug, Clone, Default)]
pub struct ErrorChannel {
    buf: Vec<u8>,
    overflowed: bool,
}

impl ErrorChannel {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a piece. Past [`MAX_STATUS_BYTES`] in total the piece is dropped, this and every
    /// later call fail, and so does [`ErrorChannel::status`].
    pub fn push(&mut self, data: &[u8]) -> Result<(), WireError> {
        if self.overflowed || data.len() > MAX_STATUS_BYTES - self.buf.len() {
            self.overflowed = true;
            return Err(WireError::StatusTooLarge);
        }
        self.buf.extend_from_slice(data);
        Ok(())
    }

    /// Whether nothing has arrived on channel 3.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty() && !self.overflowed
    }

    /// The bytes collected so far.
    pub fn bytes(&self) -> &[u8] {
        &self.buf
    }

    /// The `Status` collected, once the stream has ended; `None` when channel 3 stayed empty
    /// (the connection ended without saying how the process did).
    pub fn status(&self) -> Result<Option<Status>, WireError> {
        if self.overflowed {
            return Err(WireError::StatusTooLarge);
        }
        if self.buf.iter().all(u8::is_ascii_whitespace) {
            return Ok(None);
        }
        Status::from_json(&self.buf)
            .map(Some)
            .map_err(|e| WireError::BadStatus(e.to_string()))
    }
}

/// `null` reads as the default, as Go writes nil slices and maps as `null`.
fn nullable<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// `metav1.Status`, the body of REST errors, channel 3 and watch `ERROR` events.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Status {
    /// `Success` or `Failure`.
    pub status: Option<String>,
    pub message: Option<String>,
    /// Machine-readable: `NotFound`, `AlreadyExists`, `Expired`, `NonZeroExitCode`, …
    pub reason: Option<String>,
    /// The HTTP status code it stands for (absent on channel 3's `NonZeroExitCode`).
    pub code: Option<i32>,
    pub details: Option<StatusDetails>,
}

/// `metav1.StatusDetails`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct StatusDetails {
    pub name: Option<String>,
    /// The resource, such as `pods`.
    pub kind: Option<String>,
    #[serde(deserialize_with = "nullable")]
    pub causes: Vec<StatusCause>,
    pub retry_after_seconds: Option<i32>,
}

/// `metav1.StatusCause`; its type is serialised as `reason`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct StatusCause {
    pub reason: Option<String>,
    pub message: Option<String>,
    pub field: Option<String>,
}

impl Status {
    /// Parses a `Status` (any JSON object; unknown fields are ignored).
    pub fn from_json(data: &[u8]) -> Result<Status, serde_json::Error> {
        // serde's derived structs also read arrays; a Status is an object.
        if data.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(serde::de::Error::custom("a Status must be a JSON object"));
        }
        serde_json::from_slice(data)
    }

    fn is_success(&self) -> bool {
        self.status.as_deref() == Some("Success")
    }
}

/// How an exec ended, per its channel-3 `Status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecOutcome {
    /// The process exited with this code (0..=255).
    Exited(u32),
    /// Not an exit: the exec itself failed (container not found, internal error, …).
    Failed { reason: String, message: String },
}

/// Reads the exit code from a channel-3 `Status`, as client-go does: `Success` is 0, a
/// `NonZeroExitCode` failure carries the code as the message of its `ExitCode` cause (a value
/// above 255 or not a number makes it a failure), any other `Failure` is an error.
pub fn exit_from_status(status: &Status) -> ExecOutcome {
    if status.is_success() {
        return ExecOutcome::Exited(0);
    }
    let reason = status.reason.as_deref().unwrap_or_default();
    if reason == "NonZeroExitCode" {
        let code = status
            .details
            .iter()
            .flat_map(|d| &d.causes)
            .find(|c| c.reason.as_deref() == Some("ExitCode"))
            .and_then(|c| c.message.as_deref())
            .and_then(|m| m.trim().parse::<u8>().ok());
        if let Some(code) = code {
            return ExecOutcome::Exited(u32::from(code));
        }
    }
    ExecOutcome::Failed {
        reason: match (reason, status.status.as_deref()) {
            ("", Some(s)) if !s.is_empty() => s.to_owned(),
            ("", _) => "Unknown".to_owned(),
            (r, _) => r.to_owned(),
        },
        message: status.message.clone().unwrap_or_default(),
    }
}

/// A REST call answered with an error: the HTTP status and the `Status` body (built from the
/// status code when the body is not one, such as a proxy's HTML page).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.display())]
pub struct ApiError {
    /// The HTTP status code of the response.
    pub http_status: u16,
    pub status: Status,
}

impl ApiError {
    /// Builds the error from a response's status code and body; never fails.
    pub fn new(http_status: u16, body: &[u8]) -> ApiError {
        let status = match Status::from_json(body) {
            Ok(status) => status,
            Err(_) => {
                let text = String::from_utf8_lossy(body);
                let text = text.trim();
                Status {
                    status: Some("Failure".to_owned()),
                    message: (!text.is_empty())
                        .then(|| text.chars().take(MAX_ERROR_MESSAGE_CHARS).collect()),
                    reason: reason_for_code(http_status).map(str::to_owned),
                    code: Some(i32::from(http_status)),
                    details: None,
                }
            }
        };
        ApiError::from_status(http_status, status)
    }

    /// Wraps a `Status` already parsed.
    pub fn from_status(http_status: u16, status: Status) -> ApiError {
        ApiError {
            http_status,
            status,
        }
    }

    /// The status code: the `Status`'s own `code` when it has a plausible one, else the
    /// HTTP status.
    pub fn code(&self) -> u16 {
        self.status
            .code
            .and_then(|c| u16::try_from(c).ok())
            .filter(|c| (100..=599).contains(c))
            .unwrap_or(self.http_status)
    }

    /// The `Status` reason, or one derived from the code; empty when neither says.
    pub fn reason(&self) -> &str {
        match self.status.reason.as_deref() {
            Some(r) if !r.is_empty() => r,
            _ => reason_for_code(self.code()).unwrap_or_default(),
        }
    }

    /// 404: the object (or namespace) does not exist.
    pub fn is_not_found(&self) -> bool {
        self.code() == 404 || self.reason() == "NotFound"
    }

    /// 409: `Conflict` (stale `resourceVersion`, failed precondition) or `AlreadyExists`.
    pub fn is_conflict(&self) -> bool {
        self.code() == 409 || matches!(self.reason(), "Conflict" | "AlreadyExists")
    }

    /// 409 `AlreadyExists` only.
    pub fn is_already_exists(&self) -> bool {
        self.reason() == "AlreadyExists"
    }

    /// 410 (`Expired`/`Gone`): a watch's `resourceVersion` is too old; list again.
    pub fn is_gone(&self) -> bool {
        self.code() == 410 || matches!(self.reason(), "Expired" | "Gone")
    }

    /// 401: the credentials were refused (a rotated token may need re-reading).
    pub fn is_unauthorized(&self) -> bool {
        self.code() == 401 || self.reason() == "Unauthorized"
    }

    /// 403: RBAC or admission refused the request.
    pub fn is_forbidden(&self) -> bool {
        self.code() == 403 || self.reason() == "Forbidden"
    }

    /// 429 and 5xx: worth retrying later.
    pub fn is_retryable(&self) -> bool {
        let code = self.code();
        code == 429 || (500..=599).contains(&code)
    }

    /// kubectl's wording, `pods "x" not found (NotFound)`; control characters from the
    /// server are replaced and the text is cut at [`MAX_ERROR_MESSAGE_CHARS`].
    fn display(&self) -> String {
        let message = self.status.message.as_deref().unwrap_or_default();
        let mut out: String = message
            .chars()
            .take(MAX_ERROR_MESSAGE_CHARS)
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        if out.trim().is_empty() {
            out = format!("the server responded with HTTP {}", self.code());
        }
        match self.reason() {
            "" => format!("{out} (HTTP {})", self.code()),
            reason => {
                let reason: String = reason
                    .chars()
                    .take(64)
                    .map(|c| if c.is_control() { ' ' } else { c })
                    .collect();
                format!("{out} ({reason})")
            }
        }
    }
}

/// apimachinery's reason for a bare status code.
fn reason_for_code(code: u16) -> Option<&'static str> {
    Some(match code {
        400 => "BadRequest",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        405 => "MethodNotAllowed",
        406 => "NotAcceptable",
        409 => "Conflict",
        410 => "Expired",
        413 => "RequestEntityTooLarge",
        415 => "UnsupportedMediaType",
        422 => "Invalid",
        429 => "TooManyRequests",
        500 => "InternalError",
        503 => "ServiceUnavailable",
        504 => "Timeout",
        _ => return None,
    })
}

/// Cuts a watch response body, fed in arbitrary chunks, into lines (`\n`, with an optional
/// `\r`). Blank lines are skipped. Keeps at most [`MAX_WATCH_LINE_BYTES`] of an unfinished
/// line; a longer line is an error, after which the splitter only returns that error (the
/// watch must be restarted).
#[derive(Debug, Clone, Default)]
pub struct LineSplitter {
    partial: Vec<u8>,
    failed: bool,
}

impl LineSplitter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds a chunk and returns the lines it completes, without their line ends.
    pub fn push(&mut self, chunk: &[u8]) -> Result<Vec<Vec<u8>>, WireError> {
        if self.failed {
            return Err(WireError::LineTooLong);
        }
        let mut lines = Vec::new();
        // Every piece but the last ends at a `\n`; the last is the start of a line to come.
        let mut pieces = chunk.split(|&b| b == b'\n');
        let rest = pieces.next_back().unwrap_or_default();
        for piece in pieces {
            if self.partial.len() + piece.len() > MAX_WATCH_LINE_BYTES {
                return Err(self.fail());
            }
            let mut line = std::mem::take(&mut self.partial);
            line.extend_from_slice(piece);
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            if !line.iter().all(u8::is_ascii_whitespace) {
                lines.push(line);
            }
        }
        if self.partial.len() + rest.len() > MAX_WATCH_LINE_BYTES {
            return Err(self.fail());
        }
        self.partial.extend_from_slice(rest);
        Ok(lines)
    }

    /// At the end of the body: the last line if it had no line end (blank: `None`).
    pub fn finish(self) -> Result<Option<Vec<u8>>, WireError> {
        if self.failed {
            return Err(WireError::LineTooLong);
        }
        let mut line = self.partial;
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        Ok((!line.iter().all(u8::is_ascii_whitespace)).then_some(line))
    }

    /// Bytes of an unfinished line held.
    pub fn buffered(&self) -> usize {
        self.partial.len()
    }

    fn fail(&mut self) -> WireError {
        self.failed = true;
        self.partial = Vec::new();
        WireError::LineTooLong
    }
}

/// One watch event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    Added(Box<Pod>),
    Modified(Box<Pod>),
    Deleted(Box<Pod>),
    /// Nothing changed; resume a later watch from this version.
    Bookmark {
        resource_version: String,
    },
    /// The watch failed; code 410 (`Expired`) means list again and re-watch.
    Error(Status),
}

#[derive(Deserialize)]
struct RawEvent {
    #[serde(rename = "type")]
    kind: String,
    object: serde_json::Value,
}

/// Decodes one watch line, `{"type":"MODIFIED","object":{…}}`.
pub fn decode_event(line: &[u8]) -> Result<WatchEvent, WireError> {
    let raw: RawEvent =
        serde_json::from_slice(line).map_err(|e| WireError::BadEvent(e.to_string()))?;
    if !raw.object.is_object() {
        return Err(WireError::BadEvent(
            "the object is not a JSON object".to_owned(),
        ));
    }
    let pod = |object| {
        serde_json::from_value::<Pod>(object)
            .map(Box::new)
            .map_err(|e| WireError::BadEvent(e.to_string()))
    };
    Ok(match raw.kind.as_str() {
        "ADDED" => WatchEvent::Added(pod(raw.object)?),
        "MODIFIED" => WatchEvent::Modified(pod(raw.object)?),
        "DELETED" => WatchEvent::Deleted(pod(raw.object)?),
        "BOOKMARK" => {
            let resource_version = pod(raw.object)?
                .metadata
                .resource_version
                .filter(|v| !v.is_empty())
                .ok_or_else(|| {
                    WireError::BadEvent("BOOKMARK without metadata.resourceVersion".to_owned())
                })?;
            WatchEvent::Bookmark { resource_version }
        }
        "ERROR" => WatchEvent::Error(
            serde_json::from_value(raw.object).map_err(|e| WireError::BadEvent(e.to_string()))?,
        ),
        other => {
            return Err(WireError::UnknownEventType(
                other.chars().take(64).collect(),
            ))
        }
    })
}

/// The parts of a `v1.Pod` the backend reads.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct Pod {
    #[serde(deserialize_with = "nullable")]
    pub metadata: ObjectMeta,
    #[serde(deserialize_with = "nullable")]
    pub spec: PodSpec,
    #[serde(deserialize_with = "nullable")]
    pub status: PodStatus,
}

/// `metadata`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct ObjectMeta {
    pub name: Option<String>,
    pub namespace: Option<String>,
    pub uid: Option<String>,
    pub resource_version: Option<String>,
    #[serde(deserialize_with = "nullable")]
    pub labels: BTreeMap<String, String>,
    #[serde(deserialize_with = "nullable")]
    pub annotations: BTreeMap<String, String>,
    /// Set once the pod is being deleted ("Terminating").
    pub deletion_timestamp: Option<String>,
}

/// `spec`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct PodSpec {
    #[serde(deserialize_with = "nullable")]
    pub containers: Vec<Container>,
    #[serde(deserialize_with = "nullable")]
    pub init_containers: Vec<Container>,
}

/// `spec.containers[i]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct Container {
    pub name: String,
}

/// `status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct PodStatus {
    /// `Pending`, `Running`, `Succeeded`, `Failed` or `Unknown`.
    pub phase: Option<String>,
    /// Why the pod is in this phase (for example `Evicted`).
    pub reason: Option<String>,
    pub message: Option<String>,
    #[serde(deserialize_with = "nullable")]
    pub conditions: Vec<PodCondition>,
    #[serde(deserialize_with = "nullable")]
    pub container_statuses: Vec<ContainerStatus>,
    #[serde(deserialize_with = "nullable")]
    pub init_container_statuses: Vec<ContainerStatus>,
}

/// `status.conditions[i]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct PodCondition {
    /// `PodScheduled`, `Initialized`, `ContainersReady`, `Ready`, …
    #[serde(rename = "type")]
    pub kind: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    pub reason: Option<String>,
    pub message: Option<String>,
}

/// `status.containerStatuses[i]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct ContainerStatus {
    pub name: String,
    pub ready: bool,
    /// Absent before Kubernetes 1.16.
    pub started: Option<bool>,
    #[serde(deserialize_with = "nullable")]
    pub state: ContainerState,
}

/// `state`: at most one of the three is set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct ContainerState {
    pub waiting: Option<StateWaiting>,
    pub running: Option<StateRunning>,
    pub terminated: Option<StateTerminated>,
}

/// `state.waiting`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct StateWaiting {
    pub reason: Option<String>,
    pub message: Option<String>,
}

/// `state.running`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct StateRunning {
    pub started_at: Option<String>,
}

/// `state.terminated`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct StateTerminated {
    pub exit_code: i32,
    pub reason: Option<String>,
    pub message: Option<String>,
    pub signal: Option<i32>,
}

/// Waiting reasons after which the container will not start on its own (pull errors may be
/// transient: the caller may allow a grace period before acting on them).
pub const FATAL_WAITING_REASONS: [&str; 8] = [
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "ErrImageNeverPull",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
    "CrashLoopBackOff",
];

/// Where a pod stands for exec/attach into one of its containers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodState {
    /// Still starting: wait for the next event.
    Pending,
    /// Running, `Ready=True`, and the container running and started.
    Ready,
    /// Will not become ready (or, for `Unschedulable` and pull errors, may not: the caller
    /// decides about a grace period). Delete the pod.
    Failed { reason: String, message: String },
    /// The pod finished (`Succeeded`/`Failed`) and the container exited with this code.
    Terminated { exit_code: i32 },
}

impl Pod {
    fn container_status(&self, container: &str) -> Option<&ContainerStatus> {
        self.status
            .container_statuses
            .iter()
            .find(|c| c.name == container)
    }

    fn condition(&self, kind: &str) -> Option<&PodCondition> {
        self.status.conditions.iter().find(|c| c.kind == kind)
    }
}

/// Decides where `pod` stands for its container `container` (`shared/docs/kubernetes.md`
/// §1.2), in this order:
/// 1. phase `Failed`/`Succeeded`: [`PodState::Terminated`] with the container's exit code, or
///    [`PodState::Failed`] when it has none;
/// 2. `deletionTimestamp` set: failed (`Terminating`);
/// 3. a container (the named one first, then the others, which would keep the pod from being
///    ready) waiting for one of the [`FATAL_WAITING_REASONS`]: failed with that reason;
/// 4. `PodScheduled=False` with reason `Unschedulable`: failed with the scheduler's message;
/// 5. phase `Running`, condition `Ready=True`, and the container running and started
///    (`started` absent: its `ready`): [`PodState::Ready`];
/// 6. otherwise [`PodState::Pending`].
pub fn evaluate(pod: &Pod, container: &str) -> PodState {
    let status = &pod.status;
    let phase = status.phase.as_deref().unwrap_or_default();
    let own = pod.container_status(container);
    if matches!(phase, "Failed" | "Succeeded") {
        if let Some(exit_code) = terminated_exit_code(pod, container) {
            return PodState::Terminated { exit_code };
        }
        if let Some(failed) = failed_init(pod) {
            return failed;
        }
        return PodState::Failed {
            reason: status
                .reason
                .clone()
                .filter(|r| !r.is_empty())
                .unwrap_or_else(|| format!("Pod{phase}")),
            message: status.message.clone().unwrap_or_else(|| {
                format!("the pod's phase is {phase} and container {container:?} did not run")
            }),
        };
    }
    if pod.metadata.deletion_timestamp.is_some() {
        return PodState::Failed {
            reason: "Terminating".to_owned(),
            message: "the pod is being deleted".to_owned(),
        };
    }
    if let Some(failed) = failed_init(pod) {
        return failed;
    }
    let others = status
        .container_statuses
        .iter()
        .filter(|c| c.name != container);
    for cs in own.into_iter().chain(others) {
        if let Some(waiting) = &cs.state.waiting {
            let reason = waiting.reason.as_deref().unwrap_or_default();
            if FATAL_WAITING_REASONS.contains(&reason) {
                return PodState::Failed {
                    reason: reason.to_owned(),
                    message: waiting
                        .message
                        .clone()
                        .unwrap_or_else(|| format!("container {:?} is waiting: {reason}", cs.name)),
                };
            }
        }
    }
    if let Some(scheduled) = pod.condition("PodScheduled") {
        if scheduled.status == "False" && scheduled.reason.as_deref() == Some("Unschedulable") {
            return PodState::Failed {
                reason: "Unschedulable".to_owned(),
                message: scheduled
                    .message
                    .clone()
                    .unwrap_or_else(|| "the pod cannot be scheduled".to_owned()),
            };
        }
    }
    let ready = pod.condition("Ready").is_some_and(|c| c.status == "True");
    let running = own.is_some_and(|c| c.state.running.is_some() && c.started.unwrap_or(c.ready));
    if phase == "Running" && ready && running {
        PodState::Ready
    } else {
        PodState::Pending
    }
}

/// An init container that will not complete: waiting for a fatal reason (its image cannot be
/// pulled, it crash-loops) or terminated with a non-zero exit code. The pod's containers wait
/// in `PodInitializing` meanwhile, which alone would look like progress.
fn failed_init(pod: &Pod) -> Option<PodState> {
    for cs in &pod.status.init_container_statuses {
        if let Some(waiting) = &cs.state.waiting {
            let reason = waiting.reason.as_deref().unwrap_or_default();
            if FATAL_WAITING_REASONS.contains(&reason) {
                return Some(PodState::Failed {
                    reason: reason.to_owned(),
                    message: format!(
                        "init container {:?}: {}",
                        cs.name,
                        waiting.message.as_deref().unwrap_or(reason)
                    ),
                });
            }
        }
        if let Some(t) = cs.state.terminated.as_ref().filter(|t| t.exit_code != 0) {
            return Some(PodState::Failed {
                reason: "InitContainerFailed".to_owned(),
                message: format!(
                    "init container {:?} exited with code {}",
                    cs.name, t.exit_code
                ),
            });
        }
    }
    None
}

/// The exit code of `container` if it has terminated (attach's exit code, §1.3).
pub fn terminated_exit_code(pod: &Pod, container: &str) -> Option<i32> {
    pod.container_status(container)?
        .state
        .terminated
        .as_ref()
        .map(|t| t.exit_code)
}

#[cfg(test)]
mod tests {
    use super::*;

    // ---- channel protocol ----

    #[test]
    fn protocol_negotiation() {
        assert_eq!(OFFER, "v5.channel.k8s.io, v4.channel.k8s.io");
        assert_eq!(Protocol::OFFER, OFFER);
        assert_eq!(
            Protocol::from_header("v5.channel.k8s.io"),
            Some(Protocol::V5)
        );
        assert_eq!(
            Protocol::from_header("v4.channel.k8s.io"),
            Some(Protocol::V4)
        );
        for bad in [
            "",
            "channel.k8s.io",
            "base64.channel.k8s.io",
            "v4.base64.channel.k8s.io",
            "V5.channel.k8s.io",
            " v5.channel.k8s.io",
            "v5.channel.k8s.io, v4.channel.k8s.io",
        ] {
            assert_eq!(Protocol::from_header(bad), None, "{bad:?}");
        }
        for p in [Protocol::V5, Protocol::V4] {
            assert_eq!(Protocol::from_header(p.name()), Some(p));
        }
        assert!(Protocol::V5.can_close_stdin());
        assert!(!Protocol::V4.can_close_stdin());
    }

    #[test]
    fn encodes_the_recorded_client_frames() {
        // §2.2: kubectl exec -it, resized 100x30 then 132x43.
        assert_eq!(resize(100, 30), b"\x04{\"Width\":100,\"Height\":30}\n");
        assert_eq!(resize(100, 30).len() - 1, 26);
        assert_eq!(resize(132, 43), b"\x04{\"Width\":132,\"Height\":43}\n");
        assert_eq!(resize(u16::MAX, 0), b"\x04{\"Width\":65535,\"Height\":0}\n");
        assert_eq!(stdin(b"stty size\r"), b"\x00stty size\r");
        assert_eq!(stdin(b"exit 5\r"), b"\x00exit 5\r");
        assert_eq!(stdin(b""), b"\x00");
        assert_eq!(close_stdin(Protocol::V5), Some(vec![0xFF, 0x00]));
        assert_eq!(close_stdin(Protocol::V4), None);
    }

    /// §2.2's channel-3 frame for `exit 5`, in the Python fake's spacing.
    const EXIT_5: &str = r#"{"metadata": {}, "status": "Failure", "message": "command terminated with non-zero exit code: error executing command [sh], exit code 5", "reason": "NonZeroExitCode", "details": {"causes": [{"reason": "ExitCode", "message": "5"}]}}"#;

    #[test]
    fn decodes_the_recorded_server_frames() {
        assert_eq!(decode(&[1]), Ok(Incoming::Empty));
        assert_eq!(decode(&[2]), Ok(Incoming::Empty));
        assert_eq!(decode(&[3]), Ok(Incoming::Empty));
        assert_eq!(
            decode(b"\x0130 100\r\n/ # \x1b[6n"),
            Ok(Incoming::Stdout(b"30 100\r\n/ # \x1b[6n"))
        );
        assert_eq!(decode(b"\x02oops"), Ok(Incoming::Stderr(b"oops")));
        let mut msg = vec![3];
        msg.extend_from_slice(EXIT_5.as_bytes());
        let Ok(Incoming::Error(payload)) = decode(&msg) else {
            panic!("channel 3 expected");
        };
        let mut ch = ErrorChannel::new();
        ch.push(payload).unwrap();
        let status = ch.status().unwrap().unwrap();
        assert_eq!(exit_from_status(&status), ExecOutcome::Exited(5));
    }

    #[test]
    fn refuses_bad_server_frames() {
        assert_eq!(decode(&[]), Err(WireError::EmptyMessage));
        for ch in [0u8, 4, 5, 254, 255] {
            assert_eq!(decode(&[ch, 1]), Err(WireError::UnexpectedChannel(ch)));
            assert_eq!(decode(&[ch]), Err(WireError::UnexpectedChannel(ch)));
        }
    }

    #[test]
    fn error_channel_accumulates_pieces() {
        let mut ch = ErrorChannel::new();
        assert!(ch.is_empty());
        assert_eq!(ch.status(), Ok(None));
        let (a, b) = EXIT_5.as_bytes().split_at(40);
        ch.push(a).unwrap();
        assert!(matches!(ch.status(), Err(WireError::BadStatus(_))));
        ch.push(b).unwrap();
        assert_eq!(ch.bytes(), EXIT_5.as_bytes());
        assert_eq!(
            exit_from_status(&ch.status().unwrap().unwrap()),
            ExecOutcome::Exited(5)
        );
    }

    #[test]
    fn error_channel_is_capped() {
        let mut ch = ErrorChannel::new();
        ch.push(&vec![b' '; MAX_STATUS_BYTES]).unwrap();
        assert_eq!(ch.push(b"x"), Err(WireError::StatusTooLarge));
        assert_eq!(ch.bytes().len(), MAX_STATUS_BYTES);
        assert_eq!(ch.push(b""), Err(WireError::StatusTooLarge));
        assert_eq!(ch.status(), Err(WireError::StatusTooLarge));
        assert!(!ch.is_empty());

        let mut ch = ErrorChannel::new();
        assert_eq!(
            ch.push(&vec![b' '; MAX_STATUS_BYTES + 1]),
            Err(WireError::StatusTooLarge)
        );
        assert!(ch.bytes().is_empty());
    }

    // ---- Status ----

    fn status(json: &str) -> Status {
        Status::from_json(json.as_bytes()).unwrap()
    }

    #[test]
    fn exit_codes_from_the_documented_statuses() {
        assert_eq!(
            exit_from_status(&status(r#"{"metadata":{},"status":"Success"}"#)),
            ExecOutcome::Exited(0)
        );
        assert_eq!(
            exit_from_status(&status(
                r#"{"metadata":{},"status":"Failure","message":"command terminated with non-zero exit code: …",
                   "reason":"NonZeroExitCode","details":{"causes":[{"reason":"ExitCode","message":"3"}]}}"#
            )),
            ExecOutcome::Exited(3)
        );
        assert_eq!(
            exit_from_status(&status(
                r#"{"metadata":{},"status":"Failure","message":"Internal error occurred: …","reason":"InternalError","details":{},"code":500}"#
            )),
            ExecOutcome::Failed {
                reason: "InternalError".into(),
                message: "Internal error occurred: …".into()
            }
        );
    }

    #[test]
    fn odd_exit_statuses_are_failures() {
        let nonzero = |code: &str| {
            format!(
                r#"{{"status":"Failure","message":"m","reason":"NonZeroExitCode","details":{{"causes":[{{"reason":"ExitCode","message":{code}}}]}}}}"#
            )
        };
        assert_eq!(
            exit_from_status(&status(&nonzero(r#""255""#))),
            ExecOutcome::Exited(255)
        );
        assert_eq!(
            exit_from_status(&status(&nonzero(r#"" 7 ""#))),
            ExecOutcome::Exited(7)
        );
        for bad in [r#""256""#, r#""-1""#, r#""x""#, r#""""#, "null"] {
            assert_eq!(
                exit_from_status(&status(&nonzero(bad))),
                ExecOutcome::Failed {
                    reason: "NonZeroExitCode".into(),
                    message: "m".into()
                },
                "{bad}"
            );
        }
        // A cause of another type, or none.
        assert!(matches!(
            exit_from_status(&status(
                r#"{"status":"Failure","reason":"NonZeroExitCode","details":{"causes":[{"reason":"Other","message":"3"}]}}"#
            )),
            ExecOutcome::Failed { .. }
        ));
        assert_eq!(
            exit_from_status(&status("{}")),
            ExecOutcome::Failed {
                reason: "Unknown".into(),
                message: String::new()
            }
        );
        assert_eq!(
            exit_from_status(&status(
                r#"{"status":"Failure","causes":null,"details":null}"#
            )),
            ExecOutcome::Failed {
                reason: "Failure".into(),
                message: String::new()
            }
        );
        assert!(matches!(
            exit_from_status(&status(r#"{"details":{"causes":null}}"#)),
            ExecOutcome::Failed { .. }
        ));
    }

    #[test]
    fn status_is_lenient_but_typed() {
        let s = status(
            r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"pods \"x\" not found","reason":"NotFound","details":{"name":"x","kind":"pods","extra":[1]},"code":404,"new":true}"#,
        );
        assert_eq!(s.code, Some(404));
        let d = s.details.unwrap();
        assert_eq!(d.name.as_deref(), Some("x"));
        assert_eq!(d.kind.as_deref(), Some("pods"));
        assert!(Status::from_json(b"[]").is_err());
        assert!(Status::from_json(b"{\"code\":\"404\"}").is_err());
        assert!(Status::from_json(b"").is_err());
    }

    // ---- ApiError ----

    #[test]
    fn api_error_from_a_status_body() {
        let e = ApiError::new(
            404,
            br#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"pods \"x\" not found","reason":"NotFound","details":{"name":"x","kind":"pods"},"code":404}"#,
        );
        assert!(e.is_not_found());
        assert!(!e.is_conflict() && !e.is_gone() && !e.is_unauthorized() && !e.is_retryable());
        assert_eq!(e.to_string(), r#"pods "x" not found (NotFound)"#);

        let e = ApiError::new(
            409,
            br#"{"status":"Failure","message":"pods \"x\" already exists","reason":"AlreadyExists","code":409}"#,
        );
        assert!(e.is_conflict() && e.is_already_exists() && !e.is_not_found());
        assert_eq!(e.to_string(), r#"pods "x" already exists (AlreadyExists)"#);

        let e = ApiError::new(
            410,
            br#"{"status":"Failure","message":"too old resource version: 1 (5)","reason":"Expired","code":410}"#,
        );
        assert!(e.is_gone());
        let e = ApiError::new(
            401,
            br#"{"status":"Failure","message":"Unauthorized","reason":"Unauthorized","code":401}"#,
        );
        assert!(e.is_unauthorized());
        assert_eq!(e.to_string(), "Unauthorized (Unauthorized)");
        let e = ApiError::new(
            403,
            br#"{"status":"Failure","message":"forbidden","reason":"Forbidden","code":403}"#,
        );
        assert!(e.is_forbidden() && !e.is_retryable());
        assert!(ApiError::new(429, b"{}").is_retryable());
        assert!(ApiError::new(503, b"{}").is_retryable());
    }

    #[test]
    fn api_error_from_other_bodies() {
        let e = ApiError::new(404, b"404 page not found\n");
        assert!(e.is_not_found());
        assert_eq!(e.to_string(), "404 page not found (NotFound)");
        let e = ApiError::new(502, b"");
        assert_eq!(
            e.to_string(),
            "the server responded with HTTP 502 (HTTP 502)"
        );
        assert_eq!(e.code(), 502);
        let e = ApiError::new(418, b"<html>\x1b[31mteapot\r\n</html>");
        assert_eq!(e.to_string(), "<html> [31mteapot  </html> (HTTP 418)");
        let e = ApiError::new(500, &vec![b'a'; 10 * MAX_ERROR_MESSAGE_CHARS]);
        assert!(e.to_string().len() < MAX_ERROR_MESSAGE_CHARS + 32);
        // A Status whose own code is implausible: the HTTP status counts.
        let e = ApiError::new(410, br#"{"code":99999}"#);
        assert!(e.is_gone());
        assert_eq!(
            e.to_string(),
            "the server responded with HTTP 410 (Expired)"
        );
        // The Status's code wins over the HTTP status when it is plausible.
        let e = ApiError::new(500, br#"{"code":404,"message":"gone"}"#);
        assert!(e.is_not_found());
    }

    // ---- watch ----

    #[test]
    fn splits_lines_across_chunks() {
        let mut s = LineSplitter::new();
        assert_eq!(s.push(b"{\"a\"").unwrap(), Vec::<Vec<u8>>::new());
        assert_eq!(s.buffered(), 4);
        assert_eq!(
            s.push(b":1}\n{\"b\":2}\r\n\n  \n{\"c\"").unwrap(),
            vec![b"{\"a\":1}".to_vec(), b"{\"b\":2}".to_vec()]
        );
        assert_eq!(s.push(b":3}").unwrap(), Vec::<Vec<u8>>::new());
        assert_eq!(s.finish(), Ok(Some(b"{\"c\":3}".to_vec())));
        let mut s = LineSplitter::new();
        s.push(b"x\n \r").unwrap();
        assert_eq!(s.finish(), Ok(None));
    }

    #[test]
    fn refuses_oversized_lines() {
        // Exactly the limit is fine, in one chunk or many.
        let mut s = LineSplitter::new();
        let line = vec![b'x'; MAX_WATCH_LINE_BYTES];
        for piece in line.chunks(1 << 20) {
            assert!(s.push(piece).unwrap().is_empty());
        }
        assert_eq!(s.push(b"\n").unwrap(), vec![line.clone()]);
        assert_eq!(s.buffered(), 0);
        // One byte more, unterminated: refused without buffering it.
        let mut s = LineSplitter::new();
        s.push(&line).unwrap();
        assert_eq!(s.push(b"y"), Err(WireError::LineTooLong));
        assert_eq!(s.buffered(), 0);
        assert_eq!(s.push(b"\n{}\n"), Err(WireError::LineTooLong));
        assert_eq!(s.finish(), Err(WireError::LineTooLong));
        // A long terminated line inside one chunk.
        let mut s = LineSplitter::new();
        let mut chunk = b"{}\n".to_vec();
        chunk.extend(vec![b'x'; MAX_WATCH_LINE_BYTES + 1]);
        chunk.push(b'\n');
        assert_eq!(s.push(&chunk), Err(WireError::LineTooLong));
    }

    #[test]
    fn decodes_watch_events() {
        let line = br#"{"type":"MODIFIED","object":{"kind":"Pod","apiVersion":"v1","metadata":{"name":"x1","namespace":"default","uid":"u1","resourceVersion":"1002","labels":{"containerssh_username":"alice"},"annotations":null},"spec":{"containers":[{"name":"x1","image":"busybox"}]},"status":{"phase":"Running","conditions":[{"type":"Ready","status":"True"}],"containerStatuses":[{"name":"x1","ready":true,"started":true,"state":{"running":{"startedAt":"2025-01-01T00:00:00Z"}}}]}}}"#;
        let WatchEvent::Modified(pod) = decode_event(line).unwrap() else {
            panic!("MODIFIED expected");
        };
        assert_eq!(pod.metadata.name.as_deref(), Some("x1"));
        assert_eq!(pod.metadata.uid.as_deref(), Some("u1"));
        assert_eq!(pod.metadata.resource_version.as_deref(), Some("1002"));
        assert_eq!(pod.metadata.labels["containerssh_username"], "alice");
        assert!(pod.metadata.annotations.is_empty());
        assert_eq!(pod.spec.containers[0].name, "x1");
        assert_eq!(evaluate(&pod, "x1"), PodState::Ready);

        assert!(matches!(
            decode_event(br#"{"type":"ADDED","object":{}}"#),
            Ok(WatchEvent::Added(_))
        ));
        assert!(matches!(
            decode_event(br#"{"type":"DELETED","object":{"metadata":{"name":"x1"}}}"#),
            Ok(WatchEvent::Deleted(_))
        ));
        assert_eq!(
            decode_event(
                br#"{"type":"BOOKMARK","object":{"kind":"Pod","apiVersion":"v1","metadata":{"resourceVersion":"12746"}}}"#
            ),
            Ok(WatchEvent::Bookmark {
                resource_version: "12746".into()
            })
        );
        let WatchEvent::Error(s) = decode_event(
            br#"{"type":"ERROR","object":{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"too old resource version: 1 (1001)","reason":"Expired","code":410}}"#,
        )
        .unwrap() else {
            panic!("ERROR expected");
        };
        assert!(ApiError::from_status(200, s).is_gone());
    }

    #[test]
    fn refuses_bad_watch_events() {
        for bad in [
            &b""[..],
            b"{",
            b"[]",
            b"{\"type\":\"ADDED\"}",
            b"{\"object\":{}}",
            b"{\"type\":\"ADDED\",\"object\":[]}",
            b"{\"type\":\"BOOKMARK\",\"object\":{}}",
            b"{\"type\":\"BOOKMARK\",\"object\":{\"metadata\":{\"resourceVersion\":\"\"}}}",
            b"{\"type\":\"ERROR\",\"object\":{\"code\":\"x\"}}",
            b"{\"type\":\"ADDED\",\"object\":{\"status\":{\"containerStatuses\":[{\"state\":{\"terminated\":{\"exitCode\":1e99}}}]}}}",
        ] {
            assert!(
                matches!(decode_event(bad), Err(WireError::BadEvent(_))),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(
            decode_event(b"{\"type\":\"SYNC\",\"object\":{}}"),
            Err(WireError::UnknownEventType("SYNC".into()))
        );
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        let line = format!("{{\"type\":\"ADDED\",\"object\":{deep}}}");
        assert!(decode_event(line.as_bytes()).is_err());
    }

    // ---- pod state ----

    fn pod(json: &str) -> Pod {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn the_documented_failing_pod_fails() {
        // §1.2, as the fake (and a real kubelet) reports a bad image.
        let p = pod(
            r#"{"metadata":{"name":"d3"},"status":{"phase":"Pending","containerStatuses":[{"name":"d3","ready":false,"started":false,"restartCount":0,
                "image":"nonexistent/image:1","imageID":"",
                "state":{"waiting":{"reason":"ImagePullBackOff","message":"Back-off pulling image \"nonexistent/image:1\""}}}]}}"#,
        );
        assert_eq!(
            evaluate(&p, "d3"),
            PodState::Failed {
                reason: "ImagePullBackOff".into(),
                message: "Back-off pulling image \"nonexistent/image:1\"".into()
            }
        );
        assert_eq!(terminated_exit_code(&p, "d3"), None);
    }

    #[test]
    fn every_fatal_waiting_reason_fails() {
        for reason in FATAL_WAITING_REASONS {
            let p = pod(&format!(
                r#"{{"status":{{"phase":"Pending","containerStatuses":[{{"name":"c","state":{{"waiting":{{"reason":"{reason}"}}}}}}]}}}}"#
            ));
            let PodState::Failed { reason: r, message } = evaluate(&p, "c") else {
                panic!("{reason}");
            };
            assert_eq!(r, reason);
            assert!(message.contains(reason), "{message}");
        }
        // Not fatal: still starting.
        for reason in ["ContainerCreating", "PodInitializing", ""] {
            let p = pod(&format!(
                r#"{{"status":{{"phase":"Pending","containerStatuses":[{{"name":"c","state":{{"waiting":{{"reason":"{reason}"}}}}}}]}}}}"#
            ));
            assert_eq!(evaluate(&p, "c"), PodState::Pending, "{reason}");
        }
        // A sidecar that cannot start keeps the pod from ever being ready.
        let p = pod(
            r#"{"status":{"phase":"Pending","containerStatuses":[{"name":"c","state":{"running":{}}},{"name":"side","state":{"waiting":{"reason":"ErrImagePull","message":"no"}}}]}}"#,
        );
        assert_eq!(
            evaluate(&p, "c"),
            PodState::Failed {
                reason: "ErrImagePull".into(),
                message: "no".into()
            }
        );
    }

    #[test]
    fn a_failing_init_container_fails_the_pod() {
        // The agent's init image cannot be pulled: the containers only say PodInitializing.
        let p = pod(
            r#"{"status":{"phase":"Pending","initContainerStatuses":[{"name":"containerssh-agent","state":{"waiting":{"reason":"ErrImagePull","message":"not found"}}}],"containerStatuses":[{"name":"c","state":{"waiting":{"reason":"PodInitializing"}}}]}}"#,
        );
        assert_eq!(
            evaluate(&p, "c"),
            PodState::Failed {
                reason: "ErrImagePull".into(),
                message: "init container \"containerssh-agent\": not found".into()
            }
        );
        // An init container that exited non-zero, while running or after the phase is final.
        for phase in ["Pending", "Failed"] {
            let p = pod(&format!(
                r#"{{"status":{{"phase":"{phase}","initContainerStatuses":[{{"name":"i","state":{{"terminated":{{"exitCode":3}}}}}}]}}}}"#
            ));
            let PodState::Failed { reason, message } = evaluate(&p, "c") else {
                panic!("{phase}");
            };
            assert_eq!(reason, "InitContainerFailed");
            assert!(message.contains("code 3"), "{message}");
        }
        // Completed init containers and a running one are progress.
        let p = pod(
            r#"{"status":{"phase":"Pending","initContainerStatuses":[{"name":"a","state":{"terminated":{"exitCode":0}}},{"name":"b","state":{"running":{}}}]}}"#,
        );
        assert_eq!(evaluate(&p, "c"), PodState::Pending);
    }

    const RUNNING: &str = r#"{"metadata":{"name":"x"},"status":{"phase":"Running","conditions":[{"type":"PodScheduled","status":"True"},{"type":"Ready","status":"True"}],"containerStatuses":[{"name":"shell","ready":true,"started":true,"state":{"running":{"startedAt":"t"}}}]}}"#;

    #[test]
    fn ready_needs_phase_condition_and_container() {
        assert_eq!(evaluate(&pod(RUNNING), "shell"), PodState::Ready);
        // Another container name: not ready.
        assert_eq!(evaluate(&pod(RUNNING), "other"), PodState::Pending);
        for (from, to) in [
            (r#""phase":"Running""#, r#""phase":"Pending""#),
            (
                r#"{"type":"Ready","status":"True"}"#,
                r#"{"type":"Ready","status":"False"}"#,
            ),
            (
                r#"{"type":"Ready","status":"True"}"#,
                r#"{"type":"X","status":"True"}"#,
            ),
            (r#""started":true"#, r#""started":false"#),
            (r#""running":{"startedAt":"t"}"#, r#""waiting":{}"#),
        ] {
            let json = RUNNING.replace(from, to);
            assert_ne!(json, RUNNING);
            assert_eq!(evaluate(&pod(&json), "shell"), PodState::Pending, "{to}");
        }
        // `started` absent (before 1.16): `ready` decides.
        let json = RUNNING.replace(r#""started":true,"#, "");
        assert_eq!(evaluate(&pod(&json), "shell"), PodState::Ready);
        let json = json.replace(r#""ready":true"#, r#""ready":false"#);
        assert_eq!(evaluate(&pod(&json), "shell"), PodState::Pending);
        // Nothing at all, or nulls.
        assert_eq!(evaluate(&Pod::default(), "shell"), PodState::Pending);
        assert_eq!(
            evaluate(
                &pod(
                    r#"{"metadata":null,"spec":null,"status":{"conditions":null,"containerStatuses":null}}"#
                ),
                "shell"
            ),
            PodState::Pending
        );
    }

    #[test]
    fn finished_pods_report_the_exit_code() {
        let p = pod(
            r#"{"status":{"phase":"Failed","containerStatuses":[{"name":"shell","state":{"terminated":{"exitCode":3,"reason":"Error","signal":0}}}]}}"#,
        );
        assert_eq!(evaluate(&p, "shell"), PodState::Terminated { exit_code: 3 });
        assert_eq!(terminated_exit_code(&p, "shell"), Some(3));
        assert_eq!(terminated_exit_code(&p, "other"), None);
        let p = pod(
            r#"{"metadata":{"deletionTimestamp":"t"},"status":{"phase":"Succeeded","containerStatuses":[{"name":"shell","state":{"terminated":{"exitCode":0}}}]}}"#,
        );
        assert_eq!(evaluate(&p, "shell"), PodState::Terminated { exit_code: 0 });
        // Finished without the container having run.
        let p =
            pod(r#"{"status":{"phase":"Failed","reason":"Evicted","message":"low on memory"}}"#);
        assert_eq!(
            evaluate(&p, "shell"),
            PodState::Failed {
                reason: "Evicted".into(),
                message: "low on memory".into()
            }
        );
        let PodState::Failed { reason, .. } =
            evaluate(&pod(r#"{"status":{"phase":"Succeeded"}}"#), "shell")
        else {
            panic!("failure expected");
        };
        assert_eq!(reason, "PodSucceeded");
    }

    #[test]
    fn deletion_and_unschedulable_fail() {
        let json = RUNNING.replace(
            r#""name":"x""#,
            r#""name":"x","deletionTimestamp":"2025-01-01T00:00:00Z""#,
        );
        assert_eq!(
            evaluate(&pod(&json), "shell"),
            PodState::Failed {
                reason: "Terminating".into(),
                message: "the pod is being deleted".into()
            }
        );
        let p = pod(
            r#"{"status":{"phase":"Pending","conditions":[{"type":"PodScheduled","status":"False","reason":"Unschedulable","message":"0/3 nodes are available: 3 Insufficient cpu."}]}}"#,
        );
        assert_eq!(
            evaluate(&p, "shell"),
            PodState::Failed {
                reason: "Unschedulable".into(),
                message: "0/3 nodes are available: 3 Insufficient cpu.".into()
            }
        );
        // PodScheduled=False for another reason: still pending.
        let p = pod(
            r#"{"status":{"phase":"Pending","conditions":[{"type":"PodScheduled","status":"False","reason":"SchedulingGated"}]}}"#,
        );
        assert_eq!(evaluate(&p, "shell"), PodState::Pending);
    }
}
