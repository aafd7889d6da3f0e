//! ai.onnx.ml tree ensembles (TreeEnsembleClassifier, TreeEnsembleRegressor) as lookups.
//!
//! Every distinct test `x_f <rule> t` of the whole ensemble is one decision lookup (1 when it
//! holds), shared by every node that asks it; `x > t` reuses the lookup of `x <= t`. A tree's
//! prediction is then a function of the tests on each path. Rather than one lookup per leaf,
//! a lookup reads a small integer that packs a subtree's tests as bits, `code = sum_i 2^i c_i`,
//! plus `2^m` times the number of tests on the path above it that hold; its table returns the
//! subtree's leaf value for each code when the whole path holds, and 0 otherwise. Reads stay
//! exact while the integer has at most 16 values, so a subtree of `m` tests under a path of
//! `d` tests is packed when `2^m (d + 1) <= 16`: a depth-2 tree is one lookup, a depth-3 tree
//! two. The leaf values are summed into the scores by the client's decryption, and the
//! post transform runs in the clear.

use std::collections::HashMap;

use super::super::symbolic::{Elem, GraphBuilder};
use super::{Inputs, NodeCtx};
use crate::error::Result;
use crate::graph::{Activation, AtomId, Grid, Lin, OutputGrid, Rule, TailOp, Task};
use crate::onnx::{Nd, NodeEffect, Tensor, Value};

/// Most values one exact read distinguishes (4 bits: the parameter set's own failure rate).
const EXACT_LEVELS: usize = 16;
/// Most nodes an ensemble may have (bounds import work and memory).
const MAX_NODES: usize = 1 << 20;

/// A literal on a path: a test's lookup, or its negation.
#[derive(Clone, Copy)]
struct Literal {
    atom: AtomId,
    negated: bool,
}

enum Node {
    Leaf(Vec<(usize, f64)>),
    Branch {
        /// The canonical test's lookup, and whether this node's rule negates it.
        test: AtomId,
        negated: bool,
        yes: usize,
        no: usize,
    },
}

struct Ensemble {
    nodes: Vec<Node>,
    roots: Vec<usize>,
}

impl NodeCtx<'_> {
    fn attr_strings(&self, name: &str) -> Option<Vec<String>> {
        self.attr(name).map(|a| {
            a.strings
                .iter()
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect()
        })
    }

    /// A float list given either as `name` or as the tensor `name_as_tensor` (ONNX-ML 3+).
    fn attr_values(&self, name: &str) -> Result<Option<Vec<f64>>> {
        if let Some(v) = self.attr_floats(name).filter(|v| !v.is_empty()) {
            return Ok(Some(v.iter().map(|&x| x as f64).collect()));
        }
        match self
            .attr(&format!("{name}_as_tensor"))
            .and_then(|a| a.t.as_ref())
        {
            Some(t) => Ok(Some(Tensor::from_proto(t)?.data)),
            None => Ok(None),
        }
    }
}

fn rule_of(ctx: &NodeCtx, mode: &str) -> Result<Option<Rule>> {
    Ok(Some(match mode {
        "LEAF" => return Ok(None),
        "BRANCH_LEQ" => Rule::Leq,
        "BRANCH_LT" => Rule::Lt,
        "BRANCH_GTE" => Rule::Geq,
        "BRANCH_GT" => Rule::Gt,
        "BRANCH_EQ" => Rule::Eq,
        "BRANCH_NEQ" => Rule::Neq,
        other => {
            return Err(ctx.unsupported(format!(
                "nodes_modes value '{other}' (LEAF and BRANCH_LEQ/LT/GTE/GT/EQ/NEQ are supported)"
            )));
        }
    }))
}

