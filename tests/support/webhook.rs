//! A strict test server for ContainerSSH's authentication webhooks (`/password`, `/pubkey`,
//! `/authz`) and its config webhook (a path ending in `/config`, decoded like `/authz`), over
//! plain HTTP or HTTPS (rustls), optionally requiring client certificates.
//!
//! Strict the way the Go server is: only `POST` with `Content-Type: application/json`, and
//! request bodies decoded into the 0.5/0.6 shapes with unknown fields rejected
//! (`deny_unknown_fields`). A violation is answered `400` and recorded in
//! [`WebhookServer::errors`], which a test asserts empty at its end. Every request is
//! recorded ([`WebhookServer::requests`]); answers come from a script: per path a queue of
//! [`Reply`]s ([`WebhookServer::push`]) and a default ([`WebhookServer::set_default`]).
//! [`success`] / [`failure`] build the canonical response bodies, [`config_reply`] the config
//! webhook's. [`WebhookServer::set_for_user`] answers by the request's `username`.
//!
//! The server runs in its own thread with its own Tokio runtime, so the (synchronous) tests
//! only ever call blocking methods. Dropping it stops the runtime.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use super::{describe, TestServer};
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;
use serde_json::{json, Map, Value};

// ---------------------------------------------------------------------------
// Request shapes (0.5/0.6), decoded strictly
// ---------------------------------------------------------------------------

/// `POST /password`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PasswordRequest {
    pub username: String,
    pub remote_address: String,
    pub connection_id: String,
    pub client_version: String,
    pub password_base64: String,
}

/// `POST /pubkey`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PubkeyRequest {
    pub username: String,
    pub remote_address: String,
    pub connection_id: String,
    pub client_version: String,
    pub public_key: String,
}

/// One `metadata` / `environment` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetadataValue {
    pub value: String,
    #[serde(default)]
    pub sensitive: bool,
}

/// One `files` entry; `value` is standard base64 (Go `[]byte`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileValue {
    pub value: String,
    #[serde(default)]
    pub sensitive: bool,
}

/// `POST /authz`. The maps and `authenticatedUsername` are omitted when empty (Go
/// `omitempty`), so they are optional here.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthzRequest {
    pub username: String,
    #[serde(default)]
    pub authenticated_username: Option<String>,
    pub remote_address: String,
    pub connection_id: String,
    pub client_version: String,
    #[serde(default)]
    pub metadata: Option<BTreeMap<String, MetadataValue>>,
    #[serde(default)]
    pub environment: Option<BTreeMap<String, MetadataValue>>,
    #[serde(default)]
    pub files: Option<BTreeMap<String, FileValue>>,
}

/// `POST <configserver.url>` (the test server expects a path ending in `/config`): the same
/// shape as the authz request (reference §2.2).
pub type ConfigRequest = AuthzRequest;

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

/// Standard base64 of `data` (with padding), as `passwordBase64` and `files.*.value`.
pub fn base64(data: &[u8]) -> String {
    b64().encode(data)
}

fn check_remote_address(a: &str) -> Result<(), String> {
    // Go parses it back into a TCP address: "IP:port", IPv6 in brackets.
    a.parse::<SocketAddr>()
        .map(|_| ())
        .map_err(|e| format!("remoteAddress {a:?} is not IP:port: {e}"))
}

fn check_base64(what: &str, v: &str) -> Result<(), String> {
    b64()
        .decode(v)
        .map(|_| ())
        .map_err(|e| format!("{what} is not standard base64: {e}"))
}

/// Decodes `body` strictly according to the last path segment: `password`, `pubkey`,
/// `authz` or `config` (the authz shape) get their struct (unknown fields, missing required fields, wrong types, bad base64
/// and a bad `remoteAddress` are errors); any other path only needs a JSON value.
fn validate(path: &str, body: &[u8]) -> Result<Value, String> {
    let kind = path.rsplit('/').next().unwrap_or("");
    fn parse<'a, T: Deserialize<'a>>(kind: &str, body: &'a [u8]) -> Result<T, String> {
        serde_json::from_slice(body).map_err(|e| format!("decoding the {kind} request: {e}"))
    }
    match kind {
        "password" => {
            let r: PasswordRequest = parse(kind, body)?;
            check_remote_address(&r.remote_address)?;
            check_base64("passwordBase64", &r.password_base64)?;
        }
        "pubkey" => {
            let r: PubkeyRequest = parse(kind, body)?;
            check_remote_address(&r.remote_address)?;
        }
        "authz" | "config" => {
            let r: AuthzRequest = parse(kind, body)?;
            check_remote_address(&r.remote_address)?;
            for (k, f) in r.files.iter().flatten() {
                check_base64(&format!("files.{k}.value"), &f.value)?;
            }
        }
        _ => {}
    }
    serde_json::from_slice(body).map_err(|e| format!("decoding the request body: {e}"))
}

