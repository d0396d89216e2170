//! The command line as an operator uses it, through the binary: exit codes
//! and the exact lines printed.

mod common;

use std::process::Output;

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