/// Reads the ensemble's structure and creates one decision lookup per distinct test.
fn read_ensemble(
    ctx: &NodeCtx,
    b: &mut GraphBuilder,
    x: &[Elem],
    prefix: &str,
    n_out: usize,
) -> Result<Ensemble> {
    let ints = |name: &str| -> Result<&[i64]> {
        ctx.attr_ints(name)
            .ok_or_else(|| ctx.unsupported(format!("no {name} attribute")))
    };
    let tree_ids = ints("nodes_treeids")?;
    let node_ids = ints("nodes_nodeids")?;
    let features = ints("nodes_featureids")?;
    let yes_ids = ints("nodes_truenodeids")?;
    let no_ids = ints("nodes_falsenodeids")?;
    let modes = ctx
        .attr_strings("nodes_modes")
        .ok_or_else(|| ctx.unsupported("no nodes_modes attribute"))?;
    let values = ctx.attr_values("nodes_values")?.unwrap_or_default();
    let n = tree_ids.len();
    if n == 0 || n > MAX_NODES {
        return Err(ctx.unsupported(format!("{n} nodes (1 to {MAX_NODES} are supported)")));
    }
    let lens = [
        node_ids.len(),
        features.len(),
        yes_ids.len(),
        no_ids.len(),
        modes.len(),
        values.len(),
    ];
    if lens.iter().any(|&l| l != n) {
        return Err(ctx.unsupported(format!(
            "node attributes of different lengths ({n} tree ids; node ids, features, true ids, false ids, modes, values: {lens:?})"
        )));
    }
    if let Some(h) = ctx.attr_floats("nodes_hitrates").filter(|h| h.len() > n) {
        return Err(ctx.unsupported(format!("{} hit rates for {n} nodes", h.len())));
    }
    let mut index: HashMap<(i64, i64), usize> = HashMap::with_capacity(n);
    for i in 0..n {
        if index.insert((tree_ids[i], node_ids[i]), i).is_some() {
            return Err(ctx.unsupported(format!(
                "node {} of tree {} is defined twice",
                node_ids[i], tree_ids[i]
            )));
        }
    }

    // Leaf weights.
    let w_tree = ints(&format!("{prefix}_treeids"))?;
    let w_node = ints(&format!("{prefix}_nodeids"))?;
    let w_id = ints(&format!("{prefix}_ids"))?;
    let w_val = ctx
        .attr_values(&format!("{prefix}_weights"))?
        .unwrap_or_default();
    if [w_node.len(), w_id.len(), w_val.len()]
        .iter()
        .any(|&l| l != w_tree.len())
    {
        return Err(ctx.unsupported(format!("{prefix}_* attributes of different lengths")));
    }
    let mut leaf_weights: Vec<Vec<(usize, f64)>> = vec![Vec::new(); n];
    for j in 0..w_tree.len() {
        let Some(&i) = index.get(&(w_tree[j], w_node[j])) else {
            return Err(ctx.unsupported(format!(
                "a weight for node {} of tree {}, which does not exist",
                w_node[j], w_tree[j]
            )));
        };
        let k = usize::try_from(w_id[j])
            .ok()
            .filter(|&k| k < n_out)
            .ok_or_else(|| {
                ctx.unsupported(format!(
                    "{prefix}_ids value {} for {n_out} outputs",
                    w_id[j]
                ))
            })?;
        if !w_val[j].is_finite() {
            return Err(ctx.unsupported("a leaf weight is not finite"));
        }
        leaf_weights[i].push((k, w_val[j]));
    }

    // One lookup per distinct canonical test.
    let mut tests: HashMap<(usize, Rule, u32), AtomId> = HashMap::new();
    let one_bit = OutputGrid::Fixed(Grid {
        scale: 1.0,
        zero: 0,
        qmin: 0,
        qmax: 1,
    });
    let mut nodes = Vec::with_capacity(n);
    let mut is_child = vec![false; n];
    for i in 0..n {
        let Some(rule) = rule_of(ctx, &modes[i])? else {
            nodes.push(Node::Leaf(std::mem::take(&mut leaf_weights[i])));
            continue;
        };
        let child = |id: i64| {
            index.get(&(tree_ids[i], id)).copied().ok_or_else(|| {
                ctx.unsupported(format!(
                    "node {} of tree {} points to node {id}, which does not exist",
                    node_ids[i], tree_ids[i]
                ))
            })
        };
        let (yes, no) = (child(yes_ids[i])?, child(no_ids[i])?);
        is_child[yes] = true;
        is_child[no] = true;
        let f = usize::try_from(features[i])
            .ok()
            .filter(|&f| f < x.len())
            .ok_or_else(|| {
                ctx.unsupported(format!(
                    "feature index {} for {} features",
                    features[i],
                    x.len()
                ))
            })?;
        let threshold = values[i] as f32;
        if !threshold.is_finite() {
            return Err(ctx.unsupported("a threshold is not finite"));
        }
        let (canonical, negated) = rule.canonical();
        let key = (f, canonical, threshold.to_bits());
        let test = match tests.get(&key) {
            Some(&a) => a,
            None => {
                let e = b.decision(
                    (*x[f].lin).clone(),
                    Activation::Compare {
                        rule: canonical,
                        threshold: threshold as f64,
                    },
                    one_bit.clone(),
                    ctx.name,
                );
                // A test on a constant folds; keep it as a constant literal below.
                let a = e
                    .lin
                    .as_atom()
                    .unwrap_or(AtomId::MAX - u32::from(e.lin.bias != 0.0));
                tests.insert(key, a);
                a
            }
        };
        nodes.push(Node::Branch {
            test,
            negated,
            yes,
            no,
        });
    }
    let roots: Vec<usize> = (0..n).filter(|&i| !is_child[i]).collect();
    let mut trees: Vec<i64> = roots.iter().map(|&r| tree_ids[r]).collect();
    trees.sort_unstable();
    trees.dedup();
    if trees.len() != roots.len() {
        return Err(ctx.unsupported("a tree has more than one root"));
    }
    let mut all_trees: Vec<i64> = tree_ids.to_vec();
    all_trees.sort_unstable();
    all_trees.dedup();
    if all_trees.len() != roots.len() {
        return Err(ctx.unsupported("a tree has no root (its nodes form a cycle)"));
    }
    let ens = Ensemble { nodes, roots };
    // Every node must be reached exactly once from its root (no cycles, no sharing).
    let mut seen = vec![false; n];
    for &r in &ens.roots {
        let mut stack = vec![r];
        while let Some(i) = stack.pop() {
            if std::mem::replace(&mut seen[i], true) {
                return Err(
                    ctx.unsupported("a tree node is reached twice (a cycle or a shared node)")
                );
            }
            if let Node::Branch { yes, no, .. } = ens.nodes[i] {
                stack.push(yes);
                stack.push(no);
            }
        }
    }
    Ok(ens)
}

