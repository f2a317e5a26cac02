//! The configuration file as written by users: ContainerSSH 0.5/0.6 layout, camelCase keys.
//! Every struct refuses unknown keys, so a typo is an error and never a silently ignored setting.
//! Docker's own blocks (`container`, `host`, `network`, `platform`, `auth`) are Docker Engine API
//! objects that the engine matches case-insensitively; they stay free-form JSON maps.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::defaults;
use super::duration::GoDuration;
use super::size::ByteSize;

#[derive(Clone, Debug, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct AppConfig {
    pub ssh: SshConfig,
    pub auth: AuthConfig,
    /// The config webhook: per-login configuration merged onto this file's.
    pub configserver: ConfigServerConfig,
    pub backend: BackendName,
    pub docker: DockerConfig,
    pub kubernetes: KubernetesConfig,
    pub log: LogConfig,
    /// The in-container agent this server injects (see `docker.execution.agentPath`).
    pub agent: AgentConfig,
    /// What clients may do beyond sessions (so far: forwarding).
    pub security: SecurityConfig,
    /// How the server confines itself once it has bound and read its keys (`src/sandbox/`).
    pub sandbox: SandboxConfig,
    /// Names this server in container labels so that its reaper finds what a crashed run of the
    /// same instance left. Empty means "derive from the host name and listen port".
    pub instance_id: String,
    /// Where generated state (the host key) lives. Empty means a per-user default.
    pub state_directory: String,
    /// ContainerSSH's Prometheus endpoint.
    pub metrics: MetricsConfig,
    /// ContainerSSH's health endpoint, and the `--healthcheck` client.
    pub health: HealthConfig,
    /// ContainerSSH's audit recordings.
    pub audit: AuditConfig,
}

/// `audit`: ContainerSSH's block.
#[derive(Clone, Debug, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct AuditConfig {
    pub enable: bool,
    pub format: AuditFormat,
    pub storage: AuditStorage,
    pub file: AuditFileConfig,
    pub s3: AuditS3Config,
    pub intercept: AuditIntercept,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AuditFormat {
    #[default]
    None,
    Binary,
    Asciinema,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AuditStorage {
    #[default]
    None,
    File,
    S3,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct AuditFileConfig {
    pub directory: String,
}

impl Default for AuditFileConfig {
    fn default() -> Self {
        Self {
            directory: "/var/log/audit".into(),
        }
    }
}

/// `audit.s3`: ContainerSSH's keys.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct AuditS3Config {
    pub local: String,
    pub access_key: String,
    pub secret_key: String,
    pub bucket: String,
    pub region: String,
    pub endpoint: String,
    pub cacert: String,
    pub acl: String,
    pub path_style_access: bool,
    pub upload_part_size: u64,
    pub parallel_uploads: u32,
    pub metadata: AuditS3Metadata,
}

impl Default for AuditS3Config {
    fn default() -> Self {
        Self {
            local: "/var/lib/audit".into(),
            access_key: String::new(),
            secret_key: String::new(),
            bucket: String::new(),
            region: String::new(),
            endpoint: String::new(),
            cacert: String::new(),
            acl: String::new(),
            path_style_access: false,
            upload_part_size: 5 * 1024 * 1024,
            parallel_uploads: 20,
            metadata: AuditS3Metadata::default(),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct AuditS3Metadata {
    pub ip: bool,
    pub username: bool,
}

/// `audit.intercept`: what recordings keep.
#[derive(Clone, Debug, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct AuditIntercept {
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
    pub passwords: bool,
    pub forwarding: bool,
}

/// `metrics`: ContainerSSH's block (its HTTP server keys inline).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct MetricsConfig {
    pub enable: bool,
    pub path: String,
    pub listen: String,
    pub cert: String,
    pub key: String,
    pub clientcacert: String,
    pub tls_version: String,
    #[serde(alias = "curve")]
    pub curves: AlgorithmList,
    pub cipher: AlgorithmList,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        let s = HttpServerConfig::listening("0.0.0.0:9100");
        Self {
            enable: false,
            path: "/metrics".into(),
            listen: s.listen,
            cert: s.cert,
            key: s.key,
            clientcacert: s.clientcacert,
            tls_version: s.tls_version,
            curves: s.curves,
            cipher: s.cipher,
        }
    }
}

impl MetricsConfig {
    pub fn server(&self) -> HttpServerConfig {
        HttpServerConfig {
            listen: self.listen.clone(),
            cert: self.cert.clone(),
            key: self.key.clone(),
            clientcacert: self.clientcacert.clone(),
            tls_version: self.tls_version.clone(),
            curves: self.curves.clone(),
            cipher: self.cipher.clone(),
        }
    }
}

/// `health`: ContainerSSH's block (its HTTP server keys inline, `client` for `--healthcheck`).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct HealthConfig {
    pub enable: bool,
    pub listen: String,
    pub cert: String,
    pub key: String,
    pub clientcacert: String,
    pub tls_version: String,
    #[serde(alias = "curve")]
    pub curves: AlgorithmList,
    pub cipher: AlgorithmList,
    pub client: HealthClientConfig,
}

impl Default for HealthConfig {
    fn default() -> Self {
        let s = HttpServerConfig::listening("0.0.0.0:7000");
        Self {
            enable: false,
            listen: s.listen,
            cert: s.cert,
            key: s.key,
            clientcacert: s.clientcacert,
            tls_version: s.tls_version,
            curves: s.curves,
            cipher: s.cipher,
            client: HealthClientConfig::default(),
        }
    }
}