// ---------------------------------------------------------------------------
// Replies
// ---------------------------------------------------------------------------

/// One scripted answer: status, body (sent as `application/json`), extra headers, and a delay
/// before answering.
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    pub body: String,
    pub headers: Vec<(String, String)>,
    pub delay: Duration,
}

impl Reply {
    pub fn new(status: u16, body: impl Into<String>) -> Reply {
        Reply {
            status,
            body: body.into(),
            headers: Vec::new(),
            delay: Duration::ZERO,
        }
    }

    /// HTTP 200 with `value` as the body.
    pub fn json(value: &Value) -> Reply {
        Reply::new(200, value.to_string())
    }

    /// A redirect (`status` 301/302/307/308) to `location`.
    pub fn redirect(status: u16, location: &str) -> Reply {
        Reply::new(status, "").header("Location", location)
    }

    pub fn header(mut self, name: &str, value: &str) -> Reply {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    /// Waits `d` before answering.
    pub fn delay(mut self, d: Duration) -> Reply {
        self.delay = d;
        self
    }
}

/// A canonical auth/authz response body (reference §2.2), built with [`success`] or
/// [`failure`] and the methods below. `metadata`, `environment` and `files` are omitted when
/// empty, as the Go server does.
#[derive(Clone, Debug)]
pub struct AuthReply {
    success: bool,
    authenticated_username: Option<String>,
    metadata: Map<String, Value>,
    environment: Map<String, Value>,
    files: Map<String, Value>,
}

/// `{"success": true, "authenticatedUsername": user}` (no `authenticatedUsername` when `user`
/// is empty).
pub fn success(user: &str) -> AuthReply {
    AuthReply {
        success: true,
        authenticated_username: (!user.is_empty()).then(|| user.to_string()),
        metadata: Map::new(),
        environment: Map::new(),
        files: Map::new(),
    }
}

/// `{"success": false}`.
pub fn failure() -> AuthReply {
    AuthReply {
        success: false,
        ..success("")
    }
}

impl AuthReply {
    pub fn metadata(mut self, key: &str, value: &str, sensitive: bool) -> AuthReply {
        self.metadata.insert(
            key.to_string(),
            json!({"value": value, "sensitive": sensitive}),
        );
        self
    }

    pub fn env(mut self, key: &str, value: &str, sensitive: bool) -> AuthReply {
        self.environment.insert(
            key.to_string(),
            json!({"value": value, "sensitive": sensitive}),
        );
        self
    }

    /// A file for the container; `content` is sent base64-encoded.
    pub fn file(mut self, path: &str, content: &[u8], sensitive: bool) -> AuthReply {
        self.files.insert(
            path.to_string(),
            json!({"value": base64(content), "sensitive": sensitive}),
        );
        self
    }

    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("success".into(), json!(self.success));
        if let Some(u) = &self.authenticated_username {
            m.insert("authenticatedUsername".into(), json!(u));
        }
        for (k, v) in [
            ("metadata", &self.metadata),
            ("environment", &self.environment),
            ("files", &self.files),
        ] {
            if !v.is_empty() {
                m.insert(k.into(), Value::Object(v.clone()));
            }
        }
        Value::Object(m)
    }

    pub fn reply(&self) -> Reply {
        Reply::json(&self.to_json())
    }
}

impl From<AuthReply> for Reply {
    fn from(r: AuthReply) -> Reply {
        r.reply()
    }
}

impl From<&AuthReply> for Reply {
    fn from(r: &AuthReply) -> Reply {
        r.reply()
    }
}

