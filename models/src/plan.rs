//! The FHE plan: orders the graph's lookups into stages, fixes how every value is encoded on
//! the torus, and builds one lookup table per neuron.
//!
//! Values that one linear form reads together must share a torus scale `delta` (an LWE sum
//! only adds like with like), so the planner groups them: every form's atoms go into one
//! group (union-find), and each group's `delta` is the largest that lets every form reading
//! the group fit its calibrated range into the bootstrap's window, or, for the outputs, into
//! the signed torus. Narrower forms then spread over the window with an integer multiplier.

use std::collections::HashMap;

use crate::compiled::{
    CompiledModel, GUARD, InputEncoding, InputWindow, IntMatrix, KS_MS_VARIANCE, NodeCost,
    NodeRounding, OutputDecoding, OutputLayer, PBS_OUTPUT_VARIANCE, POSITION, POSITIONS, ParamSet,
    Stage, WINDOW, WINDOW_STRIDE, bits, switch_sigma_positions,
};
use crate::error::{ModelError, Result};
use crate::graph::{Activation, FloatModel, LABEL_ORIGIN, OutputGrid, Reveal, Rule, Task, UFn};
use crate::quantize::{
    QuantConfig, QuantLin, QuantModel, balance_products, quantize, rounding_terms,
};
use crate::simulate::Simulate;

/// Compiles a float model: quantizes it on `calibration`, then plans its FHE encoding.
///
/// With `cfg.search`, the widths that trade rounding error against bootstrap noise (the
/// weights on bootstrap outputs, how much of a model-fixed grid is kept, and the range margin,
/// which trades read precision against overflow) are chosen per model. Every fifth
/// calibration row is held out; each candidate is compiled on the others and simulated on the
/// held-out rows (up to 256) with the plan's predicted read noise, and the one whose
/// predictions agree most with the float model's wins (ties keep the configured widths). The
/// winner is then compiled on all the calibration rows.
pub fn compile(
    model: &FloatModel,
    calibration: &[Vec<f64>],
    cfg: &QuantConfig,
) -> Result<CompiledModel> {
    let balanced = balance_products(model, calibration);
    let model = &balanced;
    let build = |c: &QuantConfig, rows: &[Vec<f64>]| -> Result<CompiledModel> {
        let q = quantize(model, rows, c)?;
        plan(model, &q, rows, c)
    };
    let base = build(cfg, calibration)?;
    // Tree tests and leaf tables are exact whatever the widths: nothing to search.
    let all_exact = model.lookups.iter().all(|l| l.decision);
    if !cfg.search || all_exact || calibration.len() < 10 {
        return Ok(base);
    }
    let fit: Vec<Vec<f64>> = (0..calibration.len())
        .filter(|i| i % 5 != 0)
        .map(|i| calibration[i].clone())
        .collect();
    let held: Vec<&Vec<f64>> = calibration.iter().step_by(5).collect();
    let step = held.len().div_ceil(256).max(1);
    let rows: Vec<&Vec<f64>> = held.into_iter().step_by(step).collect();
    let float: Vec<crate::eval::Prediction> = rows
        .iter()
        .map(|x| model.predict(x))
        .collect::<Result<_>>()?;
    // Classifiers: rows whose class agrees with the float model's. Regressors: minus the
    // squared error against the float outputs. A row that overflows counts as a miss.
    let score = |m: &CompiledModel| -> f64 {
        [1u64, 2]
            .iter()
            .map(|&seed| {
                let mut rng = crate::simulate::NoiseRng::new(seed);
                rows.iter()
                    .zip(&float)
                    .map(|(x, f)| {
                        match m
                            .simulate(x, Some(&mut rng))
                            .map(|s| (s.overflows, m.decode(&s.accs)))
                        {
                            Ok((0, Ok(p))) => match model.task {
                                Task::Classification => f64::from(u8::from(p.label == f.label)),
                                Task::Regression => -p
                                    .outputs
                                    .iter()
                                    .zip(&f.outputs)
                                    .map(|(a, b)| (a - b).powi(2))
                                    .sum::<f64>(),
                            },
                            _ => match model.task {
                                Task::Classification => 0.0,
                                Task::Regression => -1e30,
                            },
                        }
                    })
                    .sum::<f64>()
            })
            .sum()
    };
    let fixed_bits = base.nodes.iter().map(|n| n.output_bits).max().unwrap_or(0);
    let mut best: Option<(f64, QuantConfig)> = None;
    let weights = [
        cfg.weight_bits,
        cfg.weight_bits.saturating_sub(1),
        cfg.weight_bits + 1,
    ];
    for margin in [cfg.range_margin, 2.0 * cfg.range_margin] {
        for wb in weights {
            for gb in [cfg.model_grid_bits, 6, 5] {
                // Coarser grids only matter where the model fixes one wider than them.
                let useful_grid =
                    gb == cfg.model_grid_bits || (gb < cfg.model_grid_bits && gb < fixed_bits);
                if !useful_grid || !(3..=8).contains(&wb) || margin > 4.0 {
                    continue;
                }
                let c = QuantConfig {
                    weight_bits: wb,
                    model_grid_bits: gb,
                    range_margin: margin,
                    ..*cfg
                };
                if let Ok(m) = build(&c, &fit) {
                    let s = score(&m);
                    if best.as_ref().is_none_or(|b| s > b.0) {
                        best = Some((s, c));
                    }
                }
            }
        }
    }
    match best {
        Some((_, c)) if c != *cfg => build(&c, calibration),
        _ => Ok(base),
    }
}

