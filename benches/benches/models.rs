//! Whole-model encrypted inference for each shipped model, one sample per request and a
//! batch of 8. `cargo bench -p veil-benches --bench models`

use std::path::PathBuf;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use veil_models::data::{Labels, read_csv};
use veil_models::{QuantConfig, compile, onnx};
use veil_runtime::{ClientKey, CpuBackend, FheModel, ServerKey};

const ZOO: [&str; 5] = [
    "digits_mlp",
    "digits_cnn",
    "breast_cancer_logreg",
    "iris_logreg",
    "wine_mlp",
];

fn models(c: &mut Criterion) {
    let zoo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/zoo");
    let mut keys = None;
    let mut g = c.benchmark_group("encrypted_inference");
    g.sample_size(10);
    for name in ZOO {
        let float = onnx::import_file(&zoo.join(name).join("model.onnx")).unwrap();
        let train = read_csv(
            &zoo.join(name).join("train.csv"),
            float.n_features(),
            Labels::Optional,
        )
        .unwrap();
        let test = read_csv(
            &zoo.join(name).join("test.csv"),
            float.n_features(),
            Labels::Required,
        )
        .unwrap();
        let model = compile(&float, &train.features, &QuantConfig::default()).unwrap();
        let (client, server) = keys.get_or_insert_with(|| {
            let client = ClientKey::generate(model.params);
            let server =
                ServerKey::from_compressed(model.params, &client.compressed_server_key()).unwrap();
            (client, server)
        });
        let backend = CpuBackend::new(server);
        let spec = model.client_spec();
        let fhe = FheModel::new(model).unwrap();
        for batch in [1usize, 8] {
            let inputs: Vec<_> = test.features[..batch]
                .iter()
                .map(|x| client.encrypt(&spec, x).unwrap())
                .collect();
            g.throughput(Throughput::Elements(batch as u64));
            g.bench_function(BenchmarkId::new(name, format!("batch{batch}")), |b| {
                b.iter(|| fhe.evaluate(&backend, &inputs).unwrap())
            });
        }
    }
    g.finish();
}

criterion_group!(benches, models);
criterion_main!(benches);
