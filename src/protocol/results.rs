//! Reassembly of result messages from the `inference` channel (PROTOCOL.md section 5).
//!
//! Each message is a 12-byte header
//! `[frame_id u32 LE][chunk_index u32 LE][total_chunks u32 LE]` followed by a
//! payload. A frame's chunks are joined by `frame_id`, in index order; the
//! joined payload is gzip when it starts with `1f 8b`, plain UTF-8 JSON
//! otherwise.
//!
//! Memory is bounded at every step: a chunk is checked against the limits
//! before it is stored, and gzip is inflated through a bounded reader, so a
//! hostile or broken server can make [`ResultReassembler::push`] fail but not
//! make it allocate without bound.
//!
//! After an error that names a frame, that frame is dropped and remembered as
//! finished: its later chunks are ignored (and counted as duplicates), so one
//! bad frame never leaves a partial frame behind that can never complete.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt;
use std::io::{Cursor, Read};

/// Length of the result header: `[frame_id][chunk_index][total_chunks]`, u32 LE each.
pub const RESULT_HEADER_LEN: usize = 12;

/// How many finished frame ids are remembered to ignore late duplicates.
pub const RECENTLY_FINISHED_CAPACITY: usize = 256;

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// The 12-byte result header: frame id, chunk index, total chunks, u32 LE each.
#[cfg(test)]
pub fn encode_result_header(
    frame_id: u32,
    chunk_index: u32,
    total_chunks: u32,
) -> [u8; RESULT_HEADER_LEN] {
    let mut header = [0u8; RESULT_HEADER_LEN];
    header[..4].copy_from_slice(&frame_id.to_le_bytes());
    header[4..8].copy_from_slice(&chunk_index.to_le_bytes());
    header[8..].copy_from_slice(&total_chunks.to_le_bytes());
    header
}

/// Reads `(frame_id, chunk_index, total_chunks)` from a result message, or
/// `None` when it is shorter than the header.
pub fn decode_result_header(message: &[u8]) -> Option<(u32, u32, u32)> {
    let h = message.get(..RESULT_HEADER_LEN)?;
    let word = |i: usize| u32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
    Some((word(0), word(4), word(8)))
}

/// True when a reassembled payload is gzip rather than plain JSON.
pub fn is_gzip(payload: &[u8]) -> bool {
    payload.starts_with(&GZIP_MAGIC)
}

/// Bounds on what the reassembler accepts.
///
/// The defaults are far above anything the server sends and low enough that
/// a broken stream fails instead of exhausting memory:
/// - `max_chunks_per_frame` 4096: the server's chunks hold up to 48 KiB, so a
///   frame at `max_frame_bytes` needs about 1366 of them; 4096 leaves room
///   for smaller chunks while rejecting absurd counts from a corrupt header.
/// - `max_frame_bytes` 64 MiB: a frame's result is JSON plus, in datachannel
///   frames mode, base64 JPEGs; a 4K JPEG at quality 80 is a few MiB, so even
///   several image outputs stay well below.
/// - `max_decompressed_bytes` 256 MiB: JSON compresses well (often 5-20x),
///   base64 JPEG hardly; 256 MiB of inflated JSON is beyond any sane frame but
///   stops a gzip bomb long before it matters.
/// - `max_frames_in_flight` 64: the channel is ordered and reliable and the
///   server sends a frame's chunks back to back, so normally at most one or
///   two frames are partial; 64 only tolerates interleaving, and a stream
///   that leaves more frames unfinished is broken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReassemblyLimits {
    pub max_chunks_per_frame: u32,
    pub max_frame_bytes: usize,
    pub max_decompressed_bytes: usize,
    pub max_frames_in_flight: usize,
}

impl Default for ReassemblyLimits {
    fn default() -> Self {
        ReassemblyLimits {
            max_chunks_per_frame: 4096,
            max_frame_bytes: 64 << 20,
            max_decompressed_bytes: 256 << 20,
            max_frames_in_flight: 64,
        }
    }
}