/// Union-find over atoms.
struct Groups(Vec<usize>);

impl Groups {
    fn find(&mut self, a: usize) -> usize {
        let mut r = a;
        while self.0[r] != r {
            r = self.0[r];
        }
        let mut x = a;
        while self.0[x] != r {
            let next = self.0[x];
            self.0[x] = r;
            x = next;
        }
        r
    }

    fn union(&mut self, a: usize, b: usize) {
        let (ra, rb) = (self.find(a), self.find(b));
        if ra != rb {
            self.0[ra] = rb;
        }
    }
}

fn plan(
    model: &FloatModel,
    q: &QuantModel,
    calibration: &[Vec<f64>],
    cfg: &QuantConfig,
) -> Result<CompiledModel> {
    let nf = model.n_features();
    let n_atoms = model.n_atoms();
    let n_lookups = model.lookups.len();

    // Calibrated integer range of every lookup's accumulator and every output.
    let mut acc_range = vec![(i64::MAX, i64::MIN); n_lookups];
    let mut out_range = vec![(i64::MAX, i64::MIN); q.outputs.len()];
    let widen = |r: &mut (i64, i64), v: i64| *r = (r.0.min(v), r.1.max(v));
    for x in calibration {
        let ints = q.ideal_atoms(model, x);
        for (r, ql) in acc_range.iter_mut().zip(&q.lookups) {
            widen(r, ql.acc(&ints));
        }
        for (r, ql) in out_range.iter_mut().zip(&q.outputs) {
            widen(r, ql.acc(&ints));
        }
    }
    // Each lookup's window: the calibrated range with the margin, never wider than what its
    // atoms' grids allow; an exact form on grid values (inside a MaxPool) takes that whole
    // range, which is small, so no input can overflow it.
    let ranges: Vec<(i64, i64)> = acc_range
        .iter()
        .zip(&q.lookups)
        .zip(&model.lookups)
        .enumerate()
        .map(|(i, ((&(lo, hi), ql), l))| {
            let (tlo, thi) = ql.bounds(&q.atoms);
            // 16 positions per integer keeps a read exact with the measured noise.
            if ql.exact && (thi - tlo) * 16 <= POSITIONS - 2 * GUARD {
                return (tlo, thi);
            }
            // A label comparison of scores on one grid: its whole range (a few hundred levels),
            // since a difference past the window would wrap and flip the comparison.
            if label_comparison(model, i, ql) {
                return (tlo, thi);
            }
            let margin = if ql.exact {
                cfg.range_margin.max(0.3)
            } else if matches!(l.grid, OutputGrid::LabelScores(_)) {
                // Only the top of a label score's range matters, but a score past the window
                // would wrap around the torus and read as a large level.
                cfg.range_margin.max(0.2)
            } else {
                cfg.range_margin
            };
            let pad = ((hi - lo) as f64 * margin).ceil() as i64 + 1;
            ((lo - pad).max(tlo), (hi + pad).min(thi))
        })
        .collect();

    // Decisions (tree tests) read small exact integers at box centres, 128 positions apart. A
    // test of a feature wider than 16 values reads the window of its grid around the
    // threshold instead, which the client sends. A test of a computed value (a projection, a
    // lookup's output) reads its whole integer range, each value owning the positions nearest
    // it, so its threshold falls between integers; too wide a range is refused, never read
    // approximately.
    let mut windows: Vec<InputWindow> = Vec::new();
    let mut first_window: HashMap<u32, usize> = HashMap::new();
    // (window value, window offset, the lookup's output per grid value of its feature)
    let mut window_read: Vec<Option<(usize, i64, Vec<i64>)>> = vec![None; n_lookups];
    let mut exact_read = vec![false; n_lookups];
    let mut ranges = ranges;
    for (i, ql) in q.lookups.iter().enumerate() {
        if !model.lookups[i].decision {
            continue;
        }
        let origin = &*model.lookups[i].origin;
        if !ql.exact {
            return Err(ModelError::Plan(format!(
                "node '{origin}': a tree test reads a computed value whose weights are not integer \
                 multiples of one unit; it could only be read approximately"
            )));
        }
        let (tlo, thi) = ql.bounds(&q.atoms);
        exact_read[i] = true;
        let feature = match ql.terms[..] {
            [(a, w)] if (a as usize) < nf && thi - tlo >= WINDOW => Some((a, w)),
            _ => None,
        };
        let Some((a, w)) = feature else {
            if (thi - tlo) as f64 * MIN_DECISION_SPACING > (POSITIONS - 2 * GUARD) as f64 {
                return Err(ModelError::Plan(format!(
                    "node '{origin}': a tree test reads a computed value of {} integer levels; an \
                     exact read separates at most {}",
                    thi - tlo + 1,
                    ((POSITIONS - 2 * GUARD) as f64 / MIN_DECISION_SPACING) as i64 + 1
                )));
            }
            ranges[i] = (tlo, thi);
            continue;
        };
        let g = feature_table(model, q, i, a, w);
        let steps: Vec<i64> = (0..g.len() as i64 - 1)
            .filter(|&v| g[v as usize] != g[v as usize + 1])
            .collect();
        let (first, last) = match (steps.first(), steps.last()) {
            (Some(&f), Some(&l)) => (f, l + 1),
            _ => (0, 0),
        };
        let m = first / WINDOW_STRIDE;
        if last > m * WINDOW_STRIDE + WINDOW - 1 {
            return Err(ModelError::Plan(format!(
                "node '{origin}': a tree test of feature {a} changes over more than one window of its grid"
            )));
        }
        let base = *first_window.entry(a).or_insert_with(|| {
            let at = windows.len();
            windows.extend(InputWindow::cover(a, q.atoms[a as usize].max_q));
            at
        });
        window_read[i] = Some((base + m as usize, m * WINDOW_STRIDE, g));
        ranges[i] = (0, WINDOW - 1);
    }
    let n_inputs = nf + windows.len();
    check_label_exact(model, q)?;

    // Torus scale groups.
    let mut groups = Groups((0..n_atoms).collect());
    for j in 1..nf {
        groups.union(0, j);
    }
    let union_all = |terms: &mut dyn Iterator<Item = u32>, groups: &mut Groups| {
        if let Some(first) = terms.next() {
            for a in terms {
                groups.union(first as usize, a as usize);
            }
        }
    };
    for ql in &q.lookups {
        union_all(&mut ql.terms.iter().map(|t| t.0), &mut groups);
    }
    let mut out_atoms = q.outputs.iter().flat_map(|o| o.terms.iter().map(|t| t.0));
    union_all(&mut out_atoms, &mut groups);
    let usable = ((POSITIONS - 2 * GUARD) as i128) * POSITION;
    let mut cap = vec![i128::MAX; n_atoms];
    for (ql, &(lo, hi)) in q.lookups.iter().zip(&ranges) {
        if let Some(&(a, _)) = ql.terms.first() {
            let g = groups.find(a as usize);
            cap[g] = cap[g].min(usable / (hi - lo).max(1) as i128);
        }
    }
    let max_abs = out_range
        .iter()
        .filter(|r| r.0 <= r.1)
        .map(|&(lo, hi)| lo.unsigned_abs().max(hi.unsigned_abs()))
        .max()
        .unwrap_or(1);
    let out_bound = ((max_abs as f64 * (1.0 + cfg.range_margin)).ceil() as u64).max(1);
    let out_delta = ((1u64 << 62) / out_bound).max(1);
    if let Some(&(a, _)) = q.outputs.iter().find_map(|o| o.terms.first()) {
        let g = groups.find(a as usize);
        cap[g] = cap[g].min(out_delta as i128);
    }
    let mut delta_of = vec![0u64; n_atoms];
    for a in 0..n_atoms {
        let c = cap[groups.find(a)];
        // A group no form reads (an input feature the model ignores) keeps any scale.
        let c = if c == i128::MAX { 1 << 40 } else { c };
        if c < 1 || c > u64::MAX as i128 {
            return Err(ModelError::Plan(format!(
                "value {a}: its readers' accumulators are too wide for a 64-bit torus"
            )));
        }
        delta_of[a] = c as u64;
    }

    // Stages, and each atom's index in the value list (inputs, then stage by stage).
    let stage_of = model.stages();
    let n_stages = stage_of.iter().copied().max().unwrap_or(0);
    let mut order: Vec<usize> = (0..n_lookups).collect();
    order.sort_by_key(|&i| stage_of[nf + i]);
    let mut value_of = vec![0u32; n_atoms];
    (0..nf).for_each(|j| value_of[j] = j as u32);
    for (pos, &i) in order.iter().enumerate() {
        value_of[nf + i] = (n_inputs + pos) as u32;
    }
    let remap = |ql: &QuantLin, k: i64| -> Vec<(u32, i64)> {
        let mut row: Vec<(u32, i64)> = ql
            .terms
            .iter()
            .map(|&(a, w)| (value_of[a as usize], w * k))
            .collect();
        row.sort_unstable_by_key(|t| t.0);
        row
    };

    let mut stages = Vec::with_capacity(n_stages);
    let mut n_before = n_inputs;
    // The narrowest exact read, and its node.
    let mut min_decision_spacing: Option<(f64, &str)> = None;
    let mut costs: Vec<NodeCost> = Vec::new();
    let mut start = 0;
    for s in 1..=n_stages {
        let members: Vec<usize> = order[start..]
            .iter()
            .copied()
            .take_while(|&i| stage_of[nf + i] == s)
            .collect();
        start += members.len();
        let mut seen_tables = std::collections::HashMap::new();
        let mut st = Stage {
            weights: IntMatrix {
                n_in: n_before as u32,
                rows: Vec::with_capacity(members.len()),
            },
            offset: Vec::with_capacity(members.len()),
            lut: Vec::new(),
            lut_index: Vec::with_capacity(members.len()),
            delta_in: Vec::with_capacity(members.len()),
            delta_out: Vec::with_capacity(members.len()),
            read_sigma: Vec::with_capacity(members.len()),
            max_acc_width: 0,
        };
        for &i in &members {
            let ql = &q.lookups[i];
            let (lo, hi) = ranges[i];
            let width = (hi - lo).max(1) as i128;
            let d_in = ql
                .terms
                .first()
                .map_or(1u64 << 40, |&(a, _)| delta_of[a as usize]);
            let k = (usable / (d_in as i128 * width)).max(1) as i64;
            st.max_acc_width = st.max_acc_width.max(width as u64);
            st.weights.rows.push(match &window_read[i] {
                Some((w, _, _)) => vec![((nf + w) as u32, k)],
                None => remap(ql, k),
            });
            let off = GUARD as i128 * POSITION - (k as i128) * (d_in as i128) * lo as i128;
            st.offset.push(off as u64); // two's complement: the torus wraps
            // The table: decode the position back to an accumulator value, then rescale, apply
            // the lookup's function and quantize onto its output grid. An exact read rounds the
            // accumulator to its integer first, so each value owns the positions nearest it.
            let step = POSITION as f64 / (k as f64 * d_in as f64);
            let (func, out_q) = (&model.lookups[i].func, q.atoms[nf + i]);
            let origin = &*model.lookups[i].origin;
            if exact_read[i] && min_decision_spacing.is_none_or(|m| 1.0 / step < m.0) {
                min_decision_spacing = Some((1.0 / step, origin));
            }
            let feature = window_read[i].as_ref().map(|(_, o, g)| (g, *o));
            let mut table = Vec::with_capacity(POSITIONS as usize);
            for p in 0..POSITIONS {
                let acc = lo as f64 + (p - GUARD) as f64 * step;
                let out = match (&feature, exact_read[i]) {
                    (Some((g, o)), _) => {
                        let v = (acc.round() as i64).clamp(0, WINDOW - 1) + o;
                        g[v.min(g.len() as i64 - 1) as usize]
                    }
                    (None, true) => {
                        let acc = (acc.round() as i64).clamp(lo, hi) as f64;
                        out_q.quantize(func.eval(ql.scale * acc + ql.offset))
                    }
                    // A label comparison's accumulator is an integer (levels of one grid):
                    // rounding it first puts each step between two levels, so that a tie reads
                    // as a tie rather than on the step.
                    (None, false) if label_comparison(model, i, ql) => {
                        let acc = (acc.round() as i64).clamp(lo, hi) as f64;
                        out_q.quantize(func.eval(ql.scale * acc + ql.offset))
                    }
                    (None, false) => out_q.quantize(func.eval(ql.scale * acc + ql.offset)),
                };
                table.push(out as u16);
            }
            st.push_table(&table, &mut seen_tables);
            st.delta_in.push(d_in);
            st.delta_out.push(delta_of[nf + i]);
            let w2: f64 = ql
                .terms
                .iter()
                .filter(|&&(a, _)| a as usize >= nf)
                .map(|&(_, w)| ((w * k) as f64).powi(2))
                .sum();
            st.read_sigma
                .push((KS_MS_VARIANCE + w2 * PBS_OUTPUT_VARIANCE).sqrt());
            let cost = match costs.iter_mut().find(|c| c.node == origin) {
                Some(c) => c,
                None => {
                    costs.push(NodeCost {
                        node: origin.to_string(),
                        pbs: 0,
                        output_bits: 0,
                        weight_bits: 0,
                        acc_bits: 0,
                        exact_reads: 0,
                        approximate_reads: 0,
                    });
                    costs.last_mut().expect("just pushed")
                }
            };
            cost.pbs += 1;
            if exact_read[i] {
                cost.exact_reads += 1;
            } else {
                cost.approximate_reads += 1;
            }
            cost.output_bits = cost.output_bits.max(out_q.bits());
            cost.weight_bits = cost.weight_bits.max(ql.weight_bits);
            cost.acc_bits = cost.acc_bits.max(bits(width as u64));
        }
        n_before += members.len();
        stages.push(st);
    }

    let out_rows: Vec<Vec<(u32, i64)>> = q.outputs.iter().map(|o| remap(o, 1)).collect();
    let sigma: Vec<f64> = q
        .outputs
        .iter()
        .map(|o| {
            let w2: f64 = o
                .terms
                .iter()
                .filter(|&&(a, _)| a as usize >= nf)
                .map(|&(_, w)| (w as f64).powi(2))
                .sum();
            (w2 * PBS_OUTPUT_VARIANCE).sqrt()
        })
        .collect();
    let out_decoding_delta = q
        .outputs
        .iter()
        .find_map(|o| o.terms.first())
        .map_or(out_delta, |&(a, _)| delta_of[a as usize]);
    let (modulus_bits, sigma) = output_modulus(&sigma, out_decoding_delta, model.reveal);
    let output = OutputLayer {
        weights: IntMatrix {
            n_in: n_before as u32,
            rows: out_rows,
        },
        decoding: OutputDecoding {
            delta: out_decoding_delta,
            scale: q.outputs.iter().map(|o| o.scale).collect(),
            offset: q.outputs.iter().map(|o| o.offset).collect(),
            modulus_bits,
        },
        sigma,
        max_acc_width: out_range
            .iter()
            .filter(|r| r.0 <= r.1)
            .map(|(lo, hi)| (hi - lo) as u64)
            .max()
            .unwrap_or(0),
    };
    let compiled = CompiledModel {
        input_shape: model.input_shape.clone(),
        params: ParamSet::Message2Carry2KsPbsTuniform2m128,
        config: *cfg,
        input: InputEncoding {
            quant: q.atoms[..nf].to_vec(),
            windows,
            delta: delta_of[0],
        },
        stages,
        output,
        tail: model.tail.clone(),
        class_labels: model.class_labels.clone(),
        task: model.task,
        nodes: costs,
        rounding: node_rounding(model, q),
        reveal: model.reveal,
    };
    if let Some((spacing, origin)) = min_decision_spacing
        && spacing < MIN_DECISION_SPACING
    {
        return Err(ModelError::Plan(format!(
            "node '{origin}': exact reads (tree tests) are {spacing:.0} positions apart, fewer than \
             {MIN_DECISION_SPACING}: the values they share a scale with are too wide"
        )));
    }
    compiled.validate()?;
    Ok(compiled)
}

