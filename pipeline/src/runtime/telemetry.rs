//! The Prometheus text exposition every stage renders its counters into (`GET /metrics`).
//! Metric names follow `ferry_<stage>_<thing>_<unit>`; counters end in `_total`. Each stage
//! owns its names, counters and rendering (`capture::stats`, `ship::stats`, `apply::stats`);
//! this module only writes the format, escaping label values so a table named `a"b` or one
//! with a newline cannot break or forge a series.

use std::fmt::{Display, Write as _};

/// What a metric family is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up (resets on restart).
    Counter,
    /// Goes up and down.
    Gauge,
}

/// A metric family: name, kind and help text.
#[derive(Clone, Copy, Debug)]
pub struct Family {
    /// `ferry_<stage>_<thing>_<unit>`.
    pub name: &'static str,
    /// Counter or gauge.
    pub kind: Kind,
    /// One line saying what it counts.
    pub help: &'static str,
}

impl Family {
    /// A counter.
    pub const fn counter(name: &'static str, help: &'static str) -> Family {
        Family {
            name,
            kind: Kind::Counter,
            help,
        }
    }

    /// A gauge.
    pub const fn gauge(name: &'static str, help: &'static str) -> Family {
        Family {
            name,
            kind: Kind::Gauge,
            help,
        }
    }
}

/// Text in the Prometheus exposition format, written family by family.
#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
}

impl Exposition {
    /// Starts a family: its `# HELP` and `# TYPE` lines.
    pub fn family(&mut self, f: Family) -> &mut Self {
        let kind = match f.kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        };
        let _ = writeln!(self.out, "# HELP {} {}", f.name, f.help);
        let _ = writeln!(self.out, "# TYPE {} {kind}", f.name);
        self
    }

    /// One sample of the family last started, with its labels.
    pub fn sample(&mut self, f: Family, labels: &[(&str, &str)], value: impl Display) -> &mut Self {
        self.out.push_str(f.name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                self.out.push_str(k);
                self.out.push_str("=\"");
                escape_into(&mut self.out, v);
                self.out.push('"');
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
        self
    }

    /// A family with a single sample.
    pub fn single(&mut self, f: Family, labels: &[(&str, &str)], value: impl Display) -> &mut Self {
        self.family(f).sample(f, labels, value)
    }

    /// The text.
    pub fn finish(self) -> String {
        self.out
    }
}

/// A label value as the format wants it: backslash, double quote and newline escaped.
fn escape_into(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROWS: Family = Family::counter("ferry_test_rows_total", "rows");

    #[test]
    fn label_values_cannot_break_or_forge_a_series() {
        let mut e = Exposition::default();
        e.family(ROWS)
            .sample(ROWS, &[("table", "public.a\"b")], 1)
            .sample(ROWS, &[("table", "x\"} 99\nferry_forged 1")], 2)
            .sample(ROWS, &[("table", "back\\slash")], 3);
        let text = e.finish();
        assert_eq!(
            text,
            "# HELP ferry_test_rows_total rows\n\
             # TYPE ferry_test_rows_total counter\n\
             ferry_test_rows_total{table=\"public.a\\\"b\"} 1\n\
             ferry_test_rows_total{table=\"x\\\"} 99\\nferry_forged 1\"} 2\n\
             ferry_test_rows_total{table=\"back\\\\slash\"} 3\n"
        );
        // Every line is a comment or one sample of the family: nothing forged.
        assert!(text
            .lines()
            .all(|l| l.starts_with('#') || l.starts_with("ferry_test_rows_total")));
    }

    #[test]
    fn samples_without_labels_have_no_braces() {
        let mut e = Exposition::default();
        e.single(Family::gauge("ferry_test_up", "up"), &[], 1);
        assert!(e.finish().ends_with("\nferry_test_up 1\n"));
    }
}
