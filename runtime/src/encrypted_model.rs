//! Encrypted-model mode: the model owner encrypts her compiled model's weights, constants and
//! lookup tables under her own key; whoever holds the file and her evaluation key runs it on
//! clear inputs; only she can decrypt the results (ARCHITECTURE.md, "Encrypted-model mode").
//!
//! Every linear form of the compiled model (a neuron's input, an output) becomes a [`Form`]:
//! - a term on an input feature is `q_j * Enc(w_j * delta)`: a clear integer times a
//!   ciphertext, no bootstrap;
//! - a term on a lookup `l` is one bootstrap of `l`'s accumulator through an encrypted table
//!   whose entries are `w * T_l(p) * delta_l`: the weight rides inside the table, so no
//!   encrypted activation is ever multiplied by an encrypted weight;
//! - a neuron's constant (its bias and range shift) is an encrypted LWE added to its sum.
//!
//! Each sum then has exactly the phase the compiled model's has, so the simulator's integers
//! are the encrypted run's; [`Layout::simulate`] checks it in the clear.

use std::io::Read;
use std::path::{Path, PathBuf};

use bincode::Options;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use tfhe::core_crypto::algorithms::slice_algorithms::{
    slice_wrapping_add_assign, slice_wrapping_add_scalar_mul_assign,
};
use tfhe::core_crypto::commons::math::random::{CompressionSeed, Seed};
use tfhe::core_crypto::prelude::{
    CiphertextModulus, DefaultRandomGenerator, DynamicDistribution, EncryptionRandomGenerator,
    GlweCiphertextCount, GlweCiphertextList, GlweCiphertextListOwned, GlweSecretKey, LweCiphertext,
    LweCiphertextCount, LweCiphertextList, LweCiphertextListOwned, LweCompactPublicKeyOwned,
    LweDimension, LweSize, Plaintext, PlaintextList, PolynomialSize, SeededGlweCiphertextList,
    SeededLweCiphertextList, SeededLweCompactPublicKey, decompress_seeded_glwe_ciphertext_list,
    encrypt_lwe_ciphertext_with_compact_public_key, encrypt_seeded_glwe_ciphertext_list,
    encrypt_seeded_lwe_ciphertext_list, generate_seeded_lwe_compact_public_key,
    par_decompress_seeded_lwe_ciphertext_list,
};
use tfhe::core_crypto::seeders::new_seeder;

use crate::error::{Result, RuntimeError};
use crate::executor::CENTERED_SWITCH_FIX;
use crate::{ClientKey, EncryptedOutput, PbsBackend, big_lwe_size, shortint_params};
use veil_format::compiled::{
    CompiledModel, InputEncoding, MAX_OUTPUTS, MAX_STAGES, POSITION, POSITIONS, ParamSet,
};
use veil_format::digest::sha256_hex;
use veil_format::tail::{Reveal, Task};

const MAGIC: &[u8; 8] = b"VEILENC\0";
const RESULTS_MAGIC: &[u8; 8] = b"VEILRES\0";
/// Bumped on any change to the files' bodies.
pub const FORMAT_VERSION: u32 = 1;
/// Most encrypted weights on input features: each expands to a 16 KiB ciphertext when the
/// model is loaded (1 GiB at most).
pub const MAX_ENCRYPTED_WEIGHTS: usize = 1 << 16;
/// Most encrypted tables (bootstraps per sample): each expands to a 32 KiB GLWE (1 GiB).
pub const MAX_ENCRYPTED_TABLES: usize = 1 << 15;
/// Largest encrypted-model or results file a reader accepts.
pub const MAX_FILE_BYTES: u64 = 1 << 30;
/// Most samples in one results file.
pub const MAX_RESULT_ROWS: usize = 1 << 20;

/// One linear form with hidden weights: the features it reads (clear at the evaluator, each
/// with an encrypted weight) and the lookups it reads (each through an encrypted table).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Form {
    pub inputs: Vec<u32>,
    /// Lookup indices, in the model's order: stage by stage, neuron by neuron.
    pub lookups: Vec<u32>,
}

/// The forms of a compiled model and the plaintexts its owner encrypts: what
/// [`EncryptedModel::encrypt`] seals and what [`Layout::simulate`] runs in the clear.
pub struct Layout {
    pub stages: Vec<Vec<Form>>,
    pub outputs: Vec<Form>,
    /// Per form, stages first: one plaintext per input term, then (stages only) the constant.
    pub weights: Vec<u64>,
    /// Per form, stages first: one table per lookup term, as (lookup, weight).
    pub tables: Vec<(u32, i64)>,
    /// Stage and neuron of each lookup.
    lookup_at: Vec<(usize, usize)>,
}