/// Weight rounding per ONNX node (lookups grouped by origin, then the output forms as node
/// `outputs`): a node is as lossy as its lossiest form; a branch is the terms of one form that
/// read one source node.
fn node_rounding(model: &FloatModel, q: &QuantModel) -> Vec<NodeRounding> {
    let nf = model.n_features();
    let source = |a: u32| -> &str {
        (a as usize)
            .checked_sub(nf)
            .map_or("input", |j| &*model.lookups[j].origin)
    };
    let mut nodes: Vec<NodeRounding> = Vec::new();
    let mut index: HashMap<&str, usize> = HashMap::new();
    let forms = model
        .lookups
        .iter()
        .zip(&q.lookups)
        .map(|(l, ql)| (&*l.origin, &l.input, ql))
        .chain(
            model
                .outputs
                .iter()
                .zip(&q.outputs)
                .map(|(o, ql)| ("outputs", o, ql)),
        );
    for (node, lin, ql) in forms {
        let terms = rounding_terms(lin, ql, &q.atoms);
        let span: f64 = terms.iter().map(|t| t.span).sum();
        let share = |x: f64| if span > 0.0 { x / span } else { 0.0 };
        let dropped = share(terms.iter().filter(|t| t.dropped).map(|t| t.span).sum());
        let error = share(terms.iter().map(|t| t.error).sum());
        // Per source: (span, dropped span).
        let mut branches: Vec<(&str, f64, f64)> = Vec::new();
        for t in &terms {
            let s = source(t.atom);
            let b = match branches.iter().position(|b| b.0 == s) {
                Some(i) => &mut branches[i],
                None => {
                    branches.push((s, 0.0, 0.0));
                    branches.last_mut().expect("just pushed")
                }
            };
            b.1 += t.span;
            if t.dropped {
                b.2 += t.span;
            }
        }
        let worst = branches
            .iter()
            .filter(|b| b.1 > 0.0)
            .map(|b| (b.0, b.2 / b.1))
            .max_by(|x, y| x.1.total_cmp(&y.1));
        let i = *index.entry(node).or_insert_with(|| {
            nodes.push(NodeRounding {
                node: node.to_string(),
                forms: 0,
                dropped_weight: 0.0,
                rounding_error: 0.0,
                worst_branch: None,
            });
            nodes.len() - 1
        });
        let entry = &mut nodes[i];
        entry.forms += 1;
        entry.dropped_weight = entry.dropped_weight.max(dropped);
        entry.rounding_error = entry.rounding_error.max(error);
        if let Some((b, s)) = worst
            && entry.worst_branch.as_ref().is_none_or(|w| s > w.1)
        {
            entry.worst_branch = Some((b.to_string(), s));
        }
    }
    nodes
}

