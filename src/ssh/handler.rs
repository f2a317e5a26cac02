//! The russh [`Handler`]: a thin adapter. Authentication callbacks go to the
//! [`Authenticator`]; channel callbacks check the request (policy, the login's key
//! restrictions, limits), answer it at once, and hand it to the channel's lifecycle
//! (`ssh/session_channel.rs`, `ssh/forward.rs`). No callback waits on the container engine:
//! forwarding requests that need the container are answered later (russh vendor patch 0003),
//! and client data only uses up a window that is granted again as it is delivered (patch
//! 0002), so the handler never waits for a consumer either.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use russh::server::{Auth, ChannelOpenHandle, Msg, Session, VerifiedPublicKey};
use russh::{Channel, ChannelId, ChannelOpenFailure, Pty, Sig};

use super::auth::Authenticator;
use super::connection::ConnCtx;
use super::forward::{
    self as fwd, target_ok, DirectTarget, MAX_FORWARD_HOST_BYTES, MAX_FORWARD_PATH_BYTES,
};
use super::listen;
use super::program::exec_argv;
use super::session_channel::{Program, SessionChannel, X11Request};
use crate::auth::metadata::env_name_ok;
use crate::auth::webhook::{self as auth_webhook, LoginState};
use crate::backend::Terminal;
use crate::limits::{
    MAX_CHANNELS_PER_CONNECTION, MAX_COMMAND_BYTES, MAX_ENV_VALUE_BYTES, MAX_TERMINAL_DIMENSION,
    MAX_TERM_BYTES,
};

#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    #[error(transparent)]
    Ssh(#[from] russh::Error),
}

pub struct Handler {
    conn: Arc<ConnCtx>,
    auth: Authenticator,
    channels: HashMap<ChannelId, SessionChannel>,
}

impl Handler {
    pub fn new(conn: Arc<ConnCtx>) -> Self {
        Self {
            auth: Authenticator::new(Arc::clone(&conn)),
            conn,
            channels: HashMap::new(),
        }
    }

    /// Accepts a program request: the channel moves on to Starting with the program and the
    /// environment the login adds.
    fn start(
        &mut self,
        id: ChannelId,
        argv: Vec<String>,
        extra_env: Vec<String>,
        session: &mut Session,
    ) -> Result<(), HandlerError> {
        let mut env = extra_env;
        if let Some(user) = self.conn.user() {
            if let Some(opts) = &user.key_options {
                env.extend(opts.environment.iter().map(|(k, v)| format!("{k}={v}")));
            }
            env.extend(self.conn.backend().login_env(&user.metadata));
            // Last, so the operator's values win over the client's.
            let md = &user.metadata.environment;
            env.extend(md.iter().map(|(k, v)| format!("{k}={v}")));
        }
        let started = self
            .channels
            .get_mut(&id)
            .map(|ch| ch.start(Program { argv, env }));
        match started {
            Some(Ok(())) => session.channel_success(id)?,
            _ => session.channel_failure(id)?,
        }
        Ok(())
    }

    /// `security.forceCommand`, else `command=` from authorized_keys, replaces whatever the
    /// client asked, as ForceCommand and `command=` do in OpenSSH (ForceCommand wins).
    fn forced(&self, original: &str) -> Option<(Vec<String>, Vec<String>)> {
        let cmd = match &self.conn.settings().policy.force_command {
            Some(c) => c.clone(),
            None => self.conn.user()?.key_options.as_ref()?.command.clone()?,
        };
        Some((
            vec!["/bin/sh".into(), "-c".into(), cmd],
            vec![format!("SSH_ORIGINAL_COMMAND={original}")],
        ))
    }

    /// Answers a channel request with what the channel's phase says.
    fn answer<E: std::fmt::Display>(
        &self,
        id: ChannelId,
        what: &str,
        r: Result<(), E>,
        session: &mut Session,
    ) -> Result<(), HandlerError> {
        match r {
            Ok(()) => Ok(session.channel_success(id)?),
            Err(e) => {
                tracing::debug!(connection_id = %self.conn.id, request = what, reason = %e, "channel request refused");
                Ok(session.channel_failure(id)?)
            }
        }
    }
}