impl Layout {
    /// Splits `model`'s forms into hidden-weight terms. Tree models, whose tests read windows
    /// of the inputs, are refused.
    pub fn of(model: &CompiledModel) -> Result<Self> {
        if !model.input.windows.is_empty() {
            return Err(RuntimeError::Unsupported(
                "tree ensembles (their tests read input windows) cannot be encrypted yet: \
                 encrypted-model mode takes linear models and networks"
                    .into(),
            ));
        }
        let n_in = model.n_inputs();
        let mut lookup_at = Vec::with_capacity(model.pbs_per_sample());
        for (s, st) in model.stages.iter().enumerate() {
            lookup_at.extend((0..st.len()).map(|n| (s, n)));
        }
        let mut layout = Layout {
            stages: Vec::with_capacity(model.stages.len()),
            outputs: Vec::new(),
            weights: Vec::new(),
            tables: Vec::new(),
            lookup_at,
        };
        let split = |row: &[(u32, i64)], layout: &mut Layout| -> Form {
            let mut form = Form {
                inputs: Vec::new(),
                lookups: Vec::new(),
            };
            for &(c, w) in row {
                match (c as usize).checked_sub(n_in) {
                    None => {
                        form.inputs.push(c);
                        layout
                            .weights
                            .push((w as u64).wrapping_mul(model.input.delta));
                    }
                    Some(l) => {
                        form.lookups.push(l as u32);
                        layout.tables.push((l as u32, w));
                    }
                }
            }
            form
        };
        for st in &model.stages {
            let mut forms = Vec::with_capacity(st.len());
            for (n, row) in st.weights.rows.iter().enumerate() {
                forms.push(split(row, &mut layout));
                layout.weights.push(st.offset[n]);
            }
            layout.stages.push(forms);
        }
        for row in &model.output.weights.rows {
            let form = split(row, &mut layout);
            layout.outputs.push(form);
        }
        Ok(layout)
    }

    /// Table `e`'s plaintext polynomial: position `p` holds `w * T_l(p) * delta_l` (one
    /// position per coefficient, as the compiled model's tables are laid out).
    pub fn table(&self, model: &CompiledModel, e: usize) -> Vec<u64> {
        let (l, w) = self.tables[e];
        let (s, n) = self.lookup_at[l as usize];
        let st = &model.stages[s];
        st.lut_of(n)
            .iter()
            .map(|&v| ((v as i64).wrapping_mul(w) as u64).wrapping_mul(st.delta_out[n]))
            .collect()
    }

    /// Bootstraps per sample: one per table.
    pub fn pbs_per_sample(&self) -> usize {
        self.tables.len()
    }

    /// The output phases of one sample, computed in the clear as the encrypted run computes
    /// them (each lookup read at its exact position): the check that the layout keeps the
    /// compiled model's integers.
    pub fn simulate(&self, model: &CompiledModel, q: &[i64]) -> Vec<u64> {
        let tables: Vec<Vec<u64>> = (0..self.tables.len())
            .map(|e| self.table(model, e))
            .collect();
        let (mut w, mut e) = (0usize, 0usize);
        let mut positions: Vec<u64> = Vec::new();
        let form_phase = |f: &Form, w: &mut usize, e: &mut usize, positions: &[u64]| {
            let mut phase = 0u64;
            for &j in &f.inputs {
                phase = phase.wrapping_add((q[j as usize] as u64).wrapping_mul(self.weights[*w]));
                *w += 1;
            }
            for &l in &f.lookups {
                phase = phase.wrapping_add(read(&tables[*e], positions[l as usize]));
                *e += 1;
            }
            phase
        };
        for forms in &self.stages {
            let mut next = Vec::with_capacity(forms.len());
            for f in forms {
                let phase = form_phase(f, &mut w, &mut e, &positions);
                let phase = phase.wrapping_add(self.weights[w]);
                w += 1;
                next.push(phase);
            }
            positions.extend(next);
        }
        self.outputs
            .iter()
            .map(|f| form_phase(f, &mut w, &mut e, &positions))
            .collect()
    }
}

