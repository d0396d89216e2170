//! `ocrolus rotate-secret`: zero-downtime rotation of a source's HMAC secret.
//!
//! The order keeps the relay accepting whatever secret Ocrolus signs with at
//! every moment:
//! 1. preflight: the webhook exists, the relay runs with this secret file;
//! 2. a new secret from the OS random source goes first in the secret file
//!    (old ones kept; atomic write, owner and mode preserved);
//! 3. `POST /reload` on the relay's admin listener;
//! 4. `GET /secrets` confirms the relay holds the old and the new secret;
//! 5. the new secret is uploaded to Ocrolus (rotate-secret API);
//! 6. after the grace period (Ocrolus retries failed deliveries for about
//!    ten minutes, signed with the old secret) the old secrets leave the
//!    file, the relay reloads and is confirmed to hold only the new one.
//!
//! A failure before Ocrolus has the new secret takes it out of the file
//! again; a failure after leaves both in the relay. A pending step 6 is
//! recorded next to the secret file (`<file>.rotation`), so `--finish` can
//! run it later, and only after a confirmed upload.

use std::collections::BTreeSet;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use bytes::Bytes;
use http::{Method, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rand::TryRngCore;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tracing::{info, warn};

use super::ocrolus::{ApiArgs, SourceArgs, SourceRef};
use crate::auth::{Secrets, fingerprint};
use crate::ocrolus::Client;

/// Default grace period: longer than Ocrolus' retry window (three retries
/// about three minutes apart), with room for a delivery in flight.
pub const DEFAULT_GRACE: &str = "20m";
/// Length of a generated secret (Ocrolus accepts 16–128 characters).
const SECRET_CHARS: usize = 48;
const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
/// Upload attempts when Ocrolus does not answer clearly (rotate-secret sets
/// a value, so repeating it is harmless).
const UPLOAD_ATTEMPTS: u32 = 3;

#[derive(Debug, Clone, clap::Args)]
pub struct RotateArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    /// Webhook uuid; default: the one webhook whose URL path is the source's.
    #[arg(long)]
    pub webhook: Option<String>,
    /// Time between the upload and removing the old secret (e.g. 20m, 900s).
    #[arg(long, default_value = DEFAULT_GRACE, value_parser = parse_duration)]
    pub grace: Duration,
    /// Only the last step: remove the old secrets once the grace period
    /// since the recorded upload has passed (waits until then).
    #[arg(long, conflicts_with = "defer_finish")]
    pub finish: bool,
    /// Stop after the upload; run again with --finish later (cron).
    #[arg(long)]
    pub defer_finish: bool,
}

/// `20m`, `900s`, `1h` or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let (number, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let factor = match unit {
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => return Err(format!("{s:?}: use s, m or h (e.g. 20m)")),
    };
    crate::units::parse_duration(
        &(number
            .parse::<f64>()
            .map_err(|_| format!("{s:?} is not a duration"))?
            * factor)
            .to_string(),
    )
}

/// What `--finish` needs to know about the upload.
#[derive(Debug, Serialize, Deserialize)]
struct Pending {
    source: String,
    webhook: String,
    /// Fingerprint of the secret Ocrolus now has.
    fingerprint: String,
    uploaded_at: i64,
}

pub async fn run(api: &ApiArgs, args: RotateArgs) -> anyhow::Result<()> {
    let source = args.source.resolve()?;
    let secret_file = source
        .secret_file
        .clone()
        .ok_or_else(|| anyhow!("source {} has no secret file (--secret-file)", source.name))?;
    let admin = Admin::new(&source.admin_url)?;
    let mut log = Progress::new(api.json);
    let result = if args.finish {
        finish(&source, &secret_file, &admin, args.grace, &mut log).await
    } else {
        rotate(api, &args, &source, &secret_file, &admin, &mut log).await
    };
    log.end(&result);
    result
}

