//! Logging set-up and the shutdown signal, shared by every subcommand.

use std::sync::OnceLock;

use crate::cli::LogFormat;

static FORMAT: OnceLock<LogFormat> = OnceLock::new();

/// The format `--log-format` chose, before any subcommand starts logging.
pub fn set_format(format: LogFormat) {
    let _ = FORMAT.set(format);
}

/// Logs to stderr at info (debug with `debug`); `RUST_LOG` takes precedence.
pub fn init(debug: bool) {
    init_filter(if debug { "debug" } else { "info" });
}

/// Logs to stderr at `level` unless `RUST_LOG` says otherwise, as text or JSON lines.
pub fn init_filter(level: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match FORMAT.get().copied().unwrap_or(LogFormat::Text) {
        LogFormat::Json => builder.json().with_current_span(false).try_init(),
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
    };
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let term = async {
        match signal(SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!("cannot listen for SIGTERM ({e}); only SIGINT stops the process");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = term => tracing::info!("SIGTERM received, shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received, shutting down"),
    }
}
