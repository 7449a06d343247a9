use clap::Parser;

/// mimalloc instead of glibc's malloc: the edge allocates per request on every core, and
/// glibc's arenas showed up as a tenth of its CPU time under load (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    berth::cli::run(berth::cli::Cli::parse())
}