/// What a bootstrap of `phase` through `table` returns: the entry at the nearest of the 4096
/// positions, negated in the negacyclic half.
fn read(table: &[u64], phase: u64) -> u64 {
    let p = (phase.wrapping_add(POSITION as u64 / 2) >> 52) as usize;
    if p < POSITIONS as usize {
        table[p]
    } else {
        table[p - POSITIONS as usize].wrapping_neg()
    }
}

/// The file body: public shapes and scales, then the ciphertexts (seeded: one seed per list,
/// one body word per LWE, N per GLWE).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Body {
    params: ParamSet,
    /// The owner's evaluation key (hex SHA-256 of its bytes), the only one that runs it.
    key_id: String,
    input_shape: Vec<usize>,
    input: InputEncoding,
    task: Task,
    reveal: Reveal,
    output_bits: u32,
    stages: Vec<Vec<Form>>,
    outputs: Vec<Form>,
    weight_seed: u128,
    weights: Vec<u64>,
    table_seed: u128,
    tables: Vec<u64>,
    /// The owner's compact public key (RLWE, seeded: N body words): the evaluator adds a
    /// fresh encryption of zero to every output, so its mask is not a function of his rows.
    public_key_seed: u128,
    public_key: Vec<u64>,
    /// The evaluator also adds uniform noise of at most 2^flood_bits to each output (a label
    /// output: 1/8 of its unit), which hides the deterministic noise the evaluation left
    /// there; 0 for scores, whose precision needs every bit.
    flood_bits: u32,
}

/// Noise of the compact public key and of its encryptions' masks: TUniform(17) at dimension
/// 2048, tfhe's vetted compact public-key encryption parameters
/// (`PARAM_PKE_MESSAGE_2_CARRY_2_KS_PBS_TUNIFORM_2M128`), which the parameter set's GLWE
/// key and noise match.
const PUBLIC_KEY_NOISE_BITS: u32 = 17;

/// A model whose weights, constants and tables are encrypted under its owner's key: what
/// `model.enc.veil` holds. It carries no weight in the clear; what is public is listed in
/// ARCHITECTURE.md ("Encrypted-model mode").
pub struct EncryptedModel {
    body: Body,
    digest: String,
}

fn bad(why: String) -> RuntimeError {
    RuntimeError::Crypto(why)
}

/// Reads a whole file of at most `MAX_FILE_BYTES`.
fn read_bounded(path: &Path) -> Result<Vec<u8>> {
    let io = |e: std::io::Error| bad(format!("reading {}: {e}", path.display()));
    let f = std::fs::File::open(path).map_err(io)?;
    let mut bytes = Vec::new();
    f.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(bad(format!(
            "{} is larger than {MAX_FILE_BYTES} bytes",
            path.display()
        )));
    }
    Ok(bytes)
}

/// Checks a file's magic and version and returns its body bytes.
fn header<'a>(bytes: &'a [u8], magic: &[u8; 8], what: &str) -> Result<&'a [u8]> {
    if bytes.len() < 12 || &bytes[..8] != magic {
        return Err(bad(format!("not {what} (bad magic bytes)")));
    }
    let version = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
    if version != FORMAT_VERSION {
        return Err(bad(format!(
            "{what} of format version {version}; this build reads version {FORMAT_VERSION}"
        )));
    }
    Ok(&bytes[12..])
}

fn with_header(magic: &[u8; 8], body: &impl Serialize) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(magic);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend(
        bincode::DefaultOptions::new()
            .with_fixint_encoding()
            .serialize(body)
            .expect("plain data serializes"),
    );
    out
}

