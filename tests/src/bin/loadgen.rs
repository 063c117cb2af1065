//! `loadgen`: simulated sensors publishing over MQTT to a running agent, with an optional
//! end-to-end measurement against the ingest's embedded log.
//!
//! ```text
//! loadgen --mqtt 127.0.0.1:1883 --clients 5 --rate 50 --duration 10s --ingest http://127.0.0.1:8080
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use e2e::load::{self, LoadSpec, PayloadKind};
use rumqttc::QoS;

#[derive(Parser)]
#[command(about = "Simulated MQTT sensors for the edge agent")]
struct Args {
    /// The agent's MQTT 3.1.1 address.
    #[arg(long, default_value = "127.0.0.1:1883")]
    mqtt: std::net::SocketAddr,
    /// Simulated sensors (one connection each).
    #[arg(long, default_value_t = 5)]
    clients: usize,
    /// Total messages per second over all sensors (0: as fast as possible).
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Messages per sensor (ignored when --duration is given with --rate).
    #[arg(long, default_value_t = 1000)]
    count: u64,
    /// Publish for this long at --rate, e.g. 10s.
    #[arg(long, value_parser = humantime_duration)]
    duration: Option<Duration>,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 200)]
    payload_bytes: usize,
    /// MQTT QoS (0 or 1).
    #[arg(long, default_value_t = 1)]
    qos: u8,
    /// json (telemetry padded with random readings), drifting (telemetry as real sensors send
    /// it, ~120 B whatever --payload-bytes) or binary payloads.
    #[arg(long, default_value = "json")]
    kind: String,
    /// Topic template; {client} and {i} are replaced. {stream3} cycles alarm/telemetry/logs.
    #[arg(long, default_value = "plant/{client}/{stream3}/value")]
    topic: String,
    /// The ingest's URL: wait until every record is in its embedded log and report end to end.
    #[arg(long)]
    ingest: Option<String>,
}

fn humantime_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 10s"))?;
    match unit {
        "s" | "" => Ok(Duration::from_secs(n)),
        "ms" => Ok(Duration::from_millis(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("{s:?}: unit must be ms, s or m")),
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let kind = match args.kind.as_str() {
        "json" => PayloadKind::Json,
        "binary" => PayloadKind::Binary,
        "drifting" => PayloadKind::Drifting,
        other => anyhow::bail!("--kind {other:?}: expected json, drifting or binary"),
    };
    let qos = match args.qos {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        other => anyhow::bail!("--qos {other}: expected 0 or 1"),
    };
    let per_client_rate = (args.rate > 0.0).then(|| args.rate / args.clients as f64);
    let per_client = match (args.duration, per_client_rate) {
        (Some(d), Some(r)) => (d.as_secs_f64() * r).ceil() as u64,
        _ => args.count,
    };
    let template = args.topic.clone();
    let spec = LoadSpec {
        mqtt: args.mqtt,
        clients: args.clients,
        messages_per_client: per_client,
        rate_per_client: per_client_rate,
        payload_bytes: args.payload_bytes,
        kind,
        qos,
        topic: Arc::new(move |client, i| {
            let stream = ["alarm", "telemetry", "logs"][(i % 3) as usize];
            template
                .replace("{client}", &client.to_string())
                .replace("{i}", &i.to_string())
                .replace("{stream3}", stream)
        }),
        client_prefix: format!("loadgen-{}-", std::process::id()),
    };
    let http = reqwest::blocking::Client::new();
    let count_log = |url: &str| -> u64 {
        http.get(format!("{url}/v1/log"))
            .send()
            .and_then(|r| r.json::<serde_json::Value>())
            .ok()
            .and_then(|v| {
                v.as_array()
                    .map(|a| a.iter().filter_map(|t| t["end_offset"].as_u64()).sum())
            })
            .unwrap_or(0)
    };
    let before = args.ingest.as_deref().map(count_log);
    let started = Instant::now();
    let report = tokio::runtime::Runtime::new()?.block_on(load::publish(spec));
    println!(
        "published {} messages ({} acked) in {:.2}s: {:.0} msg/s",
        report.published,
        report.acked,
        report.elapsed.as_secs_f64(),
        report.published as f64 / report.elapsed.as_secs_f64()
    );
    if let (Some(url), Some(before)) = (args.ingest.as_deref(), before) {
        let target = before + report.published;
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut now_in_log = count_log(url);
        while now_in_log < target && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
            now_in_log = count_log(url);
        }
        let secs = started.elapsed().as_secs_f64();
        println!(
            "in the log: {} of {} new records after {secs:.2}s: {:.0} records/s end to end",
            now_in_log - before,
            report.published,
            (now_in_log - before) as f64 / secs
        );
    }
    Ok(())
}
