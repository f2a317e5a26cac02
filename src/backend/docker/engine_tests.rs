//! Tests against the real Docker engine at `unix:///var/run/docker.sock`.
//!
//! They use the small offline image [`TEST_IMAGE`] (static busybox on
//! `scratch`), built on demand from the host's `busybox-static` package.
//! Every container they create carries the label `containerssh_test=1` and
//! is removed again, also when a test fails.

use std::fs::File;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

const SOCKET: &str = "unix:///var/run/docker.sock";
/// Offline test image: static busybox on `scratch`.
pub(crate) const TEST_IMAGE: &str = "containerssh-test-busybox:latest";
/// Upper bound for one test, so a hang fails instead of blocking CI.
const TEST_TIMEOUT: Duration = Duration::from_secs(120);

fn client() -> DockerClient {
    let conn = DockerConnection {
        host: SOCKET.into(),
        ..Default::default()
    };
    DockerClient::new(&conn, Duration::from_secs(30)).expect("client")
}

async fn within<T>(fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(TEST_TIMEOUT, fut)
        .await
        .expect("test timed out")
}

/// Builds [`TEST_IMAGE`] unless present. Safe to call from parallel tests
/// and processes: the build runs under an exclusive lock on a file in the
/// temp dir (released by the OS even if the holder dies) and re-checks first.
pub(crate) async fn ensure_test_image(c: &DockerClient) {
    if c.image_exists(TEST_IMAGE).await.expect("image inspect") {
        return;
    }
    tokio::task::spawn_blocking(build_test_image_locked)
        .await
        .expect("build task");
    assert!(c.image_exists(TEST_IMAGE).await.expect("image inspect"));
}

fn build_test_image_locked() {
    build_image_locked(
        TEST_IMAGE,
        "FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\n",
    );
}

/// Builds `tag` from `dockerfile`, with the host's static busybox as
/// `busybox` in the build context, unless present; see [`ensure_test_image`].
fn build_image_locked(tag: &str, dockerfile: &str) {
    let lock_name = format!("{}.lock", tag.replace([':', '/'], "-"));
    let lock_path = std::env::temp_dir().join(lock_name);
    let lock = File::create(&lock_path).expect("create lock file");
    lock.lock().expect("lock");
    let present = Command::new("docker")
        .args(["image", "inspect", "--format", "{{.Id}}", tag])
        .output()
        .is_ok_and(|o| o.status.success());
    if present {
        return;
    }
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("no /bin/busybox: apt-get install -y busybox-static");
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::copy(busybox, dir.path().join("busybox")).expect("copy busybox");
    std::fs::write(dir.path().join("Dockerfile"), dockerfile).expect("write Dockerfile");
    let out = Command::new("docker")
        .args(["build", "-q", "-t", tag])
        .arg(dir.path())
        .output()
        .expect("run docker build");
    assert!(
        out.status.success(),
        "docker build of {tag} failed (is busybox-static installed?): {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Removes the container when dropped, also on panic.
struct Cleanup(String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["rm", "-f", "-v", &self.0])
            .output();
    }
}

/// Creates a labelled test container; `extra` is merged into the body.
async fn create(c: &DockerClient, cmd: &[&str], extra: Value) -> Cleanup {
    ensure_test_image(c).await;
    let mut body = json!({
        "Image": TEST_IMAGE,
        "Cmd": cmd,
        "Labels": {"containerssh_test": "1"},
        "AttachStdout": true,
        "AttachStderr": true,
    });
    if let (Some(b), Value::Object(e)) = (body.as_object_mut(), extra) {
        b.extend(e);
    }
    Cleanup(c.create_container(None, None, &body).await.expect("create"))
}

/// Collects demultiplexed stdout and stderr until EOF.
async fn demux_all(reader: HijackedReader) -> (Vec<u8>, Vec<u8>) {
    let mut d = Demuxer::new(reader);
    let (mut out, mut err) = (Vec::new(), Vec::new());
    while let Some((kind, chunk)) = d.next_frame().await.expect("demux") {
        match kind {
            StreamKind::Stdout => out.extend_from_slice(&chunk),
            StreamKind::Stderr => err.extend_from_slice(&chunk),
            other => panic!("unexpected stream {other:?}"),
        }
    }
    (out, err)
}