impl HealthConfig {
    pub fn server(&self) -> HttpServerConfig {
        HttpServerConfig {
            listen: self.listen.clone(),
            cert: self.cert.clone(),
            key: self.key.clone(),
            clientcacert: self.clientcacert.clone(),
            tls_version: self.tls_version.clone(),
            curves: self.curves.clone(),
            cipher: self.cipher.clone(),
        }
    }
}

/// ContainerSSH's HTTP server keys, as the `metrics` and `health` blocks hold them: where to
/// listen, and TLS (`cert` and `key`, PEM text or file names; `clientcacert` asks clients for a
/// certificate it signs).
#[derive(Clone, Debug)]
pub struct HttpServerConfig {
    pub listen: String,
    pub cert: String,
    pub key: String,
    pub clientcacert: String,
    pub tls_version: String,
    pub curves: AlgorithmList,
    pub cipher: AlgorithmList,
}

impl HttpServerConfig {
    fn listening(listen: &str) -> Self {
        Self {
            listen: listen.into(),
            cert: String::new(),
            key: String::new(),
            clientcacert: String::new(),
            tls_version: "1.3".into(),
            curves: AlgorithmList::default(),
            cipher: AlgorithmList::default(),
        }
    }
}

/// `health.client`: what `--healthcheck` asks (ContainerSSH's HTTP client keys).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct HealthClientConfig {
    pub url: String,
    pub timeout: GoDuration,
    pub allow_redirects: bool,
    pub cacert: String,
    pub cert: String,
    pub key: String,
    pub tls_version: String,
    #[serde(alias = "curve")]
    pub curves: AlgorithmList,
    pub cipher: AlgorithmList,
}

impl Default for HealthClientConfig {
    fn default() -> Self {
        Self {
            url: "http://127.0.0.1:7000/".into(),
            timeout: GoDuration::from_secs(2),
            allow_redirects: false,
            cacert: String::new(),
            cert: String::new(),
            key: String::new(),
            tls_version: "1.3".into(),
            curves: AlgorithmList::default(),
            cipher: AlgorithmList::default(),
        }
    }
}

impl HealthClientConfig {
    /// The same client as a webhook's (one attempt: `authTimeout` is `timeout`).
    pub fn as_webhook(&self) -> WebhookConfig {
        WebhookConfig {
            url: self.url.clone(),
            timeout: self.timeout,
            auth_timeout: self.timeout,
            allow_redirects: self.allow_redirects,
            cacert: self.cacert.clone(),
            cert: self.cert.clone(),
            key: self.key.clone(),
            tls_version: self.tls_version.clone(),
            curves: self.curves.clone(),
            cipher: self.cipher.clone(),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct SshConfig {
    pub listen: String,
    /// Private host keys: file paths or inline OpenSSH PEM text.
    pub hostkeys: Vec<String>,
    pub server_version: String,
    pub banner: String,
    pub client_alive_interval: GoDuration,
    pub client_alive_count_max: u32,
    pub ciphers: AlgorithmList,
    pub kex: AlgorithmList,
    pub macs: AlgorithmList,
    /// How long an unauthenticated client may take to log in (OpenSSH's LoginGraceTime),
    /// counted from the accept.
    pub login_grace_time: GoDuration,
    /// (ours) How long the version exchange and the key exchange may take together, counted
    /// from the accept: a socket that never speaks SSH gives its place back this soon.
    pub handshake_timeout: GoDuration,
    /// OpenSSH's MaxAuthTries: failed authentication attempts per connection, all methods
    /// together, before it is disconnected.
    pub max_auth_tries: u32,
    /// OpenSSH's MaxStartups `start:rate:full` (or one number: a hard limit).
    pub max_startups: StartupsSpec,
    /// OpenSSH's PerSourceMaxStartups: a number, or `none`.
    pub per_source_max_startups: PerSourceLimit,
    /// OpenSSH's PerSourceNetBlockSize `v4bits[:v6bits]`.
    pub per_source_net_block_size: StartupsSpec,
    /// OpenSSH's PerSourcePenalties: `false`/`no` turns them off.
    pub per_source_penalties: PenaltiesConfig,
    /// OpenSSH's PerSourcePenaltyExemptList: addresses or CIDR ranges never penalised.
    pub per_source_penalty_exempt_list: Vec<String>,
    /// (ours) PROXY protocol v1/v2 from trusted load balancers.
    pub proxy_protocol: ProxyProtocolConfig,
    /// (ours) What clients may make the server hold for data not yet delivered.
    pub buffers: BuffersConfig,
}

/// `ssh.buffers`: byte budgets for data clients send that programs have not read yet. Every
/// channel's window is reserved from its connection's budget, which draws on the total.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct BuffersConfig {
    pub per_connection: ByteSize,
    pub total: ByteSize,
}

impl Default for BuffersConfig {
    fn default() -> Self {
        Self {
            per_connection: defaults::buffers_per_connection(),
            total: defaults::buffers_total(),
        }
    }
}

/// A `:`-separated list of numbers written as a YAML string (`"10:30:100"`) or as one number.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StartupsSpec(pub String);

impl Serialize for StartupsSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for StartupsSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Form {
            Number(u64),
            Text(String),
        }
        Ok(match Form::deserialize(d)? {
            Form::Number(n) => StartupsSpec(n.to_string()),
            Form::Text(s) => StartupsSpec(s.trim().to_string()),
        })
    }
}