/// Fewest positions between the values of an exact read: half of it is the read's noise
/// margin, and 48 positions are about ten read standard deviations (4.9 for fresh inputs).
pub const MIN_DECISION_SPACING: f64 = 96.0;

/// Whether lookup `l` is one of a label argmax's comparisons of scores (`[b - a > 0]`,
/// `relu(b - a)`, the winner's score): an approximate read of an exact form.
/// Only lookups that read other label lookups count: a score's own read reads the model.
fn label_comparison(model: &FloatModel, i: usize, ql: &QuantLin) -> bool {
    let nf = model.n_features();
    let label = |l: &crate::graph::Lookup| &*l.origin == LABEL_ORIGIN;
    let l = &model.lookups[i];
    label(l)
        && !l.decision
        && ql.exact
        && !l.input.terms.is_empty()
        && l.input.terms.iter().all(|&(a, _)| {
            (a as usize)
                .checked_sub(nf)
                .is_some_and(|j| label(&model.lookups[j]))
        })
}

/// A label model's encoding must be exact: the comparisons of scores are approximate reads
/// (a misread needs scores within read noise of each other), but every lookup that selects or
/// copies the winner's index bits, or the check, is a decision, which the plan reads exactly
/// or refuses, and the output must sum them with exact weights. Anything else is refused here
/// rather than decoded into a wrong class.
fn check_label_exact(model: &FloatModel, q: &QuantModel) -> Result<()> {
    if model.reveal != Reveal::Label {
        return Ok(());
    }
    if let Some(o) = q.outputs.iter().find(|o| !o.exact) {
        return Err(ModelError::Plan(format!(
            "label output: the class index's weights {:?} cannot be kept exact",
            o.terms.iter().map(|t| t.1).collect::<Vec<_>>()
        )));
    }
    Ok(())
}

