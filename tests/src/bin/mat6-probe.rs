//! `mat6-probe`: the traffic tool of the migration tests. It runs on the
//! host side (in a namespace) and inside the guest image, so it only uses std.
//!
//! ```text
//! mat6-probe udp-echo  --listen [::]:7400
//! mat6-probe tcp-echo  --listen [::]:7401
//! mat6-probe udp-probe --to [2001:db8::10]:7400 [--bind ADDR] [--size 210] [--interval-ms 20] [--duration-s N]
//! mat6-probe tcp-probe --to [2001:db8::10]:7401 [--bind ADDR] [--chunk 1024] [--interval-ms 10] [--duration-s N]
//! ```
//!
//! The probes run until `--duration-s` elapses or their stdin reaches EOF
//! (the harness closes the pipe), then print one JSON line on stdout.
//! `udp-probe` is shaped like seed paper 003's VoIP probe: 210-byte datagrams
//! every 20 ms, each echoed; it reports lost datagrams and the largest gap
//! between echoes. `tcp-probe` streams a known byte pattern through an echo
//! server and checks every byte; it reports whether the connection survived.

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[derive(Debug, Default)]
struct Args {
    listen: Option<SocketAddr>,
    to: Option<SocketAddr>,
    bind: Option<IpAddr>,
    size: usize,
    interval_ms: u64,
    duration_s: Option<f64>,
}

#[derive(Debug)]
enum ProbeError {
    Usage(String),
    Io(&'static str, io::Error),
}

impl std::fmt::Display for ProbeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProbeError::Usage(m) => write!(f, "usage: {m}"),
            ProbeError::Io(what, e) => write!(f, "{what}: {e}"),
        }
    }
}

fn bad(flag: &str, val: &str) -> ProbeError {
    ProbeError::Usage(format!("bad value for {flag}: {val}"))
}

fn parse_args(rest: &[String]) -> Result<Args, ProbeError> {
    let mut a = Args {
        size: 210,
        interval_ms: 20,
        ..Args::default()
    };
    let mut it = rest.iter();
    while let Some(flag) = it.next() {
        let val = it
            .next()
            .ok_or_else(|| ProbeError::Usage(format!("{flag} needs a value")))?;
        match flag.as_str() {
            "--listen" => a.listen = Some(val.parse().map_err(|_| bad(flag, val))?),
            "--to" => a.to = Some(val.parse().map_err(|_| bad(flag, val))?),
            "--bind" => a.bind = Some(val.parse().map_err(|_| bad(flag, val))?),
            "--size" | "--chunk" => a.size = val.parse().map_err(|_| bad(flag, val))?,
            "--interval-ms" => a.interval_ms = val.parse().map_err(|_| bad(flag, val))?,
            "--duration-s" => a.duration_s = Some(val.parse().map_err(|_| bad(flag, val))?),
            _ => return Err(ProbeError::Usage(format!("unknown flag {flag}"))),
        }
    }
    Ok(a)
}

fn unix_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}

/// Sets `stop` when the duration elapses or stdin reaches EOF.
fn stop_signal(duration_s: Option<f64>) -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    if let Some(d) = duration_s {
        let s = stop.clone();
        thread::spawn(move || {
            thread::sleep(Duration::from_secs_f64(d.max(0.0)));
            s.store(true, Ordering::SeqCst);
        });
    } else {
        let s = stop.clone();
        thread::spawn(move || {
            let mut buf = [0u8; 64];
            let mut stdin = io::stdin();
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => continue,
                }
            }
            s.store(true, Ordering::SeqCst);
        });
    }
    stop
}

/// Arrival times (unix ms) -> (largest gap between consecutive arrivals, its start).
fn max_gap(times: &[f64]) -> (f64, f64) {
    let mut gap = 0.0;
    let mut at = 0.0;
    for w in times.windows(2) {
        if w[1] - w[0] > gap {
            gap = w[1] - w[0];
            at = w[0];
        }
    }
    (gap, at)
}

fn udp_echo(a: &Args) -> Result<(), ProbeError> {
    let listen = a
        .listen
        .ok_or_else(|| ProbeError::Usage("udp-echo needs --listen".into()))?;
    let sock = UdpSocket::bind(listen).map_err(|e| ProbeError::Io("bind", e))?;
    let mut buf = vec![0u8; 65536];
    loop {
        let (n, peer) = sock
            .recv_from(&mut buf)
            .map_err(|e| ProbeError::Io("recv", e))?;
        // A send error (e.g. no route during a move) must not end the echo.
        let _ = sock.send_to(&buf[..n], peer);
    }
}

fn tcp_echo(a: &Args) -> Result<(), ProbeError> {
    let listen = a
        .listen
        .ok_or_else(|| ProbeError::Usage("tcp-echo needs --listen".into()))?;
    let l = TcpListener::bind(listen).map_err(|e| ProbeError::Io("bind", e))?;
    for conn in l.incoming() {
        let Ok(mut s) = conn else { continue };
        thread::spawn(move || {
            let _ = s.set_nodelay(true);
            let mut r = match s.try_clone() {
                Ok(r) => r,
                Err(_) => return,
            };
            let _ = io::copy(&mut r, &mut s);
            let _ = s.shutdown(std::net::Shutdown::Write);
        });
    }
    Ok(())
}

