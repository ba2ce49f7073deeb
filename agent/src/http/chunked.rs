// SPDX-License-Identifier: MIT
//! An incremental `Transfer-Encoding: chunked` decoder (RFC 9112 §7.1). It is fed bytes as
//! they arrive and hands out the data parts; used to de-chunk request bodies (which are then
//! signed and forwarded with a `content-length`) and to find where a chunked response ends.

/// Why a chunked stream was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChunkError {
    /// A chunk-size line that is not hex, or too large.
    BadSize,
    /// A missing CRLF after chunk data or in a line.
    BadLineEnd,
    /// A chunk extension or trailer line longer than we accept.
    LineTooLong,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    /// Reading hex digits of a chunk size.
    Size { digits: u8 },
    /// Inside a chunk extension (`;name=value`), up to CR.
    Extension,
    /// Expecting LF after the size line.
    SizeLf,
    /// Reading chunk data.
    Data,
    /// Expecting CR after data.
    DataCr,
    /// Expecting LF after data.
    DataLf,
    /// At the start of a trailer line (or the final CRLF).
    TrailerStart,
    /// Inside a trailer field line.
    Trailer,
    /// Expecting LF of a trailer line.
    TrailerLf,
    /// Expecting the LF of the final empty line.
    FinalLf,
    /// Message complete.
    Done,
}

/// Longest chunk extension or trailer line accepted.
const LINE_MAX_BYTES: u16 = 1024;

