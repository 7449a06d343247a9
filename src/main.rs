use clap::Parser;

fn main() -> std::process::ExitCode {
    berth::cli::run(berth::cli::Cli::parse())
}
