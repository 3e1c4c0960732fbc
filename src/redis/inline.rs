//! Inline (telnet-style) requests: one line of arguments separated by
//! spaces, with double and single quotes as Redis's own `sdssplitargs`
//! accepts them.

use bytes::Bytes;

use super::frame::FrameError;

/// Splits an inline request line into arguments.
///
/// Double quotes accept the escapes `\n`, `\r`, `\t`, `\b`, `\a`, `\\`,
/// `\"` and `\xHH`; single quotes accept `\'`. A closing quote must be
/// followed by a space or the end of the line, as in Redis.
pub fn split_args(line: &[u8]) -> Result<Vec<Bytes>, FrameError> {
    let mut args = Vec::new();
    let mut rest = line;
    loop {
        rest = trim_start(rest);
        let Some(&first) = rest.first() else {
            return Ok(args);
        };
        let (arg, after) = match first {
            b'"' => double_quoted(&rest[1..])?,
            b'\'' => single_quoted(&rest[1..])?,
            _ => {
                let end = rest.iter().position(|b| b.is_ascii_whitespace());
                let end = end.unwrap_or(rest.len());
                (rest[..end].to_vec(), &rest[end..])
            }
        };
        args.push(Bytes::from(arg));
        rest = after;
    }
}

fn trim_start(text: &[u8]) -> &[u8] {
    let start = text.iter().position(|b| !b.is_ascii_whitespace());
    &text[start.unwrap_or(text.len())..]
}

fn unbalanced() -> FrameError {
    FrameError::Invalid("unbalanced quotes in request".into())
}

/// Returns the argument and what follows it, after an opening `"`.
fn double_quoted(text: &[u8]) -> Result<(Vec<u8>, &[u8]), FrameError> {
    let mut arg = Vec::new();
    let mut index = 0;
    loop {
        match text.get(index) {
            None => return Err(unbalanced()),
            Some(b'"') => return Ok((arg, after_quote(&text[index + 1..])?)),
            Some(b'\\') if text.get(index + 1) == Some(&b'x') => {
                let hex = text.get(index + 2..index + 4).and_then(parse_hex);
                match hex {
                    Some(byte) => {
                        arg.push(byte);
                        index += 4;
                    }
                    None => {
                        arg.push(b'\\');
                        index += 1;
                    }
                }
            }
            Some(b'\\') if index + 1 < text.len() => {
                arg.push(match text[index + 1] {
                    b'n' => b'\n',
                    b'r' => b'\r',
                    b't' => b'\t',
                    b'b' => 0x08,
                    b'a' => 0x07,
                    other => other,
                });
                index += 2;
            }
            Some(&byte) => {
                arg.push(byte);
                index += 1;
            }
        }
    }
}

/// Returns the argument and what follows it, after an opening `'`.
fn single_quoted(text: &[u8]) -> Result<(Vec<u8>, &[u8]), FrameError> {
    let mut arg = Vec::new();
    let mut index = 0;
    loop {
        match text.get(index) {
            None => return Err(unbalanced()),
            Some(b'\'') => return Ok((arg, after_quote(&text[index + 1..])?)),
            Some(b'\\') if text.get(index + 1) == Some(&b'\'') => {
                arg.push(b'\'');
                index += 2;
            }
            Some(&byte) => {
                arg.push(byte);
                index += 1;
            }
        }
    }
}

/// Checks that a closing quote ends the argument.
fn after_quote(rest: &[u8]) -> Result<&[u8], FrameError> {
    match rest.first() {
        None => Ok(rest),
        Some(byte) if byte.is_ascii_whitespace() => Ok(rest),
        Some(_) => Err(unbalanced()),
    }
}

fn parse_hex(digits: &[u8]) -> Option<u8> {
    let text = std::str::from_utf8(digits).ok()?;
    u8::from_str_radix(text, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(line: &str) -> Vec<String> {
        let args = split_args(line.as_bytes()).unwrap();
        args.iter()
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect()
    }

    #[test]
    fn plain_and_quoted_arguments() {
        assert_eq!(split("SET  k   v"), vec!["SET", "k", "v"]);
        assert_eq!(split("SET k \"a b\""), vec!["SET", "k", "a b"]);
        assert_eq!(split("SET k 'it\\'s'"), vec!["SET", "k", "it's"]);
        assert_eq!(split("ECHO \"\\x41\\n\""), vec!["ECHO", "A\n"]);
        assert_eq!(split("ECHO \"\""), vec!["ECHO", ""]);
        assert!(split("   ").is_empty());
    }

    #[test]
    fn unbalanced_quotes_are_rejected() {
        for line in ["SET k \"a b", "SET k 'a", "SET k \"a\"b"] {
            let err = split_args(line.as_bytes()).unwrap_err();
            assert_eq!(
                err.to_string(),
                "Protocol error: unbalanced quotes in request"
            );
        }
    }
}
