//! Measures how precisely one keyswitch + bootstrap reads an accumulator, through Veil's own
//! CPU backend (centered modulus switch, batched blind rotation) with real 128-bit keys.
//!
//! `cargo run --release -p veil-models --example noise_probe -- [READS]`
//!
//! Two cases, as in a real network: layer 1 reads a weighted sum of fresh encryptions,
//! hidden layers read a weighted sum of bootstrap outputs (5-bit weights, 32 terms).
//! Positions are the 4096 steps of the modulus-switched circle (2048 programmable).

use tfhe::core_crypto::prelude::*;
use veil_models::compiled::{GUARD, POSITION, POSITIONS, ParamSet};
use veil_runtime::{ClientKey, CpuBackend, PbsBackend, ServerKey};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn main() {
    let reads: usize = std::env::args().nth(1).map_or(1024, |s| s.parse().unwrap());
    let params = ParamSet::Message2Carry2KsPbsTuniform2m128;
    let client = ClientKey::generate(params);
    let server = ServerKey::from_compressed(params, &client.compressed_server_key()).unwrap();
    let backend = CpuBackend::new(&server);
    let integer: &tfhe::integer::ClientKey = client.high_level().as_ref();
    let shortint: &tfhe::shortint::ClientKey = integer.as_ref();
    let (key, noise) = shortint.encryption_key_and_noise();
    let size = key.lwe_dimension().to_lwe_size();
    let modulus = CiphertextModulus::new_native();
    let sp = veil_runtime::shortint_params(params);
    let (poly, glwe_size) = (sp.polynomial_size, sp.glwe_dimension.to_glwe_size());
    let mut seeder = new_seeder();
    let mut enc =
        EncryptionRandomGenerator::<DefaultRandomGenerator>::new(seeder.seed(), seeder.as_mut());
    // Identity lookup table: position p -> p * POSITION (decrypts back to p).
    let identity = generate_programmable_bootstrap_glwe_lut(
        poly,
        glwe_size,
        POSITIONS as usize,
        modulus,
        1u64,
        |p: u64| p.wrapping_mul(POSITION as u64),
    );
    let luts =
        GlweCiphertextList::from_container(identity.as_ref().to_vec(), glwe_size, poly, modulus);
    let fix = 1u64 << 51; // the executor's centered-switch correction
    let mut rng = Rng(42);

    let read = |inputs: &LweCiphertextListOwned<u64>| -> Vec<i64> {
        let n = inputs.lwe_ciphertext_count().0;
        let mut out = LweCiphertextList::new(0u64, size, LweCiphertextCount(n), modulus);
        backend
            .bootstrap_batch(
                inputs.as_view(),
                luts.as_view(),
                &vec![0; n],
                out.as_mut_view(),
            )
            .expect("the CPU backend reports no errors");
        out.iter()
            .map(|ct| {
                let d = decrypt_lwe_ciphertext(&key, &ct).0;
                (d.wrapping_add(1 << 51) >> 52) as i64
            })
            .collect()
    };
    let report = |name: &str, errs: &[i64], sum_w2: f64| {
        let n = errs.len() as f64;
        let mean = errs.iter().sum::<i64>() as f64 / n;
        let var = errs.iter().map(|&e| (e as f64 - mean).powi(2)).sum::<f64>() / n;
        let max = errs.iter().map(|e| e.abs()).max().unwrap();
        println!(
            "{name}: {} reads, mean sum w^2 {sum_w2:.0}: error mean {mean:+.2} positions, std {:.2}, max |error| {max}",
            errs.len(),
            var.sqrt()
        );
        // A LUT that reads the top b bits has boxes of 2048 / 2^b positions; a read lands in
        // the wrong box when the error crosses the nearest box edge.
        for bits in [3u32, 4, 5, 6, 7] {
            let bx = POSITIONS / (1 << bits);
            let mut off = 0usize;
            let mut far = 0usize;
            for (k, &e) in errs.iter().enumerate() {
                // the true value sits uniformly inside its box
                let within = ((k as u64).wrapping_mul(2654435761) % bx as u64) as i64;
                let wrong = (within + e).div_euclid(bx);
                if wrong != 0 {
                    off += 1;
                }
                if wrong.abs() > 1 {
                    far += 1;
                }
            }
            println!(
                "    top {bits} bits (box {bx:4} positions): off by one {:.2}%, off by more {:.2}%",
                100.0 * off as f64 / n,
                100.0 * far as f64 / n
            );
        }
    };

    // Layer 1: the accumulator position itself, freshly encrypted (a weighted sum of fresh
    // inputs adds nothing measurable: their noise is ~1e-11 positions).
    let targets: Vec<i64> = (0..reads)
        .map(|_| GUARD + rng.below((POSITIONS - 2 * GUARD) as u64) as i64)
        .collect();
    let plain: Vec<u64> = targets
        .iter()
        .map(|&v| ((v as u64) << 52).wrapping_add(fix))
        .collect();
    let mut fresh = LweCiphertextList::new(0u64, size, LweCiphertextCount(reads), modulus);
    encrypt_lwe_ciphertext_list(
        &key,
        &mut fresh,
        &PlaintextList::from_container(plain),
        noise,
        &mut enc,
    );
    let got = read(&fresh);
    let errs: Vec<i64> = got.iter().zip(&targets).map(|(g, t)| g - t).collect();
    report("layer 1 (fresh inputs)", &errs, 0.0);

    // Hidden layer: 32 bootstrap outputs x_j in [0, 31] at scale delta, 5-bit weights.
    let terms = 32;
    let xs: Vec<u64> = (0..reads * terms).map(|_| rng.below(32)).collect();
    let delta: u64 = 1 << 48; // |sum| <= 32 * 15 * 31 = 14880 -> at most 930 positions
    // x sits at position GUARD + x, away from the negacyclic edge at 0
    let plain: Vec<u64> = xs
        .iter()
        .map(|&x| ((x + GUARD as u64) << 52).wrapping_add(fix))
        .collect();
    let mut enc_x = LweCiphertextList::new(0u64, size, LweCiphertextCount(reads * terms), modulus);
    encrypt_lwe_ciphertext_list(
        &key,
        &mut enc_x,
        &PlaintextList::from_container(plain),
        noise,
        &mut enc,
    );
    // Bootstrap them first (as the previous layer does), re-scaled to delta.
    let scaled_lut = generate_programmable_bootstrap_glwe_lut(
        poly,
        glwe_size,
        POSITIONS as usize,
        modulus,
        1u64,
        |p: u64| p.wrapping_sub(GUARD as u64).wrapping_mul(delta),
    );
    let scaled =
        GlweCiphertextList::from_container(scaled_lut.as_ref().to_vec(), glwe_size, poly, modulus);
    let mut boot = LweCiphertextList::new(0u64, size, LweCiphertextCount(reads * terms), modulus);
    backend
        .bootstrap_batch(
            enc_x.as_view(),
            scaled.as_view(),
            &vec![0; reads * terms],
            boot.as_mut_view(),
        )
        .expect("the CPU backend reports no errors");
    let mut accs = LweCiphertextList::new(0u64, size, LweCiphertextCount(reads), modulus);
    let mut targets = Vec::with_capacity(reads);
    let mut sum_w2 = 0.0;
    for (r, mut acc) in accs.iter_mut().enumerate() {
        let mut exact: i64 = 0;
        for j in 0..terms {
            let w = rng.below(31) as i64 - 15;
            sum_w2 += (w * w) as f64;
            let term = boot.get(r * terms + j);
            // The value this bootstrap actually output (its own read may have been off): the
            // probe measures the next read, not the previous one.
            let x_read = (decrypt_lwe_ciphertext(&key, &term).0 as i64 + delta as i64 / 2)
                .div_euclid(delta as i64);
            exact += w * x_read;
            tfhe::core_crypto::algorithms::slice_algorithms::slice_wrapping_add_scalar_mul_assign(
                acc.as_mut(),
                term.as_ref(),
                w as u64,
            );
        }
        // place the signed sum (|exact| < 2^14) in the middle of the programmable half
        let offset = (1024u64 << 52).wrapping_add(fix);
        *acc.get_mut_body().data = acc.get_body().data.wrapping_add(offset);
        // exact phase in positions: exact * delta / 2^52 + 1024 (delta = 2^48: exact / 16)
        targets.push((exact as f64 / 16.0 + 1024.0).round() as i64);
    }
    let got = read(&accs);
    let errs: Vec<i64> = got.iter().zip(&targets).map(|(g, t)| g - t).collect();
    report(
        "hidden layer (32 bootstrapped terms, 5-bit weights)",
        &errs,
        sum_w2 / reads as f64,
    );
}
