//! The NDJSON frame decoder and event parsing, under any bytes in any chunking: never a panic,
//! never a frame over the limit, and every event that parses re-encodes to one that parses the
//! same.
#![no_main]

use cocoon_protocol::{FrameDecoder, GenerateEvent, MAX_FRAME_BYTES, encode_frame};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the chunk size, so the fuzzer explores chunkings too.
    let Some((&split, data)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(split).max(1);
    let mut decoder = FrameDecoder::new();
    for piece in data.chunks(chunk) {
        decoder.push(piece);
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => {
                    assert!(frame.len() <= MAX_FRAME_BYTES);
                    if let Ok(event) = serde_json::from_slice::<GenerateEvent>(&frame) {
                        let again = encode_frame(&event);
                        let back: GenerateEvent =
                            serde_json::from_slice(&again).expect("re-encoded event parses");
                        assert_eq!(back, event);
                    }
                }
                Ok(None) | Err(_) => break,
            }
        }
    }
    let _ = decoder.finish();
});
