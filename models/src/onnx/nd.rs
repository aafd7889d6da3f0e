//! Re-indexing ops (Transpose, Slice, Concat, Gather, Pad, broadcasting) written once for any
//! element type: constants fold with them and computed tensors move through them for free.

/// Most elements a re-indexing op may produce (guards memory against hostile shapes).
pub(crate) const MAX_OUT: usize = 1 << 24;

/// Row-major strides of `dims`.
pub(crate) fn strides(dims: &[usize]) -> Vec<usize> {
    let mut s = vec![1usize; dims.len()];
    for k in (0..dims.len().saturating_sub(1)).rev() {
        s[k] = s[k + 1] * dims[k + 1];
    }
    s
}

/// Normalizes an ONNX axis (negative counts from the end) for a tensor of `rank`.
pub(crate) fn axis(a: i64, rank: usize) -> Option<usize> {
    let r = rank as i64;
    let v = if a < 0 { a + r } else { a };
    (0..r).contains(&v).then_some(v as usize)
}

pub(crate) fn transpose<T: Clone>(
    dims: &[usize],
    data: &[T],
    perm: &[usize],
) -> (Vec<usize>, Vec<T>) {
    let st = strides(dims);
    let out_dims: Vec<usize> = perm.iter().map(|&p| dims[p]).collect();
    let n = data.len();
    let mut out = Vec::with_capacity(n);
    let mut idx = vec![0usize; out_dims.len()];
    for _ in 0..n {
        let off: usize = idx.iter().zip(perm).map(|(&i, &p)| i * st[p]).sum();
        out.push(data[off].clone());
        increment(&mut idx, &out_dims);
    }
    (out_dims, out)
}

fn increment(idx: &mut [usize], dims: &[usize]) {
    for k in (0..idx.len()).rev() {
        idx[k] += 1;
        if idx[k] < dims[k] {
            return;
        }
        idx[k] = 0;
    }
}

/// Elements `start, start+step, ...` (step may be negative) along each axis.
pub(crate) fn slice<T: Clone>(
    dims: &[usize],
    data: &[T],
    ranges: &[(usize, i64, usize)],
) -> (Vec<usize>, Vec<T>) {
    // ranges[k] = (start, step, count) per axis
    let st = strides(dims);
    let out_dims: Vec<usize> = ranges.iter().map(|r| r.2).collect();
    let n: usize = out_dims.iter().product();
    let mut out = Vec::with_capacity(n);
    let mut idx = vec![0usize; out_dims.len()];
    for _ in 0..n {
        let off: usize = idx
            .iter()
            .zip(ranges)
            .zip(&st)
            .map(|((&i, &(start, step, _)), &s)| (start as i64 + i as i64 * step) as usize * s)
            .sum();
        out.push(data[off].clone());
        increment(&mut idx, &out_dims);
    }
    (out_dims, out)
}

/// The `(start, step, count)` of an ONNX Slice on an axis of `len` elements.
pub(crate) fn slice_range(
    len: usize,
    start: i64,
    end: i64,
    step: i64,
) -> Option<(usize, i64, usize)> {
    if step == 0 {
        return None;
    }
    let l = len as i64;
    let norm = |v: i64| if v < 0 { v + l } else { v };
    let (s, e) = (norm(start), norm(end));
    let (s, e) = if step > 0 {
        (s.clamp(0, l), e.clamp(0, l))
    } else {
        (s.clamp(-1, l - 1), e.clamp(-1, l - 1))
    };
    let count = if step > 0 {
        (e - s + step - 1).div_euclid(step).max(0)
    } else {
        (s - e + (-step) - 1).div_euclid(-step).max(0)
    };
    Some((s.max(0) as usize, step, count as usize))
}

pub(crate) fn concat<T: Clone>(
    parts: &[(&[usize], &[T])],
    ax: usize,
) -> Option<(Vec<usize>, Vec<T>)> {
    let first = parts.first()?.0;
    let mut out_dims = first.to_vec();
    out_dims[ax] = 0;
    for (d, _) in parts {
        if d.len() != first.len() || d.iter().enumerate().any(|(k, &v)| k != ax && v != first[k]) {
            return None;
        }
        out_dims[ax] += d[ax];
    }
    let outer: usize = first[..ax].iter().product();
    let mut out = Vec::new();
    for o in 0..outer {
        for (d, data) in parts {
            let inner: usize = d[ax..].iter().product();
            out.extend_from_slice(&data[o * inner..(o + 1) * inner]);
        }
    }
    Some((out_dims, out))
}

