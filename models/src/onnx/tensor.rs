//! Constant tensors (initializers and `Constant` nodes), decoded to f64.

use super::pb;
use crate::error::{ModelError, Result};

/// Most elements one constant may hold (guards against absurd dims in a hostile file).
const MAX_ELEMENTS: usize = 64 << 20;

/// An n-dimensional array in row-major order: constants hold `f64`, computed tensors hold
/// symbolic elements.
#[derive(Clone, Debug, PartialEq)]
pub struct Nd<T> {
    pub dims: Vec<usize>,
    pub data: Vec<T>,
}

/// A constant tensor (initializer or `Constant` node).
pub type Tensor = Nd<f64>;

impl<T> Nd<T> {
    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

impl Tensor {
    pub fn scalar(v: f64) -> Self {
        Nd {
            dims: vec![],
            data: vec![v],
        }
    }

    pub fn vector(v: Vec<f64>) -> Self {
        Nd {
            dims: vec![v.len()],
            data: v,
        }
    }

    pub fn from_proto(t: &pb::TensorProto) -> Result<Self> {
        let bad = |why: String| ModelError::InvalidOnnx(format!("tensor '{}': {why}", t.name));
        if t.data_location == super::external::EXTERNAL {
            return Err(super::external::unreadable(t));
        }
        let mut dims = Vec::with_capacity(t.dims.len());
        let mut count: usize = 1;
        for &d in &t.dims {
            let d = usize::try_from(d).map_err(|_| bad(format!("negative dimension {d}")))?;
            count = count
                .checked_mul(d)
                .filter(|&c| c <= MAX_ELEMENTS)
                .ok_or_else(|| bad("too many elements".into()))?;
            dims.push(d);
        }
        let raw = &t.raw_data;
        let from_raw = |width: usize| -> Result<Vec<[u8; 8]>> {
            if raw.len() != count * width {
                return Err(bad(format!(
                    "raw data holds {} bytes, dims need {}",
                    raw.len(),
                    count * width
                )));
            }
            Ok(raw
                .chunks_exact(width)
                .map(|c| {
                    let mut b = [0u8; 8];
                    b[..width].copy_from_slice(c);
                    b
                })
                .collect())
        };
        let data: Vec<f64> = match t.data_type {
            // FLOAT
            1 if !raw.is_empty() => from_raw(4)?
                .iter()
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64)
                .collect(),
            1 => t.float_data.iter().map(|&v| v as f64).collect(),
            // DOUBLE
            11 if !raw.is_empty() => from_raw(8)?
                .iter()
                .map(|b| f64::from_le_bytes(*b))
                .collect(),
            11 => t.double_data.clone(),
            // INT64
            7 if !raw.is_empty() => from_raw(8)?
                .iter()
                .map(|b| i64::from_le_bytes(*b) as f64)
                .collect(),
            7 => t.int64_data.iter().map(|&v| v as f64).collect(),
            // INT32
            6 if !raw.is_empty() => from_raw(4)?
                .iter()
                .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64)
                .collect(),
            6 => t.int32_data.iter().map(|&v| v as f64).collect(),
            // UINT8, INT8, UINT16, INT16, BOOL: raw bytes, or widened into int32_data
            2 | 9 if !raw.is_empty() => from_raw(1)?.iter().map(|b| b[0] as f64).collect(),
            3 if !raw.is_empty() => from_raw(1)?.iter().map(|b| b[0] as i8 as f64).collect(),
            4 if !raw.is_empty() => from_raw(2)?
                .iter()
                .map(|b| u16::from_le_bytes([b[0], b[1]]) as f64)
                .collect(),
            5 if !raw.is_empty() => from_raw(2)?
                .iter()
                .map(|b| i16::from_le_bytes([b[0], b[1]]) as f64)
                .collect(),
            2..=5 | 9 => t.int32_data.iter().map(|&v| v as f64).collect(),
            other => {
                return Err(bad(format!(
                    "element type {other} is not supported (float, double and 8- to 64-bit integers are)"
                )));
            }
        };
        if data.len() != count {
            return Err(bad(format!(
                "holds {} values, dims {:?} need {count}",
                data.len(),
                dims
            )));
        }
        if data.iter().any(|v| !v.is_finite()) {
            return Err(bad("holds NaN or infinite values".into()));
        }
        Ok(Tensor { dims, data })
    }

    /// Broadcasts this tensor (numpy rules, batch dimension included) against one sample of
    /// `sample_shape`, returning one value per sample element in row-major order.
    pub fn broadcast_to_sample(&self, sample_shape: &[usize]) -> Option<Vec<f64>> {
        // Drop leading size-1 dims (the batch) until the rank fits the sample's.
        let mut dims: &[usize] = &self.dims;
        while dims.len() > sample_shape.len() {
            if dims[0] != 1 {
                return None;
            }
            dims = &dims[1..];
        }
        let pad = sample_shape.len() - dims.len();
        let full: Vec<usize> = std::iter::repeat_n(1, pad)
            .chain(dims.iter().copied())
            .collect();
        if full
            .iter()
            .zip(sample_shape)
            .any(|(&d, &s)| d != 1 && d != s)
        {
            return None;
        }
        let total: usize = sample_shape.iter().product();
        let mut out = Vec::with_capacity(total);
        let mut idx = vec![0usize; sample_shape.len()];
        for _ in 0..total {
            let mut off = 0;
            for (k, &d) in full.iter().enumerate() {
                off = off * d + if d == 1 { 0 } else { idx[k] };
            }
            out.push(self.data[off]);
            for k in (0..idx.len()).rev() {
                idx[k] += 1;
                if idx[k] < sample_shape[k] {
                    break;
                }
                idx[k] = 0;
            }
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcasting_follows_numpy() {
        let per_channel = Tensor {
            dims: vec![2, 1, 1],
            data: vec![10.0, 20.0],
        };
        let b = per_channel.broadcast_to_sample(&[2, 1, 2]).unwrap();
        assert_eq!(b, vec![10.0, 10.0, 20.0, 20.0]);
        let batched_row = Tensor {
            dims: vec![1, 3],
            data: vec![1.0, 2.0, 3.0],
        };
        assert_eq!(
            batched_row.broadcast_to_sample(&[3]).unwrap(),
            vec![1.0, 2.0, 3.0]
        );
        let scalar = Tensor {
            dims: vec![],
            data: vec![5.0],
        };
        assert_eq!(scalar.broadcast_to_sample(&[2]).unwrap(), vec![5.0, 5.0]);
        let wrong = Tensor {
            dims: vec![4],
            data: vec![0.0; 4],
        };
        assert!(wrong.broadcast_to_sample(&[3]).is_none());
    }
}
