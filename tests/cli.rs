//! The command line as an operator uses it, through the binary: exit codes
//! and the exact lines printed.

mod common;

use std::process::Output;
use std::time::Duration;

use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_ocrolus-relay");

async fn run(args: &[&str]) -> Output {
    tokio::process::Command::new(BIN)
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .output()
        .await
        .expect("run ocrolus-relay")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test]
async fn healthcheck_exits_0_on_a_live_relay_and_1_when_it_is_gone() {
    require_broker!();
    let relay = TestRelay::start(RelayOptions::default()).await;
    let admin = relay.admin.to_string();

    let live = run(&["healthcheck", "--admin-listen", &admin]).await;
    assert_eq!(live.status.code(), Some(0), "{}", text(&live.stderr));
    assert_eq!(
        text(&live.stdout),
        format!("ok: GET http://{admin}/livez answered 200 OK: {{\"status\":\"ok\"}}\n")
    );
    let ready = run(&["healthcheck", "--ready", "--admin-listen", &admin]).await;
    assert_eq!(ready.status.code(), Some(0), "{}", text(&ready.stderr));
    assert!(text(&ready.stdout).contains("/readyz answered 200 OK"));

    let broker = TestBroker::connect().await;
    relay.finish(&broker, &[]).await;
    let gone = run(&["healthcheck", "--admin-listen", &admin]).await;
    assert_eq!(gone.status.code(), Some(1));
    assert!(
        text(&gone.stderr).starts_with(&format!(
            "error: connecting to the admin listener {admin}: "
        )),
        "{}",
        text(&gone.stderr)
    );
}

#[tokio::test]
async fn healthcheck_follows_an_unspecified_admin_listen_address() {
    require_broker!();
    let relay = TestRelay::start(RelayOptions::default()).await;
    // As in the container: RELAY_ADMIN_LISTEN=0.0.0.0:PORT for `serve`.
    let listen = format!("0.0.0.0:{}", relay.admin.port());
    let out = tokio::process::Command::new(BIN)
        .arg("healthcheck")
        .env("RELAY_ADMIN_LISTEN", &listen)
        .output()
        .await
        .expect("run");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    // As in the image: the address is in the file RELAY_CONFIG names.
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("relay.yaml");
    std::fs::write(&config, format!("admin_listen: {listen}\n")).expect("write");
    let out = tokio::process::Command::new(BIN)
        .arg("healthcheck")
        .env_remove("RELAY_ADMIN_LISTEN")
        .env("RELAY_CONFIG", &config)
        .output()
        .await
        .expect("run");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains(&format!("127.0.0.1:{}/livez", relay.admin.port())),
        "{}",
        text(&out.stdout)
    );
    let broker = TestBroker::connect().await;
    relay.finish(&broker, &[]).await;
}

#[tokio::test]
async fn completions_and_man_pages_are_generated() {
    for shell in ["bash", "zsh", "fish"] {
        let out = run(&["completions", shell]).await;
        assert_eq!(out.status.code(), Some(0), "{shell}");
        let script = text(&out.stdout);
        assert!(script.contains("ocrolus-relay"), "{shell}: {script}");
        assert!(
            script.contains("healthcheck"),
            "{shell}: subcommands missing"
        );
    }
    let man = run(&["man"]).await;
    assert_eq!(man.status.code(), Some(0));
    assert!(text(&man.stdout).starts_with(".ie"), "not roff");
    assert!(text(&man.stdout).contains(".TH ocrolus-relay 1"));

    let dir = tempfile::tempdir().expect("tempdir");
    let out_dir = dir.path().display().to_string();
    let pages = run(&["man", "--out-dir", &out_dir]).await;
    assert_eq!(pages.status.code(), Some(0), "{}", text(&pages.stderr));
    for page in [
        "ocrolus-relay.1",
        "ocrolus-relay-serve.1",
        "ocrolus-relay-spool.1",
    ] {
        let roff = std::fs::read_to_string(dir.path().join(page)).expect(page);
        assert!(roff.contains(".TH"), "{page}");
    }
    let serve = std::fs::read_to_string(dir.path().join("ocrolus-relay-serve.1")).expect("serve");
    assert!(
        serve.contains(r"\-\-admin\-listen"),
        "serve's flags in its page"
    );
}