/// The value of a literal's test when the test's lookup is a folded constant.
const TRUE_TEST: AtomId = AtomId::MAX - 1;
const FALSE_TEST: AtomId = AtomId::MAX;

impl Ensemble {
    fn branches(&self, i: usize) -> usize {
        match self.nodes[i] {
            Node::Leaf(_) => 0,
            Node::Branch { yes, no, .. } => 1 + self.branches(yes) + self.branches(no),
        }
    }

    /// The subtree's branch nodes in a fixed order (each one's bit in a packed code).
    fn collect_branches(&self, i: usize, out: &mut Vec<usize>) {
        if let Node::Branch { yes, no, .. } = self.nodes[i] {
            out.push(i);
            self.collect_branches(yes, out);
            self.collect_branches(no, out);
        }
    }

    /// The leaf a code's test outcomes lead to.
    fn leaf_for(&self, mut i: usize, bits: &[usize], code: usize) -> &[(usize, f64)] {
        loop {
            match &self.nodes[i] {
                Node::Leaf(w) => return w,
                Node::Branch {
                    negated, yes, no, ..
                } => {
                    let bit = bits
                        .iter()
                        .position(|&b| b == i)
                        .expect("a branch of the subtree");
                    let c = (code >> bit) & 1 == 1;
                    i = if c != *negated { *yes } else { *no };
                }
            }
        }
    }
}

/// Builds the lookups of one tree and adds its leaf values to `sums`.
struct Packer<'a> {
    origin: &'a str,
    ens: &'a Ensemble,
    n_out: usize,
    /// Outputs whose lookups are left out (their sum is implied by the others).
    skip: Option<usize>,
    group: u32,
    sums: Vec<Vec<(f64, Lin)>>,
    bias: Vec<f64>,
}

