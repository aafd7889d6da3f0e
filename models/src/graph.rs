//! The float model the importer produces: a directed acyclic graph of *linear* values and
//! *lookups*.
//!
//! Every value is an [`Lin`], a sparse affine form over *atoms*. The atoms are the model's
//! input features and the outputs of [`Lookup`]s: one univariate function of one linear value,
//! which costs one programmable bootstrap under FHE. Linear ONNX ops (Gemm, Conv, pooling by
//! averages, residual Adds, Concat, Slice, ...) never create atoms: they combine forms, so
//! linear work composes for free. The model's outputs are linear forms the client decrypts.

use std::collections::HashMap;
use std::sync::Arc;

pub use veil_format::tail::{
    Activation, Grid, LABEL_ORIGIN, Reveal, Rule, TailOp, Task, apply_tail, predict_class,
    single_output_threshold,
};

/// An atom: an input feature (`0..n_inputs`) or a lookup (`n_inputs + i`).
pub type AtomId = u32;

/// A sparse affine form `sum_k w_k * atom_k + bias`; terms sorted by atom, no zero weights.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Lin {
    pub terms: Vec<(AtomId, f64)>,
    pub bias: f64,
}

impl Lin {
    pub fn constant(c: f64) -> Self {
        Lin {
            terms: Vec::new(),
            bias: c,
        }
    }

    pub fn atom(a: AtomId) -> Self {
        Lin {
            terms: vec![(a, 1.0)],
            bias: 0.0,
        }
    }

    /// `sum_i k_i * parts_i + bias`.
    pub fn combine<'a>(parts: impl IntoIterator<Item = (f64, &'a Lin)>, bias: f64) -> Lin {
        let mut acc: HashMap<AtomId, f64> = HashMap::new();
        let mut b = bias;
        for (k, lin) in parts {
            if k == 0.0 {
                continue;
            }
            b += k * lin.bias;
            for &(a, w) in &lin.terms {
                *acc.entry(a).or_insert(0.0) += k * w;
            }
        }
        let mut terms: Vec<(AtomId, f64)> = acc.into_iter().filter(|&(_, w)| w != 0.0).collect();
        terms.sort_unstable_by_key(|t| t.0);
        Lin { terms, bias: b }
    }

    pub fn scaled(&self, k: f64, offset: f64) -> Lin {
        if k == 0.0 {
            return Lin::constant(offset);
        }
        Lin {
            terms: self.terms.iter().map(|&(a, w)| (a, w * k)).collect(),
            bias: self.bias * k + offset,
        }
    }

    pub fn is_constant(&self) -> bool {
        self.terms.is_empty()
    }

    /// The atom this form is exactly (weight one, no bias), if any.
    pub fn as_atom(&self) -> Option<AtomId> {
        match self.terms.as_slice() {
            [(a, w)] if *w == 1.0 && self.bias == 0.0 => Some(*a),
            _ => None,
        }
    }

    pub fn eval(&self, atoms: &[f64]) -> f64 {
        self.terms
            .iter()
            .map(|&(a, w)| w * atoms[a as usize])
            .sum::<f64>()
            + self.bias
    }
}

/// A univariate function as an expression of its one input `X`: how element-wise subgraphs
/// (`x * sigmoid(x)`, erf-based GELU, chains of activations) become one lookup table.
#[derive(Clone, Debug, PartialEq)]
pub enum UFn {
    X,
    Const(f64),
    Act(Activation, Arc<UFn>),
    Add(Arc<UFn>, Arc<UFn>),
    Mul(Arc<UFn>, Arc<UFn>),
    Div(Arc<UFn>, Arc<UFn>),
    /// `k * f + c`.
    Affine(f64, f64, Arc<UFn>),
    /// `1` where `f >= t`, else `0` (the comparisons of a label-only output).
    AtLeast(f64, Arc<UFn>),
    /// The class index the client's tail would predict from one score (label-only output
    /// of a single-score classifier).
    Predict(Arc<[TailOp]>),
}

