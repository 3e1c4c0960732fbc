//! The SLS `LogGroup` protobuf (proto2) as PutLogs carries it.
//!
//! Field numbers: `Log { Time = 1, Contents = 2, Time_ns = 4 (fixed32) }`,
//! `Content { Key = 1, Value = 2 }`, `LogGroup { Logs = 1, Reserved = 2,
//! Topic = 3, Source = 4, LogTags = 6 }`, `LogTag { Key = 1, Value = 2 }`.

/// One key/value pair of a log.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct LogContent {
    #[prost(string, required, tag = "1")]
    pub key: String,
    #[prost(string, required, tag = "2")]
    pub value: String,
}

/// One log: a time and its ordered contents.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct Log {
    /// Seconds since the Unix epoch.
    #[prost(uint32, required, tag = "1")]
    pub time: u32,
    #[prost(message, repeated, tag = "2")]
    pub contents: Vec<LogContent>,
    /// Nanoseconds within `time`.
    #[prost(fixed32, optional, tag = "4")]
    pub time_ns: Option<u32>,
}

/// A tag that applies to every log of a group.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct LogTag {
    #[prost(string, required, tag = "1")]
    pub key: String,
    #[prost(string, required, tag = "2")]
    pub value: String,
}

/// The body of one PutLogs request.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct LogGroup {
    #[prost(message, repeated, tag = "1")]
    pub logs: Vec<Log>,
    #[prost(string, optional, tag = "2")]
    pub reserved: Option<String>,
    #[prost(string, optional, tag = "3")]
    pub topic: Option<String>,
    #[prost(string, optional, tag = "4")]
    pub source: Option<String>,
    #[prost(message, repeated, tag = "6")]
    pub log_tags: Vec<LogTag>,
}

/// Returns the bytes that one log adds to an encoded `LogGroup`: the log itself plus its
/// field key and length prefix.
pub fn framed_len(log: &Log) -> usize {
    let len = prost::Message::encoded_len(log);
    1 + prost::encoding::encoded_len_varint(len as u64) + len
}

/// Field number of `LogGroup.logs`.
const LOGS_FIELD: u32 = 1;

/// Encodes `log` as one `logs` field of a `LogGroup`, [`framed_len`] bytes.
/// Appending such fields and then an encoded `LogGroup` without logs gives
/// the same bytes as encoding the whole group, because prost writes fields
/// in field-number order and `logs` comes first.
pub fn encode_log_field(log: &Log, buf: &mut Vec<u8>) {
    prost::encoding::message::encode(LOGS_FIELD, log, buf);
}

/// Splits an encoded `LogGroup` without decoding its logs: appends every
/// `logs` field to `logs`, and every other field to `rest` when given.
/// Checks the field framing (keys, varints, lengths) but not the contents
/// of the logs.
pub fn split_log_fields(
    raw: &[u8],
    logs: &mut Vec<u8>,
    mut rest: Option<&mut Vec<u8>>,
) -> Result<(), prost::DecodeError> {
    use prost::encoding::{decode_key, decode_varint, WireType};
    let mut input = raw;
    while !input.is_empty() {
        let field_start = raw.len() - input.len();
        let (field, wire_type) = decode_key(&mut input)?;
        let skip = match wire_type {
            WireType::Varint => {
                decode_varint(&mut input)?;
                0
            }
            WireType::SixtyFourBit => 8,
            WireType::ThirtyTwoBit => 4,
            WireType::LengthDelimited => usize::try_from(decode_varint(&mut input)?)
                .map_err(|_| prost::DecodeError::new("field length overflows usize"))?,
            WireType::StartGroup | WireType::EndGroup => {
                return Err(prost::DecodeError::new("groups are not used in LogGroup"));
            }
        };
        input = input
            .get(skip..)
            .ok_or_else(|| prost::DecodeError::new("field runs past the end of the buffer"))?;
        let field_bytes = &raw[field_start..raw.len() - input.len()];
        if field == LOGS_FIELD && wire_type == WireType::LengthDelimited {
            logs.extend_from_slice(field_bytes);
        } else if let Some(rest) = rest.as_mut() {
            rest.extend_from_slice(field_bytes);
        }
    }
    Ok(())
}

/// A request's `LogGroup` with its logs left encoded.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PlainLogGroup {
    pub topic: String,
    pub source: String,
    pub tags: Vec<(String, String)>,
    /// The `logs` fields as the request encoded them, back to back.
    pub logs: Vec<u8>,
    /// End offset of each log in `logs`.
    pub ends: Vec<usize>,
}