fn sig_name(sig: &Sig) -> String {
    match sig {
        Sig::ABRT => "ABRT".into(),
        Sig::ALRM => "ALRM".into(),
        Sig::FPE => "FPE".into(),
        Sig::HUP => "HUP".into(),
        Sig::ILL => "ILL".into(),
        Sig::INT => "INT".into(),
        Sig::KILL => "KILL".into(),
        Sig::PIPE => "PIPE".into(),
        Sig::QUIT => "QUIT".into(),
        Sig::SEGV => "SEGV".into(),
        Sig::TERM => "TERM".into(),
        Sig::USR1 => "USR1".into(),
        Sig::Custom(s) => s.chars().take(16).collect(),
    }
}

/// Which restriction of a login's key (authorized_keys options, certificate extensions) a
/// forwarding kind falls under.
#[derive(Clone, Copy)]
enum KeyRestriction {
    /// `no-port-forwarding` / no `permit-port-forwarding`: TCP and unix sockets, both ways.
    Port,
    X11,
    Agent,
}

/// Whether a forwarding kind is enabled in `security.forwarding` and allowed by the login's
/// key or certificate; logs the refusal when it is not.
fn allowed(conn: &ConnCtx, enabled: bool, what: &str, restriction: KeyRestriction) -> bool {
    if !enabled {
        tracing::info!(code = "SECURITY_FORWARDING_REFUSED", connection_id = %conn.id, kind = what, "forwarding refused: disabled in security.forwarding");
        return false;
    }
    let opts = conn.user().and_then(|u| u.key_options.as_ref());
    let denied = opts.is_some_and(|o| match restriction {
        KeyRestriction::Port => o.no_port_forwarding,
        KeyRestriction::X11 => o.no_x11_forwarding,
        KeyRestriction::Agent => o.no_agent_forwarding,
    });
    if denied {
        tracing::info!(code = "SECURITY_FORWARDING_REFUSED", connection_id = %conn.id, kind = what, "forwarding refused: the login's key or certificate does not permit it");
    }
    !denied
}

/// Whether the backend can forward at all for this login, logging why not: the agent must
/// run in the containers, and session mode has no shared container to forward into.
fn can_forward(conn: &ConnCtx, what: &str) -> bool {
    let backend = conn.backend();
    let why = if !backend.has_agent() {
        format!(
            "forwarding needs the in-container agent ({} is set)",
            backend.disable_agent_key()
        )
    } else if backend.mode() == crate::config::model::ExecutionMode::Session {
        "forwarding does not work in session mode".to_string()
    } else {
        return true;
    };
    tracing::info!(code = "SECURITY_FORWARDING_REFUSED", connection_id = %conn.id, kind = what, reason = %why, "forwarding refused");
    false
}

/// The variables a client may still set when a command is forced: locale, time zone, terminal
/// and Git's protocol version. Anything else can run code of the client's choosing before or
/// inside the forced command — `LD_PRELOAD`, `BASH_ENV`, `ENV`, `SHELLOPTS`=xtrace with `PS4`,
/// `PERL5OPT`, `NODE_OPTIONS`, `PYTHONSTARTUP`, `GIT_CONFIG_*`, … — or change what it runs
/// (`PATH`, `IFS`); a deny-list of them would never be complete.
fn forced_command_allows(name: &str) -> bool {
    name.starts_with("LC_")
        || matches!(
            name,
            "LANG" | "LANGUAGE" | "TZ" | "TERM" | "COLORTERM" | "GIT_PROTOCOL"
        )
}

fn dims_ok(cols: u32, rows: u32) -> bool {
    cols <= MAX_TERMINAL_DIMENSION && rows <= MAX_TERMINAL_DIMENSION
}

impl russh::server::Handler for Handler {
    type Error = HandlerError;

    async fn auth_none(&mut self, user: &str) -> Result<Auth, Self::Error> {
        if let Err(answer) = self.auth.begin(user, "none") {
            return Ok(answer);
        }
        Ok(self.auth.none())
    }