/// One frame's result, reassembled and decompressed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompletedResult {
    /// The header's frame id (the server's 1-based frame number; the final
    /// `processing_complete` message carries last frame + 1).
    pub frame_id: u32,
    /// The JSON document, decompressed when it arrived as gzip. Not yet
    /// parsed or checked for UTF-8: `serde_json::from_slice` does both.
    pub json: Vec<u8>,
    /// True when the payload arrived gzip-compressed.
    pub compressed: bool,
    /// Size of the reassembled payload as it arrived, before decompression
    /// (sum of the chunk payloads, headers excluded).
    pub wire_bytes: usize,
}

/// Why a result message was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResultError {
    /// The message is shorter than the 12-byte header.
    TooShort { len: usize },
    /// The header says the frame has 0 chunks.
    ZeroTotalChunks { frame_id: u32, chunk_index: u32 },
    /// The header's chunk count exceeds the limit.
    TooManyChunks {
        frame_id: u32,
        total_chunks: u32,
        max: u32,
    },
    /// The chunk index is not below the chunk count.
    ChunkIndexOutOfRange {
        frame_id: u32,
        chunk_index: u32,
        total_chunks: u32,
    },
    /// A chunk's `total_chunks` differs from the earlier chunks of its frame.
    TotalChunksChanged {
        frame_id: u32,
        chunk_index: u32,
        total_chunks: u32,
        earlier_total_chunks: u32,
    },
    /// Storing this chunk would take the frame past `max_frame_bytes`.
    FrameTooLarge {
        frame_id: u32,
        chunk_index: u32,
        bytes: usize,
        max: usize,
    },
    /// A new frame started while `max` frames are already partial.
    TooManyFramesInFlight {
        frame_id: u32,
        in_flight: usize,
        max: usize,
    },
    /// The payload starts like gzip but does not inflate.
    Decompress {
        frame_id: u32,
        compressed_bytes: usize,
        reason: String,
    },
    /// The payload inflates to more than `max_decompressed_bytes`.
    DecompressedTooLarge {
        frame_id: u32,
        compressed_bytes: usize,
        max: usize,
    },
}

impl ResultError {
    /// The frame the error is about, when the header could be read.
    pub fn frame_id(&self) -> Option<u32> {
        match self {
            ResultError::TooShort { .. } => None,
            ResultError::ZeroTotalChunks { frame_id, .. }
            | ResultError::TooManyChunks { frame_id, .. }
            | ResultError::ChunkIndexOutOfRange { frame_id, .. }
            | ResultError::TotalChunksChanged { frame_id, .. }
            | ResultError::FrameTooLarge { frame_id, .. }
            | ResultError::TooManyFramesInFlight { frame_id, .. }
            | ResultError::Decompress { frame_id, .. }
            | ResultError::DecompressedTooLarge { frame_id, .. } => Some(*frame_id),
        }
    }
}

impl fmt::Display for ResultError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ResultError::TooShort { len } => write!(
                f,
                "result message of {len} bytes is shorter than the {RESULT_HEADER_LEN}-byte header"
            ),
            ResultError::ZeroTotalChunks {
                frame_id,
                chunk_index,
            } => write!(
                f,
                "result chunk {chunk_index} of frame {frame_id} says total_chunks 0"
            ),
            ResultError::TooManyChunks {
                frame_id,
                total_chunks,
                max,
            } => write!(
                f,
                "result frame {frame_id} says total_chunks {total_chunks}, more than the limit of {max}"
            ),
            ResultError::ChunkIndexOutOfRange {
                frame_id,
                chunk_index,
                total_chunks,
            } => write!(
                f,
                "result chunk {chunk_index} of frame {frame_id} is out of range: total_chunks is {total_chunks}"
            ),
            ResultError::TotalChunksChanged {
                frame_id,
                chunk_index,
                total_chunks,
                earlier_total_chunks,
            } => write!(
                f,
                "result chunk {chunk_index} of frame {frame_id} says total_chunks {total_chunks}, \
                 earlier chunks said {earlier_total_chunks}"
            ),
            ResultError::FrameTooLarge {
                frame_id,
                chunk_index,
                bytes,
                max,
            } => write!(
                f,
                "result frame {frame_id} would reach {bytes} bytes with chunk {chunk_index}, \
                 more than the limit of {max} bytes"
            ),
            ResultError::TooManyFramesInFlight {
                frame_id,
                in_flight,
                max,
            } => write!(
                f,
                "result frame {frame_id} starts while {in_flight} frames are still incomplete \
                 (limit {max})"
            ),
            ResultError::Decompress {
                frame_id,
                compressed_bytes,
                reason,
            } => write!(
                f,
                "result frame {frame_id}: {compressed_bytes} bytes of gzip data do not decompress: {reason}"
            ),
            ResultError::DecompressedTooLarge {
                frame_id,
                compressed_bytes,
                max,
            } => write!(
                f,
                "result frame {frame_id}: {compressed_bytes} bytes of gzip data decompress to more \
                 than the limit of {max} bytes"
            ),
        }
    }
}

