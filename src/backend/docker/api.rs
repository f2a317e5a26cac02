//! Docker Engine API endpoints for images and containers, mapped to typed
//! results and [`DockerError`]s (exec instances live in `exec.rs`).

use bytes::Bytes;
use http::{Method, StatusCode};
use serde::Deserialize;
use serde_json::json;
use tokio::io::AsyncBufReadExt;

use super::client::{error_message, status_error, truncate, DockerClient, HijackReply};
use super::stream::BodyReader;
use super::{DockerError, Hijacked, MAX_ERROR_MESSAGE_BYTES, MAX_PROGRESS_LINE_BYTES};

/// State of a container, from `GET /containers/{id}/json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerInfo {
    pub running: bool,
    /// Engine status word: `created`, `running`, `exited`, ...
    pub status: String,
    pub exit_code: i64,
    pub oom_killed: bool,
    /// Host PID of the main process, 0 when not running.
    pub pid: i64,
}

/// Condition for `POST /containers/{id}/wait`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitCondition {
    /// Returns at once if the container is not running (also when only created).
    NotRunning,
    /// Waits for the next exit; may be called before start. Hangs if the
    /// container already exited and is never started again.
    NextExit,
    /// Waits until the container is removed.
    Removed,
}

impl WaitCondition {
    fn as_str(self) -> &'static str {
        match self {
            Self::NotRunning => "not-running",
            Self::NextExit => "next-exit",
            Self::Removed => "removed",
        }
    }
}

/// Splits an image reference into the `fromImage` and `tag` query values
/// the way the Docker CLI does: a digest wins over a tag, no tag means
/// `latest`, and a `registry:port/` prefix is not a tag.
pub fn split_image_reference(image: &str) -> (&str, &str) {
    if let Some((name, digest)) = image.split_once('@') {
        return (strip_tag(name).0, digest);
    }
    match strip_tag(image) {
        (name, Some(tag)) => (name, tag),
        (name, None) => (name, "latest"),
    }
}

fn strip_tag(name: &str) -> (&str, Option<&str>) {
    let last_slash = name.rfind('/').map_or(0, |i| i + 1);
    match name[last_slash..].rfind(':') {
        Some(i) => (&name[..last_slash + i], Some(&name[last_slash + i + 1..])),
        None => (name, None),
    }
}

/// Percent-encodes everything outside RFC 3986 unreserved characters and `keep`.
fn encode(s: &str, keep: &[u8]) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || keep.contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Encodes a container/exec id or name as one path segment.
pub(super) fn seg(s: &str) -> String {
    encode(s, b"")
}

/// Encodes a query parameter value.
pub(super) fn q(s: &str) -> String {
    encode(s, b"")
}

pub(super) fn decode<'a, T: Deserialize<'a>>(
    op: &'static str,
    body: &'a [u8],
) -> Result<T, DockerError> {
    serde_json::from_slice(body).map_err(|source| DockerError::Decode { op, source })
}

/// Maps 404 to `NoSuchContainer`, 409 to `NotRunning`, anything else to `Status`.
pub(super) fn container_error(
    op: &'static str,
    id: &str,
    status: StatusCode,
    body: &[u8],
) -> DockerError {
    match status {
        StatusCode::NOT_FOUND => DockerError::NoSuchContainer { id: id.to_string() },
        StatusCode::CONFLICT => DockerError::NotRunning {
            op,
            id: id.to_string(),
            message: error_message(body),
        },
        _ => status_error(op, status, body),
    }
}

pub(super) fn ok_or(
    status: StatusCode,
    body: &Bytes,
    map: impl FnOnce(StatusCode, &[u8]) -> DockerError,
) -> Result<(), DockerError> {
    if status.is_success() {
        Ok(())
    } else {
        Err(map(status, body))
    }
}

#[derive(Deserialize)]
pub(super) struct IdReply {
    #[serde(rename = "Id")]
    pub(super) id: String,
}

impl DockerClient {
    /// `GET /images/{name}/json`; 404 means absent.
    pub async fn image_exists(&self, image: &str) -> Result<bool, DockerError> {
        const OP: &str = "image inspect";
        let path = self
            .versioned(&format!("/images/{}/json", encode(image, b"/:@")))
            .await?;
        let (status, body) = self.call(OP, Method::GET, &path, None).await?;
        match status {
            StatusCode::OK => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            s => Err(status_error(OP, s, &body)),
        }
    }

