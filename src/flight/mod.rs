//! Arrow Flight SQL, the buyers' second front door, for the standard
//! drivers (ADBC, JDBC): the same API keys, the same pipeline as HTTP (gate,
//! release, metering, ledger), the same refusals with the same stable codes,
//! answers as Arrow. It listens on its own port (`flight_listen`), with the
//! same TLS certificates and client CA as HTTPS.
//!
//! A key comes as `authorization: Bearer <key>` on every call; the
//! interceptor ([`authenticate`]) resolves it to its principal before any
//! method runs. `Handshake` with basic credentials (any user name, the key
//! as password) answers that same key as the bearer token, for drivers that
//! begin with it.

mod service;
pub mod tickets;

use crate::api::error::ApiError;
use crate::api::throttle::Throttle;
use crate::app::{Sandbox, StartError};
use crate::config::TlsSettings;
use crate::store::Principal;
use arrow_flight::flight_service_server::FlightServiceServer;
use std::convert::Infallible;
use std::sync::Arc;
use tonic::codegen::{BoxFuture, Context, Poll, Service, http};
use tonic::{Request, Status};
use tracing::Instrument;

/// The front door's state: the sandbox, the HTTP door's throttle (one rate
/// and concurrency budget per principal across both doors), and the
/// handles clients hold between calls.
pub struct FlightSql {
    sandbox: Arc<Sandbox>,
    throttle: Arc<Throttle>,
    /// A ticket holds its statement and the gate's decision on it.
    tickets: tickets::Handles<(crate::pipeline::Request, Box<crate::pipeline::Decided>)>,
    prepared: tickets::Handles<crate::pipeline::Request>,
}

/// A running Flight SQL server.
pub struct FlightServer {
    pub port: u16,
}

/// Binds `listen` and serves Flight SQL on the sandbox's pipeline runtime,
/// where its statements are gated and answered: a runtime of its own would
/// hand every call to that one and back, and each hand-off wakes a thread.
pub fn start(
    sandbox: Arc<Sandbox>,
    throttle: Arc<Throttle>,
    listen: &str,
    tls: Option<&TlsSettings>,
) -> Result<FlightServer, StartError> {
    let listener = std::net::TcpListener::bind(listen)
        .map_err(|e| StartError::Listen(listen.to_string(), e))?;
    listener.set_nonblocking(true)?;
    let port = listener.local_addr()?.port();
    let tls = tls.map(tls_config).transpose()?;
    let store = sandbox.store.clone();
    let serving_on = sandbox.clone();
    let service = FlightSql {
        sandbox,
        throttle,
        tickets: tickets::Handles::new(tickets::TICKET_TTL),
        prepared: tickets::Handles::new(tickets::PREPARED_TTL),
    };
    serving_on.runtime.spawn(async move {
        let listener = match tokio::net::TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "Flight SQL cannot listen");
                return;
            }
        };
        // Without TCP_NODELAY every small answer waits out a delayed ACK.
        let incoming =
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        let server = CallLog(FlightServiceServer::with_interceptor(service, move |r| {
            authenticate(&store, r)
        }));
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = tls {
            builder = match builder.tls_config(tls) {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(error = %e, "Flight SQL TLS");
                    return;
                }
            };
        }
        if let Err(e) = builder
            .add_service(server)
            .serve_with_incoming(incoming)
            .await
        {
            tracing::error!(error = %e, "Flight SQL server stopped");
        }
    });
    Ok(FlightServer { port })
}

/// A request id on every call, and one log line per call with its RPC,
/// gRPC status and latency, as HTTP logs its requests (never SQL text or
/// data). A `DoGet` is logged when its stream begins: how it ends, the
/// ledger records.
#[derive(Clone)]
struct CallLog<S>(S);

impl<S: tonic::server::NamedService> tonic::server::NamedService for CallLog<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B, R> Service<http::Request<B>> for CallLog<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>, Error = Infallible>,
    S::Future: Send + 'static,
    R: 'static,
{
    type Response = S::Response;
    type Error = Infallible;
    type Future = BoxFuture<S::Response, Infallible>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let request_id = crate::util::new_id("r");
        let span =
            tracing::info_span!("call", request_id = %request_id, rpc = %request.uri().path());
        let started = std::time::Instant::now();
        let answer = self.0.call(request).instrument(span.clone());
        Box::pin(async move {
            // A gRPC service never fails: a refusal is a response too.
            let Ok(mut response) = answer.await;
            let elapsed_ms = started.elapsed().as_millis() as u64;
            // A refusal comes as trailers only, its status among the headers.
            let grpc_status = response
                .headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok()?.parse::<i32>().ok())
                .unwrap_or(0);
            if grpc_status != 0 {
                as_json_refusal(response.headers_mut());
            }
            span.in_scope(|| tracing::info!(grpc_status, elapsed_ms, "call done"));
            if let Ok(id) = http::HeaderValue::from_str(&request_id) {
                response.headers_mut().insert("x-request-id", id);
            }
            Ok(response)
        })
    }
}