impl std::error::Error for ResultError {}

/// A frame whose chunks are still arriving.
#[derive(Debug)]
struct PartialFrame {
    total_chunks: u32,
    /// Only the chunks received so far, so memory follows what arrived and
    /// not what a header claims.
    chunks: BTreeMap<u32, Vec<u8>>,
    bytes: usize,
}

/// Joins result chunks into frames. Feed it every binary message of the
/// `inference` channel, in arrival order.
#[derive(Debug)]
pub struct ResultReassembler {
    limits: ReassemblyLimits,
    partial: HashMap<u32, PartialFrame>,
    finished: HashSet<u32>,
    finished_order: VecDeque<u32>,
    duplicates_ignored: u64,
    gunzip: Gunzip,
}

impl Default for ResultReassembler {
    fn default() -> Self {
        ResultReassembler::new(ReassemblyLimits::default())
    }
}

impl ResultReassembler {
    pub fn new(limits: ReassemblyLimits) -> Self {
        ResultReassembler {
            limits,
            partial: HashMap::new(),
            finished: HashSet::new(),
            finished_order: VecDeque::new(),
            duplicates_ignored: 0,
            gunzip: Gunzip::default(),
        }
    }


    /// Frames with some but not all chunks received.
    #[cfg(test)]
    pub fn frames_in_flight(&self) -> usize {
        self.partial.len()
    }

    /// Chunks ignored because their frame already held that index, or was
    /// already finished (delivered or dropped after an error).
    #[cfg(test)]
    pub fn duplicates_ignored(&self) -> u64 {
        self.duplicates_ignored
    }

    /// Bytes held in partial frames.
    #[cfg(test)]
    pub fn bytes_in_flight(&self) -> usize {
        self.partial.values().map(|p| p.bytes).sum()
    }

    /// Takes one message; returns the frame it completes, if any.
    ///
    /// On an error naming a frame, that frame's chunks are dropped and its
    /// later chunks ignored; other frames are unaffected, so the caller may
    /// go on after logging, or end the session.
    pub fn push(&mut self, message: &[u8]) -> Result<Option<CompletedResult>, ResultError> {
        let (frame_id, chunk_index, total_chunks) =
            decode_result_header(message).ok_or(ResultError::TooShort { len: message.len() })?;
        let payload = &message[RESULT_HEADER_LEN..];

        if self.finished.contains(&frame_id) {
            self.duplicates_ignored += 1;
            return Ok(None);
        }
        let result = self.accept(frame_id, chunk_index, total_chunks, payload);
        if result.is_err() {
            self.partial.remove(&frame_id);
            self.mark_finished(frame_id);
        }
        result
    }

