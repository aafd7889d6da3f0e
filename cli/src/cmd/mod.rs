pub mod bench_pbs;
pub mod compile;
pub mod conn;
pub mod estimate;
pub mod eval;
pub mod infer;
pub mod keygen;
pub mod models;