impl Packer<'_> {
    fn literal_lin(lits: &[Literal]) -> Lin {
        let mut terms = Vec::new();
        let mut bias = 0.0;
        for l in lits {
            match l.atom {
                TRUE_TEST => bias += f64::from(u8::from(!l.negated)),
                FALSE_TEST => bias += f64::from(u8::from(l.negated)),
                a if l.negated => {
                    bias += 1.0;
                    terms.push((-1.0, Lin::atom(a)));
                }
                a => terms.push((1.0, Lin::atom(a))),
            }
        }
        Lin::combine(terms.iter().map(|(k, l)| (*k, l)), bias)
    }

    fn cover(&mut self, b: &mut GraphBuilder, i: usize, path: Vec<Literal>) {
        let d = path.len();
        let m = self.ens.branches(i);
        if m <= 4 && (1usize << m) * (d + 1) <= EXACT_LEVELS {
            self.pack(b, i, &path, m);
            return;
        }
        let Node::Branch {
            test,
            negated,
            yes,
            no,
        } = self.ens.nodes[i]
        else {
            unreachable!("a leaf always packs: 1 * (d + 1) <= 16 since paths are cut at 15");
        };
        let mut path = path;
        if d + 1 >= EXACT_LEVELS - 1 {
            // Too long a path for one exact read: replace it by one test that all of it holds.
            let reached = b.decision(
                Self::literal_lin(&path),
                Activation::Select {
                    base: d as i64,
                    table: vec![1.0],
                },
                OutputGrid::Fixed(Grid {
                    scale: 1.0,
                    zero: 0,
                    qmin: 0,
                    qmax: 1,
                }),
                self.origin,
            );
            path = vec![Literal {
                atom: reached.lin.as_atom().unwrap_or(if reached.lin.bias != 0.0 {
                    TRUE_TEST
                } else {
                    FALSE_TEST
                }),
                negated: false,
            }];
        }
        let mut yes_path = path.clone();
        yes_path.push(Literal {
            atom: test,
            negated,
        });
        self.cover(b, yes, yes_path);
        path.push(Literal {
            atom: test,
            negated: !negated,
        });
        self.cover(b, no, path);
    }

    /// One lookup per output for the subtree at `i` under `path`.
    fn pack(&mut self, b: &mut GraphBuilder, i: usize, path: &[Literal], m: usize) {
        let mut bits = Vec::with_capacity(m);
        self.ens.collect_branches(i, &mut bits);
        let w = 1usize << m;
        let mut form = Lin::combine([(w as f64, &Self::literal_lin(path))], 0.0);
        for (bit, &node) in bits.iter().enumerate() {
            let Node::Branch { test, .. } = self.ens.nodes[node] else {
                unreachable!()
            };
            let c = Self::literal_lin(&[Literal {
                atom: test,
                negated: false,
            }]);
            form = Lin::combine([(1.0, &form), ((1usize << bit) as f64, &c)], 0.0);
        }
        for k in 0..self.n_out {
            let table: Vec<f64> = (0..w)
                .map(|code| {
                    self.ens
                        .leaf_for(i, &bits, code)
                        .iter()
                        .filter(|e| e.0 == k)
                        .map(|e| e.1)
                        .sum()
                })
                .collect();
            if table.iter().all(|&v| v == 0.0) || self.skip == Some(k) {
                continue;
            }
            let base = (w * path.len()) as i64;
            if form.is_constant() {
                let s = form.bias.round() as i64 - base;
                self.bias[k] += usize::try_from(s)
                    .ok()
                    .and_then(|s| table.get(s))
                    .copied()
                    .unwrap_or(0.0);
                continue;
            }
            let e = b.decision(
                form.clone(),
                Activation::Select { base, table },
                OutputGrid::Summed(self.group),
                self.origin,
            );
            self.sums[k].push((1.0, (*e.lin).clone()));
        }
    }
}

/// Whether the leaves a sample reaches weight output `k` (0 included): in every sample (some
/// tree weights it on every leaf), in none, or in some only. onnxruntime's output depends on
/// it per sample.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Presence {
    Always,
    Never,
    Varies,
}

fn presence(ens: &Ensemble, k: usize) -> Presence {
    let (mut any, mut always) = (false, false);
    for &r in &ens.roots {
        let (mut with, mut without) = (false, false);
        let mut stack = vec![r];
        while let Some(i) = stack.pop() {
            match &ens.nodes[i] {
                Node::Branch { yes, no, .. } => stack.extend([*yes, *no]),
                Node::Leaf(w) if w.iter().any(|e| e.0 == k) => with = true,
                Node::Leaf(_) => without = true,
            }
        }
        any |= with;
        always |= with && !without;
    }
    match (always, any) {
        (true, _) => Presence::Always,
        (false, true) => Presence::Varies,
        (false, false) => Presence::Never,
    }
}