/// Lookup `i`'s output for each grid value `q` of input feature `a` (its form is `w * q`).
/// An equality test holds on the grid value nearest its threshold (a categorical feature's
/// integer codes rarely lie exactly on an 8-bit grid).
fn feature_table(model: &FloatModel, q: &QuantModel, i: usize, a: u32, w: i64) -> Vec<i64> {
    let ql = &q.lookups[i];
    let (func, out_q) = (&model.lookups[i].func, q.atoms[model.n_features() + i]);
    let value = |v: i64| ql.scale * (w * v) as f64 + ql.offset;
    let equal_at = match &**func {
        UFn::Act(
            Activation::Compare {
                rule: Rule::Eq,
                threshold,
            },
            inner,
        ) if matches!(**inner, UFn::X) => {
            Some(((threshold - ql.offset) / (ql.scale * w as f64)).round() as i64)
        }
        _ => None,
    };
    (0..=q.atoms[a as usize].max_q)
        .map(|v| match equal_at {
            Some(t) => out_q.quantize(f64::from(u8::from(v == t))),
            None => out_q.quantize(func.eval(value(v))),
        })
        .collect()
}

/// Fewest bits of modulus the outputs keep, with their noise including the switch.
pub const MIN_OUTPUT_BITS: u32 = 8;
/// Most bits kept: under half the full ciphertext (8.2 KB per output with the header).
pub const MAX_OUTPUT_BITS: u32 = 31;