impl EncryptedModel {
    /// Encrypts `model`'s weights, constants and tables under `key`, whose evaluation key
    /// has id `key_id` (the key that will run it). Compile the model with
    /// `QuantConfig::keep_zero_weights` so that zero weights are encrypted too.
    pub fn encrypt(model: &CompiledModel, key: &ClientKey, key_id: &str) -> Result<Self> {
        if model.params != key.params() {
            return Err(bad(format!(
                "the model uses {}, the key {}",
                model.params.name(),
                key.params().name()
            )));
        }
        let layout = Layout::of(model)?;
        check_counts(layout.weights.len(), layout.tables.len())?;
        let (lwe_key, noise) = key.encryption_key();
        let modulus = CiphertextModulus::new_native();
        let mut seeder = new_seeder();

        let weight_seed = seeder.seed();
        let mut weights = SeededLweCiphertextList::new(
            0u64,
            LweSize(lwe_key.lwe_dimension().0 + 1),
            LweCiphertextCount(layout.weights.len()),
            CompressionSeed::from(weight_seed),
            modulus,
        );
        encrypt_seeded_lwe_ciphertext_list(
            lwe_key,
            &mut weights,
            &PlaintextList::from_container(layout.weights.as_slice()),
            noise,
            seeder.as_mut(),
        );

        // The big LWE key is the GLWE key read as one vector (k = 1 here).
        let poly = PolynomialSize(POSITIONS as usize);
        let glwe_key = GlweSecretKey::from_container(lwe_key.as_ref(), poly);
        let glwe_size = shortint_params(model.params).glwe_dimension.to_glwe_size();
        let table_seed = seeder.seed();
        let mut tables = SeededGlweCiphertextList::new(
            0u64,
            glwe_size,
            poly,
            GlweCiphertextCount(layout.tables.len()),
            CompressionSeed::from(table_seed),
            modulus,
        );
        let plain: Vec<u64> = (0..layout.tables.len())
            .into_par_iter()
            .flat_map_iter(|e| layout.table(model, e))
            .collect();
        encrypt_seeded_glwe_ciphertext_list(
            &glwe_key,
            &mut tables,
            &PlaintextList::from_container(plain),
            noise,
            seeder.as_mut(),
        );

        let public_key_seed = seeder.seed();
        let mut public_key = SeededLweCompactPublicKey::new(
            0u64,
            LweDimension(lwe_key.lwe_dimension().0),
            CompressionSeed::from(public_key_seed),
            modulus,
        );
        generate_seeded_lwe_compact_public_key(
            lwe_key,
            &mut public_key,
            DynamicDistribution::new_t_uniform(PUBLIC_KEY_NOISE_BITS),
            seeder.as_mut(),
        );
        // A label decodes within a quarter of its unit `delta`: flood with up to delta / 8.
        let flood_bits = match model.reveal {
            Reveal::Label => (model.output.decoding.delta / 8).max(1).ilog2(),
            Reveal::Scores => 0,
        };

        let body = Body {
            params: model.params,
            key_id: key_id.to_string(),
            input_shape: model.input_shape.clone(),
            input: model.input.clone(),
            task: model.task,
            reveal: model.reveal,
            output_bits: model.output.decoding.modulus_bits,
            stages: layout.stages,
            outputs: layout.outputs,
            weight_seed: weight_seed.0,
            weights: weights.into_container(),
            table_seed: table_seed.0,
            tables: tables.into_container(),
            public_key_seed: public_key_seed.0,
            public_key: public_key.into_container(),
            flood_bits,
        };
        let digest = sha256_hex(&with_header(MAGIC, &body));
        Ok(EncryptedModel { body, digest })
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        with_header(MAGIC, &self.body)
    }