/// `perSourceMaxStartups`: a number of connections, or `none` (OpenSSH's word for no limit).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PerSourceLimit(pub Option<u32>);

impl Serialize for PerSourceLimit {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Some(n) => s.serialize_u32(n),
            None => s.serialize_str("none"),
        }
    }
}

impl<'de> Deserialize<'de> for PerSourceLimit {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Form {
            Number(u32),
            Text(String),
        }
        match Form::deserialize(d)? {
            Form::Number(n) => Ok(PerSourceLimit(Some(n))),
            Form::Text(s) if s.eq_ignore_ascii_case("none") => Ok(PerSourceLimit(None)),
            Form::Text(s) => s
                .trim()
                .parse()
                .map(|n| PerSourceLimit(Some(n)))
                .map_err(|_| {
                    serde::de::Error::custom(format!("expected a number or \"none\", got {s:?}"))
                }),
        }
    }
}

/// `ssh.perSourcePenalties`: OpenSSH's PerSourcePenalties as a map of camelCase names, or
/// `false` / `"no"` to turn them off. Unset durations keep OpenSSH 9.9's values.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PenaltiesConfig {
    pub enabled: bool,
    /// The connection's task panicked (OpenSSH: the session process crashed).
    pub crash: GoDuration,
    /// Authentication was attempted and never succeeded.
    pub authfail: GoDuration,
    /// The client went away without attempting authentication.
    pub noauth: GoDuration,
    /// The login grace time or the handshake deadline ran out.
    pub grace_exceeded: GoDuration,
    /// The connection was refused on purpose: a PROXY header from a peer not in
    /// `proxyProtocol.trustedProxies`.
    pub refuse_connection: GoDuration,
    /// Penalties are enforced only once a source has accumulated more than this.
    pub min: GoDuration,
    /// What a source can accumulate at most.
    pub max: GoDuration,
}

impl Default for PenaltiesConfig {
    fn default() -> Self {
        defaults::penalties()
    }
}

impl<'de> Deserialize<'de> for PenaltiesConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize, Default)]
        #[serde(deny_unknown_fields, rename_all = "camelCase", default)]
        struct Map {
            enabled: Option<bool>,
            crash: Option<GoDuration>,
            authfail: Option<GoDuration>,
            noauth: Option<GoDuration>,
            grace_exceeded: Option<GoDuration>,
            refuse_connection: Option<GoDuration>,
            min: Option<GoDuration>,
            max: Option<GoDuration>,
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Form {
            Switch(bool),
            Word(String),
            Map(Map),
        }
        let d0 = defaults::penalties();
        match Form::deserialize(d)? {
            Form::Switch(on) => Ok(Self { enabled: on, ..d0 }),
            Form::Word(w) if w == "no" => Ok(Self {
                enabled: false,
                ..d0
            }),
            Form::Word(w) if w == "yes" => Ok(d0),
            Form::Word(w) => Err(serde::de::Error::custom(format!(
                "expected true, false, \"yes\", \"no\" or a map of penalties, got {w:?}"
            ))),
            Form::Map(m) => Ok(Self {
                enabled: m.enabled.unwrap_or(true),
                crash: m.crash.unwrap_or(d0.crash),
                authfail: m.authfail.unwrap_or(d0.authfail),
                noauth: m.noauth.unwrap_or(d0.noauth),
                grace_exceeded: m.grace_exceeded.unwrap_or(d0.grace_exceeded),
                refuse_connection: m.refuse_connection.unwrap_or(d0.refuse_connection),
                min: m.min.unwrap_or(d0.min),
                max: m.max.unwrap_or(d0.max),
            }),
        }
    }
}

/// `ssh.proxyProtocol`: off unless `trustedProxies` lists the load balancers, which then
/// must send a PROXY v1 or v2 header.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct ProxyProtocolConfig {
    pub trusted_proxies: Vec<String>,
    pub header_timeout: GoDuration,
}

impl Default for ProxyProtocolConfig {
    fn default() -> Self {
        Self {
            trusted_proxies: Vec::new(),
            header_timeout: defaults::proxy_header_timeout(),
        }
    }
}

impl Default for SshConfig {
    fn default() -> Self {
        Self {
            listen: defaults::listen(),
            hostkeys: Vec::new(),
            server_version: defaults::server_version(),
            banner: String::new(),
            client_alive_interval: GoDuration::default(),
            client_alive_count_max: defaults::client_alive_count_max(),
            ciphers: AlgorithmList::default(),
            kex: AlgorithmList::default(),
            macs: AlgorithmList::default(),
            login_grace_time: defaults::login_grace_time(),
            handshake_timeout: defaults::handshake_timeout(),
            max_auth_tries: defaults::max_auth_tries(),
            max_startups: defaults::max_startups(),
            per_source_max_startups: defaults::per_source_max_startups(),
            per_source_net_block_size: defaults::per_source_net_block_size(),
            per_source_penalties: defaults::penalties(),
            per_source_penalty_exempt_list: Vec::new(),
            proxy_protocol: ProxyProtocolConfig::default(),
            buffers: BuffersConfig::default(),
        }
    }
}

/// A list of algorithm names, written as a YAML list or a `:`/`,`-separated string (both forms
/// appear in ContainerSSH configs). Empty means "our modern defaults".
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct AlgorithmList(pub Vec<String>);

