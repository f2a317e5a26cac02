//! One task per session channel. It collects the terminal and environment, starts the program
//! in the container when asked, then pumps stdin in and stdout/stderr out, applies resizes and
//! signals, and finally reports the exit status and closes the channel.
//! Stdin goes through the queue in [`super::stdin`], whose flow rules keep a busy program
//! from deadlocking its own connection.

use std::sync::Arc;

use bytes::Bytes;
use russh::server::{Handle, Msg};
use russh::ChannelWriteHalf;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::conn::ConnCtx;
use super::stdin::{OutputGauge, StdinRx};
use crate::backend::docker::StreamKind;
use crate::backend::process::{Process, ProcessOutput};
use crate::backend::{ExitReport, ProgramSpec, StartError, Terminal};
use crate::config::model::ExecutionMode;

/// Exit status sent when the program could not be started at all.
pub const START_FAILED_STATUS: u32 = 1;

#[derive(Debug)]
pub enum ChannelEvent {
    Pty(Terminal),
    Env(String),
    Start {
        argv: Vec<String>,
        env: Vec<String>,
    },
    Resize {
        cols: u32,
        rows: u32,
    },
    Signal(String),
    /// `x11-req` accepted: the display listening inside the container and the client's cookie.
    X11 {
        display: u16,
        screen: u32,
        protocol: String,
        cookie: Vec<u8>,
    },
}

/// Writes the session's Xauthority file into the container through the agent and returns the
/// environment that points X clients at the forwarded display.
async fn x11_env(
    conn: &ConnCtx,
    display: u16,
    screen: u32,
    protocol: &str,
    cookie: &[u8],
) -> Result<Vec<String>, String> {
    let backend = conn.backend();
    let container = conn.container().await.map_err(|e| e.to_string())?;
    let agent = backend
        .agent_in(&container)
        .ok_or("X11 forwarding needs the in-container agent")?;
    let path = format!("/tmp/.containerssh-Xauthority-{display}");
    let file = super::forward::xauthority(display, protocol, cookie);
    let cmd = vec![
        agent,
        "write-file".into(),
        path.clone(),
        "--mode".into(),
        "600".into(),
        "--size".into(),
        file.len().to_string(),
    ];
    let out = backend.capture(&container, cmd, Some(&file)).await?;
    if out.code != 0 {
        return Err(format!("cannot write {path}: {}", out.message()));
    }
    Ok(vec![
        format!("DISPLAY=localhost:{display}.{screen}"),
        format!("XAUTHORITY={path}"),
    ])
}

async fn pump_output(
    mut output: ProcessOutput,
    write: &ChannelWriteHalf<Msg>,
    gauge: OutputGauge,
) -> std::io::Result<()> {
    let mut stdout = write.make_writer();
    let mut stderr = write.make_writer_ext(Some(1));
    while let Some((kind, data)) = output.next().await? {
        match kind {
            StreamKind::Stdout => gauge.write(&mut stdout, &data).await?,
            StreamKind::Stderr => gauge.write(&mut stderr, &data).await?,
            StreamKind::Stdin | StreamKind::SystemErr => {}
        }
    }
    Ok(())
}

/// Starts the program: an exec in the connection's container, or a container of its own.
async fn start(
    conn: &ConnCtx,
    spec: &ProgramSpec,
) -> Result<(Option<String>, Process), StartError> {
    let backend = conn.backend();
    match backend.mode() {
        ExecutionMode::Connection | ExecutionMode::Persistent => {
            let container = conn.container().await?;
            Ok((None, backend.exec(&container, spec).await?))
        }
        ExecutionMode::Session => {
            let (id, p) = backend.run_session(&conn.meta(), spec).await?;
            Ok((Some(id), p))
        }
    }
}

/// Reports how the program ended, then EOF and close. The exit report goes first: a client
/// that has finished its own side answers our EOF with its CLOSE at once (OpenSSH's
/// ControlMaster does), and once that CLOSE is in, the connection drops anything more we
/// queue for the channel: an exit status sent after the EOF was lost under load, and the
/// mux client exited 255.
async fn finish(write: &ChannelWriteHalf<Msg>, handle: &Handle, exit: &ExitReport) {
    match exit {
        ExitReport::Status(code) => {
            let _ = write.exit_status(*code).await;
        }
        ExitReport::Signal { name } => {
            let _ = handle
                .exit_signal_request(
                    write.id(),
                    russh::Sig::Custom(name.clone()),
                    false,
                    String::new(),
                    String::new(),
                )
                .await;
        }
    }
    let _ = write.eof().await;
    let _ = write.close().await;
}

