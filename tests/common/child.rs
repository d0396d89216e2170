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
