//! `--config relay.yaml`: every `serve` setting under its flag's name (with
//! `_` for `-`: `admin_listen`, `rate_limit_per_ip`), and the `sources:`
//! list (several Ocrolus webhooks, each with its own path and credentials). Precedence: flag, then `RELAY_*` environment, then the file, then
//! the built-in default — the file's values become the flags' defaults, and
//! each is checked by the flag's own parser, so a value means the same in
//! both places. Unknown keys and bad values are errors naming their line.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_saphyr::Spanned;

use crate::config_error::ConfigError;

/// One scalar (or, for repeatable flags, a list) as written in the file.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Setting {
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(String),
    List(Vec<String>),
}

impl Setting {
    fn values(&self) -> Vec<String> {
        match self {
            Self::Bool(b) => vec![b.to_string()],
            Self::Int(i) => vec![i.to_string()],
            Self::Float(f) => vec![f.to_string()],
            Self::Text(s) => vec![s.clone()],
            Self::List(items) => items.clone(),
        }
    }
}

/// Declares the file's top-level keys once: the struct, and the list the
/// tests compare with `serve`'s flags (a new flag fails that test until it
/// gets its key here).
macro_rules! settings {
    ($($key:ident),* $(,)?) => {
        /// The parsed file.
        #[derive(Debug, Default, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct ConfigFile {
            $(
                #[serde(default)]
                $key: Option<Spanned<Setting>>,
            )*
            /// Webhook sources; absent means the one source of the
            /// single-source settings, called `default`.
            #[serde(default)]
            pub sources: Option<Vec<SourceEntry>>,
        }

        impl ConfigFile {
            /// Every `serve` setting the file can carry.
            #[cfg(test)]
            pub const KEYS: &'static [&'static str] = &[$(stringify!($key)),*];

            fn settings(&self) -> Vec<(&'static str, &Spanned<Setting>)> {
                let mut out = Vec::new();
                $(
                    if let Some(setting) = &self.$key {
                        out.push((stringify!($key), setting));
                    }
                )*
                out
            }
        }
    };
}

settings!(
    listen,
    admin_listen,
    tls_cert,
    tls_key,
    plaintext,
    allowlist,
    proxy_protocol,
    amqp_url,
    amqp_ca_file,
    amqp_client_cert,
    amqp_client_key,
    exchange,
    alternate_exchange,
    dead_letter_exchange,
    poison_attempts,
    broker_max_message_size,
    no_declare,
    confirm_timeout,
    publish_channels,
    webhook_path,
    secret_file,
    basic_auth_file,
    insecure_no_auth,
    timestamp_tolerance,
    event_aliases,
    spool_dir,
    spool_max_bytes,
    spool_max_messages,
    max_body,
    header_timeout,
    body_timeout,
    request_timeout,
    max_connections,
    max_connections_per_ip,
    reserved_connections,
    max_in_flight,
    rate_limit_per_ip,
    rate_limit_global,
    rate_limit_burst,
    dedup_window,
    dedup_capacity,
    shutdown_grace,
    shutdown_deadline,
    log_format,
    dev,
);

/// One entry of `sources:`, as written (validated in `config`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceEntry {
    pub name: Spanned<String>,
    pub path: Spanned<String>,
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    #[serde(default)]
    pub basic_auth_file: Option<PathBuf>,
    #[serde(default)]
    pub routing_key_prefix: Option<Spanned<String>>,
    #[serde(default)]
    pub exchange: Option<Spanned<String>>,
}

