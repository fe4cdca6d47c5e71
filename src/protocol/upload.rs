//! Upload framing for the `video_upload` data channel (PROTOCOL.md section 4).
//!
//! Every message is an 8-byte header `[chunk_index: u32 LE][total_chunks: u32 LE]`
//! followed by the payload. All chunks carry `chunk_size` bytes except the last,
//! which carries the remainder. The server completes the upload only once it
//! holds `total_chunks` distinct indexes, so the total length must be known
//! before the first chunk is sent, and an empty input is refused.
//!
//! A message of at most one byte is a keepalive, not a chunk: the server echoes
//! it back unchanged.

use std::fmt;

use bytes::{BufMut, Bytes, BytesMut};

/// Length of the chunk header: `[chunk_index u32 LE][total_chunks u32 LE]`.
pub const UPLOAD_HEADER_LEN: usize = 8;

/// The reference client's chunk payload size (48 KiB).
pub const DEFAULT_CHUNK_SIZE: usize = 49152;

/// Largest payload such that header + payload fits aiortc's 65536-byte
/// message limit.
pub const MAX_CHUNK_SIZE: usize = 65536 - UPLOAD_HEADER_LEN;

/// The keepalive the client sends on `video_upload`; the server echoes it.
pub const KEEPALIVE_MESSAGE: &[u8] = &[0u8];

/// Why an upload cannot be framed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UploadError {
    /// The input has 0 bytes: an upload of 0 chunks never completes on the server.
    EmptyInput,
    /// The chunk size is 0 or larger than [`MAX_CHUNK_SIZE`].
    InvalidChunkSize { chunk_size: usize },
    /// The input needs more than `u32::MAX` chunks at this chunk size.
    TooManyChunks { total_bytes: u64, chunk_size: usize },
    /// More bytes arrived than the declared total.
    TooMuchData { expected: u64, got: u64 },
    /// The stream ended before the declared total arrived.
    TooLittleData { expected: u64, got: u64 },
}

impl fmt::Display for UploadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UploadError::EmptyInput => write!(
                f,
                "the input is empty (0 bytes): the server never completes an upload of 0 chunks"
            ),
            UploadError::InvalidChunkSize { chunk_size } => write!(
                f,
                "chunk size {chunk_size} is invalid: it must be between 1 and {MAX_CHUNK_SIZE} bytes \
                 (header + payload must fit in 65536 bytes)"
            ),
            UploadError::TooManyChunks {
                total_bytes,
                chunk_size,
            } => write!(
                f,
                "{total_bytes} bytes in chunks of {chunk_size} bytes need more than {} chunks, \
                 the most a u32 header can count",
                u32::MAX
            ),
            UploadError::TooMuchData { expected, got } => write!(
                f,
                "the upload was declared as {expected} bytes but at least {got} bytes arrived"
            ),
            UploadError::TooLittleData { expected, got } => write!(
                f,
                "the upload was declared as {expected} bytes but the input ended after {got} bytes"
            ),
        }
    }
}

impl std::error::Error for UploadError {}

/// The 8-byte chunk header: `chunk_index` then `total_chunks`, both u32 little-endian.
pub fn encode_upload_header(chunk_index: u32, total_chunks: u32) -> [u8; UPLOAD_HEADER_LEN] {
    let mut header = [0u8; UPLOAD_HEADER_LEN];
    header[..4].copy_from_slice(&chunk_index.to_le_bytes());
    header[4..].copy_from_slice(&total_chunks.to_le_bytes());
    header
}

/// Reads `(chunk_index, total_chunks)` from an upload message, or `None` when
/// the message is shorter than the header (a keepalive, for instance).
#[cfg(test)]
pub fn decode_upload_header(message: &[u8]) -> Option<(u32, u32)> {
    let header: &[u8; UPLOAD_HEADER_LEN] = message.get(..UPLOAD_HEADER_LEN)?.try_into().ok()?;
    let chunk_index = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let total_chunks = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    Some((chunk_index, total_chunks))
}

/// Number of chunks for `total_bytes` at `chunk_size`: `ceil(total_bytes / chunk_size)`.
pub fn total_chunks(total_bytes: u64, chunk_size: usize) -> Result<u32, UploadError> {
    if chunk_size == 0 || chunk_size > MAX_CHUNK_SIZE {
        return Err(UploadError::InvalidChunkSize { chunk_size });
    }
    if total_bytes == 0 {
        return Err(UploadError::EmptyInput);
    }
    let count = total_bytes.div_ceil(chunk_size as u64);
    u32::try_from(count).map_err(|_| UploadError::TooManyChunks {
        total_bytes,
        chunk_size,
    })
}