impl<'de> Deserialize<'de> for AlgorithmList {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Form {
            List(Vec<String>),
            Text(String),
        }
        Ok(match Form::deserialize(d)? {
            Form::List(v) => AlgorithmList(v.into_iter().map(|s| s.trim().to_string()).collect()),
            Form::Text(s) => AlgorithmList(
                s.split([':', ','])
                    .map(str::trim)
                    .filter(|x| !x.is_empty())
                    .map(String::from)
                    .collect(),
            ),
        })
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct AuthConfig {
    pub public_key: PublicKeyAuthConfig,
    /// The block, or (ContainerSSH 0.4's flat form) `true`/`false` with `auth.url`.
    #[serde(deserialize_with = "password_or_flag")]
    pub password: PasswordAuthConfig,
    /// 0.4's flat form: the auth webhook's base URL for `password: true` / `pubkey: true`,
    /// with its client settings next to it. Mapped to the webhook blocks (deprecated).
    pub url: String,
    pub pubkey: bool,
    pub timeout: Option<GoDuration>,
    pub auth_timeout: Option<GoDuration>,
    pub cacert: String,
    pub cert: String,
    pub key: String,
    /// After any successful authentication: may refuse the login or add metadata.
    pub authz: AuthzConfig,
    /// Environment and files every login gets (the webhooks add per-user ones later).
    pub metadata: LoginMetadataConfig,
}

/// `auth.metadata`: what a login brings into its container besides the user name.
#[derive(Clone, Debug, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct LoginMetadataConfig {
    /// Set in every session; overrides what the client sends with `env` requests.
    pub environment: BTreeMap<String, String>,
    /// Written into the container (through the agent, as the container's user) before any
    /// session starts, keyed by absolute path.
    pub files: BTreeMap<String, LoginFileConfig>,
}

/// One file from `auth.metadata.files`: inline text, or a file on this host read at login.
#[derive(Clone, Debug, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct LoginFileConfig {
    /// The content, as text.
    pub value: String,
    /// Or: a path on this host; `%u` is the user name.
    pub source: String,
    /// Octal permission bits as a string (default `"0600"`).
    pub mode: String,
}

#[derive(Clone, Debug, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct PublicKeyAuthConfig {
    /// `""` (off), `authorizedKeys` or `webhook`.
    pub method: String,
    pub authorized_keys: AuthorizedKeysConfig,
    pub webhook: WebhookConfig,
    /// Ours: a file of CA public keys (as sshd's TrustedUserCAKeys); OpenSSH user
    /// certificates they signed log in the users named among their principals.
    #[serde(rename = "trustedUserCAKeys")]
    pub trusted_user_ca_keys: String,
}

/// `auth.authz`: `method: webhook` calls `{url}/authz` after each successful authentication.
#[derive(Clone, Debug, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct AuthzConfig {
    /// `""` (off) or `webhook`.
    pub method: String,
    pub webhook: WebhookConfig,
}

/// `configserver`: ContainerSSH's config webhook (`url` exactly, no path appended).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct ConfigServerConfig {
    pub url: String,
    pub timeout: GoDuration,
    pub allow_redirects: bool,
    pub cacert: String,
    pub cert: String,
    pub key: String,
    pub tls_version: String,
    #[serde(alias = "curve")]
    pub curves: AlgorithmList,
    pub cipher: AlgorithmList,
    /// Send metadata marked `sensitive` to the config webhook too (off: left out).
    pub transmit_sensitive_metadata: bool,
}

impl Default for ConfigServerConfig {
    fn default() -> Self {
        let w = WebhookConfig::default();
        Self {
            url: String::new(),
            timeout: w.timeout,
            allow_redirects: false,
            cacert: String::new(),
            cert: String::new(),
            key: String::new(),
            tls_version: w.tls_version,
            curves: w.curves,
            cipher: w.cipher,
            transmit_sensitive_metadata: false,
        }
    }
}

impl ConfigServerConfig {
    /// As a webhook block; ContainerSSH gives the config webhook 60 s in all.
    pub fn webhook(&self) -> WebhookConfig {
        WebhookConfig {
            url: self.url.clone(),
            timeout: self.timeout,
            auth_timeout: GoDuration::from_secs(60),
            allow_redirects: self.allow_redirects,
            cacert: self.cacert.clone(),
            cert: self.cert.clone(),
            key: self.key.clone(),
            tls_version: self.tls_version.clone(),
            curves: self.curves.clone(),
            cipher: self.cipher.clone(),
        }
    }
}

/// ContainerSSH's HTTP client block for webhooks.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct WebhookConfig {
    /// `http://` or `https://` base URL (auth: `/password`, `/pubkey`, `/authz` are appended).
    pub url: String,
    /// One HTTP call.
    pub timeout: GoDuration,
    /// All attempts of one login step together (soft failures are retried inside it).
    pub auth_timeout: GoDuration,
    pub allow_redirects: bool,
    /// PEM text or a file name: the CA that signs the server's certificate.
    pub cacert: String,
    /// PEM text or file names: a client certificate and key (mTLS).
    pub cert: String,
    pub key: String,
    /// Minimum TLS version: `"1.3"` (default) or `"1.2"`.
    pub tls_version: String,
    /// Key exchange groups and cipher suites (ContainerSSH's names).
    #[serde(alias = "curve")]
    pub curves: AlgorithmList,
    pub cipher: AlgorithmList,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            timeout: GoDuration::from_secs(2),
            auth_timeout: GoDuration::from_secs(60),
            allow_redirects: false,
            cacert: String::new(),
            cert: String::new(),
            key: String::new(),
            tls_version: "1.3".into(),
            curves: AlgorithmList::default(),
            cipher: AlgorithmList::default(),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct AuthorizedKeysConfig {
    /// Path template; `%u` is the user name, as in OpenSSH's AuthorizedKeysFile.
    pub path: String,
}