impl UFn {
    pub fn eval(&self, x: f64) -> f64 {
        match self {
            UFn::X => x,
            UFn::Const(c) => *c,
            UFn::Act(a, f) => a.apply(f.eval(x)),
            UFn::Add(f, g) => f.eval(x) + g.eval(x),
            UFn::Mul(f, g) => f.eval(x) * g.eval(x),
            UFn::Div(f, g) => {
                let d = g.eval(x);
                if d == 0.0 { 0.0 } else { f.eval(x) / d }
            }
            UFn::Affine(k, c, f) => k * f.eval(x) + c,
            UFn::AtLeast(t, f) => f64::from(u8::from(f.eval(x) >= *t)),
            UFn::Predict(tail) => {
                predict_class(&apply_tail(tail, vec![x]), single_output_threshold(tail)) as f64
            }
        }
    }

    /// The activation chain this function is, innermost first, when it is only that.
    pub fn as_chain(&self) -> Option<Vec<Activation>> {
        match self {
            UFn::X => Some(Vec::new()),
            UFn::Act(a, f) => {
                let mut c = f.as_chain()?;
                c.push(a.clone());
                Some(c)
            }
            _ => None,
        }
    }
}

/// How a lookup's output is quantized.
#[derive(Clone, Debug, PartialEq)]
pub enum OutputGrid {
    /// From the calibrated range, with the configured activation bits.
    Calibrated,
    /// From the calibrated range, with [`crate::quantize::ARITHMETIC_BITS`]: an intermediate of
    /// arithmetic between computed values (the quarter squares of a product, a normalization's
    /// squares and `1/sqrt(var)`), whose small differences carry the result.
    Arithmetic,
    /// Shared by every lookup of one tie group (the inputs of one MaxPool channel), so that
    /// differences between them are exact.
    Tied(u32),
    /// The grid of the atoms this lookup's input reads, with zero at 0: the `relu(b - a)` of a
    /// pairwise maximum is then exact when `a` and `b` share a grid.
    DifferenceOfInputs,
    /// Fixed by the model (a QuantizeLinear).
    Fixed(Grid),
    /// The shared grid of a label output's scores, [`LABEL_LEVELS`] levels from the lowest
    /// top score calibration saw to the highest score (with the range margin): only the top
    /// of the range decides an argmax. Lower scores clamp to level 0.
    LabelScores(u32),
    /// Shared by every lookup of one group whose outputs are only summed into the model's
    /// outputs (a tree ensemble's leaf values): a fine grid, since the client decrypts the
    /// sums with no bootstrap, and one scale, so that the sums keep unit weights.
    Summed(u32),
}

/// One univariate function of one linear value: one bootstrap per sample.
#[derive(Clone, Debug, PartialEq)]
pub struct Lookup {
    pub input: Lin,
    pub func: Arc<UFn>,
    pub grid: OutputGrid,
    /// The ONNX node that created it, for summaries and errors.
    pub origin: Arc<str>,
    /// The input is a small exact integer (a feature on its grid, a sum of tree tests) and the
    /// function is constant between integers, so the read must never be off by one: the plan
    /// spaces the integers 128 positions apart and reads each at a box centre.
    pub decision: bool,
    /// Set on the two quarter squares of a product of two computed values, which compile
    /// rebalances as a pair (`quantize::balance_products`).
    pub product: Option<ProductHalf>,
}

/// One of the two lookups `P = (a + b)^2`, `M = (a - b)^2` that read a product of two computed
/// values as `ab = (P - M) / 4`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProductHalf {
    /// Shared by the two halves of one product.
    pub pair: u32,
    /// `P` (true) or `M` (false).
    pub plus: bool,
}