async fn rotate(
    api: &ApiArgs,
    args: &RotateArgs,
    source: &SourceRef,
    secret_file: &Path,
    admin: &Admin,
    log: &mut Progress,
) -> anyhow::Result<()> {
    let client = api.client()?;
    let pending_path = pending_path(secret_file);
    if pending_path.exists() {
        bail!(
            "a rotation of {} is waiting for its last step ({}): run rotate-secret --finish first",
            secret_file.display(),
            pending_path.display()
        );
    }
    let webhook = match &args.webhook {
        Some(uuid) => uuid.clone(),
        None => find_webhook(&client, source).await?,
    };
    client
        .get_webhook(&webhook)
        .await
        .with_context(|| format!("webhook {webhook}"))?;
    let file = SecretFile::read(secret_file)?;
    let old = file.fingerprints()?;
    if old.is_empty() {
        bail!(
            "{} holds no secret: Ocrolus signs nothing yet, and adding a secret now would reject its unsigned deliveries; set the first secret with `webhooks add` instead",
            secret_file.display()
        );
    }
    let loaded = admin.fingerprints(&source.name).await?;
    if loaded != old {
        bail!(
            "the relay's loaded secrets for source {} differ from {} (file: {}, relay: {}): is it the file the relay reads, or is a reload pending?",
            source.name,
            secret_file.display(),
            list(&old),
            list(&loaded)
        );
    }
    log.step(
        "preflight",
        format!(
            "webhook {webhook} exists; the relay holds {} secret(s) of {}",
            old.len(),
            secret_file.display()
        ),
    );

    let secret = generate_secret()?;
    let new = fingerprint(secret.as_bytes());
    log.step("generate", format!("new secret, fingerprint {new}"));

    file.with_first(&secret).write_atomic()?;
    log.step(
        "add",
        format!("added it to {} before the old ones", secret_file.display()),
    );

    let expect_both: BTreeSet<String> = old.iter().cloned().chain([new.clone()]).collect();
    let confirmed = async {
        admin.reload().await?;
        log.step("reload", "the relay reloaded its secrets".into());
        let loaded = admin.fingerprints(&source.name).await?;
        if loaded != expect_both {
            bail!(
                "after the reload the relay holds {} instead of {}",
                list(&loaded),
                list(&expect_both)
            );
        }
        log.step(
            "confirm",
            format!(
                "the relay accepts the old and the new secret ({})",
                list(&loaded)
            ),
        );
        Ok(())
    }
    .await;
    if let Err(e) = confirmed {
        rollback(secret_file, &new, admin, log).await;
        return Err(e.context("the relay did not take the new secret; Ocrolus keeps the old one"));
    }

    if let Err(e) = upload(&client, &webhook, &secret).await {
        if e.is_refusal() {
            rollback(secret_file, &new, admin, log).await;
            return Err(anyhow!(e).context("Ocrolus refused the new secret and keeps the old one"));
        }
        return Err(anyhow!(e).context(
            "Ocrolus did not confirm the upload; the relay keeps accepting the old and the new secret, so deliveries continue; run rotate-secret again when Ocrolus is reachable",
        ));
    }
    let pending = Pending {
        source: source.name.clone(),
        webhook: webhook.clone(),
        fingerprint: new.clone(),
        uploaded_at: crate::now_ms() / 1000,
    };
    write_atomic(
        &pending_path,
        serde_json::to_vec_pretty(&pending)?.as_slice(),
        None,
    )?;
    log.step(
        "upload",
        format!("Ocrolus signs with the new secret from now on (webhook {webhook})"),
    );

    if args.defer_finish {
        log.step(
            "deferred",
            format!(
                "run `ocrolus-relay ocrolus rotate-secret --source {} --finish` after {:?} to remove the old secret",
                source.name, args.grace
            ),
        );
        return Ok(());
    }
    finish(source, secret_file, admin, args.grace, log).await
}

