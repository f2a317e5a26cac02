//! The mux against a test double of the agent that speaks the protocol over in-memory pipes:
//! every bound the container side could break cuts it off instead of growing our memory.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use super::*;

/// The agent's side: what it writes reaches the mux as its stdout; what the mux writes, it
/// may read (or not).
struct Double {
    to_mux: DuplexStream,
    from_mux: DuplexStream,
}

fn start() -> (Arc<Mux>, mpsc::Receiver<Incoming>, Double) {
    let (agent_out, mux_reads) = tokio::io::duplex(256 * 1024);
    let (mux_writes, agent_in) = tokio::io::duplex(256 * 1024);
    let (mux, incoming) = Mux::start(
        "forwarding",
        Box::new(ReadOutput(mux_reads)),
        mux_writes,
        CancellationToken::new(),
    );
    let double = Double {
        to_mux: agent_out,
        from_mux: agent_in,
    };
    (mux, incoming, double)
}

impl Double {
    async fn send(&mut self, frame: Frame) -> std::io::Result<()> {
        let mut buf = Vec::new();
        frame.encode(&mut buf);
        self.to_mux.write_all(&buf).await
    }

    /// Reads the mux's next frame.
    async fn frame(&mut self) -> Frame {
        let mut buf = Vec::new();
        loop {
            if let Some((f, _)) = proto::decode(&buf).unwrap() {
                return f;
            }
            let mut chunk = [0u8; 4096];
            let n = self.from_mux.read(&mut chunk).await.unwrap();
            assert!(n > 0, "the mux closed its output");
            buf.extend_from_slice(&chunk[..n]);
        }
    }
}

async fn stopped_within(mux: &Mux, d: Duration) -> bool {
    tokio::time::timeout(d, mux.stopped.cancelled())
        .await
        .is_ok()
}

fn accepted(id: u32) -> Frame {
    Frame::Accepted {
        listener: 1,
        id,
        peer_port: 4000,
        peer: "127.0.0.1".into(),
    }
}

#[tokio::test]
async fn accepted_connections_nobody_takes_are_held_back_not_buffered() {
    let (mux, mut incoming, mut agent) = start();
    let flood = tokio::spawn(async move {
        for i in 0.. {
            if agent.send(accepted(AGENT_ID_BASE + i)).await.is_err() {
                return;
            }
        }
    });
    // The queue fills and the reader waits with one more in hand; the agent's writes then
    // stop at the pipe's capacity.
    let streams = || mux.state().streams.len();
    let full = MAX_PENDING_ACCEPTS + 1;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while streams() < full {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} streams",
            streams()
        );
        tokio::task::yield_now().await;
    }
    for _ in 0..1000 {
        tokio::task::yield_now().await;
    }
    assert_eq!(streams(), full, "held back at the queue");
    assert!(!mux.is_stopped());
    // Taking one lets exactly one more in.
    drop(incoming.recv().await.unwrap());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while mux.state().streams.len() != full {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::task::yield_now().await;
    }
    flood.abort();
}

#[tokio::test]
async fn live_streams_are_capped() {
    let (mux, mut incoming, mut agent) = start();
    // Taken at once, so the accept queue never fills: the stream cap is what stops it.
    let taker = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Some(i) = incoming.recv().await {
            held.push(i);
        }
        held.len()
    });
    for i in 0..(MAX_STREAMS as u32 + 1) {
        if agent.send(accepted(AGENT_ID_BASE + i)).await.is_err() {
            break;
        }
    }
    assert!(stopped_within(&mux, Duration::from_secs(5)).await);
    drop(agent);
    let held = taker.await.unwrap();
    assert_eq!(held, MAX_STREAMS);
}

#[tokio::test]
async fn data_beyond_the_credit_and_a_second_eof_cut_the_agent_off() {
    for flood in [
        vec![
            Frame::Data {
                id: AGENT_ID_BASE,
                data: vec![0; MAX_DATA],
            };
            (INITIAL_CREDIT as usize / MAX_DATA) + 1
        ],
        vec![Frame::Eof { id: AGENT_ID_BASE }; 2],
        vec![
            Frame::Eof { id: AGENT_ID_BASE },
            Frame::Data {
                id: AGENT_ID_BASE,
                data: vec![1],
            },
        ],
    ] {
        let (mux, mut incoming, mut agent) = start();
        agent.send(accepted(AGENT_ID_BASE)).await.unwrap();
        let _stream = incoming.recv().await.unwrap();
        for f in flood {
            let _ = agent.send(f).await;
        }
        assert!(stopped_within(&mux, Duration::from_secs(5)).await);
    }
}