    /// `POST /images/create?fromImage=&tag=`; drains the progress stream,
    /// failing on its first error line. Only connecting and the response
    /// head are under the HTTP timeout; bound the whole pull from outside.
    pub async fn pull_image(
        &self,
        image: &str,
        registry_auth_b64: Option<&str>,
    ) -> Result<(), DockerError> {
        const OP: &str = "image pull";
        let (name, tag) = split_image_reference(image);
        let path = self
            .versioned(&format!(
                "/images/create?fromImage={}&tag={}",
                q(name),
                q(tag)
            ))
            .await?;
        let headers: Vec<(&'static str, &str)> = registry_auth_b64
            .map(|a| ("x-registry-auth", a))
            .into_iter()
            .collect();
        let (resp, _guard) = self.stream(OP, Method::POST, &path, &headers).await?;
        let status = resp.status();
        let body = resp.into_body();
        let mut reader = tokio::io::BufReader::new(BodyReader::new(body));
        if !status.is_success() {
            let mut buf = Vec::new();
            read_line_capped(&mut reader, &mut buf, super::MAX_RESPONSE_BYTES, OP).await?;
            return Err(DockerError::PullFailed {
                image: image.to_string(),
                message: format!("status {}: {}", status.as_u16(), error_message(&buf)),
            });
        }
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = read_line_capped(&mut reader, &mut line, MAX_PROGRESS_LINE_BYTES, OP).await?;
            if n == 0 {
                return Ok(());
            }
            if let Some(message) = progress_error(&line) {
                return Err(DockerError::PullFailed {
                    image: image.to_string(),
                    message,
                });
            }
        }
    }