/// Splits an encoded `LogGroup` into its group fields and its `logs`
/// fields, which are checked but not decoded. Returns `None` unless every
/// field is one that SLS defines, with the expected wire type, valid UTF-8
/// in every string, and each log has its time, at most one nanosecond
/// field, and contents of exactly one key and one value. Decoding the group
/// then gives the error or reads the unusual form.
pub fn split_plain_log_group(raw: &[u8]) -> Option<PlainLogGroup> {
    let mut group = PlainLogGroup::default();
    let mut input = raw;
    while !input.is_empty() {
        let field_start = raw.len() - input.len();
        let (field, wire_type) = prost::encoding::decode_key(&mut input).ok()?;
        if wire_type != prost::encoding::WireType::LengthDelimited {
            return None;
        }
        let value = take_length_delimited(&mut input)?;
        match field {
            LOGS_FIELD => {
                if !is_plain_log(value) {
                    return None;
                }
                group
                    .logs
                    .extend_from_slice(&raw[field_start..raw.len() - input.len()]);
                group.ends.push(group.logs.len());
            }
            // Reserved: not sent on, as decoding and encoding drops it too.
            2 => {
                std::str::from_utf8(value).ok()?;
            }
            3 => group.topic = std::str::from_utf8(value).ok()?.to_string(),
            4 => group.source = std::str::from_utf8(value).ok()?.to_string(),
            6 => {
                let (key, value) = plain_pair(value)?;
                group.tags.push((key.to_string(), value.to_string()));
            }
            _ => return None,
        }
    }
    Some(group)
}

/// Reads a length prefix and returns that many bytes.
fn take_length_delimited<'a>(input: &mut &'a [u8]) -> Option<&'a [u8]> {
    let len = usize::try_from(prost::encoding::decode_varint(input).ok()?).ok()?;
    let value = input.get(..len)?;
    *input = &input[len..];
    Some(value)
}

/// Checks that `log` is a `Log` of a 32-bit time, contents of one key and
/// one value, and at most one nanosecond field, with nothing else.
fn is_plain_log(mut log: &[u8]) -> bool {
    use prost::encoding::{decode_key, decode_varint, WireType};
    let (mut time, mut time_ns) = (false, false);
    while !log.is_empty() {
        let Ok((field, wire_type)) = decode_key(&mut log) else {
            return false;
        };
        let plain = match (field, wire_type) {
            (1, WireType::Varint) if !time => {
                time = true;
                decode_varint(&mut log).is_ok_and(|value| value <= u64::from(u32::MAX))
            }
            (2, WireType::LengthDelimited) => take_length_delimited(&mut log)
                .and_then(plain_pair)
                .is_some(),
            (4, WireType::ThirtyTwoBit) if !time_ns && log.len() >= 4 => {
                time_ns = true;
                log = &log[4..];
                true
            }
            _ => false,
        };
        if !plain {
            return false;
        }
    }
    time
}