    /// Parses and checks an encrypted model; never panics on damaged or hostile bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let body = header(bytes, MAGIC, "a Veil encrypted model")?;
        let body: Body = crate::wire::options(MAX_FILE_BYTES)
            .deserialize(body)
            .map_err(|e| bad(format!("damaged encrypted model: {e}")))?;
        validate(&body).map_err(|why| bad(format!("invalid encrypted model: {why}")))?;
        Ok(EncryptedModel {
            body,
            digest: sha256_hex(bytes),
        })
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        std::fs::write(path, self.to_bytes())
            .map_err(|e| bad(format!("writing {}: {e}", path.display())))
    }

    pub fn load(path: &Path) -> Result<Self> {
        Self::from_bytes(&read_bounded(path)?)
    }

    /// Hex SHA-256 of the file's bytes: results name the model by it.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// Id of the evaluation key that runs this model (its owner's).
    pub fn key_id(&self) -> &str {
        &self.body.key_id
    }

    pub fn params(&self) -> ParamSet {
        self.body.params
    }

    pub fn reveal(&self) -> Reveal {
        self.body.reveal
    }

    pub fn task(&self) -> Task {
        self.body.task
    }

    pub fn n_features(&self) -> usize {
        self.body.input.quant.len()
    }

    pub fn n_outputs(&self) -> usize {
        self.body.outputs.len()
    }

    /// Bootstraps per sample: one per encrypted table.
    pub fn pbs_per_sample(&self) -> usize {
        self.body.tables.len() / POSITIONS as usize
    }

    /// Encrypted weights on input features (with the neurons' constants).
    pub fn n_encrypted_weights(&self) -> usize {
        self.body.weights.len()
    }

    /// Quantizes one clear row onto the model's input grids (NaN, infinities and huge values
    /// refused with the row and column named).
    pub fn quantize_row(&self, row: usize, x: &[f64]) -> Result<Vec<i64>> {
        Ok(self.body.input.quantize_row(row, x)?)
    }

    /// Expands the ciphertexts from their seeds, ready to run (about 16 KiB per weight and
    /// 32 KiB per table).
    pub fn expand(&self) -> Result<Runnable<'_>> {
        let b = &self.body;
        let modulus = CiphertextModulus::new_native();
        let lwe_size = big_lwe_size(b.params);
        let seeded = SeededLweCiphertextList::from_container(
            b.weights.as_slice(),
            LweSize(lwe_size),
            CompressionSeed::from(Seed(b.weight_seed)),
            modulus,
        );
        let mut weights = LweCiphertextList::new(
            0u64,
            LweSize(lwe_size),
            LweCiphertextCount(b.weights.len()),
            modulus,
        );
        par_decompress_seeded_lwe_ciphertext_list::<_, _, _, DefaultRandomGenerator>(
            &mut weights,
            &seeded,
        );
        let poly = PolynomialSize(POSITIONS as usize);
        let glwe_size = shortint_params(b.params).glwe_dimension.to_glwe_size();
        let seeded = SeededGlweCiphertextList::from_container(
            b.tables.as_slice(),
            glwe_size,
            poly,
            CompressionSeed::from(Seed(b.table_seed)),
            modulus,
        );
        let mut tables = GlweCiphertextList::new(
            0u64,
            glwe_size,
            poly,
            GlweCiphertextCount(self.pbs_per_sample()),
            modulus,
        );
        decompress_seeded_glwe_ciphertext_list::<_, _, _, DefaultRandomGenerator>(
            &mut tables,
            &seeded,
        );
        let public_key = SeededLweCompactPublicKey::from_container(
            b.public_key.clone(),
            CompressionSeed::from(Seed(b.public_key_seed)),
            modulus,
        )
        .decompress_into_lwe_compact_public_key();
        Ok(Runnable::new(b, weights, tables, public_key))
    }
}

/// Where a model owner keeps the clear compiled model behind each encrypted model she made:
/// `<keys dir>/models/<digest>.veil`, found again from a results file's digest. The digest
/// comes from untrusted bytes, so anything but 64 lowercase hex digits is refused.
pub fn owner_model_path(keys_dir: &Path, digest: &str) -> Result<PathBuf> {
    let hex = digest.len() == 64
        && digest
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !hex {
        return Err(bad(format!(
            "a model digest is 64 lowercase hex digits, not '{}'",
            digest.escape_debug().take(80).collect::<String>()
        )));
    }
    Ok(keys_dir.join("models").join(format!("{digest}.veil")))
}

fn check_counts(weights: usize, tables: usize) -> Result<()> {
    if weights > MAX_ENCRYPTED_WEIGHTS || tables > MAX_ENCRYPTED_TABLES {
        return Err(RuntimeError::Unsupported(format!(
            "{weights} encrypted weights and {tables} encrypted tables; encrypted-model mode \
             holds at most {MAX_ENCRYPTED_WEIGHTS} and {MAX_ENCRYPTED_TABLES} (each expands to \
             16 and 32 KiB): a smaller model, or serve it in the usual mode"
        )));
    }
    Ok(())
}