#[tokio::test]
async fn version_names_the_git_commit() {
    let out = run(&["--version"]).await;
    assert_eq!(out.status.code(), Some(0));
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map_or_else(
            || "unknown".to_owned(),
            |o| text(&o.stdout).trim().to_owned(),
        );
    assert_eq!(
        text(&out.stdout),
        format!(
            "ocrolus-relay {} (commit {commit})\n",
            env!("CARGO_PKG_VERSION")
        )
    );
}

/// `check-config --dev` in an empty directory with `env` only.
async fn check_config_dev(args: &[&str], env: &[(&str, &str)]) -> Output {
    let dir = tempfile::tempdir().expect("tempdir");
    let spool = dir.path().join("spool").display().to_string();
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.arg("check-config")
        .args(["--spool-dir", &spool])
        .args(args)
        .current_dir(dir.path())
        .env_clear();
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().await.expect("run check-config")
}

#[tokio::test]
async fn boolean_env_twins_take_1_0_yes_no_true_false() {
    for on in ["1", "true", "yes", "on", "TRUE"] {
        let out = check_config_dev(&[], &[("RELAY_DEV", on)]).await;
        assert_eq!(
            out.status.code(),
            Some(0),
            "RELAY_DEV={on}: {}",
            text(&out.stderr)
        );
        assert!(text(&out.stdout).contains("127.0.0.1:8080 (plaintext)"));
    }
    for off in ["0", "false", "no", "off"] {
        let out = check_config_dev(&[], &[("RELAY_DEV", off)]).await;
        // Not --dev: no TLS pair and no --plaintext is a configuration error.
        assert_eq!(out.status.code(), Some(64), "RELAY_DEV={off}");
    }
}

#[tokio::test]
async fn durations_and_sizes_take_units_and_plain_numbers() {
    let out = check_config_dev(
        &[
            "--dev",
            "--confirm-timeout",
            "500ms",
            "--request-timeout",
            "2s",
            "--spool-max-bytes",
            "64MiB",
            "--max-body",
            "256KiB",
        ],
        &[],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("confirm timeout:   500ms\n"), "{stdout}");
    assert!(stdout.contains(" / 67108864 bytes)"), "{stdout}");
    let plain = check_config_dev(
        &[
            "--dev",
            "--confirm-timeout",
            "1.5",
            "--spool-max-bytes",
            "1000",
        ],
        &[],
    )
    .await;
    assert_eq!(plain.status.code(), Some(0), "{}", text(&plain.stderr));
    assert!(text(&plain.stdout).contains("confirm timeout:   1.5s\n"));
    assert!(text(&plain.stdout).contains(" / 1000 bytes)"));
}

#[tokio::test]
async fn env_names_match_flags_and_former_names_still_work() {
    let spool_max = |out: &Output| {
        let stdout = text(&out.stdout);
        stdout
            .lines()
            .find(|l| l.starts_with("spool:"))
            .unwrap_or_default()
            .to_owned()
    };
    let out = check_config_dev(&["--dev"], &[("RELAY_SPOOL_MAX_MESSAGES", "9")]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        spool_max(&out).contains("max 9 events"),
        "{}",
        spool_max(&out)
    );
    let out = check_config_dev(&["--dev"], &[("RELAY_SPOOL_MAX_EVENTS", "7")]).await;
    assert!(
        spool_max(&out).contains("max 7 events"),
        "{}",
        spool_max(&out)
    );
    let out = check_config_dev(&["--dev", "--spool-max-events", "5"], &[]).await;
    assert!(
        spool_max(&out).contains("max 5 events"),
        "{}",
        spool_max(&out)
    );

    for var in ["RELAY_EVENT_ALIAS", "RELAY_EVENT_ALIASES"] {
        let bad = check_config_dev(&["--dev"], &[(var, "no-equals-sign")]).await;
        assert_eq!(bad.status.code(), Some(64), "{var} not read");
    }
}

