//! A tree ensemble and a regressor served over a real socket: the listing says which is which,
//! the windows tree tests read travel with the input, and the decrypted results match the
//! simulation (labels for the classifier, values within the plan's bound for the regressor).

use veil_client::{Client, KeyPair};
use veil_models::Simulate;
use veil_models::graph::Task;
use veil_server::Config;
use veil_tests::*;

const TMP: &str = env!("CARGO_TARGET_TMPDIR");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tree_classifier_and_regressor_over_grpc() {
    let models = TempDir::new(TMP, "trees-models");
    let data = TempDir::new(TMP, "trees-data");
    let xgb = compile_zoo("breast_cancer_xgb");
    let gbr = compile_zoo("diabetes_gbr");
    install_model(models.path(), "xgb", &xgb);
    install_model(models.path(), "gbr", &gbr);
    let server = TestServer::start(Config::new(models.path(), data.path())).await;
    let client = Client::connect(&server.url()).await.unwrap();

    let listed = client.list_models().await.unwrap();
    let find = |name: &str| listed.iter().find(|m| m.name() == name).unwrap();
    assert_eq!(find("xgb").info.task, "classifier");
    assert_eq!(find("gbr").info.task, "regressor");
    assert_eq!(find("gbr").spec.task, Task::Regression);
    let input = find("xgb").info.input.clone().unwrap();
    assert_eq!(input.windows.len(), xgb.input.windows.len());
    assert!(!input.windows.is_empty(), "tree tests read windows");

    let keys = KeyPair::generate(xgb.params);
    client.ensure_key(&keys, |_, _| {}).await.unwrap();
    for (name, model, rows) in [("xgb", &xgb, 4usize), ("gbr", &gbr, 4)] {
        let remote = find(name);
        let test = test_set(
            if name == "xgb" {
                "breast_cancer_xgb"
            } else {
                "diabetes_gbr"
            },
            model.n_features(),
        );
        let xs = &test.features[..rows];
        let samples = remote.encrypt_batch(&keys, xs.to_vec()).await.unwrap();
        // Features and windows, 8 bytes each, plus the seed and framing.
        for s in &samples {
            assert!(
                s.len() <= 8 * model.n_inputs() + 64,
                "{name}: {} bytes",
                s.len()
            );
            assert!(
                s.len() >= 8 * model.n_inputs(),
                "{name}: every window is sent"
            );
        }
        let reply = client.infer(name, &keys.key_id, samples).await.unwrap();
        for (x, out) in xs.iter().zip(&reply.outputs) {
            let accs = remote.decrypt_accs(&keys, out).unwrap();
            assert!(
                check_sample_against_simulation(model, x, &accs),
                "{name}: the label differs from the simulation's"
            );
            let sim = model
                .decode(&model.simulate(x, None).unwrap().accs)
                .unwrap();
            let got = remote.spec.decode(&accs).unwrap();
            assert_eq!(got.outputs.len(), sim.outputs.len());
            if model.task == Task::Regression {
                // The prediction is a value near the simulation's (checked against the plan's
                // bound above), not a class.
                assert!(
                    (got.outputs[0] - sim.outputs[0]).abs() < 0.05 * sim.outputs[0].abs().max(1.0)
                );
            }
        }
    }
    server.stop().await;
}