/// Every index and count the evaluation relies on.
fn validate(b: &Body) -> std::result::Result<(), String> {
    b.input.check()?;
    if !b.input.windows.is_empty() {
        return Err("input windows (tree models) are not supported".into());
    }
    let n_features = b.input.quant.len();
    let product = b
        .input_shape
        .iter()
        .try_fold(1usize, |p, &d| p.checked_mul(d));
    if product != Some(n_features) {
        return Err(format!(
            "input shape {:?} does not match {n_features} features",
            b.input_shape
        ));
    }
    if b.stages.len() > MAX_STAGES
        || !(1..=MAX_OUTPUTS).contains(&b.outputs.len())
        || !(1..=64).contains(&b.output_bits)
    {
        return Err(format!(
            "{} stages, {} outputs at {} bits",
            b.stages.len(),
            b.outputs.len(),
            b.output_bits
        ));
    }
    if b.reveal == Reveal::Label && b.outputs.len() != 1 {
        return Err("a label-only model has one output".into());
    }
    let (mut n_weights, mut n_tables, mut lookups_before) = (0usize, 0usize, 0usize);
    let forms = b
        .stages
        .iter()
        .map(|forms| (forms.as_slice(), true))
        .chain([(b.outputs.as_slice(), false)]);
    for (forms, neurons) in forms {
        if forms.is_empty() {
            return Err("an empty stage".into());
        }
        for f in forms {
            if f.inputs.iter().any(|&j| j as usize >= n_features)
                || f.lookups.iter().any(|&l| l as usize >= lookups_before)
            {
                return Err("a form reads a value not computed before it".into());
            }
            // One constant per neuron, none per output.
            n_weights = n_weights.saturating_add(f.inputs.len() + usize::from(neurons));
            n_tables = n_tables.saturating_add(f.lookups.len());
            if n_weights > MAX_ENCRYPTED_WEIGHTS || n_tables > MAX_ENCRYPTED_TABLES {
                return Err(format!(
                    "more than {MAX_ENCRYPTED_WEIGHTS} weights or {MAX_ENCRYPTED_TABLES} tables"
                ));
            }
        }
        if neurons {
            lookups_before += forms.len();
        }
    }
    if b.public_key.len() != POSITIONS as usize || b.flood_bits > 60 {
        return Err(format!(
            "a public key of {} words, flooding of {} bits",
            b.public_key.len(),
            b.flood_bits
        ));
    }
    if b.weights.len() != n_weights || b.tables.len() != n_tables * POSITIONS as usize {
        return Err(format!(
            "{} weight and {} table words for {n_weights} weights and {n_tables} tables",
            b.weights.len(),
            b.tables.len()
        ));
    }
    Ok(())
}

/// An encrypted model with its ciphertexts expanded, and the schedule of its bootstraps.
pub struct Runnable<'m> {
    body: &'m Body,
    weights: LweCiphertextListOwned<u64>,
    tables: GlweCiphertextListOwned<u64>,
    public_key: LweCompactPublicKeyOwned<u64>,
    lwe_size: usize,
    /// Per form (stages, then outputs): first weight and first table.
    weight_start: Vec<usize>,
    table_start: Vec<usize>,
    /// Per table: the stage and neuron it reads, and its slot among that stage's reads.
    source: Vec<(usize, usize)>,
    slot: Vec<usize>,
    /// Per stage: the tables reading its neurons, in table order.
    reads_of_stage: Vec<Vec<usize>>,
}

impl<'m> Runnable<'m> {
    fn new(
        body: &'m Body,
        weights: LweCiphertextListOwned<u64>,
        tables: GlweCiphertextListOwned<u64>,
        public_key: LweCompactPublicKeyOwned<u64>,
    ) -> Self {
        let mut lookup_at = Vec::new();
        for (s, forms) in body.stages.iter().enumerate() {
            lookup_at.extend((0..forms.len()).map(|n| (s, n)));
        }
        let (mut weight_start, mut table_start) = (Vec::new(), Vec::new());
        let (mut w, mut t) = (0usize, 0usize);
        let mut reads_of_stage = vec![Vec::new(); body.stages.len()];
        let (mut source, mut slot) = (Vec::new(), Vec::new());
        let forms = body
            .stages
            .iter()
            .flat_map(|f| f.iter().map(|f| (f, 1)))
            .chain(body.outputs.iter().map(|f| (f, 0)));
        for (f, constants) in forms {
            weight_start.push(w);
            table_start.push(t);
            w += f.inputs.len() + constants;
            for &l in &f.lookups {
                let (s, neuron) = lookup_at[l as usize];
                source.push((s, neuron));
                slot.push(reads_of_stage[s].len());
                reads_of_stage[s].push(t);
                t += 1;
            }
        }
        Runnable {
            body,
            weights,
            tables,
            public_key,
            lwe_size: big_lwe_size(body.params),
            weight_start,
            table_start,
            source,
            slot,
            reads_of_stage,
        }
    }

