//! Remote operations: what a stream to an agent carries.
//!
//! A client (the workstation) runs operations on an agent (the kitepipe
//! binary pushed to a host over SSH, or later a connector that opted in).
//! Each operation is one stream. It opens with a [`RemoteHeader`] (JSON,
//! `{"kind":"remote","op":"exec",...}`, the same shape a link's other stream
//! headers have) naming the operation and its arguments. After the header,
//! both directions carry *records*:
//!
//! ```text
//! +---------+-------------+-------------------+
//! | type:8  | length:32BE | payload (length)  |
//! +---------+-------------+-------------------+
//! ```
//!
//! The client sends [`ClientRecord`]s (input data, end of input, signals,
//! terminal size) then FIN; the agent sends [`AgentRecord`]s (a head, output
//! or data, list items) and ends with exactly one `Done` (JSON result) or
//! `Error` ([`ErrorReply`]: kind, errno, message, path), then FIN. A
//! `connect` (port forwarding) stream switches to raw bytes both ways after
//! the agent's `Done`. When the agent starts serving it sends one CONTROL
//! message, [`AgentHello`].
//!
//! Every decoder checks the length before buffering ([`MAX_RECORD_LEN`]) and
//! returns `None` for a partial record.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

/// The `Upgrade` token of the relay gateway's `/remote/NODE` endpoint: a
/// client on the relay's machine sends `GET /remote/NODE HTTP/1.1` with
/// `Connection: Upgrade` and `Upgrade: kitepipe-remote`; after `101
/// Switching Protocols` the connection carries a link to the relay, in
/// the agent's place, exactly as over SSH.
pub const REMOTE_UPGRADE: &str = "kitepipe-remote";

/// Largest record payload accepted, in bytes. Data records are at most
/// [`DATA_CHUNK`]; JSON records (a directory listing batch, a result) stay
/// far below this. Anything larger is hostile.
pub const MAX_RECORD_LEN: usize = 1024 * 1024;

/// Bytes of file or process data senders put in one record: large enough
/// that the 5-byte record header is noise, small enough to interleave
/// stdout and stderr finely.
pub const DATA_CHUNK: usize = 128 * 1024;

/// Length of a record header: type (1) and length (4).
pub const RECORD_HEADER_LEN: usize = 5;

/// Directory entries per `Items` record of a listing.
pub const LS_BATCH: usize = 512;

/// The OPEN payload of a remote-operation stream:
/// `{"kind":"remote","op":...}`. A link that also carries visitors and
/// events will decode it as a variant of its stream header with the same
/// bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RemoteHeader {
    /// A remote operation.
    Remote(RemoteOp),
}

/// One remote operation and its arguments.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum RemoteOp {
    /// Run a command; stream its stdin, stdout and stderr; report its exit.
    Exec(ExecOp),
    /// Start a command in the background (own process group, output to
    /// `/dev/null` or a file); `Done` carries its pid.
    Spawn(SpawnOp),
    /// Send a signal to a process (or its process group).
    Kill(KillOp),
    /// Read a file: `Head` ([`ReadHead`]), `Data` records, `Done`.
    Read(ReadOp),
    /// Write a file from the client's `Data` records until `Eof`; the file
    /// appears complete or not at all (written beside it, then renamed).
    Write(WriteOp),
    /// List a directory: `Items` records of [`DirEntry`], then `Done`.
    Ls(PathOp),
    /// Metadata of a path: `Done` carries a [`FileStat`].
    Stat(StatOp),
    /// Create a directory.
    Mkdir(MkdirOp),
    /// Remove a file, or a directory (recursively if asked).
    Rm(RmOp),
    /// Rename a path.
    Mv(MvOp),
    /// Connect to a TCP address as seen from the host; after `Done` the
    /// stream carries raw bytes both ways (port forwarding).
    Connect(ConnectOp),
}

/// Arguments of `exec`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecOp {
    /// Program and arguments (no shell), at least one element.
    pub argv: Vec<String>,
    /// Variables set on top of the agent's environment.
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// Start from an empty environment (then only `env`).
    #[serde(default)]
    pub env_clear: bool,
    /// Working directory (default: the agent's, the SSH user's home).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// Whether the client forwards stdin (otherwise the command reads `/dev/null`).
    #[serde(default)]
    pub stdin: bool,
    /// Run on a pseudo-terminal of this size (stdout and stderr then merge).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tty: Option<TtySize>,
}