#[derive(Clone, Debug, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct PasswordAuthConfig {
    /// `""` (off), `passwordFile` or `webhook`.
    pub method: String,
    pub password_file: PasswordFileConfig,
    pub webhook: WebhookConfig,
    /// `auth.password: true|false` in 0.4's flat form.
    #[serde(skip)]
    pub flag: Option<bool>,
}

/// `auth.password` as a block or as 0.4's boolean.
fn password_or_flag<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<PasswordAuthConfig, D::Error> {
    struct V;
    impl<'de> serde::de::Visitor<'de> for V {
        type Value = PasswordAuthConfig;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a password block or true/false")
        }
        fn visit_bool<E: serde::de::Error>(self, b: bool) -> Result<Self::Value, E> {
            Ok(PasswordAuthConfig {
                flag: Some(b),
                ..Default::default()
            })
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(PasswordAuthConfig::default())
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
            PasswordAuthConfig::deserialize(serde::de::value::MapAccessDeserializer::new(map))
        }
    }
    d.deserialize_any(V)
}

#[derive(Clone, Debug, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct PasswordFileConfig {
    pub path: String,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum BackendName {
    #[default]
    Docker,
    Kubernetes,
}

#[derive(Clone, Debug, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct DockerConfig {
    pub connection: DockerConnectionConfig,
    pub execution: DockerExecutionConfig,
    pub timeouts: DockerTimeouts,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct DockerConnectionConfig {
    /// `unix:///var/run/docker.sock` or `tcp://host:port`.
    pub host: String,
    /// PEM text; TLS is used only when cacert, cert and key are all set (as ContainerSSH does).
    pub cacert: String,
    pub cert: String,
    pub key: String,
}

impl Default for DockerConnectionConfig {
    fn default() -> Self {
        Self {
            host: defaults::docker_host(),
            cacert: String::new(),
            cert: String::new(),
            key: String::new(),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct DockerExecutionConfig {
    /// Docker API `container.Config`; keys matched case-insensitively by the engine.
    pub container: Map<String, Value>,
    /// Docker API `container.HostConfig`.
    pub host: Map<String, Value>,
    /// Docker API `network.NetworkingConfig`.
    pub network: Map<String, Value>,
    /// OCI platform (`architecture`, `os`, `variant`).
    pub platform: Map<String, Value>,
    /// A fixed container name; collides when two connections are open at once.
    #[serde(rename = "containername")]
    pub container_name: String,
    /// Registry credentials for pulls (Docker `registry.AuthConfig`).
    pub auth: Map<String, Value>,
    pub mode: ExecutionMode,
    pub idle_command: Vec<String>,
    pub shell_command: Vec<String>,
    pub subsystems: BTreeMap<String, String>,
    pub image_pull_policy: PullPolicy,
    /// Persistent mode: create the named container (running `idleCommand`) when it does not
    /// exist, instead of refusing the login.
    pub create_missing_container: bool,
    /// Where the agent is inside containers: this server copies its own agent there before
    /// the container starts (see `agent`), or the image carries it, as with ContainerSSH.
    pub agent_path: String,
    /// No agent: no signals to exec'd programs, no forwarding, no files from authentication.
    pub disable_agent: bool,
    /// Every authentication metadata value (the webhooks') as an environment variable of the
    /// same name in each session (ContainerSSH's bool; Kubernetes maps names instead).
    pub expose_auth_metadata_as_env: bool,
    /// (ours) Containers started ahead for connection-mode logins (off by default).
    pub pool: PoolConfig,
}

/// `pool`: how many containers wait, started ahead, and for how long at most.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct PoolConfig {
    pub size: u32,
    pub max_age: GoDuration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            size: 0,
            max_age: GoDuration::from_secs(600),
        }
    }
}

impl Default for DockerExecutionConfig {
    fn default() -> Self {
        Self {
            container: defaults::docker_container(),
            host: Map::new(),
            network: Map::new(),
            platform: Map::new(),
            container_name: String::new(),
            auth: Map::new(),
            mode: ExecutionMode::Connection,
            idle_command: defaults::idle_command(),
            shell_command: defaults::shell_command(),
            subsystems: defaults::subsystems(),
            image_pull_policy: PullPolicy::IfNotPresent,
            create_missing_container: false,
            agent_path: defaults::agent_path(),
            disable_agent: false,
            expose_auth_metadata_as_env: false,
            pool: PoolConfig::default(),
        }
    }
}

