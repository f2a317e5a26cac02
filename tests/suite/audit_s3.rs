//! `audit.storage: s3` against a real S3 server (moto's, PyPI `moto[server]`, on the
//! loopback), checked with the AWS SDK for Python (boto3, which moto brings): a recording
//! lands as a multipart object with ContainerSSH's metadata; one staged when the server was
//! killed is uploaded at its next start; a bucket that refuses writes leaves the session
//! working and the failure counted.

use crate::support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use support::{free_tcp_port, poll_until, run_with_timeout, Background, TestEnv};

const CMD_TIMEOUT: Duration = Duration::from_secs(90);

/// What the tests ask of the bucket, through boto3.
const S3CTL: &str = r#"
import boto3, json, sys
endpoint, op, bucket = sys.argv[1], sys.argv[2], sys.argv[3]
s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                  aws_access_key_id="test-access", aws_secret_access_key="test-secret")
if op == "create":
    s3.create_bucket(Bucket=bucket)
elif op == "list":
    out = []
    for o in s3.list_objects_v2(Bucket=bucket).get("Contents", []):
        head = s3.head_object(Bucket=bucket, Key=o["Key"])
        out.append({"key": o["Key"], "etag": o["ETag"], "size": o["Size"],
                    "metadata": head["Metadata"], "type": head.get("ContentType")})
    print(json.dumps(out))
elif op == "get":
    s3.download_file(bucket, sys.argv[4], sys.argv[5])
"#;

struct Moto {
    endpoint: String,
    process: Background,
}

impl Moto {
    fn start(env: &TestEnv) -> Moto {
        let port = free_tcp_port();
        let process = Background::spawn(
            Command::new("python3").args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ]),
            env.path(),
            "moto",
        );
        let mut moto = Moto {
            endpoint: format!("http://127.0.0.1:{port}"),
            process,
        };
        let up = poll_until(Duration::from_secs(60), Duration::from_millis(100), || {
            let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
            write!(s, "GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
            let mut text = String::new();
            s.read_to_string(&mut text).ok()?;
            text.starts_with("HTTP/1").then_some(())
        });
        assert!(
            up.is_some(),
            "moto_server did not start: {}",
            moto.process.stderr()
        );
        assert!(moto.process.exited().is_none());
        moto
    }

    fn ctl(&self, args: &[&str]) -> String {
        let out = run_with_timeout(
            Command::new("python3")
                .arg("-c")
                .arg(S3CTL)
                .arg(&self.endpoint)
                .args(args),
            None,
            CMD_TIMEOUT,
        );
        assert!(
            out.status.success(),
            "boto3 {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn objects(&self, bucket: &str) -> Vec<Value> {
        serde_json::from_str(&self.ctl(&["list", bucket])).unwrap()
    }
}

fn with_s3(yaml: &str, moto: &Moto, bucket: &str, local: &Path, extra: &str) -> String {
    format!(
        "{yaml}audit:\n  enable: true\n  format: binary\n  storage: s3\n  s3:\n    local: {}\n    endpoint: {}\n    bucket: {bucket}\n    region: us-east-1\n    accessKey: test-access\n    secretKey: test-secret-Gorilla-41\n    pathStyleAccess: true\n    uploadPartSize: 5242880\n    parallelUploads: 2\n    metadata:\n      ip: true\n      username: true\n  intercept:\n    stdout: true\n    stderr: true\n{extra}",
        local.display(),
        moto.endpoint
    )
}

fn staging(env: &TestEnv) -> std::path::PathBuf {
    let dir = env.path().join("staging");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    names.sort();
    names
}

/// Waits (bounded) for one object in `bucket`.
fn one_object(moto: &Moto, bucket: &str, context: impl Fn() -> String) -> Value {
    poll_until(Duration::from_secs(60), Duration::from_millis(250), || {
        let mut objs = moto.objects(bucket);
        (objs.len() == 1).then(|| objs.remove(0))
    })
    .unwrap_or_else(|| panic!("no object in {bucket}\n{}", context()))
}

