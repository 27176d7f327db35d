//! The `outpost-ctl` binary: all of it is in the library, so the tests run the same code.

fn main() -> std::process::ExitCode {
    std::process::ExitCode::from(outpost_ctl::run_args(std::env::args_os()))
}