/// ContainerSSH's `security` block: which requests clients may make.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct SecurityConfig {
    /// The mode of every request kind left at `""` (forwarding excepted: off unless enabled).
    pub default_mode: SecurityMode,
    pub forwarding: ForwardingConfig,
    /// `env` requests: `filter` allows only `allow`, `enable` all but `deny`.
    pub env: SecurityListConfig,
    /// `exec` requests: `filter` allows only the exact commands in `allow`.
    pub command: SecurityListConfig,
    /// `shell` requests (`filter` means `disable`).
    pub shell: SecurityModeConfig,
    /// `subsystem` requests, by name.
    pub subsystem: SecurityListConfig,
    /// `pty-req` (`filter` means `disable`).
    pub tty: SecurityModeConfig,
    /// `signal` requests, by name (`TERM`, `USR1`, …).
    pub signal: SecurityListConfig,
    /// Runs instead of every shell, exec and subsystem request; the original in
    /// `SSH_ORIGINAL_COMMAND`, as OpenSSH's ForceCommand.
    pub force_command: String,
    /// Session channels open at once per connection; `-1` (default) or `0`: no limit beyond
    /// the server's own.
    pub max_sessions: i64,
    /// (ours) Idle, session and unused-connection timeouts.
    pub timeouts: TimeoutsConfig,
}

/// `security.timeouts`: all off (`0`) by default. Per login, like the rest of `security`, so
/// the config webhook can give strangers short lifetimes.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct TimeoutsConfig {
    /// A session channel with no data either way for this long is warned, signalled, then
    /// closed (keepalives do not count).
    pub idle: GoDuration,
    /// The longest a session channel may last; then the same warning, signal and close.
    pub session: GoDuration,
    /// OpenSSH's UnusedConnectionTimeout: an authenticated connection with no channel and no
    /// forwarding listener for this long is closed.
    pub unused_connection: GoDuration,
    /// Time between the warning, the signal and the close.
    pub grace: GoDuration,
    /// The signal sent to the program before its channel is closed.
    pub signal: String,
}

impl Default for TimeoutsConfig {
    fn default() -> Self {
        Self {
            idle: GoDuration::default(),
            session: GoDuration::default(),
            unused_connection: GoDuration::default(),
            grace: defaults::timeout_grace(),
            signal: defaults::timeout_signal(),
        }
    }
}

impl Default for SecurityConfig {
    fn default() -> Self {
        Self {
            default_mode: SecurityMode::Default,
            forwarding: ForwardingConfig::default(),
            env: SecurityListConfig::default(),
            command: SecurityListConfig::default(),
            shell: SecurityModeConfig::default(),
            subsystem: SecurityListConfig::default(),
            tty: SecurityModeConfig::default(),
            signal: SecurityListConfig::default(),
            force_command: String::new(),
            max_sessions: -1,
            timeouts: TimeoutsConfig::default(),
        }
    }
}

/// A security mode with allow and deny lists.
#[derive(Clone, Debug, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct SecurityListConfig {
    pub mode: SecurityMode,
    pub allow: Vec<String>,
    pub deny: Vec<String>,
}

/// A security mode alone.
#[derive(Clone, Debug, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct SecurityModeConfig {
    pub mode: SecurityMode,
}

/// `security.forwarding`: every kind is off unless enabled, as in ContainerSSH.
#[derive(Clone, Debug, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct ForwardingConfig {
    /// `ssh -L` (`direct-tcpip`), dialled from inside the container.
    pub forwarding_mode: SecurityMode,
    /// `ssh -R` (`tcpip-forward`), listening inside the container.
    pub reverse_forwarding_mode: SecurityMode,
    /// `ssh -L` to a unix socket inside the container (`direct-streamlocal@openssh.com`).
    pub socket_forwarding_mode: SecurityMode,
    /// `ssh -R` from a unix socket inside the container (`streamlocal-forward@openssh.com`).
    pub socket_listen_mode: SecurityMode,
    /// `ssh -X` (`x11-req`).
    pub x11_forwarding_mode: SecurityMode,
    /// `ssh -A` (`auth-agent-req@openssh.com`); ContainerSSH has no such setting.
    pub agent_forwarding_mode: SecurityMode,
}

/// A ContainerSSH security mode. `filter` is refused at validation for forwarding, as in
/// ContainerSSH; the empty string means the default.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SecurityMode {
    #[serde(rename = "")]
    #[default]
    Default,
    Enable,
    Filter,
    Disable,
}

/// The host side of the agent: which binary is copied into containers.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct AgentConfig {
    /// The static `containerssh-agent` to inject. Empty: the one next to this server's
    /// executable, when there is one and it is static.
    pub binary: String,
    /// `false`: never inject; images must carry the agent at `agentPath` themselves.
    pub inject: bool,
    /// Connection containers run the injected agent's `session-server` in place of the
    /// agent's `wait-signal` idle command, and sessions start through it (one message on an
    /// open stream) instead of an exec. `false`: every program is an exec.
    pub session_server: bool,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            binary: String::new(),
            inject: true,
            session_server: true,
        }
    }
}

/// `sandbox`: the identity the server drops to and its system-call filter. Numeric ids only: the
/// server never asks NSS for names (a static binary would have to `dlopen` it).
#[derive(Clone, Debug, Deserialize, Serialize, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct SandboxConfig {
    /// The uid to serve as when started as root. Required when started as root, unless
    /// `allowRoot` says otherwise.
    pub user: Option<u32>,
    /// The gid to serve as; defaults to `user`.
    pub group: Option<u32>,
    /// Extra groups kept after the drop, e.g. the Docker socket's group.
    pub supplementary_groups: Vec<u32>,
    pub seccomp: SeccompMode,
    /// Started as root without `user`: serve as uid 0 (every capability still dropped) instead
    /// of refusing to start. Logged as a warning at every start.
    pub allow_root: bool,
}

