//! The russh [`Handler`]: a thin adapter. It authenticates, answers each channel request at
//! once (success or failure, from cheap checks only), and turns accepted requests into events
//! for the channel's own task. Nothing here waits on the container engine.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use russh::keys::PublicKey;
use russh::server::{Auth, ChannelOpenHandle, Msg, Session, VerifiedPublicKey};
use russh::{Channel, ChannelId, ChannelOpenFailure, Pty, Sig};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::channel::{self, ChannelEvent};
use super::conn::{AuthedUser, ConnCtx};
use super::forward::{self as fwd, DirectTarget};
use super::program::exec_argv;
use super::stdin::{self, Overflow, StdinTx};
use crate::auth::authorized_keys::KeyOptions;
use crate::auth::metadata::{env_name_ok, LoginMetadata};
use crate::auth::webhook::{self as auth_webhook, LoginState, Peer, Verdict};
use crate::backend::Terminal;
use crate::limits::{
    CHANNEL_EVENT_QUEUE, MAX_CHANNELS_PER_CONNECTION, MAX_COMMAND_BYTES, MAX_ENV_VALUE_BYTES,
    MAX_ENV_VARS, MAX_TERMINAL_DIMENSION, MAX_TERM_BYTES,
};

/// Longest host name or socket path accepted in a forwarding request.
const MAX_FORWARD_TARGET_BYTES: usize = 1024;
/// Public keys whose webhook answer is kept between the offer and the signed attempt.
const MAX_PUBKEY_ANSWERS: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    #[error(transparent)]
    Ssh(#[from] russh::Error),
    #[error(transparent)]
    StdinOverflow(#[from] Overflow),
}

struct ChannelEntry {
    events: mpsc::Sender<ChannelEvent>,
    stdin: StdinTx,
    /// Cancelled when the client closes the channel.
    closed: CancellationToken,
    started: bool,
    pty: bool,
    x11: bool,
    agent: bool,
    env_count: usize,
}

pub struct Handler {
    conn: Arc<ConnCtx>,
    channels: HashMap<ChannelId, ChannelEntry>,
    /// The auth webhook's answers for public keys offered on this connection (`None`:
    /// refused), so that the signed attempt after an offer costs no second call.
    pubkey_answers: HashMap<String, Option<LoginState>>,
    /// The user name of the first authentication request (it may not change, as in sshd).
    auth_user: Option<String>,
    /// Authentication requests seen (callbacks, so a signed key after its offer counts twice:
    /// only "is this the first" matters).
    auth_requests: u32,
    /// Refusals counted towards `ssh.maxAuthTries`.
    auth_failures: u32,
}

impl Handler {
    pub fn new(conn: Arc<ConnCtx>) -> Self {
        Self {
            conn,
            channels: HashMap::new(),
            pubkey_answers: HashMap::new(),
            auth_user: None,
            auth_requests: 0,
            auth_failures: 0,
        }
    }

    /// The answer to a refused request: every configured method stays offered (russh's
    /// `Auth::reject()` would drop the one just tried, locking out a user who mistyped).
    fn rejection(&self) -> Auth {
        Auth::Reject {
            proceed_with_methods: Some(self.conn.shared.ssh.methods.clone()),
            partial_success: false,
        }
    }

    /// Every authentication callback starts here. `Err` carries the answer when the user name
    /// changed between requests: sshd disconnects then, and so do we (a login's state must
    /// never carry over to another user).
    fn begin_auth(&mut self, user: &str) -> Result<(), Auth> {
        self.auth_requests += 1;
        match &self.auth_user {
            None => {
                self.auth_user = Some(user.to_string());
                Ok(())
            }
            Some(first) if first == user => Ok(()),
            Some(first) => {
                tracing::info!(connection_id = %self.conn.id, first = %first.escape_debug(), user = %user.escape_debug(), "the user name changed between authentication requests: disconnecting");
                self.conn.disconnect(
                    russh::Disconnect::ProtocolError,
                    "Change of username or service not allowed",
                );
                Err(self.rejection())
            }
        }
    }

    /// A refused attempt, counted as sshd counts them (every method together); at
    /// `ssh.maxAuthTries` the client is disconnected with the reason.
    fn refuse(&mut self) -> Auth {
        self.auth_failures += 1;
        self.conn.auth_failed();
        let max = self.conn.shared.settings.max_auth_tries;
        if self.auth_failures >= max {
            tracing::info!(connection_id = %self.conn.id, user = %self.auth_user.as_deref().unwrap_or("").escape_debug(), failures = self.auth_failures, "too many authentication failures (ssh.maxAuthTries): disconnecting");
            self.conn.disconnect(
                russh::Disconnect::NoMoreAuthMethodsAvailable,
                "Too many authentication failures",
            );
        }
        self.rejection()
    }

    fn peer(&self) -> Peer {
        Peer {
            connection_id: self.conn.id.clone(),
            remote_address: self.conn.peer.to_string(),
            client_version: self.conn.hello.version.get().cloned().unwrap_or_default(),
        }
    }

    /// Asks the public-key webhook (once per user and key on this connection).
    async fn webhook_key(&mut self, user: &str, key: &PublicKey) -> Option<LoginState> {
        let hook = self.conn.shared.webhooks.public_key.clone()?;
        let Ok(text) = key.to_openssh() else {
            return None;
        };
        // authorized_keys form without a comment.
        let text: String = text.split(' ').take(2).collect::<Vec<_>>().join(" ");
        let cache_key = format!("{user}\0{text}");
        if let Some(answer) = self.pubkey_answers.get(&cache_key) {
            return answer.clone();
        }
        let answer = match auth_webhook::public_key(&hook, user, &text, &self.peer()).await {
            Ok(Verdict::Allowed(state)) => Some(state),
            Ok(Verdict::Denied) => {
                tracing::info!(connection_id = %self.conn.id, user = %user.escape_debug(), "public key refused by the auth webhook");
                None
            }
            Err(e) => {
                tracing::warn!(connection_id = %self.conn.id, user = %user.escape_debug(), error = %e, "auth webhook failed: public key refused");
                None
            }
        };
        if self.pubkey_answers.len() < MAX_PUBKEY_ANSWERS {
            self.pubkey_answers.insert(cache_key, answer.clone());
        }
        answer
    }

    /// Merges the config webhook's configuration onto the file's: the login's own settings and
    /// backend, not yet applied.
    fn login_config(
        &self,
        user: &str,
        overlay: &serde_json::Value,
    ) -> Result<(Arc<crate::config::Settings>, Arc<crate::backend::Backend>), String> {
        let shared = &self.conn.shared;
        let label = format!("config webhook answer for {}", user.escape_debug());
        let settings = crate::config::merge::merge(&label, &shared.settings.file, overlay)
            .map_err(|e| e.to_string())?;
        let settings = Arc::new(settings);
        let backend = shared.backend.for_login(&shared.settings, &settings)?;
        Ok((settings, backend))
    }

    /// After a successful authentication: the authz webhook (when configured), the config
    /// webhook, then the login's metadata; the connection is authenticated as the webhook's
    /// `authenticatedUsername` when it names one. Nothing is applied to the connection until
    /// the last check that can refuse the login has passed.
    async fn finish_login(
        &mut self,
        user: &str,
        key_options: Option<KeyOptions>,
        mut state: LoginState,
        method: &'static str,
    ) -> Auth {
        if let Some(hook) = self.conn.shared.webhooks.authz.clone() {
            match auth_webhook::authz(&hook, user, state, &self.peer()).await {
                Ok(Verdict::Allowed(s)) => state = s,
                Ok(Verdict::Denied) => {
                    tracing::info!(connection_id = %self.conn.id, user = %user.escape_debug(), method, "login refused by the authz webhook");
                    return self.refuse();
                }
                Err(e) => {
                    tracing::warn!(connection_id = %self.conn.id, user = %user.escape_debug(), error = %e, "authz webhook failed: login refused");
                    return self.refuse();
                }
            }
        }
        let mut profile = None;
        if let Some(hook) = self.conn.shared.webhooks.config.clone() {
            let sensitive = self.conn.shared.settings.transmit_sensitive_metadata;
            match auth_webhook::config(&hook, user, state, &self.peer(), sensitive).await {
                Ok((s, overlay)) => {
                    state = s;
                    if let Some(overlay) = overlay {
                        match self.login_config(user, &overlay) {
                            Ok(p) => profile = Some(p),
                            Err(e) => {
                                tracing::warn!(connection_id = %self.conn.id, user = %user.escape_debug(), error = %e, "login refused: the config webhook's configuration cannot be used");
                                return self.refuse();
                            }
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(connection_id = %self.conn.id, user = %user.escape_debug(), error = %e, "config webhook failed: login refused");
                    return self.refuse();
                }
            }
        }
        let name = if state.authenticated_username.is_empty() {
            user.to_string()
        } else {
            state.authenticated_username.clone()
        };
        let Some(base) = self.metadata(&name).await else {
            return self.refuse();
        };
        // Every check has passed: from here on the login is what the connection runs with.
        let metadata = Arc::new(state.apply(&base));
        if let Some((settings, backend)) = profile {
            if settings.log.level != self.conn.shared.settings.log.level {
                crate::log::set_connection_level(&self.conn.id, settings.log.level);
            }
            tracing::debug!(connection_id = %self.conn.id, backend = ?settings.backend, mode = ?settings.mode(), "per-login configuration");
            self.conn.set_profile(settings, backend);
        }
        tracing::info!(connection_id = %self.conn.id, user = %user.escape_debug(), authenticated_as = %name.escape_debug(), method, "authenticated");
        self.conn.authenticated(AuthedUser {
            name,
            key_options,
            metadata,
        });
        Auth::Accept
    }

    fn check_key(&self, user: &str, key: &PublicKey) -> Option<KeyOptions> {
        let ak = self.conn.shared.authorized_keys.as_ref()?;
        match ak.find(user, key, self.conn.peer.ip(), SystemTime::now()) {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!(connection_id = %self.conn.id, error = %e, "cannot read authorized keys");
                None
            }
        }
    }

    /// The login's environment and files; `None` (login refused, reason logged) when a file
    /// cannot be read: a login never starts without what the operator configured for it.
    async fn metadata(&self, user: &str) -> Option<Arc<LoginMetadata>> {
        let template = &self.conn.shared.settings.metadata;
        let resolved = if template.has_files() {
            let (t, u) = (template.clone(), user.to_string());
            tokio::task::spawn_blocking(move || t.resolve(&u))
                .await
                .unwrap_or_else(|_| Err("file reader failed".into()))
        } else {
            template.resolve(user)
        };
        match resolved {
            Ok(m) => Some(Arc::new(m)),
            Err(e) => {
                tracing::warn!(connection_id = %self.conn.id, user = %user.escape_debug(), error = %e, "login refused: auth.metadata");
                None
            }
        }
    }

    /// Sends an event to the channel's task; a task that has ended simply drops it.
    async fn send(&self, id: ChannelId, ev: ChannelEvent) {
        if let Some(ch) = self.channels.get(&id) {
            let _ = ch.events.send(ev).await;
        }
    }

    /// Accepts a program request: marks the channel started and hands the program over.
    fn start(
        &mut self,
        id: ChannelId,
        argv: Vec<String>,
        extra_env: Vec<String>,
        session: &mut Session,
    ) -> Result<(), HandlerError> {
        let Some(ch) = self.channels.get_mut(&id) else {
            return Ok(session.channel_failure(id)?);
        };
        if ch.started {
            return Ok(session.channel_failure(id)?);
        }
        ch.started = true;
        let mut env = extra_env;
        if let Some(user) = self.conn.user() {
            if let Some(opts) = &user.key_options {
                env.extend(opts.environment.iter().map(|(k, v)| format!("{k}={v}")));
            }
            let settings = self.conn.settings();
            if settings.backend == crate::config::model::BackendName::Docker
                && settings.docker.execution.expose_auth_metadata_as_env
            {
                let values = &user.metadata.values;
                env.extend(
                    values
                        .iter()
                        .filter(|(k, _)| env_name_ok(k))
                        .map(|(k, v)| format!("{k}={v}")),
                );
            }
            // Last, so the operator's values win over the client's.
            let md = &user.metadata.environment;
            env.extend(md.iter().map(|(k, v)| format!("{k}={v}")));
        }
        // The queue is empty before a start (only ≤ MAX_ENV_VARS + 2 events precede it).
        if ch
            .events
            .try_send(ChannelEvent::Start { argv, env })
            .is_err()
        {
            return Ok(session.channel_failure(id)?);
        }
        Ok(session.channel_success(id)?)
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
        tracing::info!(connection_id = %conn.id, kind = what, "forwarding refused: disabled in security.forwarding");
        return false;
    }
    let opts = conn.user().and_then(|u| u.key_options.as_ref());
    let denied = opts.is_some_and(|o| match restriction {
        KeyRestriction::Port => o.no_port_forwarding,
        KeyRestriction::X11 => o.no_x11_forwarding,
        KeyRestriction::Agent => o.no_agent_forwarding,
    });
    if denied {
        tracing::info!(connection_id = %conn.id, kind = what, "forwarding refused: the login's key or certificate does not permit it");
    }
    !denied
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

fn target_ok(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_FORWARD_TARGET_BYTES && !s.contains('\0')
}

fn dims_ok(cols: u32, rows: u32) -> bool {
    cols <= MAX_TERMINAL_DIMENSION && rows <= MAX_TERMINAL_DIMENSION
}

impl russh::server::Handler for Handler {
    type Error = HandlerError;

    async fn auth_none(&mut self, user: &str) -> Result<Auth, Self::Error> {
        if let Err(answer) = self.begin_auth(user) {
            return Ok(answer);
        }
        // Clients open with a `none` probe for the method list; like sshd, only a later one
        // counts as a failed attempt.
        Ok(if self.auth_requests == 1 {
            self.rejection()
        } else {
            self.refuse()
        })
    }

    async fn auth_keyboard_interactive<'a>(
        &'a mut self,
        user: &str,
        _submethods: &str,
        _response: Option<russh::server::Response<'a>>,
    ) -> Result<Auth, Self::Error> {
        if let Err(answer) = self.begin_auth(user) {
            return Ok(answer);
        }
        // Not offered; answered at once like any other refusal.
        Ok(self.refuse())
    }

    async fn auth_publickey_offered(
        &mut self,
        user: &str,
        offer: russh::server::PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        if let Err(answer) = self.begin_auth(user) {
            return Ok(answer);
        }
        if self.conn.shared.trusted_cas.is_some() {
            // A certificate's offer carries only its key: the decision waits for the signed
            // attempt, where russh tells a certificate from a plain key.
            return Ok(Auth::Accept);
        }
        if self.conn.shared.authorized_keys.is_some() {
            return Ok(if self.check_key(user, offer.public_key).is_some() {
                Auth::Accept
            } else {
                self.refuse()
            });
        }
        Ok(match self.webhook_key(user, offer.public_key).await {
            Some(_) => Auth::Accept,
            None => self.refuse(),
        })
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        if let Err(answer) = self.begin_auth(user) {
            return Ok(answer);
        }
        if self.conn.shared.authorized_keys.is_none()
            && self.conn.shared.webhooks.public_key.is_none()
        {
            // Only certificates are accepted.
            tracing::info!(connection_id = %self.conn.id, user = %user.escape_debug(), "public key refused: only certificates are trusted");
            return Ok(self.refuse());
        }
        if self.conn.shared.authorized_keys.is_some() {
            let Some(opts) = self.check_key(user, key.public_key) else {
                tracing::info!(connection_id = %self.conn.id, user = %user.escape_debug(), "public key refused");
                return Ok(self.refuse());
            };
            return Ok(self
                .finish_login(user, Some(opts), LoginState::default(), "publickey")
                .await);
        }
        let Some(state) = self.webhook_key(user, key.public_key).await else {
            return Ok(self.refuse());
        };
        Ok(self.finish_login(user, None, state, "publickey").await)
    }

    async fn auth_openssh_certificate(
        &mut self,
        user: &str,
        certificate: &russh::keys::Certificate,
    ) -> Result<Auth, Self::Error> {
        if let Err(answer) = self.begin_auth(user) {
            return Ok(answer);
        }
        let Some(cas) = &self.conn.shared.trusted_cas else {
            return Ok(self.refuse());
        };
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        let login = match cas.check(certificate, user, self.conn.peer.ip(), now) {
            Ok(l) => l,
            Err(e) => {
                tracing::info!(connection_id = %self.conn.id, user = %user.escape_debug(), key_id = %certificate.key_id().escape_debug(), reason = %e, "certificate refused");
                return Ok(self.refuse());
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
            .finish_login(user, Some(login.options), state, "publickey-certificate")
            .await)
    }

    async fn auth_password(&mut self, user: &str, password: &str) -> Result<Auth, Self::Error> {
        if let Err(answer) = self.begin_auth(user) {
            return Ok(answer);
        }
        let Some(checker) = self.conn.shared.passwords.as_ref() else {
            let Some(hook) = self.conn.shared.webhooks.password.clone() else {
                return Ok(self.refuse());
            };
            let pw = zeroize_string(password);
            let verdict = auth_webhook::password(&hook, user, pw.as_bytes(), &self.peer()).await;
            drop(pw);
            return Ok(match verdict {
                Ok(Verdict::Allowed(state)) => {
                    self.finish_login(user, None, state, "password").await
                }
                Ok(Verdict::Denied) => {
                    tracing::info!(connection_id = %self.conn.id, user = %user.escape_debug(), "password refused by the auth webhook");
                    self.refuse()
                }
                Err(e) => {
                    tracing::warn!(connection_id = %self.conn.id, user = %user.escape_debug(), error = %e, "auth webhook failed: password refused");
                    self.refuse()
                }
            });
        };
        match checker.verify(user, password.as_bytes()).await {
            Ok(true) => Ok(self
                .finish_login(user, None, LoginState::default(), "password")
                .await),
            Ok(false) => {
                tracing::info!(connection_id = %self.conn.id, user = %user.escape_debug(), "password refused");
                Ok(self.refuse())
            }
            Err(e) => {
                tracing::warn!(connection_id = %self.conn.id, error = %e, "cannot check password");
                Ok(self.refuse())
            }
        }
    }

    async fn auth_succeeded(&mut self, _session: &mut Session) -> Result<(), Self::Error> {
        self.conn.release_startup();
        Ok(())
    }

    async fn authentication_banner(&mut self) -> Result<Option<String>, Self::Error> {
        // Asked at the first authentication request (russh sends the banner then, as sshd
        // does): the key exchange and the service request are done.
        self.conn.handshaken.cancel();
        Ok(self.conn.shared.settings.banner.clone())
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if self.channels.len() >= MAX_CHANNELS_PER_CONNECTION || self.conn.cancel.is_cancelled() {
            reply
                .reject(russh::ChannelOpenFailure::ResourceShortage)
                .await;
            return Ok(());
        }
        // A parallel limit: closed sessions give their place back (ContainerSSH counted all).
        if let Some(max) = self.conn.settings().policy.max_sessions {
            if self.channels.len() >= max {
                tracing::info!(connection_id = %self.conn.id, max, "session refused: security.maxSessions");
                reply
                    .reject(russh::ChannelOpenFailure::ResourceShortage)
                    .await;
                return Ok(());
            }
        }
        let id = channel.id();
        // Requests and data reach us through the callbacks below; the read half is dropped so
        // russh never blocks on it.
        let (_read, write) = channel.split();
        let (events_tx, events_rx) = mpsc::channel(CHANNEL_EVENT_QUEUE);
        let (stdin_tx, stdin_rx) = stdin::stdin_queue();
        let closed = CancellationToken::new();
        self.channels.insert(
            id,
            ChannelEntry {
                events: events_tx,
                stdin: stdin_tx,
                closed: closed.clone(),
                started: false,
                pty: false,
                x11: false,
                agent: false,
                env_count: 0,
            },
        );
        reply.accept().await;
        let conn = Arc::clone(&self.conn);
        self.conn.tasks.spawn(channel::run(
            conn,
            session.handle(),
            write,
            events_rx,
            stdin_rx,
            closed,
        ));
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
        let Some(ch) = self.channels.get_mut(&id) else {
            return Ok(session.channel_failure(id)?);
        };
        if no_pty || ch.started || ch.pty || term.len() > MAX_TERM_BYTES || !dims_ok(cols, rows) {
            return Ok(session.channel_failure(id)?);
        }
        if !self.conn.settings().policy.tty {
            tracing::info!(connection_id = %self.conn.id, "terminal refused: security.tty");
            return Ok(session.channel_failure(id)?);
        }
        ch.pty = true;
        let t = Terminal {
            term: term.to_string(),
            cols,
            rows,
        };
        self.send(id, ChannelEvent::Pty(t)).await;
        Ok(session.channel_success(id)?)
    }

    async fn env_request(
        &mut self,
        id: ChannelId,
        name: &str,
        value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let forced = !forced_command_allows(name) && self.forced("").is_some();
        let Some(ch) = self.channels.get_mut(&id) else {
            return Ok(session.channel_failure(id)?);
        };
        if ch.started
            || ch.env_count >= MAX_ENV_VARS
            || !env_name_ok(name)
            || value.len() > MAX_ENV_VALUE_BYTES
            || value.contains('\0')
        {
            return Ok(session.channel_failure(id)?);
        }
        if forced {
            tracing::info!(connection_id = %self.conn.id, name = %name.escape_debug(), "environment variable refused: a command is forced");
            return Ok(session.channel_failure(id)?);
        }
        if !self.conn.settings().policy.env.allows(name) {
            tracing::info!(connection_id = %self.conn.id, name = %name.escape_debug(), "environment variable refused: security.env");
            return Ok(session.channel_failure(id)?);
        }
        ch.env_count += 1;
        self.send(id, ChannelEvent::Env(format!("{name}={value}")))
            .await;
        Ok(session.channel_success(id)?)
    }

    async fn shell_request(
        &mut self,
        id: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some((argv, env)) = self.forced("") {
            return self.start(id, argv, env, session);
        }
        if !self.conn.settings().policy.shell {
            tracing::info!(connection_id = %self.conn.id, "shell refused: security.shell");
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
        if let Some((argv, env)) = self.forced(command) {
            return self.start(id, argv, env, session);
        }
        if !self.conn.settings().policy.command.allows(command) {
            tracing::info!(connection_id = %self.conn.id, command = %command.escape_debug(), "command refused: security.command");
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
        if let Some((argv, env)) = self.forced(name) {
            return self.start(id, argv, env, session);
        }
        if !self.conn.settings().policy.subsystem.allows(name) {
            tracing::info!(connection_id = %self.conn.id, subsystem = %name.escape_debug(), "subsystem refused: security.subsystem");
            return Ok(session.channel_failure(id)?);
        }
        let path = self.conn.settings().subsystem(name).cloned();
        match path {
            Some(p) => self.start(id, vec![p], Vec::new(), session),
            None => {
                tracing::info!(connection_id = %self.conn.id, subsystem = %name.escape_debug(), "unknown subsystem refused");
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
        if !dims_ok(cols, rows) {
            return Ok(session.channel_failure(id)?);
        }
        self.send(id, ChannelEvent::Resize { cols, rows }).await;
        Ok(session.channel_success(id)?)
    }

    async fn signal(
        &mut self,
        id: ChannelId,
        signal: Sig,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let name = sig_name(&signal);
        if !self.conn.settings().policy.signal.allows(&name) {
            tracing::info!(connection_id = %self.conn.id, signal = %name.escape_debug(), "signal refused: security.signal");
            return Ok(());
        }
        self.send(id, ChannelEvent::Signal(name)).await;
        Ok(())
    }

    async fn data(
        &mut self,
        id: ChannelId,
        data: &[u8],
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(ch) = self.channels.get(&id) {
            if let Err(e) = ch.stdin.push(data).await {
                tracing::warn!(connection_id = %self.conn.id, error = %e, "disconnecting");
                return Err(e.into());
            }
        } else if let Some(f) = self.conn.forwards.entry(id) {
            if let Err(e) = f.stdin.push(data).await {
                tracing::warn!(connection_id = %self.conn.id, error = %e, "disconnecting");
                return Err(e.into());
            }
        }
        Ok(())
    }

    async fn channel_eof(
        &mut self,
        id: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(ch) = self.channels.get(&id) {
            if ch.pty {
                // As sshd: the client's EOF does not close a terminal (closing it would hang
                // the program up and lose its output, e.g. `ssh -tt host cmd </dev/null`);
                // on a terminal, end of input is the user's ^D.
                tracing::debug!(connection_id = %self.conn.id, "EOF on a terminal session: the terminal stays open");
            } else {
                ch.stdin.eof();
            }
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
            ch.closed.cancel();
            ch.stdin.eof();
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
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        // Only forwarding opens channels towards the client.
        self.conn.forwards.confirmed(id);
        Ok(())
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host_to_connect: &str,
        port_to_connect: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let enabled = self.conn.settings().forwarding.local_tcp;
        let port = u16::try_from(port_to_connect).ok();
        match port {
            Some(port)
                if allowed(&self.conn, enabled, "direct-tcpip", KeyRestriction::Port)
                    && target_ok(host_to_connect) =>
            {
                let target = DirectTarget::Tcp {
                    host: host_to_connect.to_string(),
                    port,
                };
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
        ) && target_ok(socket_path)
        {
            let target = DirectTarget::Unix {
                path: socket_path.to_string(),
            };
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
        if !allowed(&self.conn, enabled, "tcpip-forward", KeyRestriction::Port)
            || address.len() > MAX_FORWARD_TARGET_BYTES
        {
            return Ok(false);
        }
        match fwd::listen_tcp(&self.conn, &session.handle(), address, *port).await {
            Ok(bound) => {
                tracing::info!(connection_id = %self.conn.id, address = %address.escape_debug(), port = bound, "remote forwarding listener opened in the container");
                *port = bound;
                Ok(true)
            }
            Err(e) => {
                tracing::info!(connection_id = %self.conn.id, error = %e, "remote forwarding refused");
                Ok(false)
            }
        }
    }

    async fn cancel_tcpip_forward(
        &mut self,
        address: &str,
        port: u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        Ok(fwd::cancel_tcp(&self.conn, address, port))
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
        ) || !target_ok(socket_path)
        {
            return Ok(false);
        }
        match fwd::listen_unix(&self.conn, &session.handle(), socket_path).await {
            Ok(()) => Ok(true),
            Err(e) => {
                tracing::info!(connection_id = %self.conn.id, error = %e, "remote socket forwarding refused");
                Ok(false)
            }
        }
    }

    async fn cancel_streamlocal_forward(
        &mut self,
        socket_path: &str,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        Ok(fwd::cancel_unix(&self.conn, socket_path))
    }

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
        let fresh = self
            .channels
            .get(&id)
            .is_some_and(|ch| !ch.started && !ch.x11);
        let (Some(cookie), true, true, true) = (
            cookie,
            fresh,
            allowed(&self.conn, enabled, "x11", KeyRestriction::X11),
            x11_auth_protocol == "MIT-MAGIC-COOKIE-1",
        ) else {
            return Ok(session.channel_failure(id)?);
        };
        match fwd::listen_x11(&self.conn, &session.handle()).await {
            Ok(display) => {
                if let Some(ch) = self.channels.get_mut(&id) {
                    ch.x11 = true;
                }
                let ev = ChannelEvent::X11 {
                    display,
                    screen: x11_screen_number.min(1000),
                    protocol: x11_auth_protocol.to_string(),
                    cookie,
                };
                self.send(id, ev).await;
                Ok(session.channel_success(id)?)
            }
            Err(e) => {
                tracing::info!(connection_id = %self.conn.id, error = %e, "X11 forwarding refused");
                Ok(session.channel_failure(id)?)
            }
        }
    }

    async fn agent_request(
        &mut self,
        id: ChannelId,
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let enabled = self.conn.settings().forwarding.agent;
        let fresh = self
            .channels
            .get(&id)
            .is_some_and(|ch| !ch.started && !ch.agent);
        if !fresh || !allowed(&self.conn, enabled, "auth-agent", KeyRestriction::Agent) {
            return Ok(false);
        }
        match fwd::agent_socket(&self.conn, &session.handle()).await {
            Ok(path) => {
                if let Some(ch) = self.channels.get_mut(&id) {
                    ch.agent = true;
                }
                self.send(id, ChannelEvent::Env(format!("SSH_AUTH_SOCK={path}")))
                    .await;
                Ok(true)
            }
            Err(e) => {
                tracing::info!(connection_id = %self.conn.id, error = %e, "agent forwarding refused");
                Ok(false)
            }
        }
    }
}

/// Copies the password so it can move to the hashing thread; the copy is wiped on drop.
fn zeroize_string(s: &str) -> Secret {
    Secret(s.as_bytes().to_vec())
}

struct Secret(Vec<u8>);

impl Secret {
    fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        self.0.iter_mut().for_each(|b| *b = 0);
    }
}
