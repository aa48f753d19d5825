//! Small helpers shared by the driver and the roles: clocks, /proc readings, a tiny
//! blocking HTTP client, Prometheus text parsing and statistics.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Wall clock in microseconds since the epoch (comparable across processes).
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// User + system CPU seconds of a process (all threads, including exited ones).
pub fn proc_cpu_secs(pid: u32) -> f64 {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return f64::NAN;
    };
    // Fields after the command name, which is in parentheses and may contain spaces.
    let Some(rest) = s.rfind(')').map(|i| &s[i + 2..]) else {
        return f64::NAN;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime is field 14, stime field 15.
    let ticks: f64 = f
        .get(11)
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(f64::NAN)
        + f.get(12)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN);
    ticks / clock_ticks()
}

/// Busy CPU seconds of the whole machine (all cores, everything but idle and iowait),
/// from the first line of `/proc/stat`.
pub fn system_busy_secs() -> f64 {
    let Ok(s) = std::fs::read_to_string("/proc/stat") else {
        return f64::NAN;
    };
    let Some(line) = s.lines().next() else {
        return f64::NAN;
    };
    let f: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let busy: f64 = f
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, v)| v)
        .sum();
    busy / clock_ticks()
}

/// CPU seconds (user + system) per thread name of process `pid` (threads with the same
/// name summed), from `/proc/<pid>/task/*/stat`.
pub fn thread_cpu_secs(pid: u32) -> std::collections::BTreeMap<String, f64> {
    let mut out = std::collections::BTreeMap::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for e in dir.flatten() {
        let Ok(s) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        let (Some(a), Some(b)) = (s.find('('), s.rfind(')')) else {
            continue;
        };
        let name = s[a + 1..b].to_string();
        let f: Vec<&str> = s[b + 2..].split_whitespace().collect();
        let ticks = f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
            + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        *out.entry(name).or_insert(0.0) += ticks / clock_ticks();
    }
    out
}

/// Per thread name of process `pid` (threads with the same name summed): seconds on a
/// CPU, seconds runnable but waiting for one (the run queue), and times scheduled in,
/// from `/proc/<pid>/task/*/schedstat` (the kernel's `sched_info`; times in ns).
pub fn thread_sched_secs(pid: u32) -> std::collections::BTreeMap<String, [f64; 3]> {
    let mut out = std::collections::BTreeMap::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for e in dir.flatten() {
        let (Ok(comm), Ok(s)) = (
            std::fs::read_to_string(e.path().join("comm")),
            std::fs::read_to_string(e.path().join("schedstat")),
        ) else {
            continue;
        };
        let f: Vec<f64> = s
            .split_whitespace()
            .filter_map(|v| v.parse().ok())
            .collect();
        let [run, wait, slices] = [0, 1, 2].map(|i| f.get(i).copied().unwrap_or(0.0));
        let slot = out.entry(comm.trim().to_string()).or_insert([0.0; 3]);
        slot[0] += run / 1e9;
        slot[1] += wait / 1e9;
        slot[2] += slices;
    }
    out
}

/// What each thread name did between two [`thread_sched_secs`] snapshots over `secs`:
/// `{name: {"run_ms_per_s", "wait_ms_per_s", "scheduled_per_s"}}` (threads that did not
/// run are left out; threads that ended in between are missing from `after`).
pub fn sched_delta(
    before: &std::collections::BTreeMap<String, [f64; 3]>,
    after: &std::collections::BTreeMap<String, [f64; 3]>,
    secs: f64,
) -> serde_json::Value {
    let mut out = serde_json::Map::new();
    for (name, a) in after {
        let b = before.get(name).copied().unwrap_or([0.0; 3]);
        let [run, wait, slices] = [0, 1, 2].map(|i| (a[i] - b[i]).max(0.0));
        if run + wait < 1e-4 {
            continue;
        }
        out.insert(
            name.clone(),
            serde_json::json!({
                "run_ms_per_s": run / secs * 1e3,
                "wait_ms_per_s": wait / secs * 1e3,
                "scheduled_per_s": slices / secs,
            }),
        );
    }
    serde_json::Value::Object(out)
}

fn clock_ticks() -> f64 {
    // USER_HZ is 100 on every Linux this runs on; `getconf CLK_TCK` confirms it.
    100.0
}

