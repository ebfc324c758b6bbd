//! What split is intended: uniform by default, or weights from a CSV file
//! (`balancer,endpoint,weight`, the balancer as a glob over names and chains).

use crate::error::{Error, InputError, InputErrorKind, Result};
use crate::select::glob;

/// One row of an expectations file.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub balancer: String,
    pub endpoint: String,
    pub weight: f64,
    pub line: u32,
}

/// Intended weights for some balancers.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Expectations {
    pub rows: Vec<Row>,
    pub source: String,
}

/// The intended split of one balancer.
#[derive(Debug, Clone, PartialEq)]
pub struct Expected {
    /// Per endpoint of the balancer (same order): the intended probability.
    pub probs: Vec<f64>,
    /// Endpoints the expectations name that the balancer does not have.
    pub missing: Vec<String>,
    /// `uniform`, or the expectations file's name.
    pub source: String,
}

impl Expectations {
    /// Reads `balancer,endpoint,weight` rows (a header line is optional; `#` lines and
    /// blank lines are skipped).
    pub fn parse(text: &str, source: &str) -> Result<Self> {
        let mut rows = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = (i + 1) as u32;
            let l = raw.trim();
            if l.is_empty() || l.starts_with('#') {
                continue;
            }
            let mut rdr = csv::ReaderBuilder::new()
                .has_headers(false)
                .trim(csv::Trim::All)
                .from_reader(l.as_bytes());
            let rec = match rdr.records().next() {
                Some(Ok(r)) => r,
                _ => return Err(bad(source, line, l, "a CSV row")),
            };
            if rec.len() != 3 {
                return Err(bad(
                    source,
                    line,
                    l,
                    "three fields: balancer,endpoint,weight",
                ));
            }
            if rows.is_empty() && rec[2].eq_ignore_ascii_case("weight") {
                continue;
            }
            let weight: f64 = rec[2]
                .parse()
                .ok()
                .filter(|w: &f64| w.is_finite() && *w >= 0.0)
                .ok_or_else(|| bad(source, line, &rec[2], "a weight: a number >= 0"))?;
            rows.push(Row {
                balancer: rec[0].to_string(),
                endpoint: rec[1].to_string(),
                weight,
                line,
            });
        }
        if rows.is_empty() {
            return Err(bad(
                source,
                1,
                "",
                "at least one row balancer,endpoint,weight",
            ));
        }
        Ok(Self {
            rows,
            source: source.to_string(),
        })
    }

    /// The intended split for a balancer with these endpoint labels, or `None` when no
    /// row's glob matches it (uniform then applies).
    pub fn for_balancer(&self, name: &str, chain: &str, endpoints: &[String]) -> Option<Expected> {
        let rows: Vec<&Row> = self
            .rows
            .iter()
            .filter(|r| glob(&r.balancer, name) || glob(&r.balancer, chain))
            .collect();
        if rows.is_empty() {
            return None;
        }
        let total: f64 = rows.iter().map(|r| r.weight).sum();
        let probs = endpoints
            .iter()
            .map(|e| {
                let w: f64 = rows
                    .iter()
                    .filter(|r| r.endpoint == *e)
                    .map(|r| r.weight)
                    .sum();
                if total > 0.0 { w / total } else { 0.0 }
            })
            .collect();
        let mut missing: Vec<String> = rows
            .iter()
            .filter(|r| !endpoints.contains(&r.endpoint))
            .map(|r| r.endpoint.clone())
            .collect();
        missing.sort();
        missing.dedup();
        Some(Expected {
            probs,
            missing,
            source: self.source.clone(),
        })
    }
}

/// The uniform split over n endpoints.
pub fn uniform(n: usize) -> Expected {
    Expected {
        probs: vec![if n == 0 { 0.0 } else { 1.0 / n as f64 }; n],
        missing: Vec::new(),
        source: "uniform".into(),
    }
}

fn bad(source: &str, line: u32, text: &str, expected: &str) -> Error {
    let e = InputError::new(
        InputErrorKind::Syntax,
        line,
        1,
        text,
        format!("expected {expected}"),
        "write one row per endpoint: balancer-glob,endpoint,weight (e.g. `mwan3_policy_*,mark 0x100/0x3f00,2`)",
    );
    Error::Located {
        rendered: format!("{source}:{line}: {e}"),
        error: e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_normalise_per_balancer() {
        let e = Expectations::parse(
            "balancer,endpoint,weight\nmwan3_*,mark 0x100/0x3f00,2\nmwan3_*,mark 0x200/0x3f00,3\nother,x,1\n",
            "w.csv",
        )
        .unwrap();
        let eps = vec![
            "mark 0x100/0x3f00".to_string(),
            "mark 0x200/0x3f00".to_string(),
        ];
        let x = e
            .for_balancer("mwan3_policy_bal", "mwan3_policy_bal", &eps)
            .unwrap();
        assert_eq!(x.probs, vec![0.4, 0.6]);
        assert!(x.missing.is_empty());
        assert!(e.for_balancer("ns/svc:http", "KUBE-SVC-X", &eps).is_none());
    }

    #[test]
    fn bad_rows_are_located() {
        let err = Expectations::parse("a,b\n", "w.csv").unwrap_err();
        assert!(err.to_string().contains("w.csv:1"), "{err}");
        let err = Expectations::parse("a,b,-1\n", "w.csv").unwrap_err();
        assert!(err.to_string().contains("weight"), "{err}");
    }
}
