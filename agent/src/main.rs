//! The `clusteros` binary. Everything is in the library (`clusteros::cli::main`): the binary crate
//! stays this small so that the agent's code is compiled once, in the library, and not again here
//! for the generic runtime entry (`block_on` of the command's future), which took 43 s of a release
//! build when it was in this file.

fn main() -> std::process::ExitCode {
    clusteros::cli::main()
}