    async fn auth_keyboard_interactive<'a>(
        &'a mut self,
        user: &str,
        _submethods: &str,
        _response: Option<russh::server::Response<'a>>,
    ) -> Result<Auth, Self::Error> {
        if let Err(answer) = self.auth.begin(user, "keyboard-interactive") {
            return Ok(answer);
        }
        // Not offered; answered at once like any other refusal.
        Ok(self.auth.refuse())
    }

    async fn auth_publickey_offered(
        &mut self,
        user: &str,
        offer: russh::server::PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        if let Err(answer) = self.auth.begin(user, "pubkey") {
            return Ok(answer);
        }
        if self.conn.shared.trusted_cas.is_some() {
            // A certificate's offer carries only its key: the decision waits for the signed
            // attempt, where russh tells a certificate from a plain key.
            return Ok(Auth::Accept);
        }
        if self.conn.shared.authorized_keys.is_some() {
            return Ok(
                if self.auth.check_key(user, offer.public_key).await.is_some() {
                    Auth::Accept
                } else {
                    self.auth.refuse()
                },
            );
        }
        Ok(match self.auth.webhook_key(user, offer.public_key).await {
            Some(_) => Auth::Accept,
            None => self.auth.refuse(),
        })
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        if let Err(answer) = self.auth.begin(user, "pubkey") {
            return Ok(answer);
        }
        self.auth
            .attempt_key(key.public_key.to_openssh().unwrap_or_default());
        if self.conn.shared.authorized_keys.is_none()
            && self.conn.shared.webhooks.public_key.is_none()
        {
            // Only certificates are accepted.
            tracing::info!(code = "SSH_AUTH_FAILED", connection_id = %self.conn.id, user = %user.escape_debug(), "public key refused: only certificates are trusted");
            return Ok(self.auth.refuse());
        }
        if self.conn.shared.authorized_keys.is_some() {
            let Some(opts) = self.auth.check_key(user, key.public_key).await else {
                tracing::info!(code = "SSH_AUTH_FAILED", connection_id = %self.conn.id, user = %user.escape_debug(), "public key refused");
                return Ok(self.auth.refuse());
            };
            return Ok(self
                .auth
                .finish(user, Some(opts), LoginState::default(), "publickey")
                .await);
        }
        let Some(state) = self.auth.webhook_key(user, key.public_key).await else {
            return Ok(self.auth.refuse());
        };
        Ok(self.auth.finish(user, None, state, "publickey").await)
    }

    async fn auth_openssh_certificate(
        &mut self,
        user: &str,
        certificate: &russh::keys::Certificate,
    ) -> Result<Auth, Self::Error> {
        if let Err(answer) = self.auth.begin(user, "pubkey") {
            return Ok(answer);
        }
        self.auth.attempt_key(format!(
            "certificate {:?} serial {}",
            certificate.key_id(),
            certificate.serial()
        ));
        let Some(cas) = &self.conn.shared.trusted_cas else {
            return Ok(self.auth.refuse());
        };
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        let login = match cas.check(certificate, user, self.conn.peer.ip(), now) {
            Ok(l) => l,
            Err(e) => {
                tracing::info!(code = "SSH_AUTH_FAILED", connection_id = %self.conn.id, user = %user.escape_debug(), key_id = %certificate.key_id().escape_debug(), reason = %e, "certificate refused");
                return Ok(self.auth.refuse());
            }
        };
        // The webhooks see which certificate it was.
        let mut state = LoginState::default();
        let value = |v: String| auth_webhook::Value {
            value: v,
            sensitive: false,
        };
        state
            .metadata
            .insert("sshCertificateKeyId".into(), value(login.key_id.clone()));
        state.metadata.insert(
            "sshCertificatePrincipals".into(),
            value(login.principals.join(",")),
        );
        tracing::debug!(connection_id = %self.conn.id, key_id = %login.key_id.escape_debug(), "certificate accepted");
        Ok(self
            .auth
            .finish(user, Some(login.options), state, "publickey-certificate")
            .await)
    }

    async fn auth_password(&mut self, user: &str, password: &str) -> Result<Auth, Self::Error> {
        if let Err(answer) = self.auth.begin(user, "password") {
            return Ok(answer);
        }
        Ok(self.auth.password(user, password).await)
    }

    async fn auth_succeeded(&mut self, _session: &mut Session) -> Result<(), Self::Error> {
        self.conn.release_startup();
        Ok(())
    }

    async fn authentication_banner(&mut self) -> Result<Option<String>, Self::Error> {
        // Asked at the first authentication request (russh sends the banner then, as sshd
        // does): the key exchange and the service request are done.
        self.conn.handshaken.cancel();
        Ok(self.conn.shared.settings.ssh.banner.clone())
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let open = self.channels.len();
        let refused = if open >= MAX_CHANNELS_PER_CONNECTION || self.conn.cancel.is_cancelled() {
            Some(format!("{MAX_CHANNELS_PER_CONNECTION} open"))
        } else {
            // A parallel limit: closed sessions give their place back (ContainerSSH counted
            // all of them).
            match self.conn.settings().policy.max_sessions {
                Some(max) if open >= max => Some(format!("security.maxSessions ({max})")),
                _ => None,
            }
        };
        let id = channel.id();
        let opened = match refused {
            Some(why) => Err(why),
            None => SessionChannel::open(&self.conn, session.handle(), channel)
                .map_err(|e| e.to_string()),
        };
        let (ok, reason) = match &opened {
            Ok(_) => (true, String::new()),
            Err(why) => (false, why.clone()),
        };
        self.conn.audit(
            Some(id.into()),
            crate::audit::Msg::NewChannel {
                kind: "session",
                ok,
                reason,
            },
        );
        match opened {
            Ok(ch) => {
                self.channels.insert(id, ch);
                reply.accept().await;
            }
            Err(why) => {
                tracing::info!(code = "SECURITY_MAX_SESSIONS", connection_id = %self.conn.id, "session refused: {why}");
                reply.reject(ChannelOpenFailure::ResourceShortage).await;
            }
        }
        Ok(())
    }

    async fn pty_request(
        &mut self,
        id: ChannelId,
        term: &str,
        cols: u32,
        rows: u32,
        _pix_width: u32,
        _pix_height: u32,
        _modes: &[(Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let no_pty = self
            .conn
            .user()
            .and_then(|u| u.key_options.as_ref())
            .is_some_and(|o| o.no_pty);
        if no_pty || term.len() > MAX_TERM_BYTES || !dims_ok(cols, rows) {
            return Ok(session.channel_failure(id)?);
        }
        if !self.conn.settings().policy.tty {
            tracing::info!(code = "SECURITY_TTY_REJECTED", connection_id = %self.conn.id, "terminal refused: security.tty");
            return Ok(session.channel_failure(id)?);
        }
        let t = Terminal {
            term: term.to_string(),
            cols,
            rows,
        };
        let audit = crate::audit::Msg::Pty {
            term: t.term.clone(),
            cols,
            rows,
        };
        let r = match self.channels.get_mut(&id) {
            Some(ch) => ch.pty(t),
            None => return Ok(session.channel_failure(id)?),
        };
        if r.is_ok() {
            self.conn.audit(Some(id.into()), audit);
        }
        self.answer(id, "pty-req", r, session)
    }

    async fn env_request(
        &mut self,
        id: ChannelId,
        name: &str,
        value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if !env_name_ok(name) || value.len() > MAX_ENV_VALUE_BYTES || value.contains('\0') {
            return Ok(session.channel_failure(id)?);
        }
        if !forced_command_allows(name) && self.forced("").is_some() {
            tracing::info!(code = "SECURITY_ENV_REJECTED", connection_id = %self.conn.id, name = %name.escape_debug(), "environment variable refused: a command is forced");
            return Ok(session.channel_failure(id)?);
        }
        if !self.conn.settings().policy.env.allows(name) {
            tracing::info!(code = "SECURITY_ENV_REJECTED", connection_id = %self.conn.id, name = %name.escape_debug(), "environment variable refused: security.env");
            return Ok(session.channel_failure(id)?);
        }
        let r = match self.channels.get_mut(&id) {
            Some(ch) => ch.env(format!("{name}={value}")),
            None => return Ok(session.channel_failure(id)?),
        };
        if r.is_ok() {
            // A value only for the variables that cannot carry a secret (a client's SendEnv
            // may send tokens).
            let value = if forced_command_allows(name) && name != "GIT_PROTOCOL" {
                value.to_string()
            } else {
                String::new()
            };
            let name = name.to_string();
            self.conn
                .audit(Some(id.into()), crate::audit::Msg::SetEnv { name, value });
        }
        self.answer(id, "env", r, session)
    }

    async fn shell_request(
        &mut self,
        id: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.conn.audit(Some(id.into()), crate::audit::Msg::Shell);
        if let Some((argv, env)) = self.forced("") {
            return self.start(id, argv, env, session);
        }
        if !self.conn.settings().policy.shell {
            tracing::info!(code = "SECURITY_SHELL_REJECTED", connection_id = %self.conn.id, "shell refused: security.shell");
            return Ok(session.channel_failure(id)?);
        }
        let argv = self.conn.settings().shell_command().to_vec();
        self.start(id, argv, Vec::new(), session)
    }

    async fn exec_request(
        &mut self,
        id: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Ok(command) = std::str::from_utf8(data) else {
            return Ok(session.channel_failure(id)?);
        };
        if data.len() > MAX_COMMAND_BYTES || command.contains('\0') {
            return Ok(session.channel_failure(id)?);
        }
        let program = command.to_string();
        self.conn
            .audit(Some(id.into()), crate::audit::Msg::Exec { program });
        if let Some((argv, env)) = self.forced(command) {
            return self.start(id, argv, env, session);
        }
        if !self.conn.settings().policy.command.allows(command) {
            tracing::info!(code = "SECURITY_EXEC_REJECTED", connection_id = %self.conn.id, command = %command.escape_debug(), "command refused: security.command");
            return Ok(session.channel_failure(id)?);
        }
        self.start(id, exec_argv(command), Vec::new(), session)
    }

    async fn subsystem_request(
        &mut self,
        id: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let sub = name.chars().take(MAX_TERM_BYTES).collect();
        self.conn
            .audit(Some(id.into()), crate::audit::Msg::Subsystem { name: sub });
        if let Some((argv, env)) = self.forced(name) {
            return self.start(id, argv, env, session);
        }
        if !self.conn.settings().policy.subsystem.allows(name) {
            tracing::info!(code = "SECURITY_SUBSYSTEM_REJECTED", connection_id = %self.conn.id, subsystem = %name.escape_debug(), "subsystem refused: security.subsystem");
            return Ok(session.channel_failure(id)?);
        }
        let path = self.conn.settings().subsystem(name).cloned();
        match path {
            Some(p) => self.start(id, vec![p], Vec::new(), session),
            None => {
                tracing::info!(code = "SSH_CHANNEL_REQUEST_FAILED", connection_id = %self.conn.id, subsystem = %name.escape_debug(), "unknown subsystem refused");
                Ok(session.channel_failure(id)?)
            }
        }
    }

    async fn window_change_request(
        &mut self,
        id: ChannelId,
        cols: u32,
        rows: u32,
        _pix_width: u32,
        _pix_height: u32,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        match self.channels.get(&id) {
            Some(ch) if dims_ok(cols, rows) => {
                ch.resize(cols, rows);
                Ok(session.channel_success(id)?)
            }
            _ => Ok(session.channel_failure(id)?),
        }
    }

    async fn signal(
        &mut self,
        id: ChannelId,
        signal: Sig,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let name = sig_name(&signal);
        if !self.conn.settings().policy.signal.allows(&name) {
            tracing::info!(code = "SECURITY_SIGNAL_REJECTED", connection_id = %self.conn.id, signal = %name.escape_debug(), "signal refused: security.signal");
            return Ok(());
        }
        self.conn.audit(
            Some(id.into()),
            crate::audit::Msg::Signal { name: name.clone() },
        );
        if let Some(ch) = self.channels.get(&id) {
            if let Err(e) = ch.signal(name.clone()) {
                tracing::info!(code = "SSH_SIGNAL_DROPPED", connection_id = %self.conn.id, signal = %name.escape_debug(), reason = %e, "signal dropped");
            }
        }
        Ok(())
    }

    async fn data(
        &mut self,
        id: ChannelId,
        data: &[u8],
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(ch) = self.channels.get(&id) {
            ch.data(data);
        } else if let Some(f) = self.conn.forwards.entry(id) {
            f.stdin.push(data);
        }
        Ok(())
    }

    async fn channel_eof(
        &mut self,
        id: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(ch) = self.channels.get(&id) {
            ch.eof();
        } else if let Some(f) = self.conn.forwards.entry(id) {
            f.stdin.eof();
        }
        Ok(())
    }

    async fn channel_close(
        &mut self,
        id: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(ch) = self.channels.remove(&id) {
            self.conn.audit(Some(id.into()), crate::audit::Msg::Close);
            ch.close();
        } else if let Some(f) = self.conn.forwards.remove(id) {
            f.closed.cancel();
            f.stdin.eof();
        }
        Ok(())
    }

    async fn channel_open_confirmation(
        &mut self,
        id: ChannelId,
        _max_packet_size: u32,
        _window_size: u32,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        // Only forwarding opens channels towards the client; one whose open we gave up on is
        // closed again.
        if !self
            .conn
            .forwards
            .confirmed(&self.conn, id, session.handle())
        {
            tracing::info!(code = "FORWARD_LATE_CONFIRMATION", connection_id = %self.conn.id, channel = %id, "a forwarded channel confirmed after its open was abandoned: closed");
            session.close(id)?;
        }
        Ok(())
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host_to_connect: &str,
        port_to_connect: u32,
        originator_address: &str,
        originator_port: u32,
        reply: ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let enabled = self.conn.settings().forwarding.local_tcp;
        let port = u16::try_from(port_to_connect).ok();
        match port {
            Some(port)
                if allowed(&self.conn, enabled, "direct-tcpip", KeyRestriction::Port)
                    && can_forward(&self.conn, "direct-tcpip")
                    && target_ok(host_to_connect, MAX_FORWARD_HOST_BYTES) =>
            {
                let target = DirectTarget::Tcp {
                    host: host_to_connect.to_string(),
                    port,
                };
                self.conn.audit(
                    Some(channel.id().into()),
                    crate::audit::Msg::DirectTcp {
                        host: host_to_connect.to_string(),
                        port: port_to_connect,
                        from_host: originator_address
                            .chars()
                            .take(MAX_FORWARD_HOST_BYTES)
                            .collect(),
                        from_port: originator_port,
                    },
                );
                fwd::open_direct(&self.conn, session.handle(), channel, reply, target);
            }
            _ => {
                reply
                    .reject(ChannelOpenFailure::AdministrativelyProhibited)
                    .await
            }
        }
        Ok(())
    }

    async fn channel_open_direct_streamlocal(
        &mut self,
        channel: Channel<Msg>,
        socket_path: &str,
        reply: ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let enabled = self.conn.settings().forwarding.local_socket;
        if allowed(
            &self.conn,
            enabled,
            "direct-streamlocal",
            KeyRestriction::Port,
        ) && can_forward(&self.conn, "direct-streamlocal")
            && target_ok(socket_path, MAX_FORWARD_PATH_BYTES)
        {
            let target = DirectTarget::Unix {
                path: socket_path.to_string(),
            };
            self.conn.audit(
                Some(channel.id().into()),
                crate::audit::Msg::DirectUnix {
                    path: socket_path.to_string(),
                },
            );
            fwd::open_direct(&self.conn, session.handle(), channel, reply, target);
        } else {
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
        }
        Ok(())
    }

    async fn tcpip_forward(
        &mut self,
        address: &str,
        port: &mut u32,
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let enabled = self.conn.settings().forwarding.remote_tcp;
        let Ok(port16) = u16::try_from(*port) else {
            return Ok(false);
        };
        // An empty address means all interfaces (RFC 4254).
        let address_ok = address.is_empty() || target_ok(address, MAX_FORWARD_HOST_BYTES);
        if !allowed(&self.conn, enabled, "tcpip-forward", KeyRestriction::Port)
            || !can_forward(&self.conn, "tcpip-forward")
            || !address_ok
        {
            return Ok(false);
        }
        self.conn.audit(
            None,
            crate::audit::Msg::ForwardTcp {
                host: address.to_string(),
                port: *port,
                cancel: false,
            },
        );
        // Answered when the container listens; what this returns is not sent.
        let reply = session.defer_global_reply();
        listen::listen_tcp(&self.conn, address.to_string(), port16, reply);
        Ok(true)
    }

    async fn cancel_tcpip_forward(
        &mut self,
        address: &str,
        port: u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let cancelled = listen::cancel_tcp(&self.conn, address, port);
        if cancelled {
            let host = address.to_string();
            let msg = crate::audit::Msg::ForwardTcp {
                host,
                port,
                cancel: true,
            };
            self.conn.audit(None, msg);
        }
        Ok(cancelled)
    }

    async fn streamlocal_forward(
        &mut self,
        socket_path: &str,
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let enabled = self.conn.settings().forwarding.remote_socket;
        if !allowed(
            &self.conn,
            enabled,
            "streamlocal-forward",
            KeyRestriction::Port,
        ) || !can_forward(&self.conn, "streamlocal-forward")
            || !target_ok(socket_path, MAX_FORWARD_PATH_BYTES)
        {
            return Ok(false);
        }
        self.conn.audit(
            None,
            crate::audit::Msg::ForwardUnix {
                path: socket_path.to_string(),
                cancel: false,
            },
        );
        let reply = session.defer_global_reply();
        listen::listen_unix(&self.conn, socket_path.to_string(), reply);
        Ok(true)
    }

    async fn cancel_streamlocal_forward(
        &mut self,
        socket_path: &str,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let cancelled = listen::cancel_unix(&self.conn, socket_path);
        if cancelled {
            let path = socket_path.to_string();
            let msg = crate::audit::Msg::ForwardUnix { path, cancel: true };
            self.conn.audit(None, msg);
        }
        Ok(cancelled)
    }

    /// Accepted from cheap checks alone; the display is set up by the channel's task before
    /// its program starts (a failure then is reported on the session's stderr).
    async fn x11_request(
        &mut self,
        id: ChannelId,
        _single_connection: bool,
        x11_auth_protocol: &str,
        x11_auth_cookie: &str,
        x11_screen_number: u32,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let enabled = self.conn.settings().forwarding.x11;
        let cookie = hex::decode(x11_auth_cookie).ok().filter(|c| c.len() <= 256);
        let (Some(cookie), true, true, true) = (
            cookie,
            allowed(&self.conn, enabled, "x11", KeyRestriction::X11),
            can_forward(&self.conn, "x11"),
            x11_auth_protocol == "MIT-MAGIC-COOKIE-1",
        ) else {
            return Ok(session.channel_failure(id)?);
        };
        let req = X11Request {
            screen: x11_screen_number.min(1000),
            protocol: x11_auth_protocol.to_string(),
            cookie,
        };
        let screen = req.screen;
        let r = match self.channels.get_mut(&id) {
            Some(ch) => ch.x11(req),
            None => return Ok(session.channel_failure(id)?),
        };
        if r.is_ok() {
            self.conn
                .audit(Some(id.into()), crate::audit::Msg::X11Request { screen });
        }
        self.answer(id, "x11-req", r, session)
    }

    /// As `x11-req`: accepted from cheap checks, the socket made before the program starts.
    async fn agent_request(
        &mut self,
        id: ChannelId,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let enabled = self.conn.settings().forwarding.agent;
        if !allowed(&self.conn, enabled, "auth-agent", KeyRestriction::Agent)
            || !can_forward(&self.conn, "auth-agent")
        {
            return Ok(false);
        }
        Ok(match self.channels.get_mut(&id) {
            Some(ch) => ch.agent().is_ok(),
            None => false,
        })
    }
}
