//! The command line: `serve`, `check-config`, `send-test`, `tail`, `spool`,
//! `ocrolus`.
//! Configuration errors print one precise line and exit 64 (EX_USAGE).

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use crate::cmd;
use crate::config::{Config, LogFormat, ServeArgs};

#[derive(Debug, Parser)]
#[command(name = "ocrolus-relay", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the relay.
    Serve(ServeArgs),
    /// Validate the configuration `serve` would use, print a summary.
    CheckConfig(ServeArgs),
    /// Sign and send a realistic Ocrolus delivery (like the Dashboard's test webhook).
    SendTest(cmd::send_test::SendTestArgs),
    /// Bind a temporary queue and print events as JSON lines.
    Tail(cmd::tail::TailArgs),
    /// Inspect or replay the spool (while the relay is stopped).
    Spool(cmd::spool::SpoolArgs),
    /// Manage the Ocrolus side: webhooks, tests, secret rotation.
    Ocrolus(cmd::ocrolus::OcrolusArgs),
}

const EX_USAGE: u8 = 64;

pub fn run(cli: Cli) -> ExitCode {
    let log_format = match &cli.command {
        Command::Serve(args) => args.log_format,
        _ => LogFormat::Text,
    };
    init_logging(log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let secrets_env = std::env::var("RELAY_WEBHOOK_SECRETS").ok();
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => {
                let config = Config::from_args(&args, secrets_env).map_err(usage)?;
                cmd::serve::run(config).await.map_err(runtime_error)
            }
            Command::CheckConfig(args) => {
                let config = Config::from_args(&args, secrets_env).map_err(usage)?;
                cmd::check_config::run(&config).map_err(usage)
            }
            Command::SendTest(args) => cmd::send_test::run(args, secrets_env)
                .await
                .map_err(runtime_error),
            Command::Tail(args) => cmd::tail::run(args).await.map_err(runtime_error),
            Command::Spool(args) => cmd::spool::run(args).await.map_err(runtime_error),
            Command::Ocrolus(args) => cmd::ocrolus::run(args).await.map_err(runtime_error),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(code) => code,
    }
}

fn usage(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {e}");
    ExitCode::from(EX_USAGE)
}

fn runtime_error(e: anyhow::Error) -> ExitCode {
    eprintln!("error: {e:#}");
    ExitCode::FAILURE
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,lapin=warn,amq_protocol=warn"));
    // Colours only on a terminal: in a log file the escape codes cost a
    // third of every access-log line and its formatting time.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}