/// A config webhook response body (reference §2.2): `{"config": {...}, "metadata": {...},
/// "environment": {...}, "files": {...}}`, built with [`config_reply`]. The maps are omitted
/// when empty unless [`ConfigReply::with_empty_maps`] asks for them as `{}`.
#[derive(Clone, Debug)]
pub struct ConfigReply {
    config: Option<Value>,
    metadata: Map<String, Value>,
    environment: Map<String, Value>,
    files: Map<String, Value>,
    empty_maps: bool,
}

/// `{"config": config}`; `Value::Null` leaves `config` out altogether.
pub fn config_reply(config: Value) -> ConfigReply {
    ConfigReply {
        config: (!config.is_null()).then_some(config),
        metadata: Map::new(),
        environment: Map::new(),
        files: Map::new(),
        empty_maps: false,
    }
}

impl ConfigReply {
    pub fn metadata(mut self, key: &str, value: &str, sensitive: bool) -> ConfigReply {
        self.metadata.insert(
            key.to_string(),
            json!({"value": value, "sensitive": sensitive}),
        );
        self
    }

    pub fn env(mut self, key: &str, value: &str, sensitive: bool) -> ConfigReply {
        self.environment.insert(
            key.to_string(),
            json!({"value": value, "sensitive": sensitive}),
        );
        self
    }

    /// A file for the container; `content` is sent base64-encoded.
    pub fn file(mut self, path: &str, content: &[u8], sensitive: bool) -> ConfigReply {
        self.files.insert(
            path.to_string(),
            json!({"value": base64(content), "sensitive": sensitive}),
        );
        self
    }

    /// Sends empty `metadata`, `environment` and `files` as `{}` instead of leaving them out.
    pub fn with_empty_maps(mut self) -> ConfigReply {
        self.empty_maps = true;
        self
    }

    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        if let Some(c) = &self.config {
            m.insert("config".into(), c.clone());
        }
        for (k, v) in [
            ("metadata", &self.metadata),
            ("environment", &self.environment),
            ("files", &self.files),
        ] {
            if self.empty_maps || !v.is_empty() {
                m.insert(k.into(), Value::Object(v.clone()));
            }
        }
        Value::Object(m)
    }

    pub fn reply(&self) -> Reply {
        Reply::json(&self.to_json())
    }
}

impl From<ConfigReply> for Reply {
    fn from(r: ConfigReply) -> Reply {
        r.reply()
    }
}

impl From<&ConfigReply> for Reply {
    fn from(r: &ConfigReply) -> Reply {
        r.reply()
    }
}

// ---------------------------------------------------------------------------
// Recorded requests and shared state
// ---------------------------------------------------------------------------

/// One request as received.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: String,
    /// The body, if it passed validation.
    pub json: Option<Value>,
    /// When the request (headers and body) had been read.
    pub at: Instant,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Default)]
struct Inner {
    requests: Vec<Recorded>,
    errors: Vec<String>,
    tls_errors: Vec<String>,
    queues: HashMap<String, VecDeque<Reply>>,
    /// Per (path, username): used after the queue, before the default.
    by_user: HashMap<(String, String), Reply>,
    defaults: HashMap<String, Reply>,
}

#[derive(Default)]
struct State {
    inner: Mutex<Inner>,
    changed: Condvar,
}

impl State {
    fn update<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        let v = f(&mut self.inner.lock().unwrap());
        self.changed.notify_all();
        v
    }
}

// ---------------------------------------------------------------------------
// TLS material
// ---------------------------------------------------------------------------

/// Certificates made with the `openssl` CLI (ECDSA P-256, valid two days) in a directory:
/// a test CA, a server certificate for `127.0.0.1`/`localhost` signed by it, a client
/// certificate (`clientAuth`) signed by it, and an unrelated second CA.
#[derive(Clone, Debug)]
pub struct Pki {
    pub ca_cert: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// A CA that signed nothing here.
    pub other_ca_cert: PathBuf,
}