    fn accept(
        &mut self,
        frame_id: u32,
        chunk_index: u32,
        total_chunks: u32,
        payload: &[u8],
    ) -> Result<Option<CompletedResult>, ResultError> {
        self.check_header(frame_id, chunk_index, total_chunks)?;

        let Some(frame) = self.partial.get_mut(&frame_id) else {
            if total_chunks == 1 {
                // The common case: a whole frame in one message, no copy to hold.
                self.check_frame_bytes(frame_id, chunk_index, payload.len())?;
                self.mark_finished(frame_id);
                return self.complete(frame_id, payload.to_vec()).map(Some);
            }
            if self.partial.len() >= self.limits.max_frames_in_flight {
                return Err(ResultError::TooManyFramesInFlight {
                    frame_id,
                    in_flight: self.partial.len(),
                    max: self.limits.max_frames_in_flight,
                });
            }
            self.check_frame_bytes(frame_id, chunk_index, payload.len())?;
            let mut chunks = BTreeMap::new();
            chunks.insert(chunk_index, payload.to_vec());
            self.partial.insert(
                frame_id,
                PartialFrame {
                    total_chunks,
                    chunks,
                    bytes: payload.len(),
                },
            );
            return Ok(None);
        };

        if frame.total_chunks != total_chunks {
            return Err(ResultError::TotalChunksChanged {
                frame_id,
                chunk_index,
                total_chunks,
                earlier_total_chunks: frame.total_chunks,
            });
        }
        if frame.chunks.contains_key(&chunk_index) {
            self.duplicates_ignored += 1;
            return Ok(None);
        }
        let bytes = frame.bytes.saturating_add(payload.len());
        if bytes > self.limits.max_frame_bytes {
            return Err(ResultError::FrameTooLarge {
                frame_id,
                chunk_index,
                bytes,
                max: self.limits.max_frame_bytes,
            });
        }
        frame.chunks.insert(chunk_index, payload.to_vec());
        frame.bytes = bytes;
        if frame.chunks.len() < frame.total_chunks as usize {
            return Ok(None);
        }

        let frame = self.partial.remove(&frame_id).expect("frame just updated");
        self.mark_finished(frame_id);
        let mut joined = Vec::with_capacity(frame.bytes);
        for chunk in frame.chunks.into_values() {
            joined.extend_from_slice(&chunk);
        }
        self.complete(frame_id, joined).map(Some)
    }

    fn check_header(
        &self,
        frame_id: u32,
        chunk_index: u32,
        total_chunks: u32,
    ) -> Result<(), ResultError> {
        if total_chunks == 0 {
            return Err(ResultError::ZeroTotalChunks {
                frame_id,
                chunk_index,
            });
        }
        if total_chunks > self.limits.max_chunks_per_frame {
            return Err(ResultError::TooManyChunks {
                frame_id,
                total_chunks,
                max: self.limits.max_chunks_per_frame,
            });
        }
        if chunk_index >= total_chunks {
            return Err(ResultError::ChunkIndexOutOfRange {
                frame_id,
                chunk_index,
                total_chunks,
            });
        }
        Ok(())
    }

    fn check_frame_bytes(
        &self,
        frame_id: u32,
        chunk_index: u32,
        bytes: usize,
    ) -> Result<(), ResultError> {
        if bytes > self.limits.max_frame_bytes {
            return Err(ResultError::FrameTooLarge {
                frame_id,
                chunk_index,
                bytes,
                max: self.limits.max_frame_bytes,
            });
        }
        Ok(())
    }

    fn mark_finished(&mut self, frame_id: u32) {
        if self.finished.insert(frame_id) {
            self.finished_order.push_back(frame_id);
            if self.finished_order.len() > RECENTLY_FINISHED_CAPACITY
                && let Some(oldest) = self.finished_order.pop_front()
            {
                self.finished.remove(&oldest);
            }
        }
    }

    fn complete(&mut self, frame_id: u32, payload: Vec<u8>) -> Result<CompletedResult, ResultError> {
        let compressed = is_gzip(&payload);
        let wire_bytes = payload.len();
        let json = if compressed {
            self.gunzip.inflate(payload, self.limits.max_decompressed_bytes).map_err(|e| match e {
                GunzipError::TooLarge => ResultError::DecompressedTooLarge {
                    frame_id,
                    compressed_bytes: wire_bytes,
                    max: self.limits.max_decompressed_bytes,
                },
                GunzipError::Invalid(reason) => ResultError::Decompress {
                    frame_id,
                    compressed_bytes: wire_bytes,
                    reason,
                },
            })?
        } else {
            payload
        };
        Ok(CompletedResult {
            frame_id,
            json,
            compressed,
            wire_bytes,
        })
    }
}

enum GunzipError {
    TooLarge,
    Invalid(String),
}

/// The session's gzip inflater: one decoder and one scratch buffer for every
/// result. A decoder made per result allocated its inflate state (about
/// 45 KiB) and the scratch 64 KiB each time, and glibc returned those pages
/// to the kernel and faulted them in again on every frame.
#[derive(Debug, Default)]
struct Gunzip {
    decoder: Option<flate2::bufread::GzDecoder<Cursor<Vec<u8>>>>,
    scratch: Vec<u8>,
}