/// Files for the configuration-error cases, in one directory.
struct BadConfigs {
    dir: tempfile::TempDir,
}

impl BadConfigs {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).expect("write");
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .expect("chmod");
        };
        write("allow.yaml", "allow: [127.0.0.1/32]\n");
        write("hostbits.yaml", "allow:\n  - 10.0.0.1/8\n");
        write(
            "proxy-hostbits.yaml",
            "allow: [10.0.0.0/8]\ntrusted_proxies:\n  - 192.168.1.1/24\n",
        );
        write("secret", "a-long-enough-webhook-secret-0123456789\n");
        write("empty-secret", "");
        let leaf = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("leaf");
        let other = rcgen::KeyPair::generate().expect("key");
        write("leaf.pem", &leaf.cert.pem());
        write("other-key.pem", &other.serialize_pem());
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).expect("ca");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Test CA");
        let ca_key = rcgen::KeyPair::generate().expect("ca key");
        let ca = params.self_signed(&ca_key).expect("self-signed ca");
        write("ca.pem", &ca.pem());
        write("ca-key.pem", &ca_key.serialize_pem());
        Self { dir }
    }

    /// `command` with `args`, run in the directory (file names are
    /// relative, as the operator sees them), ephemeral ports, no broker.
    async fn run(&self, command: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut cmd = tokio::process::Command::new(BIN);
        cmd.arg(command)
            .args(args)
            .args([
                "--spool-dir",
                "spool",
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
                "--amqp-url",
                "amqp://guest:guest@127.0.0.1:1/%2f",
            ])
            .current_dir(self.dir.path())
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        tokio::time::timeout(Duration::from_secs(30), cmd.output())
            .await
            .expect("a configuration error ends the process at once")
            .expect("run")
    }
}

/// Environment variables for one run.
type Env = Vec<(&'static str, &'static str)>;

/// Every configuration error: `serve` and `check-config` exit 64 and print
/// exactly one line, naming the root cause and what to do.
#[tokio::test]
async fn every_configuration_error_exits_64_with_one_line_saying_what_to_do() {
    let files = BadConfigs::new();
    let tls = |cert: &'static str, key: &'static str| {
        vec![
            "--allowlist",
            "allow.yaml",
            "--secret-file",
            "secret",
            "--tls-cert",
            cert,
            "--tls-key",
            key,
        ]
    };
    let plain = |allowlist: &'static str| {
        vec![
            "--allowlist",
            allowlist,
            "--secret-file",
            "secret",
            "--plaintext",
        ]
    };
    let cases: Vec<(Vec<&str>, Env, &str)> = vec![
        (
            plain("hostbits.yaml"),
            vec![],
            "error: allowlist hostbits.yaml: line 2: `allow` entry \"10.0.0.1/8\" has host bits set; \
             write 10.0.0.0/8 for the whole range or 10.0.0.1/32 for the one address",
        ),
        (
            plain("proxy-hostbits.yaml"),
            vec![],
            "error: allowlist proxy-hostbits.yaml: line 3: `trusted_proxies` entry \"192.168.1.1/24\" \
             has host bits set; write 192.168.1.0/24 for the whole range or 192.168.1.1/32 for the \
             one address",
        ),
        (
            plain("missing.yaml"),
            vec![],
            "error: allowlist missing.yaml: No such file or directory (os error 2)",
        ),
        (
            vec!["--allowlist", "allow.yaml", "--plaintext"],
            vec![],
            "error: no HMAC secret (--secret-file or RELAY_WEBHOOK_SECRETS) and no --basic-auth-file: \
             refusing to accept unauthenticated webhooks (--insecure-no-auth exists for development)",
        ),
        (
            vec![
                "--allowlist",
                "allow.yaml",
                "--plaintext",
                "--secret-file",
                "empty-secret",
            ],
            vec![],
            "error: secret file empty-secret is empty; write the webhook secret into it (one per \
             line), or remove --secret-file",
        ),
        (
            vec!["--allowlist", "allow.yaml", "--plaintext"],
            vec![("RELAY_WEBHOOK_SECRETS", "")],
            "error: RELAY_WEBHOOK_SECRETS is set but empty; put the webhook secret in it, or unset \
             it and pass --secret-file",
        ),
        (
            tls("leaf.pem", "other-key.pem"),
            vec![],
            "error: TLS key other-key.pem does not belong to the certificate leaf.pem (their public \
             keys differ); point --tls-key at the key the certificate was issued for",
        ),
        (
            tls("ca.pem", "ca-key.pem"),
            vec![],
            "error: TLS certificate ca.pem: the first certificate (CN=Test CA) is a CA certificate \
             (basicConstraints CA:TRUE); clients refuse it as a server certificate \
             (CaUsedAsEndEntity). Put the server's own certificate first, followed by its \
             intermediates",
        ),
        (
            vec!["--allowlist", "allow.yaml", "--secret-file", "secret"],
            vec![],
            "error: TLS needs --tls-cert and --tls-key; pass --plaintext to serve HTTP behind a \
             TLS-terminating proxy (or --dev for a local trial)",
        ),
    ];
    for command in ["serve", "check-config"] {
        for (args, env, line) in &cases {
            let out = files.run(command, args, env).await;
            assert_eq!(
                (out.status.code(), text(&out.stderr)),
                (Some(64), format!("{line}\n")),
                "{command} {args:?}"
            );
        }
    }
}

