//! The agent's file operations: `read`, `write`, `ls`, `stat`, `mkdir`,
//! `rm`, `mv`.

use std::io;
use std::path::{Path, PathBuf};

use bytes::{Bytes, BytesMut};
use kitepipe_proto::remote::{
    AgentRecord, ClientRecord, DATA_CHUNK, DirEntry, FileKind, FileStat, LS_BATCH, MkdirOp, MvOp,
    PathOp, RECORD_HEADER_LEN, ReadHead, ReadOp, RmOp, StatOp, WriteOp, Written, put_record_header,
    to_json,
};
use tokio::io::AsyncWriteExt;

use kitepipe_proto::remote::{ErrorKind, ErrorReply};

use super::reply::{error_reply, fail, finish, invalid};
use super::stream::{OpStream, RecordReader, agent_bytes};

/// The header of an agent `Data` record of `len` bytes (the record type as
/// `AgentRecord::encode` writes it, and the length).
fn data_record_header(len: usize) -> [u8; RECORD_HEADER_LEN] {
    let mut empty = BytesMut::with_capacity(RECORD_HEADER_LEN);
    AgentRecord::Data(Bytes::new()).encode(&mut empty);
    let mut header = BytesMut::with_capacity(RECORD_HEADER_LEN);
    put_record_header(&mut header, empty[0], len);
    let mut out = [0u8; RECORD_HEADER_LEN];
    out.copy_from_slice(&header);
    out
}

fn done_empty() -> AgentRecord {
    AgentRecord::Done(Bytes::from_static(b"{}"))
}

/// Streams a file: `Head` with its size, `Data` records, `Done`. With
/// `protected`, the file opened is checked again (its real path, device
/// and inode), so a symlink swapped in after the check by path is caught.
pub(crate) async fn read(op: ReadOp, stream: OpStream, protected: Option<&Protected>) {
    let file = match std::fs::File::open(&op.path) {
        Ok(file) => file,
        Err(err) => return fail(&stream, &err, "cannot open", Some(&op.path)).await,
    };
    if let Some(refusal) = protected.and_then(|p| p.check_opened(&file, &op.path).err()) {
        return finish(&stream, AgentRecord::Error(refusal)).await;
    }
    let size = match file.metadata() {
        Ok(meta) if meta.is_dir() => {
            let err = io::Error::from(io::ErrorKind::IsADirectory);
            return fail(&stream, &err, "cannot read", Some(&op.path)).await;
        }
        Ok(meta) => meta.len(),
        Err(err) => return fail(&stream, &err, "cannot read", Some(&op.path)).await,
    };
    let head = AgentRecord::Head(to_json(&ReadHead { size }));
    if stream.send(agent_bytes(&head)).await.is_err() {
        return;
    }
    // Each chunk is read on the blocking pool straight behind its record
    // header, so a read blocked by a peer that grants no window holds one
    // buffer of one chunk (tokio's `File` would keep a second buffer, and
    // encoding a separate record a third).
    let mut file = Some(file);
    loop {
        let Some(mut taken) = file.take() else { return };
        let chunk = tokio::task::spawn_blocking(move || {
            use std::io::Read;
            let mut record = BytesMut::zeroed(RECORD_HEADER_LEN + DATA_CHUNK);
            let res = taken.read(&mut record[RECORD_HEADER_LEN..]).map(|n| {
                record.truncate(RECORD_HEADER_LEN + n);
                record[..RECORD_HEADER_LEN].copy_from_slice(&data_record_header(n));
                (n, record.freeze())
            });
            (taken, res)
        })
        .await;
        let Ok((taken, res)) = chunk else {
            return finish(&stream, invalid("reading failed")).await;
        };
        file = Some(taken);
        match res {
            Ok((0, _)) => break,
            Ok((_, record)) => {
                if stream.send(record).await.is_err() {
                    return;
                }
            }
            Err(err) => return fail(&stream, &err, "cannot read", Some(&op.path)).await,
        }
    }
    drop(file);
    finish(&stream, done_empty()).await;
}

