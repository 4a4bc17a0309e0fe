//! `ims-bench`: durable update throughput (1/8/64 clients), update latency at
//! a fixed offered rate, lookup throughput, and server RSS with 1M bindings.
//! Runs the real `ims-server` binary (next to this one) on loopback.
//! Used by `benches/ims.sh` → `bench-results/ims.json`.

use std::collections::BTreeMap;
use std::net::{Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use ims_client::{
    BindingUpdate, ControlClient, RetransmitPolicy, TlsSettings, UpdateClient, UpdateKey,
};
use ims_server::store::{BindingStore as _, HoaRecord, RedbStore, StoreOp, StoredBinding};
use mat6_proto::binding::Binding;

/// IMS benchmark.
#[derive(Debug, Parser)]
#[command(name = "ims-bench", about)]
struct Args {
    /// JSON output file.
    #[arg(long, default_value = "bench-results/ims.json")]
    out: PathBuf,
    /// Seconds per throughput measurement.
    #[arg(long, default_value_t = 5)]
    secs: u64,
    /// Repetitions of each throughput measurement (the best is reported:
    /// other tenants of the machine add noise, never speed).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Bindings for the RSS measurement.
    #[arg(long, default_value_t = 1_000_000)]
    rss_bindings: u32,
    /// Offered rate for the latency measurement (updates/s).
    #[arg(long, default_value_t = 1000)]
    offered: u64,
    /// HoAs per lookup_many request.
    #[arg(long, default_value_t = 100)]
    lookup_batch: usize,
    /// Only the update measurements (skip the 1M-binding part).
    #[arg(long)]
    updates_only: bool,
    /// Work directory (default: a temp dir on the same disk as /tmp).
    #[arg(long)]
    dir: Option<PathBuf>,
}

type BoxErr = Box<dyn std::error::Error + Send + Sync>;

struct Server {
    child: Child,
    udp: SocketAddr,
    control: SocketAddr,
    metrics: Option<SocketAddr>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Env {
    dir: PathBuf,
    token: String,
    tls: TlsSettings,
}

fn server_bin() -> Result<PathBuf, BoxErr> {
    let exe = std::env::current_exe()?;
    let p = exe.with_file_name("ims-server");
    if !p.exists() {
        return Err(format!(
            "{} not found (cargo build --release -p ims-server)",
            p.display()
        )
        .into());
    }
    Ok(p)
}

fn setup(dir: &Path) -> Result<Env, BoxErr> {
    let files = ims_server::secrets::generate_tls(dir, &["localhost".into()])?;
    let token = ims_server::secrets::generate_admin_token(&dir.join("token"))?;
    ims_server::secrets::generate_signing_key(&dir.join("signing.pk8"))?;
    let tls = TlsSettings::from_ca_pem_file(&files.ca, "localhost")?;
    Ok(Env {
        dir: dir.to_owned(),
        token,
        tls,
    })
}

fn start_server(env: &Env, store: &str) -> Result<Server, BoxErr> {
    let d = env.dir.display();
    let cfg = env.dir.join(format!("{store}.toml"));
    let ready = env.dir.join(format!("{store}.ready"));
    let _ = std::fs::remove_file(&ready);
    std::fs::write(
        &cfg,
        format!(
            r#"udp_listen = "[::1]:0"
control_listen = "[::1]:0"
metrics_listen = "[::1]:0"
store_path = "{d}/{store}.redb"
tls_cert = "{d}/server.pem"
tls_key = "{d}/server.key"
admin_token_file = "{d}/token"
signing_key_file = "{d}/signing.pk8"
ready_file = "{}"
rate_limit_per_s = 10000000.0
rate_limit_burst = 10000000.0
"#,
            ready.display()
        ),
    )?;
    let mut child = Command::new(server_bin()?)
        .args(["serve", "--config"])
        .arg(&cfg)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()?;
    let t0 = Instant::now();
    loop {
        if let Ok(t) = std::fs::read_to_string(&ready) {
            let v: serde_json::Value = serde_json::from_str(&t)?;
            let addr = |k: &str| -> Result<SocketAddr, BoxErr> {
                Ok(v[k].as_str().ok_or("ready file")?.parse()?)
            };
            return Ok(Server {
                udp: addr("udp")?,
                control: addr("control")?,
                metrics: addr("metrics").ok(),
                child,
            });
        }
        if let Some(st) = child.try_wait()? {
            return Err(format!("ims-server exited: {st}").into());
        }
        if t0.elapsed() > Duration::from_secs(300) {
            return Err("server not ready after 300 s".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn hoa(i: u32) -> Ipv6Addr {
    Ipv6Addr::new(
        0x2001,
        0xdb8,
        0x100,
        0,
        0,
        0,
        (i >> 16) as u16,
        (i & 0xffff) as u16,
    )
}

fn moa(site: u16, i: u32) -> Ipv6Addr {
    Ipv6Addr::new(
        0x2001,
        0xdb8,
        site,
        0,
        0,
        0,
        (i >> 16) as u16,
        (i & 0xffff) as u16,
    )
}

async fn provision(
    ctl: &ControlClient,
    from: u32,
    n: u32,
) -> Result<Vec<(Ipv6Addr, UpdateKey)>, BoxErr> {
    let hoas: Vec<Ipv6Addr> = (from..from + n).map(hoa).collect();
    let keys = ctl.key_add_many(hoas).await?;
    keys.into_iter()
        .map(|k| Ok((k.hoa, UpdateKey::from_b64(k.key_id, &k.secret_b64)?)))
        .collect()
}

fn policy() -> RetransmitPolicy {
    RetransmitPolicy {
        initial_rto: Duration::from_millis(200),
        max_rto: Duration::from_secs(1),
        max_attempts: 6,
    }
}

async fn throughput(
    srv: &Server,
    keys: &[(Ipv6Addr, UpdateKey)],
    secs: u64,
) -> Result<f64, BoxErr> {
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for (h, k) in keys.iter().cloned() {
        let (stop, count, udp) = (stop.clone(), count.clone(), srv.udp);
        tasks.push(tokio::spawn(async move {
            let mut up = UpdateClient::bind(udp, h, k).await?.with_policy(policy());
            let mut i = 0u32;
            while !stop.load(Ordering::Relaxed) {
                i = i.wrapping_add(1);
                up.send(&BindingUpdate::activate(moa(0xa + (i % 2) as u16, i), 3600))
                    .await?;
                count.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<_, ims_client::ClientError>(())
        }));
    }
    // Warm-up second, then measure.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let c0 = count.load(Ordering::Relaxed);
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let c1 = count.load(Ordering::Relaxed);
    let el = t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await??;
    }
    Ok((c1 - c0) as f64 / el)
}

/// Update round-trip times (first transmission → durable ack), ms.
struct Latency {
    p50: f64,
    p99: f64,
    max: f64,
    /// p99 measured from the ideal send instant (includes client-side timer lateness).
    sched_p99: f64,
    samples: usize,
}

async fn latency(
    srv: &Server,
    keys: &[(Ipv6Addr, UpdateKey)],
    offered: u64,
    secs: u64,
) -> Result<Latency, BoxErr> {
    let mut clients = Vec::new();
    for (h, k) in keys.iter().cloned() {
        clients.push(Arc::new(tokio::sync::Mutex::new(
            UpdateClient::bind(srv.udp, h, k)
                .await?
                .with_policy(policy()),
        )));
    }
    let n = offered * secs;
    let period = Duration::from_nanos(1_000_000_000 / offered);
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = Vec::with_capacity(n as usize);
    for i in 0..n {
        let scheduled = ticker.tick().await;
        let c = clients[(i as usize) % clients.len()].clone();
        tasks.push(tokio::spawn(async move {
            let mut c = c.lock().await;
            c.send(&BindingUpdate::activate(moa(0xc, i as u32), 3600))
                .await
                .map(|r| (r.rtt, scheduled.elapsed()))
        }));
    }
    let mut lat = Vec::with_capacity(tasks.len());
    let mut sched = Vec::with_capacity(tasks.len());
    for t in tasks {
        let (rtt, since_tick) = t.await??;
        lat.push(rtt.as_secs_f64() * 1000.0);
        sched.push(since_tick.as_secs_f64() * 1000.0);
    }
    lat.sort_by(f64::total_cmp);
    sched.sort_by(f64::total_cmp);
    let pct = |v: &[f64], p: f64| v[((v.len() as f64 - 1.0) * p).round() as usize];
    Ok(Latency {
        p50: pct(&lat, 0.5),
        p99: pct(&lat, 0.99),
        max: pct(&lat, 1.0),
        sched_p99: pct(&sched, 0.99),
        samples: lat.len(),
    })
}

async fn lookups(
    srv: &Server,
    env: &Env,
    n_hoas: u32,
    batch: usize,
    secs: u64,
    conns: usize,
    tasks_per_conn: usize,
) -> Result<f64, BoxErr> {
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for c in 0..conns {
        let ctl = ControlClient::connect(srv.control, &env.tls).await?;
        for t in 0..tasks_per_conn {
            let (stop, count, ctl) = (stop.clone(), count.clone(), ctl.clone());
            let mut i = ((c * tasks_per_conn + t) * 7919) as u32;
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    if batch <= 1 {
                        i = (i + 1) % n_hoas;
                        let r = ctl.lookup(hoa(i)).await?;
                        if r.is_none() {
                            return Err::<(), BoxErr>("lookup miss".into());
                        }
                        count.fetch_add(1, Ordering::Relaxed);
                    } else {
                        let hs: Vec<Ipv6Addr> = (0..batch)
                            .map(|_| {
                                i = (i + 1) % n_hoas;
                                hoa(i)
                            })
                            .collect();
                        let r = ctl.lookup_many(hs).await?;
                        if r.iter().any(Option::is_none) {
                            return Err("lookup miss".into());
                        }
                        count.fetch_add(r.len() as u64, Ordering::Relaxed);
                    }
                }
                Ok(())
            }));
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let c0 = count.load(Ordering::Relaxed);
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let c1 = count.load(Ordering::Relaxed);
    let el = t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await??;
    }
    Ok((c1 - c0) as f64 / el)
}

/// CPU seconds (user + system) a process has used so far.
fn cpu_s(pid: u32) -> f64 {
    let Ok(st) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the ")" that closes the command name: state is field 3,
    // utime 14 and stime 15 (1-based) => indices 11 and 12 here.
    let rest = st.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // USER_HZ (clock ticks per second in /proc) is 100 on Linux.
    (ticks(11) + ticks(12)) / 100.0
}

/// 1-minute load average: other tenants of the machine (builds, QEMU)
/// compete for the 2 cores and the disk; recorded to explain the figures.
fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

fn rss_mb(pid: u32) -> Result<f64, BoxErr> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = s
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .ok_or("no VmRSS")?;
    let kb: f64 = line
        .split_whitespace()
        .nth(1)
        .ok_or("VmRSS format")?
        .parse()?;
    Ok(kb / 1024.0)
}

async fn metrics_text(addr: SocketAddr) -> Result<String, BoxErr> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out)
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(name)
                .and_then(|r| r.trim().split(' ').next()?.parse().ok())
        })
        .unwrap_or(0.0)
}