/// A terminal size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TtySize {
    /// Rows.
    pub rows: u16,
    /// Columns.
    pub cols: u16,
}

/// Arguments of `spawn`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpawnOp {
    /// Program and arguments (no shell).
    pub argv: Vec<String>,
    /// Variables set on top of the agent's environment.
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// Working directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// File receiving stdout and stderr (appended), else `/dev/null`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<String>,
}

/// Result of `spawn`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spawned {
    /// Process id on the host (also its process group id).
    pub pid: u32,
}

/// Arguments of `kill`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KillOp {
    /// Process id.
    pub pid: u32,
    /// Signal number (e.g. 15 for TERM).
    pub signal: i32,
    /// Signal the whole process group `pid` instead.
    #[serde(default)]
    pub group: bool,
}

/// Arguments of `read`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadOp {
    /// File to read.
    pub path: String,
}

/// First record of a `read`: what is coming.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadHead {
    /// Size of the file when it was opened.
    pub size: u64,
}

/// Arguments of `write`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteOp {
    /// File to create or replace.
    pub path: String,
    /// Permission bits of a new file (default 0o644 less the umask).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
}

/// Result of `write`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Written {
    /// Bytes written.
    pub bytes: u64,
}

/// An operation on one path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathOp {
    /// The path.
    pub path: String,
}

/// Arguments of `stat`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatOp {
    /// The path.
    pub path: String,
    /// Describe a symbolic link itself rather than what it points to.
    #[serde(default)]
    pub no_follow: bool,
}

/// Arguments of `mkdir`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MkdirOp {
    /// Directory to create.
    pub path: String,
    /// Create missing parents too, and succeed if it exists.
    #[serde(default)]
    pub parents: bool,
    /// Permission bits (default 0o755 less the umask).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
}

/// Arguments of `rm`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RmOp {
    /// Path to remove.
    pub path: String,
    /// Remove a directory and everything in it.
    #[serde(default)]
    pub recursive: bool,
}

/// Arguments of `mv`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MvOp {
    /// Existing path.
    pub from: String,
    /// New path (replaced if it is a file).
    pub to: String,
}

/// Arguments of `connect`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectOp {
    /// Host name or address, as the agent's host resolves it.
    pub host: String,
    /// TCP port.
    pub port: u16,
}

/// What kind of file a path is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileKind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link.
    Symlink,
    /// Anything else (device, socket, fifo).
    Other,
}

/// Metadata of a path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStat {
    /// The kind of file.
    pub kind: FileKind,
    /// Size in bytes.
    pub size: u64,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    /// Owner's user id.
    pub uid: u32,
    /// Owner's group id.
    pub gid: u32,
    /// Modification time, seconds since the Unix epoch.
    pub mtime: i64,
}

/// One directory entry of a listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    /// File name (not UTF-8 names are converted lossily).
    pub name: String,
    /// Its metadata (of the entry itself, links not followed).
    pub stat: FileStat,
}

/// How an `exec` ended: the `Done` of an exec stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitReport {
    /// Exit code, if the process exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    /// Signal number, if a signal killed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
}

/// The first record of an exec stream: the process started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecHead {
    /// Its process id on the host.
    pub pid: u32,
}

/// Class of a remote failure, from the host's error number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// ENOENT: no such file or directory (or command).
    NotFound,
    /// EACCES/EPERM.
    PermissionDenied,
    /// EEXIST.
    AlreadyExists,
    /// ENOTDIR.
    NotADirectory,
    /// EISDIR.
    IsADirectory,
    /// ENOTEMPTY.
    DirectoryNotEmpty,
    /// ECONNREFUSED (port forwarding).
    ConnectionRefused,
    /// The request itself is invalid (empty argv, bad header).
    InvalidInput,
    /// The agent does not support this (e.g. a TTY on this host).
    Unsupported,
    /// Anything else; `errno` and `message` tell more.
    #[serde(other)]
    Other,
}

/// A typed failure from the agent: the `Error` record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    /// Class of the failure.
    pub kind: ErrorKind,
    /// The host's error number, if a system call failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errno: Option<i32>,
    /// What failed, for humans (the host's `strerror` text included).
    pub message: String,
    /// The path concerned, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

impl std::fmt::Display for ErrorReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.path {
            Some(path) => write!(f, "{path}: {}", self.message)?,
            None => write!(f, "{}", self.message)?,
        }
        if let Some(errno) = self.errno {
            write!(f, " (errno {errno})")?;
        }
        Ok(())
    }
}

