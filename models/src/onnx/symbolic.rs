//! Symbolic tensors: what the importer tracks per element while it walks the ONNX graph.
//!
//! Each element is a linear form over atoms ([`Lin`]) plus, when known, a *view*: the element
//! as a univariate function of one source form. Element-wise ops keep the view, so that a
//! subgraph whose only non-constant input is one value (`x * sigmoid(x)`, erf GELU, chains of
//! activations) collapses into one lookup of that value.

use std::sync::Arc;

use crate::graph::{Activation, AtomId, Grid, Lin, Lookup, OutputGrid, ProductHalf, Task, UFn};

/// One element of a computed tensor.
#[derive(Clone, Debug)]
pub(crate) struct Elem {
    pub lin: Arc<Lin>,
    /// `(source, f)`: this element equals `f(source)`. `None` means `(lin, X)`.
    view: Option<(Arc<Lin>, Arc<UFn>)>,
    /// The model's grid this value is known to lie on (a fake-quantized value, or a maximum
    /// of such values), so that quantizing it again on that grid costs nothing.
    grid: Option<Grid>,
}

impl Elem {
    pub fn linear(lin: Lin) -> Self {
        Elem {
            lin: Arc::new(lin),
            view: None,
            grid: None,
        }
    }

    pub fn constant(c: f64) -> Self {
        Elem::linear(Lin::constant(c))
    }

    pub fn view(&self) -> (Arc<Lin>, Arc<UFn>) {
        match &self.view {
            Some(v) => v.clone(),
            None => (self.lin.clone(), Arc::new(UFn::X)),
        }
    }

    /// `k * self + c`, keeping the view.
    pub fn affine(&self, k: f64, c: f64) -> Elem {
        let (s, f) = self.view();
        Elem {
            lin: Arc::new(self.lin.scaled(k, c)),
            view: Some((s, Arc::new(UFn::Affine(k, c, f)))),
            grid: None,
        }
    }
}

fn same_source(a: &Arc<Lin>, b: &Arc<Lin>) -> bool {
    Arc::ptr_eq(a, b) || **a == **b
}

/// A computed tensor; `dims[0]` is the batch dimension, always 1 here.
pub(crate) type DynTensor = super::Nd<Elem>;

/// The lookups created so far.
pub(crate) struct GraphBuilder {
    pub n_inputs: usize,
    /// Grids a QuantizeLinear fixes on input features.
    pub input_grids: Vec<Option<Grid>>,
    pub lookups: Vec<Lookup>,
    /// Set by the ops that know their outputs are predicted values (tree and linear
    /// regressors).
    pub task: Task,
    next_tie: u32,
    next_product: u32,
}

impl GraphBuilder {
    pub fn new(n_inputs: usize) -> Self {
        GraphBuilder {
            n_inputs,
            input_grids: vec![None; n_inputs],
            lookups: Vec::new(),
            task: Task::Classification,
            next_tie: 0,
            next_product: 0,
        }
    }

    pub fn new_tie_group(&mut self) -> u32 {
        self.next_tie += 1;
        self.next_tie
    }

    /// The lookup behind `atom`, if it is one.
    pub fn lookup_mut(&mut self, atom: AtomId) -> Option<&mut Lookup> {
        let i = (atom as usize).checked_sub(self.n_inputs)?;
        self.lookups.get_mut(i)
    }

    /// A new lookup `f(source)`; a constant source folds to a constant.
    pub fn lookup(
        &mut self,
        source: Arc<Lin>,
        f: Arc<UFn>,
        grid: OutputGrid,
        origin: &str,
    ) -> Elem {
        self.push(source, f, grid, origin, false)
    }

    /// A lookup that must read its small exact integer input without error (see
    /// [`Lookup::decision`]).
    pub fn decision(
        &mut self,
        source: Lin,
        act: Activation,
        grid: OutputGrid,
        origin: &str,
    ) -> Elem {
        let f = Arc::new(UFn::Act(act, Arc::new(UFn::X)));
        self.push(Arc::new(source), f, grid, origin, true)
    }

    fn push(
        &mut self,
        source: Arc<Lin>,
        f: Arc<UFn>,
        grid: OutputGrid,
        origin: &str,
        decision: bool,
    ) -> Elem {
        if source.is_constant() {
            return Elem::constant(f.eval(source.bias));
        }
        let atom = (self.n_inputs + self.lookups.len()) as AtomId;
        self.lookups.push(Lookup {
            input: (*source).clone(),
            func: f.clone(),
            grid,
            origin: origin.into(),
            decision,
            product: None,
        });
        let grid = match self.lookups.last().map(|l| &l.grid) {
            Some(OutputGrid::Fixed(g)) => Some(*g),
            _ => None,
        };
        Elem {
            lin: Arc::new(Lin::atom(atom)),
            view: Some((source, f)),
            grid,
        }
    }

    /// `act(e)`, fused with whatever univariate function `e` already is of its source.
    pub fn activation(&mut self, e: &Elem, act: Activation, origin: &str) -> Elem {
        let grid = match act {
            Activation::FakeQuant(g) if e.grid == Some(g) => return e.clone(),
            Activation::FakeQuant(g) => {
                // An input feature quantized by the model: the client encodes it on that grid,
                // which costs no bootstrap.
                if let Some(a) = e.lin.as_atom().map(|a| a as usize)
                    && a < self.n_inputs
                    && matches!(*e.view().1, UFn::X)
                    && self.input_grids[a].is_none_or(|old| old == g)
                {
                    self.input_grids[a] = Some(g);
                    let mut on_grid = e.clone();
                    on_grid.grid = Some(g);
                    return on_grid;
                }
                OutputGrid::Fixed(g)
            }
            _ => OutputGrid::Calibrated,
        };
        let (s, f) = e.view();
        self.lookup(s, Arc::new(UFn::Act(act, f)), grid, origin)
    }