/// True for a message that is a keepalive rather than a chunk (length <= 1).
pub fn is_keepalive(message: &[u8]) -> bool {
    message.len() <= 1
}

/// Turns a byte stream of known total length into `video_upload` messages.
///
/// Each input byte is copied exactly once, into the message it belongs to;
/// messages are handed out as soon as they are full, so at most one
/// partially filled message is held.
#[derive(Debug)]
pub struct UploadFramer {
    total_bytes: u64,
    chunk_size: usize,
    total_chunks: u32,
    chunks_emitted: u32,
    bytes_consumed: u64,
    /// The message being filled: header already written, payload partial.
    pending: Option<BytesMut>,
}

impl UploadFramer {
    pub fn new(total_bytes: u64, chunk_size: usize) -> Result<Self, UploadError> {
        let total_chunks = total_chunks(total_bytes, chunk_size)?;
        Ok(UploadFramer {
            total_bytes,
            chunk_size,
            total_chunks,
            chunks_emitted: 0,
            bytes_consumed: 0,
            pending: None,
        })
    }

    /// Payload length of chunk `index` (all full except the last).
    fn payload_len(&self, index: u32) -> usize {
        let start = u64::from(index) * self.chunk_size as u64;
        // `index < total_chunks` so `start < total_bytes`; the difference fits
        // usize whenever it is below chunk_size.
        (self.total_bytes - start).min(self.chunk_size as u64) as usize
    }

    /// Consumes `data` and returns every message completed by it, in order.
    ///
    /// If `data` would take the stream past the declared total, nothing is
    /// consumed and [`UploadError::TooMuchData`] is returned.
    pub fn push(&mut self, mut data: &[u8]) -> Result<Vec<Bytes>, UploadError> {
        let remaining = self.total_bytes - self.bytes_consumed;
        if data.len() as u64 > remaining {
            return Err(UploadError::TooMuchData {
                expected: self.total_bytes,
                got: self.bytes_consumed + data.len() as u64,
            });
        }
        let mut completed = Vec::new();
        while !data.is_empty() {
            let index = self.chunks_emitted;
            let want = self.payload_len(index);
            let total = self.total_chunks;
            let message = self.pending.get_or_insert_with(|| {
                let mut message = BytesMut::with_capacity(UPLOAD_HEADER_LEN + want);
                message.put_slice(&encode_upload_header(index, total));
                message
            });
            let missing = UPLOAD_HEADER_LEN + want - message.len();
            let take = missing.min(data.len());
            message.put_slice(&data[..take]);
            data = &data[take..];
            self.bytes_consumed += take as u64;
            if take == missing {
                let full = self.pending.take().expect("message being filled");
                completed.push(full.freeze());
                self.chunks_emitted += 1;
            }
        }
        Ok(completed)
    }

    /// Ends the stream: [`UploadError::TooLittleData`] when bytes of the
    /// declared total are missing. There is never a last message to flush,
    /// since [`push`](Self::push) returns each one the moment it is full.
    pub fn finish(&mut self) -> Result<(), UploadError> {
        if self.bytes_consumed < self.total_bytes {
            return Err(UploadError::TooLittleData {
                expected: self.total_bytes,
                got: self.bytes_consumed,
            });
        }
        debug_assert!(self.pending.is_none());
        debug_assert_eq!(self.chunks_emitted, self.total_chunks);
        Ok(())
    }

    /// Number of chunks the whole upload takes (the header's `total_chunks`).
    pub fn total_chunks(&self) -> u32 {
        self.total_chunks
    }

    /// Number of complete messages returned so far.
    #[cfg(test)]
    pub fn chunks_emitted(&self) -> u32 {
        self.chunks_emitted
    }

    /// Input bytes consumed so far (including those of a partly filled message).
    #[cfg(test)]
    pub fn bytes_consumed(&self) -> u64 {
        self.bytes_consumed
    }

    /// The declared total length of the input.
    pub fn total_bytes(&self) -> u64 {
        self.total_bytes
    }


