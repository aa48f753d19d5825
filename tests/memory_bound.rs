//! The documented memory bound holds: a slow app, transactions of 1 MiB, 8 partitions,
//! far more data than the budget; the `txn-sidecar run` process's resident memory stays
//! under the README's bound for the configured budget (figures printed).

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const T: &str = "orders.tx";
const BIN: &str = env!("CARGO_BIN_EXE_txn-sidecar");
const MIB: f64 = 1024.0 * 1024.0;

fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resident_memory_stays_under_the_documented_bound() {
    let partitions = 8;
    let kafka = Kafka::start(&[(T, partitions), ("orders.tx.dlq", partitions)]);
    let app = RecordingApp::start().await;
    app.set_default(Some(Answer {
        status: 200,
        delay: Duration::from_millis(300),
        retry_after: None,
    }));
    let (budget_mib, txn_mib, queue_kib, fetch_bytes) = (24u64, 4u64, 16_384u64, 8 << 20);
    let admin = format!("127.0.0.1:{}", free_port());
    let group: Vec<String> = txn_sidecar::embedded::fast_group_properties(GroupProtocol::Classic)
        .iter()
        .flat_map(|(k, v)| ["-X".to_string(), format!("{k}={v}")])
        .collect();
    let mut child = Command::new(BIN)
        .args(["run", "--brokers", &kafka.brokers, "--topic", T])
        .args(["--group", "mem-group", "--app-url", &app.url()])
        .args(["--admin-addr", &admin, "--log-format", "text"])
        .args([
            "--set",
            &format!("limits.max_staged_bytes={budget_mib}MiB"),
            "--set",
            &format!("limits.max_txn_bytes={txn_mib}MiB"),
            "--set",
            "limits.max_queued_per_partition=1000",
        ])
        .args(["-X", &format!("queued.max.messages.kbytes={queue_kib}")])
        .args(["-X", &format!("fetch.max.bytes={fetch_bytes}")])
        .args(&group)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let value = "v".repeat(256 * 1024);
    let mut max_rss = 0u64;
    let mut produced = 0usize;
    let started = Instant::now();
    // Waves of 4 transactions of 1 MiB (4 tasks of 256 KiB) per partition, 32 MiB a wave
    // against a budget of 24 MiB: librdkafka's mock broker keeps only about 5 MB per
    // partition, so each wave waits for most of the last to be delivered.
    for wave in 0..8 {
        for p in 0..partitions {
            for t in 0..4 {
                let id = format!("w{wave}-p{p}-t{t}");
                for _ in 0..4 {
                    kafka.task(T, p, &id, &value);
                }
                kafka.commit(T, p, &id);
                produced += 1;
            }
        }
        kafka.flush();
        let deadline = Instant::now() + Duration::from_secs(60);
        while app.accepted().len() + 8 < produced {
            max_rss = max_rss.max(rss_bytes(pid).unwrap_or(0));
            assert!(Instant::now() < deadline, "wave {wave} not delivered");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while app.accepted().len() < produced && Instant::now() < deadline {
        max_rss = max_rss.max(rss_bytes(pid).unwrap_or(0));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    // README, "The memory budget": records held (budget + 10 %, plus the up to 64 records
    // read between two budget checks), librdkafka's prefetch queue, fetch responses, one
    // body per partition (1.4 × a transaction), the process.
    let bound = budget_mib as f64 * 1.1
        + 64.0 * 0.25
        + queue_kib as f64 / 1024.0
        + fetch_bytes as f64 / MIB
        + partitions as f64 * 1.4 * 1.0
        + 15.0;
    eprintln!(
        "memory bound: {produced} transactions of 1 MiB over {partitions} partitions in {:.1} s; \
         peak RSS {:.1} MiB, documented bound {bound:.1} MiB (budget {budget_mib} MiB)",
        started.elapsed().as_secs_f64(),
        max_rss as f64 / MIB
    );
    assert!(max_rss > 0, "could not read the process's RSS");
    assert!(
        (max_rss as f64 / MIB) < bound,
        "peak RSS {:.1} MiB over the documented bound {bound:.1} MiB",
        max_rss as f64 / MIB
    );
}
