/// jemalloc, built with the settings in .cargo/config.toml (src/allocator.rs).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    let config_env = std::env::var_os("RELAY_CONFIG").map(std::path::PathBuf::from);
    match ocrolus_relay::parse_from(std::env::args_os(), config_env) {
        Ok(cli) => ocrolus_relay::run(cli),
        Err(e) => e.exit(),
    }
}