    /// Runs the model on quantized clear rows ([`EncryptedModel::quantize_row`]); each
    /// stage's bootstraps go to the backend as one batch across the rows. The outputs are
    /// encrypted under the owner's key.
    pub fn evaluate(
        &self,
        backend: &dyn PbsBackend,
        rows: &[Vec<i64>],
    ) -> Result<Vec<EncryptedOutput>> {
        let n_features = self.body.input.quant.len();
        if let Some(i) = rows.iter().position(|r| r.len() != n_features) {
            return Err(RuntimeError::Shape(format!(
                "row {i}: {} values, the model takes {n_features}",
                rows[i].len()
            )));
        }
        let samples = rows.len();
        if samples == 0 {
            return Ok(Vec::new());
        }
        let size = self.lwe_size;
        let modulus = CiphertextModulus::new_native();
        // The bootstrapped reads of each stage, slot-major: slot k of sample s at k*samples+s.
        let mut reads: Vec<Vec<u64>> = Vec::with_capacity(self.body.stages.len());
        let mut form = 0usize;
        for (s, forms) in self.body.stages.iter().enumerate() {
            let acc = self.sums(rows, &reads, forms, form, true);
            form += forms.len();
            let stage_reads = &self.reads_of_stage[s];
            let n = forms.len();
            let mut input_of = Vec::with_capacity(stage_reads.len() * samples);
            let mut lut_index = Vec::with_capacity(stage_reads.len() * samples);
            for &t in stage_reads {
                let neuron = self.source[t].1;
                for sample in 0..samples {
                    input_of.push(sample * n + neuron);
                    lut_index.push(t);
                }
            }
            let mut out = vec![0u64; lut_index.len() * size];
            if !lut_index.is_empty() {
                backend.bootstrap_shared(
                    LweCiphertextList::from_container(acc.as_slice(), LweSize(size), modulus),
                    &input_of,
                    self.tables.as_view(),
                    &lut_index,
                    LweCiphertextList::from_container(out.as_mut_slice(), LweSize(size), modulus)
                        .as_mut_view(),
                )?;
            }
            reads.push(out);
        }
        let mut acc = self.sums(rows, &reads, &self.body.outputs, form, false);
        self.rerandomize(&mut acc);
        let per_sample = self.body.outputs.len() * size;
        acc.par_chunks_exact(per_sample)
            .map(|c| EncryptedOutput::switched_from(c, size, self.body.output_bits))
            .collect()
    }

    /// Adds to every output a fresh public-key encryption of zero whose body noise is the
    /// model's flooding: the owner then sees a fresh mask, and (label outputs) the noise the
    /// evaluation left is drowned.
    fn rerandomize(&self, outputs: &mut [u64]) {
        let size = self.lwe_size;
        let modulus = CiphertextModulus::new_native();
        let mut seeder = new_seeder();
        let mut generator = EncryptionRandomGenerator::<DefaultRandomGenerator>::new(
            seeder.seed(),
            seeder.as_mut(),
        );
        let mask_noise = DynamicDistribution::new_t_uniform(PUBLIC_KEY_NOISE_BITS);
        let body_noise =
            DynamicDistribution::new_t_uniform(self.body.flood_bits.max(PUBLIC_KEY_NOISE_BITS));
        let mut zero = LweCiphertext::new(0u64, LweSize(size), modulus);
        for ct in outputs.chunks_exact_mut(size) {
            encrypt_lwe_ciphertext_with_compact_public_key(
                &self.public_key,
                &mut zero,
                Plaintext(0),
                mask_noise,
                body_noise,
                generator.noise_generator_mut(),
            );
            slice_wrapping_add_assign(ct, zero.as_ref());
        }
    }

    /// Each sample's sums of `forms` (numbered from `first`): clear inputs times encrypted
    /// weights, the bootstrapped reads of earlier stages, and (for neurons) the encrypted
    /// constant plus the modulus switch's centring.
    fn sums(
        &self,
        rows: &[Vec<i64>],
        reads: &[Vec<u64>],
        forms: &[Form],
        first: usize,
        constant: bool,
    ) -> Vec<u64> {
        let size = self.lwe_size;
        let samples = rows.len();
        let weights = self.weights.as_ref();
        let mut out = vec![0u64; samples * forms.len() * size];
        out.par_chunks_exact_mut(size)
            .enumerate()
            .for_each(|(i, ct)| {
                let (sample, n) = (i / forms.len(), i % forms.len());
                let f = &forms[n];
                let w0 = self.weight_start[first + n];
                for (k, &j) in f.inputs.iter().enumerate() {
                    let w = &weights[(w0 + k) * size..(w0 + k + 1) * size];
                    slice_wrapping_add_scalar_mul_assign(ct, w, rows[sample][j as usize] as u64);
                }
                let t0 = self.table_start[first + n];
                for t in t0..t0 + f.lookups.len() {
                    let s = self.source[t].0;
                    let at = (self.slot[t] * samples + sample) * size;
                    slice_wrapping_add_assign(ct, &reads[s][at..at + size]);
                }
                if constant {
                    let w = w0 + f.inputs.len();
                    slice_wrapping_add_assign(ct, &weights[w * size..(w + 1) * size]);
                    let body = &mut ct[size - 1];
                    *body = body.wrapping_add(CENTERED_SWITCH_FIX);
                }
            });
        out
    }
}