/// Step 6, also run alone by `--finish`.
async fn finish(
    source: &SourceRef,
    secret_file: &Path,
    admin: &Admin,
    grace: Duration,
    log: &mut Progress,
) -> anyhow::Result<()> {
    let pending_path = pending_path(secret_file);
    let text = std::fs::read(&pending_path).map_err(|_| {
        anyhow!(
            "no confirmed upload recorded for {} ({} missing): nothing to finish",
            secret_file.display(),
            pending_path.display()
        )
    })?;
    let pending: Pending = serde_json::from_slice(&text)
        .with_context(|| format!("reading {}", pending_path.display()))?;
    if pending.source != source.name {
        bail!(
            "{} records a rotation of source {}, not {}",
            pending_path.display(),
            pending.source,
            source.name
        );
    }
    let due = pending.uploaded_at + i64::try_from(grace.as_secs()).unwrap_or(i64::MAX);
    let wait = due - crate::now_ms() / 1000;
    if wait > 0 {
        log.step(
            "wait",
            format!("keeping the old secret for {wait} s more (grace period since the upload)"),
        );
        tokio::time::sleep(Duration::from_secs(wait.unsigned_abs())).await;
    }
    let file = SecretFile::read(secret_file)?;
    file.keep_only(&pending.fingerprint)?.write_atomic()?;
    log.step(
        "remove",
        format!(
            "removed the old secrets from {}, kept {}",
            secret_file.display(),
            pending.fingerprint
        ),
    );
    admin.reload().await.context(
        "the relay did not reload; it still accepts the old and the new secret: run --finish again",
    )?;
    let loaded = admin.fingerprints(&source.name).await?;
    if loaded != BTreeSet::from([pending.fingerprint.clone()]) {
        bail!(
            "after the reload the relay holds {}, expected only {}: run --finish again",
            list(&loaded),
            pending.fingerprint
        );
    }
    std::fs::remove_file(&pending_path)
        .with_context(|| format!("removing {}", pending_path.display()))?;
    log.step(
        "done",
        format!(
            "the relay accepts only the new secret {} (webhook {})",
            pending.fingerprint, pending.webhook
        ),
    );
    Ok(())
}

/// Takes the new secret out of the file again and reloads. Best effort:
/// if this fails too, the relay holds old and new, and Ocrolus uses the old.
async fn rollback(secret_file: &Path, new: &str, admin: &Admin, log: &mut Progress) {
    let undone = async {
        SecretFile::read(secret_file)?.without(new).write_atomic()?;
        admin.reload().await
    }
    .await;
    match undone {
        Ok(()) => log.step(
            "rollback",
            format!("removed {new} from {} and reloaded", secret_file.display()),
        ),
        Err(e) => log.step(
            "rollback",
            format!(
                "could not fully undo ({e:#}); the relay still accepts the old secret Ocrolus uses"
            ),
        ),
    }
}

async fn upload(
    client: &Client,
    webhook: &str,
    secret: &str,
) -> Result<(), crate::ocrolus::OcrolusError> {
    let mut attempt = 1;
    loop {
        match client.rotate_secret(webhook, secret).await {
            Ok(()) => return Ok(()),
            Err(e) if e.is_refusal() || attempt >= UPLOAD_ATTEMPTS => return Err(e),
            Err(e) => {
                warn!(error = %e, attempt, "upload not confirmed; trying again");
                tokio::time::sleep(Duration::from_secs(u64::from(attempt))).await;
                attempt += 1;
            }
        }
    }
}

/// The one webhook whose URL path is the source's path.
async fn find_webhook(client: &Client, source: &SourceRef) -> anyhow::Result<String> {
    let hooks = client.list_webhooks().await?;
    let matching: Vec<String> = hooks
        .iter()
        .filter(|h| {
            h.url
                .as_deref()
                .and_then(|u| u.parse::<Uri>().ok())
                .is_some_and(|u| u.path() == source.path)
        })
        .filter_map(|h| h.uuid.clone())
        .collect();
    match matching.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!(
            "no webhook points at {} (source {}): pass --webhook UUID",
            source.path,
            source.name
        ),
        many => bail!(
            "several webhooks point at {}: {}; pass --webhook UUID",
            source.path,
            many.join(", ")
        ),
    }
}

/// A new secret: 48 characters of [A-Za-z0-9] from the OS random source.
pub fn generate_secret() -> anyhow::Result<String> {
    let mut out = String::with_capacity(SECRET_CHARS);
    let mut buf = [0u8; 64];
    while out.len() < SECRET_CHARS {
        rand::rngs::OsRng
            .try_fill_bytes(&mut buf)
            .map_err(|e| anyhow!("the OS random source failed: {e}"))?;
        // 248 = 4 × 62: rejecting larger bytes keeps every character equally likely.
        for b in buf.iter().filter(|b| **b < 248) {
            if out.len() == SECRET_CHARS {
                break;
            }
            out.push(char::from(ALPHABET[usize::from(*b) % ALPHABET.len()]));
        }
    }
    Ok(out)
}