    /// True once every byte arrived and every message was returned.
    #[cfg(test)]
    pub fn is_complete(&self) -> bool {
        self.chunks_emitted == self.total_chunks
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frame_all(input: &[u8], chunk_size: usize, splits: &[usize]) -> Vec<Bytes> {
        let mut framer = UploadFramer::new(input.len() as u64, chunk_size).unwrap();
        let mut out = Vec::new();
        let mut rest = input;
        let mut i = 0;
        while !rest.is_empty() {
            let n = if splits.is_empty() {
                rest.len()
            } else {
                splits[i % splits.len()].clamp(1, rest.len())
            };
            i += 1;
            out.extend(framer.push(&rest[..n]).unwrap());
            rest = &rest[n..];
        }
        framer.finish().unwrap();
        assert!(framer.is_complete());
        out
    }

    #[test]
    fn header_layout_is_index_then_total_little_endian() {
        assert_eq!(encode_upload_header(0, 1), [0, 0, 0, 0, 1, 0, 0, 0]);
        assert_eq!(
            encode_upload_header(0x0403_0201, 0x0807_0605),
            [1, 2, 3, 4, 5, 6, 7, 8]
        );
        assert_eq!(
            encode_upload_header(u32::MAX, 258),
            [0xff, 0xff, 0xff, 0xff, 0x02, 0x01, 0, 0]
        );
        assert_eq!(
            decode_upload_header(&[1, 2, 3, 4, 5, 6, 7, 8, 9]),
            Some((0x0403_0201, 0x0807_0605))
        );
        assert_eq!(decode_upload_header(&[1, 2, 3, 4, 5, 6, 7]), None);
    }

    #[test]
    fn constants_fit_aiortc_message_limit() {
        assert_eq!(UPLOAD_HEADER_LEN, 8);
        assert_eq!(DEFAULT_CHUNK_SIZE, 49152);
        assert_eq!(MAX_CHUNK_SIZE, 65528);
        assert_eq!(MAX_CHUNK_SIZE + UPLOAD_HEADER_LEN, 65536);
    }

    #[test]
    fn chunk_count_is_ceiling() {
        let c = DEFAULT_CHUNK_SIZE as u64;
        assert_eq!(total_chunks(1, DEFAULT_CHUNK_SIZE), Ok(1));
        assert_eq!(total_chunks(c - 1, DEFAULT_CHUNK_SIZE), Ok(1));
        assert_eq!(total_chunks(c, DEFAULT_CHUNK_SIZE), Ok(1));
        assert_eq!(total_chunks(c + 1, DEFAULT_CHUNK_SIZE), Ok(2));
        assert_eq!(total_chunks(10 * c, DEFAULT_CHUNK_SIZE), Ok(10));
        assert_eq!(total_chunks(10 * c + 7, DEFAULT_CHUNK_SIZE), Ok(11));
        assert_eq!(total_chunks(94_400_000, DEFAULT_CHUNK_SIZE), Ok(1921));
    }

    #[test]
    fn chunk_count_errors() {
        assert_eq!(
            total_chunks(0, DEFAULT_CHUNK_SIZE),
            Err(UploadError::EmptyInput)
        );
        assert_eq!(
            total_chunks(10, 0),
            Err(UploadError::InvalidChunkSize { chunk_size: 0 })
        );
        assert_eq!(
            total_chunks(10, MAX_CHUNK_SIZE + 1),
            Err(UploadError::InvalidChunkSize { chunk_size: 65529 })
        );
        assert_eq!(total_chunks(10, MAX_CHUNK_SIZE), Ok(1));
        assert_eq!(total_chunks(u64::from(u32::MAX), 1), Ok(u32::MAX));
        assert_eq!(
            total_chunks(u64::from(u32::MAX) + 1, 1),
            Err(UploadError::TooManyChunks {
                total_bytes: 4_294_967_296,
                chunk_size: 1
            })
        );
        assert!(UploadFramer::new(0, DEFAULT_CHUNK_SIZE).is_err());
    }

    #[test]
    fn one_byte_input_is_one_nine_byte_message() {
        let messages = frame_all(&[0xab], DEFAULT_CHUNK_SIZE, &[]);
        assert_eq!(messages.len(), 1);
        assert_eq!(&messages[0][..], &[0, 0, 0, 0, 1, 0, 0, 0, 0xab]);
    }

    #[test]
    fn last_chunk_carries_remainder() {
        let input: Vec<u8> = (0..25u8).collect();
        let messages = frame_all(&input, 10, &[3]);
        assert_eq!(messages.len(), 3);
        let mut expected0 = vec![0, 0, 0, 0, 3, 0, 0, 0];
        expected0.extend(0..10u8);
        let mut expected1 = vec![1, 0, 0, 0, 3, 0, 0, 0];
        expected1.extend(10..20u8);
        let mut expected2 = vec![2, 0, 0, 0, 3, 0, 0, 0];
        expected2.extend(20..25u8);
        assert_eq!(&messages[0][..], &expected0[..]);
        assert_eq!(&messages[1][..], &expected1[..]);
        assert_eq!(&messages[2][..], &expected2[..]);
    }

    #[test]
    fn exact_multiple_has_no_short_chunk() {
        let input = vec![7u8; 4 * 16];
        let messages = frame_all(&input, 16, &[5, 17, 1]);
        assert_eq!(messages.len(), 4);
        for (i, m) in messages.iter().enumerate() {
            assert_eq!(m.len(), 8 + 16);
            assert_eq!(decode_upload_header(m), Some((i as u32, 4)));
        }
    }

    #[test]
    fn sizes_around_default_chunk() {
        let c = DEFAULT_CHUNK_SIZE;
        for (size, chunks, last) in [
            (1, 1, 1),
            (c - 1, 1, c - 1),
            (c, 1, c),
            (c + 1, 2, 1),
            (10 * c, 10, c),
            (10 * c + 7, 11, 7),
        ] {
            let input: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
            let messages = frame_all(&input, c, &[4096, 100_000, 1]);
            assert_eq!(messages.len(), chunks, "size {size}");
            assert_eq!(messages.last().unwrap().len(), 8 + last, "size {size}");
            let joined: Vec<u8> = messages.iter().flat_map(|m| m[8..].to_vec()).collect();
            assert_eq!(joined, input);
        }
    }

    #[test]
    fn messages_are_returned_as_soon_as_full() {
        let mut framer = UploadFramer::new(25, 10).unwrap();
        assert!(framer.push(&[1; 9]).unwrap().is_empty());
        assert_eq!(framer.bytes_consumed(), 9);
        assert_eq!(framer.push(&[1]).unwrap().len(), 1);
        assert_eq!(framer.chunks_emitted(), 1);
        assert!(framer.push(&[]).unwrap().is_empty());
        assert_eq!(framer.push(&[2; 15]).unwrap().len(), 2);
        assert_eq!(framer.chunks_emitted(), 3);
        assert_eq!(framer.total_chunks(), 3);
        assert_eq!(framer.total_bytes(), 25);
        assert_eq!(framer.finish(), Ok(()));
    }

    #[test]
    fn too_much_data_consumes_nothing() {
        let mut framer = UploadFramer::new(12, 10).unwrap();
        assert_eq!(framer.push(&[0; 11]).unwrap().len(), 1);
        assert_eq!(
            framer.push(&[0; 2]),
            Err(UploadError::TooMuchData {
                expected: 12,
                got: 13
            })
        );
        assert_eq!(framer.bytes_consumed(), 11);
        assert_eq!(framer.push(&[0; 1]).unwrap().len(), 1);
        assert_eq!(
            framer.push(&[0]),
            Err(UploadError::TooMuchData {
                expected: 12,
                got: 13
            })
        );
    }

    #[test]
    fn too_little_data_is_an_error() {
        let mut framer = UploadFramer::new(12, 10).unwrap();
        framer.push(&[0; 11]).unwrap();
        let err = framer.finish().unwrap_err();
        assert_eq!(
            err,
            UploadError::TooLittleData {
                expected: 12,
                got: 11
            }
        );
        assert_eq!(
            err.to_string(),
            "the upload was declared as 12 bytes but the input ended after 11 bytes"
        );
    }

    #[test]
    fn keepalive_detection() {
        assert!(is_keepalive(&[]));
        assert!(is_keepalive(KEEPALIVE_MESSAGE));
        assert!(is_keepalive(&[42]));
        assert!(!is_keepalive(&[0, 0]));
        assert_eq!(KEEPALIVE_MESSAGE, &[0u8]);
    }

    #[test]
    fn large_push_is_linear() {
        // 64 MiB in one push at the default chunk size must be quick.
        let input = vec![3u8; 64 << 20];
        let messages = frame_all(&input, DEFAULT_CHUNK_SIZE, &[]);
        assert_eq!(messages.len(), (64 << 20) / DEFAULT_CHUNK_SIZE + 1);
    }

    proptest! {
        #[test]
        fn framer_round_trips(
            input in proptest::collection::vec(any::<u8>(), 1..5000),
            chunk_size in 1usize..700,
            splits in proptest::collection::vec(1usize..1500, 1..20),
        ) {
            let messages = frame_all(&input, chunk_size, &splits);
            let n = input.len().div_ceil(chunk_size);
            prop_assert_eq!(messages.len(), n);
            let mut joined = Vec::with_capacity(input.len());
            for (i, m) in messages.iter().enumerate() {
                prop_assert_eq!(decode_upload_header(m), Some((i as u32, n as u32)));
                let payload = &m[UPLOAD_HEADER_LEN..];
                if i + 1 < n {
                    prop_assert_eq!(payload.len(), chunk_size);
                } else {
                    prop_assert!(!payload.is_empty() && payload.len() <= chunk_size);
                }
                joined.extend_from_slice(payload);
            }
            prop_assert_eq!(joined, input);
        }
    }
}