#[tokio::test]
async fn with_json_logs_a_fatal_start_up_error_is_one_json_log_line() {
    let files = BadConfigs::new();
    let out = files
        .run(
            "serve",
            &[
                "--allowlist",
                "hostbits.yaml",
                "--secret-file",
                "secret",
                "--plaintext",
                "--log-format",
                "json",
            ],
            &[],
        )
        .await;
    assert_eq!(out.status.code(), Some(64));
    let stderr = text(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    let line: serde_json::Value = serde_json::from_str(&stderr).expect("one JSON line");
    assert_eq!(line["level"], "ERROR", "{line}");
    assert_eq!(
        line["message"],
        "allowlist hostbits.yaml: line 2: `allow` entry \"10.0.0.1/8\" has host bits set; write \
         10.0.0.0/8 for the whole range or 10.0.0.1/32 for the one address",
        "{line}"
    );
    assert!(line["timestamp"].is_string(), "{line}");
    // A config file that cannot be read is reported the same way.
    let out = files
        .run(
            "serve",
            &["--config", "missing.yaml"],
            &[("RELAY_LOG_FORMAT", "json")],
        )
        .await;
    assert_eq!(out.status.code(), Some(64));
    let line: serde_json::Value = serde_json::from_str(&text(&out.stderr)).expect("one JSON line");
    assert_eq!(
        line["message"],
        "config file missing.yaml: No such file or directory (os error 2)"
    );
}

#[tokio::test]
async fn tail_says_once_why_the_broker_refused_it_and_what_to_do() {
    require_broker!();
    let refused = run(&[
        "tail",
        "--amqp-url",
        "amqp://guest:wrong-password@127.0.0.1:5672/%2f",
        "--max",
        "1",
    ])
    .await;
    assert_eq!(refused.status.code(), Some(1));
    assert_eq!(
        text(&refused.stderr),
        "error: connecting to the broker: no broker node answered: 127.0.0.1:5672: rejected (TLS or \
         credentials): ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN. For \
         details see the broker logfile.; check the user and password in --amqp-url \
         (RELAY_AMQP_URL), and that the user may connect from this host (RabbitMQ's guest only \
         from localhost)\n"
    );
    let down = run(&[
        "tail",
        "--amqp-url",
        "amqp://guest:guest@127.0.0.1:1/%2f",
        "--max",
        "1",
    ])
    .await;
    assert_eq!(down.status.code(), Some(1));
    assert_eq!(
        text(&down.stderr),
        "error: connecting to the broker: no broker node answered: 127.0.0.1:1: unreachable: IO \
         error: Connection refused (os error 111); check that RabbitMQ runs there and that \
         --amqp-url (RELAY_AMQP_URL) names it\n"
    );
    let exchange = unique("tail-missing");
    let missing = run(&["tail", "--exchange", &exchange, "--max", "1"]).await;
    assert_eq!(missing.status.code(), Some(1));
    assert_eq!(
        text(&missing.stderr),
        format!(
            "error: binding to exchange {exchange}: NOT_FOUND - no exchange '{exchange}' in vhost \
             '/'; the relay declares it when it starts (unless --no-declare), or pass --exchange \
             with the relay's exchange\n"
        )
    );
}

#[tokio::test]
async fn send_test_prints_the_relays_refusal_and_what_to_check() {
    require_broker!();
    let relay = TestRelay::start(RelayOptions::default()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let wrong = dir.path().join("wrong-secret");
    std::fs::write(&wrong, "not-the-relays-secret-0123456789abcdef\n").expect("write");
    let out = run(&[
        "send-test",
        "--secret-file",
        &wrong.display().to_string(),
        "--url",
        &relay.url,
        "--event",
        "book.verified",
    ])
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        "error: relay answered 401 {\"error\":\"unauthorized\"}: the relay did not accept the \
         signature or credentials; sign with a secret the relay has (--secret-file, \
         RELAY_WEBHOOK_SECRETS, --basic-auth-file, or --dev against `serve --dev`). The relay's \
         log line for this request gives the reason\n"
    );
    let broker = TestBroker::connect().await;
    relay.finish(&broker, &[]).await;
}

#[tokio::test]
async fn send_test_explains_a_connection_closed_at_accept() {
    require_broker!();
    let relay = TestRelay::start(RelayOptions {
        allow: vec!["10.0.0.0/8".into()],
        ..RelayOptions::default()
    })
    .await;
    let out = run(&[
        "send-test",
        "--dev",
        "--url",
        &relay.url,
        "--event",
        "book.verified",
    ])
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        "error: the relay closed the connection without answering: it does so to peers not on its \
         allowlist, before reading a byte (the relay logs reason=\"peer_not_allowed\")\n"
    );
    let broker = TestBroker::connect().await;
    relay.finish(&broker, &[]).await;
}

