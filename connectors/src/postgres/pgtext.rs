//! [`Datum`] → Postgres text form, per column type: the inverse of [`super::values`], used to
//! write changes into a destination database with the same text output as the source.

use ferry_schemas::{ColumnType, Datum};

/// Days since 1970-01-01 → (year, month, day) in the proleptic Gregorian calendar.
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn date(days: i64) -> String {
    let (y, m, d) = civil_from_days(days);
    if y <= 0 {
        format!("{:04}-{m:02}-{d:02} BC", 1 - y)
    } else {
        format!("{y:04}-{m:02}-{d:02}")
    }
}

fn time(micros: i64) -> String {
    let (s, us) = (micros.div_euclid(1_000_000), micros.rem_euclid(1_000_000));
    format!("{:02}:{:02}:{:02}.{us:06}", s / 3600, s / 60 % 60, s % 60)
}

fn timestamp(micros: i64, zone: bool) -> String {
    match micros {
        i64::MAX => return "infinity".into(),
        i64::MIN => return "-infinity".into(),
        _ => {}
    }
    let days = micros.div_euclid(86_400_000_000);
    let rest = micros.rem_euclid(86_400_000_000);
    let (d, bc) = match date(days).strip_suffix(" BC") {
        Some(d) => (d.to_string(), " BC"),
        None => (date(days), ""),
    };
    format!("{d} {}{}{bc}", time(rest), if zone { "+00" } else { "" })
}

fn float(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "Infinity" } else { "-Infinity" }.into()
    } else {
        format!("{v}")
    }
}

fn quote_element(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// The text form of a value, `None` for SQL NULL (and for an unchanged TOAST value, which has
/// no text: callers leave such columns out).
pub fn to_text(d: &Datum, ty: &ColumnType) -> Option<String> {
    Some(match (d, ty) {
        (Datum::Null | Datum::UnchangedToast, _) => return None,
        (Datum::Int(v), ColumnType::Date) => match *v {
            i32::MAX => "infinity".into(),
            i32::MIN => "-infinity".into(),
            v => date(i64::from(v)),
        },
        (Datum::Long(v), ColumnType::Time) => time(*v),
        (Datum::Long(v), ColumnType::Timestamp) => timestamp(*v, false),
        (Datum::Long(v), ColumnType::TimestampTz) => timestamp(*v, true),
        (Datum::Int(v), _) => v.to_string(),
        (Datum::Long(v), _) => v.to_string(),
        (Datum::Float(v), _) => {
            if v.is_finite() {
                format!("{v}")
            } else {
                float(f64::from(*v))
            }
        }
        (Datum::Double(v), _) => float(*v),
        (Datum::Bool(v), _) => if *v { "t" } else { "f" }.into(),
        (Datum::Bytes(b), _) => {
            let mut s = String::with_capacity(2 + 2 * b.len());
            s.push_str("\\x");
            for x in b {
                s.push_str(&format!("{x:02x}"));
            }
            s
        }
        (Datum::Text(t), _) => t.clone(),
        (Datum::Array(items), ColumnType::Array(inner)) => {
            let parts: Vec<String> = items
                .iter()
                .map(|i| to_text(i, inner).map_or_else(|| "NULL".into(), |t| quote_element(&t)))
                .collect();
            format!("{{{}}}", parts.join(","))
        }
        (Datum::Array(_), _) => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::super::values::parse;
    use super::*;

    #[test]
    fn text_forms_parse_back_to_the_same_datum() {
        let cases: Vec<(&str, ColumnType)> = vec![
            ("-32768", ColumnType::Int2),
            ("9223372036854775807", ColumnType::Int8),
            ("1.5", ColumnType::Float4),
            ("-Infinity", ColumnType::Float8),
            ("t", ColumnType::Bool),
            ("\\x00ff10", ColumnType::Bytea),
            ("2024-02-29", ColumnType::Date),
            ("0001-01-01 BC", ColumnType::Date),
            ("13:45:01.5", ColumnType::Time),
            ("2024-02-29 13:45:01.123456", ColumnType::Timestamp),
            ("2024-02-29 11:45:01.123456+00", ColumnType::TimestampTz),
            ("1969-12-31 23:59:59.999999+00", ColumnType::TimestampTz),
            ("infinity", ColumnType::TimestampTz),
            (
                r#"{"x y",NULL,"q\"uote"}"#,
                ColumnType::Array(Box::new(ColumnType::Text)),
            ),
            ("{1,NULL,3}", ColumnType::Array(Box::new(ColumnType::Int4))),
        ];
        for (text, ty) in cases {
            let d = parse(text, &ty).expect(text);
            let back = to_text(&d, &ty).expect("not null");
            assert_eq!(parse(&back, &ty).expect(&back), d, "{text} -> {back}");
        }
    }
}
