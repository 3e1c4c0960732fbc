//! Decoding of Bind parameters to text: text-format values as they are,
//! binary-format values by type OID (int2/4/8, float4/8, bool, text types,
//! uuid, date, timestamp, timestamptz, json, jsonb, numeric).

use super::CaptureError;
use crate::logship::time::utc_from_unix;

pub const BOOL: u32 = 16;
pub const NAME: u32 = 19;
pub const INT8: u32 = 20;
pub const INT2: u32 = 21;
pub const INT4: u32 = 23;
pub const TEXT: u32 = 25;
pub const JSON: u32 = 114;
pub const FLOAT4: u32 = 700;
pub const FLOAT8: u32 = 701;
pub const BPCHAR: u32 = 1042;
pub const VARCHAR: u32 = 1043;
pub const DATE: u32 = 1082;
pub const TIMESTAMP: u32 = 1114;
pub const TIMESTAMPTZ: u32 = 1184;
pub const NUMERIC: u32 = 1700;
pub const UUID: u32 = 2950;
pub const JSONB: u32 = 3802;

/// Seconds from the Unix epoch to PostgreSQL's, 2000-01-01 00:00:00 UTC.
const POSTGRES_EPOCH_UNIX_SECONDS: i64 = 946_684_800;

/// Parameter format codes of the Bind message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Binary,
}

/// One Bind parameter with the type the statement declared for it.
#[derive(Debug, Clone, Copy)]
pub struct Param<'a> {
    /// Type OID from Parse (or ParameterDescription); 0 when unspecified.
    pub type_oid: u32,
    pub format: Format,
    /// `None` is SQL NULL.
    pub value: Option<&'a [u8]>,
}

/// Decodes parameter number `index` (1-based, for errors) to text; `None`
/// for NULL.
pub fn param_text(index: usize, param: &Param<'_>) -> Result<Option<String>, CaptureError> {
    let Some(value) = param.value else {
        return Ok(None);
    };
    let invalid = |reason: &str| CaptureError::InvalidParam {
        index,
        reason: reason.to_string(),
    };
    if param.format == Format::Text {
        return String::from_utf8(value.to_vec())
            .map(Some)
            .map_err(|_| invalid("text value is not valid UTF-8"));
    }
    let fixed = |len: usize| -> Result<&[u8], CaptureError> {
        if value.len() == len {
            Ok(value)
        } else {
            Err(invalid(&format!(
                "expected {len} bytes, got {}",
                value.len()
            )))
        }
    };
    let text = match param.type_oid {
        BOOL => match fixed(1)?[0] {
            0 => "false".to_string(),
            _ => "true".to_string(),
        },
        INT2 => i16::from_be_bytes(fixed(2)?.try_into().expect("2 bytes")).to_string(),
        INT4 => i32::from_be_bytes(fixed(4)?.try_into().expect("4 bytes")).to_string(),
        INT8 => i64::from_be_bytes(fixed(8)?.try_into().expect("8 bytes")).to_string(),
        FLOAT4 => float_text(
            f32::from_be_bytes(fixed(4)?.try_into().expect("4 bytes")) as f64,
            true,
        ),
        FLOAT8 => float_text(
            f64::from_be_bytes(fixed(8)?.try_into().expect("8 bytes")),
            false,
        ),
        TEXT | VARCHAR | BPCHAR | NAME | JSON => utf8(value).map_err(|r| invalid(&r))?,
        JSONB => match value.split_first() {
            Some((1, rest)) => utf8(rest).map_err(|r| invalid(&r))?,
            Some((version, _)) => return Err(invalid(&format!("unknown jsonb version {version}"))),
            None => return Err(invalid("empty jsonb value")),
        },
        UUID => uuid_text(fixed(16)?),
        DATE => date_text(i32::from_be_bytes(fixed(4)?.try_into().expect("4 bytes"))),
        TIMESTAMP => timestamp_text(
            i64::from_be_bytes(fixed(8)?.try_into().expect("8 bytes")),
            "",
        ),
        TIMESTAMPTZ => timestamp_text(
            i64::from_be_bytes(fixed(8)?.try_into().expect("8 bytes")),
            "+00",
        ),
        NUMERIC => numeric_text(value).map_err(|r| invalid(&r))?,
        oid => return Err(CaptureError::UnsupportedType { index, oid }),
    };
    Ok(Some(text))
}

