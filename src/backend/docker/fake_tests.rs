//! Tests against a scripted fake engine on a unix socket in a temp dir:
//! version negotiation, timeouts, size caps, pull stream errors and the
//! non-upgraded hijack fallback, which a healthy real engine never shows.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;

use super::*;

/// Canned reply for a request line (`"GET /version HTTP/1.1"`); `None` = never answer.
type Script = Arc<dyn Fn(&str) -> Option<Vec<u8>> + Send + Sync>;

fn reply(status: &str, body: &str) -> Option<Vec<u8>> {
    Some(
        format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes(),
    )
}

/// Answers `/version` with API 1.41 and everything else via `script`.
fn engine(script: impl Fn(&str) -> Option<Vec<u8>> + Send + Sync + 'static) -> Script {
    Arc::new(move |line: &str| {
        if line.starts_with("GET /version ") {
            reply("200 OK", r#"{"ApiVersion":"1.41"}"#)
        } else {
            script(line)
        }
    })
}

async fn fake(script: Script, timeout: Duration) -> (tempfile::TempDir, DockerClient) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("docker.sock");
    let listener = UnixListener::bind(&path).expect("bind");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let script = script.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&buf).into_owned();
                let line = head.lines().next().unwrap_or_default().to_string();
                match script(&line) {
                    Some(bytes) => {
                        let _ = s.write_all(&bytes).await;
                        let _ = s.shutdown().await;
                    }
                    None => tokio::time::sleep(Duration::from_secs(3600)).await,
                }
            });
        }
    });
    let conn = DockerConnection {
        host: format!("unix://{}", path.display()),
        ..Default::default()
    };
    let client = DockerClient::new(&conn, timeout).expect("client");
    (dir, client)
}

