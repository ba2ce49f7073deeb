// SPDX-License-Identifier: MIT
//! The two kinds of request body: one read whole into a pool buffer (it is signed with the
//! head), and a skip-listed one relayed as it arrives (never signed, MSP §3.7).

use crate::http::{BodyFraming, ChunkedDecoder};
use crate::limits::{REQUEST_BODY_MAX_BYTES, SKIP_LIST_BODY_MAX_BYTES};
use crate::proxy::gate::{Gate, Route};

/// A request body read whole into a pool buffer before it goes up (the signature covers it).
#[derive(Debug)]
pub(super) struct BufferedBody {
    pub(super) buf: Box<[u8]>,
    pub(super) len: usize,
    pub(super) framing: BodyFraming,
    pub(super) decoder: ChunkedDecoder,
    /// Whose share the buffer is counted in.
    pub(super) route: Route,
}

impl BufferedBody {
    pub(super) fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// Moves body bytes from `input` (the request buffer after the head) into the buffer.
    /// Returns the bytes consumed and whether the body is complete, or the status to answer.
    pub(super) fn absorb(&mut self, input: &[u8]) -> Result<(usize, bool), u16> {
        match self.framing {
            BodyFraming::Length(total) => {
                let want = usize::try_from(total).unwrap_or(usize::MAX) - self.len;
                let take = want.min(input.len());
                self.buf[self.len..self.len + take].copy_from_slice(&input[..take]);
                self.len += take;
                Ok((take, self.len as u64 == total))
            }
            BodyFraming::Chunked => {
                let mut overflow = false;
                let (buf, len) = (&mut self.buf, &mut self.len);
                let consumed = self
                    .decoder
                    .feed(input, |data| {
                        if *len + data.len() > REQUEST_BODY_MAX_BYTES {
                            overflow = true;
                        } else {
                            buf[*len..*len + data.len()].copy_from_slice(data);
                            *len += data.len();
                        }
                    })
                    .map_err(|_malformed| 400u16)?;
                if overflow {
                    return Err(413);
                }
                Ok((consumed, self.decoder.is_done()))
            }
            BodyFraming::None => Ok((0, true)),
        }
    }
}

/// What follows the request head upstream.
#[derive(Debug)]
pub(super) enum Outgoing {
    /// No body.
    Nothing,
    /// Read whole, de-chunked and signed with the head.
    Buffered(BufferedBody),
    /// A skip-listed body relayed as it arrives (never signed, MSP §3.7).
    Streamed(Streamed),
}

impl Outgoing {
    pub(super) fn give_back<G: Gate>(self, gate: &mut G) {
        if let Self::Buffered(body) = self {
            gate.give_back_body(&body.route, body.buf);
        }
    }
}

/// A skip-listed body on its way up: how much of it is left and how much of the request
/// buffer's front is body bytes checked against the framing and not yet written upstream.
#[derive(Clone, Copy, Debug)]
pub(super) struct Streamed {
    pub(super) framing: BodyFraming,
    /// `Length`: body bytes not yet checked.
    pub(super) left: u64,
    pub(super) decoder: ChunkedDecoder,
    /// `Chunked`: decoded bytes so far (the limit counts content, not framing).
    pub(super) decoded: u64,
    /// Bytes at the front of the request buffer that are body, checked, not yet sent.
    pub(super) ready: usize,
    /// The end of the body is within `ready`.
    pub(super) done: bool,
}

impl Streamed {
    pub(super) fn new(framing: BodyFraming) -> Self {
        let left = if let BodyFraming::Length(n) = framing { n } else { 0 };
        Self {
            framing,
            left,
            decoder: ChunkedDecoder::new(),
            decoded: 0,
            ready: 0,
            done: left == 0 && framing != BodyFraming::Chunked,
        }
    }

    /// Checks the unchecked bytes at `input` (the request buffer from `ready` on) against the
    /// framing: what belongs to the body becomes `ready`, the rest (a pipelined request) stays.
    pub(super) fn check(&mut self, input: &[u8]) -> Result<(), u16> {
        match self.framing {
            BodyFraming::Length(_) => {
                let take = usize::try_from(self.left).unwrap_or(usize::MAX).min(input.len());
                self.left -= take as u64;
                self.ready += take;
                self.done = self.left == 0;
            }
            BodyFraming::Chunked => {
                let decoded = &mut self.decoded;
                let consumed =
                    self.decoder.feed(input, |data| *decoded += data.len() as u64).map_err(|_malformed| 400u16)?;
                if self.decoded > SKIP_LIST_BODY_MAX_BYTES {
                    return Err(413);
                }
                self.ready += consumed;
                self.done = self.decoder.is_done();
            }
            BodyFraming::None => self.done = true,
        }
        Ok(())
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    pub(super) fn a_streamed_body_is_checked_against_its_framing_and_the_skip_list_limit() {
        // A length: body bytes become ready, a pipelined request after them does not.
        let mut s = Streamed::new(BodyFraming::Length(5));
        s.check(b"abc").expect("body");
        assert_eq!((s.ready, s.done), (3, false));
        s.ready = 0;
        s.check(b"deGET / HTTP/1.1\r\n").expect("body");
        assert_eq!((s.ready, s.done), (2, true));

        // Chunked: framing goes up verbatim with the data; the end is found.
        let mut s = Streamed::new(BodyFraming::Chunked);
        let body = b"3\r\nabc\r\n0\r\n\r\nGET /next";
        s.check(body).expect("chunked");
        assert_eq!((s.ready, s.done, s.decoded), (body.len() - b"GET /next".len(), true, 3));
        assert_eq!(Streamed::new(BodyFraming::Chunked).check(b"zz\r\n"), Err(400));

        // The limit counts decoded bytes, across pieces: one byte over is 413 before it is ready.
        let mut s = Streamed::new(BodyFraming::Chunked);
        s.decoded = SKIP_LIST_BODY_MAX_BYTES - 2;
        s.check(b"2\r\nab").expect("at the limit");
        s.ready = 0;
        assert_eq!(s.check(b"\r\n1\r\nc"), Err(413));
        assert_eq!(s.ready, 0);
    }
}