/// Incremental decoder state.
#[derive(Clone, Copy, Debug)]
pub struct ChunkedDecoder {
    step: Step,
    remaining: u64,
    line_len: u16,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl ChunkedDecoder {
    /// A decoder at the start of a chunked body.
    pub const fn new() -> Self {
        Self { step: Step::Size { digits: 0 }, remaining: 0, line_len: 0 }
    }

    /// Whether the terminating chunk and trailers have been read.
    pub fn is_done(&self) -> bool {
        self.step == Step::Done
    }

    /// Consumes bytes from `input`, calling `data` with each run of body data, and returns how
    /// many bytes were consumed: all of them, or fewer when the message ended inside `input`.
    pub fn feed(&mut self, input: &[u8], mut data: impl FnMut(&[u8])) -> Result<usize, ChunkError> {
        let mut i = 0;
        while i < input.len() && self.step != Step::Done {
            if self.step == Step::Data {
                let take = usize::try_from(self.remaining).unwrap_or(usize::MAX).min(input.len() - i);
                data(&input[i..i + take]);
                i += take;
                self.remaining -= take as u64;
                if self.remaining == 0 {
                    self.step = Step::DataCr;
                }
                continue;
            }
            let b = input[i];
            i += 1;
            self.step = match (self.step, b) {
                // Hex digits of the size; 15 digits bound it far above any body we accept.
                (Step::Size { digits }, _) if b.is_ascii_hexdigit() => {
                    if digits >= 15 {
                        return Err(ChunkError::BadSize);
                    }
                    let v = u64::from(char::from(b).to_digit(16).unwrap_or(0));
                    self.remaining = self.remaining * 16 + v;
                    Step::Size { digits: digits + 1 }
                }
                (Step::Size { digits }, b';' | b' ' | b'\t') if digits > 0 => {
                    self.line_len = 0;
                    Step::Extension
                }
                (Step::Size { digits }, b'\r') if digits > 0 => Step::SizeLf,
                (Step::Size { .. }, _) => return Err(ChunkError::BadSize),
                (Step::Extension, b'\r') => Step::SizeLf,
                // A bare LF, or any control byte but HTAB, where a server may end the line:
                // a streamed body goes up byte for byte, and a host that ends the line there
                // would read what follows as a new request (request smuggling).
                (Step::Extension | Step::TrailerStart | Step::Trailer, _) if is_control(b) && b != b'\r' => {
                    return Err(ChunkError::BadLineEnd);
                }
                (Step::Extension, _) => {
                    self.line_len += 1;
                    if self.line_len > LINE_MAX_BYTES {
                        return Err(ChunkError::LineTooLong);
                    }
                    Step::Extension
                }
                (Step::SizeLf, b'\n') if self.remaining == 0 => Step::TrailerStart,
                (Step::SizeLf, b'\n') => Step::Data,
                (Step::DataCr, b'\r') => Step::DataLf,
                (Step::DataLf, b'\n') => Step::Size { digits: 0 },
                (Step::TrailerStart, b'\r') => Step::FinalLf,
                (Step::Trailer, b'\r') => Step::TrailerLf,
                (Step::TrailerStart | Step::Trailer, _) => {
                    self.line_len = if self.step == Step::TrailerStart { 1 } else { self.line_len + 1 };
                    if self.line_len > LINE_MAX_BYTES {
                        return Err(ChunkError::LineTooLong);
                    }
                    Step::Trailer
                }
                (Step::TrailerLf, b'\n') => Step::TrailerStart,
                (Step::FinalLf, b'\n') => Step::Done,
                (Step::SizeLf | Step::DataCr | Step::DataLf | Step::TrailerLf | Step::FinalLf, _) => {
                    return Err(ChunkError::BadLineEnd);
                }
                (Step::Data | Step::Done, _) => unreachable_step(self.step),
            };
            if matches!(self.step, Step::Size { digits: 0 }) {
                self.remaining = 0;
            }
        }
        Ok(i)
    }
}

/// Control bytes other than HTAB never belong in an extension or a trailer line.
fn is_control(b: u8) -> bool {
    (b < 0x20 && b != b'\t') || b == 0x7f
}

fn unreachable_step(step: Step) -> Step {
    // Data and Done are handled before the byte match; keep the state rather than panic.
    step
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(input: &[u8]) -> Result<(Vec<u8>, usize, bool), ChunkError> {
        let mut d = ChunkedDecoder::new();
        let mut out = Vec::new();
        let n = d.feed(input, |c| out.extend_from_slice(c))?;
        Ok((out, n, d.is_done()))
    }

    #[test]
    fn decodes_chunks_extensions_and_trailers() {
        let body = b"4\r\nWiki\r\n5;ext=1\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nX-T: 1\r\n\r\nNEXT";
        let (out, n, done) = decode(body).unwrap();
        assert_eq!(out, b"Wikipedia in\r\n\r\nchunks.");
        assert!(done);
        assert_eq!(&body[n..], b"NEXT");
    }

    #[test]
    fn decodes_byte_by_byte() {
        let body = b"3\r\nabc\r\n0\r\n\r\n";
        let mut d = ChunkedDecoder::new();
        let mut out = Vec::new();
        for b in body {
            assert_eq!(d.feed(&[*b], |c| out.extend_from_slice(c)).unwrap(), 1);
        }
        assert!(d.is_done());
        assert_eq!(out, b"abc");
    }

    #[test]
    fn rejects_malformed_sizes_and_line_ends() {
        assert_eq!(decode(b"x\r\n").unwrap_err(), ChunkError::BadSize);
        assert_eq!(decode(b"\r\n").unwrap_err(), ChunkError::BadSize);
        assert_eq!(decode(b"1\r\nab").unwrap_err(), ChunkError::BadLineEnd);
        assert_eq!(decode(b"1\nab").unwrap_err(), ChunkError::BadSize);
        assert_eq!(decode(b"ffffffffffffffff\r\n").unwrap_err(), ChunkError::BadSize);
    }

    #[test]
    fn a_bare_lf_or_a_control_byte_in_a_trailer_or_an_extension_is_refused() {
        // The smuggling shape: a trailer line ended by a bare LF, then a request.
        let smuggle = b"4\r\nabcd\r\n0\r\nX: a\n\nPOST /machine?comp=health HTTP/1.1\nHost: h\n\r\n\r\n";
        assert_eq!(ChunkedDecoder::new().feed(smuggle, |_| {}), Err(ChunkError::BadLineEnd));
        for body in [
            &b"0\r\nX: a\x0bb\r\n\r\n"[..],
            b"0\r\nX: \x00\r\n\r\n",
            b"3;a\nb\r\nabc\r\n0\r\n\r\n",
            b"3;a\x7f\r\nabc\r\n0\r\n\r\n",
            b"0\r\n\n",
        ] {
            assert_eq!(ChunkedDecoder::new().feed(body, |_| {}), Err(ChunkError::BadLineEnd), "{body:?}");
        }
        // HTAB and visible bytes stay fine.
        let mut d = ChunkedDecoder::new();
        assert!(d.feed(b"3;a=\tb\r\nabc\r\n0\r\nX: a\tb\r\n\r\n", |_| {}).is_ok() && d.is_done());
    }
}
