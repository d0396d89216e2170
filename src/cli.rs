//! The command line: `serve`, `check-config`, `send-test`, `tail`, `spool`,
//! `ocrolus`, `healthcheck`, `completions`, `man`.
//! Configuration errors print one precise line and exit 64 (EX_USAGE).

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use crate::cmd;
use crate::config::{Config, LogFormat, ServeArgs};
use crate::config_error::ConfigError;
use crate::config_file::{ConfigFile, find_config_arg};

#[derive(Debug, Parser)]
#[command(name = "ocrolus-relay", version = crate::VERSION, about)]
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
    /// Exit 0 if the running relay's admin listener says it is live (or ready), else 1.
    Healthcheck(cmd::healthcheck::HealthcheckArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
    /// Print the man page, or write one page per subcommand into a directory.
    Man {
        /// Write ocrolus-relay.1, ocrolus-relay-serve.1, ... here instead.
        #[arg(long)]
        out_dir: Option<std::path::PathBuf>,
    },
}

const EX_USAGE: u8 = 64;

/// Why the command line could not be parsed.
#[derive(Debug)]
pub enum ParseError {
    /// Bad flags, or `--help` / `--version` (clap prints and exits).
    Clap(clap::Error),
    /// The `--config` file is unreadable or invalid.
    Config(ConfigError),
}

impl ParseError {
    pub fn exit(self) -> ExitCode {
        match self {
            Self::Clap(e) => e.exit(),
            Self::Config(e) => usage(e),
        }
    }
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Clap(e) => write!(f, "{e}"),
            Self::Config(e) => write!(f, "{e}"),
        }
    }
}

/// Parses `argv`. For `serve` and `check-config` a `--config` file (or
/// `RELAY_CONFIG`, passed in so tests never touch the environment)
/// supplies the flags' defaults: flags and environment still win.
pub fn parse_from<I, T>(argv: I, config_env: Option<PathBuf>) -> Result<Cli, ParseError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString>,
{
    let argv: Vec<OsString> = argv.into_iter().map(Into::into).collect();
    let mut command = Cli::command();
    if let Some(path) = find_config_arg(&argv, config_env) {
        let file = ConfigFile::load(&path).map_err(ParseError::Config)?;
        let name = argv
            .get(1)
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_owned();
        if let Some(sub) = command.find_subcommand(&name).cloned() {
            let applied = file.apply(sub).map_err(|e| {
                ParseError::Config(ConfigError::new(format!(
                    "config file {}: {e}",
                    path.display()
                )))
            })?;
            command = command.mut_subcommand(&name, |_| applied);
        }
    }
    let matches = command
        .try_get_matches_from(argv)
        .map_err(ParseError::Clap)?;
    Cli::from_arg_matches(&matches).map_err(ParseError::Clap)
}

pub fn run(cli: Cli) -> ExitCode {
    match &cli.command {
        Command::Completions { shell } => {
            let mut command = Cli::command();
            clap_complete::generate(
                *shell,
                &mut command,
                "ocrolus-relay",
                &mut std::io::stdout(),
            );
            return ExitCode::SUCCESS;
        }
        Command::Man { out_dir } => return man(out_dir.as_deref()),
        _ => {}
    }
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
            Command::Healthcheck(args) => cmd::healthcheck::run(args).await.map_err(runtime_error),
            Command::Completions { .. } | Command::Man { .. } => Ok(()),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(code) => code,
    }
}

fn man(out_dir: Option<&std::path::Path>) -> ExitCode {
    let command = Cli::command();
    let written = match out_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir).and_then(|()| clap_mangen::generate_to(command, dir))
        }
        None => clap_mangen::Man::new(command).render(&mut std::io::stdout()),
    };
    match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: writing the man page: {e}");
            ExitCode::FAILURE
        }
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