/// The modulus the outputs are switched to before they go back, and each output's predicted
/// noise with the switch's rounding added. The switch may add at most a sixteenth of the
/// larger of the output's own noise and half an integer unit of its accumulator (1/256 of
/// the variance): fewer bits would blur scores, more would only carry noise. Scores whose
/// accumulators are wide and exact (no bootstrap before them) keep up to 31 bits.
fn output_modulus(sigma: &[f64], delta: u64, reveal: Reveal) -> (u32, Vec<f64>) {
    let n = ParamSet::Message2Carry2KsPbsTuniform2m128
        .dims()
        .big_lwe_size()
        - 1;
    let half_unit = delta as f64 / POSITION as f64 / 2.0;
    // A label is an integer the client rounds (and refuses past a quarter unit): a switch noise
    // of a sixteenth of a unit (half a unit / 8) leaves it 4 sigma, and the label's own
    // noise is far below that.
    let div = if reveal == Reveal::Label { 8.0 } else { 16.0 };
    let target = sigma
        .iter()
        .map(|s| s.max(half_unit) / div)
        .fold(f64::INFINITY, f64::min);
    let bits = (MIN_OUTPUT_BITS..=MAX_OUTPUT_BITS)
        .find(|&b| switch_sigma_positions(b, n) <= target)
        .unwrap_or(MAX_OUTPUT_BITS);
    let extra = switch_sigma_positions(bits, n);
    let sigma = sigma
        .iter()
        .map(|s| (s * s + extra * extra).sqrt())
        .collect();
    (bits, sigma)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::{Lin, Lookup};
    use std::sync::Arc;

    /// A residual-style sum of two branches of bootstrap outputs: two large terms from node
    /// `big` and 64 terms 20 times smaller from node `small`. With 4-bit weights on bootstrap
    /// outputs the small branch rounds to zero as a whole: the report names it and warns;
    /// with 8-bit weights it stays.
    #[test]
    fn dropped_weights_are_reported_per_node() {
        let (n, small) = (66, 0.05);
        let lookups = (0..n)
            .map(|j| Lookup {
                input: Lin::atom(j as u32),
                func: Arc::new(UFn::Act(Activation::Relu, Arc::new(UFn::X))),
                grid: crate::graph::OutputGrid::Calibrated,
                origin: if j < 2 { "big" } else { "small" }.into(),
                decision: false,
                product: None,
            })
            .collect();
        let mut terms = vec![(n as u32, 1.0), (n as u32 + 1, 1.0)];
        terms.extend((n as u32 + 2..2 * n as u32).map(|a| (a, small)));
        let model = FloatModel {
            input_shape: vec![n],
            input_grids: vec![None; n],
            lookups,
            outputs: vec![
                Lin { terms, bias: 0.0 },
                Lin::combine(
                    [
                        (1.0, &Lin::atom(n as u32)),
                        (-1.0, &Lin::atom(n as u32 + 1)),
                    ],
                    0.0,
                ),
            ],
            tail: vec![],
            class_labels: None,
            task: Task::Regression,
            reveal: Reveal::Scores,
        };
        let rows: Vec<Vec<f64>> = (0..40)
            .map(|r| {
                (0..n)
                    .map(|j| ((r * 7 + j * 13) % 17) as f64 / 16.0)
                    .collect()
            })
            .collect();
        let cfg = |bits| QuantConfig {
            weight_bits: bits,
            search: false,
            ..QuantConfig::default()
        };
        let narrow = compile(&model, &rows, &cfg(4)).unwrap();
        let out = narrow
            .rounding
            .iter()
            .find(|r| r.node == "outputs")
            .unwrap();
        assert_eq!(out.forms, 2);
        // Every lookup spans [0, 1]: the small branch carries 64 * 0.05 of a 5.2 span.
        let expected = 64.0 * small / (2.0 + 64.0 * small);
        assert!(
            (out.dropped_weight - expected).abs() < 0.02,
            "{} vs {expected}",
            out.dropped_weight
        );
        assert!(out.rounding_error >= out.dropped_weight);
        assert_eq!(out.worst_branch, Some(("small".to_string(), 1.0)));
        let warning = out.warning().unwrap();
        assert!(
            warning.contains("'outputs'") && warning.contains("'small'"),
            "{warning}"
        );
        assert_eq!(narrow.summary()["warnings"].as_array().unwrap().len(), 1);

        let wide = compile(&model, &rows, &cfg(8)).unwrap();
        let out = wide.rounding.iter().find(|r| r.node == "outputs").unwrap();
        assert_eq!(out.dropped_weight, 0.0);
        assert!(out.rounding_error < 0.02, "{}", out.rounding_error);
        assert!(out.worst_branch.as_ref().is_some_and(|b| b.1 == 0.0));
        assert!(out.warning().is_none());
        assert!(wide.summary()["warnings"].as_array().unwrap().is_empty());
    }
}