impl Pki {
    /// Generates everything under `dir` (created if missing).
    pub fn generate(dir: &Path) -> Pki {
        std::fs::create_dir_all(dir).expect("create the PKI dir");
        let openssl = |args: &[&str]| super::openssl_in(dir, args);
        std::fs::write(
            dir.join("srv.ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n\
             keyUsage=digitalSignature\nbasicConstraints=CA:FALSE\n",
        )
        .expect("write srv.ext");
        std::fs::write(
            dir.join("cli.ext"),
            "extendedKeyUsage=clientAuth\nkeyUsage=digitalSignature\nbasicConstraints=CA:FALSE\n",
        )
        .expect("write cli.ext");
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];
        for (name, cn) in [("ca", "webhook-test-ca"), ("other-ca", "webhook-other-ca")] {
            let (key, crt, subj) = (
                format!("{name}.key"),
                format!("{name}.crt"),
                format!("/CN={cn}"),
            );
            let mut args = vec!["req", "-x509"];
            args.extend(ec);
            args.extend([
                "-nodes", "-keyout", &key, "-out", &crt, "-days", "2", "-subj", &subj,
            ]);
            openssl(&args);
        }
        for (name, subj, ext) in [
            ("srv", "/CN=127.0.0.1", "srv.ext"),
            ("cli", "/CN=containerssh-webhook-client", "cli.ext"),
        ] {
            super::openssl_issue(dir, name, &ec, subj, ext);
        }
        Pki {
            ca_cert: dir.join("ca.crt"),
            server_cert: dir.join("srv.crt"),
            server_key: dir.join("srv.key"),
            client_cert: dir.join("cli.crt"),
            client_key: dir.join("cli.key"),
            other_ca_cert: dir.join("other-ca.crt"),
        }
    }
}