impl Gunzip {
    /// Inflates `data` into a buffer that never grows past `max` bytes, so
    /// a gzip bomb costs at most `max` bytes of memory before it is refused.
    ///
    /// Not `take(max + 1).read_to_end(..)`: that refuses the same inputs,
    /// but its Vec grows by doubling, so at the default 64 MiB limit both a
    /// result of exactly 64 MiB and a bomb held 128 MiB (measured with std
    /// of rustc 1.95); the unit test below pins the bound.
    fn inflate(&mut self, data: Vec<u8>, max: usize) -> Result<Vec<u8>, GunzipError> {
        // Start from a modest guess instead of reserving `max` up front.
        let mut out = Vec::with_capacity(data.len().saturating_mul(4).min(max).min(1 << 20));
        if self.scratch.is_empty() {
            self.scratch = vec![0u8; 64 * 1024];
        }
        let mut input = Cursor::new(data);
        // Several members are legal gzip; the server writes one, but accept
        // more: each member starts where the previous one's trailer ended.
        loop {
            let decoder = match &mut self.decoder {
                Some(decoder) => {
                    decoder.reset(input);
                    decoder
                }
                None => self.decoder.insert(flate2::bufread::GzDecoder::new(input)),
            };
            loop {
                let n = match decoder.read(&mut self.scratch) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(GunzipError::Invalid(e.to_string())),
                };
                if n > max - out.len() {
                    return Err(GunzipError::TooLarge);
                }
                if out.capacity() - out.len() < n {
                    // Double, as Vec would, but never past `max`.
                    let grow = out.capacity().max(n).min(max - out.len());
                    out.reserve_exact(grow);
                }
                out.extend_from_slice(&self.scratch[..n]);
            }
            input = decoder.reset(Cursor::new(Vec::new()));
            if input.position() >= input.get_ref().len() as u64 {
                return Ok(out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::Compression;
    use flate2::write::GzEncoder;
    use proptest::prelude::*;
    use std::io::Write;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut enc = GzEncoder::new(Vec::new(), Compression::default());
        enc.write_all(data).unwrap();
        enc.finish().unwrap()
    }

    fn message(frame_id: u32, index: u32, total: u32, payload: &[u8]) -> Vec<u8> {
        let mut m = encode_result_header(frame_id, index, total).to_vec();
        m.extend_from_slice(payload);
        m
    }

    fn split(frame_id: u32, payload: &[u8], chunk: usize) -> Vec<Vec<u8>> {
        let parts: Vec<&[u8]> = if payload.is_empty() {
            vec![&[][..]]
        } else {
            payload.chunks(chunk).collect()
        };
        let total = parts.len() as u32;
        parts
            .iter()
            .enumerate()
            .map(|(i, p)| message(frame_id, i as u32, total, p))
            .collect()
    }

    #[test]
    fn header_layout() {
        assert_eq!(
            encode_result_header(1, 0, 1),
            [1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]
        );
        assert_eq!(
            encode_result_header(0x0403_0201, 0x0807_0605, 0x0c0b_0a09),
            [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
        );
        assert_eq!(
            encode_result_header(17, 3, 256),
            [17, 0, 0, 0, 3, 0, 0, 0, 0, 1, 0, 0]
        );
        assert_eq!(
            decode_result_header(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 99]),
            Some((0x0403_0201, 0x0807_0605, 0x0c0b_0a09))
        );
        assert_eq!(decode_result_header(&[0; 11]), None);
    }

    #[test]
    fn single_chunk_plain_json() {
        let mut r = ResultReassembler::default();
        let done = r
            .push(&message(1, 0, 1, br#"{"errors":[]}"#))
            .unwrap()
            .unwrap();
        assert_eq!(
            done,
            CompletedResult {
                frame_id: 1,
                json: br#"{"errors":[]}"#.to_vec(),
                compressed: false,
                wire_bytes: 13,
            }
        );
        assert_eq!(r.frames_in_flight(), 0);
    }

    #[test]
    fn out_of_order_duplicate_and_interleaved_chunks() {
        let mut r = ResultReassembler::default();
        let a = split(5, b"aaaaabbbbbccccc", 5);
        let b = split(6, b"xxyyz", 2);
        assert_eq!(r.push(&a[2]).unwrap(), None);
        assert_eq!(r.push(&b[1]).unwrap(), None);
        assert_eq!(r.push(&a[0]).unwrap(), None);
        assert_eq!(r.push(&a[0]).unwrap(), None); // duplicate
        assert_eq!(r.duplicates_ignored(), 1);
        assert_eq!(r.frames_in_flight(), 2);
        assert_eq!(r.bytes_in_flight(), 12);
        assert_eq!(r.push(&b[2]).unwrap(), None);
        let done_a = r.push(&a[1]).unwrap().unwrap();
        assert_eq!(done_a.frame_id, 5);
        assert_eq!(done_a.json, b"aaaaabbbbbccccc");
        assert_eq!(done_a.wire_bytes, 15);
        assert_eq!(r.frames_in_flight(), 1);
        let done_b = r.push(&b[0]).unwrap().unwrap();
        assert_eq!(done_b.frame_id, 6);
        assert_eq!(done_b.json, b"xxyyz");
        assert_eq!(r.frames_in_flight(), 0);
    }

    #[test]
    fn late_duplicate_of_finished_frame_is_ignored() {
        let mut r = ResultReassembler::default();
        let a = split(9, b"0123456789", 4);
        for m in &a[..2] {
            assert_eq!(r.push(m).unwrap(), None);
        }
        assert!(r.push(&a[2]).unwrap().is_some());
        assert_eq!(r.push(&a[1]).unwrap(), None);
        assert_eq!(r.push(&message(9, 0, 1, b"x")).unwrap(), None);
        assert_eq!(r.frames_in_flight(), 0);
        assert_eq!(r.duplicates_ignored(), 2);
    }

    #[test]
    fn finished_set_is_bounded() {
        let mut r = ResultReassembler::default();
        for id in 0..1000u32 {
            r.push(&message(id, 0, 1, b"{}")).unwrap().unwrap();
        }
        assert_eq!(r.finished.len(), RECENTLY_FINISHED_CAPACITY);
        assert_eq!(r.finished_order.len(), RECENTLY_FINISHED_CAPACITY);
        // The oldest id is forgotten and would be accepted again.
        assert!(r.push(&message(0, 0, 1, b"{}")).unwrap().is_some());
        assert_eq!(r.push(&message(999, 0, 1, b"{}")).unwrap(), None);
    }

    #[test]
    fn total_chunks_changing_is_an_error_and_drops_the_frame() {
        let mut r = ResultReassembler::default();
        r.push(&message(17, 0, 4, b"a")).unwrap();
        r.push(&message(17, 1, 4, b"b")).unwrap();
        let err = r.push(&message(17, 3, 5, b"c")).unwrap_err();
        assert_eq!(
            err,
            ResultError::TotalChunksChanged {
                frame_id: 17,
                chunk_index: 3,
                total_chunks: 5,
                earlier_total_chunks: 4
            }
        );
        assert_eq!(
            err.to_string(),
            "result chunk 3 of frame 17 says total_chunks 5, earlier chunks said 4"
        );
        assert_eq!(err.frame_id(), Some(17));
        assert_eq!(r.frames_in_flight(), 0);
        // Later chunks of the dropped frame start nothing.
        assert_eq!(r.push(&message(17, 2, 4, b"c")).unwrap(), None);
        assert_eq!(r.frames_in_flight(), 0);
        // Other frames still work.
        assert!(r.push(&message(18, 0, 1, b"{}")).unwrap().is_some());
    }

    #[test]
    fn header_errors() {
        let mut r = ResultReassembler::default();
        assert_eq!(
            r.push(&[0; 11]).unwrap_err(),
            ResultError::TooShort { len: 11 }
        );
        let err = r.push(&message(3, 0, 0, b"x")).unwrap_err();
        assert_eq!(
            err,
            ResultError::ZeroTotalChunks {
                frame_id: 3,
                chunk_index: 0
            }
        );
        assert_eq!(
            err.to_string(),
            "result chunk 0 of frame 3 says total_chunks 0"
        );
        let err = r.push(&message(4, 0, u32::MAX, b"x")).unwrap_err();
        assert_eq!(
            err,
            ResultError::TooManyChunks {
                frame_id: 4,
                total_chunks: u32::MAX,
                max: 4096
            }
        );
        let err = r.push(&message(5, 2, 2, b"x")).unwrap_err();
        assert_eq!(
            err,
            ResultError::ChunkIndexOutOfRange {
                frame_id: 5,
                chunk_index: 2,
                total_chunks: 2
            }
        );
        assert_eq!(r.frames_in_flight(), 0);
    }

    #[test]
    fn empty_payload_is_a_valid_empty_frame() {
        let mut r = ResultReassembler::default();
        let done = r.push(&message(1, 0, 1, b"")).unwrap().unwrap();
        assert!(done.json.is_empty());
        assert!(!done.compressed);
    }

    #[test]
    fn oversize_frame_is_rejected_before_storing() {
        let limits = ReassemblyLimits {
            max_frame_bytes: 10,
            ..ReassemblyLimits::default()
        };
        let mut r = ResultReassembler::new(limits);
        r.push(&message(1, 0, 3, &[0; 6])).unwrap();
        let err = r.push(&message(1, 1, 3, &[0; 5])).unwrap_err();
        assert_eq!(
            err,
            ResultError::FrameTooLarge {
                frame_id: 1,
                chunk_index: 1,
                bytes: 11,
                max: 10
            }
        );
        assert_eq!(r.bytes_in_flight(), 0);
        let err = r.push(&message(2, 0, 1, &[0; 11])).unwrap_err();
        assert!(matches!(
            err,
            ResultError::FrameTooLarge { frame_id: 2, .. }
        ));
        // Exactly at the limit is fine.
        assert!(r.push(&message(3, 0, 1, &[b' '; 10])).unwrap().is_some());
    }

    #[test]
    fn too_many_frames_in_flight() {
        let limits = ReassemblyLimits {
            max_frames_in_flight: 2,
            ..ReassemblyLimits::default()
        };
        let mut r = ResultReassembler::new(limits);
        r.push(&message(1, 0, 2, b"a")).unwrap();
        r.push(&message(2, 0, 2, b"a")).unwrap();
        // A single-chunk frame needs no slot.
        assert!(r.push(&message(3, 0, 1, b"{}")).unwrap().is_some());
        let err = r.push(&message(4, 0, 2, b"a")).unwrap_err();
        assert_eq!(
            err,
            ResultError::TooManyFramesInFlight {
                frame_id: 4,
                in_flight: 2,
                max: 2
            }
        );
        assert_eq!(r.frames_in_flight(), 2);
        assert_eq!(
            r.push(&message(1, 1, 2, b"b")).unwrap().unwrap().json,
            b"ab"
        );
    }

    #[test]
    fn gzip_is_detected_and_decompressed() {
        let json = br#"{"serialized_output_data":{"rgb_color":[1,2,3]},"errors":[]}"#.repeat(50);
        let gz = gzip(&json);
        assert!(is_gzip(&gz));
        let mut r = ResultReassembler::default();
        let msgs = split(7, &gz, 100);
        assert!(msgs.len() > 1);
        let mut done = None;
        for m in msgs.iter().rev() {
            done = r.push(m).unwrap();
        }
        let done = done.unwrap();
        assert!(done.compressed);
        assert_eq!(done.wire_bytes, gz.len());
        assert_eq!(done.json, json);
    }

    #[test]
    fn invalid_gzip_errors() {
        let mut r = ResultReassembler::default();
        let mut bad = gzip(b"{\"a\":1}");
        bad.truncate(bad.len() - 6);
        let err = r.push(&message(2, 0, 1, &bad)).unwrap_err();
        assert!(
            matches!(err, ResultError::Decompress { frame_id: 2, compressed_bytes, .. } if compressed_bytes == bad.len()),
            "{err:?}"
        );
        let err = r
            .push(&message(3, 0, 1, &[0x1f, 0x8b, 0, 0, 0, 0]))
            .unwrap_err();
        assert!(matches!(err, ResultError::Decompress { frame_id: 3, .. }));
        assert!(
            err.to_string()
                .starts_with("result frame 3: 6 bytes of gzip data do not decompress: ")
        );
    }

    #[test]
    fn gzip_of_several_members_inflates_whole() {
        let mut r = ResultReassembler::default();
        let mut gz = gzip(b"{\"a\":");
        gz.extend(gzip(b"1}"));
        let done = r.push(&message(1, 0, 1, &gz)).unwrap().unwrap();
        assert_eq!(done.json, b"{\"a\":1}");
        let mut trailing = gzip(b"{}");
        trailing.extend_from_slice(b"junk");
        assert!(matches!(r.push(&message(2, 0, 1, &trailing)), Err(ResultError::Decompress { frame_id: 2, .. })));
    }

    #[test]
    fn one_inflater_serves_every_result_even_after_a_bad_one() {
        let mut r = ResultReassembler::default();
        let mut bad = gzip(b"{\"bad\":true}");
        bad.truncate(bad.len() - 6);
        for frame_id in 1..=20u32 {
            let json = format!("{{\"frame\":{frame_id},\"pad\":\"{}\"}}", "x".repeat(frame_id as usize * 997));
            if frame_id % 5 == 0 {
                assert!(r.push(&message(frame_id + 100, 0, 1, &bad)).is_err());
            }
            let done = r.push(&message(frame_id, 0, 1, &gzip(json.as_bytes()))).unwrap().unwrap();
            assert_eq!(done.json, json.as_bytes(), "frame {frame_id}");
        }
    }

    #[test]
    fn gzip_bomb_is_refused() {
        // 300 MB of zeros, streamed through the encoder so the test itself
        // never holds them.
        let mut enc = GzEncoder::new(Vec::new(), Compression::default());
        let block = vec![0u8; 1 << 20];
        for _ in 0..300 {
            enc.write_all(&block).unwrap();
        }
        let bomb = enc.finish().unwrap();
        assert!(bomb.len() < 1 << 20, "bomb is {} bytes", bomb.len());

        let limits = ReassemblyLimits {
            max_decompressed_bytes: 4 << 20,
            ..ReassemblyLimits::default()
        };
        let mut r = ResultReassembler::new(limits);
        let mut last = Ok(None);
        for m in split(11, &bomb, 48 * 1024) {
            last = r.push(&m);
        }
        assert_eq!(
            last.unwrap_err(),
            ResultError::DecompressedTooLarge {
                frame_id: 11,
                compressed_bytes: bomb.len(),
                max: 4 << 20
            }
        );
        // Exactly at the limit is accepted.
        let exact = gzip(&vec![b' '; 4 << 20]);
        assert_eq!(
            r.push(&message(12, 0, 1, &exact))
                .unwrap()
                .unwrap()
                .json
                .len(),
            4 << 20
        );
    }

    #[test]
    fn inflated_buffer_never_grows_past_the_limit() {
        let limit = 3 << 20;
        let out = match Gunzip::default().inflate(gzip(&vec![b'a'; limit]), limit) {
            Ok(out) => out,
            Err(_) => panic!("exactly the limit must inflate"),
        };
        assert_eq!(out.len(), limit);
        assert!(out.capacity() <= limit, "capacity {}", out.capacity());
        assert!(matches!(
            Gunzip::default().inflate(gzip(&vec![b'a'; limit + 1]), limit),
            Err(GunzipError::TooLarge)
        ));
    }

    fn arb_payload() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(any::<u8>(), 0..3000)
    }

    proptest! {
        #[test]
        fn any_split_in_any_order_reassembles(
            payload in arb_payload(),
            chunk in 1usize..400,
            use_gzip in any::<bool>(),
            seed in any::<u64>(),
        ) {
            // A plain payload that happens to start with the gzip magic
            // would be taken for gzip; the server never sends that (JSON
            // starts with '{').
            prop_assume!(use_gzip || !is_gzip(&payload));
            let wire = if use_gzip { gzip(&payload) } else { payload.clone() };
            let mut msgs = split(42, &wire, chunk);
            // Fisher-Yates with a small LCG driven by the seed.
            let mut state = seed;
            for i in (1..msgs.len()).rev() {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let j = (state >> 33) as usize % (i + 1);
                msgs.swap(i, j);
            }
            let mut r = ResultReassembler::default();
            let n = msgs.len();
            for (k, m) in msgs.iter().enumerate() {
                let out = r.push(m).unwrap();
                if k + 1 < n {
                    prop_assert!(out.is_none());
                } else {
                    let done = out.unwrap();
                    prop_assert_eq!(done.frame_id, 42);
                    prop_assert_eq!(done.compressed, use_gzip);
                    prop_assert_eq!(done.wire_bytes, wire.len());
                    prop_assert_eq!(done.json, payload.clone());
                }
            }
            prop_assert_eq!(r.frames_in_flight(), 0);
        }
    }
}
