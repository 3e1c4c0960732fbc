//! UTC calendar arithmetic for HTTP dates, V4 signing dates and PostgreSQL
//! timestamps, without a time-zone database.

use std::time::{SystemTime, UNIX_EPOCH};

/// A UTC date and time of day.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UtcDateTime {
    pub year: i64,
    pub month: u32,
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
}

/// Converts seconds since the Unix epoch (negative before 1970) to a UTC
/// date and time, in the proleptic Gregorian calendar.
pub fn utc_from_unix(secs: i64) -> UtcDateTime {
    let days = secs.div_euclid(86_400);
    let second_of_day = secs.rem_euclid(86_400) as u32;
    // Days to civil date over 400-year eras, with years starting in March.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * month_index + 2) / 5 + 1) as u32;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    UtcDateTime {
        year,
        month,
        day,
        hour: second_of_day / 3600,
        minute: second_of_day / 60 % 60,
        second: second_of_day % 60,
    }
}

/// Converts `time` to a UTC date and time, whole seconds; times before
/// 1970 become the epoch.
pub fn utc_from_system(time: SystemTime) -> UtcDateTime {
    let secs = time
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs() as i64)
        .unwrap_or(0);
    utc_from_unix(secs)
}

/// Formats `time` as a V4 signing time, `yyyymmddThhmmssZ`.
pub fn v4_date_time(time: SystemTime) -> String {
    let t = utc_from_system(time);
    format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
        t.year, t.month, t.day, t.hour, t.minute, t.second
    )
}

/// Parses a V4 signing time, `yyyymmddThhmmssZ`, into seconds since the
/// Unix epoch.
pub fn parse_v4_date_time(text: &str) -> Option<i64> {
    let bytes = text.as_bytes();
    if bytes.len() != 16 || bytes[8] != b'T' || bytes[15] != b'Z' {
        return None;
    }
    let number = |range: std::ops::Range<usize>| text.get(range)?.parse::<i64>().ok();
    let (year, month, day) = (number(0..4)?, number(4..6)?, number(6..8)?);
    let (hour, minute, second) = (number(9..11)?, number(11..13)?, number(13..15)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 {
        return None;
    }
    Some(
        days_from_civil(year, month as u32, day as u32) * 86_400
            + hour * 3600
            + minute * 60
            + second,
    )
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
pub fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year.rem_euclid(400);
    let month = i64::from(month);
    let day_of_year =
        (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn epoch_and_known_dates() {
        assert_eq!(
            utc_from_unix(0),
            UtcDateTime {
                year: 1970,
                month: 1,
                day: 1,
                hour: 0,
                minute: 0,
                second: 0
            }
        );
        // 2000-01-01 00:00:00 is PostgreSQL's epoch.
        assert_eq!(utc_from_unix(946_684_800).year, 2000);
        let leap = utc_from_unix(951_782_400); // 2000-02-29
        assert_eq!((leap.month, leap.day), (2, 29));
        let before = utc_from_unix(-1);
        assert_eq!(
            (before.year, before.month, before.day, before.second),
            (1969, 12, 31, 59)
        );
    }

    #[test]
    fn v4_date_time_round_trip() {
        let time = UNIX_EPOCH + Duration::from_secs(1_659_929_010);
        assert_eq!(v4_date_time(time), "20220808T032330Z");
        assert_eq!(parse_v4_date_time("20220808T032330Z"), Some(1_659_929_010));
        assert_eq!(parse_v4_date_time("2022-08-08T03:23"), None);
    }

    #[test]
    fn days_from_civil_inverts_utc_from_unix() {
        for days in [-800_000i64, -1, 0, 59, 60, 11_016, 19_000, 2_932_896] {
            let t = utc_from_unix(days * 86_400);
            assert_eq!(days_from_civil(t.year, t.month, t.day), days);
        }
    }
}