    /// `act(e)` as an intermediate of arithmetic, on a finer output grid
    /// ([`OutputGrid::Arithmetic`]).
    pub fn arithmetic(&mut self, e: &Elem, act: Activation, origin: &str) -> Elem {
        let (s, f) = e.view();
        self.lookup(
            s,
            Arc::new(UFn::Act(act, f)),
            OutputGrid::Arithmetic,
            origin,
        )
    }

    /// `a + k * b` for two computed elements.
    pub fn add(&mut self, a: &Elem, b: &Elem, k: f64) -> Elem {
        let lin = Lin::combine([(1.0, &*a.lin), (k, &*b.lin)], 0.0);
        let (sa, fa) = a.view();
        let (sb, fb) = b.view();
        let view = if b.lin.is_constant() {
            Some((sa, Arc::new(UFn::Affine(1.0, k * b.lin.bias, fa))))
        } else if a.lin.is_constant() {
            Some((sb, Arc::new(UFn::Affine(k, a.lin.bias, fb))))
        } else if same_source(&sa, &sb) {
            let kb = Arc::new(UFn::Affine(k, 0.0, fb));
            Some((sa, Arc::new(UFn::Add(fa, kb))))
        } else {
            None
        };
        Elem {
            lin: Arc::new(lin),
            view,
            grid: None,
        }
    }

    /// `a * b`: one lookup when both are functions of one source, else two by the
    /// quarter-square identity `ab = ((a+b)^2 - (a-b)^2) / 4`.
    pub fn mul(&mut self, a: &Elem, b: &Elem, origin: &str) -> Elem {
        if b.lin.is_constant() {
            return a.affine(b.lin.bias, 0.0);
        }
        if a.lin.is_constant() {
            return b.affine(a.lin.bias, 0.0);
        }
        let (sa, fa) = a.view();
        let (sb, fb) = b.view();
        if same_source(&sa, &sb) {
            return self.lookup(
                sa,
                Arc::new(UFn::Mul(fa, fb)),
                OutputGrid::Calibrated,
                origin,
            );
        }
        let sum = Arc::new(Lin::combine([(1.0, &*a.lin), (1.0, &*b.lin)], 0.0));
        let diff = Arc::new(Lin::combine([(1.0, &*a.lin), (-1.0, &*b.lin)], 0.0));
        let square = |s| Arc::new(UFn::Act(Activation::Pow { p: 2.0 }, s));
        let x = Arc::new(UFn::X);
        let p = self.lookup(sum, square(x.clone()), OutputGrid::Arithmetic, origin);
        let m = self.lookup(diff, square(x), OutputGrid::Arithmetic, origin);
        self.next_product += 1;
        for (half, plus) in [(&p, true), (&m, false)] {
            let pair = self.next_product;
            if let Some(l) = half.lin.as_atom().and_then(|a| self.lookup_mut(a)) {
                l.product = Some(ProductHalf { pair, plus });
            }
        }
        Elem::linear(Lin::combine([(0.25, &*p.lin), (-0.25, &*m.lin)], 0.0))
    }

    /// `a / b`: one lookup when both are functions of one source, else a product by the
    /// reciprocal; `None` for a division by the constant 0.
    pub fn div(&mut self, a: &Elem, b: &Elem, origin: &str) -> Option<Elem> {
        if b.lin.is_constant() {
            return (b.lin.bias != 0.0).then(|| a.affine(1.0 / b.lin.bias, 0.0));
        }
        let (sa, fa) = a.view();
        let (sb, fb) = b.view();
        if a.lin.is_constant() {
            let num = Arc::new(UFn::Const(a.lin.bias));
            return Some(self.lookup(
                sb,
                Arc::new(UFn::Div(num, fb)),
                OutputGrid::Calibrated,
                origin,
            ));
        }
        if same_source(&sa, &sb) {
            return Some(self.lookup(
                sa,
                Arc::new(UFn::Div(fa, fb)),
                OutputGrid::Calibrated,
                origin,
            ));
        }
        // a * (1 / b): one lookup for the reciprocal, two for the product (a decomposed
        // normalization, `(x - mean) / sqrt(var + eps)`).
        let r = self.arithmetic(b, Activation::Reciprocal, origin);
        Some(self.mul(a, &r, origin))
    }

    /// `max(a, b) = a + relu(b - a)`: one lookup. When `a` and `b` share a grid the difference
    /// lookup takes that grid, so the maximum is exact.
    pub fn max(&mut self, a: &Elem, b: &Elem, origin: &str) -> Elem {
        if a.lin.is_constant() && b.lin.is_constant() {
            return Elem::constant(a.lin.bias.max(b.lin.bias));
        }
        let diff = Arc::new(Lin::combine([(1.0, &*b.lin), (-1.0, &*a.lin)], 0.0));
        let relu = Arc::new(UFn::Act(Activation::Relu, Arc::new(UFn::X)));
        let r = self.lookup(diff, relu, OutputGrid::DifferenceOfInputs, origin);
        let mut m = Elem::linear(Lin::combine([(1.0, &*a.lin), (1.0, &*r.lin)], 0.0));
        m.grid = a.grid.filter(|_| a.grid == b.grid);
        m
    }
}