fn decode_object(env: &TestEnv, moto: &Moto, bucket: &str, key: &str) -> Vec<Value> {
    let file = env.path().join(format!("downloaded-{key}"));
    moto.ctl(&["get", bucket, key, file.to_str().unwrap()]);
    support::audit_decode(&file).unwrap().0
}

#[test]
fn a_recording_lands_as_a_multipart_object_with_its_metadata() {
    let env = TestEnv::new();
    let moto = Moto::start(&env);
    moto.ctl(&["create", "recordings"]);
    let local = staging(&env);
    let server = env.start(&with_s3(
        &env.config_yaml("connection"),
        &moto,
        "recordings",
        &local,
        "",
    ));
    // 12 MB that do not compress: three parts of 5 MiB.
    let out = run_with_timeout(
        env.ssh(&server, "alice")
            .arg("head -c 12000000 /dev/urandom; echo done >&2"),
        None,
        CMD_TIMEOUT,
    );
    assert_eq!(out.status.code(), Some(0), "{}", server.output());
    assert_eq!(out.stdout.len(), 12_000_000);
    let obj = one_object(&moto, "recordings", || server.output());
    let key = obj["key"].as_str().unwrap();
    assert!(
        key.len() == 32 && key.chars().all(|c| c.is_ascii_hexdigit()),
        "{obj}"
    );
    // Parts of 5 MiB (the recording may have dropped bytes it could not keep up with: what
    // it kept plus what it says it dropped is the whole output).
    let size = obj["size"].as_u64().unwrap();
    assert!(size > 5 * 1024 * 1024, "{obj}");
    let parts = size.div_ceil(5 * 1024 * 1024);
    assert!(
        obj["etag"]
            .as_str()
            .unwrap()
            .ends_with(&format!("-{parts}\"")),
        "a multipart upload of {parts} parts: {obj}"
    );
    let md = &obj["metadata"];
    assert_eq!(md["username"], "alice", "{obj}");
    assert_eq!(md["ip"], "127.0.0.1", "{obj}");
    assert_eq!(md["authenticated"], "true", "{obj}");
    assert_eq!(md["country"], "XX", "{obj}");
    assert!(md["timestamp"].as_str().unwrap().parse::<u64>().unwrap() > 1_700_000_000);
    assert_eq!(obj["type"], "application/octet-stream");
    let msgs = decode_object(&env, &moto, "recordings", key);
    assert_eq!(
        msgs.last().unwrap()["type"],
        1,
        "complete: ends with the disconnect"
    );
    use base64::Engine as _;
    let stdout: usize = msgs
        .iter()
        .filter(|m| m["type"] == 500 && m["payload"]["stream"] == 1)
        .map(|m| support::audit_data(m).len())
        .sum();
    let dropped: usize = msgs
        .iter()
        .filter(|m| m["type"] == 400 && m["payload"]["requestType"] == "containerssh-audit-dropped")
        .map(|m| {
            let note = base64::engine::general_purpose::STANDARD
                .decode(m["payload"]["payload"].as_str().unwrap())
                .unwrap();
            let note = String::from_utf8(note).unwrap();
            note.split(' ').next().unwrap().parse::<usize>().unwrap()
        })
        .sum();
    assert_eq!(
        stdout + dropped,
        12_000_000,
        "kept {stdout}, dropped {dropped}"
    );
    assert!(stdout > 5 * 1024 * 1024, "kept {stdout}");
    // Uploaded, then gone from the staging directory (the sidecar too).
    let emptied = poll_until(Duration::from_secs(10), Duration::from_millis(50), || {
        files_in(&local).is_empty().then_some(())
    });
    assert!(emptied.is_some(), "{:?}", files_in(&local));
    assert!(server.output().contains("AUDIT_S3_MULTIPART_UPLOAD"));
    assert!(
        !server.output().contains("test-secret-Gorilla-41"),
        "the secret key is never logged"
    );
}

