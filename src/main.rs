use clap::Parser;

fn main() -> std::process::ExitCode {
    ocrolus_relay::run(ocrolus_relay::Cli::parse())
}