/// Gather along `ax` with integer `indices` of shape `idx_dims` (negative counts from the end).
pub(crate) fn gather<T: Clone>(
    dims: &[usize],
    data: &[T],
    ax: usize,
    idx_dims: &[usize],
    indices: &[f64],
) -> Option<(Vec<usize>, Vec<T>)> {
    let len = dims[ax] as i64;
    let idx: Vec<usize> = indices
        .iter()
        .map(|&i| {
            let i = i as i64;
            let i = if i < 0 { i + len } else { i };
            (0..len).contains(&i).then_some(i as usize)
        })
        .collect::<Option<_>>()?;
    let outer: usize = dims[..ax].iter().product();
    let inner: usize = dims[ax + 1..].iter().product();
    if outer.checked_mul(idx.len())?.checked_mul(inner)? > MAX_OUT {
        return None;
    }
    let mut out_dims = dims[..ax].to_vec();
    out_dims.extend_from_slice(idx_dims);
    out_dims.extend_from_slice(&dims[ax + 1..]);
    let mut out = Vec::with_capacity(outer * idx.len() * inner);
    for o in 0..outer {
        for &i in &idx {
            let base = (o * dims[ax] + i) * inner;
            out.extend_from_slice(&data[base..base + inner]);
        }
    }
    Some((out_dims, out))
}

/// Constant padding: `pads` = begins then ends, one per axis (non-negative).
pub(crate) fn pad<T: Clone>(
    dims: &[usize],
    data: &[T],
    pads: &[usize],
    fill: T,
) -> Option<(Vec<usize>, Vec<T>)> {
    let r = dims.len();
    let out_dims: Vec<usize> = (0..r)
        .map(|k| dims[k].checked_add(pads[k])?.checked_add(pads[k + r]))
        .collect::<Option<_>>()?;
    let n = out_dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d))?;
    if n > MAX_OUT {
        return None;
    }
    let st = strides(dims);
    let mut out = Vec::with_capacity(n);
    let mut idx = vec![0usize; r];
    for _ in 0..n {
        let mut off = 0;
        let mut inside = true;
        for k in 0..r {
            let i = idx[k] as i64 - pads[k] as i64;
            if i < 0 || i >= dims[k] as i64 {
                inside = false;
                break;
            }
            off += i as usize * st[k];
        }
        out.push(if inside {
            data[off].clone()
        } else {
            fill.clone()
        });
        increment(&mut idx, &out_dims);
    }
    Some((out_dims, out))
}

/// An output shape and, per output element, the flat index into each operand.
pub(crate) type Broadcast = (Vec<usize>, Vec<(usize, usize)>);

/// Numpy broadcasting of two shapes: the output shape and, per output element, the flat
/// index into each operand.
pub(crate) fn broadcast(a: &[usize], b: &[usize]) -> Option<Broadcast> {
    let r = a.len().max(b.len());
    let full = |d: &[usize]| -> Vec<usize> {
        std::iter::repeat_n(1, r - d.len())
            .chain(d.iter().copied())
            .collect()
    };
    let (fa, fb) = (full(a), full(b));
    let mut out = Vec::with_capacity(r);
    for k in 0..r {
        out.push(match (fa[k], fb[k]) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => return None,
        });
    }
    let (sa, sb) = (strides(&fa), strides(&fb));
    let n = out.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))?;
    if n > MAX_OUT {
        return None;
    }
    let mut idx = vec![0usize; r];
    let mut pairs = Vec::with_capacity(n);
    for _ in 0..n {
        let (mut ia, mut ib) = (0, 0);
        for k in 0..r {
            if fa[k] != 1 {
                ia += idx[k] * sa[k];
            }
            if fb[k] != 1 {
                ib += idx[k] * sb[k];
            }
        }
        pairs.push((ia, ib));
        increment(&mut idx, &out);
    }
    Some((out, pairs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reindexing_matches_numpy() {
        let d = [2, 3];
        let x: Vec<i32> = (0..6).collect();
        assert_eq!(
            transpose(&d, &x, &[1, 0]),
            (vec![3, 2], vec![0, 3, 1, 4, 2, 5])
        );
        let r = slice_range(3, -1, i64::MIN, -1).unwrap();
        assert_eq!(
            slice(&d, &x, &[(0, 1, 2), r]),
            (vec![2, 3], vec![2, 1, 0, 5, 4, 3])
        );
        assert_eq!(slice_range(5, 1, 100, 2), Some((1, 2, 2)));
        assert_eq!(
            concat(&[(&d, &x), (&[2, 1], &[9, 9])], 1).unwrap().1,
            vec![0, 1, 2, 9, 3, 4, 5, 9]
        );
        assert_eq!(
            gather(&d, &x, 1, &[2], &[2.0, -3.0]).unwrap(),
            (vec![2, 2], vec![2, 0, 5, 3])
        );
        assert_eq!(
            pad(&[1, 2], &[1, 2], &[0, 1, 0, 0], 0),
            Some((vec![1, 3], vec![0, 1, 2]))
        );
        let (o, p) = broadcast(&[2, 1], &[3]).unwrap();
        assert_eq!(o, vec![2, 3]);
        assert_eq!(p[4], (1, 1));
    }
}