fn utf8(bytes: &[u8]) -> Result<String, String> {
    String::from_utf8(bytes.to_vec()).map_err(|_| "value is not valid UTF-8".to_string())
}

fn float_text(value: f64, single: bool) -> String {
    if value.is_nan() {
        "NaN".into()
    } else if value.is_infinite() {
        if value > 0.0 { "Infinity" } else { "-Infinity" }.into()
    } else if single {
        // Print the f32 itself so 0.1f32 reads 0.1, not 0.10000000149011612.
        (value as f32).to_string()
    } else {
        value.to_string()
    }
}

fn uuid_text(bytes: &[u8]) -> String {
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

fn date_text(days: i32) -> String {
    match days {
        i32::MAX => "infinity".into(),
        i32::MIN => "-infinity".into(),
        _ => {
            let t = utc_from_unix(POSTGRES_EPOCH_UNIX_SECONDS + i64::from(days) * 86_400);
            format!("{:04}-{:02}-{:02}", t.year, t.month, t.day)
        }
    }
}

/// Formats microseconds since 2000-01-01 the way PostgreSQL prints them
/// with `timezone = UTC`: fraction only when non-zero, trailing zeros cut.
pub fn timestamp_text(micros: i64, zone_suffix: &str) -> String {
    match micros {
        i64::MAX => return "infinity".into(),
        i64::MIN => return "-infinity".into(),
        _ => {}
    }
    let seconds = micros.div_euclid(1_000_000) + POSTGRES_EPOCH_UNIX_SECONDS;
    let fraction = micros.rem_euclid(1_000_000);
    let t = utc_from_unix(seconds);
    let mut text = format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        t.year, t.month, t.day, t.hour, t.minute, t.second
    );
    if fraction != 0 {
        let digits = format!(".{fraction:06}");
        text.push_str(digits.trim_end_matches('0'));
    }
    text.push_str(zone_suffix);
    text
}

