//! A SQL tokenizer for the statements the capture parses: identifiers
//! (folded to lowercase unless quoted), string literals (standard, `E''`
//! escapes, dollar quoting), numbers, `$n` parameters, operators and
//! punctuation. Comments and whitespace are skipped.

use super::CaptureError;

/// One token and where it starts in the statement.
#[derive(Debug, Clone, PartialEq)]
pub struct Token {
    pub kind: TokenKind,
    pub start: usize,
    pub end: usize,
}

/// The kinds of token the capture parser distinguishes.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenKind {
    /// An identifier or keyword; `quoted` ones keep their case.
    Ident { name: String, quoted: bool },
    /// A string literal's value.
    String(String),
    /// A numeric literal as written.
    Number(String),
    /// `$n`, 1-based.
    Param(usize),
    /// `::`.
    Cast,
    /// One of `( ) , ; . = [ ]`.
    Punct(char),
    /// Any other operator, such as `+` or `||`.
    Operator(String),
}

impl TokenKind {
    /// Checks whether this is the unquoted keyword `word` (lowercase).
    pub fn is_keyword(&self, word: &str) -> bool {
        matches!(self, TokenKind::Ident { name, quoted: false } if name == word)
    }
}

/// Splits `sql` into tokens.
pub fn tokenize(sql: &str) -> Result<Vec<Token>, CaptureError> {
    let bytes = sql.as_bytes();
    let mut tokens = Vec::new();
    let mut pos = 0;
    while pos < bytes.len() {
        let byte = bytes[pos];
        let start = pos;
        let kind = match byte {
            b' ' | b'\t' | b'\n' | b'\r' | b'\x0c' => {
                pos += 1;
                continue;
            }
            b'-' if bytes.get(pos + 1) == Some(&b'-') => {
                pos = sql[pos..].find('\n').map_or(bytes.len(), |n| pos + n);
                continue;
            }
            b'/' if bytes.get(pos + 1) == Some(&b'*') => {
                pos = skip_block_comment(bytes, pos)?;
                continue;
            }
            b'\'' => {
                let (value, next) = standard_string(sql, pos + 1)?;
                pos = next;
                TokenKind::String(value)
            }
            b'e' | b'E' if bytes.get(pos + 1) == Some(&b'\'') => {
                let (value, next) = escape_string(sql, pos + 2)?;
                pos = next;
                TokenKind::String(value)
            }
            b'"' => {
                let (name, next) = quoted_identifier(sql, pos + 1)?;
                pos = next;
                TokenKind::Ident { name, quoted: true }
            }
            b'$' => {
                let (kind, next) = dollar(sql, pos)?;
                pos = next;
                kind
            }
            b'0'..=b'9' => {
                pos = number_end(bytes, pos);
                TokenKind::Number(sql[start..pos].to_string())
            }
            b'.' if bytes.get(pos + 1).is_some_and(u8::is_ascii_digit) => {
                pos = number_end(bytes, pos);
                TokenKind::Number(sql[start..pos].to_string())
            }
            b':' if bytes.get(pos + 1) == Some(&b':') => {
                pos += 2;
                TokenKind::Cast
            }
            b'(' | b')' | b',' | b';' | b'.' | b'[' | b']' => {
                pos += 1;
                TokenKind::Punct(byte as char)
            }
            b'=' if !bytes.get(pos + 1).is_some_and(|b| is_operator_byte(*b)) => {
                pos += 1;
                TokenKind::Punct('=')
            }
            b if is_identifier_start(b) => {
                while pos < bytes.len() && is_identifier_byte(bytes[pos]) {
                    pos += 1;
                }
                TokenKind::Ident {
                    name: sql[start..pos].to_lowercase(),
                    quoted: false,
                }
            }
            b if is_operator_byte(b) => {
                while pos < bytes.len() && is_operator_byte(bytes[pos]) {
                    pos += 1;
                }
                TokenKind::Operator(sql[start..pos].to_string())
            }
            _ => {
                return Err(CaptureError::Syntax(format!(
                    "unexpected character {:?} at byte {pos}",
                    sql[pos..].chars().next().unwrap_or('?')
                )))
            }
        };
        tokens.push(Token {
            kind,
            start,
            end: pos,
        });
    }
    Ok(tokens)
}

fn is_identifier_start(byte: u8) -> bool {
    byte.is_ascii_alphabetic() || byte == b'_' || byte >= 0x80
}