/// Writes a file from the client's `Data` records: into a temporary file
/// beside it, renamed over the target at `Eof`, so the file appears
/// complete or not at all. With `protected`, the temporary file is checked
/// again once created (where it really is).
pub(crate) async fn write(op: WriteOp, stream: OpStream, protected: Option<&Protected>) {
    use std::os::unix::fs::OpenOptionsExt;
    let target = PathBuf::from(&op.path);
    let temp = temp_beside(&target);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    options.mode(op.mode.unwrap_or(0o644));
    let file = match options.open(&temp) {
        Ok(file) => file,
        Err(err) => return fail(&stream, &err, "cannot create", Some(&op.path)).await,
    };
    if let Some(refusal) = protected.and_then(|p| p.check_opened(&file, &op.path).err()) {
        drop(file);
        let _ = std::fs::remove_file(&temp);
        return finish(&stream, AgentRecord::Error(refusal)).await;
    }
    let mut file = tokio::fs::File::from_std(file);
    let mut reader = RecordReader::new(stream.clone());
    let mut written = 0u64;
    let outcome: Result<(), AgentRecord> = loop {
        match reader.next_client().await {
            Ok(Some(ClientRecord::Data(data))) => {
                if let Err(err) = file.write_all(&data).await {
                    break Err(AgentRecord::Error(error_reply(
                        &err,
                        "cannot write",
                        Some(&op.path),
                    )));
                }
                written += data.len() as u64;
            }
            Ok(Some(ClientRecord::Eof)) => break Ok(()),
            Ok(Some(_)) => break Err(invalid("unexpected record in a write")),
            // FIN before Eof: the client gave up; nothing is kept.
            Ok(None) => break Err(invalid("the write ended before its end-of-file record")),
            Err(_) => {
                let _ = tokio::fs::remove_file(&temp).await;
                return;
            }
        }
    };
    let outcome = match outcome {
        Ok(()) => match file.flush().await {
            Ok(()) => {
                drop(file);
                tokio::fs::rename(&temp, &target).await.map_err(|err| {
                    AgentRecord::Error(error_reply(
                        &err,
                        "cannot rename into place",
                        Some(&op.path),
                    ))
                })
            }
            Err(err) => Err(AgentRecord::Error(error_reply(
                &err,
                "cannot write",
                Some(&op.path),
            ))),
        },
        Err(reply) => Err(reply),
    };
    match outcome {
        Ok(()) => {
            finish(
                &stream,
                AgentRecord::Done(to_json(&Written { bytes: written })),
            )
            .await
        }
        Err(reply) => {
            let _ = tokio::fs::remove_file(&temp).await;
            finish(&stream, reply).await;
        }
    }
}

fn temp_beside(target: &Path) -> PathBuf {
    let name = target
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tag: u64 = rand::random();
    target.with_file_name(format!(".{name}.kitepipe-{tag:016x}"))
}

/// Lists a directory in batches.
pub(crate) async fn ls(op: PathOp, stream: OpStream) {
    let path = op.path.clone();
    let res = tokio::task::spawn_blocking(move || list(&path)).await;
    let entries = match res {
        Ok(Ok(entries)) => entries,
        Ok(Err(err)) => return fail(&stream, &err, "cannot list", Some(&op.path)).await,
        Err(_) => return finish(&stream, invalid("listing failed")).await,
    };
    for batch in entries.chunks(LS_BATCH) {
        if stream
            .send(agent_bytes(&AgentRecord::Items(to_json(&batch))))
            .await
            .is_err()
        {
            return;
        }
    }
    finish(&stream, done_empty()).await;
}