/// Decodes PostgreSQL's binary numeric: ndigits, weight, sign and dscale
/// (each 16 bits), then base-10000 digits, the first weighted 10000^weight.
fn numeric_text(bytes: &[u8]) -> Result<String, String> {
    let word = |i: usize| -> Result<u16, String> {
        bytes
            .get(i * 2..i * 2 + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
            .ok_or_else(|| "numeric value is truncated".to_string())
    };
    let ndigits = word(0)? as usize;
    let weight = word(1)? as i16 as i64;
    let sign = word(2)?;
    let dscale = word(3)? as usize;
    if bytes.len() != 8 + ndigits * 2 {
        return Err(format!(
            "numeric value has {} bytes for {ndigits} digits",
            bytes.len()
        ));
    }
    match sign {
        0xC000 => return Ok("NaN".into()),
        0xD000 => return Ok("Infinity".into()),
        0xF000 => return Ok("-Infinity".into()),
        0x0000 | 0x4000 => {}
        other => return Err(format!("invalid numeric sign {other:#06x}")),
    }
    let digits: Vec<u16> = (0..ndigits)
        .map(|i| word(4 + i))
        .collect::<Result<_, _>>()?;
    if digits.iter().any(|d| *d > 9999) {
        return Err("numeric digit out of range".into());
    }
    let digit = |index: i64| -> u16 {
        usize::try_from(index)
            .ok()
            .and_then(|i| digits.get(i).copied())
            .unwrap_or(0)
    };
    let mut text = String::new();
    if sign == 0x4000 {
        text.push('-');
    }
    if weight < 0 {
        text.push('0');
    } else {
        text.push_str(&digit(0).to_string());
        for index in 1..=weight {
            text.push_str(&format!("{:04}", digit(index)));
        }
    }
    if dscale > 0 {
        let mut fraction = String::new();
        let mut index = weight + 1;
        while fraction.len() < dscale {
            fraction.push_str(&format!("{:04}", digit(index)));
            index += 1;
        }
        fraction.truncate(dscale);
        text.push('.');
        text.push_str(&fraction);
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binary(oid: u32, bytes: &[u8]) -> Result<Option<String>, CaptureError> {
        param_text(
            1,
            &Param {
                type_oid: oid,
                format: Format::Binary,
                value: Some(bytes),
            },
        )
    }

    fn text_of(oid: u32, bytes: &[u8]) -> String {
        binary(oid, bytes).unwrap().unwrap()
    }

    fn numeric(ndigits: u16, weight: i16, sign: u16, dscale: u16, digits: &[u16]) -> Vec<u8> {
        let mut out = Vec::new();
        for word in [ndigits, weight as u16, sign, dscale].iter().chain(digits) {
            out.extend_from_slice(&word.to_be_bytes());
        }
        out
    }

    #[test]
    fn integers_floats_and_bool() {
        assert_eq!(text_of(INT2, &(-7i16).to_be_bytes()), "-7");
        assert_eq!(text_of(INT4, &123_456i32.to_be_bytes()), "123456");
        assert_eq!(
            text_of(INT8, &i64::MIN.to_be_bytes()),
            "-9223372036854775808"
        );
        assert_eq!(text_of(FLOAT4, &0.1f32.to_be_bytes()), "0.1");
        assert_eq!(text_of(FLOAT8, &2.5f64.to_be_bytes()), "2.5");
        assert_eq!(text_of(FLOAT8, &f64::NAN.to_be_bytes()), "NaN");
        assert_eq!(text_of(BOOL, &[1]), "true");
        assert_eq!(text_of(BOOL, &[0]), "false");
    }

    #[test]
    fn text_json_and_jsonb() {
        assert_eq!(text_of(VARCHAR, "llm".as_bytes()), "llm");
        assert_eq!(text_of(JSON, br#"{"a": 1}"#), r#"{"a": 1}"#);
        assert_eq!(text_of(JSONB, b"\x01{\"a\": 1}"), r#"{"a": 1}"#);
        assert!(binary(JSONB, b"\x02{}").is_err());
        assert!(binary(TEXT, b"\xff").is_err());
    }

    #[test]
    fn uuid_and_times() {
        let uuid = [
            0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0, 0, 1, 2, 3, 4, 5, 6, 7,
        ];
        assert_eq!(text_of(UUID, &uuid), "12345678-9abc-def0-0001-020304050607");
        // 2024-03-01 12:34:56.5 is 762611696.5 seconds after 2000-01-01.
        let micros = 762_611_696_500_000i64;
        assert_eq!(
            text_of(TIMESTAMP, &micros.to_be_bytes()),
            "2024-03-01 12:34:56.5"
        );
        assert_eq!(
            text_of(TIMESTAMPTZ, &micros.to_be_bytes()),
            "2024-03-01 12:34:56.5+00"
        );
        assert_eq!(
            text_of(TIMESTAMP, &0i64.to_be_bytes()),
            "2000-01-01 00:00:00"
        );
        assert_eq!(
            text_of(TIMESTAMP, &(-1i64).to_be_bytes()),
            "1999-12-31 23:59:59.999999"
        );
        assert_eq!(text_of(DATE, &(-1i32).to_be_bytes()), "1999-12-31");
        assert_eq!(text_of(TIMESTAMP, &i64::MAX.to_be_bytes()), "infinity");
    }

    #[test]
    fn numeric_values() {
        assert_eq!(
            text_of(NUMERIC, &numeric(3, 1, 0, 3, &[1, 2345, 6780])),
            "12345.678"
        );
        assert_eq!(
            text_of(NUMERIC, &numeric(1, -1, 0x4000, 1, &[5000])),
            "-0.5"
        );
        assert_eq!(text_of(NUMERIC, &numeric(0, 0, 0, 0, &[])), "0");
        assert_eq!(text_of(NUMERIC, &numeric(1, -2, 0, 5, &[1000])), "0.00001");
        assert_eq!(text_of(NUMERIC, &numeric(1, 2, 0, 0, &[7])), "700000000");
        assert_eq!(text_of(NUMERIC, &numeric(0, 0, 0xC000, 0, &[])), "NaN");
        assert!(binary(NUMERIC, &numeric(2, 0, 0, 0, &[1])).is_err());
        assert!(binary(NUMERIC, &numeric(1, 0, 0x1234, 0, &[1])).is_err());
    }

    #[test]
    fn wrong_sizes_and_types_are_errors() {
        assert!(matches!(
            binary(INT4, &[0, 1]),
            Err(CaptureError::InvalidParam { index: 1, .. })
        ));
        assert_eq!(
            binary(600, &[0]),
            Err(CaptureError::UnsupportedType { index: 1, oid: 600 })
        );
        let null = Param {
            type_oid: INT4,
            format: Format::Binary,
            value: None,
        };
        assert_eq!(param_text(1, &null), Ok(None));
        let text = Param {
            type_oid: 0,
            format: Format::Text,
            value: Some(b"42"),
        };
        assert_eq!(param_text(1, &text), Ok(Some("42".into())));
    }
}
