// The temporary file of a spooled upload: written at the offsets upstream
// gives (muxers seek back to rewrite headers), read back in blocks at EOS,
// deleted when dropped, on every path.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use crate::stop::Stop;

pub(super) struct Spool {
    file: std::fs::File,
    path: tempfile::TempPath,
    position: u64,
    size: u64,
    /// Most bytes the file may hold (max-spool-size); 0: no limit.
    limit: u64,
}

impl Spool {
    pub(super) fn create(dir: &Path, limit: u64) -> Result<Spool, Stop> {
        let (file, path) = tempfile::Builder::new()
            .prefix("roboflow-upload-")
            .suffix(".spool")
            .tempfile_in(dir)
            .map_err(|err| Stop::failed(format!("cannot create a spool file in '{}': {err} (spool-dir)", dir.display())))?
            .into_parts();
        Ok(Spool { file, path, position: 0, size: 0, limit })
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// The size of the upload: the furthest byte written.
    pub(super) fn size(&self) -> u64 {
        self.size
    }

    /// Upstream seeks (a BYTES segment): the next bytes go there.
    pub(super) fn seek(&mut self, position: u64) {
        self.position = position;
    }

    pub(super) fn write(&mut self, data: &[u8]) -> Result<(), Stop> {
        let end = self.position + data.len() as u64;
        if self.limit > 0 && end > self.limit {
            return Err(Stop::failed(format!(
                "the spooled upload would grow to {end} bytes, over max-spool-size ({} bytes); raise max-spool-size or free space in spool-dir",
                self.limit
            )));
        }
        let write = |spool: &mut Spool| -> std::io::Result<()> {
            spool.file.seek(SeekFrom::Start(spool.position))?;
            spool.file.write_all(data)
        };
        write(self).map_err(|err| {
            Stop::failed(format!(
                "writing {} bytes at offset {} of the spool file {} failed: {err} (spool-dir)",
                data.len(),
                self.position,
                self.path.display()
            ))
        })?;
        self.position = end;
        self.size = self.size.max(end);
        Ok(())
    }

    /// Reads the whole upload back in blocks of `block_size`, from the start.
    pub(super) fn read_blocks(&mut self, block_size: usize, mut each: impl FnMut(&[u8]) -> Result<(), Stop>) -> Result<(), Stop> {
        let path = self.path.display().to_string();
        let read_error = |err: std::io::Error| Stop::failed(format!("reading back the spool file {path} failed: {err}"));
        self.file.seek(SeekFrom::Start(0)).map_err(read_error)?;
        let mut block = vec![0u8; block_size];
        let mut remaining = self.size;
        while remaining > 0 {
            let want = block.len().min(remaining as usize);
            self.file.read_exact(&mut block[..want]).map_err(read_error)?;
            remaining -= want as u64;
            each(&block[..want])?;
        }
        Ok(())
    }
}