/// What the evaluator sends back to the model owner: one sample's encrypted outputs per row,
/// named by the model's digest and the owner's key id.
pub struct EncryptedResults {
    pub model_digest: String,
    pub key_id: String,
    pub outputs: Vec<EncryptedOutput>,
}

#[derive(Serialize, Deserialize)]
struct ResultsBody {
    model_digest: String,
    key_id: String,
    n_outputs: u64,
    lwe_size: u64,
    bits: u32,
    rows: Vec<Vec<u8>>,
}

impl EncryptedResults {
    pub fn to_bytes(&self) -> Vec<u8> {
        let first = self.outputs.first();
        let body = ResultsBody {
            model_digest: self.model_digest.clone(),
            key_id: self.key_id.clone(),
            n_outputs: first.map_or(0, |o| o.len() as u64),
            lwe_size: first.map_or(0, |o| o.list.lwe_size().0 as u64),
            bits: first.map_or(64, EncryptedOutput::bits),
            rows: self.outputs.iter().map(EncryptedOutput::to_bytes).collect(),
        };
        with_header(RESULTS_MAGIC, &body)
    }

    /// Parses a results file for a model of `params` with `n_outputs` outputs switched to
    /// `bits` bits; anything else is refused.
    pub fn from_bytes(bytes: &[u8], params: ParamSet, n_outputs: usize, bits: u32) -> Result<Self> {
        let body = header(bytes, RESULTS_MAGIC, "a Veil results file")?;
        let body: ResultsBody = crate::wire::options(MAX_FILE_BYTES)
            .deserialize(body)
            .map_err(|e| bad(format!("damaged results file: {e}")))?;
        let lwe_size = big_lwe_size(params);
        if body.n_outputs != n_outputs as u64
            || body.lwe_size != lwe_size as u64
            || body.bits != bits
        {
            return Err(bad(format!(
                "the results hold {} outputs of LWE size {} at {} bits per row; the model \
                 gives {n_outputs} of size {lwe_size} at {bits} bits",
                body.n_outputs, body.lwe_size, body.bits
            )));
        }
        if body.rows.len() > MAX_RESULT_ROWS {
            return Err(bad(format!(
                "{} rows, at most {MAX_RESULT_ROWS}",
                body.rows.len()
            )));
        }
        let outputs = body
            .rows
            .iter()
            .map(|r| EncryptedOutput::from_bytes(r, n_outputs, lwe_size, bits))
            .collect::<Result<Vec<_>>>()?;
        Ok(EncryptedResults {
            model_digest: body.model_digest,
            key_id: body.key_id,
            outputs,
        })
    }

    /// Reads only the names (model digest, key id) of a results file, to find its model.
    pub fn names(bytes: &[u8]) -> Result<(String, String)> {
        let body = header(bytes, RESULTS_MAGIC, "a Veil results file")?;
        #[derive(Deserialize)]
        struct Names {
            model_digest: String,
            key_id: String,
        }
        // The names come first; the limit only stops a hostile length prefix.
        let names: Names = bincode::DefaultOptions::new()
            .with_fixint_encoding()
            .with_limit(1 << 16)
            .allow_trailing_bytes()
            .deserialize(body)
            .map_err(|e| bad(format!("damaged results file: {e}")))?;
        Ok((names.model_digest, names.key_id))
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        std::fs::write(path, self.to_bytes())
            .map_err(|e| bad(format!("writing {}: {e}", path.display())))
    }

    pub fn read(path: &Path) -> Result<Vec<u8>> {
        read_bounded(path)
    }

    /// Decrypts every row into the output accumulators of `model` (the owner's clear
    /// compiled model, whose encryption these results came from) with the owner's `key`.
    pub fn decrypt(
        &self,
        key: &ClientKey,
        key_id: &str,
        model: &CompiledModel,
    ) -> Result<Vec<Vec<f64>>> {
        if self.key_id != key_id {
            return Err(bad(format!(
                "the results were computed for key {}, this key is {key_id}: only the key the \
                 model was encrypted under decrypts them",
                self.key_id
            )));
        }
        let spec = model.client_spec();
        self.outputs.iter().map(|o| key.decrypt(&spec, o)).collect()
    }
}
