//! One result per run: a human line on stderr and a JSON line on stdout
//! (and appended to `--json-out`), which bench/run.sh summarises.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use serde_json::json;

use crate::load::{LoadArgs, Outcome, Tally};
use crate::procfs::CpuWatch;

pub fn report(
    mode: &str,
    load: &LoadArgs,
    extra: serde_json::Value,
    tally: &Tally,
    elapsed: Duration,
    rss: serde_json::Value,
    cpu: &CpuWatch,
) -> anyhow::Result<()> {
    let h = &tally.hist;
    let ok: u64 = tally
        .outcomes
        .iter()
        .filter(|(k, _)| **k == Outcome::Status(200))
        .map(|(_, v)| *v)
        .sum();
    let total: u64 = tally.outcomes.values().sum();
    let secs = elapsed.as_secs_f64().max(1e-9);
    let q = |p: f64| h.value_at_quantile(p);
    let cpu = cpu.finish(total);
    let outcomes: BTreeMap<String, u64> = tally
        .outcomes
        .iter()
        .map(|(k, v)| (k.label(), *v))
        .collect();
    let result = json!({
        "mode": mode,
        "label": load.label,
        "concurrency": load.concurrency,
        "rate": load.rate,
        "body_size": load.body_size,
        "requests": total,
        "ok": ok,
        "outcomes": outcomes,
        "elapsed_s": secs,
        "throughput_rps": ok as f64 / secs,
        "latency_us": {
            "p50": q(0.50), "p90": q(0.90), "p99": q(0.99), "p999": q(0.999),
            "max": h.max(), "mean": h.mean(),
        },
        "max_schedule_lag_us": tally.max_lag.as_micros() as u64,
        "relay_rss": rss,
        "cpu_us_per_request": cpu,
        "extra": extra,
    });
    let rss_txt = match result["relay_rss"]["vm_hwm_kib"].as_u64() {
        Some(hwm) => format!(
            " relay RSS peak {:.1} MiB (sampled {:.1})",
            hwm as f64 / 1024.0,
            result["relay_rss"]["max_sampled_rss_kib"]
                .as_u64()
                .unwrap_or(0) as f64
                / 1024.0
        ),
        None => String::new(),
    };
    eprintln!(
        "{mode:<8} {label} c={c} body={b}B{rate}: {tp:.0} req/s ok={ok}/{total} p50={p50}us p90={p90}us p99={p99}us p99.9={p999}us max={max}us{rss_txt} cpu_us/req={cpu} outcomes={outcomes:?}",
        label = load.label,
        c = load.concurrency,
        b = load.body_size,
        rate = load
            .rate
            .map(|r| format!(" rate={r:.0}/s"))
            .unwrap_or_default(),
        tp = ok as f64 / secs,
        p50 = q(0.50),
        p90 = q(0.90),
        p99 = q(0.99),
        p999 = q(0.999),
        max = h.max(),
        cpu = result["cpu_us_per_request"],
    );
    emit(&result, load.json_out.as_deref())
}

pub fn emit(result: &serde_json::Value, json_out: Option<&Path>) -> anyhow::Result<()> {
    let line = serde_json::to_string(result)?;
    println!("{line}");
    if let Some(path) = json_out {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        writeln!(f, "{line}")?;
    }
    Ok(())
}
