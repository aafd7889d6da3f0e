//! What one dense neuron costs on tfhe's integer (radix) API, next to Veil's path, on the
//! same machine and parameter set: `cargo run --release -p veil-models --example radix_cost`
//!
//! Radix: 16-bit signed values as 8 blocks of MESSAGE_2_CARRY_2; 16 products with 4-bit
//! cleartext weights summed, then ReLU as a comparison with 0. Veil: the same 16-term sum as
//! cleartext-weighted additions of LWE ciphertexts, then one keyswitch + bootstrap.

use std::time::Instant;

use tfhe::integer::{RadixClientKey, ServerKey as IntegerServerKey};
use tfhe::shortint::parameters::PARAM_MESSAGE_2_CARRY_2_KS_PBS_TUNIFORM_2M128;

fn main() {
    let blocks = 8;
    let (ck, sk) =
        tfhe::integer::gen_keys_radix(PARAM_MESSAGE_2_CARRY_2_KS_PBS_TUNIFORM_2M128, blocks);
    let ck: RadixClientKey = ck;
    let sk: IntegerServerKey = sk;
    let xs: Vec<_> = (0..16u64)
        .map(|i| ck.encrypt_signed(i as i64 % 7))
        .collect();
    let ws: Vec<i64> = (0..16).map(|i| (i % 15) - 7).collect();
    let t = Instant::now();
    let products: Vec<_> = xs
        .iter()
        .zip(&ws)
        .map(|(x, &w)| sk.scalar_mul_parallelized(x, w))
        .collect();
    let sum = sk
        .sum_ciphertexts_parallelized(products.iter())
        .expect("16 terms");
    let t_linear = t.elapsed();
    let t = Instant::now();
    let relu = sk.scalar_max_parallelized(&sum, 0i64);
    let t_relu = t.elapsed();
    let expected: i64 = (0..16)
        .map(|i| (i % 7) * ((i % 15) - 7))
        .sum::<i64>()
        .max(0);
    let got: i64 = ck.decrypt_signed(&relu);
    assert_eq!(got, expected, "radix result");
    println!(
        "radix ({} blocks): 16 multiply-accumulates {:.2} s, ReLU {:.2} s, neuron {:.2} s on {} threads",
        blocks,
        t_linear.as_secs_f64(),
        t_relu.as_secs_f64(),
        (t_linear + t_relu).as_secs_f64(),
        rayon::current_num_threads()
    );
}
