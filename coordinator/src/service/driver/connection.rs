//! One peer's connection task: reassembles and decodes frames under the connection's current
//! limits, forwards messages to the driver, writes the driver's frames, and enforces every
//! per-peer deadline.
//!
//! What one peer can make the coordinator hold (besides the transport's own buffers, bounded by
//! the QUIC flow-control windows):
//! - until its check-in has verified *and* it has been sent a task, frames larger than
//!   [`DriverConfig::unauthenticated_max_frame_bytes`] are refused from their header, before the
//!   body is buffered;
//! - a selected client may send one frame of up to [`DriverConfig::max_frame_bytes`]; the buffer
//!   is released once the frame is consumed;
//! - at most [`DriverConfig::outbound_queue`] frames wait to be written to it, and those share
//!   their bytes with every other recipient of the same task.
//!
//! Deadlines (a peer that misses one is closed with the reason):
//! - check-in: a verified check-in within [`DriverConfig::checkin_timeout`] of attaching; bytes
//!   that arrive do not extend it;
//! - frame: a frame whose first bytes arrived completes within [`DriverConfig::frame_timeout`]
//!   (slow-loris);
//! - send: every frame is written within [`DriverConfig::send_timeout`] (a peer that stops
//!   reading stalls flow control);
//! - silence: no complete message for [`DriverConfig::idle_timeout`].

use super::{Command, ConnId, DriverConfig, Outbound};
use bytes::Bytes;
use starling_proto::codec::{Codec, FrameBuffer, Inbound};
use starling_sdk::transport::Connection;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// Which deadline is nearest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Deadline {
    CheckIn,
    Frame,
    Idle,
}

impl Deadline {
    fn reason(self) -> &'static str {
        match self {
            Deadline::CheckIn => "no authenticated check-in in time",
            Deadline::Frame => "frame not completed in time",
            Deadline::Idle => "idle timeout",
        }
    }
}

pub(super) async fn connection_task<C: Connection>(
    mut conn: C,
    id: ConnId,
    driver: mpsc::Sender<Command>,
    config: Arc<DriverConfig>,
    bytes: Arc<super::ByteStats>,
) {
    let counted = bytes;
    let (out_tx, mut out_rx) = mpsc::channel(config.outbound_queue.max(1));
    let (reply, accepted) = oneshot::channel();
    if driver.send(Command::Attach { conn: id, out: out_tx, reply }).await.is_err() {
        conn.close("coordinator unavailable").await;
        return;
    }
    match accepted.await {
        Ok(true) => {}
        Ok(false) => {
            conn.close("too many connections").await;
            return;
        }
        Err(_) => {
            conn.close("coordinator unavailable").await;
            return;
        }
    }
    let small = config.unauthenticated_max_frame_bytes.min(config.max_frame_bytes);
    let negotiation = Codec::default().encode_version_negotiation();
    let mut frames = FrameBuffer::new(Codec::new(small));
    let start = Instant::now();
    let mut checkin_deadline = Some(start + config.checkin_timeout);
    let mut partial_since: Option<Instant> = None;
    let mut last_message = start;
    let mut window = (start, 0u32);
    let reason: Option<String> = 'serve: loop {
        let (deadline, which) = [
            checkin_deadline.map(|t| (t, Deadline::CheckIn)),
            partial_since.map(|t| (t + config.frame_timeout, Deadline::Frame)),
            Some((last_message + config.idle_timeout, Deadline::Idle)),
        ]
        .into_iter()
        .flatten()
        .min_by_key(|(t, _)| *t)
        .expect("the idle deadline is always set");
        tokio::select! {
            // The driver's instructions first: a close or a lifted deadline must not wait behind
            // a peer that keeps sending.
            biased;
            out = out_rx.recv() => match out {
                Some(Outbound::Frame { bytes, upload }) => {
                    // A task lets the peer send one model-sized update; anything else (receipt,
                    // rejection, abort, come back later) takes the permission back.
                    frames.set_max_frame_bytes(if upload { config.max_frame_bytes } else { small });
                    let n = bytes.len() as u64;
                    if let Err(reason) = send(&mut conn, bytes, config.send_timeout).await {
                        break 'serve Some(reason);
                    }
                    counted.sent.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                }
                Some(Outbound::Authenticated) => checkin_deadline = None,
                Some(Outbound::Close(reason)) => break 'serve Some(reason),
                None => break 'serve None,
            },
            received = conn.recv() => {
                let bytes = match received {
                    Err(e) => break 'serve Some(e.to_string()),
                    Ok(None) => break 'serve None,
                    Ok(Some(bytes)) => bytes,
                };
                counted.received.fetch_add(bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
                frames.push(&bytes);
                loop {
                    match frames.next_client() {
                        Ok(None) => break,
                        Ok(Some(Inbound::Message { message, .. })) => {
                            let now = Instant::now();
                            last_message = now;
                            if now.duration_since(window.0) >= Duration::from_secs(1) {
                                window = (now, 0);
                            }
                            window.1 += 1;
                            if window.1 > config.max_messages_per_sec {
                                break 'serve Some("rate limit exceeded".into());
                            }
                            if driver.send(Command::Message { conn: id, message }).await.is_err() {
                                break 'serve Some("coordinator stopped".into());
                            }
                        }
                        Ok(Some(Inbound::UnsupportedVersion { version })) => {
                            let _ = send(&mut conn, Bytes::from(negotiation), config.send_timeout).await;
                            break 'serve Some(format!("unsupported protocol version {version}"));
                        }
                        Ok(Some(Inbound::VersionNegotiation { .. })) => {
                            break 'serve Some("unexpected version negotiation from a client".into());
                        }
                        Err(e) => break 'serve Some(format!("invalid frame: {e}")),
                    }
                }
                partial_since = match (frames.buffered(), partial_since) {
                    (0, _) => None,
                    (_, Some(t)) => Some(t),
                    (_, None) => Some(Instant::now()),
                };
            }
            _ = tokio::time::sleep_until(deadline) => break 'serve Some(which.reason().into()),
        }
    };
    if let Some(r) = &reason {
        tracing::debug!(conn = id, reason = %r, "connection closed");
    }
    drop(frames);
    conn.close(reason.as_deref().unwrap_or("done")).await;
    let _ = driver.send(Command::Closed { conn: id, reason }).await;
}

async fn send<C: Connection>(conn: &mut C, bytes: Bytes, limit: Duration) -> Result<(), String> {
    match tokio::time::timeout(limit, conn.send(bytes)).await {
        Err(_) => Err("send timed out (the peer is not reading)".into()),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(())) => Ok(()),
    }
}
