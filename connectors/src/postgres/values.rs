//! Postgres text output → [`Datum`], per column type.
//!
//! Capture pins the session settings that shape text output (`DateStyle=ISO`, `TimeZone=UTC`,
//! `extra_float_digits=3`, `bytea_output=hex`, `IntervalStyle=postgres`) on both the
//! replication and the snapshot connection, so the same parser serves both paths.

use ferry_schemas::{ColumnType, Datum};

/// The session settings every Ferry connection to the source uses, as `-c` options.
pub const SESSION_OPTIONS: &str = "-c DateStyle=ISO,MDY -c TimeZone=UTC -c extra_float_digits=3 -c bytea_output=hex -c IntervalStyle=postgres";

/// A text value that does not parse as its column type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot read {text:?} as {ty}: {reason}")]
pub struct ValueError {
    /// The offending text (cut to 200 bytes).
    pub text: String,
    /// The type it should have been.
    pub ty: String,
    /// Why not.
    pub reason: String,
}

fn err(text: &str, ty: &ColumnType, reason: impl Into<String>) -> ValueError {
    let mut cut = text.len().min(200);
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    ValueError {
        text: text[..cut].to_string(),
        ty: format!("{ty:?}"),
        reason: reason.into(),
    }
}

const DAYS_1970_TO_2000: i64 = 10_957;
const MICROS_PER_DAY: i64 = 86_400_000_000;

/// Parses one value's text form. For a type with a text form
/// ([`ColumnType::has_text_form`]), a value its typed form cannot hold (a two-dimensional
/// array, bounds other than 1, a timestamp after 294247-01-10) comes back as the text itself,
/// which the destination reads as the same value.
pub fn parse(text: &str, ty: &ColumnType) -> Result<Datum, ValueError> {
    match typed(text, ty) {
        Err(_) if ty.has_text_form() => Ok(Datum::Text(text.to_string())),
        parsed => parsed,
    }
}

/// [`parse`] into the typed form only.
fn typed(text: &str, ty: &ColumnType) -> Result<Datum, ValueError> {
    let e = |reason: &str| err(text, ty, reason);
    Ok(match ty {
        ColumnType::Int2 | ColumnType::Int4 => {
            Datum::Int(text.parse().map_err(|_| e("not an integer"))?)
        }
        ColumnType::Int8 => Datum::Long(text.parse().map_err(|_| e("not an integer"))?),
        ColumnType::Float4 => {
            Datum::Float(parse_float(text).ok_or_else(|| e("not a float"))? as f32)
        }
        ColumnType::Float8 => Datum::Double(parse_float(text).ok_or_else(|| e("not a float"))?),
        ColumnType::Bool => match text {
            "t" => Datum::Bool(true),
            "f" => Datum::Bool(false),
            _ => return Err(e("not t or f")),
        },
        ColumnType::Bytea => Datum::Bytes(parse_bytea(text).ok_or_else(|| e("not \\x hex"))?),
        ColumnType::Date => Datum::Int(parse_date(text).ok_or_else(|| e("not an ISO date"))?),
        ColumnType::Time => Datum::Long(parse_time(text).ok_or_else(|| e("not an ISO time"))?),
        ColumnType::Timestamp => Datum::Long(parse_timestamp(text, false).ok_or_else(|| {
            e("not an ISO timestamp, or after 294247-01-10, beyond microseconds since 1970")
        })?),
        ColumnType::TimestampTz => Datum::Long(parse_timestamp(text, true).ok_or_else(|| {
            e("not an ISO timestamp, or after 294247-01-10, beyond microseconds since 1970")
        })?),
        ColumnType::Array(inner) => Datum::Array(parse_array(text, inner)?),
        ColumnType::Numeric
        | ColumnType::Text
        | ColumnType::Uuid
        | ColumnType::Json
        | ColumnType::Enum
        | ColumnType::Other => Datum::Text(text.to_string()),
    })
}

fn parse_float(text: &str) -> Option<f64> {
    match text {
        "NaN" => Some(f64::NAN),
        "Infinity" => Some(f64::INFINITY),
        "-Infinity" => Some(f64::NEG_INFINITY),
        _ => text.parse().ok(),
    }
}

