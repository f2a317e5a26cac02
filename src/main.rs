//! `containerssh`: parse the command line, load and validate the config, bind, read keys, then
//! build the runtime and serve. Everything that can fail on bad input fails before serving.
// House rules: no unwrap, expect, unchecked indexing or panic in the product (tests may,
// clippy.toml); a broken assumption becomes an error the caller handles.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::path::PathBuf;
use std::process::ExitCode;

use containerssh::auth::password::hash_password_argon2id;

use containerssh::config::model::SeccompMode;
use containerssh::config::{self, Settings};
use containerssh::server;
use containerssh::shared::Prepared;

const HELP: &str = "\
containerssh - an SSH server that gives every login its own container

USAGE:
    containerssh [--config FILE]
    containerssh audit decode FILE
    containerssh audit replay FILE [--channel N]

With no --config, serves the embedded default: 127.0.0.1:2222, your own
~/.ssh/authorized_keys for any user name, the local Docker engine.

OPTIONS:
    --config FILE     ContainerSSH-compatible YAML or JSON configuration
    --dump-config     print the effective configuration as YAML and exit
    --healthcheck     ask the health endpoint (health.client.url) whether the server
                      serves: exit 0 if it answers 200, or if health is not enabled
    --hash-password   read a password from stdin, print an argon2id hash for a password file
    --help            print this help
    --version         print the version

AUDIT RECORDINGS (audit.format: binary, ContainerSSH's format, versions 1 and 2):
    audit decode FILE             print every message as one JSON object per line
    audit replay FILE [--channel N]
                                  play a session channel's output (the first with output
                                  when none is named) at the pace it was recorded
";

struct Cli {
    config: Option<PathBuf>,
    dump: bool,
    hash_password: bool,
    healthcheck: bool,
}

fn parse_cli() -> Result<Option<Cli>, lexopt::Error> {
    use lexopt::prelude::*;
    let mut cli = Cli {
        config: None,
        dump: false,
        hash_password: false,
        healthcheck: false,
    };
    let mut parser = lexopt::Parser::from_env();
    while let Some(arg) = parser.next()? {
        match arg {
            Long("config") | Short('c') => cli.config = Some(parser.value()?.into()),
            Long("dump-config") => cli.dump = true,
            Long("hash-password") => cli.hash_password = true,
            Long("healthcheck") => cli.healthcheck = true,
            Long("help") | Short('h') => {
                print!("{HELP}");
                return Ok(None);
            }
            Long("version") | Short('V') => {
                println!("containerssh {}", env!("CARGO_PKG_VERSION"));
                return Ok(None);
            }
            _ => return Err(arg.unexpected()),
        }
    }
    Ok(Some(cli))
}

fn print_chain(err: &dyn std::error::Error) {
    eprintln!("containerssh: {err}");
    let mut source = err.source();
    while let Some(s) = source {
        eprintln!("  caused by: {s}");
        source = s.source();
    }
}

fn hash_password() -> ExitCode {
    let mut line = String::new();
    if std::io::stdin().read_line(&mut line).is_err() {
        eprintln!("containerssh: cannot read a password from stdin");
        return ExitCode::FAILURE;
    }
    let pw = line.trim_end_matches(['\r', '\n']);
    match hash_password_argon2id(pw.as_bytes()) {
        Ok(h) => {
            println!("{h}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            print_chain(&e);
            ExitCode::FAILURE
        }
    }
}

/// `containerssh audit decode|replay FILE [--channel N]`.
fn audit_command(mut parser: lexopt::Parser) -> Result<ExitCode, lexopt::Error> {
    use lexopt::prelude::*;
    let action = parser.value()?.string()?;
    let mut file: Option<PathBuf> = None;
    let mut channel = None;
    while let Some(arg) = parser.next()? {
        match arg {
            Long("channel") if action == "replay" => channel = Some(parser.value()?.parse()?),
            Value(v) if file.is_none() => file = Some(v.into()),
            _ => return Err(arg.unexpected()),
        }
    }
    let Some(file) = file else {
        return Err("audit decode|replay needs the recording's FILE".into());
    };
    let (mut out, mut err) = (std::io::stdout().lock(), std::io::stderr());
    let done = match action.as_str() {
        "decode" => containerssh::audit::decode::decode(&file, &mut out, &mut err),
        "replay" => containerssh::audit::decode::replay(&file, channel, &mut out, &mut err),
        other => return Err(format!("audit {other:?}: the actions are decode and replay").into()),
    };
    Ok(match done {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            print_chain(&e);
            ExitCode::FAILURE
        }
    })
}

