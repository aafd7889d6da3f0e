//! The real `veil-server` binary in a child process, for tests that measure or signal it.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use veil_models::CompiledModel;
use veil_models::data::{Dataset, Labels, read_csv};
use veil_models::{QuantConfig, compile, onnx};

pub mod s3;

pub fn zoo(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../models/zoo")
        .join(name)
}

/// Compiles a zoo model as `veil compile` does.
pub fn compile_zoo(name: &str) -> CompiledModel {
    let float = onnx::import_file(&zoo(name).join("model.onnx")).unwrap();
    let train = read_csv(
        &zoo(name).join("train.csv"),
        float.n_features(),
        Labels::Optional,
    )
    .unwrap();
    compile(&float, &train.features, &QuantConfig::default()).unwrap()
}

pub fn test_set(name: &str, n_features: usize) -> Dataset {
    read_csv(&zoo(name).join("test.csv"), n_features, Labels::Required).unwrap()
}

/// A fresh folder for one test, removed when dropped.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(label: &str) -> Self {
        let p =
            Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{label}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(p.join("models")).unwrap();
        Scratch(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running `veil-server`, killed when dropped if it has not exited.
pub struct Proc {
    pub child: Child,
    pub addr: String,
    pub metrics_addr: String,
}

impl Proc {
    /// Starts the binary on free loopback ports with `--models`, `--data-dir` under `dir`
    /// and `extra` flags; returns once it listens.
    pub fn start(dir: &Path, extra: &[&str]) -> Proc {
        Self::start_with_env(dir, extra, &[])
    }

    /// [`Proc::start`] with extra environment variables.
    pub fn start_with_env(dir: &Path, extra: &[&str], env: &[(&str, String)]) -> Proc {
        let mut child = Command::new(env!("CARGO_BIN_EXE_veil-server"))
            .envs(env.iter().map(|(k, v)| (k, v)))
            .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
            .arg("--models")
            .arg(dir.join("models"))
            .arg("--data-dir")
            .arg(dir.join("data"))
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        let addr = line
            .trim()
            .strip_prefix("veil-server listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string();
        line.clear();
        out.read_line(&mut line).unwrap();
        let metrics_addr = line
            .trim()
            .strip_prefix("veil-server metrics on http://")
            .and_then(|s| s.strip_suffix("/metrics"))
            .unwrap_or_else(|| panic!("unexpected second line {line:?}"))
            .to_string();
        Proc {
            child,
            addr,
            metrics_addr,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The server process's resident set (VmRSS), in bytes.
    pub fn rss(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let kib: u64 = s
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().strip_suffix("kB"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no VmRSS in\n{s}"));
        kib << 10
    }

    /// The Prometheus text the server exports.
    pub fn metrics(&self) -> String {
        let mut s = std::net::TcpStream::connect(&self.metrics_addr).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.1 200"), "{out:.200}");
        out
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }

    /// Waits for the process to exit, at most `limit`; `None` if it is still running.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            if start.elapsed() > limit {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One sample of the exposition text; a missing sample fails the test.
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (n, v) = l.rsplit_once(' ')?;
            (n == name).then(|| v.trim().parse().ok())?
        })
        .unwrap_or_else(|| panic!("no metric sample {name} in\n{text}"))
}

/// Polls `cond` until it holds, failing the test after `limit`.
pub fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A two-worker tokio runtime for the clients of a test.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A tenants file's `[[tenant]]` table for `name` with bearer `token` and extra TOML lines.
pub fn tenant_toml(name: &str, token: &str, extra: &str) -> String {
    format!(
        "[[tenant]]\nname = \"{name}\"\ntoken_sha256 = \"{}\"\n{extra}\n",
        veil_server::token_sha256(token)
    )
}
