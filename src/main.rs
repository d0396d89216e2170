use clap::Parser;

fn main() -> std::process::ExitCode {
    ocrolus_relay::cli::main(ocrolus_relay::cli::Cli::parse())
}
