//! Building and running the HTTP server, separated from `main` so tests can
//! start the real application on a random port.

use super::error::ApiError;
use crate::api;
use crate::api::throttle::Throttle;
use crate::app::{Sandbox, StartError};
use crate::config::Settings;
use actix_web::dev::Server;
use actix_web::{App, HttpServer, web};
use std::net::TcpListener;
use std::sync::Arc;

/// TLS 1.2 and 1.3 only, with rustls's modern cipher suites (ring provider).
fn tls_config(tls: &crate::config::TlsSettings) -> Result<rustls::ServerConfig, StartError> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let bad = |what: &str, e: String| StartError::Config(format!("TLS {what}: {e}"));
    let certs = CertificateDer::pem_file_iter(&tls.cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| bad("certificate", format!("{}: {e}", tls.cert.display())))?;
    let key = PrivateKeyDer::from_pem_file(&tls.key)
        .map_err(|e| bad("key", format!("{}: {e}", tls.key.display())))?;
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let provider_builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| bad("versions", e.to_string()))?;
    let builder = match &tls.client_ca {
        None => provider_builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in
                CertificateDer::pem_file_iter(ca).map_err(|e| bad("client CA", e.to_string()))?
            {
                roots
                    .add(c.map_err(|e| bad("client CA", e.to_string()))?)
                    .map_err(|e| bad("client CA", e.to_string()))?;
            }
            // Optional at the TLS layer; principals bound to a certificate are held to it per request.
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                std::sync::Arc::new(roots),
                provider,
            )
            .allow_unauthenticated()
            .build()
            .map_err(|e| bad("client CA", e.to_string()))?;
            provider_builder.with_client_cert_verifier(verifier)
        }
    };
    builder
        .with_single_cert(certs, key)
        .map_err(|e| bad("certificate", e.to_string()))
}

pub struct Application {
    port: u16,
    door_ports: Vec<u16>,
    server: Server,
}

/// Another front door on the same sandbox and throttle (Flight SQL), given
/// by the caller so that HTTP need not know it: it starts and answers its port.
pub type Door = Box<dyn FnOnce(Arc<Sandbox>, Arc<Throttle>) -> Result<u16, StartError>>;

impl Application {
    /// HTTP alone.
    pub async fn build(settings: Settings) -> Result<Application, StartError> {
        Application::build_with(settings, Vec::new()).await
    }

    /// HTTP, and `doors` on the same sandbox once it is open.
    pub async fn build_with(
        settings: Settings,
        doors: Vec<Door>,
    ) -> Result<Application, StartError> {
        let tls = match &settings.tls {
            Some(tls) => Some(tls_config(tls)?),
            None => None,
        };
        let listener = TcpListener::bind(&settings.listen)
            .map_err(|e| StartError::Listen(settings.listen.clone(), e))?;
        let local = listener.local_addr()?;
        let port = local.port();
        if tls.is_none() && !local.ip().is_loopback() && !settings.allow_plain_http {
            return Err(StartError::Config(format!(
                "refusing plain HTTP on {local}: configure tls (cert, key) or set allow_plain_http"
            )));
        }
        let limits = settings.limits.clone();
        let sessions = web::Data::new(api::console::session::Sessions::new(&settings.console));
        let sandbox = web::Data::new(Sandbox::open(settings).await?);
        let throttle = web::Data::new(api::throttle::Throttle::default());
        let door_ports = doors
            .into_iter()
            .map(|start| start(sandbox.clone().into_inner(), throttle.clone().into_inner()))
            .collect::<Result<Vec<u16>, StartError>>()?;
        let verifications = web::Data::new(api::audit::Verifications::default());
        let server = HttpServer::new(move || {
            App::new()
                .wrap(actix_web::middleware::from_fn(api::telemetry::request_span))
                .app_data(sandbox.clone())
                .wrap(
                    actix_web::middleware::DefaultHeaders::new()
                        .add((
                            "Content-Security-Policy",
                            api::console::CONTENT_SECURITY_POLICY,
                        ))
                        .add(("X-Content-Type-Options", "nosniff"))
                        .add(("X-Frame-Options", "DENY"))
                        .add(("Referrer-Policy", "same-origin")),
                )
                .app_data(throttle.clone())
                .app_data(sessions.clone())
                .app_data(verifications.clone())
                .app_data(
                    web::QueryConfig::default()
                        .error_handler(|e, _| ApiError::invalid(e.to_string()).into()),
                )
                .app_data(
                    web::PathConfig::default()
                        .error_handler(|e, _| ApiError::invalid(e.to_string()).into()),
                )
                .configure(api::routes)
                .default_service(web::to(api::not_found))
        })
        .max_connections(limits.max_connections)
        .client_request_timeout(std::time::Duration::from_millis(
            limits.client_request_timeout_ms,
        ))
        .client_disconnect_timeout(std::time::Duration::from_secs(2))
        .keep_alive(std::time::Duration::from_secs(limits.keep_alive_s))
        .on_connect(|conn, data| {
            api::auth::capture_client_cert(conn, data);
            crate::api::connection::remember(conn, data);
        });
        let server = match tls {
            Some(config) => server.listen_rustls_0_23(listener, config)?,
            None => server.listen(listener)?,
        }
        .run();
        Ok(Application {
            port,
            door_ports,
            server,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The ports of the other doors, in the order they were given.
    pub fn door_ports(&self) -> &[u16] {
        &self.door_ports
    }

    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        self.server.await
    }
}