fn bind_addr(to: SocketAddr, bind: Option<IpAddr>) -> SocketAddr {
    match (bind, to) {
        (Some(ip), _) => SocketAddr::new(ip, 0),
        (None, SocketAddr::V6(_)) => "[::]:0".parse().unwrap_or(to),
        (None, SocketAddr::V4(_)) => "0.0.0.0:0".parse().unwrap_or(to),
    }
}

fn udp_probe(a: &Args) -> Result<(), ProbeError> {
    let to =
        a.to.ok_or_else(|| ProbeError::Usage("udp-probe needs --to".into()))?;
    let sock = UdpSocket::bind(bind_addr(to, a.bind)).map_err(|e| ProbeError::Io("bind", e))?;
    sock.set_read_timeout(Some(Duration::from_millis(20)))
        .map_err(|e| ProbeError::Io("timeout", e))?;
    let size = a.size.max(16);
    let stop = stop_signal(a.duration_s);
    let rx_sock = sock.try_clone().map_err(|e| ProbeError::Io("clone", e))?;
    let done = Arc::new(AtomicBool::new(false));
    let seen: Arc<Mutex<(Vec<bool>, Vec<f64>)>> = Arc::new(Mutex::new((Vec::new(), Vec::new())));
    let rx = {
        let seen = seen.clone();
        let done = done.clone();
        thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !done.load(Ordering::SeqCst) {
                if let Ok(n) = rx_sock.recv(&mut buf) {
                    if n >= 8 {
                        let mut s = [0u8; 8];
                        s.copy_from_slice(&buf[..8]);
                        let seq = u64::from_be_bytes(s) as usize;
                        if let Ok(mut g) = seen.lock() {
                            if seq < g.0.len() && !g.0[seq] {
                                g.0[seq] = true;
                                g.1.push(unix_ms());
                            }
                        }
                    }
                }
            }
        })
    };
    let start = Instant::now();
    let interval = Duration::from_millis(a.interval_ms.max(1));
    let mut pkt = vec![0u8; size];
    let mut sent: u64 = 0;
    let mut send_errors: u64 = 0;
    let t0 = unix_ms();
    while !stop.load(Ordering::SeqCst) {
        pkt[..8].copy_from_slice(&sent.to_be_bytes());
        if let Ok(mut g) = seen.lock() {
            g.0.push(false);
        }
        if sock.send_to(&pkt, to).is_err() {
            send_errors += 1;
        }
        sent += 1;
        let next = start + interval * u32::try_from(sent).unwrap_or(u32::MAX);
        let now = Instant::now();
        if next > now {
            thread::sleep(next - now);
        }
    }
    // Let the last echoes arrive.
    thread::sleep(Duration::from_millis(500));
    done.store(true, Ordering::SeqCst);
    let _ = rx.join();
    let (received, times) = match seen.lock() {
        Ok(g) => (g.0.iter().filter(|b| **b).count() as u64, g.1.clone()),
        Err(_) => (0, Vec::new()),
    };
    let (gap, at) = max_gap(&times);
    println!(
        "{{\"kind\":\"udp\",\"sent\":{sent},\"received\":{received},\"lost\":{},\"send_errors\":{send_errors},\"max_gap_ms\":{gap:.1},\"gap_at_ms\":{at:.1},\"start_ms\":{t0:.1},\"first_rx_ms\":{:.1},\"last_rx_ms\":{:.1},\"size\":{size},\"interval_ms\":{}}}",
        sent - received,
        times.first().copied().unwrap_or(0.0),
        times.last().copied().unwrap_or(0.0),
        a.interval_ms
    );
    Ok(())
}

fn pattern(i: u64) -> u8 {
    (i.wrapping_mul(7).wrapping_add(i >> 8) % 251) as u8
}