#[tokio::test]
async fn negotiation_caps_and_rejects_versions() {
    let new = Arc::new(|line: &str| {
        if line.starts_with("GET /version ") {
            reply("200 OK", r#"{"ApiVersion":"1.50","MinAPIVersion":"1.24"}"#)
        } else if line.starts_with("GET /v1.47/containers/x/json ") {
            reply("404 Not Found", r#"{"message":"No such container: x"}"#)
        } else {
            reply("400 Bad Request", r#"{"message":"wrong path"}"#)
        }
    });
    let (_d, c) = fake(new, Duration::from_secs(5)).await;
    assert_eq!(c.negotiate().await.expect("negotiate"), "1.47");
    assert!(matches!(
        c.inspect_container("x").await,
        Err(DockerError::NoSuchContainer { .. })
    ));
    let old = Arc::new(|_: &str| reply("200 OK", r#"{"ApiVersion":"1.39"}"#));
    let (_d, c) = fake(old, Duration::from_secs(5)).await;
    assert!(matches!(
        c.negotiate().await,
        Err(DockerError::ApiTooOld { .. })
    ));
}

#[tokio::test]
async fn silent_engine_times_out() {
    let (_d, c) = fake(Arc::new(|_: &str| None), Duration::from_millis(200)).await;
    let started = Instant::now();
    let e = c.negotiate().await.expect_err("must time out");
    assert!(matches!(e, DockerError::Timeout { op: "version" }), "{e}");
    assert!(started.elapsed() < Duration::from_secs(5));
    let silent_start = engine(|_| None);
    let (_d, c) = fake(silent_start, Duration::from_millis(200)).await;
    assert!(matches!(
        c.start_exec("e", false).await,
        Err(DockerError::Timeout { op: "exec start" })
    ));
}

#[tokio::test]
async fn oversized_body_is_rejected() {
    let big = engine(|_| {
        let body = "x".repeat(MAX_RESPONSE_BYTES + 1);
        reply("200 OK", &body)
    });
    let (_d, c) = fake(big, Duration::from_secs(10)).await;
    assert!(matches!(
        c.inspect_exec("e").await,
        Err(DockerError::Http {
            source: crate::http::HttpError::TooLarge { .. },
            ..
        })
    ));
}

#[tokio::test]
async fn status_errors_carry_engine_message() {
    let s = engine(|_| reply("500 Internal Server Error", r#"{"message":"boom"}"#));
    let (_d, c) = fake(s, Duration::from_secs(5)).await;
    match c.start_container("x").await {
        Err(DockerError::Status {
            op,
            status,
            message,
        }) => assert_eq!(
            (op, status, message.as_str()),
            ("container start", 500, "boom")
        ),
        other => panic!("unexpected {other:?}"),
    }
}

fn stream_reply(body: String) -> Option<Vec<u8>> {
    Some(format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{body}").into_bytes())
}

#[tokio::test]
async fn pull_stream_errors_and_success() {
    let s = engine(|line| {
        let progress = "{\"status\":\"Pulling fs layer\",\"id\":\"abc\"}\r\n".repeat(50);
        if line.contains("fromImage=bad&tag=1") {
            stream_reply(format!(
                "{progress}{{\"errorDetail\":{{\"message\":\"manifest unknown\"}},\"error\":\"manifest unknown\"}}\r\n"
            ))
        } else if line.contains("fromImage=huge&tag=latest") {
            stream_reply("x".repeat(MAX_PROGRESS_LINE_BYTES + 1))
        } else if line.contains("fromImage=reg%3A5000%2Fgood&tag=v2") {
            stream_reply(format!(
                "{progress}{{\"status\":\"Downloaded newer image\"}}\r\n"
            ))
        } else {
            reply("404 Not Found", r#"{"message":"pull access denied"}"#)
        }
    });
    let (_d, c) = fake(s, Duration::from_secs(5)).await;
    match c.pull_image("bad:1", None).await {
        Err(DockerError::PullFailed { message, .. }) => assert_eq!(message, "manifest unknown"),
        other => panic!("unexpected {other:?}"),
    }
    assert!(matches!(
        c.pull_image("huge", None).await,
        Err(DockerError::ResponseTooLarge { .. })
    ));
    c.pull_image("reg:5000/good:v2", Some("e30="))
        .await
        .expect("pull ok");
    match c.pull_image("other", None).await {
        Err(DockerError::PullFailed { message, .. }) => {
            assert!(message.contains("pull access denied"), "{message}")
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn hijack_without_upgrade_is_read_only() {
    let s = engine(|_| {
        let mut v =
            b"HTTP/1.1 200 OK\r\nContent-Type: application/vnd.docker.raw-stream\r\n\r\n".to_vec();
        v.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 3]);
        v.extend_from_slice(b"hi\n");
        Some(v)
    });
    let (_d, c) = fake(s, Duration::from_secs(5)).await;
    let mut h = c.start_exec("e", false).await.expect("start");
    assert!(!h.writer.is_writable());
    assert!(h.writer.write_all(b"x").await.is_err());
    let mut d = Demuxer::new(h.reader);
    let (kind, data) = d.next_frame().await.expect("frame").expect("some");
    assert_eq!((kind, &data[..]), (StreamKind::Stdout, &b"hi\n"[..]));
    assert!(d.next_frame().await.expect("eof").is_none());
}

/// One request as the fake engine received it: head (request line and headers) and body.
type Recorded = Arc<std::sync::Mutex<Vec<(String, Vec<u8>)>>>;

/// Like [`fake`] but reads each request's `Content-Length` body and records it.
async fn recording_fake(script: Script) -> (tempfile::TempDir, DockerClient, Recorded) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("docker.sock");
    let listener = UnixListener::bind(&path).expect("bind");
    let recorded: Recorded = Default::default();
    let log = recorded.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let (script, log) = (script.clone(), log.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 64 * 1024];
                let head_end = loop {
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                };
                let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
                let len: usize = head
                    .lines()
                    .filter_map(|l| l.split_once(':'))
                    .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                    .map_or(0, |(_, v)| v.trim().parse().expect("content-length"));
                while buf.len() < head_end + len {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let line = head.lines().next().unwrap_or_default().to_string();
                log.lock()
                    .expect("log")
                    .push((head, buf[head_end..head_end + len].to_vec()));
                if let Some(bytes) = script(&line) {
                    let _ = s.write_all(&bytes).await;
                    let _ = s.shutdown().await;
                }
            });
        }
    });
    let conn = DockerConnection {
        host: format!("unix://{}", path.display()),
        ..Default::default()
    };
    let client = DockerClient::new(&conn, Duration::from_secs(5)).expect("client");
    (dir, client, recorded)
}

#[tokio::test]
async fn put_archive_sends_tar_body_and_maps_errors() {
    let s = engine(|line| {
        if line.starts_with("PUT /v1.41/containers/c%2F1/archive?path=%2Fopt%2Fmy%20dir%3Fx%26y ") {
            Some(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n".to_vec())
        } else if line.contains("/containers/gone/") {
            reply("404 Not Found", r#"{"message":"No such container: gone"}"#)
        } else if line.contains("path=%2Fnope ") {
            reply(
                "404 Not Found",
                r#"{"message":"Could not find the file /nope in container c"}"#,
            )
        } else {
            reply("500 Internal Server Error", r#"{"message":"unexpected"}"#)
        }
    });
    let (_d, c, recorded) = recording_fake(s).await;
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let tar = build_tar(&[TarEntry {
        path: "agent",
        mode: 0o755,
        data: TarData::File(&data),
    }])
    .expect("tar");
    c.put_archive("c/1", "/opt/my dir?x&y", tar.clone())
        .await
        .expect("put archive");
    {
        let log = recorded.lock().expect("log");
        let (head, body) = log.last().expect("recorded request");
        let head = head.to_ascii_lowercase();
        assert!(
            head.contains("\r\ncontent-type: application/x-tar\r\n"),
            "{head}"
        );
        assert_eq!(head.matches("content-type").count(), 1, "{head}");
        assert!(body == &tar, "body differs from the tar bytes");
    }
    assert!(matches!(
        c.put_archive("gone", "/", tar.clone()).await,
        Err(DockerError::NoSuchContainer { id }) if id == "gone"
    ));
    match c.put_archive("c", "/nope", tar.clone()).await {
        Err(DockerError::Status {
            status, message, ..
        }) => assert_eq!(
            (status, message.as_str()),
            (404, "Could not find the file /nope in container c")
        ),
        other => panic!("unexpected {other:?}"),
    }
    let sent = recorded.lock().expect("log").len();
    let huge = vec![0u8; MAX_UPLOAD_BYTES + 1];
    assert!(matches!(
        c.put_archive("c", "/", huge).await,
        Err(DockerError::UploadTooLarge { .. })
    ));
    assert_eq!(recorded.lock().expect("log").len(), sent, "nothing is sent");
}