/// The float model: inputs, lookups in topological order, linear outputs, clear-text tail.
#[derive(Clone, Debug, PartialEq)]
pub struct FloatModel {
    /// Shape of one sample, without the batch dimension (e.g. `[64]` or `[1, 8, 8]`).
    pub input_shape: Vec<usize>,
    /// Grids the model fixes on input features (QDQ models); the client quantizes on them.
    pub input_grids: Vec<Option<Grid>>,
    /// Lookup `i` is atom `n_features() + i`; its input reads only earlier atoms.
    pub lookups: Vec<Lookup>,
    pub outputs: Vec<Lin>,
    pub tail: Vec<TailOp>,
    /// The label of each output class, when the exporter recorded them.
    pub class_labels: Option<Vec<i64>>,
    pub task: Task,
    /// What the client's decrypted outputs reveal (see [`FloatModel::with_reveal`]).
    pub reveal: Reveal,
}

impl FloatModel {
    pub fn n_features(&self) -> usize {
        self.input_shape.iter().product()
    }

    pub fn n_scores(&self) -> usize {
        self.outputs.len()
    }

    pub fn n_atoms(&self) -> usize {
        self.n_features() + self.lookups.len()
    }

    /// Every atom's value for one sample.
    pub fn atoms(&self, x: &[f64]) -> Vec<f64> {
        let mut v = Vec::with_capacity(self.n_atoms());
        v.extend(x.iter().zip(&self.input_grids).map(|(&x, g)| match g {
            Some(g) => g.fake_quant(x),
            None => x,
        }));
        for l in &self.lookups {
            let y = l.func.eval(l.input.eval(&v));
            v.push(y);
        }
        v
    }

    /// Runs the float model up to the scores (the linear outputs).
    pub fn scores(&self, x: &[f64]) -> Vec<f64> {
        let atoms = self.atoms(x);
        self.outputs.iter().map(|o| o.eval(&atoms)).collect()
    }

    /// Runs the full float model, tail included: what the exported model outputs.
    pub fn outputs(&self, x: &[f64]) -> Vec<f64> {
        apply_tail(&self.tail, self.scores(x))
    }

    /// Stage of each atom: 0 for inputs, `1 + max stage of its input's atoms` for lookups.
    pub fn stages(&self) -> Vec<usize> {
        let nf = self.n_features();
        let mut st = vec![0usize; self.n_atoms()];
        for (i, l) in self.lookups.iter().enumerate() {
            st[nf + i] = 1 + l
                .input
                .terms
                .iter()
                .map(|&(a, _)| st[a as usize])
                .max()
                .unwrap_or(0);
        }
        st
    }

    /// Drops lookups that no output reads (left behind when activations fuse), renumbering.
    pub fn prune(&mut self) {
        let nf = self.n_features();
        let mut live = vec![false; self.n_atoms()];
        for o in &self.outputs {
            o.terms.iter().for_each(|&(a, _)| live[a as usize] = true);
        }
        for i in (0..self.lookups.len()).rev() {
            if live[nf + i] {
                for &(a, _) in &self.lookups[i].input.terms {
                    live[a as usize] = true;
                }
            }
        }
        let mut map: Vec<AtomId> = (0..nf as AtomId).collect();
        let mut next = nf as AtomId;
        for i in 0..self.lookups.len() {
            map.push(next);
            if live[nf + i] {
                next += 1;
            }
        }
        let remap = |lin: &mut Lin| lin.terms.iter_mut().for_each(|t| t.0 = map[t.0 as usize]);
        let old = std::mem::take(&mut self.lookups);
        for (i, mut l) in old.into_iter().enumerate() {
            if live[nf + i] {
                remap(&mut l.input);
                self.lookups.push(l);
            }
        }
        self.outputs.iter_mut().for_each(remap);
    }
}

