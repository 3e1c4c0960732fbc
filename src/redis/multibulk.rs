//! Parser for requests in RESP's multibulk form (`*<count>` then `<count>`
//! bulk strings `$<length>`), the form client libraries send. It checks
//! that a request is complete before taking it off the buffer, then cuts
//! the arguments out of one frozen copy of the request, with no
//! intermediate frame.

use bytes::{Bytes, BytesMut};

use super::frame::{FrameError, Request};

/// Maximum number of arguments in one request, Redis's multibulk limit.
pub const MAX_ARGS: usize = 1024 * 1024;
/// Maximum length of the number in a `*` or `$` line: a sign and 19 digits.
const MAX_NUMBER_BYTES: usize = 20;

/// Arguments whose positions [`measure`] records, enough for most
/// requests. A request with more is sliced in a second pass.
const RECORDED_ARGS: usize = 8;

const INVALID_COUNT: &str = "invalid multibulk length";
const INVALID_LENGTH: &str = "invalid bulk length";

/// Splits one multibulk request off `buf`, which starts with `*`;
/// `Ok(None)` means more bytes are needed. `*0` and `*-1` give a request
/// without arguments, which Redis ignores.
pub fn parse(buf: &mut BytesMut, max_bytes: usize) -> Result<Option<Request>, FrameError> {
    let mut spans = Spans::default();
    let Some(total) = measure(buf, max_bytes, &mut spans)? else {
        if buf.len() > max_bytes {
            return Err(FrameError::TooLarge { limit: max_bytes });
        }
        return Ok(None);
    };
    if total > max_bytes {
        return Err(FrameError::TooLarge { limit: max_bytes });
    }
    let raw = buf.split_to(total).freeze();
    let args = match spans.recorded() {
        Some(spans) => spans
            .iter()
            .map(|&(start, end)| raw.slice(start..end))
            .collect(),
        None => slice_args(&raw),
    };
    Ok(Some(Request { args, raw }))
}

/// Returns the length, command name and only argument of the complete
/// two-element request at the start of `buf`, leaving `buf` as it is.
/// `None` for any other request, and for an incomplete, invalid or too
/// large one, which [`parse`] then handles.
pub fn peek_two_args(buf: &[u8], max_bytes: usize) -> Option<(usize, &[u8], &[u8])> {
    if buf.first() != Some(&b'*') {
        return None;
    }
    let mut spans = Spans::default();
    let total = measure(buf, max_bytes, &mut spans).ok()??;
    if total > max_bytes {
        return None;
    }
    match *spans.recorded()? {
        [(name_start, name_end), (arg_start, arg_end)] => {
            Some((total, &buf[name_start..name_end], &buf[arg_start..arg_end]))
        }
        _ => None,
    }
}

/// Start and end of each argument of a request, when it has at most
/// [`RECORDED_ARGS`].
#[derive(Default)]
struct Spans {
    positions: [(usize, usize); RECORDED_ARGS],
    count: usize,
}

impl Spans {
    fn push(&mut self, start: usize, end: usize) {
        if let Some(slot) = self.positions.get_mut(self.count) {
            *slot = (start, end);
        }
        self.count += 1;
    }

    /// Returns every argument's position, or `None` when there were too
    /// many to record.
    fn recorded(&self) -> Option<&[(usize, usize)]> {
        self.positions.get(..self.count)
    }
}

/// Returns the length of the complete request at the start of `buf`, or
/// `None` when more bytes are needed, and records where its arguments are.
fn measure(buf: &[u8], max_bytes: usize, spans: &mut Spans) -> Result<Option<usize>, FrameError> {
    let Some((count, mut position)) = number_line(buf, 0, INVALID_COUNT)? else {
        return Ok(None);
    };
    if count > MAX_ARGS as i64 {
        return Err(FrameError::Invalid(INVALID_COUNT.into()));
    }
    for _ in 0..count.max(0) {
        let Some(&marker) = buf.get(position) else {
            return Ok(None);
        };
        if marker != b'$' {
            let text = format!("expected '$', got '{}'", char::from(marker));
            return Err(FrameError::Invalid(text));
        }
        let Some((length, start)) = number_line(buf, position, INVALID_LENGTH)? else {
            return Ok(None);
        };
        if length < 0 {
            return Err(FrameError::Invalid(INVALID_LENGTH.into()));
        }
        if length as u64 > max_bytes as u64 {
            return Err(FrameError::TooLarge { limit: max_bytes });
        }
        let end = start + length as usize;
        if buf.len() < end + 2 {
            return Ok(None);
        }
        if &buf[end..end + 2] != b"\r\n" {
            let text = "bulk string not followed by CRLF";
            return Err(FrameError::Invalid(text.into()));
        }
        spans.push(start, end);
        position = end + 2;
    }
    Ok(Some(position))
}

/// Reads the line `<marker><number>\r\n` that starts at `at`, and returns
/// the number and the position after the line; `None` when the line is
/// not complete yet.
fn number_line(buf: &[u8], at: usize, error: &str) -> Result<Option<(i64, usize)>, FrameError> {
    let line = &buf[at + 1..];
    let searched = &line[..line.len().min(MAX_NUMBER_BYTES + 1)];
    let Some(cr) = searched.iter().position(|&b| b == b'\r') else {
        if line.len() > MAX_NUMBER_BYTES {
            return Err(FrameError::Invalid(error.into()));
        }
        return Ok(None);
    };
    let Some(&lf) = line.get(cr + 1) else {
        return Ok(None);
    };
    let number = parse_integer(&line[..cr]).filter(|_| lf == b'\n');
    match number {
        Some(number) => Ok(Some((number, at + 1 + cr + 2))),
        None => Err(FrameError::Invalid(error.into())),
    }
}