/// (VmRSS, VmHWM) of a process in bytes.
pub fn proc_rss(pid: u32) -> (u64, u64) {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return (0, 0);
    };
    let field = |name: &str| -> u64 {
        s.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// One HTTP/1.1 request with `Connection: close`; returns (status, body).
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
) -> std::io::Result<(u16, Vec<u8>)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_nodelay(true)?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no header end"))?;
    let head = String::from_utf8_lossy(&buf[..split]).to_ascii_lowercase();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| std::io::Error::other("bad status line"))?;
    let mut body = buf[split + 4..].to_vec();
    if head.contains("transfer-encoding: chunked") {
        body = dechunk(&body);
    }
    Ok((status, body))
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = b.windows(2).position(|w| w == b"\r\n") {
        let size =
            usize::from_str_radix(String::from_utf8_lossy(&b[..eol]).trim(), 16).unwrap_or(0);
        if size == 0 || eol + 2 + size > b.len() {
            break;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + size]);
        b = &b[(eol + 4 + size).min(b.len())..];
    }
    out
}

/// GET `path` as text, or an empty string when the server does not answer.
pub fn get_text(addr: SocketAddr, path: &str) -> String {
    match http(addr, "GET", path, b"") {
        Ok((_, b)) => String::from_utf8_lossy(&b).into_owned(),
        Err(_) => String::new(),
    }
}

/// Value of one sample of a Prometheus exposition (`name{labels}` exactly as printed).
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(series)
            .and_then(|r| r.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}

/// Cumulative buckets `(le, count)` of a histogram.
pub fn buckets(text: &str, name: &str) -> Vec<(f64, f64)> {
    let prefix = format!("{name}_bucket{{le=\"");
    let mut out: Vec<(f64, f64)> = text
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(&prefix)?;
            let (le, v) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, v.trim().parse().ok()?))
        })
        .collect();
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    out
}

/// Quantile from cumulative buckets, interpolating linearly inside the bucket.
pub fn bucket_quantile(b: &[(f64, f64)], q: f64) -> f64 {
    let Some(&(_, total)) = b.last() else {
        return f64::NAN;
    };
    if total <= 0.0 {
        return f64::NAN;
    }
    let target = q * total;
    let (mut lo, mut below) = (0.0, 0.0);
    for &(le, c) in b {
        if c >= target {
            if le.is_infinite() {
                return lo;
            }
            let inside = c - below;
            return if inside <= 0.0 {
                le
            } else {
                lo + (le - lo) * (target - below) / inside
            };
        }
        lo = le;
        below = c;
    }
    lo
}

/// Fraction of observations at or below `le`.
pub fn bucket_fraction(b: &[(f64, f64)], le: f64) -> f64 {
    let total = b.last().map_or(0.0, |x| x.1);
    b.iter()
        .find(|x| (x.0 - le).abs() < 1e-12)
        .map_or(f64::NAN, |x| x.1 / total)
}

/// Nearest-rank percentile of an ascending slice.
pub fn pct(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// Median (NaNs ignored).
pub fn median(v: &[f64]) -> f64 {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Smallest and largest (NaNs ignored).
pub fn range(v: &[f64]) -> (f64, f64) {
    v.iter()
        .copied()
        .filter(|x| !x.is_nan())
        .fold((f64::NAN, f64::NAN), |(lo, hi), x| {
            (
                if lo.is_nan() { x } else { lo.min(x) },
                if hi.is_nan() { x } else { hi.max(x) },
            )
        })
}

/// A task value of exactly 100 bytes of JSON carrying a microsecond timestamp.
pub fn task_value(t_us: u64) -> Vec<u8> {
    let head = format!("{{\"t_us\":{t_us},\"pad\":\"");
    let pad = 100usize.saturating_sub(head.len() + 2);
    let mut v = head.into_bytes();
    v.extend(std::iter::repeat_n(b'x', pad));
    v.extend_from_slice(b"\"}");
    v
}

/// Finds `"name":<integer>` in a JSON text without parsing it.
pub fn scan_int(body: &[u8], name: &[u8]) -> Option<i64> {
    let at = body.windows(name.len()).position(|w| w == name)? + name.len();
    let rest = &body[at..];
    let end = rest
        .iter()
        .position(|c| !(c.is_ascii_digit() || *c == b'-'))
        .unwrap_or(rest.len());
    std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
}
