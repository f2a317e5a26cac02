//! The in-container helper; everything is in [`containerssh::agent`].
// House rules: no unwrap, expect, unchecked indexing or panic in the product (tests may,
// clippy.toml); a broken assumption becomes an error the caller handles.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

fn main() {
    std::process::exit(containerssh::agent::main(std::env::args_os()));
}