/// The agent's CONTROL message when it starts serving.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename = "agent_hello")]
pub struct AgentHello {
    /// Protocol version (the link's, [`crate::message::PROTOCOL_VERSION`]).
    pub version: u32,
    /// Software name and version.
    pub software: String,
    /// Process id of the agent on the host.
    pub pid: u32,
    /// User id the agent runs as.
    pub uid: u32,
    /// Operating system and machine (`linux x86_64`).
    pub platform: String,
}

/// Records a client sends on an operation's stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientRecord {
    /// Input: stdin of an exec, contents of a write.
    Data(Bytes),
    /// End of input (stdin closed, file complete).
    Eof,
    /// Send this signal to an exec's process.
    Signal(i32),
    /// The terminal of an exec with a TTY changed size.
    Resize(TtySize),
}

/// Records an agent sends on an operation's stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentRecord {
    /// The operation started (JSON: [`ExecHead`], [`ReadHead`]).
    Head(Bytes),
    /// An exec's stdout (or its terminal's output).
    Stdout(Bytes),
    /// An exec's stderr.
    Stderr(Bytes),
    /// File contents of a read.
    Data(Bytes),
    /// A batch of list items (JSON array of [`DirEntry`]).
    Items(Bytes),
    /// The operation succeeded (JSON, per operation); last record.
    Done(Bytes),
    /// The operation failed; last record.
    Error(ErrorReply),
}

/// Why a record could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The length exceeds [`MAX_RECORD_LEN`].
    #[error("record of {0} bytes exceeds the maximum of {MAX_RECORD_LEN}")]
    TooLarge(usize),
    /// The type byte is not a record of this direction.
    #[error("unknown record type {0}")]
    UnknownType(u8),
    /// The payload does not fit the type (wrong length, bad JSON).
    #[error("malformed record of type {kind}: {reason}")]
    Malformed {
        /// The record type.
        kind: u8,
        /// What is wrong.
        reason: String,
    },
}

mod code {
    pub(super) const C_DATA: u8 = 1;
    pub(super) const C_EOF: u8 = 2;
    pub(super) const C_SIGNAL: u8 = 3;
    pub(super) const C_RESIZE: u8 = 4;
    pub(super) const A_HEAD: u8 = 16;
    pub(super) const A_STDOUT: u8 = 17;
    pub(super) const A_STDERR: u8 = 18;
    pub(super) const A_DATA: u8 = 19;
    pub(super) const A_ITEMS: u8 = 20;
    pub(super) const A_DONE: u8 = 21;
    pub(super) const A_ERROR: u8 = 22;
}

impl ClientRecord {
    /// Appends the encoded record to `dst`.
    pub fn encode(&self, dst: &mut BytesMut) {
        match self {
            ClientRecord::Data(data) => put_record(dst, code::C_DATA, data),
            ClientRecord::Eof => put_record(dst, code::C_EOF, &[]),
            ClientRecord::Signal(signal) => put_record(dst, code::C_SIGNAL, &signal.to_be_bytes()),
            ClientRecord::Resize(size) => {
                let mut payload = [0u8; 4];
                payload[..2].copy_from_slice(&size.rows.to_be_bytes());
                payload[2..].copy_from_slice(&size.cols.to_be_bytes());
                put_record(dst, code::C_RESIZE, &payload);
            }
        }
    }

    /// The header of a `Data` record of `len` bytes, for senders that read
    /// the payload straight into the buffer behind it.
    pub fn data_header(len: usize) -> [u8; RECORD_HEADER_LEN] {
        debug_assert!(len <= MAX_RECORD_LEN);
        let mut header = [code::C_DATA, 0, 0, 0, 0];
        // len <= MAX_RECORD_LEN, which fits a u32.
        header[1..].copy_from_slice(&(len as u32).to_be_bytes());
        header
    }

    /// Decodes one record from the front of `src`; `None` if it is not
    /// complete yet (nothing is consumed then).
    pub fn decode(src: &mut BytesMut) -> Result<Option<ClientRecord>, RecordError> {
        let Some((kind, payload)) = take_record(src)? else {
            return Ok(None);
        };
        let record = match kind {
            code::C_DATA => ClientRecord::Data(payload),
            code::C_EOF => {
                expect_len(kind, &payload, 0)?;
                ClientRecord::Eof
            }
            code::C_SIGNAL => {
                expect_len(kind, &payload, 4)?;
                let mut p = &payload[..];
                ClientRecord::Signal(p.get_i32())
            }
            code::C_RESIZE => {
                expect_len(kind, &payload, 4)?;
                let mut p = &payload[..];
                ClientRecord::Resize(TtySize {
                    rows: p.get_u16(),
                    cols: p.get_u16(),
                })
            }
            other => return Err(RecordError::UnknownType(other)),
        };
        Ok(Some(record))
    }
}

