//! Checks on a client's feature values before they are quantized and encrypted.

use crate::error::{FormatError, Result};

/// Largest feature magnitude accepted. Beyond it a value means a unit or parsing mistake, and
/// `x / scale` can leave the range where rounding to an integer is exact.
pub const MAX_FEATURE_ABS: f64 = 1e30;

/// Why a feature value cannot be quantized, or `None` when it can.
pub fn feature_problem(v: f64) -> Option<&'static str> {
    if v.is_nan() {
        Some("is not a number (NaN)")
    } else if v.is_infinite() {
        Some("is infinite")
    } else if v.abs() > MAX_FEATURE_ABS {
        Some("is beyond the accepted magnitude of 1e30")
    } else {
        None
    }
}

/// Checks one sample's features; the error names `row` and the column.
pub fn check_row(row: usize, x: &[f64]) -> Result<()> {
    match x
        .iter()
        .enumerate()
        .find_map(|(column, &v)| feature_problem(v).map(|why| (column, v, why)))
    {
        Some((column, value, why)) => Err(FormatError::InvalidFeature {
            row,
            column,
            value,
            why,
        }),
        None => Ok(()),
    }
}

/// Checks many samples, naming the first bad one by its index in `rows`.
pub fn check_rows(rows: &[Vec<f64>]) -> Result<()> {
    rows.iter()
        .enumerate()
        .try_for_each(|(row, x)| check_row(row, x))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_rows_names_row_and_column() {
        check_rows(&[vec![0.0, -1e30], vec![1e30, 5.0]]).unwrap();
        let e = check_rows(&[vec![0.0, 1.0], vec![2.0, f64::NAN]]).unwrap_err();
        assert!(
            matches!(
                e,
                FormatError::InvalidFeature {
                    row: 1,
                    column: 1,
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(e.to_string(), "row 1, column 1: NaN is not a number (NaN)");
        let e = check_row(7, &[f64::NEG_INFINITY]).unwrap_err();
        assert_eq!(e.to_string(), "row 7, column 0: -inf is infinite");
        let e = check_row(0, &[0.0, 0.0, 3e30]).unwrap_err();
        assert!(e.to_string().starts_with("row 0, column 2: 3000"), "{e}");
    }
}
