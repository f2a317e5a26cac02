//! ContainerSSH in Rust.
