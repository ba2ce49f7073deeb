// SPDX-License-Identifier: MIT
//! Status codes and their RFC 9110 reason phrases (§15), for the status lines the agent
//! writes and the `responseStatus` texts it reports.
//!
//! One table: the proxy's own answers, the status document's summaries and the operator
//! views all name a code the same way.

/// `"<code> <reason phrase>"` (e.g. `403 Forbidden`) for a code RFC 9110 registers a phrase
/// for; `None` for any other code.
pub fn status_line(code: u16) -> Option<&'static str> {
    Some(match code {
        100 => "100 Continue",
        101 => "101 Switching Protocols",
        200 => "200 OK",
        201 => "201 Created",
        202 => "202 Accepted",
        203 => "203 Non-Authoritative Information",
        204 => "204 No Content",
        205 => "205 Reset Content",
        206 => "206 Partial Content",
        300 => "300 Multiple Choices",
        301 => "301 Moved Permanently",
        302 => "302 Found",
        303 => "303 See Other",
        304 => "304 Not Modified",
        307 => "307 Temporary Redirect",
        308 => "308 Permanent Redirect",
        400 => "400 Bad Request",
        401 => "401 Unauthorized",
        402 => "402 Payment Required",
        403 => "403 Forbidden",
        404 => "404 Not Found",
        405 => "405 Method Not Allowed",
        406 => "406 Not Acceptable",
        407 => "407 Proxy Authentication Required",
        408 => "408 Request Timeout",
        409 => "409 Conflict",
        410 => "410 Gone",
        411 => "411 Length Required",
        412 => "412 Precondition Failed",
        413 => "413 Content Too Large",
        414 => "414 URI Too Long",
        415 => "415 Unsupported Media Type",
        416 => "416 Range Not Satisfiable",
        417 => "417 Expectation Failed",
        421 => "421 Misdirected Request",
        422 => "422 Unprocessable Content",
        426 => "426 Upgrade Required",
        429 => "429 Too Many Requests",
        431 => "431 Request Header Fields Too Large",
        500 => "500 Internal Server Error",
        501 => "501 Not Implemented",
        502 => "502 Bad Gateway",
        503 => "503 Service Unavailable",
        504 => "504 Gateway Timeout",
        505 => "505 HTTP Version Not Supported",
        _ => return None,
    })
}

/// The RFC 9110 reason phrase of `code` (`Forbidden` for 403), `None` for a code without one.
pub fn reason_phrase(code: u16) -> Option<&'static str> {
    // Every line is three digits, a space and the phrase.
    status_line(code).and_then(|line| line.get(4..))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_line_is_the_code_a_space_and_the_phrase() {
        for code in 0..=999_u16 {
            if let Some(line) = status_line(code) {
                assert_eq!(&line[..4], format!("{code} "), "{line}");
                assert_eq!(reason_phrase(code), Some(&line[4..]));
            } else {
                assert_eq!(reason_phrase(code), None);
            }
        }
        assert_eq!(status_line(502), Some("502 Bad Gateway"));
        assert_eq!(reason_phrase(413), Some("Content Too Large"));
        assert_eq!(reason_phrase(299), None);
    }
}
