//! Starting the sandbox with all its front doors: HTTP (with the console)
//! and, when `flight_listen` is set, Arrow Flight SQL on the same sandbox.

use crate::api::server::{Application, Door};
use crate::app::StartError;
use crate::config::Settings;

/// The running doors: HTTP, and Flight SQL's port when it listens.
pub struct Doors {
    pub http: Application,
    pub flight_port: Option<u16>,
}

pub async fn start(settings: Settings) -> Result<Doors, StartError> {
    let mut doors: Vec<Door> = Vec::new();
    if let Some(listen) = settings.flight_listen.clone() {
        let tls = settings.tls.clone();
        doors.push(Box::new(move |sandbox, throttle| {
            crate::flight::start(sandbox, throttle, &listen, tls.as_ref()).map(|f| f.port)
        }));
    }
    let with_flight = !doors.is_empty();
    let http = Application::build_with(settings, doors).await?;
    let flight_port = with_flight.then(|| http.door_ports()[0]);
    Ok(Doors { http, flight_port })
}