#[tokio::test]
async fn negotiate_picks_supported_version() {
    let v = within(client().negotiate()).await.expect("negotiate");
    let parsed = client::parse_api_version(&v).expect("parsable");
    assert!(((1, 40)..=(1, 47)).contains(&parsed), "{v}");
}

#[tokio::test]
async fn attach_before_start_demuxes_output_and_exit_code() {
    within(async {
        let c = client();
        let cmd = ["sh", "-c", "echo hi; echo err >&2; exit 3"];
        let ct = create(&c, &cmd, json!({})).await;
        let h = c.attach_container(&ct.0).await.expect("attach");
        c.start_container(&ct.0).await.expect("start");
        c.start_container(&ct.0)
            .await
            .expect("second start (304) is ok");
        let (out, err) = demux_all(h.reader).await;
        assert_eq!(out, b"hi\n");
        assert_eq!(err, b"err\n");
        assert_eq!(c.wait_container(&ct.0).await.expect("wait"), 3);
        let info = c.inspect_container(&ct.0).await.expect("inspect");
        assert!(!info.running);
        assert_eq!((info.exit_code, info.status.as_str()), (3, "exited"));
        c.remove_container(&ct.0).await.expect("remove");
    })
    .await
}

#[tokio::test]
async fn attach_stdin_eof_reaches_container_with_stdin_once() {
    within(async {
        let c = client();
        let extra = json!({"OpenStdin": true, "StdinOnce": true, "AttachStdin": true});
        let ct = create(&c, &["cat"], extra).await;
        let mut h = c.attach_container(&ct.0).await.expect("attach");
        c.start_container(&ct.0).await.expect("start");
        h.writer.write_all(b"abc").await.expect("write");
        h.writer.shutdown().await.expect("half-close");
        let (out, _) = demux_all(h.reader).await;
        assert_eq!(out, b"abc");
        assert_eq!(c.wait_container(&ct.0).await.expect("wait"), 0);
    })
    .await
}