/// Parses an optionally negative run of decimal digits, `None` when it is
/// not one or overflows.
pub(super) fn parse_integer(digits: &[u8]) -> Option<i64> {
    let (negative, digits) = match digits.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, digits),
    };
    if digits.is_empty() {
        return None;
    }
    let mut value: i64 = 0;
    for &digit in digits {
        if !digit.is_ascii_digit() {
            return None;
        }
        value = value
            .checked_mul(10)?
            .checked_add(i64::from(digit - b'0'))?;
    }
    Some(if negative { -value } else { value })
}

/// Cuts the arguments out of a request that [`measure`] found complete.
fn slice_args(raw: &Bytes) -> Vec<Bytes> {
    let complete = "request checked complete";
    let (count, mut position) = number_line(raw, 0, INVALID_COUNT)
        .ok()
        .flatten()
        .expect(complete);
    let mut args = Vec::with_capacity(count.max(0) as usize);
    for _ in 0..count.max(0) {
        let (length, start) = number_line(raw, position, INVALID_LENGTH)
            .ok()
            .flatten()
            .expect(complete);
        let end = start + length as usize;
        args.push(raw.slice(start..end));
        position = end + 2;
    }
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_bytes(input: &[u8]) -> Result<Option<Vec<Vec<u8>>>, FrameError> {
        let mut buf = BytesMut::from(input);
        let parsed = parse(&mut buf, 1024)?;
        Ok(parsed.map(|request| request.args.iter().map(|a| a.to_vec()).collect()))
    }

    #[test]
    fn peek_two_args_finds_name_and_key() {
        let request = b"*2\r\n$3\r\nget\r\n$5\r\nkey:1\r\n*1\r\n$4\r\nPING\r\n";
        let (length, name, key) = peek_two_args(request, 1024).unwrap();
        assert_eq!(length, 24);
        assert_eq!(name, b"get");
        assert_eq!(key, b"key:1");
    }

    #[test]
    fn peek_two_args_skips_other_requests() {
        let whole = b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n";
        for cut in 0..whole.len() {
            assert!(peek_two_args(&whole[..cut], 1024).is_none(), "cut {cut}");
        }
        assert!(peek_two_args(whole, 10).is_none(), "too large");
        assert!(peek_two_args(b"*1\r\n$4\r\nPING\r\n", 1024).is_none());
        let three = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n";
        assert!(peek_two_args(three, 1024).is_none());
        assert!(peek_two_args(b"*2\r\n:3\r\nGET\r\n", 1024).is_none());
        assert!(peek_two_args(b"GET k\r\n", 1024).is_none());
    }

    #[test]
    fn every_prefix_waits_and_the_whole_request_parses() {
        let request = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$0\r\n\r\n";
        for cut in 1..request.len() {
            assert!(parse_bytes(&request[..cut]).unwrap().is_none(), "cut {cut}");
        }
        let args = parse_bytes(request).unwrap().unwrap();
        assert_eq!(args, vec![b"SET".to_vec(), b"k".to_vec(), Vec::new()]);
    }

    #[test]
    fn request_with_many_arguments_parses() {
        for count in [RECORDED_ARGS, RECORDED_ARGS + 1, 3 * RECORDED_ARGS] {
            let args: Vec<Vec<u8>> = (0..count).map(|i| format!("a{i}").into_bytes()).collect();
            let encoded = crate::redis::frame::encode_command(&args);
            let parsed = parse_bytes(&encoded).unwrap().unwrap();
            assert_eq!(parsed, args, "{count} arguments");
        }
    }

    #[test]
    fn following_bytes_stay_buffered() {
        let mut buf = BytesMut::from(&b"*1\r\n$4\r\nPING\r\n*1\r\n"[..]);
        let request = parse(&mut buf, 1024).unwrap().unwrap();
        assert_eq!(&request.raw[..], b"*1\r\n$4\r\nPING\r\n");
        assert_eq!(&buf[..], b"*1\r\n");
    }

    #[test]
    fn malformed_requests_are_invalid() {
        let invalid = |input: &[u8]| match parse_bytes(input) {
            Err(FrameError::Invalid(text)) => text,
            other => panic!("{input:?}: {other:?}"),
        };
        assert_eq!(invalid(b"*1\r\n:1\r\n"), "expected '$', got ':'");
        assert_eq!(invalid(b"*x\r\n"), INVALID_COUNT);
        assert_eq!(invalid(b"*99999999999\r\n"), INVALID_COUNT);
        assert_eq!(invalid(b"*1\r\n$-3\r\n"), INVALID_LENGTH);
        assert_eq!(
            invalid(b"*1\r\n$1\r\nab\r\n"),
            "bulk string not followed by CRLF"
        );
        assert_eq!(invalid(b"*111111111111111111111111"), INVALID_COUNT);
    }

    #[test]
    fn oversized_requests_are_too_large() {
        assert!(matches!(
            parse_bytes(b"*1\r\n$2000\r\n"),
            Err(FrameError::TooLarge { limit: 1024 })
        ));
        let mut long = b"*2\r\n$600\r\n".to_vec();
        long.extend_from_slice(&[b'a'; 600]);
        long.extend_from_slice(b"\r\n$600\r\n");
        long.extend_from_slice(&[b'b'; 600]);
        long.extend_from_slice(b"\r\n");
        assert!(matches!(
            parse_bytes(&long),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn empty_and_null_arrays_have_no_arguments() {
        assert_eq!(parse_bytes(b"*0\r\n").unwrap(), Some(Vec::new()));
        assert_eq!(parse_bytes(b"*-1\r\n").unwrap(), Some(Vec::new()));
    }
}