fn pending_path(secret_file: &Path) -> PathBuf {
    let mut name = secret_file.as_os_str().to_owned();
    name.push(".rotation");
    PathBuf::from(name)
}

fn list(set: &BTreeSet<String>) -> String {
    if set.is_empty() {
        "no secret".to_owned()
    } else {
        set.iter().cloned().collect::<Vec<_>>().join(", ")
    }
}

/// A secret file's lines, edited by fingerprint so no secret is ever shown.
struct SecretFile {
    path: PathBuf,
    lines: Vec<String>,
    /// Kept as found, so a rollback restores the file byte for byte.
    newline_at_end: bool,
    meta: Option<std::fs::Metadata>,
}

impl SecretFile {
    fn read(path: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let meta = std::fs::metadata(path).ok();
        Ok(Self {
            path: path.to_owned(),
            lines: text.lines().map(str::to_owned).collect(),
            newline_at_end: text.is_empty() || text.ends_with('\n'),
            meta,
        })
    }

    fn is_secret(line: &str) -> bool {
        let line = line.trim();
        !line.is_empty() && !crate::auth::is_comment(line)
    }

    /// Validated like the relay validates it.
    fn fingerprints(&self) -> anyhow::Result<BTreeSet<String>> {
        Secrets::parse(
            &self.lines.join("\n"),
            &format!("secret file {}", self.path.display()),
            '\n',
        )?;
        Ok(self
            .lines
            .iter()
            .filter(|l| Self::is_secret(l))
            .map(|l| fingerprint(l.trim().as_bytes()))
            .collect())
    }

    /// The new secret goes first: the first secret is the newest (the one
    /// `send-test` signs with).
    fn with_first(mut self, secret: &str) -> Self {
        let at = self
            .lines
            .iter()
            .position(|l| Self::is_secret(l))
            .unwrap_or(self.lines.len());
        self.lines.insert(at, secret.to_owned());
        self
    }

    fn without(mut self, fp: &str) -> Self {
        self.lines
            .retain(|l| !Self::is_secret(l) || fingerprint(l.trim().as_bytes()) != fp);
        self
    }

    fn keep_only(mut self, fp: &str) -> anyhow::Result<Self> {
        let has = |l: &String| Self::is_secret(l) && fingerprint(l.trim().as_bytes()) == fp;
        if !self.lines.iter().any(has) {
            bail!(
                "{} no longer holds the secret {fp} that Ocrolus has: not removing anything",
                self.path.display()
            );
        }
        self.lines.retain(|l| !Self::is_secret(l) || has(l));
        Ok(self)
    }

    fn write_atomic(&self) -> anyhow::Result<()> {
        let mut text = self.lines.join("\n");
        if self.newline_at_end {
            text.push('\n');
        }
        write_atomic(&self.path, text.as_bytes(), self.meta.as_ref())
    }
}

/// Writes a sibling temporary file (mode 0600, or the old file's owner and
/// mode), fsyncs it, renames it over `path` and fsyncs the directory. An
/// existing temporary file means another rotation is running: refuse.
fn write_atomic(path: &Path, data: &[u8], like: Option<&std::fs::Metadata>) -> anyhow::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".rotate-tmp");
    let tmp = PathBuf::from(tmp);
    let mode = like.map_or(0o600, |m| m.mode() & 0o7777);
    let written = (|| -> std::io::Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        if let Some(meta) = like {
            std::os::unix::fs::fchown(&file, Some(meta.uid()), Some(meta.gid()))?;
            file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))?;
        }
        file.write_all(data)?;
        file.sync_all()
    })();
    if let Err(e) = written {
        if e.kind() != std::io::ErrorKind::AlreadyExists {
            let _ = std::fs::remove_file(&tmp);
        }
        return Err(anyhow!(
            "cannot write {} ({e}){}",
            tmp.display(),
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                "; another rotate-secret may be running (remove the file if not)"
            } else {
                ""
            }
        ));
    }
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("syncing {}", dir.display()))?;
    }
    Ok(())
}

/// The relay's admin listener: `POST /reload`, `GET /secrets`.
struct Admin {
    base: Uri,
}

