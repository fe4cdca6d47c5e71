// Arbitrary bytes, cut into messages, fed to the result reassembler: it
// must never panic, never hold more than its limits, and every completed
// frame must respect the decompressed-size limit.
#![no_main]

#[path = "../../src/protocol/mod.rs"]
#[allow(dead_code, unused_imports)]
mod protocol;

use libfuzzer_sys::fuzz_target;
use protocol::results::{ReassemblyLimits, ResultReassembler};

fuzz_target!(|data: &[u8]| {
    // Small limits, so that the fuzzer reaches them.
    let limits = ReassemblyLimits {
        max_chunks_per_frame: 16,
        max_frame_bytes: 64 * 1024,
        max_decompressed_bytes: 256 * 1024,
        max_frames_in_flight: 4,
    };
    let mut reassembler = ResultReassembler::new(limits.clone());
    // The first byte of each record is its length (0-255), then the message.
    let mut rest = data;
    while let Some((&len, tail)) = rest.split_first() {
        let len = (len as usize).min(tail.len());
        let (message, next) = tail.split_at(len);
        rest = next;
        if let Ok(Some(done)) = reassembler.push(message) {
            assert!(done.json.len() <= limits.max_decompressed_bytes);
            assert!(done.wire_bytes <= limits.max_frame_bytes);
        }
        assert!(reassembler.frames_in_flight() <= limits.max_frames_in_flight);
    }
});
