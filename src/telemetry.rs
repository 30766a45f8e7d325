//! Tracing: JSON lines when stderr is not a terminal. Nothing logs SQL text
//! or data values.

use std::io::IsTerminal;
use tracing_subscriber::EnvFilter;

/// Ballista's client logs a failed job with the executor's error text,
/// which can quote a value the failing expression read; the engine logs its
/// own data-free line for such a failure instead.
const DEFAULT_FILTER: &str = "info,ballista_core=off";

pub fn init() {
    let filter = EnvFilter::try_from_env("FROSTGLASS_LOG")
        .unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = if std::io::stderr().is_terminal() {
        builder.try_init()
    } else {
        builder.json().try_init()
    };
    // A second init (tests start many apps in one process) keeps the first subscriber.
    let _ = result;
}
