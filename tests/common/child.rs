//! Child processes (the relay binary, the example consumers) whose output
//! is read line by line.

use std::time::Duration;

/// A child process whose stdout and stderr lines arrive on channels (for
/// driving the binary and the example consumers). Killed when dropped.
pub struct ChildLines {
    pub child: tokio::process::Child,
    pub stdout: tokio::sync::mpsc::UnboundedReceiver<String>,
    pub stderr: tokio::sync::mpsc::UnboundedReceiver<String>,
    /// Every stderr line read so far by [`ChildLines::stderr_until`].
    pub stderr_seen: Vec<String>,
}

/// Spawns `cmd` with piped stdout/stderr and line readers on both.
pub fn spawn_lines(cmd: &mut tokio::process::Command) -> ChildLines {
    use tokio::io::AsyncBufReadExt;
    let mut child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    fn pump_lines<R: tokio::io::AsyncRead + Unpin + Send + 'static>(
        from: R,
    ) -> tokio::sync::mpsc::UnboundedReceiver<String> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(from).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        rx
    }
    let stdout = pump_lines(child.stdout.take().expect("piped stdout"));
    let stderr = pump_lines(child.stderr.take().expect("piped stderr"));
    ChildLines {
        child,
        stdout,
        stderr,
        stderr_seen: Vec::new(),
    }
}

impl ChildLines {
    /// The next stdout line, or None on EOF or after `within`.
    pub async fn next_stdout(&mut self, within: Duration) -> Option<String> {
        tokio::time::timeout(within, self.stdout.recv())
            .await
            .ok()
            .flatten()
    }

    /// Reads stderr until a line contains `needle`; false on EOF or timeout.
    pub async fn stderr_until(&mut self, needle: &str, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.stderr.recv()).await {
                Ok(Some(line)) => {
                    let hit = line.contains(needle);
                    self.stderr_seen.push(line);
                    if hit {
                        return true;
                    }
                }
                Ok(None) | Err(_) => return false,
            }
        }
    }

    /// Waits for the exit (killing the child after `within`), then returns
    /// its status and the stdout and stderr lines not read yet.
    pub async fn finish(
        mut self,
        within: Duration,
    ) -> (Option<std::process::ExitStatus>, Vec<String>, Vec<String>) {
        let status = match tokio::time::timeout(within, self.child.wait()).await {
            Ok(status) => status.ok(),
            Err(_) => {
                let _ = self.child.kill().await;
                None
            }
        };
        let mut out = Vec::new();
        while let Ok(Some(line)) =
            tokio::time::timeout(Duration::from_secs(2), self.stdout.recv()).await
        {
            out.push(line);
        }
        let mut err = std::mem::take(&mut self.stderr_seen);
        while let Ok(Some(line)) =
            tokio::time::timeout(Duration::from_secs(2), self.stderr.recv()).await
        {
            err.push(line);
        }
        (status, out, err)
    }
}

/// Runs the relay binary once, as an operator types a command (`spool stats
/// …`), with only `PATH` and `env` in its environment.
pub async fn run_binary(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_ocrolus-relay"))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().copied())
        .output()
        .await
        .expect("run ocrolus-relay")
}

/// The relay binary, `serve ARGS --log-format json`, for process-level
/// faults (kill -9, SIGTERM, restarts, CPU and log volume). Its ephemeral
/// ports come from the "serving" log line, so there is no port race; every
/// stderr line is kept in `logs`. Killed when dropped.
pub struct RelayBinary {
    pub child: std::process::Child,
    pub listen: std::net::SocketAddr,
    pub url: String,
    pub admin: std::net::SocketAddr,
    pub logs: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl RelayBinary {
    pub async fn start(args: &[String]) -> Self {
        use std::io::BufRead;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ocrolus-relay"))
            .arg("serve")
            .args(args)
            .args(["--log-format", "json"])
            .env("RUST_LOG", "info,lapin=warn,amq_protocol=warn")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn relay binary");
        let stderr = child.stderr.take().expect("stderr");
        let logs = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { return };
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                    && v["message"] == "ocrolus-relay serving"
                {
                    let _ = tx.send((
                        v["listen"].as_str().unwrap_or_default().to_owned(),
                        v["admin"].as_str().unwrap_or_default().to_owned(),
                    ));
                }
                sink.lock().expect("logs").push(line);
            }
        });
        let ports = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(60)))
            .await
            .expect("join");
        let Ok((listen, admin)) = ports else {
            let _ = child.kill();
            panic!(
                "relay binary did not start:\n{}",
                logs.lock().expect("logs").join("\n")
            );
        };
        let listen: std::net::SocketAddr = listen.parse().expect("listen address");
        Self {
            child,
            listen,
            url: format!("http://{listen}/webhooks/ocrolus"),
            admin: admin.parse().expect("admin address"),
            logs,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill9(&mut self) {
        self.child.kill().expect("SIGKILL");
        let _ = self.child.wait();
    }

    pub fn sigterm(&self) {
        let status = std::process::Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("kill -TERM");
        assert!(status.success());
    }

    /// Waits for the process to exit; `None` if it did not within `within`.
    pub async fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let started = std::time::Instant::now();
        while started.elapsed() < within {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    /// One series from `/metrics`; `None` while the admin listener does not
    /// answer (starting, stopping).
    pub async fn metric(&self, series: &str) -> Option<f64> {
        use http_body_util::BodyExt;
        let attempt = async {
            let stream = tokio::net::TcpStream::connect(self.admin).await.ok()?;
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                    .await
                    .ok()?;
            tokio::spawn(conn);
            let req = http::Request::get("/metrics")
                .header("host", self.admin.to_string())
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .ok()?;
            let response = sender.send_request(req).await.ok()?;
            let body = response.into_body().collect().await.ok()?.to_bytes();
            Some(super::metric_value(&String::from_utf8_lossy(&body), series))
        };
        tokio::time::timeout(Duration::from_secs(10), attempt)
            .await
            .ok()
            .flatten()
    }

    /// Waits until the broker is up and the spool empty, per `/metrics`.
    pub async fn wait_drained(&self, within: Duration) -> Duration {
        let started = std::time::Instant::now();
        while started.elapsed() < within {
            let up = self.metric("ocrolus_relay_broker_up").await;
            let spooled = self.metric("ocrolus_relay_spool_messages").await;
            if up == Some(1.0) && spooled == Some(0.0) {
                return started.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "relay binary never drained its spool:\n{}",
            self.logs.lock().expect("logs").join("\n")
        );
    }

    /// Lines logged so far, how many of them are warnings or errors, and
    /// their bytes.
    pub fn log_counts(&self) -> (usize, usize, usize) {
        let logs = self.logs.lock().expect("logs");
        let loud = logs
            .iter()
            .filter(|l| l.contains("\"level\":\"WARN\"") || l.contains("\"level\":\"ERROR\""))
            .count();
        (logs.len(), loud, logs.iter().map(|l| l.len() + 1).sum())
    }

    /// User + system CPU time of the process, in clock ticks (1/100 s).
    pub fn cpu_ticks(&self) -> u64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).expect("/proc stat");
        let after_name = &stat[stat.rfind(')').expect("comm") + 2..];
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
    }
}

impl Drop for RelayBinary {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