fn is_identifier_byte(byte: u8) -> bool {
    is_identifier_start(byte) || byte.is_ascii_digit() || byte == b'$'
}

fn is_operator_byte(byte: u8) -> bool {
    b"+-*/<>=~!@#%^&|`?:".contains(&byte)
}

fn number_end(bytes: &[u8], mut pos: usize) -> usize {
    while pos < bytes.len() && (bytes[pos].is_ascii_digit() || bytes[pos] == b'.') {
        pos += 1;
    }
    if pos < bytes.len() && (bytes[pos] == b'e' || bytes[pos] == b'E') {
        let mut next = pos + 1;
        if next < bytes.len() && (bytes[next] == b'+' || bytes[next] == b'-') {
            next += 1;
        }
        if next < bytes.len() && bytes[next].is_ascii_digit() {
            pos = next;
            while pos < bytes.len() && bytes[pos].is_ascii_digit() {
                pos += 1;
            }
        }
    }
    pos
}

fn skip_block_comment(bytes: &[u8], mut pos: usize) -> Result<usize, CaptureError> {
    // Block comments nest in PostgreSQL.
    let mut depth = 0usize;
    while pos + 1 < bytes.len() {
        if bytes[pos] == b'/' && bytes[pos + 1] == b'*' {
            depth += 1;
            pos += 2;
        } else if bytes[pos] == b'*' && bytes[pos + 1] == b'/' {
            depth -= 1;
            pos += 2;
            if depth == 0 {
                return Ok(pos);
            }
        } else {
            pos += 1;
        }
    }
    Err(CaptureError::Syntax("unterminated block comment".into()))
}

/// Reads a `'...'` body starting after the quote; `''` is a quote.
fn standard_string(sql: &str, mut pos: usize) -> Result<(String, usize), CaptureError> {
    let mut value = String::new();
    loop {
        let end = sql[pos..]
            .find('\'')
            .ok_or_else(|| CaptureError::Syntax("unterminated string literal".into()))?;
        value.push_str(&sql[pos..pos + end]);
        pos += end + 1;
        if sql.as_bytes().get(pos) == Some(&b'\'') {
            value.push('\'');
            pos += 1;
        } else {
            return Ok((value, pos));
        }
    }
}

/// Reads an `E'...'` body starting after the quote, with backslash escapes.
fn escape_string(sql: &str, mut pos: usize) -> Result<(String, usize), CaptureError> {
    let bytes = sql.as_bytes();
    let mut value: Vec<u8> = Vec::new();
    let unterminated = || CaptureError::Syntax("unterminated string literal".into());
    loop {
        let byte = *bytes.get(pos).ok_or_else(unterminated)?;
        match byte {
            b'\'' if bytes.get(pos + 1) == Some(&b'\'') => {
                value.push(b'\'');
                pos += 2;
            }
            b'\'' => break,
            b'\\' => {
                let escaped = *bytes.get(pos + 1).ok_or_else(unterminated)?;
                pos += 2;
                match escaped {
                    b'n' => value.push(b'\n'),
                    b't' => value.push(b'\t'),
                    b'r' => value.push(b'\r'),
                    b'b' => value.push(0x08),
                    b'f' => value.push(0x0c),
                    b'x' => {
                        let (code, len) = radix_prefix(&bytes[pos..], 16, 2);
                        value.push(code as u8);
                        pos += len;
                    }
                    b'0'..=b'7' => {
                        let (code, len) = radix_prefix(&bytes[pos - 1..], 8, 3);
                        value.push(code as u8);
                        pos += len - 1;
                    }
                    b'u' | b'U' => {
                        let digits = if escaped == b'u' { 4 } else { 8 };
                        let (code, len) = radix_prefix(&bytes[pos..], 16, digits);
                        let ch =
                            char::from_u32(code)
                                .filter(|_| len == digits)
                                .ok_or_else(|| {
                                    CaptureError::Syntax(
                                        "invalid Unicode escape in E'' string".into(),
                                    )
                                })?;
                        value.extend_from_slice(ch.to_string().as_bytes());
                        pos += len;
                    }
                    other => value.push(other),
                }
            }
            other => {
                value.push(other);
                pos += 1;
            }
        }
    }
    let text = String::from_utf8(value)
        .map_err(|_| CaptureError::Syntax("E'' string is not valid UTF-8".into()))?;
    Ok((text, pos + 1))
}