fn main() -> ExitCode {
    if std::env::args_os().nth(1).is_some_and(|a| a == "audit") {
        let mut parser = lexopt::Parser::from_env();
        let _ = parser.next();
        return audit_command(parser).unwrap_or_else(|e| {
            eprintln!("containerssh: {e}\n\n{HELP}");
            ExitCode::from(2)
        });
    }
    if let Err(e) = containerssh::sandbox::close_inherited_fds() {
        eprintln!("containerssh: cannot close inherited file descriptors: {e}");
        return ExitCode::FAILURE;
    }
    containerssh::sandbox::return_large_allocations();
    let cli = match parse_cli() {
        Ok(Some(c)) => c,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("containerssh: {e}\n\n{HELP}");
            return ExitCode::from(2);
        }
    };
    if cli.hash_password {
        return hash_password();
    }
    let (raw, label) = match &cli.config {
        Some(p) => match config::load::load_file(p) {
            Ok(c) => (c, p.display().to_string()),
            Err(e) => {
                print_chain(&e);
                return ExitCode::from(2);
            }
        },
        None => (config::embedded_default(), "(embedded default)".to_string()),
    };
    if cli.dump {
        return match serde_yaml::to_string(&raw) {
            Ok(y) => {
                print!("{y}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                print_chain(&e);
                ExitCode::FAILURE
            }
        };
    }
    if cli.healthcheck {
        return healthcheck(&raw);
    }
    let settings = match containerssh::backend::build::checked_settings(&label, raw) {
        Ok(s) => s,
        Err(e) => {
            print_chain(&e);
            return ExitCode::from(2);
        }
    };
    if let Err(e) = containerssh::log::init(&settings.log, settings.config_webhook.is_some()) {
        print_chain(&e);
        return ExitCode::from(2);
    }
    for w in &settings.warnings {
        tracing::warn!(code = "CONFIG_WARNING", "{w}");
    }
    match run(settings) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            print_chain(e.as_ref());
            ExitCode::FAILURE
        }
    }
}

/// `--healthcheck`: ContainerSSH's, for container health checks (no shell in our image).
fn healthcheck(raw: &config::AppConfig) -> ExitCode {
    if !raw.health.enable {
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("containerssh: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(containerssh::metrics::http::check(&raw.health.client)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("containerssh: health check failed: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(settings: Settings) -> Result<(), Box<dyn std::error::Error>> {
    // Bind before anything else privileged-looking happens, so a busy port fails fast.
    let listener = server::listen(settings.ssh.listen)
        .map_err(|e| format!("cannot listen on {}: {e}", settings.ssh.listen))?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;

    use containerssh::metrics::http::{self as endpoints, Endpoint, Health};
    let metrics = match &settings.metrics {
        Some((served, path)) => Some((
            endpoints::bind("metrics", served.listen, &served.server)?,
            path.clone(),
        )),
        None => None,
    };
    let health_endpoint = match &settings.health {
        Some(served) => Some(endpoints::bind("health", served.listen, &served.server)?),
        None => None,
    };
    let health = Health::default();

    let backend = containerssh::backend::build::build(&settings)?;
    let prepared = Prepared::read(&settings, backend)?;

    // Everything privileged is done: confine the process before any thread exists.
    let mut writable = prepared.writable_dirs();
    writable.extend(containerssh::log::writable_dir());
    let report = containerssh::sandbox::enter(&settings.sandbox, &writable)?;
    if report.as_root {
        tracing::warn!(
            code = "SANDBOX_ROOT",
            "SERVING AS ROOT (sandbox.allowRoot: true): every capability is dropped, but files \
             and sockets owned by root stay reachable; set sandbox.user instead"
        );
    }
    if report.seccomp != SeccompMode::Enforce {
        tracing::warn!(code = "SANDBOX_SECCOMP_NOT_ENFORCED", mode = ?report.seccomp, "the seccomp filter is not enforced (sandbox.seccomp)");
    }
    tracing::info!(
        code = "SANDBOX_ENTERED",
        removed_env = report.env_removed,
        "sandbox entered: {report}"
    );

    // Password hashing threads of its own, so after the sandbox (which needs to be entered
    // single-threaded).
    let shared = prepared.into_shared(settings)?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("containerssh")
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        if let Some((bound, path)) = metrics {
            tracing::info!(
                code = "METRICS_AVAILABLE",
                "metrics at {}{path}",
                bound.addr
            );
            tokio::spawn(endpoints::serve(bound, Endpoint::Metrics { path }));
        }
        if let Some(bound) = health_endpoint {
            tracing::info!(code = "HEALTH_AVAILABLE", "health at {}", bound.addr);
            tokio::spawn(endpoints::serve(bound, Endpoint::Health(health.clone())));
        }
        shared.janitor.start_up().await;
        spawn_signal_handler(shared.shutdown.clone(), health.clone())?;
        health.running();
        tracing::info!(code = "SSH_AVAILABLE", instance = %shared.settings.instance_id, "listening on {addr}");
        let janitor = tokio::spawn(std::sync::Arc::clone(&shared.janitor).run());
        let drained = server::serve(std::sync::Arc::clone(&shared), listener).await;
        shared.janitor.finish(drained).await;
        let _ = janitor.await;
        tracing::info!(code = "CORE_STOPPED", "stopped");
        Ok::<(), Box<dyn std::error::Error>>(())
    })
}

fn spawn_signal_handler(
    token: tokio_util::sync::CancellationToken,
    health: containerssh::metrics::http::Health,
) -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            containerssh::log::reopen();
        }
    });
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!(code = "CORE_SHUTDOWN", "signal received: draining");
        health.stopping();
        token.cancel();
    });
    Ok(())
}
