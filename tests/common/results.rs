//! The client side of result messages (PROTOCOL.md §5), for the tests'
//! own webrtc-rs clients of the worker.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::Read as _;

use serde_json::Value;

/// Reassembles result messages: `[frame_id][chunk][total]` + payload, gzip or not.
#[derive(Default)]
pub struct Results {
    partial: HashMap<u32, Vec<Option<Vec<u8>>>>,
}

impl Results {
    /// The result whose last chunk `message` is, once complete.
    pub fn take(&mut self, message: &[u8]) -> Option<Value> {
        assert!(message.len() >= 12, "result message of {} bytes", message.len());
        let word = |at: usize| u32::from_le_bytes(message[at..at + 4].try_into().unwrap());
        let (frame_id, index, total) = (word(0), word(4) as usize, word(8) as usize);
        let chunks = self.partial.entry(frame_id).or_insert_with(|| vec![None; total]);
        chunks[index] = Some(message[12..].to_vec());
        if chunks.iter().any(Option::is_none) {
            return None;
        }
        let payload: Vec<u8> = self.partial.remove(&frame_id).unwrap().into_iter().flatten().flatten().collect();
        let json = if payload.starts_with(&[0x1f, 0x8b]) {
            let mut text = Vec::new();
            flate2::read::GzDecoder::new(&payload[..]).read_to_end(&mut text).unwrap();
            text
        } else {
            payload
        };
        Some(serde_json::from_slice(&json).expect("result JSON"))
    }
}
