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
}
