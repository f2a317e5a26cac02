//! Docker exec endpoints: create, start (hijacked), resize and inspect an
//! exec instance, and read its exit code once its output has ended (the
//! engine has no exec-wait endpoint, so this polls inspect briefly).

use std::time::Duration;

use http::{Method, StatusCode};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::api::{container_error, decode, ok_or, seg, IdReply};
use super::client::{error_message, status_error, DockerClient, HijackReply};
use super::{DockerError, Hijacked};

/// First pause between exec inspections while the engine still reports the exec running.
const EXEC_POLL_START: Duration = Duration::from_millis(2);
/// Longest pause between exec inspections.
const EXEC_POLL_MAX: Duration = Duration::from_millis(100);

/// An exec instance to create.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecSpec {
    pub cmd: Vec<String>,
    /// `KEY=value` entries added to the container's environment.
    pub env: Vec<String>,
    pub tty: bool,
    pub user: Option<String>,
    pub working_dir: Option<String>,
    /// Initial TTY size `(rows, cols)`; sent as `ConsoleSize`, which only
    /// API ≥ 1.42 honours (older engines ignore it, see `engine_tests.rs`).
    pub console_size: Option<(u32, u32)>,
}

/// State of an exec instance, from `GET /exec/{id}/json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecInfo {
    pub running: bool,
    /// `None` until the process has exited.
    pub exit_code: Option<i64>,
    pub pid: i64,
}

/// Maps 404 to `NoSuchExec`, 409 (container stopped or paused) to `NotRunning`.
fn exec_error(op: &'static str, id: &str, status: StatusCode, body: &[u8]) -> DockerError {
    match status {
        StatusCode::NOT_FOUND => DockerError::NoSuchExec { id: id.to_string() },
        StatusCode::CONFLICT => DockerError::NotRunning {
            op,
            id: id.to_string(),
            message: error_message(body),
        },
        _ => status_error(op, status, body),
    }
}

impl DockerClient {
    /// `POST /containers/{id}/exec` with stdin, stdout and stderr attached.
    pub async fn create_exec(
        &self,
        container: &str,
        spec: &ExecSpec,
    ) -> Result<String, DockerError> {
        const OP: &str = "exec create";
        let path = self
            .versioned(&format!("/containers/{}/exec", seg(container)))
            .await?;
        let mut body = Map::new();
        body.insert("AttachStdin".into(), json!(true));
        body.insert("AttachStdout".into(), json!(true));
        body.insert("AttachStderr".into(), json!(true));
        body.insert("Tty".into(), json!(spec.tty));
        body.insert("Cmd".into(), json!(spec.cmd));
        body.insert("Env".into(), json!(spec.env));
        if let Some(user) = &spec.user {
            body.insert("User".into(), json!(user));
        }
        if let Some(dir) = &spec.working_dir {
            body.insert("WorkingDir".into(), json!(dir));
        }
        if let Some((rows, cols)) = spec.console_size {
            body.insert("ConsoleSize".into(), json!([rows, cols]));
        }
        let body = Value::Object(body).to_string().into_bytes();
        let (status, reply) = self.call(OP, Method::POST, &path, Some(body)).await?;
        ok_or(status, &reply, |s, b| container_error(OP, container, s, b))?;
        Ok(decode::<IdReply>(OP, &reply)?.id)
    }

    /// Hijacked `POST /exec/{id}/start`; `tty` must match the exec's spec
    /// (raw stream if true, multiplexed otherwise).
    pub async fn start_exec(&self, exec_id: &str, tty: bool) -> Result<Hijacked, DockerError> {
        const OP: &str = "exec start";
        let path = self
            .versioned(&format!("/exec/{}/start", seg(exec_id)))
            .await?;
        let body = json!({"Detach": false, "Tty": tty})
            .to_string()
            .into_bytes();
        match self.hijack(OP, &path, Some(body)).await? {
            HijackReply::Stream(h) => Ok(h),
            HijackReply::Failed(s, b) => Err(exec_error(OP, exec_id, s, &b)),
        }
    }

    /// `POST /exec/{id}/resize?h=rows&w=cols`. Only after `start_exec`: on
    /// Docker 20.10 a resize before start blocks ~10 s, then fails with 500.
    pub async fn resize_exec(
        &self,
        exec_id: &str,
        rows: u32,
        cols: u32,
    ) -> Result<(), DockerError> {
        const OP: &str = "exec resize";
        let path = self
            .versioned(&format!("/exec/{}/resize?h={rows}&w={cols}", seg(exec_id)))
            .await?;
        let (status, body) = self.call(OP, Method::POST, &path, None).await?;
        ok_or(status, &body, |s, b| exec_error(OP, exec_id, s, b))
    }

    /// `GET /exec/{id}/json`.
    pub async fn inspect_exec(&self, exec_id: &str) -> Result<ExecInfo, DockerError> {
        const OP: &str = "exec inspect";
        let path = self
            .versioned(&format!("/exec/{}/json", seg(exec_id)))
            .await?;
        let (status, body) = self.call(OP, Method::GET, &path, None).await?;
        ok_or(status, &body, |s, b| exec_error(OP, exec_id, s, b))?;
        #[derive(Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct Inspect {
            running: bool,
            #[serde(default)]
            exit_code: Option<i64>,
            #[serde(default)]
            pid: i64,
        }
        let i: Inspect = decode(OP, &body)?;
        Ok(ExecInfo {
            running: i.running,
            exit_code: if i.running { None } else { i.exit_code },
            pid: i.pid,
        })
    }

    /// Exit code of a finished exec, for use after its output stream ended:
    /// inspects, retrying with backoff (2 ms doubling, capped at 100 ms)
    /// while the engine still reports it running, until `deadline` passes.
    pub async fn exec_exit_code(
        &self,
        exec_id: &str,
        deadline: Duration,
    ) -> Result<i64, DockerError> {
        let until = tokio::time::Instant::now() + deadline;
        let mut pause = EXEC_POLL_START;
        loop {
            let info = self.inspect_exec(exec_id).await?;
            if let (false, Some(code)) = (info.running, info.exit_code) {
                return Ok(code);
            }
            let now = tokio::time::Instant::now();
            if now >= until {
                return Err(DockerError::ExecStillRunning {
                    id: exec_id.to_string(),
                });
            }
            tokio::time::sleep(pause.min(until - now)).await;
            pause = (pause * 2).min(EXEC_POLL_MAX);
        }
    }
}
