//! CSV datasets: a header row, the features in model-input order, then an optional last
//! column: `label` (an integer class) or `target` (a float, for regressors).

use std::path::Path;

use crate::error::{ModelError, Result};

pub use veil_format::input::{MAX_FEATURE_ABS, check_row, check_rows, feature_problem};

#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    pub features: Vec<Vec<f64>>,
    /// One integer class per row, when the file has a `label` column.
    pub labels: Option<Vec<i64>>,
    /// One value per target per row, when the file ends with a `target` column (or several:
    /// `target0`, `target1`, ...).
    pub targets: Option<Vec<Vec<f64>>>,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.features.len()
    }

    pub fn is_empty(&self) -> bool {
        self.features.is_empty()
    }

    /// Keeps only the first `n` rows.
    pub fn truncate(&mut self, n: usize) {
        self.features.truncate(n);
        if let Some(l) = &mut self.labels {
            l.truncate(n);
        }
        if let Some(t) = &mut self.targets {
            t.truncate(n);
        }
    }
}

/// Whether the `label` (or `target`) column must be present.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Labels {
    Required,
    Optional,
}

/// Reads a CSV of `n_features` feature columns plus (optionally) a trailing `label` or
/// `target` column.
pub fn read_csv(path: &Path, n_features: usize, labels: Labels) -> Result<Dataset> {
    let file = std::fs::File::open(path)
        .map_err(|e| ModelError::io(format!("opening {}", path.display()), e))?;
    parse_csv(file, &path.display().to_string(), n_features, labels)
}