/// Parses up to `max` digits in `radix` from the start of `bytes`.
fn radix_prefix(bytes: &[u8], radix: u32, max: usize) -> (u32, usize) {
    let mut value = 0u32;
    let mut len = 0;
    while len < max {
        let Some(digit) = bytes.get(len).and_then(|b| (*b as char).to_digit(radix)) else {
            break;
        };
        value = value * radix + digit;
        len += 1;
    }
    (value, len)
}

fn quoted_identifier(sql: &str, mut pos: usize) -> Result<(String, usize), CaptureError> {
    let mut name = String::new();
    loop {
        let end = sql[pos..]
            .find('"')
            .ok_or_else(|| CaptureError::Syntax("unterminated quoted identifier".into()))?;
        name.push_str(&sql[pos..pos + end]);
        pos += end + 1;
        if sql.as_bytes().get(pos) == Some(&b'"') {
            name.push('"');
            pos += 1;
        } else {
            return Ok((name, pos));
        }
    }
}

/// Reads `$n` or a dollar-quoted string `$tag$...$tag$` at `pos`.
fn dollar(sql: &str, pos: usize) -> Result<(TokenKind, usize), CaptureError> {
    let bytes = sql.as_bytes();
    let mut end = pos + 1;
    while end < bytes.len() && bytes[end].is_ascii_digit() {
        end += 1;
    }
    if end > pos + 1 {
        let number = sql[pos + 1..end]
            .parse::<usize>()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| CaptureError::Syntax(format!("invalid parameter {}", &sql[pos..end])))?;
        return Ok((TokenKind::Param(number), end));
    }
    while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
        end += 1;
    }
    if bytes.get(end) != Some(&b'$') {
        return Err(CaptureError::Syntax(format!(
            "unexpected '$' at byte {pos}"
        )));
    }
    let tag = &sql[pos..=end];
    let body_start = end + 1;
    let body_len = sql[body_start..]
        .find(tag)
        .ok_or_else(|| CaptureError::Syntax(format!("unterminated dollar-quoted string {tag}")))?;
    let value = sql[body_start..body_start + body_len].to_string();
    Ok((TokenKind::String(value), body_start + body_len + tag.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(sql: &str) -> Vec<TokenKind> {
        tokenize(sql).unwrap().into_iter().map(|t| t.kind).collect()
    }

    fn ident(name: &str, quoted: bool) -> TokenKind {
        TokenKind::Ident {
            name: name.into(),
            quoted,
        }
    }

    #[test]
    fn identifiers_fold_unless_quoted() {
        assert_eq!(
            kinds(r#"INSERT "Workflow""Runs" x"#),
            vec![
                ident("insert", false),
                ident("Workflow\"Runs", true),
                ident("x", false)
            ]
        );
    }

    #[test]
    fn string_literal_forms() {
        assert_eq!(kinds("'it''s'"), vec![TokenKind::String("it's".into())]);
        assert_eq!(
            kinds(r"E'a\nb\'c\x41\101\u00e9'"),
            vec![TokenKind::String("a\nb'cAAé".into())]
        );
        assert_eq!(
            kinds("$$a 'b' $1$$"),
            vec![TokenKind::String("a 'b' $1".into())]
        );
        assert_eq!(
            kinds("$j${\"k\": 1}$j$"),
            vec![TokenKind::String("{\"k\": 1}".into())]
        );
    }

    #[test]
    fn params_numbers_casts_and_comments() {
        assert_eq!(
            kinds("$12::jsonb, -1.5e3 /* a /* nested */ b */ -- tail\n= 7"),
            vec![
                TokenKind::Param(12),
                TokenKind::Cast,
                ident("jsonb", false),
                TokenKind::Punct(','),
                TokenKind::Operator("-".into()),
                TokenKind::Number("1.5e3".into()),
                TokenKind::Punct('='),
                TokenKind::Number("7".into()),
            ]
        );
    }

    #[test]
    fn unterminated_input_is_an_error() {
        for sql in ["'abc", "E'abc", "\"abc", "$$abc", "/* abc", "$0", "$ x"] {
            assert!(
                matches!(tokenize(sql), Err(CaptureError::Syntax(_))),
                "{sql}"
            );
        }
    }
}