    /// `POST /containers/create[?name=]`; returns the new id. 404 (image
    /// missing) becomes [`DockerError::ImageNotFound`].
    pub async fn create_container(
        &self,
        name: Option<&str>,
        platform: Option<&str>,
        body: &serde_json::Value,
    ) -> Result<String, DockerError> {
        // Untimed: under load the engine takes longer than one HTTP timeout to create, start
        // or remove; callers bound these by `docker.timeouts.containerStart`/`containerStop`.
        const OP: &str = "container create";
        let params: Vec<String> = [("name", name), ("platform", platform)]
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| format!("{k}={}", q(v))))
            .collect();
        let query = if params.is_empty() {
            String::new()
        } else {
            format!("?{}", params.join("&"))
        };
        let path = self
            .versioned(&format!("/containers/create{query}"))
            .await?;
        let payload = body.to_string().into_bytes();
        let (status, reply) = self
            .call_untimed(OP, Method::POST, &path, Some(payload))
            .await?;
        match status {
            StatusCode::CREATED | StatusCode::OK => Ok(decode::<IdReply>(OP, &reply)?.id),
            StatusCode::NOT_FOUND => Err(DockerError::ImageNotFound {
                image: body
                    .get("Image")
                    .and_then(|v| v.as_str())
                    .unwrap_or_default()
                    .to_string(),
            }),
            s => Err(status_error(OP, s, &reply)),
        }
    }

    /// `POST /containers/{id}/start`; "already started" (304) is success.
    pub async fn start_container(&self, id: &str) -> Result<(), DockerError> {
        const OP: &str = "container start";
        let path = self
            .versioned(&format!("/containers/{}/start", seg(id)))
            .await?;
        let (status, body) = self.call_untimed(OP, Method::POST, &path, None).await?;
        if status == StatusCode::NOT_MODIFIED {
            return Ok(());
        }
        ok_or(status, &body, |s, b| match s {
            StatusCode::NOT_FOUND => DockerError::NoSuchContainer { id: id.to_string() },
            _ => status_error(OP, s, b),
        })
    }

    /// Hijacked `POST /containers/{id}/attach?stream=1&stdin=1&stdout=1&stderr=1`.
    /// Attach before start to miss no output. Stdin EOF (writer shutdown)
    /// only reaches the process if the container was created with
    /// `"StdinOnce": true` (and `"OpenStdin": true`).
    pub async fn attach_container(&self, id: &str) -> Result<Hijacked, DockerError> {
        const OP: &str = "container attach";
        let path = self
            .versioned(&format!(
                "/containers/{}/attach?stream=1&stdin=1&stdout=1&stderr=1",
                seg(id)
            ))
            .await?;
        match self.hijack(OP, &path, None).await? {
            HijackReply::Stream(h) => Ok(h),
            HijackReply::Failed(s, b) => Err(container_error(OP, id, s, &b)),
        }
    }

    /// `POST /containers/{id}/wait?condition=not-running`: call after
    /// [`start_container`](Self::start_container). No timeout.
    pub async fn wait_container(&self, id: &str) -> Result<i64, DockerError> {
        self.wait_container_until(id, WaitCondition::NotRunning)
            .await
    }

    /// `POST /containers/{id}/wait?condition=...`, returning the exit code. No timeout.
    pub async fn wait_container_until(
        &self,
        id: &str,
        condition: WaitCondition,
    ) -> Result<i64, DockerError> {
        const OP: &str = "container wait";
        let path = self
            .versioned(&format!(
                "/containers/{}/wait?condition={}",
                seg(id),
                condition.as_str()
            ))
            .await?;
        let (status, body) = self.call_untimed(OP, Method::POST, &path, None).await?;
        ok_or(status, &body, |s, b| container_error(OP, id, s, b))?;
        #[derive(Deserialize)]
        struct WaitError {
            #[serde(rename = "Message", default)]
            message: String,
        }
        #[derive(Deserialize)]
        struct Wait {
            #[serde(rename = "StatusCode")]
            status_code: i64,
            #[serde(rename = "Error", default)]
            error: Option<WaitError>,
        }
        let w: Wait = decode(OP, &body)?;
        match w.error {
            Some(e) if !e.message.is_empty() => Err(DockerError::WaitFailed {
                id: id.to_string(),
                message: truncate(e.message, MAX_ERROR_MESSAGE_BYTES),
            }),
            _ => Ok(w.status_code),
        }
    }

    /// `POST /containers/{id}/kill?signal=`; 409 = [`DockerError::NotRunning`].
    pub async fn kill_container(&self, id: &str, signal: &str) -> Result<(), DockerError> {
        const OP: &str = "container kill";
        let path = self
            .versioned(&format!(
                "/containers/{}/kill?signal={}",
                seg(id),
                q(signal)
            ))
            .await?;
        let (status, body) = self.call(OP, Method::POST, &path, None).await?;
        ok_or(status, &body, |s, b| container_error(OP, id, s, b))
    }

    /// `POST /containers/{id}/resize?h=rows&w=cols`.
    pub async fn resize_container(
        &self,
        id: &str,
        rows: u32,
        cols: u32,
    ) -> Result<(), DockerError> {
        const OP: &str = "container resize";
        let path = self
            .versioned(&format!("/containers/{}/resize?h={rows}&w={cols}", seg(id)))
            .await?;
        let (status, body) = self.call(OP, Method::POST, &path, None).await?;
        ok_or(status, &body, |s, b| container_error(OP, id, s, b))
    }

    /// `GET /containers/{id}/json`.
    pub async fn inspect_container(&self, id: &str) -> Result<ContainerInfo, DockerError> {
        const OP: &str = "container inspect";
        let path = self
            .versioned(&format!("/containers/{}/json", seg(id)))
            .await?;
        let (status, body) = self.call(OP, Method::GET, &path, None).await?;
        ok_or(status, &body, |s, b| container_error(OP, id, s, b))?;
        #[derive(Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct State {
            running: bool,
            #[serde(default)]
            status: String,
            #[serde(default)]
            exit_code: i64,
            #[serde(rename = "OOMKilled", default)]
            oom_killed: bool,
            #[serde(default)]
            pid: i64,
        }
        #[derive(Deserialize)]
        struct Inspect {
            #[serde(rename = "State")]
            state: State,
        }
        let s = decode::<Inspect>(OP, &body)?.state;
        Ok(ContainerInfo {
            running: s.running,
            status: s.status,
            exit_code: s.exit_code,
            oom_killed: s.oom_killed,
            pid: s.pid,
        })
    }

    /// `DELETE /containers/{id}?force=1&v=1`; already gone (404) or removal
    /// already in progress (409) count as success.
    pub async fn remove_container(&self, id: &str) -> Result<(), DockerError> {
        const OP: &str = "container remove";
        let path = self
            .versioned(&format!("/containers/{}?force=1&v=1", seg(id)))
            .await?;
        let (status, body) = self.call_untimed(OP, Method::DELETE, &path, None).await?;
        match status {
            s if s.is_success() || s == StatusCode::NOT_FOUND => Ok(()),
            StatusCode::CONFLICT if error_message(&body).contains("already in progress") => Ok(()),
            s => Err(status_error(OP, s, &body)),
        }
    }

    /// `POST /volumes/create`: the named volume, created with `labels` unless it exists.
    pub async fn create_volume(
        &self,
        name: &str,
        labels: &[(&str, &str)],
    ) -> Result<(), DockerError> {
        const OP: &str = "volume create";
        let labels: serde_json::Map<String, serde_json::Value> = labels
            .iter()
            .map(|(k, v)| ((*k).to_string(), json!(v)))
            .collect();
        let path = self.versioned("/volumes/create").await?;
        let payload = json!({"Name": name, "Labels": labels})
            .to_string()
            .into_bytes();
        let (status, body) = self.call(OP, Method::POST, &path, Some(payload)).await?;
        ok_or(status, &body, |s, b| status_error(OP, s, b))
    }

    /// Whether `path` exists in a container's file system (volumes mounted in it included),
    /// from `GET /containers/{id}/archive` (meant for small files: the answer is their tar).
    pub async fn path_exists(&self, id: &str, path: &str) -> Result<bool, DockerError> {
        const OP: &str = "container archive stat";
        let url = self
            .versioned(&format!("/containers/{}/archive?path={}", seg(id), q(path)))
            .await?;
        let (status, body) = self.call(OP, Method::GET, &url, None).await?;
        match status {
            StatusCode::OK => Ok(true),
            StatusCode::NOT_FOUND if error_message(&body).contains("No such container") => {
                Err(DockerError::NoSuchContainer { id: id.to_string() })
            }
            StatusCode::NOT_FOUND => Ok(false),
            s => Err(status_error(OP, s, &body)),
        }
    }

    /// Ids of all containers (running or not) carrying every `key=value` label.
    pub async fn list_containers(
        &self,
        labels: &[(&str, &str)],
    ) -> Result<Vec<String>, DockerError> {
        const OP: &str = "container list";
        let filters = json!({
            "label": labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>()
        });
        let path = self
            .versioned(&format!(
                "/containers/json?all=1&filters={}",
                q(&filters.to_string())
            ))
            .await?;
        let (status, body) = self.call(OP, Method::GET, &path, None).await?;
        ok_or(status, &body, |s, b| status_error(OP, s, b))?;
        Ok(decode::<Vec<IdReply>>(OP, &body)?
            .into_iter()
            .map(|c| c.id)
            .collect())
    }
}