/// Whether an element-wise tail function never reverses the scores' order (it may tie them).
fn keeps_weak_order(a: &Activation) -> bool {
    use Activation as A;
    keeps_order(&TailOp::Activation(a.clone()))
        || match *a {
            A::Relu | A::Clip { .. } | A::Floor | A::Ceil | A::Round | A::Sign => true,
            A::HardSigmoid { alpha, .. } => alpha >= 0.0,
            A::ThresholdedRelu { alpha } => alpha >= 0.0,
            A::FakeQuant(g) => g.scale > 0.0,
            _ => false,
        }
}

/// Whether a tail op keeps the strict order of the scores (so the argmax of the scores is the
/// argmax of the model's outputs).
fn keeps_order(op: &TailOp) -> bool {
    use Activation as A;
    match op {
        TailOp::Softmax | TailOp::BinaryScores | TailOp::BinaryProbabilities => true,
        // Zero scores stay 0 while negative ones become positive probabilities.
        TailOp::SoftmaxZero => false,
        TailOp::Activation(a) => match *a {
            A::Sigmoid | A::Tanh | A::Softplus | A::Softsign | A::Exp | A::Erf | A::Probit => true,
            A::LeakyRelu { alpha } | A::Elu { alpha } | A::Celu { alpha } => alpha > 0.0,
            A::Selu { alpha, gamma } => alpha > 0.0 && gamma > 0.0,
            A::PRelu { slope } => slope > 0.0,
            _ => false,
        },
    }
}