/// Gives a refusal that arrow-flight or tonic wrote, not the sandbox, the
/// JSON error body and stable code of every refusal: a call the sandbox
/// does not serve (`UNIMPLEMENTED`: a method arrow-flight answers by
/// default, or one gRPC does not know) and a command it cannot decode
/// (`INVALID_ARGUMENT`, with the decoder's text, which is about the call,
/// never about data). The sandbox's own refusals are JSON already.
fn as_json_refusal(headers: &mut http::HeaderMap) {
    let Some(refusal) = Status::from_header_map(headers) else {
        return;
    };
    if serde_json::from_str::<serde_json::Value>(refusal.message()).is_ok() {
        return;
    }
    let error = match refusal.code() {
        tonic::Code::Unimplemented => {
            ApiError::NotFound("the sandbox does not serve this call".into())
        }
        tonic::Code::InvalidArgument => ApiError::invalid(refusal.message()),
        _ => return,
    };
    let _ = Status::new(refusal.code(), error.body().to_string()).add_header(headers);
}

fn tls_config(tls: &TlsSettings) -> Result<tonic::transport::ServerTlsConfig, StartError> {
    let read = |p: &std::path::Path| {
        std::fs::read(p).map_err(|e| StartError::Config(format!("TLS {}: {e}", p.display())))
    };
    let identity = tonic::transport::Identity::from_pem(read(&tls.cert)?, read(&tls.key)?);
    let mut config = tonic::transport::ServerTlsConfig::new().identity(identity);
    if let Some(ca) = &tls.client_ca {
        // Optional at the TLS layer, as on HTTPS: principals bound to a
        // certificate are held to it per call.
        config = config
            .client_ca_root(tonic::transport::Certificate::from_pem(read(ca)?))
            .client_auth_optional(true);
    }
    Ok(config)
}

/// The principal a call authenticated as, put there by [`authenticate`].
#[derive(Clone)]
struct Caller(Principal);

/// Resolves a bearer key to its principal for every call (a key bound to a
/// client certificate counts only with it). A call without a key passes on
/// without a principal: only the handshake works without one.
fn authenticate(
    store: &crate::store::Store,
    mut request: Request<()>,
) -> Result<Request<()>, Status> {
    let Some(header) = request.metadata().get("authorization") else {
        return Ok(request);
    };
    let Some(key) = header.to_str().ok().and_then(crate::api::auth::bearer) else {
        // Basic credentials belong to the handshake, which checks them itself.
        return Ok(request);
    };
    let principal = principal_of_key(store, key, &request)?;
    request.extensions_mut().insert(Caller(principal));
    Ok(request)
}

fn principal_of_key<T>(
    store: &crate::store::Store,
    key: &str,
    request: &Request<T>,
) -> Result<Principal, Status> {
    let found = store
        .principal_by_key_hash(&crate::auth::key_hash(key))
        .map_err(|e| status(ApiError::from(e)))?;
    let (principal, bound) = found.ok_or_else(|| status(ApiError::Unauthenticated))?;
    if let Some(bound) = bound {
        let presented = request
            .peer_certs()
            .and_then(|certs| certs.first().and_then(|c| crate::auth::spki_sha256(c)));
        if presented.as_deref() != Some(bound.as_str()) {
            return Err(status(ApiError::Unauthenticated));
        }
    }
    Ok(principal)
}

/// An error as Flight returns it: the gRPC code that matches its HTTP
/// status, and as message the very JSON body HTTP would send (same stable
/// code, same rule, never a data value).
pub fn status(error: ApiError) -> Status {
    use tonic::Code;
    let code = match error.http_status() {
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        404 => Code::NotFound,
        409 => Code::FailedPrecondition,
        413 | 422 | 429 => Code::ResourceExhausted,
        499 => Code::Cancelled,
        503 => Code::Unavailable,
        500..=599 => Code::Internal,
        _ => Code::InvalidArgument,
    };
    if let ApiError::Core(crate::error::Error::Internal(cause)) = &error {
        tracing::error!(cause = %cause, "internal error (Flight SQL)");
    }
    Status::new(code, error.body().to_string())
}

impl From<crate::error::Error> for Status {
    fn from(e: crate::error::Error) -> Status {
        status(e.into())
    }
}