#[tokio::test]
async fn tiny_frames_are_held_as_bytes_not_as_frames() {
    let (mux, mut incoming, mut agent) = start();
    agent.send(accepted(AGENT_ID_BASE)).await.unwrap();
    let inc = incoming.recv().await.unwrap();
    let (_sink, mut source) = inc.stream.split();
    // The whole credit in one-byte frames, then the Eof.
    for _ in 0..INITIAL_CREDIT {
        agent
            .send(Frame::Data {
                id: AGENT_ID_BASE,
                data: vec![7],
            })
            .await
            .unwrap();
    }
    agent.send(Frame::Eof { id: AGENT_ID_BASE }).await.unwrap();
    // Once all of it arrived, the stream holds it as bytes in one buffer, not as 262144
    // payloads.
    tokio::time::timeout(Duration::from_secs(10), async {
        while mux.state().streams.get(&AGENT_ID_BASE).map(|s| s.eof) != Some(true) {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("everything arrives");
    let held = {
        let st = mux.state();
        let inbox = st.streams.get(&AGENT_ID_BASE).unwrap().inbox.lock();
        (inbox.data.len(), inbox.data.capacity())
    };
    assert_eq!(held.0, INITIAL_CREDIT as usize);
    assert!(held.1 <= 2 * INITIAL_CREDIT as usize, "{held:?}");
    let mut got = 0;
    while got < INITIAL_CREDIT as usize {
        match source.recv().await.unwrap() {
            StreamEvent::Data(d) => got += d.len(),
            StreamEvent::Eof => panic!("EOF before the data"),
        }
    }
    assert_eq!(source.recv().await, Some(StreamEvent::Eof));
    assert!(!mux.is_stopped());
}

#[tokio::test]
async fn an_agent_that_stops_reading_holds_data_back_then_is_cut_off() {
    let (mux, mut incoming, mut agent) = start();
    agent.send(accepted(AGENT_ID_BASE)).await.unwrap();
    let inc = incoming.recv().await.unwrap();
    let (sink, mut source) = inc.stream.split();
    // Within the credit: queued (the pipe takes some, the queue the rest).
    sink.send(&vec![0u8; INITIAL_CREDIT as usize])
        .await
        .unwrap();
    // The agent sends and never reads: the acknowledgements for what it sent, and every
    // other control frame, pile up until the mux gives up on it.
    let flood = async {
        loop {
            let sent = agent
                .send(Frame::Data {
                    id: AGENT_ID_BASE,
                    data: vec![1; MAX_DATA],
                })
                .await;
            if sent.is_err() || mux.is_stopped() {
                return;
            }
            if let Some(StreamEvent::Data(d)) = source.recv().await {
                source.ack(d.len());
            }
            for _ in 0..64 {
                mux.resize(AGENT_ID_BASE, 24, 80);
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), flood)
        .await
        .expect("the mux cut the agent off");
    assert!(mux.is_stopped());
    assert!(mux.outbox.frames.lock().unwrap().is_empty());
}

/// What the agent sent is acknowledged once a quarter of its credit was delivered, not
/// frame by frame. An agent that spent its whole credit gets back all but less than a
/// quarter of it once everything was delivered (never waiting: what is held back is less
/// than what it may send).
#[tokio::test]
async fn acknowledgements_go_per_quarter_of_the_credit() {
    let (_mux, mut incoming, mut agent) = start();
    agent.send(accepted(AGENT_ID_BASE)).await.unwrap();
    let inc = incoming.recv().await.unwrap();
    let (_sink, mut source) = inc.stream.split();
    let frames = INITIAL_CREDIT as usize / 4096;
    let mut delivered = 0;
    for _ in 0..frames {
        agent
            .send(Frame::Data {
                id: AGENT_ID_BASE,
                data: vec![7; 4096],
            })
            .await
            .unwrap();
        // Delivered as it comes, one frame at a time.
        match source.recv().await {
            Some(StreamEvent::Data(d)) => {
                delivered += d.len();
                source.ack(d.len());
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(delivered, INITIAL_CREDIT as usize);
    let quarter = INITIAL_CREDIT / 4;
    let mut acks = Vec::new();
    let mut buf = Vec::new();
    while acks.iter().sum::<u32>() < INITIAL_CREDIT - quarter + 1 {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(10), agent.from_mux.read(&mut chunk))
            .await
            .expect("the credit comes back")
            .unwrap();
        assert!(n > 0, "the mux closed its output");
        buf.extend_from_slice(&chunk[..n]);
        while let Some((f, used)) = proto::decode(&buf).unwrap() {
            buf.drain(..used);
            match f {
                Frame::Ack { id, bytes } if id == AGENT_ID_BASE => acks.push(bytes),
                other => panic!("{other:?}"),
            }
        }
    }
    // 64 frames, 4 acknowledgements of a quarter each.
    assert_eq!(acks, vec![quarter; 4]);
}

#[tokio::test]
async fn x11_listen_is_one_request() {
    let (mux, _incoming, mut agent) = start();
    let call = tokio::spawn({
        let mux = Arc::clone(&mux);
        async move { mux.listen_x11(10, 100).await }
    });
    let f = agent.frame().await;
    let Frame::ListenX11 { id, first, count } = f else {
        panic!("{f:?}");
    };
    assert_eq!((first, count), (10, 100));
    agent.send(Frame::Opened { id, port: 12 }).await.unwrap();
    assert_eq!(call.await.unwrap().unwrap(), (id, 12));
}