fn parse_bytea(text: &str) -> Option<Vec<u8>> {
    let hex = text.strip_prefix("\\x")?.as_bytes();
    if hex.len() % 2 != 0 {
        return None;
    }
    let nibble = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    hex.chunks(2)
        .map(|p| Some(nibble(p[0])? << 4 | nibble(p[1])?))
        .collect()
}

/// Days from 1970-01-01 to the given proleptic Gregorian date (astronomical years).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `YYYY-MM-DD` with an optional ` BC`, or ±infinity; returns days since 1970-01-01.
fn parse_date_days(text: &str) -> Option<i64> {
    let (body, bc) = match text.strip_suffix(" BC") {
        Some(b) => (b, true),
        None => (text, false),
    };
    let mut parts = body.splitn(3, '-');
    let y: i64 = parts.next()?.parse().ok()?;
    let m: i64 = parts.next()?.parse().ok()?;
    let d: i64 = parts.next()?.parse().ok()?;
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || y < 1 {
        return None;
    }
    let y = if bc { 1 - y } else { y };
    Some(days_from_civil(y, m, d))
}

fn parse_date(text: &str) -> Option<i32> {
    match text {
        "infinity" => Some(i32::MAX),
        "-infinity" => Some(i32::MIN),
        _ => i32::try_from(parse_date_days(text)?).ok(),
    }
}

/// `HH:MM:SS[.ffffff]` → microseconds since midnight.
fn parse_time(text: &str) -> Option<i64> {
    let mut parts = text.splitn(3, ':');
    let h: i64 = parts.next()?.parse().ok()?;
    let m: i64 = parts.next()?.parse().ok()?;
    let sec = parts.next()?;
    let (s, frac) = match sec.split_once('.') {
        Some((s, f)) => (s, f),
        None => (sec, ""),
    };
    let s: i64 = s.parse().ok()?;
    if frac.len() > 6 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let micros: i64 = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<6}").parse().ok()?
    };
    if h > 24 || m > 59 || s > 60 {
        return None;
    }
    Some(((h * 60 + m) * 60 + s) * 1_000_000 + micros)
}

/// `YYYY-MM-DD HH:MM:SS[.ffffff][±HH[:MM[:SS]]][ BC]` → microseconds since the Unix epoch.
fn parse_timestamp(text: &str, with_zone: bool) -> Option<i64> {
    match text {
        "infinity" => return Some(i64::MAX),
        "-infinity" => return Some(i64::MIN),
        _ => {}
    }
    let (body, bc) = match text.strip_suffix(" BC") {
        Some(b) => (b, " BC"),
        None => (text, ""),
    };
    let (date, rest) = body.split_once(' ')?;
    let days = parse_date_days(&format!("{date}{bc}"))?;
    let (time, offset_secs) = if with_zone {
        let at = rest.rfind(['+', '-'])?;
        let (time, zone) = rest.split_at(at);
        let sign = if zone.starts_with('-') { -1 } else { 1 };
        let mut secs = 0i64;
        for (i, part) in zone[1..].split(':').enumerate() {
            let v: i64 = part.parse().ok()?;
            secs += v * [3600, 60, 1].get(i)?;
        }
        (time, sign * secs)
    } else {
        (rest, 0)
    };
    let micros = parse_time(time)?;
    // Postgres counts from 2000-01-01, so its last ~30 years (after 294247-01-10) do not fit in
    // microseconds since 1970: such a value is refused, never wrapped. `i64::MAX`/`MIN` mean
    // ±infinity, so they are refused too.
    days.checked_mul(MICROS_PER_DAY)?
        .checked_add(micros)?
        .checked_sub(offset_secs.checked_mul(1_000_000)?)
        .filter(|us| *us != i64::MAX && *us != i64::MIN)
}

