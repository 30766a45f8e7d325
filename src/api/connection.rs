//! Noticing that a client went away while its query runs.
//!
//! actix-web keeps running an HTTP/1 handler whose request was read even
//! after the client closed the connection, so the query would run (and hold
//! a slot) to the end. Each connection therefore keeps a duplicate of its
//! socket, and a running query polls it for the peer's hang-up
//! (`POLLRDHUP`: the client closed, or shut down its sending side) to be
//! cancelled — and recorded — as soon as nobody is waiting for the answer.

use actix_web::HttpRequest;
use actix_web::dev::Extensions;
use rustix::event::{PollFd, PollFlags, Timespec};
use std::future::Future;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

/// How often a running query looks at its client's socket.
const EVERY: Duration = Duration::from_millis(50);

/// The connection's socket, duplicated; closed with the connection's data.
#[derive(Clone)]
struct ClientSocket(Arc<OwnedFd>);

/// Called for every new connection, plain or TLS.
pub fn remember(conn: &dyn std::any::Any, data: &mut Extensions) {
    type Tcp = actix_web::rt::net::TcpStream;
    type Tls = actix_tls::accept::rustls_0_23::TlsStream<Tcp>;
    let tcp = conn
        .downcast_ref::<Tcp>()
        .or_else(|| conn.downcast_ref::<Tls>().map(|tls| tls.get_ref().0));
    if let Some(fd) = tcp.and_then(|t| t.as_fd().try_clone_to_owned().ok()) {
        data.insert(ClientSocket(Arc::new(fd)));
    }
}

/// Resolves once the client of `req` has hung up; never, if that cannot be told.
pub fn gone(req: &HttpRequest) -> impl Future<Output = ()> + Send + 'static {
    let socket = req.conn_data::<ClientSocket>().cloned();
    async move {
        let Some(ClientSocket(fd)) = socket else {
            return std::future::pending().await;
        };
        loop {
            tokio::time::sleep(EVERY).await;
            let mut fds = [PollFd::new(&*fd, PollFlags::RDHUP)];
            let hung_up = match rustix::event::poll(&mut fds, Some(&Timespec::default())) {
                Ok(_) => fds[0]
                    .revents()
                    .intersects(PollFlags::RDHUP | PollFlags::HUP | PollFlags::ERR),
                // EINTR and the like: look again next time.
                Err(_) => false,
            };
            if hung_up {
                return;
            }
        }
    }
}
