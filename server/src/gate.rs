//! What runs before any `veil.v1.Veil` request body is read: authentication, the tenant's
//! rate, the server-wide cap on calls in progress, and the per-method message-size limit;
//! and the cap on open connections.
//!
//! tonic reserves a message's declared length as soon as it reads the 5-byte frame header,
//! so every check that can refuse a caller runs here, on the headers only. A refused call is
//! answered at once (trailers-only response); its body is never read, and HTTP/2 flow control
//! bounds what the peer can push meanwhile. The tenant travels to the handler as a
//! [`Caller`] in the request's extensions.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::body::Body;
use tonic::codegen::http;
use tonic::codegen::{BoxFuture, Service};
use tonic::server::NamedService;
use tonic::transport::server::{Connected, TcpConnectInfo, TlsConnectInfo};
use veil_proto::v1::veil_server::VeilServer;

use crate::error::ServiceError;
use crate::metrics::Metrics;
use crate::service::VeilService;
use crate::status::code_of;
use crate::tenants::{SharedTenants, Tenant};

/// Largest message decoded for the small methods (ListModels, GetKey, DeleteKey): their
/// requests hold at most a key id.
pub const SMALL_MESSAGE_BYTES: usize = 4 << 10;

/// Server-wide caps on connections and on calls, set by flags.
#[derive(Clone, Debug)]
pub struct ConnectionLimits {
    /// Open connections at once; a connection over the cap is closed as soon as it is
    /// accepted.
    pub max_connections: usize,
    /// HTTP/2 streams one connection may open at once (advertised to the peer).
    pub max_concurrent_streams: u32,
    /// Veil calls in progress at once, server-wide (authenticated ones; a refused call never
    /// counts); one more is answered UNAVAILABLE at once.
    pub max_concurrent_calls: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max_connections: 1024,
            max_concurrent_streams: 64,
            max_concurrent_calls: 128,
        }
    }
}

/// The authenticated tenant of a call, put in the request's extensions by the [`Gate`].
#[derive(Clone, Debug)]
pub struct Caller(pub Arc<Tenant>);

/// `veil.v1.Veil`, behind authentication and the call cap. Small methods are served by an
/// instance with a small decoding limit, Infer and UploadKey by one with the large limit.
#[derive(Clone)]
pub struct Gate {
    small: VeilServer<VeilService>,
    large: VeilServer<VeilService>,
    tenants: SharedTenants,
    metrics: Arc<Metrics>,
    calls: Arc<Semaphore>,
    max_calls: usize,
}

impl Gate {
    pub fn new(
        service: VeilService,
        tenants: SharedTenants,
        metrics: Arc<Metrics>,
        max_calls: usize,
        max_request_bytes: usize,
        max_response_bytes: usize,
    ) -> Self {
        let service = Arc::new(service);
        let small = VeilServer::from_arc(Arc::clone(&service))
            .max_decoding_message_size(SMALL_MESSAGE_BYTES)
            .max_encoding_message_size(max_response_bytes);
        let large = VeilServer::from_arc(service)
            .max_decoding_message_size(max_request_bytes)
            .max_encoding_message_size(max_response_bytes);
        let max_calls = max_calls.max(1);
        Gate {
            small,
            large,
            tenants,
            metrics,
            calls: Arc::new(Semaphore::new(max_calls)),
            max_calls,
        }
    }

    /// The caller's tenant, from its bearer token or its verified client certificate, after
    /// its request rate.
    fn admit(&self, req: &http::Request<Body>) -> Result<Arc<Tenant>, ServiceError> {
        let certs = req
            .extensions()
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .and_then(|i| i.peer_certs());
        let t = self.tenants.current().authenticate_call(
            req.headers().get(http::header::AUTHORIZATION),
            certs.as_deref().map(|c| c.as_slice()),
        )?;
        t.check_rate()?;
        Ok(t)
    }
}

/// The method's name for metrics (a fixed set, so labels stay bounded) and whether its
/// requests may be large.
fn method(path: &str) -> (&'static str, bool) {
    match path.strip_prefix("/veil.v1.Veil/") {
        Some("Infer") => ("Infer", true),
        Some("UploadKey") => ("UploadKey", true),
        Some("Decrypt") => ("Decrypt", true),
        Some("ListModels") => ("ListModels", false),
        Some("GetKey") => ("GetKey", false),
        Some("ListKeys") => ("ListKeys", false),
        Some("DeleteKey") => ("DeleteKey", false),
        _ => ("unknown", false),
    }
}

impl Service<http::Request<Body>> for Gate {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        let (name, large) = method(req.uri().path());
        let refuse = |metrics: &Arc<Metrics>, e: ServiceError| {
            metrics.call(name).finish(code_of(&e));
            let status: tonic::Status = e.into();
            let resp = status.into_http::<Body>();
            Box::pin(async move { Ok(resp) }) as Self::Future
        };
        let tenant = match self.admit(&req) {
            Ok(t) => t,
            Err(e) => return refuse(&self.metrics, e),
        };
        // Shed at once rather than queue: a waiting call would hold its connection and,
        // once decoded, its body.
        let Ok(permit) = Arc::clone(&self.calls).try_acquire_owned() else {
            return refuse(
                &self.metrics,
                ServiceError::Overloaded(format!(
                    "the server is at its limit of {} calls in progress; retry later",
                    self.max_calls
                )),
            );
        };
        req.extensions_mut().insert(Caller(tenant));
        let inner = if large {
            self.large.call(req)
        } else {
            self.small.call(req)
        };
        Box::pin(async move {
            let r = inner.await;
            drop(permit);
            r
        })
    }
}

impl NamedService for Gate {
    const NAME: &'static str = "veil.v1.Veil";
}

/// An accepted connection holding one of the `--max-connections` slots until it closes.
pub struct Counted<T> {
    io: T,
    _slot: Slot,
}

struct Slot {
    _permit: OwnedSemaphorePermit,
    metrics: Arc<Metrics>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.metrics.connections_open.dec();
    }
}

impl<T> Counted<T> {
    /// Takes a slot for `io`, or `None` when every slot is taken (the caller drops `io`,
    /// closing it).
    pub fn admit(io: T, slots: &Arc<Semaphore>, metrics: &Arc<Metrics>) -> Option<Self> {
        match Arc::clone(slots).try_acquire_owned() {
            Ok(permit) => {
                metrics.connections_open.inc();
                Some(Counted {
                    io,
                    _slot: Slot {
                        _permit: permit,
                        metrics: Arc::clone(metrics),
                    },
                })
            }
            Err(_) => {
                metrics.connections_refused.inc();
                None
            }
        }
    }
}

impl<T: Connected> Connected for Counted<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}