/// Parses a one-dimensional array literal with lower bound 1, such as `{1,NULL,"a b","x\"y"}`;
/// its elements must be typed values too.
fn parse_array(text: &str, inner: &ColumnType) -> Result<Vec<Datum>, ValueError> {
    let ty = ColumnType::Array(Box::new(inner.clone()));
    let e = |reason: &str| err(text, &ty, reason);
    if text.starts_with('[') {
        // `[0:1]={1,2}`: a list would lose the bounds, which Postgres compares.
        return Err(e("lower bound other than 1"));
    }
    let inside = text
        .strip_prefix('{')
        .and_then(|b| b.strip_suffix('}'))
        .ok_or_else(|| e("not enclosed in braces"))?;
    if inside.starts_with('{') {
        return Err(e("multi-dimensional arrays are not supported"));
    }
    let mut out = Vec::new();
    if inside.is_empty() {
        return Ok(out);
    }
    let bytes = inside.as_bytes();
    let mut i = 0;
    loop {
        let (raw, quoted) = if bytes.get(i) == Some(&b'"') {
            i += 1;
            let mut s = Vec::new();
            loop {
                match bytes.get(i) {
                    None => return Err(e("unterminated quoted element")),
                    Some(b'\\') => {
                        s.push(*bytes.get(i + 1).ok_or_else(|| e("dangling escape"))?);
                        i += 2;
                    }
                    Some(b'"') => {
                        i += 1;
                        break;
                    }
                    Some(&c) => {
                        s.push(c);
                        i += 1;
                    }
                }
            }
            (
                String::from_utf8(s).map_err(|_| e("element is not UTF-8"))?,
                true,
            )
        } else {
            let start = i;
            while i < bytes.len() && bytes[i] != b',' {
                i += 1;
            }
            (inside[start..i].trim().to_string(), false)
        };
        if !quoted && raw.eq_ignore_ascii_case("NULL") {
            out.push(Datum::Null);
        } else {
            out.push(typed(&raw, inner)?);
        }
        match bytes.get(i) {
            None => break,
            Some(b',') => i += 1,
            Some(_) => return Err(e("expected ',' between elements")),
        }
    }
    Ok(out)
}

