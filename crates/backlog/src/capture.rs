//! A command's standard output, held until the item's outcome is written:
//! the first bytes in memory, the rest in an anonymous temporary file, so
//! that memory does not grow with the size of the output.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncSeekExt, AsyncWrite, AsyncWriteExt, BufReader};

/// How many bytes of one command's output are kept in memory before the
/// rest goes to a temporary file.
pub const MEMORY_BYTES: usize = 1024 * 1024;

/// The size of the buffer for reading the pipe and the temporary file.
const CHUNK_BYTES: usize = 64 * 1024;

/// The output of one command, in memory and, past [`MEMORY_BYTES`], in a
/// temporary file that the system deletes once it is closed.
#[derive(Debug, Default)]
pub struct CapturedOutput {
    memory: Vec<u8>,
    spill: Option<File>,
}

impl From<Vec<u8>> for CapturedOutput {
    fn from(memory: Vec<u8>) -> Self {
        CapturedOutput {
            memory,
            ..CapturedOutput::default()
        }
    }
}

impl CapturedOutput {
    /// Reads `pipe` to its end, keeping up to `memory_bytes` in memory and
    /// writing the rest to a temporary file, which is created only then.
    ///
    /// # Errors
    ///
    /// Fails when reading the pipe fails, or when the temporary file cannot
    /// be created or written. After a temporary file error, the pipe is
    /// still read to its end, so that the command does not block on it.
    pub async fn read_from(
        mut pipe: impl AsyncRead + Unpin,
        memory_bytes: usize,
    ) -> io::Result<Self> {
        let mut output = CapturedOutput::default();
        let mut spill: Option<tokio::fs::File> = None;
        let mut spill_error = None;
        let mut chunk = vec![0u8; CHUNK_BYTES];
        loop {
            let read = pipe.read(&mut chunk).await?;
            if read == 0 {
                break;
            }
            let room = memory_bytes.saturating_sub(output.memory.len());
            let (to_memory, to_spill) = chunk[..read].split_at(room.min(read));
            output.memory.extend_from_slice(to_memory);
            if to_spill.is_empty() || spill_error.is_some() {
                continue;
            }
            if let Err(error) = spill_bytes(&mut spill, to_spill).await {
                spill_error = Some(error);
            }
        }
        if let Some(error) = spill_error {
            return Err(temp_file_error(error));
        }
        if let Some(mut file) = spill {
            file.flush().await.map_err(temp_file_error)?;
            output.spill = Some(file.into_std().await);
        }
        Ok(output)
    }

    /// Writes the whole output to `out`, then flushes it.
    ///
    /// # Errors
    ///
    /// Fails when writing `out` fails or the temporary file cannot be read.
    pub async fn write_to(&self, out: &mut (impl AsyncWrite + Unpin)) -> io::Result<()> {
        out.write_all(&self.memory).await?;
        if let Some(spill) = &self.spill {
            // A duplicate descriptor for the async file, because the
            // captured output stays usable after it is written.
            let mut file = tokio::fs::File::from_std(spill.try_clone()?);
            file.seek(SeekFrom::Start(0)).await?;
            let mut file = BufReader::with_capacity(CHUNK_BYTES, file);
            tokio::io::copy_buf(&mut file, out).await?;
        }
        out.flush().await
    }

    /// Writes the whole output to `out` with blocking calls, then flushes it.
    ///
    /// # Errors
    ///
    /// Fails when writing `out` fails or the temporary file cannot be read.
    pub fn write_blocking(&self, out: &mut (impl Write + ?Sized)) -> io::Result<()> {
        out.write_all(&self.memory)?;
        if let Some(mut spill) = self.spill.as_ref() {
            spill.seek(SeekFrom::Start(0))?;
            let mut chunk = vec![0u8; CHUNK_BYTES];
            loop {
                let read = spill.read(&mut chunk)?;
                if read == 0 {
                    break;
                }
                out.write_all(&chunk[..read])?;
            }
        }
        out.flush()
    }
}

/// Appends `bytes` to the temporary file, creating it on first use.
async fn spill_bytes(spill: &mut Option<tokio::fs::File>, bytes: &[u8]) -> io::Result<()> {
    let file = match spill {
        Some(file) => file,
        None => {
            let created = tokio::task::spawn_blocking(tempfile::tempfile)
                .await
                .map_err(io::Error::other)??;
            spill.insert(tokio::fs::File::from_std(created))
        }
    };
    file.write_all(bytes).await
}

fn temp_file_error(error: io::Error) -> io::Error {
    let message = format!(
        "cannot keep the command's output beyond {MEMORY_BYTES} bytes in a temporary file \
         (set TMPDIR to a directory with room): {error}"
    );
    io::Error::new(error.kind(), message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(length: usize) -> Vec<u8> {
        (0..length).map(|n| (n % 251) as u8).collect()
    }

    #[tokio::test]
    async fn small_output_stays_in_memory() {
        let bytes = sample(100);
        let output = CapturedOutput::read_from(&bytes[..], 100).await.unwrap();
        assert!(output.spill.is_none());
        let mut written = Vec::new();
        output.write_to(&mut written).await.unwrap();
        assert_eq!(written, bytes);
    }

    #[tokio::test]
    async fn large_output_spills_to_file() {
        let bytes = sample(3 * CHUNK_BYTES + 17);
        let output = CapturedOutput::read_from(&bytes[..], 1000).await.unwrap();
        assert_eq!(output.memory.len(), 1000);
        assert!(output.spill.is_some());

        let mut written = Vec::new();
        output.write_to(&mut written).await.unwrap();
        assert!(written == bytes, "the async copy differs");
        let mut again = Vec::new();
        output.write_blocking(&mut again).unwrap();
        assert!(again == bytes, "the blocking copy differs");
    }

    #[tokio::test]
    async fn empty_output_writes_nothing() {
        let output = CapturedOutput::read_from(&b""[..], 10).await.unwrap();
        assert!(output.spill.is_none());
        let mut written = Vec::new();
        output.write_blocking(&mut written).unwrap();
        assert!(written.is_empty());
    }
}