/// Reads one `\n`-terminated line of at most `max` bytes (0 at EOF).
async fn read_line_capped(
    reader: &mut tokio::io::BufReader<BodyReader>,
    line: &mut Vec<u8>,
    max: usize,
    op: &'static str,
) -> Result<usize, DockerError> {
    let start = line.len();
    loop {
        let buf = reader
            .fill_buf()
            .await
            .map_err(|source| DockerError::Stream { op, source })?;
        if buf.is_empty() {
            return Ok(line.len() - start);
        }
        // Up to and including the first `\n`, or all of `buf` without one.
        let piece = buf.split_inclusive(|&b| b == b'\n').next().unwrap_or(buf);
        let (take, done) = (piece.len(), piece.ends_with(b"\n"));
        if line.len() - start + take > max {
            return Err(DockerError::ResponseTooLarge { op, limit: max });
        }
        line.extend_from_slice(piece);
        reader.consume(take);
        if done {
            return Ok(line.len() - start);
        }
    }
}

/// The error text of a pull progress line, if it reports one.
fn progress_error(line: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(line).ok()?;
    let msg = v
        .get("errorDetail")
        .and_then(|d| d.get("message"))
        .and_then(|m| m.as_str())
        .or_else(|| v.get("error").and_then(|e| e.as_str()))?;
    Some(truncate(msg.to_string(), MAX_ERROR_MESSAGE_BYTES))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_references() {
        assert_eq!(split_image_reference("busybox"), ("busybox", "latest"));
        assert_eq!(split_image_reference("busybox:1.36"), ("busybox", "1.36"));
        assert_eq!(
            split_image_reference("registry:5000/foo/bar"),
            ("registry:5000/foo/bar", "latest")
        );
        assert_eq!(
            split_image_reference("registry:5000/foo/bar:v1"),
            ("registry:5000/foo/bar", "v1")
        );
        assert_eq!(
            split_image_reference("foo@sha256:abc"),
            ("foo", "sha256:abc")
        );
        assert_eq!(
            split_image_reference("reg:1/foo:tag@sha256:abc"),
            ("reg:1/foo", "sha256:abc")
        );
    }

    #[test]
    fn encoding() {
        assert_eq!(encode("a b/c:d", b"/:"), "a%20b/c:d");
        assert_eq!(
            q("{\"label\":[\"a=b\"]}"),
            "%7B%22label%22%3A%5B%22a%3Db%22%5D%7D"
        );
        assert_eq!(seg("../x"), "..%2Fx");
    }

    #[test]
    fn progress_errors() {
        assert_eq!(progress_error(br#"{"status":"Pulling fs layer"}"#), None);
        assert_eq!(
            progress_error(br#"{"errorDetail":{"message":"denied"},"error":"denied!"}"#),
            Some("denied".into())
        );
        assert_eq!(progress_error(br#"{"error":"nope"}"#), Some("nope".into()));
        assert_eq!(progress_error(b"not json"), None);
    }
}
