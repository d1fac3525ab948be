//! Files on the host: metadata operations (`stat`, `ls`, `mkdir`, `rm`,
//! `mv`), streamed `read` and `write`, and whole-file copies both ways.

use std::path::{Path, PathBuf};

use bytes::{BufMut, BytesMut};
use kitepipe_proto::remote::{
    AgentRecord, ClientRecord, DATA_CHUNK, DirEntry, FileStat, MkdirOp, MvOp, PathOp,
    RECORD_HEADER_LEN, ReadHead, ReadOp, RemoteOp, RmOp, StatOp, WriteOp, Written,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{
    MAX_COLLECT_BYTES, MAX_LS_BYTES, MAX_LS_ENTRIES, RemoteError, Session, decode, protocol,
};
use crate::remote::stream::{RecordReader, RecvError, client_bytes};

impl Session {
    /// Metadata of a remote path (symbolic links followed unless `no_follow`).
    pub async fn stat(&self, path: &str, no_follow: bool) -> Result<FileStat, RemoteError> {
        let op = RemoteOp::Stat(StatOp {
            path: path.to_string(),
            no_follow,
        });
        self.simple("stat", op).await
    }

    /// The entries of a remote directory, sorted by name.
    pub async fn ls(&self, path: &str) -> Result<Vec<DirEntry>, RemoteError> {
        let op = RemoteOp::Ls(PathOp {
            path: path.to_string(),
        });
        let mut entries = Vec::new();
        let mut bytes = 0usize;
        self.simple_records("ls", op, &mut |batch| {
            bytes += batch.len();
            if bytes > MAX_LS_BYTES {
                return Err(RemoteError::TooLarge {
                    op: "ls",
                    what: format!("more than {MAX_LS_BYTES} bytes of listing (MAX_LS_BYTES)"),
                });
            }
            let batch = decode::<Vec<DirEntry>>("ls", &batch)?;
            if entries.len() + batch.len() > MAX_LS_ENTRIES {
                return Err(RemoteError::TooLarge {
                    op: "ls",
                    what: format!("more than {MAX_LS_ENTRIES} entries (MAX_LS_ENTRIES)"),
                });
            }
            entries.extend(batch);
            Ok(())
        })
        .await?;
        Ok(entries)
    }

    /// Creates a remote directory (with its parents if `parents`).
    pub async fn mkdir(&self, path: &str, parents: bool) -> Result<(), RemoteError> {
        let op = RemoteOp::Mkdir(MkdirOp {
            path: path.to_string(),
            parents,
            mode: None,
        });
        self.simple::<serde_json::Value>("mkdir", op)
            .await
            .map(drop)
    }

    /// Removes a remote file or directory (recursively if asked).
    pub async fn rm(&self, path: &str, recursive: bool) -> Result<(), RemoteError> {
        let op = RemoteOp::Rm(RmOp {
            path: path.to_string(),
            recursive,
        });
        self.simple::<serde_json::Value>("rm", op).await.map(drop)
    }

    /// Renames a remote path.
    pub async fn mv(&self, from: &str, to: &str) -> Result<(), RemoteError> {
        let op = RemoteOp::Mv(MvOp {
            from: from.to_string(),
            to: to.to_string(),
        });
        self.simple::<serde_json::Value>("mv", op).await.map(drop)
    }

    /// Reads a whole remote file into memory.
    pub async fn read(&self, path: &str) -> Result<Vec<u8>, RemoteError> {
        let mut out = Bounded(Vec::new());
        self.read_into(path, &mut out, &mut |_, _| {})
            .await
            .map_err(|err| match err {
                RemoteError::Local { source, .. }
                    if source.kind() == std::io::ErrorKind::FileTooLarge =>
                {
                    RemoteError::TooLarge {
                        op: "read",
                        what: format!(
                            "more than {MAX_COLLECT_BYTES} bytes (MAX_COLLECT_BYTES; stream it with read_into)"
                        ),
                    }
                }
                other => other,
            })?;
        Ok(out.0)
    }

    /// Streams a remote file into `out`; `progress(done, total)` is called
    /// after every chunk. Returns the bytes copied.
    pub async fn read_into<W: AsyncWrite + Unpin>(
        &self,
        path: &str,
        out: &mut W,
        progress: &mut (dyn FnMut(u64, u64) + Send),
    ) -> Result<u64, RemoteError> {
        let op = RemoteOp::Read(ReadOp {
            path: path.to_string(),
        });
        let stream = self.open("read", op).await?;
        let _ = stream.finish().await;
        let mut reader = RecordReader::new(stream);
        let mut total = 0;
        let mut done = 0u64;
        loop {
            // The host makes progress within the deadline, or the read ends.
            match self.next_in_time("read", &mut reader).await? {
                Ok(Some(AgentRecord::Head(json))) => {
                    total = decode::<ReadHead>("read", &json)?.size
                }
                Ok(Some(AgentRecord::Data(data))) => {
                    out.write_all(&data)
                        .await
                        .map_err(|source| RemoteError::Local {
                            path: PathBuf::from("-"),
                            source,
                        })?;
                    done += data.len() as u64;
                    progress(done, total.max(done));
                }
                Ok(Some(AgentRecord::Done(_))) => break,
                Ok(Some(AgentRecord::Error(reply))) => {
                    return Err(RemoteError::Failed { op: "read", reply });
                }
                Ok(Some(_)) => return Err(protocol("read", "unexpected record")),
                Ok(None) => return Err(protocol("read", "the file ended without Done")),
                Err(err) => return Err(self.stream_error("read", err)),
            }
        }
        out.flush().await.map_err(|source| RemoteError::Local {
            path: PathBuf::from("-"),
            source,
        })?;
        Ok(done)
    }

    /// Writes `data` to a remote file (created or replaced whole).
    pub async fn write(&self, path: &str, data: &[u8]) -> Result<(), RemoteError> {
        let mut src = data;
        self.write_from(path, &mut src, data.len() as u64, None, &mut |_, _| {})
            .await
            .map(drop)
    }

    /// Streams `src` into a remote file, created or replaced whole (written
    /// beside it and renamed at the end); `total` is for progress only.
    pub async fn write_from<R: AsyncRead + Unpin>(
        &self,
        path: &str,
        src: &mut R,
        total: u64,
        mode: Option<u32>,
        progress: &mut (dyn FnMut(u64, u64) + Send),
    ) -> Result<u64, RemoteError> {
        let op = RemoteOp::Write(WriteOp {
            path: path.to_string(),
            mode,
        });
        let stream = self.open("write", op).await?;
        let mut reader = RecordReader::new(stream.clone());
        // Upload while watching for an early error (e.g. permission denied).
        let upload = async {
            let mut done = 0u64;
            loop {
                let mut buf = BytesMut::with_capacity(RECORD_HEADER_LEN + DATA_CHUNK);
                buf.put_bytes(0, RECORD_HEADER_LEN);
                let n = read_up_to(src, &mut buf, DATA_CHUNK)
                    .await
                    .map_err(|source| RemoteError::Local {
                        path: PathBuf::from("-"),
                        source,
                    })?;
                if n == 0 {
                    break;
                }
                buf[..RECORD_HEADER_LEN].copy_from_slice(&ClientRecord::data_header(n));
                // A host that grants no window for the deadline is stuck.
                self.with_deadline("write", stream.send(buf.freeze()))
                    .await?
                    .map_err(|err| self.stream_error("write", RecvError::Io(err)))?;
                done += n as u64;
                progress(done, total.max(done));
            }
            self.with_deadline("write", stream.send(client_bytes(&ClientRecord::Eof)))
                .await?
                .map_err(|err| self.stream_error("write", RecvError::Io(err)))?;
            let _ = stream.finish().await;
            Ok::<u64, RemoteError>(done)
        };
        let reply = async {
            match reader.next_agent().await {
                Ok(Some(AgentRecord::Done(json))) => Ok(decode::<Written>("write", &json)?.bytes),
                Ok(Some(AgentRecord::Error(reply))) => {
                    Err(RemoteError::Failed { op: "write", reply })
                }
                Ok(Some(_)) => Err(protocol("write", "unexpected record")),
                Ok(None) => Err(protocol("write", "no reply")),
                Err(err) => Err(self.stream_error("write", err)),
            }
        };
        tokio::pin!(upload);
        tokio::pin!(reply);
        tokio::select! {
            res = &mut upload => {
                let sent = res?;
                // The host answers within the deadline once all is sent.
                let written = self.with_deadline("write", reply).await??;
                if written != sent {
                    return Err(protocol("write", "the agent wrote a different length"));
                }
                Ok(written)
            }
            res = &mut reply => {
                // The agent answered before the upload ended: an error.
                res.and_then(|_| Err(protocol("write", "reply before the end of the data")))
            }
        }
    }

    /// Copies a local file to the host.
    pub async fn copy_to(
        &self,
        local: &Path,
        remote: &str,
        progress: &mut (dyn FnMut(u64, u64) + Send),
    ) -> Result<u64, RemoteError> {
        let local_err = |source| RemoteError::Local {
            path: local.to_path_buf(),
            source,
        };
        let mut file = tokio::fs::File::open(local).await.map_err(local_err)?;
        let meta = file.metadata().await.map_err(local_err)?;
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o777;
        self.write_from(remote, &mut file, meta.len(), Some(mode), progress)
            .await
    }

    /// Copies a file from the host to a local path (written beside it and
    /// renamed at the end).
    pub async fn copy_from(
        &self,
        remote: &str,
        local: &Path,
        progress: &mut (dyn FnMut(u64, u64) + Send),
    ) -> Result<u64, RemoteError> {
        let local_err = |source| RemoteError::Local {
            path: local.to_path_buf(),
            source,
        };
        let name = local
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let temp = local.with_file_name(format!(".{name}.kitepipe-{:016x}", rand::random::<u64>()));
        let file = tokio::fs::File::create(&temp).await.map_err(local_err)?;
        // Removes the partial file however the copy ends: an error, a
        // timeout, or this future dropped (the user interrupted kitepipe).
        let mut guard = TempFile(Some(temp.clone()));
        let mut out = tokio::io::BufWriter::with_capacity(DATA_CHUNK, file);
        let res = self.read_into(remote, &mut out, progress).await;
        drop(out);
        match res {
            Ok(n) => {
                tokio::fs::rename(&temp, local).await.map_err(local_err)?;
                guard.0 = None;
                Ok(n)
            }
            Err(err) => {
                drop(guard);
                Err(match err {
                    RemoteError::Local { source, .. } => local_err(source),
                    other => other,
                })
            }
        }
    }
}

/// A temporary file removed when dropped, unless taken.
struct TempFile(Option<PathBuf>);

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            // Dropping happens off the async path at most once per copy; a
            // blocking unlink is the only way to clean up in Drop.
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A byte sink that refuses to grow past [`MAX_COLLECT_BYTES`].
struct Bounded(Vec<u8>);

impl AsyncWrite for Bounded {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if self.0.len() + buf.len() > MAX_COLLECT_BYTES {
            return std::task::Poll::Ready(Err(std::io::ErrorKind::FileTooLarge.into()));
        }
        self.0.extend_from_slice(buf);
        std::task::Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

async fn read_up_to<R: AsyncRead + Unpin>(
    src: &mut R,
    buf: &mut BytesMut,
    max: usize,
) -> std::io::Result<usize> {
    let start = buf.len();
    while buf.len() - start < max {
        let n = (&mut *src)
            .take((max - (buf.len() - start)) as u64)
            .read_buf(buf)
            .await?;
        if n == 0 {
            break;
        }
    }
    Ok(buf.len() - start)
}