/// ONNX-ML post transforms as clear-text tail ops on two or more scores.
fn post_ops(ctx: &NodeCtx, post: &str) -> Result<Vec<TailOp>> {
    Ok(match post {
        "NONE" => vec![],
        "LOGISTIC" => vec![TailOp::Activation(Activation::Sigmoid)],
        "SOFTMAX" => vec![TailOp::Softmax],
        "SOFTMAX_ZERO" => vec![TailOp::SoftmaxZero],
        "PROBIT" => vec![TailOp::Activation(Activation::Probit)],
        other => {
            return Err(ctx.unsupported(format!(
                "post_transform={other} (NONE, LOGISTIC, SOFTMAX, SOFTMAX_ZERO and PROBIT are supported)"
            )));
        }
    })
}

/// TreeEnsembleClassifier and TreeEnsembleRegressor.
pub(crate) fn tree_ensemble(
    ctx: &NodeCtx,
    b: &mut GraphBuilder,
    inputs: &Inputs,
) -> Result<NodeEffect> {
    let x = inputs.dynamic(ctx, 0)?;
    if x.dims.len() != 2 {
        return Err(ctx.unsupported(format!("input of shape {:?}; flatten it first", x.dims)));
    }
    let classifier = ctx.node.op_type == "TreeEnsembleClassifier";
    let prefix = if classifier { "class" } else { "target" };
    // String labels (an iris model's species names) become class indices, in the order the
    // exporter lists them: the client's predicted class is that index.
    let names = ctx
        .attr_strings("classlabels_strings")
        .filter(|v| !v.is_empty());
    let labels: Option<Vec<i64>> = match (classifier, names) {
        (false, _) => None,
        (true, Some(names)) => Some((0..names.len() as i64).collect()),
        (true, None) => Some(
            ctx.attr_ints("classlabels_int64s")
                .filter(|v| !v.is_empty())
                .ok_or_else(|| ctx.unsupported("no classlabels_int64s or classlabels_strings"))?
                .to_vec(),
        ),
    };
    let n_out = match &labels {
        Some(l) => l.len(),
        None => usize::try_from(ctx.attr_i("n_targets", 1))
            .ok()
            .filter(|&t| (1..=4096).contains(&t))
            .ok_or_else(|| ctx.unsupported("n_targets out of range"))?,
    };
    if classifier && n_out < 2 {
        return Err(ctx.unsupported(format!(
            "{n_out} class label; a classifier needs two or more"
        )));
    }
    let post = ctx
        .attr_str("post_transform")
        .unwrap_or_else(|| "NONE".into());
    let average = match ctx.attr_str("aggregate_function").as_deref() {
        None | Some("SUM") => false,
        Some("AVERAGE") if !classifier => true,
        Some(other) => {
            return Err(ctx.unsupported(format!(
                "aggregate_function={other} (SUM and AVERAGE are supported)"
            )));
        }
    };
    let base_values = ctx.attr_values("base_values")?.unwrap_or_default();
    if base_values.iter().any(|v| !v.is_finite()) {
        return Err(ctx.unsupported("a base value is not finite"));
    }
    let ens = read_ensemble(ctx, b, &x.data, prefix, n_out)?;

    // When every tree's leaves spread the same total over the outputs (a random forest's
    // class probabilities), the last output is that total minus the others: no lookups.
    let leaf_totals = |i: usize| match &ens.nodes[i] {
        Node::Leaf(w) => Some(w.iter().map(|e| e.1).sum::<f64>()),
        Node::Branch { .. } => None,
    };
    let mut tree_totals = Vec::with_capacity(ens.roots.len());
    let mut constant_total = n_out >= 2;
    for &r in &ens.roots {
        let mut stack = vec![r];
        let mut total: Option<f64> = None;
        while let Some(i) = stack.pop() {
            match &ens.nodes[i] {
                Node::Branch { yes, no, .. } => stack.extend([*yes, *no]),
                Node::Leaf(_) => {
                    let t = leaf_totals(i).unwrap_or(0.0);
                    match total {
                        None => total = Some(t),
                        Some(u) if (u - t).abs() <= 1e-6 * u.abs().max(1.0) => {}
                        Some(_) => constant_total = false,
                    }
                }
            }
        }
        tree_totals.push(total.unwrap_or(0.0));
    }
    let skip = constant_total.then_some(n_out - 1);
    let mut packer = Packer {
        origin: ctx.name,
        ens: &ens,
        n_out,
        skip,
        group: b.new_tie_group(),
        sums: vec![Vec::new(); n_out],
        bias: vec![0.0; n_out],
    };
    for &r in &ens.roots {
        packer.cover(b, r, Vec::new());
    }
    let scale = if average {
        1.0 / ens.roots.len() as f64
    } else {
        1.0
    };
    let mut sums: Vec<Lin> = packer
        .sums
        .iter()
        .zip(&packer.bias)
        .map(|(parts, &bias)| Lin::combine(parts.iter().map(|(k, l)| (k * scale, l)), bias * scale))
        .collect();
    if let Some(last) = skip {
        let others: Vec<Lin> = sums[..last].to_vec();
        let total: f64 = tree_totals.iter().sum::<f64>() * scale;
        sums[last] = Lin::combine(others.iter().map(|l| (-1.0, l)), total);
    }
    let elem = |l: Lin| Elem::linear(l);
    let add = |l: &Lin, c: f64| Lin::combine([(1.0, l)], c);

    if !classifier {
        b.task = Task::Regression;
        // onnxruntime writes 0, not the base value, for a target no reached leaf weights; that
        // is not a linear function of the tests, so such an ensemble is refused.
        for (k, &base) in base_values.iter().enumerate() {
            if base != 0.0 && presence(&ens, k) == Presence::Varies {
                return Err(ctx.unsupported(format!(
                    "target {k} has a base value and leaves of one tree both with and without a weight for it \
                     (onnxruntime then drops the base value in some samples); give every leaf a weight, 0 included"
                )));
            }
        }
        // onnxruntime adds base values per target when there is one per target, or the one
        // base value to a single target; a single target takes only PROBIT.
        let scores: Vec<Lin> = if base_values.len() == n_out {
            sums.iter()
                .zip(&base_values)
                .map(|(s, &c)| add(s, c))
                .collect()
        } else if n_out == 1 && base_values.len() == 1 {
            vec![add(&sums[0], base_values[0])]
        } else if base_values.is_empty() {
            sums
        } else {
            return Err(ctx.unsupported(format!(
                "{} base values for {n_out} targets",
                base_values.len()
            )));
        };
        let ops = if n_out == 1 {
            match post.as_str() {
                "PROBIT" => vec![TailOp::Activation(Activation::Probit)],
                _ => {
                    post_ops(ctx, &post)?;
                    vec![]
                }
            }
        } else {
            post_ops(ctx, &post)?
        };
        let t = Nd {
            dims: vec![1, scores.len()],
            data: scores.into_iter().map(elem).collect(),
        };
        return Ok(if ops.is_empty() {
            NodeEffect::Values(vec![Value::Dyn(t)])
        } else {
            NodeEffect::StartTail {
                scores: t,
                ops,
                class_labels: None,
            }
        });
    }

    // Classifier: onnxruntime's scores, case by case (its TreeAggregatorClassifier).
    let mut ops = Vec::new();
    let scores: Vec<Lin> = if n_out > 2 {
        if base_values.len() > n_out {
            return Err(ctx.unsupported(format!(
                "{} base values for {n_out} classes",
                base_values.len()
            )));
        }
        ops.extend(post_ops(ctx, &post)?);
        (0..n_out)
            .map(|k| add(&sums[k], base_values.get(k).copied().unwrap_or(0.0)))
            .collect()
    } else {
        // onnxruntime writes 0 for a class no reached leaf weights, base value or not, and
        // writes one score instead of two when no reached leaf weights class 1: both are
        // decided per sample, so they must not vary between samples.
        let (p0, p1) = (presence(&ens, 0), presence(&ens, 1));
        if p1 == Presence::Varies {
            return Err(ctx.unsupported(
                "class 1 is weighted by the leaves some samples reach and not by others \
                 (onnxruntime then writes [s0, s1] for some samples and a score pair derived from s0 for others); \
                 give class 1 a weight, 0 included, on every leaf of one tree, or on none",
            ));
        }
        if p0 == Presence::Varies && !base_values.is_empty() {
            return Err(ctx.unsupported(
                "base values with class 0 weighted by the leaves some samples reach and not by others \
                 (onnxruntime then drops the base value in some samples); give every leaf a class-0 weight, 0 included",
            ));
        }
        let (h0, h1) = (p0 == Presence::Always, p1 == Presence::Always);
        let zero = Lin::constant(0.0);
        let base = |k: usize| base_values[k];
        let two: Option<Vec<Lin>> = match (base_values.len(), h1) {
            // onnxruntime's score for class 1 is then class 0's sum plus base value 1.
            (2, true) => {
                let pos = add(&sums[0], base(1));
                let neg = if h0 { pos.scaled(-1.0, 0.0) } else { zero };
                Some(vec![neg, pos])
            }
            (2, false) => Some(vec![
                if h0 {
                    add(&sums[0], base(0))
                } else {
                    zero.clone()
                },
                zero,
            ]),
            (1, true) => Some(vec![
                if h0 { add(&sums[0], base(0)) } else { zero },
                sums[1].clone(),
            ]),
            (1, false) if !h0 => {
                return Err(ctx.unsupported(
                    "a base value and no leaf weight for either class (onnxruntime leaves the second score unwritten)",
                ));
            }
            (1, false) => {
                sums[0] = add(&sums[0], base(0));
                None
            }
            (0, true) => Some(sums.clone()),
            (0, false) => None,
            (n, _) => return Err(ctx.unsupported(format!("{n} base values for 2 classes"))),
        };
        match two {
            Some(s) => {
                ops.extend(post_ops(ctx, &post)?);
                s
            }
            None => {
                // One score `s`: onnxruntime writes [1 - s, s] when only class 0 has weights and
                // every weight is positive (a probability), else [-s, s] (logistic of each under
                // LOGISTIC; SOFTMAX and SOFTMAX_ZERO leave the pair as it is).
                let binary_case = p0 != Presence::Never;
                let all_positive = ens.nodes.iter().all(|n| match n {
                    Node::Leaf(w) => w.iter().all(|e| e.1 >= 0.0),
                    Node::Branch { .. } => true,
                });
                match post.as_str() {
                    "PROBIT" => {
                        return Err(ctx.unsupported(
                            "post_transform=PROBIT on one binary score (onnxruntime writes the first of two scores only)",
                        ));
                    }
                    _ if binary_case && all_positive => ops.push(TailOp::BinaryProbabilities),
                    "LOGISTIC" => {
                        ops.push(TailOp::BinaryScores);
                        ops.push(TailOp::Activation(Activation::Sigmoid));
                    }
                    _ => {
                        post_ops(ctx, &post)?;
                        ops.push(TailOp::BinaryScores);
                    }
                }
                vec![sums[0].clone()]
            }
        }
    };
    Ok(NodeEffect::StartTail {
        scores: Nd {
            dims: vec![1, scores.len()],
            data: scores.into_iter().map(elem).collect(),
        },
        ops,
        class_labels: labels,
    })
}

