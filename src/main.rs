fn main() -> std::process::ExitCode {
    let config_env = std::env::var_os("RELAY_CONFIG").map(std::path::PathBuf::from);
    match ocrolus_relay::parse_from(std::env::args_os(), config_env) {
        Ok(cli) => ocrolus_relay::run(cli),
        Err(e) => e.exit(),
    }
}