/// Microseconds between the Unix epoch and the Postgres epoch (2000-01-01).
pub const PG_EPOCH_OFFSET_US: i64 = DAYS_1970_TO_2000 * MICROS_PER_DAY;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scalars() {
        assert_eq!(parse("-32768", &ColumnType::Int2), Ok(Datum::Int(-32768)));
        assert_eq!(
            parse("9223372036854775807", &ColumnType::Int8),
            Ok(Datum::Long(i64::MAX))
        );
        assert_eq!(parse("t", &ColumnType::Bool), Ok(Datum::Bool(true)));
        assert_eq!(parse("1.5", &ColumnType::Float4), Ok(Datum::Float(1.5)));
        assert!(matches!(parse("NaN", &ColumnType::Float8), Ok(Datum::Double(v)) if v.is_nan()));
        assert_eq!(
            parse("-Infinity", &ColumnType::Float8),
            Ok(Datum::Double(f64::NEG_INFINITY))
        );
        assert_eq!(
            parse("\\x00ff10", &ColumnType::Bytea),
            Ok(Datum::Bytes(vec![0, 255, 16]))
        );
        assert_eq!(
            parse("0.10000000000000000001", &ColumnType::Numeric),
            Ok(Datum::Text("0.10000000000000000001".into()))
        );
    }

    #[test]
    fn dates_and_times() {
        assert_eq!(parse("1970-01-01", &ColumnType::Date), Ok(Datum::Int(0)));
        assert_eq!(
            parse("2000-01-01", &ColumnType::Date),
            Ok(Datum::Int(10_957))
        );
        assert_eq!(parse("1969-12-31", &ColumnType::Date), Ok(Datum::Int(-1)));
        assert_eq!(
            parse("0001-01-01 BC", &ColumnType::Date),
            Ok(Datum::Int(-719_528)) // as Postgres computes it
        );
        assert_eq!(
            parse("13:45:01.5", &ColumnType::Time),
            Ok(Datum::Long(49_501_500_000))
        );
        assert_eq!(
            parse("2000-01-01 00:00:00", &ColumnType::Timestamp),
            Ok(Datum::Long(PG_EPOCH_OFFSET_US))
        );
        assert_eq!(
            parse("2000-01-01 02:00:00.000001+02", &ColumnType::TimestampTz),
            Ok(Datum::Long(PG_EPOCH_OFFSET_US + 1))
        );
        assert_eq!(
            parse("1970-01-01 00:00:00-05:30", &ColumnType::TimestampTz),
            Ok(Datum::Long(19_800_000_000))
        );
        assert_eq!(
            parse("infinity", &ColumnType::TimestampTz),
            Ok(Datum::Long(i64::MAX))
        );
    }

    #[test]
    fn timestamps_at_the_ends_of_the_range_are_exact_or_text_never_wrapped() {
        for ty in [ColumnType::Timestamp, ColumnType::TimestampTz] {
            let zone = if ty == ColumnType::TimestampTz {
                "+00"
            } else {
                ""
            };
            let low = parse(&format!("4713-01-01 00:00:00{zone} BC"), &ty);
            assert_eq!(low, Ok(Datum::Long(-210_863_520_000_000_000)), "{ty:?}");
            let fits = parse(&format!("294247-01-10 04:00:54.775806{zone}"), &ty);
            assert_eq!(fits, Ok(Datum::Long(i64::MAX - 1)), "{ty:?}");
            for text in [
                "294247-01-10 04:00:54.775807",
                "294276-12-31 23:59:59.999999",
            ] {
                let text = format!("{text}{zone}");
                assert_eq!(parse(&text, &ty), Ok(Datum::Text(text.clone())));
                let r = typed(&text, &ty);
                assert!(
                    r.as_ref().is_err_and(|e| e.to_string().contains("294247")),
                    "{text}: {r:?}"
                );
            }
        }
    }

    #[test]
    fn arrays() {
        let ints = ColumnType::Array(Box::new(ColumnType::Int4));
        assert_eq!(
            parse("{1,NULL,-3}", &ints),
            Ok(Datum::Array(vec![
                Datum::Int(1),
                Datum::Null,
                Datum::Int(-3)
            ]))
        );
        assert_eq!(parse("{}", &ints), Ok(Datum::Array(vec![])));
        let texts = ColumnType::Array(Box::new(ColumnType::Text));
        assert_eq!(
            parse(r#"{plain,"with space","q\"uote","NULL",NULL}"#, &texts),
            Ok(Datum::Array(vec![
                Datum::Text("plain".into()),
                Datum::Text("with space".into()),
                Datum::Text("q\"uote".into()),
                Datum::Text("NULL".into()),
                Datum::Null,
            ]))
        );
    }

    #[test]
    fn malformed_values_are_errors() {
        let cases: &[(&str, ColumnType)] = &[
            ("12x", ColumnType::Int4),
            ("99999999999", ColumnType::Int4),
            ("yes", ColumnType::Bool),
            ("\\x0", ColumnType::Bytea),
            ("00ff", ColumnType::Bytea),
            ("2020-13-01", ColumnType::Date),
            ("25:00:00", ColumnType::Time),
        ];
        for (text, ty) in cases {
            let e = parse(text, ty).expect_err(text);
            assert!(!e.reason.is_empty());
        }
    }

    #[test]
    fn values_the_typed_form_cannot_hold_stay_text() {
        let ints = ColumnType::Array(Box::new(ColumnType::Int4));
        let stamps = ColumnType::Array(Box::new(ColumnType::Timestamp));
        let cases: &[(&str, &ColumnType)] = &[
            ("{{1,2},{3,NULL}}", &ints),
            ("[0:1]={5,6}", &ints),
            ("[2:2][1:1]={{7}}", &ints),
            ("{\"294276-12-31 23:59:59.999999\",NULL}", &stamps),
            ("294276-12-31 23:59:59.999999", &ColumnType::Timestamp),
            ("294276-12-31 23:59:59.999999+00", &ColumnType::TimestampTz),
        ];
        for (text, ty) in cases {
            assert_eq!(parse(text, ty), Ok(Datum::Text(text.to_string())), "{ty:?}");
        }
        assert_eq!(
            parse("{NULL}", &stamps),
            Ok(Datum::Array(vec![Datum::Null]))
        );
    }
}