/// The contents of a PEM file.
pub fn read_pem(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn tls_acceptor(pki: &Pki, require_client_cert: bool) -> tokio_rustls::TlsAcceptor {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&pki.server_cert)
        .expect("open the server certificate")
        .collect::<Result<_, _>>()
        .expect("parse the server certificate");
    let key = PrivateKeyDer::from_pem_file(&pki.server_key).expect("parse the server key");
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(rustls::ALL_VERSIONS)
        .expect("protocol versions");
    let builder = if require_client_cert {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(&pki.ca_cert).expect("open the CA") {
            roots.add(c.expect("parse the CA")).expect("add the CA");
        }
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .expect("client certificate verifier");
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .expect("server certificate and key");
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

// ---------------------------------------------------------------------------
// The server
// ---------------------------------------------------------------------------

/// A running webhook server. Dropping it stops it.
pub struct WebhookServer {
    pub addr: SocketAddr,
    /// `http://127.0.0.1:PORT` or `https://127.0.0.1:PORT`, no trailing slash.
    pub url: String,
    state: Arc<State>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl WebhookServer {
    /// Plain HTTP.
    pub fn http() -> WebhookServer {
        Self::start(None)
    }

    /// HTTPS with `pki`'s server certificate; with `require_client_cert`, the handshake
    /// fails unless the client presents a certificate signed by `pki`'s CA.
    pub fn https(pki: &Pki, require_client_cert: bool) -> WebhookServer {
        Self::start(Some(tls_acceptor(pki, require_client_cert)))
    }

    fn start(tls: Option<tokio_rustls::TlsAcceptor>) -> WebhookServer {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        std_listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let addr = std_listener.local_addr().expect("local addr");
        let scheme = if tls.is_some() { "https" } else { "http" };
        let state = Arc::new(State::default());
        let (tx, rx) = tokio::sync::oneshot::channel();
        let st = state.clone();
        let thread = thread::Builder::new()
            .name(format!("webhook-{}", addr.port()))
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("tokio runtime");
                rt.block_on(async move {
                    let listener =
                        tokio::net::TcpListener::from_std(std_listener).expect("tokio listener");
                    serve(listener, tls, st, rx).await;
                });
                // Dropping the runtime cancels connections still being served.
            })
            .expect("spawn the webhook thread");
        WebhookServer {
            addr,
            url: format!("{scheme}://127.0.0.1:{}", addr.port()),
            state,
            shutdown: Some(tx),
            thread: Some(thread),
        }
    }

    /// Queues `reply` as the next answer for `path` (e.g. `/password`), before the default.
    pub fn push(&self, path: &str, reply: impl Into<Reply>) {
        let reply = reply.into();
        self.state.update(|i| {
            i.queues
                .entry(path.to_string())
                .or_default()
                .push_back(reply)
        });
    }

    /// The answer for `path` once its queue is empty. A path with neither gets 404 and an
    /// entry in [`WebhookServer::errors`].
    pub fn set_default(&self, path: &str, reply: impl Into<Reply>) {
        let reply = reply.into();
        self.state.update(|i| {
            i.defaults.insert(path.to_string(), reply);
        });
    }

    /// The answer for `path` when the (valid) request's `username` is `user`: after the
    /// path's queue, before its default.
    pub fn set_for_user(&self, path: &str, user: &str, reply: impl Into<Reply>) {
        let reply = reply.into();
        self.state.update(|i| {
            i.by_user
                .insert((path.to_string(), user.to_string()), reply);
        });
    }

    /// Every request so far, valid or not, in arrival order.
    pub fn all_requests(&self) -> Vec<Recorded> {
        self.state.inner.lock().unwrap().requests.clone()
    }

    /// The recorded requests to `path` (valid or not).
    pub fn recorded(&self, path: &str) -> Vec<Recorded> {
        self.all_requests()
            .into_iter()
            .filter(|r| r.path == path)
            .collect()
    }

    /// The parsed bodies of the valid requests to `path`.
    pub fn requests(&self, path: &str) -> Vec<Value> {
        self.recorded(path)
            .into_iter()
            .filter_map(|r| r.json)
            .collect()
    }

    /// Number of requests (valid or not) to `path`.
    pub fn count(&self, path: &str) -> usize {
        self.state
            .inner
            .lock()
            .unwrap()
            .requests
            .iter()
            .filter(|r| r.path == path)
            .count()
    }

    /// Waits (on each new request) until at least `n` requests to `path` have arrived.
    pub fn wait_for_requests(&self, path: &str, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut inner = self.state.inner.lock().unwrap();
        loop {
            if inner.requests.iter().filter(|r| r.path == path).count() >= n {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            inner = self
                .state
                .changed
                .wait_timeout(inner, deadline - now)
                .unwrap()
                .0;
        }
    }

    /// Protocol violations seen (wrong method or content type, bodies that do not decode
    /// strictly, requests nobody scripted an answer for). Must be empty after a test.
    pub fn errors(&self) -> Vec<String> {
        self.state.inner.lock().unwrap().errors.clone()
    }

    /// TLS handshakes that failed (a client without a certificate, a client that rejected
    /// ours, plain HTTP to the HTTPS port, …).
    pub fn tls_errors(&self) -> Vec<String> {
        self.state.inner.lock().unwrap().tls_errors.clone()
    }

    /// Waits (on each change) until at least one TLS handshake has failed.
    pub fn wait_for_tls_error(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut inner = self.state.inner.lock().unwrap();
        loop {
            if !inner.tls_errors.is_empty() {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            inner = self
                .state
                .changed
                .wait_timeout(inner, deadline - now)
                .unwrap()
                .0;
        }
    }

    /// A summary for assertion messages: every request and every error.
    pub fn describe(&self) -> String {
        let inner = self.state.inner.lock().unwrap();
        let mut s = format!("--- webhook {} ---\n", self.url);
        for r in &inner.requests {
            s.push_str(&format!(
                "{} {} {}{}\n",
                r.method,
                r.path,
                r.body,
                if r.json.is_some() { "" } else { "  [INVALID]" }
            ));
        }
        for e in &inner.errors {
            s.push_str(&format!("error: {e}\n"));
        }
        for e in &inner.tls_errors {
            s.push_str(&format!("tls error: {e}\n"));
        }
        s
    }
}

impl Drop for WebhookServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn serve(
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    state: Arc<State>,
    mut shutdown: tokio::sync::oneshot::Receiver<()>,
) {
    loop {
        let stream = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
        };
        let state = state.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let st = state.clone();
            let svc = service_fn(move |req| handle(st.clone(), req));
            let conn = hyper::server::conn::http1::Builder::new();
            match tls {
                None => {
                    let _ = conn.serve_connection(TokioIo::new(stream), svc).await;
                }
                Some(acceptor) => match acceptor.accept(stream).await {
                    Ok(stream) => {
                        let _ = conn.serve_connection(TokioIo::new(stream), svc).await;
                    }
                    Err(e) => state.update(|i| i.tls_errors.push(e.to_string())),
                },
            }
        });
    }
}