fn tcp_probe(a: &Args) -> Result<(), ProbeError> {
    let to =
        a.to.ok_or_else(|| ProbeError::Usage("tcp-probe needs --to".into()))?;
    let stop = stop_signal(a.duration_s);
    let t0 = unix_ms();
    let stream = match a.bind {
        None => TcpStream::connect_timeout(&to, Duration::from_secs(5)),
        Some(ip) => connect_from(ip, to),
    };
    let mut stream = match stream {
        Ok(s) => s,
        Err(e) => {
            println!(
                "{{\"kind\":\"tcp\",\"connected\":false,\"survived\":false,\"reset\":false,\"error\":\"connect: {}\"}}",
                json_escape(&e.to_string())
            );
            return Ok(());
        }
    };
    let _ = stream.set_nodelay(true);
    let mut reader = stream.try_clone().map_err(|e| ProbeError::Io("clone", e))?;
    let _ = reader.set_read_timeout(Some(Duration::from_secs(30)));
    let rx = thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        let mut got: u64 = 0;
        let mut bad: u64 = 0;
        let mut times = Vec::new();
        let mut err: Option<io::Error> = None;
        loop {
            match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    for b in &buf[..n] {
                        if *b != pattern(got) {
                            bad += 1;
                        }
                        got += 1;
                    }
                    times.push(unix_ms());
                }
                Err(e) => {
                    err = Some(e);
                    break;
                }
            }
        }
        (got, bad, times, err)
    });
    let chunk = a.size.max(1);
    let interval = Duration::from_millis(a.interval_ms.max(1));
    let mut sent: u64 = 0;
    let mut werr: Option<io::Error> = None;
    let start = Instant::now();
    let mut k: u32 = 0;
    let mut buf = vec![0u8; chunk];
    while !stop.load(Ordering::SeqCst) {
        for (j, b) in buf.iter_mut().enumerate() {
            *b = pattern(sent + j as u64);
        }
        if let Err(e) = stream.write_all(&buf) {
            werr = Some(e);
            break;
        }
        sent += chunk as u64;
        k = k.saturating_add(1);
        let next = start + interval * k;
        let now = Instant::now();
        if next > now {
            thread::sleep(next - now);
        }
    }
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let (got, bad, times, rerr) = rx.join().unwrap_or((0, 0, Vec::new(), None));
    let err = werr.or(rerr);
    let reset = err.as_ref().is_some_and(|e| {
        matches!(
            e.kind(),
            io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted
        )
    });
    let survived = err.is_none() && got == sent && bad == 0;
    let (gap, at) = max_gap(&times);
    println!(
        "{{\"kind\":\"tcp\",\"connected\":true,\"survived\":{survived},\"reset\":{reset},\"bytes_sent\":{sent},\"bytes_echoed\":{got},\"bytes_corrupt\":{bad},\"max_gap_ms\":{gap:.1},\"gap_at_ms\":{at:.1},\"start_ms\":{t0:.1},\"last_rx_ms\":{:.1},\"error\":{}}}",
        times.last().copied().unwrap_or(0.0),
        match err {
            None => "null".to_string(),
            Some(e) => format!("\"{}\"", json_escape(&e.to_string())),
        }
    );
    Ok(())
}

/// Connect from a given local address (std has no bind-before-connect, so use
/// the `ip`-free trick: a listener-less socket via nix).
fn connect_from(ip: IpAddr, to: SocketAddr) -> io::Result<TcpStream> {
    use nix::sys::socket::{
        bind, connect, socket, AddressFamily, SockFlag, SockType, SockaddrIn, SockaddrIn6,
    };
    use std::os::fd::OwnedFd;
    let fam = match to {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let fd: OwnedFd = socket(fam, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    match (ip, to) {
        (IpAddr::V6(l), SocketAddr::V6(r)) => {
            bind(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                &SockaddrIn6::from(std::net::SocketAddrV6::new(l, 0, 0, 0)),
            )?;
            connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrIn6::from(r))?;
        }
        (IpAddr::V4(l), SocketAddr::V4(r)) => {
            bind(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                &SockaddrIn::from(std::net::SocketAddrV4::new(l, 0)),
            )?;
            connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrIn::from(r))?;
        }
        _ => return Err(io::Error::other("address family mismatch")),
    }
    Ok(TcpStream::from(fd))
}

fn json_escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().collect();
    let Some(cmd) = argv.get(1) else {
        eprintln!("usage: mat6-probe udp-echo|tcp-echo|udp-probe|tcp-probe [flags]");
        return ExitCode::from(2);
    };
    let args = match parse_args(&argv[2..]) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("mat6-probe: {e}");
            return ExitCode::from(2);
        }
    };
    let r = match cmd.as_str() {
        "udp-echo" => udp_echo(&args),
        "tcp-echo" => tcp_echo(&args),
        "udp-probe" => udp_probe(&args),
        "tcp-probe" => tcp_probe(&args),
        "--help" | "-h" | "help" => {
            println!("mat6-probe udp-echo|tcp-echo --listen ADDR:PORT");
            println!("mat6-probe udp-probe|tcp-probe --to ADDR:PORT [--bind ADDR] [--size N] [--interval-ms N] [--duration-s S]");
            Ok(())
        }
        other => Err(ProbeError::Usage(format!("unknown command {other}"))),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mat6-probe: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_gap_finds_largest_interval() {
        let (g, at) = max_gap(&[0.0, 10.0, 20.0, 95.0, 105.0]);
        assert!((g - 75.0).abs() < 1e-9);
        assert!((at - 20.0).abs() < 1e-9);
        assert_eq!(max_gap(&[]).0, 0.0);
    }

    #[test]
    fn parse_args_rejects_unknown_flag() {
        let v = vec!["--nope".to_string(), "1".to_string()];
        assert!(parse_args(&v).is_err());
        let v = vec!["--to".to_string(), "[2001:db8::1]:7".to_string()];
        assert_eq!(
            parse_args(&v).ok().and_then(|a| a.to).map(|s| s.port()),
            Some(7)
        );
    }
}