fn list(path: &str) -> io::Result<Vec<DirEntry>> {
    let mut entries = Vec::new();
    for entry in std::fs::read_dir(path)? {
        let entry = entry?;
        // An entry removed while listing is skipped.
        let Ok(meta) = entry.metadata() else { continue };
        entries.push(DirEntry {
            name: entry.file_name().to_string_lossy().into_owned(),
            stat: file_stat(&meta),
        });
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(entries)
}

pub(crate) fn file_stat(meta: &std::fs::Metadata) -> FileStat {
    use std::os::unix::fs::MetadataExt;
    let file_type = meta.file_type();
    let kind = if file_type.is_symlink() {
        FileKind::Symlink
    } else if file_type.is_dir() {
        FileKind::Dir
    } else if file_type.is_file() {
        FileKind::File
    } else {
        FileKind::Other
    };
    FileStat {
        kind,
        size: meta.len(),
        mode: meta.mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
        mtime: meta.mtime(),
    }
}

/// Metadata of a path.
pub(crate) async fn stat(op: StatOp, stream: OpStream) {
    let res = if op.no_follow {
        tokio::fs::symlink_metadata(&op.path).await
    } else {
        tokio::fs::metadata(&op.path).await
    };
    match res {
        Ok(meta) => finish(&stream, AgentRecord::Done(to_json(&file_stat(&meta)))).await,
        Err(err) => fail(&stream, &err, "cannot stat", Some(&op.path)).await,
    }
}

/// Creates a directory.
pub(crate) async fn mkdir(op: MkdirOp, stream: OpStream) {
    let mut builder = tokio::fs::DirBuilder::new();
    builder.recursive(op.parents);
    builder.mode(op.mode.unwrap_or(0o755));
    match builder.create(&op.path).await {
        Ok(()) => finish(&stream, done_empty()).await,
        Err(err) => fail(&stream, &err, "cannot create directory", Some(&op.path)).await,
    }
}

/// Removes a file or directory.
pub(crate) async fn rm(op: RmOp, stream: OpStream) {
    let res = match tokio::fs::symlink_metadata(&op.path).await {
        Ok(meta) if meta.is_dir() && op.recursive => tokio::fs::remove_dir_all(&op.path).await,
        Ok(meta) if meta.is_dir() => tokio::fs::remove_dir(&op.path).await,
        Ok(_) => tokio::fs::remove_file(&op.path).await,
        Err(err) => Err(err),
    };
    match res {
        Ok(()) => finish(&stream, done_empty()).await,
        Err(err) => fail(&stream, &err, "cannot remove", Some(&op.path)).await,
    }
}

/// Renames a path.
pub(crate) async fn mv(op: MvOp, stream: OpStream) {
    match tokio::fs::rename(&op.from, &op.to).await {
        Ok(()) => finish(&stream, done_empty()).await,
        Err(err) => {
            // Name the path that is at fault when it is clear.
            let path = if err.kind() == io::ErrorKind::NotFound
                && tokio::fs::symlink_metadata(&op.from).await.is_err()
            {
                &op.from
            } else {
                &op.to
            };
            fail(&stream, &err, "cannot rename", Some(path)).await;
        }
    }
}

/// The files and directories of a connector that relayed file operations
/// never reach: its handlers directory (a file there is an executable
/// anyone with events may run), its identity (keys), its config, its own
/// executable and its process's `/proc` entries (environment and command
/// line hold secrets). Checked on resolved paths (symlinks followed,
/// `..` resolved against real directories), and again on the file
/// actually opened for reads and writes.
#[derive(Debug, Default)]
pub(crate) struct Protected {
    entries: Vec<ProtectedEntry>,
}

#[derive(Debug)]
struct ProtectedEntry {
    /// Canonical path (or, if it does not exist yet, the path resolved as
    /// far as it exists).
    path: PathBuf,
    /// Device and inode, for an entry that exists: the same file under
    /// another name (a hard link) is the same file.
    id: Option<(u64, u64)>,
    /// What it is, for the refusal.
    what: String,
}

/// How an operation reaches a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reach {
    /// Reads what the path names, following a final symlink (read, ls, stat).
    Read,
    /// Reads the path itself, not a final symlink's target (stat --no-follow).
    ReadLink,
    /// Creates, replaces, removes or renames the path itself (a final
    /// symlink is replaced, not followed): refused inside a protected
    /// entry and on any directory that holds one.
    Change,
}

impl Protected {
    /// Protects `paths` (each with what it is, for messages).
    pub(crate) fn new<'a>(paths: impl IntoIterator<Item = (PathBuf, &'a str)>) -> Protected {
        use std::os::unix::fs::MetadataExt;
        let mut entries = Vec::new();
        for (path, what) in paths {
            let resolved = resolve(&path, true);
            let id = std::fs::metadata(&resolved)
                .ok()
                .map(|meta| (meta.dev(), meta.ino()));
            entries.push(ProtectedEntry {
                path: resolved,
                id,
                what: what.to_string(),
            });
        }
        Protected { entries }
    }

    /// Refuses `path` if, resolved, it lies inside a protected entry (or,
    /// for a change, holds one).
    pub(crate) fn check(&self, path: &str, reach: Reach) -> Result<(), ErrorReply> {
        use std::os::unix::fs::MetadataExt;
        if self.entries.is_empty() {
            return Ok(());
        }
        let resolved = resolve(Path::new(path), reach == Reach::Read);
        let id = match reach {
            Reach::Read => std::fs::metadata(&resolved).ok(),
            Reach::ReadLink | Reach::Change => std::fs::symlink_metadata(&resolved).ok(),
        }
        .map(|meta| (meta.dev(), meta.ino()));
        for entry in &self.entries {
            let inside = resolved.starts_with(&entry.path)
                || (id.is_some() && id == entry.id && reach != Reach::Change);
            let holds = reach == Reach::Change && entry.path.starts_with(&resolved);
            if inside || holds {
                return Err(self.refusal(path, &resolved, entry, holds && !inside));
            }
        }
        Ok(())
    }

    /// Checks the file actually opened (after a check by path): its real
    /// path (`/proc/self/fd`) and its device and inode.
    pub(crate) fn check_opened(&self, file: &std::fs::File, path: &str) -> Result<(), ErrorReply> {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::MetadataExt;
        if self.entries.is_empty() {
            return Ok(());
        }
        let real = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd())).ok();
        let id = file.metadata().ok().map(|meta| (meta.dev(), meta.ino()));
        for entry in &self.entries {
            let inside = real
                .as_ref()
                .is_some_and(|real| real.starts_with(&entry.path));
            if inside || (id.is_some() && id == entry.id) {
                let resolved = real.clone().unwrap_or_else(|| PathBuf::from(path));
                return Err(self.refusal(path, &resolved, entry, false));
            }
        }
        Ok(())
    }

    fn refusal(
        &self,
        path: &str,
        resolved: &Path,
        entry: &ProtectedEntry,
        holds: bool,
    ) -> ErrorReply {
        let shown = if resolved == Path::new(path) {
            String::new()
        } else {
            format!(" (resolves to {})", resolved.display())
        };
        let relation = if holds { "holds" } else { "is inside" };
        ErrorReply {
            kind: ErrorKind::PermissionDenied,
            errno: None,
            message: format!(
                "{path}{shown} {relation} {} ({}), which is protected from remote file \
                 operations on this connector",
                entry.what,
                entry.path.display()
            ),
            path: Some(path.to_string()),
        }
    }
}

