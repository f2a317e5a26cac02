//! Writes a connection's binary recording: the header, then the gzip stream of its messages,
//! and the disconnect message when the connection and its channels are gone.

use std::io::Write as _;

use flate2::write::GzEncoder;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use super::binary::{header, Clock, Record};
use super::{Done, Event, Kind, Stream};

/// Compressed bytes gathered before they are written out while events keep coming.
const BATCH_BYTES: usize = 256 * 1024;

pub(super) async fn write(
    mut file: tokio::fs::File,
    connection_id: String,
    mut rx: mpsc::Receiver<Event>,
    done: Done,
) {
    let clock = Clock::now();
    if let Err(e) = file.write_all(&header()).await {
        done.failed(&e);
        return;
    }
    // Compression is fast (level 1): the recording keeps up with the session first.
    let mut gz = GzEncoder::new(Vec::with_capacity(BATCH_BYTES), flate2::Compression::fast());
    let mut msg: Vec<u8> = Vec::with_capacity(64 * 1024);
    loop {
        let event = rx.recv().await;
        msg.clear();
        let end = event.is_none();
        match &event {
            Some(ev) => {
                let rec = match &ev.kind {
                    Kind::Data(stream, data) => Some(Record::Io(
                        match stream {
                            Stream::Stdin => 0,
                            Stream::Stdout => 1,
                            Stream::Stderr => 2,
                        },
                        data,
                    )),
                    Kind::Marker(_) => None,
                    Kind::Dropped(n) => Some(Record::Dropped(*n)),
                    Kind::Resize(c, r) => Some(Record::Window(*c, *r)),
                    Kind::Exit(how) => Some(Record::Exit(how)),
                    Kind::Msg(m) => Some(Record::Msg(m)),
                };
                if let Some(rec) = rec {
                    rec.encode(&connection_id, clock.ns(ev.at), ev.channel, &mut msg);
                }
                done.queue.written(ev.size());
            }
            None => Record::Disconnect.encode(
                &connection_id,
                clock.ns(std::time::Instant::now()),
                None,
                &mut msg,
            ),
        }
        // Writing into a vector cannot fail.
        let _ = gz.write_all(&msg);
        let out = if end {
            match std::mem::replace(
                &mut gz,
                GzEncoder::new(Vec::new(), flate2::Compression::fast()),
            )
            .finish()
            {
                Ok(v) => v,
                Err(e) => {
                    done.failed(&e);
                    return;
                }
            }
        } else if rx.is_empty() {
            // Nothing more waiting: everything so far goes out, so that the file of an idle
            // connection can be decoded up to now.
            let _ = gz.flush();
            std::mem::take(gz.get_mut())
        } else if gz.get_ref().len() >= BATCH_BYTES {
            std::mem::take(gz.get_mut())
        } else {
            continue;
        };
        let mut written = file.write_all(&out).await;
        if written.is_ok() {
            written = file.flush().await;
        }
        if let Err(e) = written {
            done.failed(&e);
            return;
        }
        if end {
            return;
        }
    }
}