/// Parses CSV text; `name` is used in error messages.
pub fn parse_csv(
    reader: impl std::io::Read,
    name: &str,
    n_features: usize,
    labels: Labels,
) -> Result<Dataset> {
    let err = |line: usize, reason: String| ModelError::Csv {
        path: name.to_string(),
        line,
        reason,
    };
    let mut rdr = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(true)
        .trim(csv::Trim::All)
        .from_reader(reader);
    let header = rdr
        .headers()
        .map_err(|e| err(1, format!("cannot read the header row: {e}")))?
        .clone();
    if header.is_empty() {
        return Err(err(1, "empty file: expected a header row".into()));
    }
    let last = header.iter().next_back();
    let has_label = last == Some("label");
    let n_targets = header
        .iter()
        .rev()
        .take_while(|h| h.starts_with("target"))
        .count()
        .min(header.len().saturating_sub(n_features));
    let has_target = n_targets > 0;
    let expected = n_features + usize::from(has_label) + n_targets;
    if header.len() != expected {
        return Err(err(
            1,
            format!(
                "header has {} columns; the model takes {n_features} features{}",
                header.len(),
                if has_label || has_target {
                    " plus the label or target column"
                } else {
                    " (and an optional last column named 'label' or 'target')"
                }
            ),
        ));
    }
    if labels == Labels::Required && !has_label && !has_target {
        return Err(err(
            1,
            "no 'label' or 'target' column (it must be the last column)".into(),
        ));
    }
    let mut features = Vec::new();
    let mut label_values = Vec::new();
    let mut target_values = Vec::new();
    for (i, record) in rdr.records().enumerate() {
        let line = i + 2;
        let record = record.map_err(|e| err(line, format!("unreadable row: {e}")))?;
        if record.len() != expected {
            return Err(err(
                line,
                format!("{} columns, expected {expected}", record.len()),
            ));
        }
        let mut row = Vec::with_capacity(n_features);
        for (col, field) in record.iter().take(n_features).enumerate() {
            let v: f64 = field.parse().map_err(|_| {
                err(
                    line,
                    format!(
                        "column {} ('{}'): '{field}' is not a number",
                        col + 1,
                        &header[col]
                    ),
                )
            })?;
            if let Some(why) = feature_problem(v) {
                return Err(err(
                    line,
                    format!("column {} ('{}'): '{field}' {why}", col + 1, &header[col]),
                ));
            }
            row.push(v);
        }
        if has_label {
            let field = &record[n_features];
            let label: i64 = field
                .parse()
                .or_else(|_| {
                    // accept "3.0"-style integer labels
                    field
                        .parse::<f64>()
                        .ok()
                        .filter(|v| v.fract() == 0.0 && v.abs() < 1e15)
                        // exact: an integral value below 2^53 in magnitude
                        .map(|v| v as i64)
                        .ok_or(())
                })
                .map_err(|_| err(line, format!("label '{field}' is not an integer class")))?;
            label_values.push(label);
        }
        if has_target {
            let t = (n_features..n_features + n_targets)
                .map(|c| {
                    let field = &record[c];
                    field
                        .parse()
                        .ok()
                        .filter(|v: &f64| v.is_finite())
                        .ok_or_else(|| {
                            err(line, format!("target '{field}' is not a finite number"))
                        })
                })
                .collect::<Result<Vec<f64>>>()?;
            target_values.push(t);
        }
        features.push(row);
    }
    if features.is_empty() {
        return Err(err(2, "no data rows".into()));
    }
    Ok(Dataset {
        features,
        labels: has_label.then_some(label_values),
        targets: has_target.then_some(target_values),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_features_and_labels() {
        let d = parse_csv(
            "f0,f1,label\n1,2.5,0\n-1,0,1\n".as_bytes(),
            "t",
            2,
            Labels::Required,
        )
        .unwrap();
        assert_eq!(d.features, vec![vec![1.0, 2.5], vec![-1.0, 0.0]]);
        assert_eq!(d.labels, Some(vec![0, 1]));
        assert_eq!(d.targets, None);
        let d = parse_csv(
            "f0,target\n1,2.5\n-1,-0.25\n".as_bytes(),
            "t.csv",
            1,
            Labels::Required,
        )
        .unwrap();
        assert_eq!(d.targets, Some(vec![vec![2.5], vec![-0.25]]));
        let d = parse_csv(
            "f0,target0,target1\n1,2,3\n".as_bytes(),
            "t.csv",
            1,
            Labels::Required,
        )
        .unwrap();
        assert_eq!(d.targets, Some(vec![vec![2.0, 3.0]]));
        assert_eq!(d.labels, None);
        let e = parse_csv(
            "f0,target\n1,nan\n".as_bytes(),
            "t.csv",
            1,
            Labels::Required,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("not a finite number"), "{e}");
    }

    #[test]
    fn wrong_column_count_names_the_line() {
        let e = parse_csv(
            "f0,f1,label\n1,2,0\n1,2\n".as_bytes(),
            "t.csv",
            2,
            Labels::Optional,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("line 3") && e.contains("2 columns, expected 3"),
            "{e}"
        );
        let e = parse_csv("f0,label\n1,0\n".as_bytes(), "t.csv", 2, Labels::Optional)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("line 1") && e.contains("takes 2 features"),
            "{e}"
        );
    }

    #[test]
    fn nan_infinite_and_huge_features_name_line_and_column() {
        for (field, why) in [
            ("nan", "NaN"),
            ("inf", "infinite"),
            ("-inf", "infinite"),
            ("1e31", "beyond"),
            ("-2e30", "beyond"),
        ] {
            let text = format!("f0,f1,label\n1,2,0\n3,{field},1\n");
            let e = parse_csv(text.as_bytes(), "t.csv", 2, Labels::Required)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("line 3") && e.contains("column 2 ('f1')") && e.contains(why),
                "{field}: {e}"
            );
        }
        // The bound itself is accepted.
        parse_csv("f0\n1e30\n-1e30\n".as_bytes(), "t", 1, Labels::Optional).unwrap();
    }

    #[test]
    fn bad_number_and_missing_label() {
        let e = parse_csv("f0,label\nabc,0\n".as_bytes(), "t", 1, Labels::Required)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("line 2") && e.contains("'abc' is not a number"),
            "{e}"
        );
        let e = parse_csv("f0,f1\n1,2\n".as_bytes(), "t", 2, Labels::Required)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no 'label' or 'target' column"), "{e}");
        let e = parse_csv("f0,label\n1,x\n".as_bytes(), "t", 1, Labels::Required)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("line 2") && e.contains("not an integer class"),
            "{e}"
        );
    }
}
