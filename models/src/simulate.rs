//! Clear-text simulation of the exact integer pipeline the encrypted run computes.
//!
//! Without noise it follows the encrypted computation step by step: the same integer
//! accumulators, the same wrap-around on the torus, the same rounding to a position, the same
//! lookup tables; so it equals the encrypted run whenever no bootstrap misreads a position.
//! With noise it adds the Gaussian read error the plan predicts for each neuron, so that its
//! accuracy predicts the encrypted accuracy.

use crate::compiled::{CompiledModel, POSITION};
use crate::error::Result;
use crate::eval::Prediction;

/// A small deterministic Gaussian source (splitmix64 + Box-Muller) for noise injection.
#[derive(Clone, Debug)]
pub struct NoiseRng {
    state: u64,
    spare: Option<f64>,
}

impl NoiseRng {
    pub fn new(seed: u64) -> Self {
        NoiseRng {
            state: seed,
            spare: None,
        }
    }

    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A standard normal sample.
    pub fn gaussian(&mut self) -> f64 {
        if let Some(s) = self.spare.take() {
            return s;
        }
        let u1 = ((self.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
        let u2 = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        let r = (-2.0 * u1.ln()).sqrt();
        let (s, c) = (2.0 * std::f64::consts::PI * u2).sin_cos();
        self.spare = Some(r * s);
        r * c
    }
}

/// One simulated sample.
#[derive(Clone, Debug, PartialEq)]
pub struct SimOutput {
    /// Output accumulators as the client would decode them (integers without noise).
    pub accs: Vec<f64>,
    /// Bootstraps whose input left the programmable half of the torus (overflow).
    pub overflows: usize,
}

/// Clear-text runs of a compiled model (the compiler's check of what the encrypted run
/// computes).
pub trait Simulate {
    /// Every value of one sample, inputs then each stage's outputs; with `noise`, with the
    /// predicted bootstrap noise.
    fn simulate_values(&self, x: &[f64], noise: Option<&mut NoiseRng>) -> Result<Vec<i64>>;
    /// Simulates one sample from its quantized inputs.
    fn simulate_quantized(&self, q: &[i64], noise: Option<&mut NoiseRng>) -> SimOutput;
    /// How far each decrypted output may lie from the noiseless simulation (see the impl).
    fn predicted_deviation(&self, x: &[f64], trials: usize, seed: u64) -> Result<Vec<f64>>;
    /// Simulates one sample from its float features.
    fn simulate(&self, x: &[f64], noise: Option<&mut NoiseRng>) -> Result<SimOutput>;
    /// Simulated predictions for `xs`; with `noise_seed`, with the predicted bootstrap noise.
    /// A label output the decoder refuses (a noisy misread) is an error.
    fn simulate_predictions(
        &self,
        xs: &[Vec<f64>],
        noise_seed: Option<u64>,
    ) -> Result<Vec<Prediction>>;
    /// Simulated predicted labels for `xs`.
    fn simulate_labels(&self, xs: &[Vec<f64>], noise_seed: Option<u64>) -> Result<Vec<i64>>;
    /// Whether `x`'s predicted class holds under the predicted bootstrap noise: `trials` noisy
    /// simulations (seeds 1 to `trials`) all give the noiseless class. A row that fails is a
    /// near-tie, which an encrypted run may decide either way (or refuse, for a label).
    fn class_holds_under_noise(&self, x: &[f64], trials: u64) -> Result<bool> {
        let xs = [x.to_vec()];
        let want = self.simulate_labels(&xs, None)?;
        Ok((1..=trials).all(|seed| {
            self.simulate_labels(&xs, Some(seed))
                .is_ok_and(|got| got == want)
        }))
    }
}

impl Simulate for CompiledModel {
    /// Every value of one sample, inputs then each stage's outputs; with `noise`, with the
    /// predicted bootstrap noise.
    fn simulate_values(&self, x: &[f64], noise: Option<&mut NoiseRng>) -> Result<Vec<i64>> {
        let q = self.input.quantize(x)?;
        Ok(run_stages(self, &q, noise).0)
    }

    /// Simulates one sample from its quantized inputs.
    fn simulate_quantized(&self, q: &[i64], mut noise: Option<&mut NoiseRng>) -> SimOutput {
        let (values, overflows) = run_stages(self, q, noise.as_deref_mut());
        let out = &self.output;
        let accs = out
            .weights
            .apply(&values)
            .into_iter()
            .enumerate()
            .map(|(n, acc)| match noise.as_deref_mut() {
                Some(rng) => {
                    let units = out.sigma[n] * POSITION as f64 / out.decoding.delta as f64;
                    acc as f64 + rng.gaussian() * units
                }
                None => acc as f64,
            })
            .collect();
        SimOutput { accs, overflows }
    }

    /// How far each decrypted output may lie from the noiseless simulation, from the plan's
    /// own noise model: the largest deviation over `trials` simulations with the predicted
    /// read noise (seeded, so deterministic), at least the effect of one misread of any
    /// lookup carried through the rest of the model, plus six standard deviations of the
    /// output's own noise.
    /// Tests hold encrypted runs to it: an encoding bias larger than the noise breaks it.
    fn predicted_deviation(&self, x: &[f64], trials: usize, seed: u64) -> Result<Vec<f64>> {
        let q = self.input.quantize(x)?;
        let exact = self.simulate_quantized(&q, None).accs;
        let mut worst = vec![0.0f64; exact.len()];
        let mut rng = NoiseRng::new(seed);
        for _ in 0..trials {
            let noisy = self.simulate_quantized(&q, Some(&mut rng)).accs;
            for ((w, n), e) in worst.iter_mut().zip(&noisy).zip(&exact) {
                *w = w.max((n - e).abs());
            }
        }
        // One misread anywhere: the lookup of any value reading one position off, carried
        // through every later stage (a misread early in a LayerNorm scales every value after
        // it, which the random trials above rarely draw).
        let out = &self.output;
        let mut one_misread = vec![0.0f64; exact.len()];
        for v in self.n_inputs()..self.n_values() {
            for off in [-1, 1] {
                let (values, _) = run_stages_misread(self, &q, None, &[(v, off)]);
                for ((w, acc), e) in one_misread
                    .iter_mut()
                    .zip(out.weights.apply(&values))
                    .zip(&exact)
                {
                    *w = w.max((acc as f64 - e).abs());
                }
            }
        }
        Ok(worst
            .iter()
            .zip(&one_misread)
            .enumerate()
            .map(|(n, (&w, &m))| {
                let own = 6.0 * out.sigma[n] * POSITION as f64 / out.decoding.delta as f64;
                w.max(m) + own + 0.5
            })
            .collect())
    }

    /// Simulates one sample from its float features.
    fn simulate(&self, x: &[f64], noise: Option<&mut NoiseRng>) -> Result<SimOutput> {
        let q = self.input.quantize(x)?;
        Ok(self.simulate_quantized(&q, noise))
    }
    /// Simulated predictions for `xs`; with `noise_seed`, with the predicted bootstrap noise.
    /// A label output the decoder refuses (a noisy misread) is an error.
    fn simulate_predictions(
        &self,
        xs: &[Vec<f64>],
        noise_seed: Option<u64>,
    ) -> Result<Vec<Prediction>> {
        let mut rng = noise_seed.map(NoiseRng::new);
        xs.iter()
            .map(|x| {
                self.simulate(x, rng.as_mut())
                    .and_then(|s| Ok(self.decode(&s.accs)?))
            })
            .collect()
    }

    /// Simulated predicted labels for `xs`; with `noise_seed`, with the predicted bootstrap noise.
    fn simulate_labels(&self, xs: &[Vec<f64>], noise_seed: Option<u64>) -> Result<Vec<i64>> {
        Ok(self
            .simulate_predictions(xs, noise_seed)?
            .into_iter()
            .map(|p| p.label)
            .collect())
    }
}

fn run_stages(m: &CompiledModel, q: &[i64], noise: Option<&mut NoiseRng>) -> (Vec<i64>, usize) {
    run_stages_misread(m, q, noise, &[])
}

/// [`run_stages`], with the lookup that computes value `v` reading `off` positions off, for
/// each `(v, off)` of `misreads`.
fn run_stages_misread(
    m: &CompiledModel,
    q: &[i64],
    mut noise: Option<&mut NoiseRng>,
    misreads: &[(usize, i64)],
) -> (Vec<i64>, usize) {
    let mut values = Vec::with_capacity(m.n_values());
    values.extend_from_slice(q);
    let mut overflows = 0;
    for st in &m.stages {
        let n_before = values.len();
        for (n, row) in st.weights.rows.iter().enumerate() {
            let acc: i64 = row.iter().map(|&(c, w)| w * values[c as usize]).sum();
            let mut phase = st.phase(n, acc);
            for &(v, off) in misreads {
                if v == values.len() {
                    phase = phase.wrapping_add((off * POSITION as i64) as u64);
                }
            }
            if let Some(rng) = noise.as_deref_mut() {
                let e = rng.gaussian() * st.read_sigma[n] * POSITION as f64;
                phase = phase.wrapping_add(e as i64 as u64);
            }
            let (v, overflow) = st.read(n, phase);
            overflows += usize::from(overflow);
            values.push(v);
        }
        debug_assert_eq!(values.len(), n_before + st.len());
    }
    (values, overflows)
}
