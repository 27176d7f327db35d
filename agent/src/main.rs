//! The `outpost` binary: everything happens in the library's [`outpost_agent::cli`].

fn main() -> std::process::ExitCode {
    outpost_agent::cli::main()
}
