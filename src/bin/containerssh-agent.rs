//! The in-container helper; everything is in [`containerssh::agent`].

fn main() {
    std::process::exit(containerssh::agent::main(std::env::args_os()));
}