impl ConfigFile {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::new(format!("config file {}: {e}", path.display())))?;
        Self::parse(&text)
            .map_err(|e| ConfigError::new(format!("config file {}: {e}", path.display())))
    }

    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        serde_saphyr::from_str(text).map_err(|e| ConfigError::new(format!("invalid YAML: {e}")))
    }

    /// The value of one setting as written, for commands that take a single
    /// setting from the relay's file (`healthcheck`'s `admin_listen`).
    pub fn value(&self, key: &str) -> Option<String> {
        self.settings()
            .into_iter()
            .find(|(k, _)| *k == key)
            .and_then(|(_, setting)| setting.value.values().into_iter().next())
    }

    /// Reads the file again as `serve` would and checks every value with its
    /// flag's parser: what a reload compares with [`ConfigFile::snapshot`].
    pub fn load_checked(path: &Path) -> Result<Self, ConfigError> {
        let file = Self::load(path)?;
        let serve =
            <crate::config::ServeArgs as clap::Args>::augment_args(clap::Command::new("serve"));
        file.apply(serve)
            .map_err(|e| ConfigError::new(format!("config file {}: {e}", path.display())))?;
        Ok(file)
    }

    /// Each setting (and the `sources:` list) as text, to name on reload the
    /// ones that changed in the file: they take effect only after a restart.
    pub fn snapshot(&self) -> BTreeMap<String, Vec<String>> {
        let mut out: BTreeMap<String, Vec<String>> = self
            .settings()
            .into_iter()
            .map(|(key, setting)| (key.to_owned(), setting.value.values()))
            .collect();
        if let Some(sources) = &self.sources {
            let text = |s: &Option<Spanned<String>>| s.as_ref().map(|s| s.value.clone());
            let entries = sources
                .iter()
                .map(|s| {
                    format!(
                        "{} {} {:?} {:?} {:?} {:?}",
                        s.name.value,
                        s.path.value,
                        s.secret_file,
                        s.basic_auth_file,
                        text(&s.routing_key_prefix),
                        text(&s.exchange)
                    )
                })
                .collect();
            out.insert("sources".to_owned(), entries);
        }
        out
    }

    /// Makes the file's settings the defaults of `command`'s flags, each
    /// checked with the flag's own value parser.
    pub fn apply(&self, mut command: clap::Command) -> Result<clap::Command, ConfigError> {
        for (key, setting) in self.settings() {
            let values = setting.value.values();
            let line = setting.referenced.line();
            let arg = command
                .get_arguments()
                .find(|a| a.get_id() == key)
                .ok_or_else(|| {
                    ConfigError::new(format!("line {line}: `{key}` is not a setting"))
                })?;
            let repeatable = matches!(arg.get_action(), clap::ArgAction::Append);
            if matches!(setting.value, Setting::List(_)) && !repeatable {
                return Err(ConfigError::new(format!(
                    "line {line}: `{key}` takes one value, not a list"
                )));
            }
            for value in &values {
                check_value(arg, value)
                    .map_err(|e| ConfigError::new(format!("line {line}: `{key}`: {e}")))?;
            }
            command = command.mut_arg(key, |a| a.default_values(values));
        }
        Ok(command)
    }
}

/// Runs `value` through the flag's own parser (a one-flag command), so the
/// file accepts exactly what the flag accepts.
fn check_value(arg: &clap::Arg, value: &str) -> Result<(), String> {
    if matches!(
        arg.get_action(),
        clap::ArgAction::SetTrue | clap::ArgAction::SetFalse
    ) {
        return value
            .parse::<bool>()
            .map(drop)
            .map_err(|_| format!("{value:?} is not true or false"));
    }
    let long = arg
        .get_long()
        .ok_or_else(|| "not a named flag".to_owned())?;
    clap::Command::new("config")
        .no_binary_name(true)
        .arg(arg.clone().required(false))
        .try_get_matches_from([format!("--{long}={value}")])
        .map(drop)
        .map_err(|e| {
            e.to_string()
                .lines()
                .next()
                .unwrap_or("")
                .trim_start_matches("error: ")
                .to_owned()
        })
}

/// Finds `--config PATH` (or `RELAY_CONFIG`) for `serve` and `check-config`
/// before the flags are parsed, since the file supplies their defaults.
pub fn find_config_arg(argv: &[std::ffi::OsString], env: Option<PathBuf>) -> Option<PathBuf> {
    let sub = argv.get(1).and_then(|s| s.to_str())?;
    if sub != "serve" && sub != "check-config" {
        return None;
    }
    let mut args = argv.iter().skip(2);
    while let Some(arg) = args.next() {
        let Some(text) = arg.to_str() else { continue };
        if text == "--" {
            break;
        }
        if text == "--config" {
            return args.next().map(PathBuf::from);
        }
        if let Some(path) = text.strip_prefix("--config=") {
            return Some(PathBuf::from(path));
        }
    }
    env
}