/// Reads a `LogContent` or `LogTag`: exactly one key (1) and one value (2),
/// both UTF-8.
fn plain_pair(mut pair: &[u8]) -> Option<(&str, &str)> {
    let (mut key, mut value) = (None, None);
    while !pair.is_empty() {
        let (field, wire_type) = prost::encoding::decode_key(&mut pair).ok()?;
        if wire_type != prost::encoding::WireType::LengthDelimited {
            return None;
        }
        let text = std::str::from_utf8(take_length_delimited(&mut pair)?).ok()?;
        let slot = match field {
            1 => &mut key,
            2 => &mut value,
            _ => return None,
        };
        if slot.replace(text).is_some() {
            return None;
        }
    }
    Some((key?, value?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn sample_group() -> LogGroup {
        LogGroup {
            logs: vec![Log {
                time: 1_700_000_000,
                contents: vec![LogContent {
                    key: "status".into(),
                    value: "succeeded".into(),
                }],
                time_ns: Some(123_456_789),
            }],
            reserved: None,
            topic: Some("workflow".into()),
            source: Some("10.0.0.1".into()),
            log_tags: vec![LogTag {
                key: "tenant".into(),
                value: "t1".into(),
            }],
        }
    }

    #[test]
    fn log_group_round_trip() {
        let group = sample_group();
        let bytes = group.encode_to_vec();
        assert_eq!(LogGroup::decode(bytes.as_slice()).unwrap(), group);
    }

    #[test]
    fn time_ns_is_fixed32_field_4() {
        let log = Log {
            time: 1,
            contents: vec![],
            time_ns: Some(7),
        };
        // Field 1 varint (0x08 0x01), field 4 wire type 5 (0x25) then 4 bytes LE.
        assert_eq!(log.encode_to_vec(), vec![0x08, 0x01, 0x25, 7, 0, 0, 0]);
    }

    #[test]
    fn framed_len_matches_encoding() {
        let group = sample_group();
        let only_logs = LogGroup {
            logs: group.logs.clone(),
            ..LogGroup::default()
        };
        assert_eq!(only_logs.encoded_len(), framed_len(&group.logs[0]));
    }

    #[test]
    fn log_fields_then_group_fields_match_encoding() {
        let group = sample_group();
        let mut bytes = Vec::new();
        for log in &group.logs {
            encode_log_field(log, &mut bytes);
        }
        let without_logs = LogGroup {
            logs: vec![],
            ..group.clone()
        };
        bytes.extend_from_slice(&without_logs.encode_to_vec());
        assert_eq!(bytes, group.encode_to_vec());
    }

    #[test]
    fn split_log_fields_separates_logs() {
        let group = sample_group();
        let encoded = group.encode_to_vec();
        let (mut logs, mut rest) = (Vec::new(), Vec::new());
        split_log_fields(&encoded, &mut logs, Some(&mut rest)).unwrap();
        let mut expected_logs = Vec::new();
        encode_log_field(&group.logs[0], &mut expected_logs);
        assert_eq!(logs, expected_logs);
        let without_logs = LogGroup {
            logs: vec![],
            ..group
        };
        assert_eq!(rest, without_logs.encode_to_vec());
    }

    #[test]
    fn split_log_fields_rejects_truncated_input() {
        let encoded = sample_group().encode_to_vec();
        let mut logs = Vec::new();
        let truncated = &encoded[..encoded.len() - 1];
        assert!(split_log_fields(truncated, &mut logs, None).is_err());
    }

    #[test]
    fn plain_log_group_keeps_the_encoded_logs() {
        let group = sample_group();
        let encoded = group.encode_to_vec();
        let plain = split_plain_log_group(&encoded).unwrap();
        assert_eq!(plain.topic, "workflow");
        assert_eq!(plain.source, "10.0.0.1");
        assert_eq!(plain.tags, vec![("tenant".to_string(), "t1".to_string())]);
        let mut logs = Vec::new();
        encode_log_field(&group.logs[0], &mut logs);
        assert_eq!(plain.logs, logs);
        assert_eq!(plain.ends, vec![logs.len()]);
    }

    #[test]
    fn unusual_log_groups_are_not_split() {
        let log = |bytes: &[u8]| {
            let mut group = vec![0x0a, bytes.len() as u8];
            group.extend_from_slice(bytes);
            group
        };
        // time 1, then content {key "k", value "v"}.
        let plain = [0x08, 0x01, 0x12, 0x06, 0x0a, 0x01, b'k', 0x12, 0x01, b'v'];
        assert!(split_plain_log_group(&log(&plain)).is_some());
        let cases: [(&str, &[u8]); 7] = [
            ("no time", &[0x12, 0x06, 0x0a, 0x01, b'k', 0x12, 0x01, b'v']),
            ("time twice", &[0x08, 0x01, 0x08, 0x02]),
            ("time over 32 bits", &[0x08, 0x80, 0x80, 0x80, 0x80, 0x10]),
            (
                "content without value",
                &[0x08, 0x01, 0x12, 0x03, 0x0a, 0x01, b'k'],
            ),
            (
                "invalid UTF-8",
                &[0x08, 0x01, 0x12, 0x06, 0x0a, 0x01, 0xff, 0x12, 0x01, b'v'],
            ),
            ("unknown field", &[0x08, 0x01, 0x18, 0x01]),
            ("truncated", &[0x08, 0x01, 0x12, 0x06, 0x0a, 0x01]),
        ];
        for (case, bytes) in cases {
            assert!(split_plain_log_group(&log(bytes)).is_none(), "{case}");
        }
        assert!(
            split_plain_log_group(&[0x3a, 0x00]).is_none(),
            "unknown group field"
        );
        assert!(
            split_plain_log_group(&[0x0a, 0x05, 0x08]).is_none(),
            "log runs past the end"
        );
    }
}
