//! Logging set-up: ContainerSSH's levels and formats on top of `tracing`.

use tracing::level_filters::LevelFilter;

use crate::config::model::{LogConfig, LogFormat, LogLevel};

fn filter(level: LogLevel) -> LevelFilter {
    match level {
        LogLevel::Debug => LevelFilter::DEBUG,
        // tracing has no "notice"; connection-level events are INFO and belong at the default.
        LogLevel::Info | LogLevel::Notice => LevelFilter::INFO,
        LogLevel::Warning => LevelFilter::WARN,
        LogLevel::Error | LogLevel::Critical | LogLevel::Alert | LogLevel::Emergency => {
            LevelFilter::ERROR
        }
    }
}

/// Installs the global subscriber. Logs go to stdout, as ContainerSSH's `destination: stdout`.
pub fn init(cfg: &LogConfig) {
    let builder = tracing_subscriber::fmt()
        .with_max_level(filter(cfg.level))
        .with_writer(std::io::stdout)
        .with_target(false);
    // A second init (tests) is harmless: the first subscriber stays.
    let _ = match cfg.format {
        LogFormat::Ljson => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.with_ansi(false).try_init(),
    };
}
