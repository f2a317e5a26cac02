//! Entry points for the fuzz targets in `fuzz/`; each asserts the invariants of one parser.

/// The config loader must never panic, and whatever it accepts must validate or fail cleanly.
pub fn fuzz_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(cfg) = crate::config::load::parse_yaml::<crate::config::AppConfig>("fuzz", text) {
        let _ = crate::config::validate::validate("fuzz", cfg);
    }
}

/// The Docker stream demultiplexer: bounded output, no panic.
pub fn fuzz_docker_demux(data: &[u8]) {
    crate::backend::docker::fuzz_demux(data);
}