impl FloatModel {
    /// The same classifier with the given reveal mode. `Label` appends the argmax as lookups
    /// on the scores, so the one output decrypts to the predicted class index.
    ///
    /// Each score is read once onto one shared grid of [`LABEL_LEVELS`] levels
    /// ([`OutputGrid::LabelScores`], calibrated on the top scores), so that the difference of
    /// two scores is an exact multiple of one unit. A bracket of pairwise matches then finds
    /// the largest score: a match of `a` (lower indices) and `b` reads `d = b - a` twice,
    /// `w = [d > 0]` and `relu(d)` (its grid the scores', as in a MaxPool's pairwise maximum),
    /// then the winner's score `a + relu(d)` once more, so that the next round reads an atom
    /// again. These comparisons are ordinary approximate reads, like any activation: a misread
    /// needs scores within read noise of each other, where either class is as good.
    ///
    /// The encoding of the winner is exact. Its index is carried as bits; a bit that differs
    /// inside both halves is chosen by one lookup of `bit_a + 2 bit_b + 4 w` (a decision, read
    /// exactly: `w` is 0 or 1 whatever its input read). The output is
    /// `sum_j 2^j bit_j + 2^n [w + w' != 1]` with exact unit weights on lookups of four bits
    /// each, where `w' = [a - b >= 0]` reads the final match again on the negated difference:
    /// when the two reads disagree (a near-tie misread) the output lies outside `[0, 2^n)`,
    /// which
    /// [`crate::eval::decode_label`] refuses. A single score is one lookup of the tail's own
    /// decision (and its complement for the check). Compile refuses a label model whose bit
    /// lookups or output weights cannot be exact.
    pub fn with_reveal(mut self, reveal: Reveal) -> crate::Result<FloatModel> {
        if reveal == Reveal::Scores || self.reveal == Reveal::Label {
            return Ok(self);
        }
        let k = self.outputs.len();
        let bit = bit_grid();
        let push = label_lookup;
        let x = Arc::new(UFn::X);
        let outputs = std::mem::take(&mut self.outputs);
        let (bits, check) = if k == 1 {
            let tail: Arc<[TailOp]> = self.tail.clone().into();
            let p = Arc::new(UFn::Predict(tail));
            let b = push(
                &mut self,
                outputs[0].clone(),
                UFn::Affine(1.0, 0.0, p.clone()),
                bit.clone(),
                false,
            );
            let nb = push(
                &mut self,
                outputs[0].clone(),
                UFn::Affine(-1.0, 1.0, p),
                bit.clone(),
                false,
            );
            let check = Lin::combine([(1.0, &b), (1.0, &nb)], -1.0);
            (vec![b], check)
        } else {
            // The tail's element-wise functions, which may tie scores (a final QuantizeLinear
            // pair, a ReLU), go into the grid read, so ties break as the client's argmax
            // breaks them; strictly increasing ones and Softmax after them change nothing.
            let mut f = x.clone();
            if let Some(last) = self.tail.iter().rposition(|op| !keeps_order(op)) {
                for op in &self.tail[..=last] {
                    match op {
                        TailOp::Activation(a) if keeps_weak_order(a) => {
                            f = Arc::new(UFn::Act(a.clone(), f));
                        }
                        _ => {
                            return Err(crate::ModelError::Plan(format!(
                                "a label output needs a tail that keeps the scores' order; \
                                 {op:?} does not"
                            )));
                        }
                    }
                }
            }
            let n_bits = usize::BITS - (k - 1).leading_zeros();
            let leaves: Vec<Node> = outputs
                .iter()
                .enumerate()
                .map(|(i, o)| Node {
                    level: push(
                        &mut self,
                        o.clone(),
                        (*f).clone(),
                        OutputGrid::LabelScores(0),
                        false,
                    ),
                    bits: (0..n_bits)
                        .map(|j| Lin::constant(((i >> j) & 1) as f64))
                        .collect(),
                })
                .collect();
            let (a, b) = bracket(&mut self, &leaves);
            // The final match: its winner's bits, and the check.
            let d = Lin::combine([(1.0, &b.level), (-1.0, &a.level)], 0.0);
            let w = push(
                &mut self,
                d.clone(),
                compare_zero(Rule::Gt),
                bit.clone(),
                false,
            );
            let w2 = push(
                &mut self,
                d.scaled(-1.0, 0.0),
                compare_zero(Rule::Geq),
                bit.clone(),
                false,
            );
            let bits = choose_bits(&mut self, &a, &b, &w);
            (bits, Lin::combine([(1.0, &w), (1.0, &w2)], -1.0))
        };
        // The output reads few bootstraps, each already at its weight on a unit grid, so that
        // it sums them with unit weights at the output's torus scale: one lookup per four index
        // bits (`2^4g` times their 16-value nibble, read exactly) and one of the check,
        // `2^n [w + w' != 1]`. Each summed bootstrap adds its output noise, and a weight would
        // multiply it (eight bits with weights up to 2^7 left the sum a third of a unit off).
        let n = bits.len();
        let mut parts: Vec<Lin> = bits
            .chunks(4)
            .enumerate()
            .map(|(g, chunk)| {
                let terms: Vec<(f64, &Lin)> = chunk
                    .iter()
                    .enumerate()
                    .map(|(j, b)| ((1u64 << j) as f64, b))
                    .collect();
                let w = (1i64 << (4 * g)) as f64;
                let top = w as i64 * ((1 << chunk.len()) - 1);
                let f = UFn::Affine(w, 0.0, x.clone());
                label_lookup(&mut self, Lin::combine(terms, 0.0), f, unit_grid(top), true)
            })
            .collect();
        let wc = 1i64 << n;
        let table = vec![wc as f64, 0.0, wc as f64];
        let f = UFn::Act(Activation::Select { base: 0, table }, x.clone());
        // `check` is `w + w' - 1`: the lookup reads `w + w'` (0, 1 or 2).
        parts.push(label_lookup(
            &mut self,
            check.scaled(1.0, 1.0),
            f,
            unit_grid(wc),
            true,
        ));
        let parts: Vec<(f64, &Lin)> = parts.iter().map(|p| (1.0, p)).collect();
        self.outputs = vec![Lin::combine(parts, 0.0)];
        // The client bounds the index by the classes, which catches a check of +1.
        self.class_labels
            .get_or_insert_with(|| (0..k.max(2) as i64).collect());
        self.tail = Vec::new();
        self.reveal = Reveal::Label;
        Ok(self)
    }
}