/// LinearRegressor: `y_t = sum_i coefficients[t, i] x_i + intercepts[t]`.
pub(crate) fn linear_regressor(
    ctx: &NodeCtx,
    b: &mut GraphBuilder,
    x: &[Elem],
) -> Result<NodeEffect> {
    let n = x.len();
    let targets = usize::try_from(ctx.attr_i("targets", 1))
        .ok()
        .filter(|&t| (1..=4096).contains(&t))
        .ok_or_else(|| ctx.unsupported("targets out of range"))?;
    let coefs = ctx
        .attr_floats("coefficients")
        .ok_or_else(|| ctx.unsupported("no coefficients"))?;
    if coefs.len() != targets * n {
        return Err(ctx.unsupported(format!(
            "{} coefficients for {targets} targets of {n} features",
            coefs.len()
        )));
    }
    let intercepts: Vec<f64> = match ctx.attr_floats("intercepts") {
        None => vec![0.0; targets],
        Some(v) if v.len() == targets => v.iter().map(|&c| c as f64).collect(),
        Some(v) => {
            return Err(ctx.unsupported(format!("{} intercepts for {targets} targets", v.len())));
        }
    };
    b.task = Task::Regression;
    let data = (0..targets)
        .map(|t| {
            Elem::linear(Lin::combine(
                (0..n).map(|i| (coefs[t * n + i] as f64, &*x[i].lin)),
                intercepts[t],
            ))
        })
        .collect();
    let t = Nd {
        dims: vec![1, targets],
        data,
    };
    let post = ctx
        .attr_str("post_transform")
        .unwrap_or_else(|| "NONE".into());
    Ok(match post.as_str() {
        "NONE" => NodeEffect::Values(vec![Value::Dyn(t)]),
        other => NodeEffect::StartTail {
            scores: t,
            ops: post_ops(ctx, other)?,
            class_labels: None,
        },
    })
}
