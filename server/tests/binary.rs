//! The `veil-server` binary: starts on a free loopback port, answers health and server
//! reflection (what grpcurl uses), and shuts down cleanly on SIGTERM.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use veil_models::data::{Labels, read_csv};
use veil_models::{QuantConfig, compile, onnx};

#[test]
fn binary_serves_health_and_reflection_and_stops_on_sigterm() {
    let root =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("binary-{}", std::process::id()));
    let models = root.join("models");
    std::fs::create_dir_all(&models).unwrap();
    let zoo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/zoo/iris_logreg");
    let float = onnx::import_file(&zoo.join("model.onnx")).unwrap();
    let train = read_csv(&zoo.join("train.csv"), float.n_features(), Labels::Optional).unwrap();
    compile(&float, &train.features, &QuantConfig::default())
        .unwrap()
        .save(&models.join("iris.veil"))
        .unwrap();

    let mut child = Command::new(env!("CARGO_BIN_EXE_veil-server"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--models",
        ])
        .arg(&models)
        .arg("--data-dir")
        .arg(root.join("data"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    stdout.read_line(&mut line).unwrap();
    let mut metrics_line = String::new();
    stdout.read_line(&mut metrics_line).unwrap();
    let metrics_addr = metrics_line
        .trim()
        .strip_prefix("veil-server metrics on http://")
        .and_then(|s| s.strip_suffix("/metrics"))
        .unwrap_or_else(|| panic!("unexpected second line {metrics_line:?}"))
        .to_string();
    let metrics = {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&metrics_addr).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics:.200}");
    assert!(metrics.contains("veil_inferences_in_flight 0"), "{metrics}");
    let addr = line
        .trim()
        .strip_prefix("veil-server listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    let url = format!("http://{addr}");

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(url)
            .unwrap()
            .connect()
            .await
            .unwrap();
        let status = HealthClient::new(channel.clone())
            .check(HealthCheckRequest {
                service: "veil.v1.Veil".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32);

        let mut reflection = ServerReflectionClient::new(channel);
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut replies = reflection
            .server_reflection_info(tokio_stream::iter(vec![req]))
            .await
            .unwrap()
            .into_inner();
        let reply = replies.message().await.unwrap().unwrap();
        let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
            panic!("unexpected reflection reply {reply:?}");
        };
        let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        for expected in ["veil.v1.Veil", "grpc.health.v1.Health"] {
            assert!(names.iter().any(|n| n == expected), "{names:?}");
        }
    });
    // A well-behaved client goes away; graceful shutdown then finishes at once.
    drop(rt);

    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!("the server did not stop within 30 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "clean exit on SIGTERM: {status:?}");
    let _ = std::fs::remove_dir_all(&root);
}

/// Starts the binary with the tenants file `tenants` and `extra` flags, expecting it to stop
/// at start; its stderr.
fn refused_at_start(label: &str, tenants: &str, extra: &[&str]) -> String {
    let root = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("binary-{label}-{}", std::process::id()));
    std::fs::create_dir_all(root.join("models")).unwrap();
    let file = root.join("tenants.toml");
    std::fs::write(&file, tenants).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_veil-server"))
        .args(extra)
        .args(["--listen", "127.0.0.1:0", "--models"])
        .arg(root.join("models"))
        .arg("--data-dir")
        .arg(root.join("data"))
        .arg("--tenants")
        .arg(&file)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&root);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(out.stdout.is_empty(), "never listened");
    err
}

/// A tenants file the server cannot use stops it at start, saying why.
#[test]
fn a_bad_tenants_file_is_refused_at_start() {
    let err = refused_at_start(
        "tenants",
        "[[tenant]]\nname = \"a\"\ntoken_sha256 = \"not hex\"\n",
        &[],
    );
    assert!(
        err.contains("tenants file") && err.contains("64 hex"),
        "{err}"
    );
}

/// `--log-format json` writes one JSON object per log line, with the level and the message.
#[test]
fn json_logs_are_one_object_per_line() {
    let err = refused_at_start(
        "json-logs",
        "[[tenant]]\nname = \"a\"\n",
        &["--log-format", "json"],
    );
    // The last line is the plain `error: ...` for a person; every log line before is JSON.
    let logs: Vec<serde_json::Value> = err
        .lines()
        .filter(|l| !l.starts_with("error: "))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
        .collect();
    let error = logs
        .iter()
        .find(|l| l["level"] == "ERROR")
        .unwrap_or_else(|| panic!("no ERROR line in {err}"));
    let message = error["fields"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("neither token_sha256"), "{error}");
}

/// `--backend gpu` where no GPU can run (no `gpu` feature, or no device) stops the server at
/// once with a clear message and exit status 1.
#[test]
fn gpu_backend_without_a_gpu_is_refused_at_start() {
    if veil_runtime::gpu_available() {
        eprintln!("skipped: this build has the gpu feature and a CUDA device is present");
        return;
    }
    let root =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("binary-gpu-{}", std::process::id()));
    std::fs::create_dir_all(root.join("models")).unwrap();
    let t = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_veil-server"))
        .args(["--listen", "127.0.0.1:0", "--backend", "gpu", "--models"])
        .arg(root.join("models"))
        .arg("--data-dir")
        .arg(root.join("data"))
        .output()
        .unwrap();
    assert!(t.elapsed() < Duration::from_secs(30));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("backend unavailable"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(out.stdout.is_empty(), "never listened");
    let _ = std::fs::remove_dir_all(&root);
}