async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_ascii_lowercase(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            state.update(|i| {
                i.errors
                    .push(format!("{method} {path}: reading the body: {e}"))
            });
            return Ok(respond(400, "cannot read the body".into(), &[]));
        }
    };
    let content_type = headers
        .iter()
        .find(|(k, _)| k == "content-type")
        .map(|(_, v)| v.clone());
    let verdict = if method != "POST" {
        Err(format!("method {method}, want POST"))
    } else if !content_type.as_deref().is_some_and(|ct| {
        ct.split(';')
            .next()
            .unwrap_or("")
            .trim()
            .eq_ignore_ascii_case("application/json")
    }) {
        Err(format!(
            "Content-Type {content_type:?}, want application/json"
        ))
    } else {
        validate(&path, &body)
    };
    let recorded = Recorded {
        method: method.clone(),
        path: path.clone(),
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
        json: verdict.as_ref().ok().cloned(),
        at: Instant::now(),
    };
    let reply = state.update(|i| {
        i.requests.push(recorded);
        match &verdict {
            Err(e) => {
                i.errors.push(format!(
                    "{method} {path}: {e}; body: {}",
                    String::from_utf8_lossy(&body)
                ));
                None
            }
            Ok(v) => {
                let user = v.get("username").and_then(Value::as_str).unwrap_or("");
                let next = i
                    .queues
                    .get_mut(&path)
                    .and_then(VecDeque::pop_front)
                    .or_else(|| i.by_user.get(&(path.clone(), user.to_string())).cloned())
                    .or_else(|| i.defaults.get(&path).cloned());
                if next.is_none() {
                    i.errors
                        .push(format!("{method} {path}: no reply scripted for this path"));
                }
                next
            }
        }
    });
    let Some(reply) = reply else {
        let msg = match verdict {
            Err(e) => e,
            Ok(_) => format!("no reply scripted for {path}"),
        };
        let status = if msg.starts_with("no reply") {
            404
        } else {
            400
        };
        return Ok(respond(status, json!({ "error": msg }).to_string(), &[]));
    };
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    Ok(respond(reply.status, reply.body, &reply.headers))
}

fn respond(status: u16, body: String, headers: &[(String, String)]) -> Response<Full<Bytes>> {
    let mut b = Response::builder()
        .status(StatusCode::from_u16(status).expect("valid status"))
        .header("Content-Type", "application/json");
    for (k, v) in headers {
        b = b.header(k.as_str(), v.as_str());
    }
    b.body(Full::new(Bytes::from(body))).expect("response")
}

// ---------------------------------------------------------------------------
// Assertions shared by the webhook test files
// ---------------------------------------------------------------------------

/// [`describe`] plus the webhook's view, for assertion messages.
pub fn ctx(out: &Output, server: &TestServer, hook: &WebhookServer) -> String {
    format!("{}\n{}", describe(out, server), hook.describe())
}

/// The end of every test: the server spoke the protocol exactly.
pub fn assert_no_violations(hook: &WebhookServer, server: &TestServer) {
    let errors = hook.errors();
    assert!(
        errors.is_empty(),
        "webhook protocol violations: {errors:#?}\n{}\n--- server ---\n{}",
        hook.describe(),
        server.output()
    );
}

pub fn assert_refused(out: &Output, server: &TestServer, hook: &WebhookServer) {
    assert_eq!(out.status.code(), Some(255), "{}", ctx(out, server, hook));
    assert!(out.stdout.is_empty(), "{}", ctx(out, server, hook));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
        "{}",
        ctx(out, server, hook)
    );
}

pub fn str_field<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("no string {key:?} in {v}"))
}

/// The fields every 0.5+ auth request carries, checked for shape.
pub fn assert_connection_fields(req: &Value, user: &str) {
    assert_eq!(str_field(req, "username"), user, "{req}");
    let addr: SocketAddr = str_field(req, "remoteAddress")
        .parse()
        .unwrap_or_else(|e| panic!("remoteAddress is not IP:port ({e}): {req}"));
    assert_eq!(addr.ip().to_string(), "127.0.0.1", "{req}");
    assert_ne!(addr.port(), 0, "{req}");
    let id = str_field(req, "connectionId");
    assert!(
        id.len() == 32 && id.chars().all(|c| matches!(c, '0'..='9' | 'a'..='f')),
        "connectionId is not 32 lowercase hex digits: {req}"
    );
    assert!(
        str_field(req, "clientVersion").starts_with("SSH-2.0-OpenSSH"),
        "{req}"
    );
}
