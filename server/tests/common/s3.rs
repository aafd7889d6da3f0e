//! A real S3 server on loopback for the tests: s3s-fs (objects kept as files under a folder)
//! behind s3s' SigV4 authentication, served over HTTP by hyper in this process. It records
//! every request's method and path, so a test can count PUTs.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use hyper_util::rt::{TokioExecutor, TokioIo};
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;

pub const BUCKET: &str = "veil-keys";
const ACCESS_KEY: &str = "veil-test";
const SECRET_KEY: &str = "veil-test-secret";

pub struct S3 {
    pub endpoint: String,
    /// The folder holding the objects: `root/BUCKET/...`.
    pub root: PathBuf,
    requests: Arc<Mutex<Vec<(String, String)>>>,
    _rt: tokio::runtime::Runtime,
}

impl S3 {
    /// Starts the server on a free loopback port, with an empty bucket [`BUCKET`].
    pub fn start(root: &Path) -> S3 {
        std::fs::create_dir_all(root.join(BUCKET)).unwrap();
        let fs = s3s_fs::FileSystem::new(root).unwrap();
        let mut b = S3ServiceBuilder::new(fs);
        b.set_auth(SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
        let service = b.build();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let log = Arc::clone(&requests);
        rt.spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    continue;
                };
                let (service, log) = (service.clone(), Arc::clone(&log));
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        log.lock()
                            .unwrap()
                            .push((req.method().to_string(), req.uri().path().to_string()));
                        let service = service.clone();
                        async move { hyper::service::Service::call(&service, req).await }
                    },
                );
                tokio::spawn(async move {
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(socket), svc)
                        .await;
                });
            }
        });
        S3 {
            endpoint,
            root: root.to_path_buf(),
            requests,
            _rt: rt,
        }
    }

    /// The environment a `veil-server` needs to use this store.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY.to_string()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.to_string()),
            ("AWS_REGION", "us-east-1".to_string()),
            ("AWS_ALLOW_HTTP", "true".to_string()),
        ]
    }

    /// Paths of the PUT requests whose path ends with `suffix`.
    pub fn puts(&self, suffix: &str) -> Vec<String> {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .filter(|(m, p)| m == "PUT" && p.ends_with(suffix))
            .map(|(_, p)| p.clone())
            .collect()
    }

    /// The files of the objects whose name ends with `suffix`.
    pub fn objects(&self, suffix: &str) -> Vec<PathBuf> {
        fn walk(p: &Path, suffix: &str, out: &mut Vec<PathBuf>) {
            for f in std::fs::read_dir(p).into_iter().flatten().flatten() {
                let path = f.path();
                if path.is_dir() {
                    walk(&path, suffix, out);
                } else if path.to_string_lossy().ends_with(suffix) {
                    out.push(path);
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.root.join(BUCKET), suffix, &mut out);
        out.sort();
        out
    }
}