/// Resolves `path` against the real file system: the longest existing
/// prefix is canonicalized (symlinks and `..` resolved by the kernel's own
/// view), the rest is appended with `.` and `..` applied lexically (a part
/// that does not exist cannot be a symlink). With `follow` false a final
/// symlink is left as is (what rename, unlink and mkdir act on).
fn resolve(path: &Path, follow: bool) -> PathBuf {
    use std::path::Component;
    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .unwrap_or_else(|_| PathBuf::from("/"))
            .join(path)
    };
    let (base, last) = if follow {
        (absolute.as_path(), None)
    } else {
        match (absolute.parent(), absolute.components().next_back()) {
            (Some(parent), Some(Component::Normal(name))) => (parent, Some(name)),
            _ => (absolute.as_path(), None),
        }
    };
    // Walk up to the longest prefix that exists.
    let mut rest = Vec::new();
    let mut existing = base;
    let mut resolved = loop {
        match std::fs::canonicalize(existing) {
            Ok(real) => break real,
            Err(_) => match (existing.parent(), existing.components().next_back()) {
                (Some(parent), Some(last)) => {
                    rest.push(last);
                    existing = parent;
                }
                _ => break PathBuf::from("/"),
            },
        }
    };
    for part in rest.into_iter().rev() {
        match part {
            Component::ParentDir => {
                resolved.pop();
            }
            Component::Normal(name) => resolved.push(name),
            Component::CurDir | Component::RootDir | Component::Prefix(_) => {}
        }
    }
    if let Some(name) = last {
        resolved.push(name);
    }
    resolved
}

/// Whether a file operation changes anything (refused under `fs-read`).
pub(crate) fn changes(op: &kitepipe_proto::remote::RemoteOp) -> bool {
    use kitepipe_proto::remote::RemoteOp;
    matches!(
        op,
        RemoteOp::Write(_) | RemoteOp::Mkdir(_) | RemoteOp::Rm(_) | RemoteOp::Mv(_)
    )
}

/// Checks every path of a file operation against `protected`.
pub(crate) fn check_paths(
    op: &kitepipe_proto::remote::RemoteOp,
    protected: &Protected,
) -> Result<(), ErrorReply> {
    use kitepipe_proto::remote::RemoteOp;
    match op {
        RemoteOp::Read(op) => protected.check(&op.path, Reach::Read),
        RemoteOp::Ls(op) => protected.check(&op.path, Reach::Read),
        RemoteOp::Stat(op) if op.no_follow => protected.check(&op.path, Reach::ReadLink),
        RemoteOp::Stat(op) => protected.check(&op.path, Reach::Read),
        RemoteOp::Write(op) => protected.check(&op.path, Reach::Change),
        RemoteOp::Mkdir(op) => protected.check(&op.path, Reach::Change),
        RemoteOp::Rm(op) => protected.check(&op.path, Reach::Change),
        RemoteOp::Mv(op) => {
            protected.check(&op.from, Reach::Change)?;
            protected.check(&op.to, Reach::Change)
        }
        RemoteOp::Exec(_) | RemoteOp::Spawn(_) | RemoteOp::Kill(_) | RemoteOp::Connect(_) => Ok(()),
    }
}