#[test]
fn a_recording_staged_when_the_server_was_killed_is_uploaded_at_the_next_start() {
    let env = TestEnv::new();
    let moto = Moto::start(&env);
    moto.ctl(&["create", "recordings"]);
    let local = staging(&env);
    let yaml = with_s3(
        &env.config_yaml("connection"),
        &moto,
        "recordings",
        &local,
        "",
    );
    let mut first = env.start(&yaml);
    let mut session = env.hold_session(&first, "echo ready; echo staged-output; sleep 600", || {
        first.output()
    });
    // The recording and its metadata wait in the staging directory.
    let staged = poll_until(Duration::from_secs(10), Duration::from_millis(50), || {
        let names = files_in(&local);
        (names.len() == 2).then_some(names)
    })
    .unwrap_or_else(|| panic!("{:?}", files_in(&local)));
    assert!(staged[1].ends_with(".metadata.json"), "{staged:?}");
    // A recording being written decodes up to its last message (flushed whenever the
    // writer is idle): wait for the program's output in it, then kill the server.
    let written = poll_until(Duration::from_secs(10), Duration::from_millis(50), || {
        let (msgs, _) = support::audit_decode(&local.join(&staged[0])).ok()?;
        msgs.iter().any(|m| m["typeId"] == "io").then_some(())
    });
    assert!(written.is_some(), "{}", first.output());
    first.kill9();
    let _ = session.kill();
    let _ = session.wait();
    assert!(moto.objects("recordings").is_empty());

    let second = env.start(&yaml);
    let obj = one_object(&moto, "recordings", || second.output());
    assert_eq!(obj["key"], staged[0].as_str());
    // Who logged in comes from the recording itself (the metadata was written at connect).
    assert_eq!(obj["metadata"]["username"], "alice", "{obj}");
    assert_eq!(obj["metadata"]["authenticated"], "true", "{obj}");
    assert!(
        !obj["etag"].as_str().unwrap().contains('-'),
        "one PUT: {obj}"
    );
    assert!(second.output().contains("AUDIT_S3_RECOVERING"));
    let msgs = decode_object(&env, &moto, "recordings", staged[0].as_str());
    assert_eq!(msgs[0]["typeId"], "connect");
    assert!(msgs.iter().any(|m| m["typeId"] == "io"), "{msgs:?}");
    let emptied = poll_until(Duration::from_secs(10), Duration::from_millis(50), || {
        files_in(&local).is_empty().then_some(())
    });
    assert!(emptied.is_some(), "{:?}", files_in(&local));
}

#[test]
fn a_bucket_that_refuses_writes_leaves_the_session_working_and_counts_the_failure() {
    let env = TestEnv::new();
    let moto = Moto::start(&env);
    let local = staging(&env);
    let metrics = free_tcp_port();
    let server = env.start(&with_s3(
        &env.config_yaml("connection"),
        &moto,
        "no-such-bucket",
        &local,
        &format!("metrics:\n  enable: true\n  listen: 127.0.0.1:{metrics}\n"),
    ));
    let out = run_with_timeout(
        env.ssh(&server, "alice").arg("echo still-works"),
        None,
        CMD_TIMEOUT,
    );
    assert_eq!(out.status.code(), Some(0), "{}", server.output());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "still-works\n");
    let counted = poll_until(Duration::from_secs(30), Duration::from_millis(100), || {
        support::metric_line(metrics, "containerssh_audit_upload_failures_total ")
            .filter(|l| !l.ends_with(" 0"))
    });
    assert!(counted.is_some(), "{}", server.output());
    assert!(
        server.output().contains("NoSuchBucket"),
        "the log says why: {}",
        server.output()
    );
    // Still staged for a later try.
    assert_eq!(files_in(&local).len(), 2, "{:?}", files_in(&local));
    // And the server still serves.
    let out = run_with_timeout(env.ssh(&server, "alice").arg("true"), None, CMD_TIMEOUT);
    assert_eq!(out.status.code(), Some(0), "{}", server.output());
}
