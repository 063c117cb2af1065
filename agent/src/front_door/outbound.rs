//! What goes back to a client: [`pump`], the task that writes a connection's frames whole and
//! in order, bounded in frames and in bytes, and the acknowledgements it is owed ([`Owed`]),
//! which [`flush`] sends in order once their records are committed.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use super::Session;
use crate::buffer::Receipts;
use crate::mqtt::{self, kind};

/// Frames queued towards one client (or towards rumqttd for it) before their sender waits...
const OUTBOUND_FRAMES: usize = 256;
/// ...or bytes of them (a frame larger than this takes all of it).
const OUTBOUND_BYTES: u32 = 1 << 20;
/// Frames smaller than this queued together towards one peer are written at once.
const COALESCE_BYTES: usize = 64 << 10;

/// The sending side of a [`pump`]: bounded in frames and in bytes, so a slow reader holds at
/// most [`OUTBOUND_BYTES`] (or one larger frame) of memory per direction.
#[derive(Clone)]
pub(super) struct Outbound {
    pub(super) frames: mpsc::Sender<(Bytes, tokio::sync::OwnedSemaphorePermit)>,
    pub(super) bytes: Arc<tokio::sync::Semaphore>,
}

impl Outbound {
    pub(super) fn room(frame: &Bytes) -> u32 {
        u32::try_from(frame.len())
            .unwrap_or(u32::MAX)
            .min(OUTBOUND_BYTES)
    }

    /// Queues `frame`, waiting for room; `Err`: the pump is gone.
    pub(super) async fn send(&self, frame: Bytes) -> Result<(), ()> {
        let room = self
            .bytes
            .clone()
            .acquire_many_owned(Self::room(&frame))
            .await
            .map_err(|_| ())?;
        self.frames.send((frame, room)).await.map_err(|_| ())
    }

    /// Queues `frame` if there is room now.
    pub(super) fn try_send(&self, frame: Bytes) -> Result<(), ()> {
        let room = self
            .bytes
            .clone()
            .try_acquire_many_owned(Self::room(&frame))
            .map_err(|_| ())?;
        self.frames.try_send((frame, room)).map_err(|_| ())
    }
}

/// A task writing the frames sent to the returned queue to `sink`, whole and in order, until
/// the queue closes or a write fails; then it shuts `sink` down.
pub(super) fn pump<W>(sink: W) -> (Outbound, tokio::task::JoinHandle<()>)
where
    W: AsyncWrite + Unpin + Send + 'static,
{
    pump_when(async move { Some((sink, ())) })
}

/// A [`pump`] whose sink comes once `opening` yields it, with something to keep until the pump
/// ends (dropped then); frames queued meanwhile wait. `None`: the queue closes unwritten.
pub(super) fn pump_when<W, K>(
    opening: impl std::future::Future<Output = Option<(W, K)>> + Send + 'static,
) -> (Outbound, tokio::task::JoinHandle<()>)
where
    W: AsyncWrite + Unpin + Send + 'static,
    K: Send + 'static,
{
    let (tx, mut rx) = mpsc::channel::<(Bytes, tokio::sync::OwnedSemaphorePermit)>(OUTBOUND_FRAMES);
    let task = tokio::spawn(async move {
        let Some((mut sink, _kept)) = opening.await else {
            return;
        };
        let mut batch = BytesMut::new();
        let mut rooms = Vec::new();
        while let Some((frame, room)) = rx.recv().await {
            // Frames queued meanwhile go out in the same write (up to 64 KiB).
            let written = if frame.len() >= COALESCE_BYTES {
                sink.write_all(&frame).await
            } else {
                batch.extend_from_slice(&frame);
                rooms.push(room);
                while batch.len() < COALESCE_BYTES {
                    match rx.try_recv() {
                        Ok((next, room)) => {
                            batch.extend_from_slice(&next);
                            rooms.push(room);
                        }
                        Err(_) => break,
                    }
                }
                let written = sink.write_all(&batch).await;
                batch.clear();
                written
            };
            // Their room is free once they are written.
            rooms.clear();
            if written.is_err() {
                break;
            }
        }
        let _ = sink.shutdown().await;
    });
    (
        Outbound {
            frames: tx,
            bytes: Arc::new(tokio::sync::Semaphore::new(OUTBOUND_BYTES as usize)),
        },
        task,
    )
}

/// One acknowledgement owed to the client.
#[derive(Debug, Clone, Copy)]
pub(super) struct Ack {
    /// The ticket it waits for.
    pub(super) ticket: u64,
    pub(super) pkid: u16,
    /// PUBACK, PUBREC or PUBCOMP.
    pub(super) kind: u8,
    /// Whether it acknowledges that ticket's own record (else it only waits its turn).
    pub(super) own: bool,
    /// MQTT 5 reason code, when not success.
    pub(super) reason: Option<u8>,
}