/// `sandbox.seccomp`: what a system call outside the allow-list does.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SeccompMode {
    /// The kernel kills the whole process.
    #[default]
    Enforce,
    /// The kernel logs the call (audit type 1326) and lets it run: for deriving the list.
    Log,
    /// No filter.
    Off,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ExecutionMode {
    /// One container per SSH connection; each session channel is an exec.
    #[default]
    Connection,
    /// One container per session channel.
    Session,
    /// Exec into an existing container named by `containername`; never removed by us.
    Persistent,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, Default, PartialEq, Eq)]
pub enum PullPolicy {
    Always,
    #[default]
    IfNotPresent,
    Never,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct DockerTimeouts {
    pub container_start: GoDuration,
    pub container_stop: GoDuration,
    pub command_start: GoDuration,
    pub signal: GoDuration,
    pub window: GoDuration,
    pub http: GoDuration,
}

impl Default for DockerTimeouts {
    fn default() -> Self {
        Self {
            container_start: GoDuration::from_secs(60),
            container_stop: GoDuration::from_secs(60),
            command_start: GoDuration::from_secs(60),
            signal: GoDuration::from_secs(60),
            window: GoDuration::from_secs(60),
            http: GoDuration::from_secs(15),
        }
    }
}

/// ContainerSSH's `kubernetes` block (0.6 layout), plus our `connection.kubeconfig`,
/// `connection.context`, `connection.inCluster` and `pod.agentInitImage`.
#[derive(Clone, Debug, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct KubernetesConfig {
    pub connection: KubernetesConnectionConfig,
    pub pod: KubernetesPodConfig,
    pub timeouts: KubernetesTimeouts,
}

/// Where the cluster is and how to authenticate. Which source is used (explicit fields, a
/// kubeconfig file, the in-cluster service account) is decided by
/// `backend::kubernetes::connection::resolve`, documented there.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct KubernetesConnectionConfig {
    /// `host`, `host:port`, `[v6]:port` or `https://host[:port][/prefix]` (port 443 if absent).
    pub host: String,
    /// The core API path; `/api` (the default) means no prefix before `/api/v1/...`.
    pub path: String,
    /// HTTP basic authentication (removed from kube-apiserver in 1.19; kept for compatibility).
    pub username: String,
    pub password: String,
    /// The name to verify the server's certificate against instead of the host's.
    pub server_name: String,
    /// PEM files: client certificate, its key, the CA bundle.
    pub cert_file: String,
    pub key_file: String,
    pub cacert_file: String,
    /// Inline PEM text (each excludes its `…File` twin).
    pub cert: String,
    pub key: String,
    pub cacert: String,
    pub bearer_token: String,
    /// Re-read periodically and after a 401 (service-account tokens rotate).
    pub bearer_token_file: String,
    /// Client-side request rate (client-go's throttle); 0 means the default.
    pub qps: f32,
    pub burst: u32,
    /// Ours: a kubeconfig file; `""` = `$KUBECONFIG` when nothing explicit is configured.
    pub kubeconfig: String,
    /// Ours: the kubeconfig context to use; `""` = its `current-context`.
    pub context: String,
    /// Ours: use the pod's service account (`true`), never (`false`) or when nothing else is
    /// configured and the process runs in a cluster (`auto`).
    pub in_cluster: InClusterMode,
}

impl Default for KubernetesConnectionConfig {
    fn default() -> Self {
        Self {
            host: defaults::kubernetes_host(),
            path: defaults::kubernetes_path(),
            username: String::new(),
            password: String::new(),
            server_name: String::new(),
            cert_file: String::new(),
            key_file: String::new(),
            cacert_file: String::new(),
            cert: String::new(),
            key: String::new(),
            cacert: String::new(),
            bearer_token: String::new(),
            bearer_token_file: String::new(),
            qps: defaults::kubernetes_qps(),
            burst: defaults::kubernetes_burst(),
            kubeconfig: String::new(),
            context: String::new(),
            in_cluster: InClusterMode::Auto,
        }
    }
}

/// `inCluster: true | false | auto`; written as a YAML boolean or a string.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum InClusterMode {
    True,
    False,
    #[default]
    Auto,
}

impl Serialize for InClusterMode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            InClusterMode::True => s.serialize_bool(true),
            InClusterMode::False => s.serialize_bool(false),
            InClusterMode::Auto => s.serialize_str("auto"),
        }
    }
}

impl<'de> Deserialize<'de> for InClusterMode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Form {
            Bool(bool),
            Text(String),
        }
        match Form::deserialize(d)? {
            Form::Bool(true) => Ok(InClusterMode::True),
            Form::Bool(false) => Ok(InClusterMode::False),
            Form::Text(t) => match t.as_str() {
                "true" => Ok(InClusterMode::True),
                "false" => Ok(InClusterMode::False),
                "auto" | "" => Ok(InClusterMode::Auto),
                _ => Err(serde::de::Error::custom("expected true, false or auto")),
            },
        }
    }
}