#[tokio::test]
async fn exec_cat_round_trips_one_mib_and_exits_zero() {
    within(async {
        let c = client();
        let ct = create(&c, &["sleep", "300"], json!({})).await;
        c.start_container(&ct.0).await.expect("start");
        let spec = ExecSpec {
            cmd: vec!["cat".into()],
            ..Default::default()
        };
        let exec = c.create_exec(&ct.0, &spec).await.expect("exec create");
        let h = c.start_exec(&exec, false).await.expect("exec start");
        let data: Vec<u8> = (0..1024 * 1024u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
            .collect();
        let expected = data.clone();
        let mut writer = h.writer;
        let feeder = tokio::spawn(async move {
            writer.write_all(&data).await.expect("write stdin");
            writer.shutdown().await.expect("half-close stdin");
        });
        let (out, err) = demux_all(h.reader).await;
        feeder.await.expect("feeder");
        assert!(err.is_empty());
        assert_eq!(out.len(), expected.len());
        assert!(out == expected, "output differs from input");
        let code = c.exec_exit_code(&exec, Duration::from_secs(5)).await;
        assert_eq!(code.expect("exit code"), 0);
    })
    .await
}

#[tokio::test]
async fn exec_exit_code_available_after_stream_end() {
    within(async {
        let c = client();
        let ct = create(&c, &["sleep", "300"], json!({})).await;
        c.start_container(&ct.0).await.expect("start");
        let spec = ExecSpec {
            cmd: vec!["sh".into(), "-c".into(), "echo $FOO; exit 7".into()],
            env: vec!["FOO=bar".into()],
            working_dir: Some("/bin".into()),
            ..Default::default()
        };
        let exec = c.create_exec(&ct.0, &spec).await.expect("exec create");
        let mut h = c.start_exec(&exec, false).await.expect("exec start");
        h.writer.shutdown().await.expect("half-close");
        let (out, _) = demux_all(h.reader).await;
        assert_eq!(out, b"bar\n");
        let started = Instant::now();
        let code = c.exec_exit_code(&exec, Duration::from_secs(5)).await;
        assert_eq!(code.expect("exit code"), 7);
        eprintln!("exit code after {:?}", started.elapsed());
        let info = c.inspect_exec(&exec).await.expect("inspect");
        assert_eq!((info.running, info.exit_code), (false, Some(7)));
        assert!(matches!(
            c.inspect_exec("no-such-exec").await,
            Err(DockerError::NoSuchExec { .. })
        ));
    })
    .await
}

/// On API 1.41 `ConsoleSize` is ignored and resizing an exec before start
/// blocks ~10 s and fails, so the reliable way to have the size set before
/// the program runs is a `stty rows R cols C; exec prog` wrapper.
#[tokio::test]
async fn exec_tty_size_before_program_runs() {
    within(async {
        let c = client();
        let ct = create(&c, &["sleep", "300"], json!({})).await;
        c.start_container(&ct.0).await.expect("start");
        let version = c.negotiate().await.expect("negotiate");
        let mut cmds = vec![vec![
            "sh".to_string(),
            "-c".to_string(),
            "stty rows 41 cols 101; exec stty size".to_string(),
        ]];
        if client::parse_api_version(&version) >= Some((1, 42)) {
            cmds.push(vec!["stty".into(), "size".into()]);
        }
        for cmd in cmds {
            let spec = ExecSpec {
                cmd,
                tty: true,
                console_size: Some((41, 101)),
                ..Default::default()
            };
            let exec = c.create_exec(&ct.0, &spec).await.expect("exec create");
            let mut h = c.start_exec(&exec, true).await.expect("exec start");
            let mut out = Vec::new();
            h.reader.read_to_end(&mut out).await.expect("read raw tty");
            assert_eq!(String::from_utf8_lossy(&out), "41 101\r\n");
        }
    })
    .await
}

#[tokio::test]
async fn resize_reaches_running_tty_exec_and_container() {
    within(async {
        let c = client();
        let wait_for =
            "until [ \"$(stty size 2>/dev/null)\" = \"50 120\" ]; do sleep 0.02; done; echo ok";
        let extra = json!({"Tty": true});
        let ct = create(&c, &["sh", "-c", wait_for], extra).await;
        let mut h = c.attach_container(&ct.0).await.expect("attach");
        c.start_container(&ct.0).await.expect("start");
        c.resize_container(&ct.0, 50, 120).await.expect("resize");
        let mut out = Vec::new();
        h.reader.read_to_end(&mut out).await.expect("read");
        assert_eq!(out, b"ok\r\n");
        assert_eq!(c.wait_container(&ct.0).await.expect("wait"), 0);

        let ct = create(&c, &["sleep", "300"], json!({})).await;
        c.start_container(&ct.0).await.expect("start");
        let spec = ExecSpec {
            cmd: vec!["sh".into(), "-c".into(), wait_for.into()],
            tty: true,
            ..Default::default()
        };
        let exec = c.create_exec(&ct.0, &spec).await.expect("exec create");
        let mut h = c.start_exec(&exec, true).await.expect("exec start");
        c.resize_exec(&exec, 50, 120).await.expect("exec resize");
        let mut out = Vec::new();
        h.reader.read_to_end(&mut out).await.expect("read");
        assert_eq!(out, b"ok\r\n");
    })
    .await
}

#[tokio::test]
async fn kill_and_missing_container_errors() {
    within(async {
        let c = client();
        let ct = create(&c, &["sleep", "300"], json!({})).await;
        assert!(matches!(
            c.kill_container(&ct.0, "SIGKILL").await,
            Err(DockerError::NotRunning { .. })
        ));
        c.start_container(&ct.0).await.expect("start");
        assert!(c.inspect_container(&ct.0).await.expect("inspect").pid > 0);
        c.kill_container(&ct.0, "SIGKILL").await.expect("kill");
        assert_eq!(c.wait_container(&ct.0).await.expect("wait"), 137);
        let missing = "containerssh-test-no-such-container";
        assert!(matches!(
            c.inspect_container(missing).await,
            Err(DockerError::NoSuchContainer { .. })
        ));
        assert!(matches!(
            c.start_container(missing).await,
            Err(DockerError::NoSuchContainer { .. })
        ));
        assert!(matches!(
            c.attach_container(missing).await,
            Err(DockerError::NoSuchContainer { .. })
        ));
    })
    .await
}

#[tokio::test]
async fn remove_container_twice_is_ok() {
    within(async {
        let c = client();
        let ct = create(&c, &["sleep", "300"], json!({})).await;
        c.start_container(&ct.0).await.expect("start");
        c.remove_container(&ct.0).await.expect("first remove");
        c.remove_container(&ct.0).await.expect("second remove");
        assert!(matches!(
            c.inspect_container(&ct.0).await,
            Err(DockerError::NoSuchContainer { .. })
        ));
    })
    .await
}

#[tokio::test]
async fn list_containers_filters_by_label() {
    within(async {
        let c = client();
        let run = format!("{}-{:?}", std::process::id(), Instant::now());
        let labels = json!({"Labels": {"containerssh_test": "1", "containerssh_test_run": run}});
        let a = create(&c, &["true"], labels.clone()).await;
        let b = create(&c, &["true"], labels).await;
        let _other = create(&c, &["true"], json!({})).await;
        let mut ids = c
            .list_containers(&[("containerssh_test", "1"), ("containerssh_test_run", &run)])
            .await
            .expect("list");
        ids.sort();
        let mut want = vec![a.0.clone(), b.0.clone()];
        want.sort();
        assert_eq!(ids, want);
    })
    .await
}

#[tokio::test]
async fn missing_image_is_reported() {
    within(async {
        let c = client();
        let image = "containerssh-test-missing-image:nope";
        assert!(!c.image_exists(image).await.expect("image inspect"));
        let body = json!({"Image": image, "Labels": {"containerssh_test": "1"}});
        match c.create_container(None, None, &body).await {
            Err(DockerError::ImageNotFound { image: i }) => assert_eq!(i, image),
            other => panic!("expected ImageNotFound, got {other:?}"),
        }
    })
    .await
}

/// No registry is reachable here: a loopback registry refuses the
/// connection, so the pull must fail promptly with the engine's message.
#[tokio::test]
async fn pull_from_unreachable_registry_fails_fast() {
    let c = client();
    let started = Instant::now();
    let result = tokio::time::timeout(
        Duration::from_secs(60),
        c.pull_image("127.0.0.1:1/containerssh-test-missing:1", None),
    )
    .await
    .expect("pull did not fail within 60 s");
    eprintln!("pull failed after {:?}: {result:?}", started.elapsed());
    match result {
        Err(DockerError::PullFailed { message, .. }) => assert!(!message.is_empty()),
        other => panic!("expected PullFailed, got {other:?}"),
    }
}

/// Image whose only file is `/busybox`: no `/bin`, no `/cssh`, no shell.
const SCRATCH_IMAGE: &str = "containerssh-test-scratch:latest";

async fn ensure_scratch_image(c: &DockerClient) {
    if c.image_exists(SCRATCH_IMAGE).await.expect("image inspect") {
        return;
    }
    tokio::task::spawn_blocking(|| {
        build_image_locked(SCRATCH_IMAGE, "FROM scratch\nCOPY busybox /busybox\n")
    })
    .await
    .expect("build task");
    assert!(c.image_exists(SCRATCH_IMAGE).await.expect("image inspect"));
}

/// Attaches, starts and collects output and exit code of a created container.
async fn run_created(c: &DockerClient, id: &str) -> (Vec<u8>, Vec<u8>, i64) {
    let h = c.attach_container(id).await.expect("attach");
    c.start_container(id).await.expect("start");
    let (out, err) = demux_all(h.reader).await;
    (out, err, c.wait_container(id).await.expect("wait"))
}

fn host_busybox() -> Vec<u8> {
    ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find_map(|p| std::fs::read(p).ok())
        .expect("no /bin/busybox: apt-get install -y busybox-static")
}

#[tokio::test]
async fn put_archive_injects_script_before_start() {
    within(async {
        let c = client();
        let ct = create(&c, &["/cssh/hello.sh"], json!({})).await;
        let tar = build_tar(&[
            TarEntry {
                path: "cssh",
                mode: 0o755,
                data: TarData::Dir,
            },
            TarEntry {
                path: "cssh/hello.sh",
                mode: 0o755,
                data: TarData::File(b"#!/bin/sh\necho injected\n"),
            },
        ])
        .expect("tar");
        c.put_archive(&ct.0, "/", tar).await.expect("put archive");
        let (out, err, code) = run_created(&c, &ct.0).await;
        assert_eq!(
            (String::from_utf8_lossy(&out), String::from_utf8_lossy(&err)),
            ("injected\n".into(), "".into())
        );
        assert_eq!(code, 0);
    })
    .await
}

#[tokio::test]
async fn put_archive_creates_missing_dir_in_scratch_image() {
    within(async {
        let c = client();
        ensure_scratch_image(&c).await;
        let extra = json!({"Image": SCRATCH_IMAGE});
        // busybox picks the applet from argv[0] unless its name starts with `busybox`.
        let ct = create(&c, &["/cssh/busybox", "echo", "ok"], extra).await;
        let bb = host_busybox();
        let file_only = build_tar(&[TarEntry {
            path: "busybox",
            mode: 0o755,
            data: TarData::File(&bb),
        }])
        .expect("tar");
        // The target directory must exist in the container.
        match c.put_archive(&ct.0, "/cssh", file_only).await {
            Err(DockerError::Status {
                status: 404,
                message,
                ..
            }) => assert!(
                message.contains("Could not find the file /cssh"),
                "{message}"
            ),
            other => panic!("expected 404 Status, got {other:?}"),
        }
        let tar = build_tar(&[
            TarEntry {
                path: "cssh",
                mode: 0o755,
                data: TarData::Dir,
            },
            TarEntry {
                path: "cssh/busybox",
                mode: 0o755,
                data: TarData::File(&bb),
            },
        ])
        .expect("tar");
        c.put_archive(&ct.0, "/", tar).await.expect("put archive");
        let (out, err, code) = run_created(&c, &ct.0).await;
        assert_eq!(out, b"ok\n", "stderr: {}", String::from_utf8_lossy(&err));
        assert_eq!(code, 0);
    })
    .await
}

#[tokio::test]
async fn put_archive_errors() {
    within(async {
        let c = client();
        let tar = build_tar(&[TarEntry {
            path: "x",
            mode: 0o644,
            data: TarData::File(b"x"),
        }])
        .expect("tar");
        let missing = "containerssh-test-no-such-container";
        assert!(matches!(
            c.put_archive(missing, "/", tar.clone()).await,
            Err(DockerError::NoSuchContainer { .. })
        ));
        let ct = create(&c, &["true"], json!({})).await;
        // Docker 20.10 answers 500, not 400, when the path is a file.
        match c.put_archive(&ct.0, "/bin/busybox", tar.clone()).await {
            Err(DockerError::Status { message, .. }) => {
                assert!(message.contains("not a directory"), "{message}")
            }
            other => panic!("expected Status, got {other:?}"),
        }
        match c.put_archive(&ct.0, "/", b"garbage".to_vec()).await {
            Err(DockerError::Status { message, .. }) => assert!(!message.is_empty()),
            other => panic!("expected Status, got {other:?}"),
        }
        let ro = create(
            &c,
            &["true"],
            json!({"HostConfig": {"ReadonlyRootfs": true}}),
        )
        .await;
        match c.put_archive(&ro.0, "/", tar).await {
            Err(DockerError::Status { message, .. }) => {
                assert!(message.contains("read-only"), "{message}")
            }
            other => panic!("expected Status, got {other:?}"),
        }
    })
    .await
}

/// Times uploading a 2 MiB file (the size of the helper binary) into a created container.
#[tokio::test]
async fn put_archive_two_mib_timing() {
    within(async {
        let c = client();
        let ct = create(
            &c,
            &["/bin/sh", "-c", "exec wc -c < /cssh/agent"],
            json!({}),
        )
        .await;
        let data: Vec<u8> = (0..2 * 1024 * 1024u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
            .collect();
        let started = Instant::now();
        let tar = build_tar(&[
            TarEntry {
                path: "cssh",
                mode: 0o755,
                data: TarData::Dir,
            },
            TarEntry {
                path: "cssh/agent",
                mode: 0o755,
                data: TarData::File(&data),
            },
        ])
        .expect("tar");
        let build = started.elapsed();
        let mut times = Vec::new();
        for _ in 0..7 {
            let body = tar.clone();
            let started = Instant::now();
            c.put_archive(&ct.0, "/", body).await.expect("put archive");
            times.push(started.elapsed());
        }
        times.sort();
        eprintln!(
            "put_archive 2 MiB: median {:?}, min {:?}, max {:?} (build_tar {build:?})",
            times[times.len() / 2],
            times[0],
            times[times.len() - 1]
        );
        let (out, _, code) = run_created(&c, &ct.0).await;
        assert_eq!((String::from_utf8_lossy(&out).trim(), code), ("2097152", 0));
    })
    .await
}