/// `spool stats` with no relay answering: it says it reads the file (the
/// exact line `read_file`) and finds the 3 events spooled there.
async fn stats_from_file(args: &[&str], env: &[(&str, &str)], read_file: &str) {
    let out = run_binary(args, env).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{args:?}: {}",
        text(&out.stderr)
    );
    assert_eq!(text(&out.stderr), read_file);
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(stats["messages"], 3, "{stats}");
}

/// An address where no admin listener answers.
fn closed_port() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").to_string()
}

#[tokio::test]
async fn spool_commands_without_a_relay_read_the_file_and_say_so() {
    require_broker!();
    let broker = TestBroker::connect().await;
    let exchange = unique("test.events");
    ocrolus_relay::declare_topology(&broker.channel, &exchange, None, None)
        .await
        .expect("declare");
    let queue = broker.bind_queue(&exchange, "#").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let spool_dir = dir.path().join("spool");
    let proxy = FaultProxy::start("127.0.0.1:5672").await;
    proxy.cut();
    let opts = RelayOptions {
        amqp_url: proxy.url(),
        ..RelayOptions::default()
    };
    let alternate = format!("{exchange}.unrouted");
    let mut relay = RelayBinary::start(&serve_args(
        &opts,
        dir.path(),
        &exchange,
        &alternate,
        &spool_dir,
    ))
    .await;
    let bodies: Vec<Vec<u8>> = (0..3)
        .map(|n| format!(r#"{{"event_name":"BOOK_VERIFIED","book_pk":{n}}}"#).into_bytes())
        .collect();
    for body in &bodies {
        let answer = try_post(
            &relay.url,
            &new_id(),
            body,
            std::time::Duration::from_secs(30),
        )
        .await
        .expect("answer");
        assert_eq!(answer.0, 200);
    }
    let no_admin = closed_port();
    let spool = spool_dir.display().to_string();
    let file = format!("{spool}/spool.redb");
    let refused = format!(
        "no relay answered at {no_admin} (connecting to the admin listener {no_admin}: \
         Connection refused (os error 111))"
    );

    // The relay holds the file and its admin listener is not where we look.
    let args = [
        "spool",
        "stats",
        "--spool-dir",
        &spool,
        "--admin-listen",
        &no_admin,
    ];
    let out = run_binary(&args, &[]).await;
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        format!(
            "error: the spool file {file} is locked by a running relay, but {refused}: pass that \
             relay's admin address with --admin-listen HOST:PORT (or RELAY_ADMIN_LISTEN), as given \
             to `serve --admin-listen`; or stop the relay and run this again\n"
        )
    );
    relay.sigterm();
    relay
        .wait_exit(std::time::Duration::from_secs(60))
        .await
        .expect("relay stopped");

    // Flags before or after the action, or their env twins: the same file.
    let read_file = format!("spool: {refused}; reading the file {file} directly\n");
    stats_from_file(&args, &[], &read_file).await;
    let before = [
        "spool",
        "--spool-dir",
        &spool,
        "--admin-listen",
        &no_admin,
        "stats",
    ];
    stats_from_file(&before, &[], &read_file).await;
    let env = [
        ("RELAY_SPOOL_DIR", spool.as_str()),
        ("RELAY_ADMIN_LISTEN", &no_admin),
    ];
    stats_from_file(&["spool", "stats"], &env, &read_file).await;
    let config = dir.path().join("relay.yaml");
    std::fs::write(
        &config,
        format!("admin_listen: {no_admin}\nspool_dir: {spool}\n"),
    )
    .expect("write config");
    let config = config.display().to_string();
    stats_from_file(
        &["spool", "stats"],
        &[("RELAY_CONFIG", &config)],
        &read_file,
    )
    .await;
    let out = run_binary(
        &[
            "spool",
            "list",
            "--spool-dir",
            &spool,
            "--admin-listen",
            &no_admin,
        ],
        &[],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let listed: Vec<String> = text(&out.stdout)
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("json line");
            v["body"]
                .as_str()
                .expect("the file shows bodies")
                .to_owned()
        })
        .collect();
    let sent: Vec<String> = bodies.iter().map(|b| text(b)).collect();
    assert_eq!(listed, sent);

    // A missing exchange: the broker's reason, once, and nothing replayed.
    let missing = unique("test.missing");
    let replay = |exchange: String| {
        let (spool, no_admin) = (spool.clone(), no_admin.clone());
        async move {
            let args = [
                "spool",
                "replay",
                "--amqp-url",
                AMQP_URL,
                "--exchange",
                &exchange,
                "--spool-dir",
                &spool,
                "--admin-listen",
                &no_admin,
            ];
            run_binary(&args, &[]).await
        }
    };
    let out = replay(missing.clone()).await;
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        format!(
            "{read_file}error: the broker at 127.0.0.1:5672 has no exchange '{missing}' (NOT_FOUND \
             - no exchange '{missing}' in vhost '/'): pass the relay's exchange with --exchange \
             (or RELAY_EXCHANGE), or start the relay once so that it declares it; 0 events \
             replayed, the rest stay in the spool\n"
        )
    );
    assert_eq!(text(&out.stdout), "");

    // The relay's exchange: every event, exact bytes, in order.
    let out = replay(exchange.clone()).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "{\"replayed\":3,\"unreadable_left_in_quarantine\":0}\n"
    );
    let delivered: Vec<String> = broker
        .drain(&queue, 3, std::time::Duration::from_secs(10))
        .await
        .iter()
        .map(|m| text(&m.delivery.data))
        .collect();
    assert_eq!(delivered, sent);
    broker.delete_queue(&queue).await;
    broker.delete_exchange(&exchange).await;
}
