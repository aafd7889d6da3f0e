//! MaxPool and GlobalMaxPool by pairwise maxima, `max(a, b) = a + relu(b - a)`: one bootstrap
//! per pairwise maximum, `k - 1` per window of `k` values, reduced as a balanced tree.
//!
//! When every value of a channel is a lookup output (a ReLU before the pool, say), the channel's
//! lookups share one output grid, so each `relu(b - a)` is exact on that grid and the pooled
//! value is exactly the largest input.

use super::super::symbolic::{Elem, GraphBuilder};
use super::linear::{global_windows, pool_windows};
use super::{Inputs, NodeCtx};
use crate::error::Result;
use crate::graph::OutputGrid;
use crate::onnx::{DynTensor, Nd};

pub(crate) fn max_pool(ctx: &NodeCtx, b: &mut GraphBuilder, inputs: &Inputs) -> Result<DynTensor> {
    let x = inputs.dynamic(ctx, 0)?;
    if ctx.node.output.len() > 1 && !ctx.node.output[1].is_empty() {
        return Err(ctx.unsupported("MaxPool's Indices output"));
    }
    let w = if ctx.node.op_type == "GlobalMaxPool" {
        global_windows(ctx, x)?
    } else {
        ctx.require_attr_i("storage_order", &[0, 1], 0)?;
        pool_windows(ctx, x)?
    };
    let (windows, dims) = (w.taps, w.dims);
    tie_channels(b, x);
    let data = windows
        .iter()
        .map(|taps| {
            if taps.is_empty() {
                return Err(ctx.unsupported("a pooling window lies entirely in the padding"));
            }
            let mut level: Vec<Elem> = taps.iter().map(|&t| x.data[t].clone()).collect();
            while level.len() > 1 {
                level = level
                    .chunks(2)
                    .map(|p| match p {
                        [a, c] => b.max(a, c, ctx.name),
                        [a] => a.clone(),
                        _ => unreachable!(),
                    })
                    .collect();
            }
            Ok(level.pop().expect("non-empty window"))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Nd { dims, data })
}

/// Puts the lookups of each channel on one shared grid, when the whole channel is lookups
/// still on calibrated grids.
fn tie_channels(b: &mut GraphBuilder, x: &DynTensor) {
    let c = x.dims.get(1).copied().unwrap_or(1).max(1);
    let per = x.data.len() / c;
    for ch in 0..c {
        let atoms: Option<Vec<u32>> = x.data[ch * per..(ch + 1) * per]
            .iter()
            .map(|e| {
                let a = e.lin.as_atom()?;
                let l = b.lookup_mut(a)?;
                matches!(l.grid, OutputGrid::Calibrated).then_some(a)
            })
            .collect();
        if let Some(atoms) = atoms {
            let g = b.new_tie_group();
            for a in atoms {
                if let Some(l) = b.lookup_mut(a) {
                    l.grid = OutputGrid::Tied(g);
                }
            }
        }
    }
}