/// The keys whose text differs between two snapshots, in order.
pub fn changed_keys(
    before: &BTreeMap<String, Vec<String>>,
    after: &BTreeMap<String, Vec<String>>,
) -> Vec<String> {
    before
        .keys()
        .chain(after.keys())
        .filter(|key| before.get(*key) != after.get(*key))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn every_serve_flag_has_a_key() {
        let command = crate::Cli::command();
        let serve = command
            .get_subcommands()
            .find(|c| c.get_name() == "serve")
            .unwrap();
        let mut flags: Vec<&str> = serve
            .get_arguments()
            .filter(|a| !a.is_hide_set())
            .map(|a| a.get_id().as_str())
            .filter(|id| !matches!(*id, "config" | "help"))
            .collect();
        flags.sort_unstable();
        let mut keys = ConfigFile::KEYS.to_vec();
        keys.sort_unstable();
        assert_eq!(flags, keys);
    }

    #[test]
    fn unknown_keys_and_bad_values_name_their_line() {
        let err = ConfigFile::parse("listen: 127.0.0.1:8443\nlisten_adress: x\n").unwrap_err();
        assert!(err.to_string().contains("listen_adress"), "{err}");
        assert!(err.to_string().contains("line 2"), "{err}");
        let file = ConfigFile::parse("plaintext: true\nconfirm_timeout: soon\n").unwrap();
        let err = file.apply(serve_command()).unwrap_err();
        assert!(
            err.to_string().starts_with("line 2: `confirm_timeout`"),
            "{err}"
        );
    }

    fn serve_command() -> clap::Command {
        crate::Cli::command()
            .find_subcommand("serve")
            .unwrap()
            .clone()
    }

    #[test]
    fn the_shipped_example_is_valid() {
        let file = ConfigFile::parse(include_str!("../relay.example.yaml")).unwrap();
        assert!(file.settings().len() >= 5);
        file.apply(serve_command()).unwrap();
    }

    /// Each deployment's relay.yaml: known keys, values its flags accept,
    /// and settings that agree with each other (the files they name exist
    /// only where they are deployed).
    #[test]
    fn every_deployments_config_file_is_valid() {
        #[derive(serde::Deserialize)]
        struct ConfigMap {
            data: std::collections::HashMap<String, String>,
        }
        let configmap: ConfigMap =
            serde_saphyr::from_str(include_str!("../deploy/kubernetes/configmap.yaml")).unwrap();
        let files = [
            (
                "relay.example.yaml (systemd)",
                include_str!("../relay.example.yaml").to_owned(),
            ),
            (
                "image",
                include_str!("../deploy/container/relay.yaml").to_owned(),
            ),
            (
                "compose",
                include_str!("../deploy/compose/relay.yaml").to_owned(),
            ),
            ("kubernetes", configmap.data["relay.yaml"].clone()),
        ];
        for (name, text) in files {
            let file = ConfigFile::parse(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
            let command = crate::Cli::command()
                .mut_subcommand("serve", |serve| file.apply(serve).expect(name));
            let matches = command
                .try_get_matches_from(["ocrolus-relay", "serve"])
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            let crate::Command::Serve(args) =
                <crate::Cli as clap::FromArgMatches>::from_arg_matches(&matches)
                    .expect(name)
                    .command
            else {
                unreachable!("serve")
            };
            // The image's own file leaves the credentials to the deployment.
            let secrets = (name == "image").then(|| "a-long-enough-webhook-secret".to_owned());
            if let Err(e) = crate::config::Config::from_args(&args, secrets) {
                // The image sets no TLS pair either: that is the deployment's.
                assert!(
                    name == "image" && e.to_string().contains("TLS"),
                    "{name}: {e}"
                );
            }
        }
    }

    #[test]
    fn finds_the_config_flag_of_serve_only() {
        let argv = |a: &[&str]| a.iter().map(std::ffi::OsString::from).collect::<Vec<_>>();
        assert_eq!(
            find_config_arg(&argv(&["x", "serve", "--config", "r.yaml"]), None),
            Some(PathBuf::from("r.yaml"))
        );
        assert_eq!(
            find_config_arg(&argv(&["x", "check-config", "--config=r.yaml"]), None),
            Some(PathBuf::from("r.yaml"))
        );
        assert_eq!(
            find_config_arg(&argv(&["x", "tail"]), Some(PathBuf::from("e.yaml"))),
            None
        );
        assert_eq!(
            find_config_arg(&argv(&["x", "serve"]), Some(PathBuf::from("e.yaml"))),
            Some(PathBuf::from("e.yaml"))
        );
    }
}