/// Bits of the shared grid a label model reads its scores onto: fine, so that only scores
/// within a fraction of a percent of the top scores' range can tie or swap.
pub const LABEL_BITS: u32 = 8;

/// Levels of the label scores' grid, `2^LABEL_BITS`.
pub const LABEL_LEVELS: i64 = 1 << LABEL_BITS;

/// A bracket entry: its winner's level (an atom) and index bits (constants or 0/1 forms).
#[derive(Clone)]
struct Node {
    level: Lin,
    bits: Vec<Lin>,
}

/// Appends one lookup of the argmax; returns its atom.
fn label_lookup(
    m: &mut FloatModel,
    input: Lin,
    func: UFn,
    grid: OutputGrid,
    decision: bool,
) -> Lin {
    m.lookups.push(Lookup {
        input,
        func: Arc::new(func),
        grid,
        origin: LABEL_ORIGIN.into(),
        decision,
        product: None,
    });
    Lin::atom((m.n_atoms() - 1) as AtomId)
}

/// The grid of the integers `0..=qmax`, unit scale: index bits, nibbles, the check.
fn unit_grid(qmax: i64) -> OutputGrid {
    OutputGrid::Fixed(Grid {
        scale: 1.0,
        zero: 0,
        qmin: 0,
        qmax,
    })
}

fn bit_grid() -> OutputGrid {
    unit_grid(1)
}

/// `[x > 0]` or `[x >= 0]`.
fn compare_zero(rule: Rule) -> UFn {
    UFn::Act(
        Activation::Compare {
            rule,
            threshold: 0.0,
        },
        Arc::new(UFn::X),
    )
}

/// The winner's bits of a match decided by `w` (1: `b` wins). A bit both sides know is a
/// linear form of `w`; otherwise one lookup of `bit_a + 2 bit_b + 4 w` (8 values).
fn choose_bits(m: &mut FloatModel, a: &Node, b: &Node, w: &Lin) -> Vec<Lin> {
    a.bits
        .iter()
        .zip(&b.bits)
        .map(|(x, y)| {
            if x.is_constant() && y.is_constant() {
                Lin::combine([(y.bias - x.bias, w)], x.bias)
            } else {
                let input = Lin::combine([(1.0, x), (2.0, y), (4.0, w)], 0.0);
                let table = vec![0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0];
                let func = UFn::Act(Activation::Select { base: 0, table }, Arc::new(UFn::X));
                label_lookup(m, input, func, bit_grid(), true)
            }
        })
        .collect()
}

/// Plays the bracket over `nodes` (consecutive classes) down to its final two entries; halves
/// split at a power of two, so that each half's high index bits stay constants.
fn bracket(m: &mut FloatModel, nodes: &[Node]) -> (Node, Node) {
    let mid = 1usize << (usize::BITS - 1 - (nodes.len() - 1).leading_zeros());
    (play(m, &nodes[..mid]), play(m, &nodes[mid..]))
}

