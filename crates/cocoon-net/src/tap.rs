//! A wire tap after TLS: sees every byte a connection reads and writes in clear. Nodes carry
//! one only when told to (tests that prove what a node can see, e.g. that a proxy never sees a
//! sealed prompt); without a tap it costs one branch per read or write.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Which way bytes went through a tapped connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Read from the peer.
    Read,
    /// Written to the peer.
    Written,
}

/// What a tap is handed: every chunk of clear bytes, and which way it went.
pub type WireTap = Arc<dyn Fn(Direction, &[u8]) + Send + Sync>;

/// `IO` with an optional tap on its clear bytes.
pub struct Tapped<IO> {
    io: IO,
    tap: Option<WireTap>,
}

impl<IO> Tapped<IO> {
    /// `io`, tapped by `tap` if there is one.
    pub fn new(io: IO, tap: Option<WireTap>) -> Self {
        Self { io, tap }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Tapped<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if let (Some(tap), Poll::Ready(Ok(()))) = (&self.tap, &polled) {
            tap(Direction::Read, &buf.filled()[before..]);
        }
        polled
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Tapped<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, data);
        if let (Some(tap), Poll::Ready(Ok(n))) = (&self.tap, &polled) {
            tap(Direction::Written, &data[..*n]);
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    // Passed on, so HTTP/2 above writes a frame's head and payload in one call instead of
    // copying them together first (it copies when the stream says it cannot gather).
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if let (Some(tap), Poll::Ready(Ok(n))) = (&self.tap, &polled) {
            let mut left = *n;
            for buf in bufs {
                let take = left.min(buf.len());
                tap(Direction::Written, &buf[..take]);
                left -= take;
                if left == 0 {
                    break;
                }
            }
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}
