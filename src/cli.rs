//! The command line: `serve`, `check-config`, `send-test`, `tail`, `spool`,
//! `ocrolus`, `healthcheck`, `completions`, `man`.
//! A failed command prints one line (a JSON log line under `--log-format
//! json`) and exits 64 (EX_USAGE) when the configuration is wrong, so that a
//! supervisor stops restarting (systemd `RestartPreventExitStatus=64`), or 1
//! for any other failure, which a restart may cure.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use crate::cmd;
use crate::config::{Config, LogFormat, ServeArgs};
use crate::config_error::ConfigError;
use crate::config_file::{ConfigFile, find_config_arg};
use crate::log_format::LineFormat;
use crate::log_writer::{self, LogWriter};
use crate::signals::ForcedExit;

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
    /// Inspect or replay the spool (through the running relay's admin listener, else the file).
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
    /// The `--config` file is unreadable or invalid; printed in this format.
    Config(ConfigError, LogFormat),
}

impl ParseError {
    pub fn exit(self) -> ExitCode {
        match self {
            Self::Clap(e) => e.exit(),
            Self::Config(e, format) => fail(format, &e, ExitCode::from(EX_USAGE)),
        }
    }
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Clap(e) => write!(f, "{e}"),
            Self::Config(e, _) => write!(f, "{e}"),
        }
    }
}

/// The log format asked for on the command line or in `RELAY_LOG_FORMAT`,
/// for an error met before the flags could be parsed.
fn requested_log_format(argv: &[OsString]) -> LogFormat {
    let mut args = argv.iter().filter_map(|a| a.to_str());
    let mut flag = None;
    while let Some(arg) = args.next() {
        if arg == "--log-format" {
            flag = args.next().map(str::to_owned);
        } else if let Some(value) = arg.strip_prefix("--log-format=") {
            flag = Some(value.to_owned());
        }
    }
    let chosen = flag.or_else(|| std::env::var("RELAY_LOG_FORMAT").ok());
    if chosen.as_deref() == Some("json") {
        LogFormat::Json
    } else {
        LogFormat::Text
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
        let format = requested_log_format(&argv);
        let file = ConfigFile::load(&path).map_err(|e| ParseError::Config(e, format))?;
        let name = argv
            .get(1)
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_owned();
        if let Some(sub) = command.find_subcommand(&name).cloned() {
            let applied = file.apply(sub).map_err(|e| {
                ParseError::Config(
                    ConfigError::new(format!("config file {}: {e}", path.display())),
                    format,
                )
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
    let (log_format, one_shot) = match &cli.command {
        Command::Serve(args) => (args.log_format, false),
        Command::CheckConfig(args) => (args.log_format, true),
        _ => (LogFormat::Text, true),
    };
    init_logging(log_format, one_shot);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            return fail(
                log_format,
                &format!("cannot start the async runtime: {e}"),
                ExitCode::FAILURE,
            );
        }
    };
    let secrets_env = std::env::var("RELAY_WEBHOOK_SECRETS").ok();
    let result: anyhow::Result<()> = runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => {
                let config = Config::from_args(&args, secrets_env)?;
                cmd::serve::run(config).await
            }
            Command::CheckConfig(args) => {
                let config = Config::from_args(&args, secrets_env)?;
                Ok(cmd::check_config::run(&config)?)
            }
            Command::SendTest(args) => cmd::send_test::run(args, secrets_env).await,
            Command::Tail(args) => cmd::tail::run(args).await,
            Command::Spool(args) => cmd::spool::run(args).await,
            Command::Ocrolus(args) => cmd::ocrolus::run(args).await,
            Command::Healthcheck(args) => cmd::healthcheck::run(args).await,
            Command::Completions { .. } | Command::Man { .. } => Ok(()),
        }
    });
    // A forced stop must not wait for tasks still running (a stuck fsync,
    // the drain it cut short); a finished command has none left.
    runtime.shutdown_background();
    log_writer::flush();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // Logged when the second signal came.
        Err(e) => match e.downcast_ref::<ForcedExit>() {
            Some(forced) => ExitCode::from(forced.code),
            None => fail(log_format, &format!("{e:#}"), exit_code(&e)),
        },
    }
}

/// The one place a failure becomes an exit code: a [`ConfigError`]
/// anywhere in the chain (flags, files, certificates, credentials, found
/// while parsing or while `serve` starts) is 64, anything else 1.
fn exit_code(e: &anyhow::Error) -> ExitCode {
    if e.chain().any(<dyn std::error::Error>::is::<ConfigError>) {
        ExitCode::from(EX_USAGE)
    } else {
        ExitCode::FAILURE
    }
}

/// Prints the one line of a failed command: `error: …`, or under `--log-format
/// json` a log line shaped like the others (`timestamp`, `level`, `message`,
/// `target`). Written directly, so that no `RUST_LOG` filter can hide it.
fn fail(format: LogFormat, message: &dyn std::fmt::Display, code: ExitCode) -> ExitCode {
    match format {
        LogFormat::Text => eprintln!("error: {message}"),
        LogFormat::Json => eprintln!(
            "{}",
            serde_json::json!({
                "timestamp": humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string(),
                "level": "ERROR",
                "message": message.to_string(),
                "target": "ocrolus_relay",
            })
        ),
    }
    code
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

/// `one_shot`: a command that reports its own failure in its one error line;
/// lapin's log lines would only say the same thing again, so they are off
/// unless `RUST_LOG` asks for them.
fn init_logging(format: LogFormat, one_shot: bool) {
    let default = if one_shot {
        "info,lapin=off,amq_protocol=off"
    } else {
        "info,lapin=warn,amq_protocol=warn"
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    // Colours only on a terminal: in a log file the escape codes cost a
    // third of every access-log line and its formatting time.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    // `serve` writes its lines in batches (log_writer.rs); a one-shot
    // command's few lines are progress a person is watching.
    let builder = builder.with_writer(LogWriter::install(!one_shot));
    let format_of = tracing_subscriber::fmt::format;
    match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .event_format(LineFormat::json(format_of().json().flatten_event(true)))
            .init(),
        LogFormat::Text => builder.event_format(LineFormat::text(format_of())).init(),
    }
}