impl Admin {
    fn new(url: &str) -> anyhow::Result<Self> {
        let base: Uri = url
            .parse()
            .with_context(|| format!("--admin-url {url:?}"))?;
        if base.scheme_str() != Some("http") || base.authority().is_none() {
            bail!("--admin-url must be http://host:port (the relay's admin listener)");
        }
        Ok(Self { base })
    }

    async fn reload(&self) -> anyhow::Result<()> {
        let (status, body) = self.call(Method::POST, "/reload").await?;
        if status != 200 {
            let error = serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_owned))
                .unwrap_or_else(|| format!("HTTP {status}"));
            bail!("the relay rejected the reload: {error}");
        }
        Ok(())
    }

    async fn fingerprints(&self, source: &str) -> anyhow::Result<BTreeSet<String>> {
        let (status, body) = self.call(Method::GET, "/secrets").await?;
        if status != 200 {
            bail!("GET /secrets on the relay answered {status}");
        }
        let value: Value = serde_json::from_slice(&body).context("GET /secrets")?;
        let entry = value
            .get("sources")
            .and_then(Value::as_array)
            .and_then(|s| {
                s.iter()
                    .find(|e| e.get("name").and_then(Value::as_str) == Some(source))
            })
            .ok_or_else(|| anyhow!("the relay has no source {source:?}"))?;
        Ok(entry
            .get("fingerprints")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default())
    }

    async fn call(&self, method: Method, path: &str) -> anyhow::Result<(u16, Bytes)> {
        let authority = self
            .base
            .authority()
            .map(|a| a.as_str().to_owned())
            .unwrap_or_default();
        let exchange = async {
            let stream = TcpStream::connect(authority.as_str()).await?;
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(conn);
            let request = Request::builder()
                .method(method)
                .uri(path)
                .header(http::header::HOST, authority.as_str())
                .body(Full::new(Bytes::new()))?;
            let response = sender.send_request(request).await?;
            let status = response.status().as_u16();
            let body = response.into_body().collect().await?.to_bytes();
            anyhow::Ok((status, body))
        };
        tokio::time::timeout(Duration::from_secs(30), exchange)
            .await
            .map_err(|_| anyhow!("the relay's admin listener {authority} did not answer"))?
            .with_context(|| format!("the relay's admin listener {authority}"))
    }
}

/// Logs every step as it happens; with `--json`, one report at the end.
struct Progress {
    json: bool,
    steps: Vec<Value>,
}

impl Progress {
    fn new(json: bool) -> Self {
        Self {
            json,
            steps: Vec::new(),
        }
    }

    fn step(&mut self, step: &'static str, detail: String) {
        info!(step, "{detail}");
        if !self.json {
            println!("{step:>9}: {detail}");
        }
        self.steps.push(json!({ "step": step, "detail": detail }));
    }

    fn end(&self, result: &anyhow::Result<()>) {
        if self.json {
            let error = result.as_ref().err().map(|e| format!("{e:#}"));
            println!(
                "{}",
                json!({ "ok": result.is_ok(), "steps": self.steps, "error": error })
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_secrets_fit_ocrolus_rules_and_differ() {
        let a = generate_secret().unwrap();
        let b = generate_secret().unwrap();
        assert_eq!(a.len(), SECRET_CHARS);
        assert!(a.bytes().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(a, b);
        Secrets::parse(&a, "generated", '\n').unwrap();
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("20m").unwrap(), Duration::from_secs(1200));
        assert_eq!(parse_duration("900").unwrap(), Duration::from_secs(900));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("5d").is_err());
    }

    #[test]
    fn edits_keep_comments_and_put_the_new_secret_first() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secrets");
        std::fs::write(&path, "# production\n#old-secret-0123456789\n").unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let new = "new-secret-abcdefghijkl";
        SecretFile::read(&path)
            .unwrap()
            .with_first(new)
            .write_atomic()
            .unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "# production\nnew-secret-abcdefghijkl\n#old-secret-0123456789\n"
        );
        let fp = fingerprint(new.as_bytes());
        SecretFile::read(&path)
            .unwrap()
            .keep_only(&fp)
            .unwrap()
            .write_atomic()
            .unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "# production\nnew-secret-abcdefghijkl\n"
        );
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        assert!(
            SecretFile::read(&path)
                .unwrap()
                .keep_only(&fingerprint(b"something-else-entirely"))
                .is_err()
        );
    }
}
