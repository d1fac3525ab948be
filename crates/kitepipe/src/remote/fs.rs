//! The agent's file operations: `read`, `write`, `ls`, `stat`, `mkdir`,
//! `rm`, `mv`.

use std::io;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use kitepipe_proto::remote::{
    AgentRecord, ClientRecord, DATA_CHUNK, DirEntry, FileKind, FileStat, LS_BATCH, MkdirOp, MvOp,
    PathOp, ReadHead, ReadOp, RmOp, StatOp, WriteOp, Written, to_json,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::agent::{fail, finish, invalid};
use super::stream::{OpStream, RecordReader, agent_bytes};

fn done_empty() -> AgentRecord {
    AgentRecord::Done(Bytes::from_static(b"{}"))
}

/// Streams a file: `Head` with its size, `Data` records, `Done`.
pub(crate) async fn read(op: ReadOp, stream: OpStream) {
    let mut file = match tokio::fs::File::open(&op.path).await {
        Ok(file) => file,
        Err(err) => return fail(&stream, &err, "cannot open", Some(&op.path)).await,
    };
    let size = match file.metadata().await {
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
    loop {
        let mut buf = vec![0u8; DATA_CHUNK];
        match file.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => {
                buf.truncate(n);
                if stream
                    .send(agent_bytes(&AgentRecord::Data(Bytes::from(buf))))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Err(err) => return fail(&stream, &err, "cannot read", Some(&op.path)).await,
        }
    }
    finish(&stream, done_empty()).await;
}

/// Writes a file from the client's `Data` records: into a temporary file
/// beside it, renamed over the target at `Eof`, so the file appears
/// complete or not at all.
pub(crate) async fn write(op: WriteOp, stream: OpStream) {
    let target = PathBuf::from(&op.path);
    let temp = temp_beside(&target);
    let mut options = tokio::fs::OpenOptions::new();
    options.write(true).create_new(true);
    options.mode(op.mode.unwrap_or(0o644));
    let mut file = match options.open(&temp).await {
        Ok(file) => file,
        Err(err) => return fail(&stream, &err, "cannot create", Some(&op.path)).await,
    };
    let mut reader = RecordReader::new(stream.clone());
    let mut written = 0u64;
    let outcome: Result<(), AgentRecord> = loop {
        match reader.next_client().await {
            Ok(Some(ClientRecord::Data(data))) => {
                if let Err(err) = file.write_all(&data).await {
                    break Err(AgentRecord::Error(super::agent::error_reply(
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
                    AgentRecord::Error(super::agent::error_reply(
                        &err,
                        "cannot rename into place",
                        Some(&op.path),
                    ))
                })
            }
            Err(err) => Err(AgentRecord::Error(super::agent::error_reply(
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