/// Without a tenants file the server is open to anyone who reaches it: it refuses to start on
/// an address beyond loopback unless told `--allow-open`, and says what to do instead.
#[test]
fn open_mode_beyond_loopback_needs_allow_open() {
    let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("open-{}", std::process::id()));
    let empty = root.join("models");
    std::fs::create_dir_all(&empty).unwrap();
    let run = |listen: &str, extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_veil-server"))
            .args(["--listen", listen, "--models"])
            .arg(&empty)
            .arg("--data-dir")
            .arg(root.join("data"))
            .args(extra)
            .stdout(Stdio::null())
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    for listen in ["0.0.0.0:0", "[::]:0"] {
        let (ok, err) = run(listen, &[]);
        assert!(!ok, "{listen}");
        assert!(
            err.contains("--allow-open") && err.contains("--tenants"),
            "{listen}: {err}"
        );
    }
    // Loopback, or an explicit --allow-open, gets past the check: the empty models folder
    // is what stops these.
    for (listen, extra) in [
        ("127.0.0.1:0", &[][..]),
        ("0.0.0.0:0", &["--allow-open"][..]),
    ] {
        let (ok, err) = run(listen, extra);
        assert!(!ok);
        assert!(!err.contains("--allow-open"), "{listen}: {err}");
        assert!(err.contains("no *.veil files"), "{listen}: {err}");
    }
}

/// Compiles the iris model into `root/models`.
fn iris_models(root: &Path) -> std::path::PathBuf {
    let models = root.join("models");
    std::fs::create_dir_all(&models).unwrap();
    let zoo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/zoo/iris_logreg");
    let float = onnx::import_file(&zoo.join("model.onnx")).unwrap();
    let train = read_csv(&zoo.join("train.csv"), float.n_features(), Labels::Optional).unwrap();
    compile(&float, &train.features, &QuantConfig::default())
        .unwrap()
        .save(&models.join("iris.veil"))
        .unwrap();
    models
}

/// A running `veil-server` process, killed when dropped; its stderr lines arrive on `log`.
struct Proc {
    child: std::process::Child,
    addr: String,
    log: std::sync::mpsc::Receiver<String>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn start(models: &Path, data: &Path, extra: &[&std::ffi::OsStr]) -> Proc {
        let mut child = Command::new(env!("CARGO_BIN_EXE_veil-server"))
            .args(["--listen", "127.0.0.1:0", "--models"])
            .arg(models)
            .arg("--data-dir")
            .arg(data)
            .args(extra)
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, log) = std::sync::mpsc::channel();
        let stderr = BufReader::new(child.stderr.take().unwrap());
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("veil-server listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string();
        Proc { child, addr, log }
    }

    /// Waits (at most 60 s) for a stderr line containing `text`.
    fn wait_for_log(&self, text: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.log.recv_timeout(left) {
                Ok(line) if line.contains(text) => return line,
                Ok(_) => {}
                Err(e) => panic!("no log line with {text:?} within 60 s: {e}"),
            }
        }
    }
}

/// A second server on the same data dir stops at start, naming the lock; the first keeps
/// serving.
#[test]
fn a_second_server_on_the_same_data_dir_is_refused() {
    let root =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("binary-lock-{}", std::process::id()));
    let models = iris_models(&root);
    let data = root.join("data");
    let first = Proc::start(&models, &data, &[]);
    let out = Command::new(env!("CARGO_BIN_EXE_veil-server"))
        .args(["--listen", "127.0.0.1:0", "--models"])
        .arg(&models)
        .arg("--data-dir")
        .arg(&data)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("in use by another veil-server"), "{err}");
    assert!(out.stdout.is_empty(), "never listened");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", first.addr))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let status = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32);
    });
    drop(first);
    let _ = std::fs::remove_dir_all(&root);
}

/// SIGHUP reloads the tenants file: a token added works, one removed is refused, without a
/// restart; a file that does not parse leaves the tenants in force.
#[test]
fn sighup_reloads_the_tenants_file() {
    use veil_proto::v1::ListModelsRequest;
    use veil_proto::v1::veil_client::VeilClient;
    let root =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("binary-hup-{}", std::process::id()));
    let models = iris_models(&root);
    let tenants = root.join("tenants.toml");
    let file = |token: &str| {
        format!(
            "[[tenant]]\nname = \"a\"\ntoken_sha256 = \"{}\"\n",
            veil_server::token_sha256(token)
        )
    };
    std::fs::write(&tenants, file("old-token")).unwrap();
    let server = Proc::start(
        &models,
        &root.join("data"),
        &["--tenants".as_ref(), tenants.as_os_str()],
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let url = format!("http://{}", server.addr);
    let call = |token: &'static str| {
        let url = url.clone();
        rt.block_on(async move {
            let channel = tonic::transport::Endpoint::from_shared(url)
                .unwrap()
                .connect()
                .await
                .unwrap();
            let mut req = tonic::Request::new(ListModelsRequest {});
            req.metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
            VeilClient::new(channel)
                .list_models(req)
                .await
                .map(|_| ())
                .map_err(|s| s.code())
        })
    };
    let hup = || {
        let kill = Command::new("kill")
            .args(["-HUP", &server.child.id().to_string()])
            .status()
            .unwrap();
        assert!(kill.success());
    };
    assert_eq!(call("old-token"), Ok(()));
    assert_eq!(call("new-token"), Err(tonic::Code::Unauthenticated));

    std::fs::write(&tenants, file("new-token")).unwrap();
    hup();
    server.wait_for_log("tenants reloaded");
    assert_eq!(call("new-token"), Ok(()));
    assert_eq!(call("old-token"), Err(tonic::Code::Unauthenticated));

    std::fs::write(&tenants, "[[tenant]]\nname = \"a\"\n").unwrap();
    hup();
    server.wait_for_log("the previous tenants stay");
    assert_eq!(call("new-token"), Ok(()));
    drop(server);
    let _ = std::fs::remove_dir_all(&root);
}
