//! Label-only models: the argmax under encryption (simulated here; encrypted in fhe.rs), and
//! the compact responses of both modes, sized from the encoding.

mod common;

use common::*;
use veil_models::Simulate;
use veil_models::compiled::output_wire_bytes;
use veil_models::graph::Reveal;
use veil_models::simulate::NoiseRng;
use veil_models::{QuantConfig, compile};
use veil_runtime::big_lwe_size;

/// Every zoo classifier compiles in label mode, and its simulated class index agrees with the
/// scores model's argmax on the test set (all rows), without and with the predicted noise.
#[test]
fn label_models_agree_with_the_scores_argmax() {
    // Every classifier of the zoo, tree ensembles included.
    for name in ZOO
        .into_iter()
        .chain(["breast_cancer_xgb", "wine_rf", "iris_lgbm"])
    {
        let (float, scores) = compiled(name);
        let train = dataset(name, "train.csv", float.n_features());
        let test = dataset(name, "test.csv", float.n_features());
        let k = float.n_scores();
        let label_float = float.clone().with_reveal(Reveal::Label).unwrap();
        let label = compile(&label_float, &train.features, &QuantConfig::default()).unwrap();
        assert_eq!(label.reveal, Reveal::Label);
        assert_eq!(label.n_outputs(), 1, "{name}");
        // The bracket argmax: under 6 bootstraps per class (grid reads, matches, index bits).
        let extra = label.pbs_per_sample() - scores.pbs_per_sample();
        assert!(extra <= 6 * k.max(1), "{name}: {extra} argmax bootstraps");
        let counted: usize = label
            .nodes
            .iter()
            .filter(|n| n.node == veil_models::graph::LABEL_ORIGIN)
            .map(|n| n.pbs)
            .sum();
        assert_eq!(
            counted, extra,
            "{name}: the argmax's bootstraps are counted"
        );
        let lwe = big_lwe_size(label.params);
        let bits = label.output.decoding.modulus_bits;
        let bytes = output_wire_bytes(1, lwe, bits);
        assert!(bytes <= 4096, "{name}: label response {bytes} bytes");
        let sbits = scores.output.decoding.modulus_bits;
        assert!(
            output_wire_bytes(1, lwe, sbits) <= 8_200,
            "{name}: {sbits} bits"
        );

        let n = test.features.len();
        let (mut agree, mut noisy_agree, mut float_agree, mut overflows) = (0, 0, 0, 0);
        let mut refused = 0;
        let mut rng = NoiseRng::new(5);
        for x in &test.features {
            let want = scores
                .decode(&scores.simulate(x, None).unwrap().accs)
                .unwrap()
                .label;
            let sim = label.simulate(x, None).unwrap();
            overflows += sim.overflows;
            let got = label.decode(&sim.accs).unwrap().label;
            agree += usize::from(got == want);
            let noisy = label.simulate(x, Some(&mut rng)).unwrap();
            // A final near-tie may read inconsistently under noise: refused, never a guess.
            match label.decode(&noisy.accs) {
                Ok(p) => noisy_agree += usize::from(p.label == want),
                Err(veil_format::FormatError::InconsistentLabel { .. }) => refused += 1,
                Err(e) => panic!("{name}: {e}"),
            }
            float_agree += usize::from(
                label_float.predict(x).unwrap().label == float.predict(x).unwrap().label,
            );
            // The index is an exact small integer: the output reads it without rounding.
            let idx = label.output.decoding.scores(&sim.accs)[0];
            assert!(
                (idx - idx.round()).abs() < 1e-9 && idx >= 0.0 && idx < k.max(2) as f64,
                "{name}: index {idx}"
            );
        }
        eprintln!(
            "{name}: K = {k}, {} + {extra} bootstraps, {bits}-bit label response of {bytes} \
             bytes ({sbits}-bit scores); label = scores argmax on {agree}/{n} (noisy \
             simulation {noisy_agree}/{n}, {refused} refused), overflows {overflows}",
            scores.pbs_per_sample()
        );
        assert_eq!(float_agree, n, "{name}: float argmax under the label graph");
        let min = if name == "digits_mlp" { 0.98 } else { 0.95 };
        assert!(
            agree as f64 >= min * n as f64,
            "{name}: {agree}/{n} label predictions equal the scores argmax"
        );
        assert!(noisy_agree as f64 >= (min - 0.02) * n as f64, "{name}");
    }
}