async fn shutdown_notice(write: &ChannelWriteHalf<Msg>) {
    let _ = write
        .extended_data_bytes(
            1,
            Bytes::from_static(b"\r\nThe server is shutting down.\r\n"),
        )
        .await;
    let _ = write.close().await;
}

pub async fn run(
    conn: Arc<ConnCtx>,
    handle: Handle,
    write: ChannelWriteHalf<Msg>,
    mut events: mpsc::Receiver<ChannelEvent>,
    stdin: StdinRx,
    closed: CancellationToken,
) {
    // Awaiting: terminal and environment until a program is requested.
    let mut tty: Option<Terminal> = None;
    let mut env = Vec::new();
    let mut x11 = None;
    let (argv, extra_env) = loop {
        let ev = tokio::select! {
            ev = events.recv() => ev,
            () = closed.cancelled() => return,
            () = conn.cancel.cancelled() => return,
        };
        match ev {
            Some(ChannelEvent::Pty(t)) => tty = Some(t),
            Some(ChannelEvent::Env(e)) => env.push(e),
            Some(ChannelEvent::Start { argv, env }) => break (argv, env),
            Some(ChannelEvent::Resize { cols, rows }) => {
                if let Some(t) = tty.as_mut() {
                    (t.cols, t.rows) = (cols, rows);
                }
            }
            Some(ChannelEvent::Signal(_)) => {}
            Some(ChannelEvent::X11 {
                display,
                screen,
                protocol,
                cookie,
            }) => x11 = Some((display, screen, protocol, cookie)),
            None => return,
        }
    };
    if let Some((display, screen, protocol, cookie)) = x11 {
        match x11_env(&conn, display, screen, &protocol, &cookie).await {
            Ok(vars) => env.extend(vars),
            Err(e) => {
                tracing::warn!(connection_id = %conn.id, error = %e, "X11 forwarding not set up");
            }
        }
    }
    env.extend(extra_env);
    if let Some(t) = &tty {
        env.push(format!("TERM={}", t.term));
    }
    let login = conn
        .user()
        .map(|u| Arc::clone(&u.metadata))
        .unwrap_or_default();
    let spec = ProgramSpec {
        argv,
        env,
        tty,
        login,
    };

    // Starting: bounded by the backend's own timeouts, not cancelled midway, so a container
    // being created is always known and removed.
    let (session_container, process) = match start(&conn, &spec).await {
        Ok(x) => x,
        Err(StartError::Closing) if conn.shared.shutdown.is_cancelled() => {
            shutdown_notice(&write).await;
            return;
        }
        Err(e) => {
            tracing::warn!(connection_id = %conn.id, error = %e, "program start failed");
            let nl = if spec.tty.is_some() { "\r\n" } else { "\n" };
            let msg = format!("cannot start your container: {e}{nl}");
            let _ = write.extended_data_bytes(1, Bytes::from(msg)).await;
            finish(&write, &handle, &ExitReport::Status(START_FAILED_STATUS)).await;
            return;
        }
    };

    // Running.
    let Process {
        stdin: writer,
        output,
        control,
    } = process;
    let gauge = stdin.gauge();
    let stdin_task = conn.tasks.spawn(stdin.pump(writer));
    let out = pump_output(output, &write, gauge);
    tokio::pin!(out);
    let ended = loop {
        tokio::select! {
            r = &mut out => {
                if let Err(e) = r {
                    tracing::debug!(connection_id = %conn.id, error = %e, "output stream ended with an error");
                }
                break true;
            }
            Some(ev) = events.recv() => match ev {
                ChannelEvent::Resize { cols, rows } => {
                    if let Err(e) = control.resize(rows, cols).await {
                        tracing::debug!(connection_id = %conn.id, error = %e, "resize failed");
                    }
                }
                ChannelEvent::Signal(name) => {
                    if let Err(e) = control.signal(&name).await {
                        tracing::info!(connection_id = %conn.id, signal = %name, error = %e, "signal not delivered");
                    }
                }
                _ => {}
            },
            () = closed.cancelled() => break false,
            () = conn.cancel.cancelled() => break false,
        }
    };

    if ended {
        let exit = control.wait().await;
        tracing::debug!(connection_id = %conn.id, %exit, "program ended");
        finish(&write, &handle, &exit).await;
    } else if conn.shared.shutdown.is_cancelled() && !closed.is_cancelled() {
        let _ = write
            .extended_data_bytes(
                1,
                Bytes::from_static(b"\r\nThe server is shutting down.\r\n"),
            )
            .await;
        let _ = write.close().await;
    }
    stdin_task.abort();
    if let Some(id) = session_container {
        conn.backend().remove_session(&id).await;
    }
}