/// `kubernetes.pod`: the pod to create (or, in persistent mode, to exec into).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct KubernetesPodConfig {
    /// Kubernetes `ObjectMeta` (camelCase JSON names). No namespace: the connection's
    /// (kubeconfig context, in-cluster namespace file), else `default`. Neither `name` nor
    /// `generateName`: `generateName: containerssh-`.
    pub metadata: Map<String, Value>,
    /// Kubernetes `PodSpec`; checked for the essentials at validation.
    pub spec: Map<String, Value>,
    /// Which of `spec.containers` runs the shell.
    pub console_container_number: usize,
    pub mode: ExecutionMode,
    /// Persistent mode: create the pod named by `metadata.name` when it does not exist.
    pub create_missing_pods: bool,
    pub idle_command: Vec<String>,
    pub shell_command: Vec<String>,
    pub agent_path: String,
    pub disable_agent: bool,
    pub subsystems: BTreeMap<String, String>,
    /// Authentication metadata name → environment variable / label / annotation name.
    pub expose_auth_metadata_as_env: BTreeMap<String, String>,
    pub expose_auth_metadata_as_labels: BTreeMap<String, String>,
    pub expose_auth_metadata_as_annotations: BTreeMap<String, String>,
    /// Ours: the image of the init container that copies the agent into an `emptyDir`.
    /// Empty: this project's own image (decided by the backend).
    pub agent_init_image: String,
    /// (ours) Pods started ahead for connection-mode logins (off by default).
    pub pool: PoolConfig,
}

impl Default for KubernetesPodConfig {
    fn default() -> Self {
        Self {
            metadata: defaults::kubernetes_metadata(),
            spec: defaults::kubernetes_spec(),
            console_container_number: 0,
            mode: ExecutionMode::Connection,
            create_missing_pods: false,
            idle_command: defaults::idle_command(),
            shell_command: defaults::shell_command(),
            agent_path: defaults::agent_path(),
            disable_agent: false,
            subsystems: defaults::subsystems(),
            expose_auth_metadata_as_env: BTreeMap::new(),
            expose_auth_metadata_as_labels: BTreeMap::new(),
            expose_auth_metadata_as_annotations: BTreeMap::new(),
            agent_init_image: String::new(),
            pool: PoolConfig::default(),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct KubernetesTimeouts {
    pub pod_start: GoDuration,
    pub pod_stop: GoDuration,
    pub command_start: GoDuration,
    pub signal: GoDuration,
    pub window: GoDuration,
    pub http: GoDuration,
}

impl Default for KubernetesTimeouts {
    fn default() -> Self {
        Self {
            pod_start: GoDuration::from_secs(60),
            pod_stop: GoDuration::from_secs(60),
            command_start: GoDuration::from_secs(60),
            signal: GoDuration::from_secs(60),
            window: GoDuration::from_secs(60),
            http: GoDuration::from_secs(15),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct LogConfig {
    pub level: LogLevel,
    /// `ljson` (one JSON object per line) or `text`.
    pub format: LogFormat,
    /// `stdout`, `file` (`log.file`, reopened on SIGHUP) or `syslog` (`log.syslog`).
    pub destination: LogDestination,
    pub file: String,
    pub syslog: SyslogConfig,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: LogLevel::Notice,
            format: LogFormat::Ljson,
            destination: LogDestination::Stdout,
            file: "/var/log/containerssh/containerssh.log".into(),
            syslog: SyslogConfig::default(),
        }
    }
}

/// `log.syslog`: ContainerSSH's keys.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct SyslogConfig {
    /// A unix socket path, or `host:port` (UDP).
    pub destination: String,
    pub facility: String,
    pub tag: String,
    pub pid: bool,
}

impl Default for SyslogConfig {
    fn default() -> Self {
        Self {
            destination: "/dev/log".into(),
            facility: "auth".into(),
            tag: "ContainerSSH".into(),
            pid: false,
        }
    }
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Ljson,
    Text,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogDestination {
    #[default]
    Stdout,
    File,
    Syslog,
}

/// Syslog levels as ContainerSSH names them; numbers 0–7 are accepted too.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    Emergency = 0,
    Alert = 1,
    Critical = 2,
    Error = 3,
    Warning = 4,
    #[default]
    Notice = 5,
    Info = 6,
    Debug = 7,
}

impl LogLevel {
    /// Every level, in the order of their numbers.
    const ALL: [LogLevel; 8] = [
        LogLevel::Emergency,
        LogLevel::Alert,
        LogLevel::Critical,
        LogLevel::Error,
        LogLevel::Warning,
        LogLevel::Notice,
        LogLevel::Info,
        LogLevel::Debug,
    ];

    fn from_number(n: u8) -> Option<Self> {
        Self::ALL.get(usize::from(n)).copied()
    }

    fn from_name(s: &str) -> Option<Self> {
        let s = s.to_ascii_lowercase();
        let alias = match s.as_str() {
            "emerg" => "emergency",
            "crit" => "critical",
            "warn" => "warning",
            other => other,
        };
        Self::ALL.into_iter().find(|l| l.name() == alias)
    }

    fn name(self) -> &'static str {
        match self {
            LogLevel::Emergency => "emergency",
            LogLevel::Alert => "alert",
            LogLevel::Critical => "critical",
            LogLevel::Error => "error",
            LogLevel::Warning => "warning",
            LogLevel::Notice => "notice",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
        }
    }
}

impl Serialize for LogLevel {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for LogLevel {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Form {
            Num(u8),
            Text(String),
        }
        let bad = || {
            serde::de::Error::custom(
                "expected a log level: debug, info, notice, warning, error, critical, alert, emergency or 0-7",
            )
        };
        match Form::deserialize(d)? {
            Form::Num(n) => Self::from_number(n).ok_or_else(bad),
            Form::Text(t) => t
                .parse::<u8>()
                .ok()
                .and_then(Self::from_number)
                .or_else(|| Self::from_name(&t))
                .ok_or_else(bad),
        }
    }
}
