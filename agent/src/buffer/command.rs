//! What the writer is asked to do ([`WriterCommand`]): append records, settle what the ingest
//! answered, keep a file source's lines with its position, take a new config.

use bytes::Bytes;
use ingest_wire::LossReport;

use super::{BufferStream, NewRecord, OpenedStream, Protection, Receipt};

/// A command for the writer thread.
#[derive(Debug)]
pub enum WriterCommand {
    /// Store a received record.
    Append(NewRecord),
    /// The ingest acknowledged seqs `first..=last` of `stream`: delete them.
    Ack {
        /// Stream index.
        stream: usize,
        /// First seq of the batch.
        first: u64,
        /// Last seq of the batch.
        last: u64,
    },
    /// Records were lost before reaching the buffer: store this report (to be sent upstream).
    Loss(LossReport),
    /// The ingest rejected seqs `first..=last` of `stream`: move them to the dead-letter table.
    DeadLetter {
        /// Stream index.
        stream: usize,
        /// First seq of the batch.
        first: u64,
        /// Last seq of the batch.
        last: u64,
        /// HTTP status of the rejection.
        status: u16,
        /// The ingest's reason.
        reason: String,
    },
    /// These records of `stream` failed their checksum when read: drop them and report them
    /// lost (`corrupt_buffer`).
    Corrupt {
        /// Stream name (not its index: a reload may renumber the streams while the read that
        /// found them is under way).
        stream: String,
        /// Their sequence numbers.
        seqs: Vec<u64>,
    },
    /// Transforms did not keep this record ([`crate::transform`]): counted, never stored; its
    /// publisher is acknowledged once the commit (with the transforms' state) is in.
    Filtered {
        /// Stream index.
        stream: usize,
        /// Why.
        reason: crate::transform::Reason,
        /// Who waits for it, if anyone.
        receipt: Option<Receipt>,
    },
    /// The transforms' state changed by the records of this commit: saved with them.
    TransformState(Vec<crate::transform::StateRow>),
    /// Lines a file source read, with the file's position after them: the writer makes them
    /// records and a [`WriterCommand::FilePosition`], committed together.
    FileLines(Box<FileLines>),
    /// A file's position after its lines (saved in the commit that stores them).
    FilePosition(Box<FilePosition>),
    /// A reload: once everything queued before it is committed, put these streams in force
    /// ([`super::Buffer::reconfigure`]); stream indices in the commands after it are the new ones.
    /// Never part of a commit.
    Reconfigure(Reconfigure),
}

/// Lines read from a file ([`crate::source::file`]).
#[derive(Debug)]
pub struct FileLines {
    /// The stream they go to, by name (a reload may renumber the streams meanwhile).
    pub stream: String,
    /// The lines.
    pub lines: Vec<Line>,
    /// Where the file is read up to after them.
    pub position: FilePosition,
}

/// One line of a file, as a record.
#[derive(Debug, Clone)]
pub struct Line {
    /// Its topic.
    pub topic: String,
    /// The line, without its newline.
    pub payload: Bytes,
    /// When it was read, Unix ms.
    pub received_at_ms: i64,
}

/// Where a file source is in one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilePosition {
    /// The source's key.
    pub source: String,
    /// The file's device.
    pub dev: u64,
    /// Its inode.
    pub inode: u64,
    /// The checksum of its first line.
    pub fingerprint: u32,
    /// Bytes read and stored.
    pub offset: u64,
    /// Its path when last seen (for people).
    pub path: String,
    /// The file is done with: the position is deleted.
    pub forget: bool,
}

/// New streams for the writer ([`WriterCommand::Reconfigure`]).
#[derive(Debug)]
pub struct Reconfigure {
    /// The configured streams, in config order.
    pub streams: Vec<BufferStream>,
    /// The new quota.
    pub quota_bytes: u64,
    /// The configured streams' transforms, by index (their state comes from the buffer).
    pub chains: Vec<crate::transform::Chain>,
    /// Told the streams in force once they are (dropped if the buffer cannot take them: the
    /// writer then stops, and with it the agent).
    pub done: tokio::sync::oneshot::Sender<Reconfigured>,
}

/// The streams a [`Reconfigure`] put in force.
#[derive(Debug)]
pub struct Reconfigured {
    /// Every stream, configured ones first, then orphans.
    pub streams: Vec<OpenedStream>,
    /// Each one's protection, carried over by name from before: a batch the stopped forwarder
    /// had in flight, or sent without an answer, may be in the log and stays protected.
    pub protections: Vec<Protection>,
}