/// Acknowledgements waiting for their records' commit, in the order owed.
#[derive(Default)]
pub(super) struct Owed {
    pub(super) queue: VecDeque<Ack>,
    /// The last ticket handed out on this connection.
    pub(super) last: u64,
    /// Tickets whose record the buffer refused, not yet answered.
    pub(super) refused: HashSet<u64>,
    /// A 3.1.1 client's publish was refused: nothing more is acknowledged on this connection
    /// (it cannot be told; it resends what was not acknowledged).
    pub(super) gave_up: bool,
}

impl Owed {
    /// An acknowledgement that only waits its turn (nothing of its own to commit).
    pub(super) fn after_the_rest(&mut self, pkid: u16, kind: u8, reason: Option<u8>) {
        self.queue.push_back(Ack {
            ticket: self.last,
            pkid,
            kind,
            own: false,
            reason,
        });
    }
}

/// Sends every acknowledgement whose record is settled, in order. `false` when a 3.1.1
/// client's publish was refused: it cannot be told, so its connection closes.
pub(super) async fn flush(
    owed: &mut Owed,
    receipts: &Receipts,
    out: &Outbound,
    v5: bool,
    session: &Mutex<Session>,
) -> bool {
    let (done, refused) = receipts.take();
    if !refused.is_empty() {
        // The session took these packet ids for kept: a resend of one must be stored.
        let mut s = session
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for ack in owed
            .queue
            .iter()
            .filter(|a| a.own && refused.contains(&a.ticket))
        {
            if ack.kind == kind::PUBREC {
                s.unreleased.remove(&ack.pkid);
            } else {
                s.kept.forget(ack.pkid);
            }
        }
        owed.refused.extend(refused);
    }
    if owed.gave_up {
        return false;
    }
    // The acknowledgements a commit settles go out in one write (a commit settles hundreds).
    let mut acks = BytesMut::new();
    let mut ok = true;
    while let Some(&ack) = owed.queue.front() {
        if ack.ticket > done {
            break;
        }
        let reason = if ack.own && owed.refused.contains(&ack.ticket) {
            if !v5 {
                owed.gave_up = true;
                ok = false;
                break;
            }
            owed.refused.remove(&ack.ticket);
            Some(0x97) // quota exceeded
        } else if v5 {
            ack.reason
        } else {
            None
        };
        owed.queue.pop_front();
        acks.extend_from_slice(&mqtt::ack(ack.kind, ack.pkid, reason));
    }
    if !acks.is_empty() && out.send(acks.freeze()).await.is_err() {
        return false;
    }
    ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buffer::{NewRecord, Receipt, WriterCommand};

    /// Publishes 1 to 3 (packet ids 11 to 13) are settled, the 2nd refused by a full disk.
    async fn refused_second(v5: bool) -> (Vec<u8>, Session, bool, bool) {
        let (client, mut peer) = tokio::io::duplex(1 << 16);
        let (out, pump) = pump(client);
        let receipts = Arc::new(Receipts::default());
        let session = Mutex::new(Session::default());
        let mut owed = Owed::default();
        let mut commands = Vec::new();
        for pkid in [11u16, 12, 13] {
            owed.last += 1;
            owed.queue.push_back(Ack {
                ticket: owed.last,
                pkid,
                kind: kind::PUBACK,
                own: true,
                reason: None,
            });
            session.lock().expect("session").kept.insert(pkid, 7);
            commands.push(WriterCommand::Append(NewRecord {
                stream: 0,
                topic: "t".into(),
                payload: Bytes::new(),
                received_at_ms: 0,
                monotonic_ms: 0,
                attributes: Default::default(),
                receipt: Some(Receipt {
                    to: receipts.clone(),
                    ticket: owed.last,
                }),
            }));
        }
        crate::buffer::settle(&commands[..1], false);
        crate::buffer::settle(&commands[1..2], true);
        crate::buffer::settle(&commands[2..], false);
        let first = flush(&mut owed, &receipts, &out, v5, &session).await;
        // The close grace flushes again: nothing refused may be acknowledged then.
        let again = flush(&mut owed, &receipts, &out, v5, &session).await;
        drop(out);
        pump.await.expect("pump");
        let mut written = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut peer, &mut written)
            .await
            .expect("read");
        (
            written,
            session.into_inner().expect("session"),
            first,
            again,
        )
    }

    #[tokio::test]
    async fn a_refused_publish_is_never_acknowledged_and_its_resend_is_stored() {
        // 3.1.1: the first PUBACK only; the connection ends and no later flush sends more.
        let (written, session, first, again) = refused_second(false).await;
        assert_eq!(written, [0x40, 2, 0, 11]);
        assert!(!first && !again);
        assert!(
            session.kept.get(12).is_none(),
            "the refused id is forgotten: its DUP resend is stored, not acknowledged as kept"
        );
        // MQTT 5: all three answered, the refused one with 0x97.
        let (written, session, first, again) = refused_second(true).await;
        assert_eq!(
            written,
            [0x40, 2, 0, 11, 0x40, 3, 0, 12, 0x97, 0x40, 2, 0, 13]
        );
        assert!(first && again);
        assert!(session.kept.get(12).is_none());
        assert!(session.kept.get(13).is_some());
    }
}
