//! Who is calling: the bearer token of a request and the client certificate
//! of its TLS connection.

use crate::auth::spki_sha256;

/// The client certificate a TLS connection presented, kept with the connection.
#[derive(Clone, Debug)]
pub struct ClientCert {
    pub spki_sha256: String,
}

/// Called for every new connection: remembers the client certificate, if any.
pub fn capture_client_cert(conn: &dyn std::any::Any, data: &mut actix_web::dev::Extensions) {
    type Tls = actix_tls::accept::rustls_0_23::TlsStream<actix_web::rt::net::TcpStream>;
    let Some(tls) = conn.downcast_ref::<Tls>() else {
        return;
    };
    let (_, session) = tls.get_ref();
    if let Some(spki_sha256) = session
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|c| spki_sha256(c))
    {
        data.insert(ClientCert { spki_sha256 });
    }
}

/// The bearer token of an `Authorization` header value, if well formed.
pub fn bearer(header: &str) -> Option<&str> {
    let (scheme, token) = header.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty() && token.len() <= 256)
        .then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_parsing() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer  abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer "), None);
        assert_eq!(bearer("Bearerabc"), None);
    }
}