impl AgentRecord {
    /// Appends the encoded record to `dst`.
    pub fn encode(&self, dst: &mut BytesMut) {
        match self {
            AgentRecord::Head(json) => put_record(dst, code::A_HEAD, json),
            AgentRecord::Stdout(data) => put_record(dst, code::A_STDOUT, data),
            AgentRecord::Stderr(data) => put_record(dst, code::A_STDERR, data),
            AgentRecord::Data(data) => put_record(dst, code::A_DATA, data),
            AgentRecord::Items(json) => put_record(dst, code::A_ITEMS, json),
            AgentRecord::Done(json) => put_record(dst, code::A_DONE, json),
            AgentRecord::Error(reply) => put_record(dst, code::A_ERROR, &to_json(reply)),
        }
    }

    /// Decodes one record from the front of `src`; `None` if it is not
    /// complete yet (nothing is consumed then).
    pub fn decode(src: &mut BytesMut) -> Result<Option<AgentRecord>, RecordError> {
        let Some((kind, payload)) = take_record(src)? else {
            return Ok(None);
        };
        let record = match kind {
            code::A_HEAD => AgentRecord::Head(payload),
            code::A_STDOUT => AgentRecord::Stdout(payload),
            code::A_STDERR => AgentRecord::Stderr(payload),
            code::A_DATA => AgentRecord::Data(payload),
            code::A_ITEMS => AgentRecord::Items(payload),
            code::A_DONE => AgentRecord::Done(payload),
            code::A_ERROR => AgentRecord::Error(from_json(kind, &payload)?),
            other => return Err(RecordError::UnknownType(other)),
        };
        Ok(Some(record))
    }
}

/// Encodes a value as JSON bytes (for `Head`, `Items` and `Done` records).
pub fn to_json<T: Serialize>(value: &T) -> Bytes {
    // The record payload types are plain structs and vectors of them:
    // serializing them into a Vec cannot fail.
    Bytes::from(serde_json::to_vec(value).expect("record payloads always serialize"))
}

/// Decodes the JSON payload of a record of type `kind`.
pub fn from_json<'a, T: Deserialize<'a>>(kind: u8, payload: &'a [u8]) -> Result<T, RecordError> {
    serde_json::from_slice(payload).map_err(|err| RecordError::Malformed {
        kind,
        reason: err.to_string(),
    })
}

/// Writes a record header for a payload of `len` bytes (the payload follows).
pub fn put_record_header(dst: &mut BytesMut, kind: u8, len: usize) {
    debug_assert!(len <= MAX_RECORD_LEN);
    dst.put_u8(kind);
    // len <= MAX_RECORD_LEN, which fits a u32.
    dst.put_u32(len as u32);
}

fn put_record(dst: &mut BytesMut, kind: u8, payload: &[u8]) {
    dst.reserve(RECORD_HEADER_LEN + payload.len());
    put_record_header(dst, kind, payload.len());
    dst.put_slice(payload);
}

fn take_record(src: &mut BytesMut) -> Result<Option<(u8, Bytes)>, RecordError> {
    if src.len() < RECORD_HEADER_LEN {
        return Ok(None);
    }
    let kind = src[0];
    let len = u32::from_be_bytes([src[1], src[2], src[3], src[4]]) as usize;
    if len > MAX_RECORD_LEN {
        return Err(RecordError::TooLarge(len));
    }
    if src.len() < RECORD_HEADER_LEN + len {
        src.reserve(RECORD_HEADER_LEN + len - src.len());
        return Ok(None);
    }
    src.advance(RECORD_HEADER_LEN);
    Ok(Some((kind, src.split_to(len).freeze())))
}

fn expect_len(kind: u8, payload: &[u8], len: usize) -> Result<(), RecordError> {
    if payload.len() == len {
        Ok(())
    } else {
        Err(RecordError::Malformed {
            kind,
            reason: format!("{} bytes where {len} belong", payload.len()),
        })
    }
}

#[cfg(test)]
mod tests;