/// (commits, jobs committed, commit seconds) so far.
async fn commit_stats(srv: &Server) -> (f64, f64, f64) {
    let Some(m) = srv.metrics else {
        return (0.0, 0.0, 0.0);
    };
    let Ok(t) = metrics_text(m).await else {
        return (0.0, 0.0, 0.0);
    };
    (
        metric(&t, "ims_commit_batch_size_count"),
        metric(&t, "ims_commit_batch_size_sum"),
        metric(&t, "ims_commit_latency_seconds_sum"),
    )
}

/// Writes `n` HoAs with signed bindings straight into a store file.
fn fill_store(env: &Env, name: &str, n: u32) -> Result<(), BoxErr> {
    let signing = ims_server::secrets::read_signing_key(&env.dir.join("signing.pk8"))?;
    let mut store = RedbStore::open(&env.dir.join(format!("{name}.redb")), 64 << 20)?;
    let chunk = 50_000u32;
    let mut rev = 0u64;
    let mut from = 0u32;
    while from < n {
        let to = (from + chunk).min(n);
        let recs: Vec<StoreOp> = std::thread::scope(|s| {
            let mid = from + (to - from) / 2;
            let signing = &signing;
            let mk = move |a: u32, b: u32| {
                (a..b)
                    .map(|i| {
                        let h = hoa(i);
                        let binding = Binding {
                            hoa: h,
                            active: Some(moa(0xa, i)),
                            standby: vec![moa(0xb, i)],
                            seq: 1,
                            expires_unix: 4_000_000_000,
                            key_id: i + 1,
                        };
                        let signature = signing.sign(&binding).signature;
                        StoreOp::PutHoa(Box::new(HoaRecord {
                            hoa: h,
                            key_id: i + 1,
                            secret: [(i & 0xff) as u8; 32],
                            binding: Some(StoredBinding {
                                binding,
                                activate: true,
                                revision: u64::from(i) + 1,
                                signature,
                            }),
                        }))
                    })
                    .collect::<Vec<_>>()
            };
            let h1 = s.spawn(move || mk(from, mid));
            let mut b = mk(mid, to);
            let mut a = h1.join().unwrap_or_default();
            a.append(&mut b);
            a
        });
        rev = u64::from(to);
        store.commit(&recs, rev, to + 1)?;
        from = to;
    }
    let _ = rev;
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), BoxErr> {
    let args = Args::parse();
    let tmp = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            tempfile::tempdir_in(d)?
        }
        None => tempfile::tempdir()?,
    };
    let env = setup(tmp.path())?;
    let load_start = loadavg();
    let mut out = BTreeMap::<String, serde_json::Value>::new();

    // 1. Durable update throughput and latency.
    eprintln!(
        "[ims-bench] update throughput (1/8/64 clients, {} s each)",
        args.secs
    );
    let srv = start_server(&env, "updates")?;
    let ctl = ControlClient::connect(srv.control, &env.tls)
        .await?
        .with_admin_token(&env.token);
    let keys = provision(&ctl, 0, 64 + 64).await?;
    let mut best = 0.0f64;
    let mut by = serde_json::Map::new();
    for n in [1usize, 8, 64] {
        let mut r = 0.0f64;
        let (mut m0, mut m1) = ((0.0, 0.0, 0.0), (0.0, 0.0, 0.0));
        let mut cpu = (0.0, 0.0);
        for _ in 0..args.reps.max(1) {
            let a = commit_stats(&srv).await;
            let (s0, c0) = (cpu_s(srv.child.id()), cpu_s(std::process::id()));
            let x = throughput(&srv, &keys[..n], args.secs).await?;
            let (s1, c1) = (cpu_s(srv.child.id()), cpu_s(std::process::id()));
            let b = commit_stats(&srv).await;
            if x > r {
                (r, m0, m1) = (x, a, b);
                // CPU per committed update (the whole phase incl. warm-up).
                let done = (b.1 - a.1).max(1.0);
                cpu = ((s1 - s0) / done * 1e6, (c1 - c0) / done * 1e6);
            }
        }
        out.insert(
            format!("server_cpu_us_per_update_{n}_clients"),
            serde_json::json!(cpu.0.round()),
        );
        out.insert(
            format!("client_cpu_us_per_update_{n}_clients"),
            serde_json::json!(cpu.1.round()),
        );
        let batches = m1.0 - m0.0;
        let (avg_batch, avg_ms) = if batches > 0.0 {
            ((m1.1 - m0.1) / batches, (m1.2 - m0.2) / batches * 1000.0)
        } else {
            (0.0, 0.0)
        };
        eprintln!(
            "[ims-bench]   {n:>2} clients: {r:>10.0} updates/s  ({batches:.0} commits, avg batch {avg_batch:.1}, avg commit {avg_ms:.2} ms)"
        );
        out.insert(
            format!("avg_commit_batch_{n}_clients"),
            serde_json::json!((avg_batch * 10.0).round() / 10.0),
        );
        out.insert(
            format!("avg_commit_ms_{n}_clients"),
            serde_json::json!((avg_ms * 100.0).round() / 100.0),
        );
        by.insert(n.to_string(), serde_json::json!(r.round()));
        out.insert(
            format!("updates_per_s_{n}_clients"),
            serde_json::json!(r.round()),
        );
        best = best.max(r);
    }
    out.insert("updates_per_s".into(), serde_json::json!(best.round()));
    out.insert(
        "updates_per_s_by_clients".into(),
        serde_json::Value::Object(by),
    );
    if let Some(m) = srv.metrics {
        let t = metrics_text(m).await?;
        let bc = metric(&t, "ims_commit_batch_size_count");
        let bs = metric(&t, "ims_commit_batch_size_sum");
        let lc = metric(&t, "ims_commit_latency_seconds_count");
        let ls = metric(&t, "ims_commit_latency_seconds_sum");
        if bc > 0.0 {
            out.insert(
                "avg_commit_batch".into(),
                serde_json::json!((bs / bc * 10.0).round() / 10.0),
            );
        }
        if lc > 0.0 {
            out.insert(
                "avg_commit_ms".into(),
                serde_json::json!((ls / lc * 1e5).round() / 100.0),
            );
        }
    }
    eprintln!(
        "[ims-bench] update latency at {} updates/s offered",
        args.offered
    );
    let l = latency(&srv, &keys[64..], args.offered, args.secs).await?;
    let r3 = |v: f64| serde_json::json!((v * 1000.0).round() / 1000.0);
    out.insert("update_p50_ms".into(), r3(l.p50));
    out.insert("update_p99_ms".into(), r3(l.p99));
    out.insert("update_max_ms".into(), r3(l.max));
    out.insert("update_p99_from_schedule_ms".into(), r3(l.sched_p99));
    let samples = l.samples;
    out.insert(
        "update_offered_per_s".into(),
        serde_json::json!(args.offered),
    );
    out.insert("update_latency_samples".into(), serde_json::json!(samples));
    drop(ctl);
    drop(srv);
    if args.updates_only {
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }

    // 2. 1M bindings: RSS and lookups.
    eprintln!(
        "[ims-bench] writing {} signed bindings into a store",
        args.rss_bindings
    );
    let t = Instant::now();
    fill_store(&env, "big", args.rss_bindings)?;
    out.insert(
        "fill_1m_s".into(),
        serde_json::json!((t.elapsed().as_secs_f64() * 10.0).round() / 10.0),
    );
    let t = Instant::now();
    let srv = start_server(&env, "big")?;
    let load_s = t.elapsed().as_secs_f64();
    let pid = srv.child.id();
    let rss_idle = rss_mb(pid)?;
    eprintln!(
        "[ims-bench] server loaded {} bindings in {load_s:.1} s, RSS {rss_idle:.0} MB",
        args.rss_bindings
    );
    out.insert(
        "server_load_1m_s".into(),
        serde_json::json!((load_s * 10.0).round() / 10.0),
    );
    eprintln!(
        "[ims-bench] lookups (batched by {}, pipelined)",
        args.lookup_batch
    );
    let lk = lookups(
        &srv,
        &env,
        args.rss_bindings,
        args.lookup_batch,
        args.secs,
        2,
        4,
    )
    .await?;
    let lk1 = lookups(&srv, &env, args.rss_bindings, 1, args.secs, 2, 32).await?;
    let rss_after = rss_mb(pid)?;
    out.insert("lookups_per_s".into(), serde_json::json!(lk.round()));
    out.insert("lookup_batch".into(), serde_json::json!(args.lookup_batch));
    out.insert(
        "lookups_unbatched_per_s".into(),
        serde_json::json!(lk1.round()),
    );
    out.insert(
        "rss_mb_1m".into(),
        serde_json::json!(rss_idle.max(rss_after).round()),
    );
    out.insert("rss_bindings".into(), serde_json::json!(args.rss_bindings));
    out.insert("loadavg_1m_start".into(), serde_json::json!(load_start));
    out.insert("loadavg_1m_end".into(), serde_json::json!(loadavg()));
    out.insert(
        "cores".into(),
        serde_json::json!(std::thread::available_parallelism().map_or(0, |n| n.get())),
    );
    out.insert(
        "note".into(),
        serde_json::json!("client and server share the machine's cores; lookups_per_s counts HoAs answered via lookup_many batches"),
    );
    drop(srv);

    let json = serde_json::to_string_pretty(&out)?;
    if let Some(p) = args.out.parent() {
        std::fs::create_dir_all(p)?;
    }
    std::fs::write(&args.out, format!("{json}\n"))?;
    println!("{:<34} {:>14} {:>12}", "metric", "value", "target");
    let row = |k: &str, target: &str| {
        let v = out.get(k).map_or("-".to_string(), |v| v.to_string());
        println!("{k:<34} {v:>14} {target:>12}");
    };
    row("updates_per_s", ">= 20000");
    row("updates_per_s_1_clients", "");
    row("updates_per_s_8_clients", "");
    row("updates_per_s_64_clients", "");
    row("server_cpu_us_per_update_64_clients", "");
    row("client_cpu_us_per_update_64_clients", "");
    row("avg_commit_batch", "");
    row("avg_commit_ms", "");
    row("update_p50_ms", "");
    row("update_p99_ms", "<= 10");
    row("update_p99_from_schedule_ms", "");
    row("lookups_per_s", ">= 200000");
    row("lookups_unbatched_per_s", "");
    row("rss_mb_1m", "<= 300");
    row("server_load_1m_s", "");
    row("loadavg_1m_start", "");
    row("loadavg_1m_end", "");
    println!("wrote {}", args.out.display());
    Ok(())
}
