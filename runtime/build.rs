//! With the `gpu` feature, compiles Veil's CUDA kernels (`src/gpu/kernels.cu`) with nvcc:
//! `VEIL_NVCC`, else `NVCC`, else `nvcc` on PATH, for the architecture `VEIL_CUDA_SM` (default
//! 90: H100/H200), as SASS only (scripts/build-gpu.sh sets all of it).

fn main() {
    if std::env::var_os("CARGO_FEATURE_GPU").is_some() {
        build_kernels();
    }
}

fn build_kernels() {
    const SRC: &str = "src/gpu/kernels.cu";
    println!("cargo:rerun-if-changed={SRC}");
    for var in ["VEIL_NVCC", "NVCC", "VEIL_CUDA_SM"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let nvcc = std::env::var("VEIL_NVCC")
        .or_else(|_| std::env::var("NVCC"))
        .unwrap_or_else(|_| "nvcc".into());
    let sm = std::env::var("VEIL_CUDA_SM").unwrap_or_else(|_| "90".into());
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let obj = out.join("veil_kernels.o");
    run(std::process::Command::new(&nvcc)
        .args(["-c", "-O3", "-std=c++17", "-Xcompiler", "-fPIC"])
        .arg(format!("-gencode=arch=compute_{sm},code=sm_{sm}"))
        .arg(SRC)
        .arg("-o")
        .arg(&obj));
    run(std::process::Command::new("ar")
        .arg("crs")
        .arg(out.join("libveil_kernels.a"))
        .arg(&obj));
    println!("cargo:rustc-link-search=native={}", out.display());
    println!("cargo:rustc-link-lib=static=veil_kernels");
    // The CUDA runtime comes from tfhe-cuda-backend's link line (static, from the same
    // toolkit), so it is not named here.
}

fn run(cmd: &mut std::process::Command) {
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(status.success(), "{cmd:?} failed: {status}");
}