/// The winner of `nodes`: its level read back onto the grid, its index bits.
fn play(m: &mut FloatModel, nodes: &[Node]) -> Node {
    if let [one] = nodes {
        return one.clone();
    }
    let (a, b) = bracket(m, nodes);
    let d = Lin::combine([(1.0, &b.level), (-1.0, &a.level)], 0.0);
    // Approximate reads of the difference (see `FloatModel::with_reveal`).
    let w = label_lookup(m, d.clone(), compare_zero(Rule::Gt), bit_grid(), false);
    let relu = UFn::Act(Activation::Relu, Arc::new(UFn::X));
    let r = label_lookup(m, d, relu, OutputGrid::DifferenceOfInputs, false);
    let sum = Lin::combine([(1.0, &a.level), (1.0, &r)], 0.0);
    let level = label_lookup(m, sum, UFn::X, OutputGrid::LabelScores(0), false);
    let bits = choose_bits(m, &a, &b, &w);
    Node { level, bits }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_combine_and_prune() {
        let a = Lin::combine([(2.0, &Lin::atom(0)), (1.0, &Lin::atom(1))], 0.5);
        let b = Lin::combine([(1.0, &a), (-2.0, &Lin::atom(0))], 0.0);
        assert_eq!(b.terms, vec![(1, 1.0)]);
        assert_eq!(b.bias, 0.5);
        let mut m = FloatModel {
            input_shape: vec![2],
            input_grids: vec![None; 2],
            lookups: vec![
                Lookup {
                    input: Lin::atom(0),
                    func: Arc::new(UFn::X),
                    grid: OutputGrid::Calibrated,
                    origin: "dead".into(),
                    decision: false,
                    product: None,
                },
                Lookup {
                    input: Lin::atom(1),
                    func: Arc::new(UFn::Act(Activation::Relu, Arc::new(UFn::X))),
                    grid: OutputGrid::Calibrated,
                    origin: "live".into(),
                    decision: false,
                    product: None,
                },
            ],
            outputs: vec![Lin::combine([(3.0, &Lin::atom(3))], 1.0)],
            tail: vec![],
            class_labels: None,
            task: Task::Classification,
            reveal: Reveal::Scores,
        };
        assert_eq!(m.scores(&[1.0, -2.0]), vec![1.0]);
        assert_eq!(m.scores(&[1.0, 2.0]), vec![7.0]);
        m.prune();
        assert_eq!(m.lookups.len(), 1);
        assert_eq!(m.outputs[0].terms, vec![(2, 3.0)]);
        assert_eq!(m.scores(&[1.0, 2.0]), vec![7.0]);
    }

    /// The label graph gives the client's argmax, ties to the lowest index, for K = 1, 2, 3.
    #[test]
    fn label_graph_is_the_argmax_with_ties_to_the_lowest_index() {
        let scores_model = |k: usize, tail: Vec<TailOp>| FloatModel {
            input_shape: vec![k],
            input_grids: vec![None; k],
            lookups: vec![],
            outputs: (0..k as AtomId).map(Lin::atom).collect(),
            tail,
            class_labels: None,
            task: Task::Classification,
            reveal: Reveal::Scores,
        };
        let three = scores_model(3, vec![TailOp::Softmax]);
        let label = three.clone().with_reveal(Reveal::Label).unwrap();
        // 3 grid reads, one inner match (w, relu, level), the final w and its check, one bit,
        // then the output's reads of the two bits and of the check.
        assert_eq!(label.lookups.len(), 3 + 3 + 2 + 1 + 2);
        for x in [
            [1.0, 1.0, 0.0],
            [0.0, 2.0, 2.0],
            [3.0, 1.0, 3.0],
            [-1.0, -2.0, -0.5],
            [5.0, 5.0, 5.0],
        ] {
            assert_eq!(
                label.predict(&x).unwrap().label,
                three.predict(&x).unwrap().label,
                "{x:?}"
            );
        }
        let two = scores_model(2, vec![]);
        let label = two.clone().with_reveal(Reveal::Label).unwrap();
        assert_eq!(label.lookups.len(), 2 + 2 + 2);
        for x in [[1.0, 1.0], [0.5, 1.0], [2.0, -1.0]] {
            assert_eq!(
                label.predict(&x).unwrap().label,
                two.predict(&x).unwrap().label,
                "{x:?}"
            );
        }
        let one = scores_model(1, vec![TailOp::BinaryScores, TailOp::Softmax]);
        let label = one.clone().with_reveal(Reveal::Label).unwrap();
        for x in [[0.0], [0.1], [-0.1]] {
            assert_eq!(
                label.predict(&x).unwrap().label,
                one.predict(&x).unwrap().label,
                "{x:?}"
            );
        }
        // A tail that could reorder the scores is refused, not silently wrong.
        let abs = scores_model(3, vec![TailOp::Activation(Activation::Abs)]);
        assert!(abs.with_reveal(Reveal::Label).is_err());
    }
}
