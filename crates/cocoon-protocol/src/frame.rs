//! Newline-delimited JSON frames.
//!
//! JSON escapes every newline inside strings, so a raw `\n` can only end a frame. A decoder
//! enforces [`MAX_FRAME_BYTES`] so a peer cannot make us buffer without bound.

use bytes::{Bytes, BytesMut};
use serde::Serialize;

/// Largest frame a decoder accepts.
pub const MAX_FRAME_BYTES: usize = 1 << 20;

/// Why a byte stream could not be split into frames.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// A frame grew past [`MAX_FRAME_BYTES`] without a terminating newline.
    #[error("frame exceeds {MAX_FRAME_BYTES} bytes")]
    TooLarge,
    /// The stream ended with this many bytes of an unterminated frame still buffered.
    #[error("stream ended inside a frame ({0} bytes left over)")]
    Truncated(usize),
}

/// Serializes `value` as one frame.
pub fn encode_frame<T: Serialize>(value: &T) -> Bytes {
    let mut out = serde_json::to_vec(value).expect("protocol types always serialize");
    out.push(b'\n');
    Bytes::from(out)
}

/// Splits a byte stream into frames, whatever the chunking of the transport.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: BytesMut,
    /// Bytes of `buf` already known to hold no newline.
    scanned: usize,
}

impl FrameDecoder {
    /// A decoder with nothing buffered.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends received bytes.
    pub fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// Returns the next complete frame, if any, *with* its terminating newline, so a relay can
    /// forward it as is (serde_json ignores the trailing whitespace). Empty lines are skipped.
    pub fn next_frame(&mut self) -> Result<Option<Bytes>, FrameError> {
        loop {
            let Some(pos) = self.buf[self.scanned..].iter().position(|&b| b == b'\n') else {
                self.scanned = self.buf.len();
                if self.buf.len() > MAX_FRAME_BYTES {
                    return Err(FrameError::TooLarge);
                }
                return Ok(None);
            };
            let end = self.scanned + pos;
            self.scanned = 0;
            if end > MAX_FRAME_BYTES {
                return Err(FrameError::TooLarge);
            }
            let frame = self.buf.split_to(end + 1).freeze();
            if frame.len() > 1 {
                return Ok(Some(frame));
            }
        }
    }

    /// Called at end of stream: anything still buffered is a truncated frame.
    pub fn finish(&self) -> Result<(), FrameError> {
        if self.buf.iter().all(|b| b.is_ascii_whitespace()) {
            Ok(())
        } else {
            Err(FrameError::Truncated(self.buf.len()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{FinishReason, GenerateEvent, Usage};
    use proptest::prelude::*;

    fn events() -> Vec<GenerateEvent> {
        vec![
            GenerateEvent::Delta {
                text: "line\nbreak \"quoted\" ünïcode".into(),
                tokens: 3,
                logprobs: Vec::new(),
            },
            GenerateEvent::Delta {
                text: String::new(),
                tokens: 0,
                logprobs: Vec::new(),
            },
            GenerateEvent::Done {
                finish_reason: FinishReason::Length,
                usage: Usage::new(7, 3),
                billing: None,
            },
        ]
    }

    proptest! {
        #[test]
        fn frames_survive_any_chunking(cuts in proptest::collection::vec(0usize..200, 0..20)) {
            let wire: Vec<u8> = events().iter().flat_map(|e| encode_frame(e).to_vec()).collect();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (wire.len() + 1)).collect();
            cuts.push(0);
            cuts.push(wire.len());
            cuts.sort_unstable();
            let mut dec = FrameDecoder::new();
            let mut got = Vec::new();
            for w in cuts.windows(2) {
                dec.push(&wire[w[0]..w[1]]);
                while let Some(f) = dec.next_frame().unwrap() {
                    got.push(serde_json::from_slice::<GenerateEvent>(&f).unwrap());
                }
            }
            dec.finish().unwrap();
            prop_assert_eq!(got, events());
        }

        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut dec = FrameDecoder::new();
            dec.push(&data);
            while let Ok(Some(f)) = dec.next_frame() {
                let _ = serde_json::from_slice::<GenerateEvent>(&f);
            }
        }
    }

    #[test]
    fn oversize_frame_is_refused() {
        let mut dec = FrameDecoder::new();
        dec.push(&vec![b'x'; MAX_FRAME_BYTES + 1]);
        assert_eq!(dec.next_frame(), Err(FrameError::TooLarge));
    }

    #[test]
    fn truncated_stream_is_reported() {
        let mut dec = FrameDecoder::new();
        dec.push(b"{\"event\":\"do");
        assert_eq!(dec.next_frame(), Ok(None));
        assert_eq!(dec.finish(), Err(FrameError::Truncated(12)));
    }
}
