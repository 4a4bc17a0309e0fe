//! `migration-bench`: the live-migration downtime benchmark (`./bench.sh
//! migration`). For each guest memory size × mode (`lan`, `prep`, `noprep`,
//! and on request `lan-mat6`: the agent VM migrated on the same bridge)
//! × run, it builds the two-site testbed, boots the guest under QEMU (TCG),
//! migrates it while pinging every 10 ms both ways and streaming UDP/TCP, and
//! records T_DW, T_ALL, QEMU's downtime, UDP loss and TCP survival.
//!
//! ```text
//! migration-bench [--quick] [--mem 128,256,512,1024] [--runs 3]
//!                 [--modes lan,prep,noprep[,lan-mat6]] [--out bench-results/migration.json]
//!                 [--chart bench-results/migration.svg]
//! ```
//!
//! Writes the JSON (`runs`, `summary`), an SVG chart of T_DW and T_ALL
//! against memory, and prints a table laid out like seed paper 004's
//! Table 2 with the paper's 1000 Mbps figures beside ours. Needs root and
//! the guest image (`images/build.sh`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use mat6_tests::qemu::GuestImage;
use mat6_tests::testbed::{Mat6Bins, Mode, RunResult, Testbed, TestbedOptions, Tools};
use serde_json::{json, Value};

#[derive(Debug)]
struct Opts {
    mems: Vec<u32>,
    runs: u32,
    modes: Vec<Mode>,
    out: PathBuf,
    chart: PathBuf,
    quick: bool,
    from_json: Option<PathBuf>,
}

fn parse_opts() -> Result<Opts, String> {
    let mut o = Opts {
        mems: vec![128, 256, 512, 1024],
        runs: 3,
        modes: vec![Mode::Lan, Mode::Prep, Mode::NoPrep],
        out: PathBuf::from("bench-results/migration.json"),
        chart: PathBuf::from("bench-results/migration.svg"),
        quick: false,
        from_json: None,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{a} needs a value"))
        };
        match a.as_str() {
            "--quick" => o.quick = true,
            "--mem" => {
                o.mems = val()?
                    .split(',')
                    .map(|s| s.trim().parse().map_err(|_| format!("bad --mem {s}")))
                    .collect::<Result<_, _>>()?
            }
            "--runs" => o.runs = val()?.parse().map_err(|_| "bad --runs".to_string())?,
            "--modes" => {
                o.modes = val()?
                    .split(',')
                    .map(|s| s.trim().parse::<Mode>().map_err(|e| e.to_string()))
                    .collect::<Result<_, _>>()?
            }
            "--out" => o.out = PathBuf::from(val()?),
            "--chart" => o.chart = PathBuf::from(val()?),
            "--from-json" => o.from_json = Some(PathBuf::from(val()?)),
            "-h" | "--help" => {
                println!("migration-bench [--quick] [--mem 128,256,512,1024] [--runs 3] [--modes lan,prep,noprep,lan-mat6] [--out FILE.json] [--chart FILE.svg] [--from-json FILE.json (re-render the table and chart, run nothing)]");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if o.quick {
        o.mems.truncate(1);
        o.runs = 1;
    }
    Ok(o)
}

/// Seed paper 004, Table 2, 1000 Mbps columns (seconds):
/// (mem, prep T_DW, prep T_ALL, noprep T_DW, noprep T_ALL, lan T_DW, lan T_ALL).
const PAPER: [(u32, f64, f64, f64, f64, f64, f64); 5] = [
    (32, 0.57, 1.38, 2.67, 3.59, 0.45, 1.02),
    (64, 0.61, 1.68, 2.76, 3.88, 0.39, 1.60),
    (128, 0.62, 2.20, 2.93, 4.80, 0.37, 2.35),
    (256, 0.60, 3.42, 2.82, 5.68, 0.43, 3.61),
    (512, 0.66, 6.20, 3.05, 8.43, 0.53, 5.90),
];

fn median(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

type Cell = BTreeMap<(u32, String), Vec<RunResult>>;

fn per_cell(ok: &[RunResult]) -> Cell {
    let mut m: Cell = BTreeMap::new();
    for r in ok {
        m.entry((r.mem_mb, r.mode.to_string()))
            .or_default()
            .push(r.clone());
    }
    m
}

fn cell_median(c: &Cell, mem: u32, mode: &str, f: impl Fn(&RunResult) -> f64) -> Option<f64> {
    let mut v: Vec<f64> = c.get(&(mem, mode.to_string()))?.iter().map(f).collect();
    median(&mut v)
}

fn fmt_opt(v: Option<f64>, scale: f64) -> String {
    v.map(|x| format!("{:.3}", x / scale))
        .unwrap_or_else(|| "  n/a".into())
}

fn print_table(mems: &[u32], c: &Cell) {
    println!();
    println!("Live migration downtime, T_DW / T_ALL in seconds (median of runs); paper = seed 004 Table 2, 1000 Mbps");
    println!(
        "{:>8} | {:^29} | {:^29} | {:^29}",
        "RAM", "with preparation (prep)", "without preparation (noprep)", "live migration (lan)"
    );
    println!(
        "{:>8} | {:>6} {:>6} {:>7} {:>7} | {:>6} {:>6} {:>7} {:>7} | {:>6} {:>6} {:>7} {:>7}",
        "(MiB)",
        "T_DW",
        "T_ALL",
        "pT_DW",
        "pT_ALL",
        "T_DW",
        "T_ALL",
        "pT_DW",
        "pT_ALL",
        "T_DW",
        "T_ALL",
        "pT_DW",
        "pT_ALL"
    );
    for &m in mems {
        let p = PAPER.iter().find(|r| r.0 == m);
        let pf = |x: Option<f64>| x.map(|v| format!("{v:.2}")).unwrap_or_else(|| "-".into());
        println!(
            "{:>8} | {:>6} {:>6} {:>7} {:>7} | {:>6} {:>6} {:>7} {:>7} | {:>6} {:>6} {:>7} {:>7}",
            m,
            fmt_opt(cell_median(c, m, "prep", |r| r.tdw_ms), 1000.0),
            fmt_opt(cell_median(c, m, "prep", |r| r.tall_ms), 1000.0),
            pf(p.map(|r| r.1)),
            pf(p.map(|r| r.2)),
            fmt_opt(cell_median(c, m, "noprep", |r| r.tdw_ms), 1000.0),
            fmt_opt(cell_median(c, m, "noprep", |r| r.tall_ms), 1000.0),
            pf(p.map(|r| r.3)),
            pf(p.map(|r| r.4)),
            fmt_opt(cell_median(c, m, "lan", |r| r.tdw_ms), 1000.0),
            fmt_opt(cell_median(c, m, "lan", |r| r.tall_ms), 1000.0),
            pf(p.map(|r| r.5)),
            pf(p.map(|r| r.6)),
        );
    }
    println!(
        "(pT_* = the paper's figures; '-' = size not in the paper; 'n/a' = not measured / failed)"
    );
    println!();
    println!("Per mode (medians): T_DW both directions, QEMU's own figures, the VoIP-shaped UDP stream, the TCP stream");
    println!(
        "{:>6} {:>8} | {:>9} {:>9} {:>9} | {:>10} {:>10} | {:>8} {:>10} | {:>9}",
        "MiB",
        "mode",
        "T_DW ms",
        "CN->VM",
        "VM->CN",
        "QEMU down",
        "QEMU total",
        "UDP lost",
        "UDP gap ms",
        "TCP ok"
    );
    for &m in mems {
        for mode in ["lan", "lan-mat6", "prep", "noprep"] {
            let Some(runs) = c.get(&(m, mode.to_string())) else {
                continue;
            };
            let med =
                |f: &dyn Fn(&RunResult) -> f64| cell_median(c, m, mode, f).unwrap_or(f64::NAN);
            println!(
                "{:>6} {:>8} | {:>9.1} {:>9.1} {:>9.1} | {:>10.0} {:>10.0} | {:>8.0} {:>10.1} | {:>6}/{:<2}",
                m,
                mode,
                med(&|r| r.tdw_ms),
                med(&|r| r.ping_cn_to_vm.max_gap_ms),
                med(&|r| r.ping_vm_to_cn.max_gap_ms),
                med(&|r| r.qemu_downtime_ms as f64),
                med(&|r| r.qemu_total_ms as f64),
                med(&|r| r.udp_lost as f64),
                med(&|r| r.udp_max_gap_ms),
                runs.iter().filter(|r| r.tcp_survived).count(),
                runs.len()
            );
        }
    }
}

/// A small SVG line chart: T_DW and T_ALL (ms, log scale) against memory.
fn chart_svg(mems: &[u32], c: &Cell) -> String {
    let (w, h, l, r, t, b) = (760.0, 440.0, 70.0, 180.0, 40.0, 50.0);
    let pw = w - l - r;
    let ph = h - t - b;
    let mut vals = Vec::new();
    for &m in mems {
        for mode in ["lan", "prep", "noprep"] {
            for f in [0, 1] {
                if let Some(v) =
                    cell_median(c, m, mode, |x| if f == 0 { x.tdw_ms } else { x.tall_ms })
                {
                    vals.push(v.max(1.0));
                }
            }
        }
    }
    let ymin = vals
        .iter()
        .copied()
        .fold(f64::INFINITY, f64::min)
        .clamp(1.0, 10.0);
    let ymax = vals.iter().copied().fold(1.0, f64::max).max(100.0);
    let (lo, hi) = (ymin.log10().floor(), ymax.log10().ceil());
    let x_of = |i: usize| {
        if mems.len() <= 1 {
            l + pw / 2.0
        } else {
            l + pw * i as f64 / (mems.len() - 1) as f64
        }
    };
    let y_of = |v: f64| t + ph * (1.0 - (v.max(1.0).log10() - lo) / (hi - lo).max(1.0));
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"15\">mat6 live migration: T_DW and T_ALL vs guest memory (QEMU TCG)</text>\n",
        w / 2.0
    );
    // Axes and grid.
    let mut e = lo;
    while e <= hi {
        let v = 10f64.powf(e);
        let y = y_of(v);
        s += &format!("<line x1=\"{l}\" y1=\"{y:.1}\" x2=\"{}\" y2=\"{y:.1}\" stroke=\"#ddd\"/>\n<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\n", l + pw, l - 6.0, y + 4.0, if v >= 1000.0 { format!("{} s", v / 1000.0) } else { format!("{v} ms") });
        e += 1.0;
    }
    for (i, m) in mems.iter().enumerate() {
        let x = x_of(i);
        s += &format!("<line x1=\"{x:.1}\" y1=\"{t}\" x2=\"{x:.1}\" y2=\"{}\" stroke=\"#eee\"/>\n<text x=\"{x:.1}\" y=\"{}\" text-anchor=\"middle\">{m} MiB</text>\n", t + ph, t + ph + 18.0);
    }
    s += &format!("<rect x=\"{l}\" y=\"{t}\" width=\"{pw}\" height=\"{ph}\" fill=\"none\" stroke=\"black\"/>\n");
    s += &format!(
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">guest memory</text>\n",
        l + pw / 2.0,
        h - 8.0
    );
    let series = [
        ("lan", 0, "#1f77b4", "", "lan T_DW"),
        ("lan", 1, "#1f77b4", "6,4", "lan T_ALL"),
        ("prep", 0, "#2ca02c", "", "prep T_DW"),
        ("prep", 1, "#2ca02c", "6,4", "prep T_ALL"),
        ("noprep", 0, "#d62728", "", "noprep T_DW"),
        ("noprep", 1, "#d62728", "6,4", "noprep T_ALL"),
    ];
    for (k, (mode, f, color, dash, label)) in series.iter().enumerate() {
        let pts: Vec<(f64, f64)> = mems
            .iter()
            .enumerate()
            .filter_map(|(i, &m)| {
                cell_median(c, m, mode, |x| if *f == 0 { x.tdw_ms } else { x.tall_ms })
                    .map(|v| (x_of(i), y_of(v)))
            })
            .collect();
        if !pts.is_empty() {
            let p: Vec<String> = pts.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
            s += &format!("<polyline points=\"{}\" fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" stroke-dasharray=\"{dash}\"/>\n", p.join(" "));
            for (x, y) in &pts {
                s += &format!("<circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"3\" fill=\"{color}\"/>\n");
            }
        }
        let ly = t + 14.0 + 18.0 * k as f64;
        let lx = l + pw + 15.0;
        s += &format!("<line x1=\"{lx}\" y1=\"{ly}\" x2=\"{}\" y2=\"{ly}\" stroke=\"{color}\" stroke-width=\"2\" stroke-dasharray=\"{dash}\"/>\n<text x=\"{}\" y=\"{}\">{label}{}</text>\n", lx + 30.0, lx + 36.0, ly + 4.0, if pts.is_empty() { " (n/a)" } else { "" });
    }
    s += "</svg>\n";
    s
}

fn main() -> ExitCode {
    let o = match parse_opts() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("migration-bench: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(path) = &o.from_json {
        return rerender(&o, path);
    }
    let img = match GuestImage::locate() {
        Ok(i) => i,
        Err(e) => {
            eprintln!("migration-bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    let bin_dir = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(PathBuf::from))
        .unwrap_or_default();
    let tools = Tools {
        probe: bin_dir.join("mat6-probe"),
        mat6: Mat6Bins::in_dir(&bin_dir),
    };
    if tools.mat6.is_none() {
        eprintln!("migration-bench: ims-server/guest-agent/host-prep not in {}: prep and noprep will fail", bin_dir.display());
    }
    let mut ok: Vec<RunResult> = Vec::new();
    let mut runs_json: Vec<Value> = Vec::new();
    for &mem in &o.mems {
        for run in 0..o.runs {
            for &mode in &o.modes {
                eprintln!(
                    "[migration-bench] mem={mem} MiB mode={mode} run={}/{}",
                    run + 1,
                    o.runs
                );
                let res = Testbed::new(&TestbedOptions::default())
                    .map_err(|e| e.to_string())
                    .and_then(|mut tb| {
                        tb.run_migration(&img, &tools, mode, mem)
                            .map_err(|e| e.to_string())
                    });
                match res {
                    Ok(r) => {
                        eprintln!(
                            "    T_DW={:.1} ms T_ALL={:.1} ms qemu_downtime={} ms udp_lost={} tcp_survived={}",
                            r.tdw_ms, r.tall_ms, r.qemu_downtime_ms, r.udp_lost, r.tcp_survived
                        );
                        if let Some(h) = &r.host_prep {
                            let g = |k: &str| h.get(k).and_then(Value::as_f64).unwrap_or(0.0);
                            eprintln!(
                                "    host-prep {} {}->{}: preparation {:.0} ms | pre-copy {:.0} ms | QEMU downtime {:.0} ms | switch {:.1} ms | migration {:.0} ms | total {:.0} ms",
                                h.get("mode").and_then(Value::as_str).unwrap_or("?"),
                                h.get("from").and_then(Value::as_str).unwrap_or("?"),
                                h.get("to").and_then(Value::as_str).unwrap_or("?"),
                                g("prep_ms"),
                                g("precopy_ms"),
                                g("qemu_downtime_ms"),
                                g("switch_ms"),
                                g("migration_ms"),
                                g("total_ms")
                            );
                        }
                        let mut v = serde_json::to_value(&r).unwrap_or(Value::Null);
                        if let Some(obj) = v.as_object_mut() {
                            obj.insert("run".into(), json!(run + 1));
                        }
                        runs_json.push(v);
                        ok.push(r);
                    }
                    Err(e) => {
                        eprintln!("    FAILED: {e}");
                        runs_json
                            .push(json!({"mem_mb": mem, "mode": mode, "run": run + 1, "error": e}));
                    }
                }
            }
        }
    }
    finish(&o, ok, runs_json)
}

/// Re-renders the table, summary and chart of an earlier run's JSON.
fn rerender(o: &Opts, path: &std::path::Path) -> ExitCode {
    let doc: Value = match std::fs::read(path)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(v) => v,
        Err(e) => {
            eprintln!("migration-bench: {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    };
    let runs_json: Vec<Value> = doc["runs"].as_array().cloned().unwrap_or_default();
    let ok: Vec<RunResult> = runs_json
        .iter()
        .filter(|r| r.get("error").is_none())
        .filter_map(|r| serde_json::from_value(r.clone()).ok())
        .collect();
    let mut mems: Vec<u32> = ok.iter().map(|r| r.mem_mb).collect();
    mems.sort_unstable();
    mems.dedup();
    let o = Opts {
        mems,
        runs: o.runs,
        modes: o.modes.clone(),
        out: o.out.clone(),
        chart: o.chart.clone(),
        quick: o.quick,
        from_json: None,
    };
    finish(&o, ok, runs_json)
}

fn finish(o: &Opts, ok: Vec<RunResult>, runs_json: Vec<Value>) -> ExitCode {
    let c = per_cell(&ok);
    // Per memory size, prep's median T_DW minus `base`'s.
    let prep_minus = |base: &str| -> Vec<f64> {
        o.mems
            .iter()
            .filter_map(|&m| {
                Some(
                    cell_median(&c, m, "prep", |r| r.tdw_ms)?
                        - cell_median(&c, m, base, |r| r.tdw_ms)?,
                )
            })
            .collect()
    };
    let mut diffs = prep_minus("lan");
    // Against the agent VM's same-bridge migration: what the move itself
    // costs, without the translation's share.
    let mut diffs_mat6 = prep_minus("lan-mat6");
    let mut noprep: Vec<f64> = ok
        .iter()
        .filter(|r| r.mode == Mode::NoPrep)
        .map(|r| r.tdw_ms)
        .collect();
    let mut lan_tdw: Vec<f64> = ok
        .iter()
        .filter(|r| r.mode == Mode::Lan)
        .map(|r| r.tdw_ms)
        .collect();
    let mut tall_ratio: Vec<f64> = o
        .mems
        .iter()
        .filter_map(|&m| {
            Some(
                cell_median(&c, m, "prep", |r| r.tall_ms)?
                    / cell_median(&c, m, "lan", |r| r.tall_ms)?,
            )
        })
        .collect();
    let summary = json!({
        "prep_minus_lan_ms_p50": median(&mut diffs),
        "prep_minus_lan_mat6_ms_p50": median(&mut diffs_mat6),
        "noprep_tdw_ms_p50": median(&mut noprep),
        "lan_tdw_ms_p50": median(&mut lan_tdw),
        "prep_tall_over_lan_p50": median(&mut tall_ratio),
        "runs_ok": ok.len(),
        "runs_failed": runs_json.len() - ok.len(),
        "tcp_survived_all": ok.iter().all(|r| r.tcp_survived),
        "mem_mb": o.mems,
        "note": "guest memory starts at 128 MiB: smaller guests do not boot the Debian cloud kernel under TCG (TESTBED.md)",
    });
    let doc =
        json!({ "runs": runs_json, "summary": summary, "chart": o.chart.display().to_string() });
    print_table(&o.mems, &c);
    println!(
        "\nsummary: {}",
        serde_json::to_string_pretty(&summary).unwrap_or_default()
    );
    for d in [o.out.parent(), o.chart.parent()].into_iter().flatten() {
        if let Err(e) = std::fs::create_dir_all(d) {
            eprintln!("migration-bench: mkdir {}: {e}", d.display());
            return ExitCode::FAILURE;
        }
    }
    if let Err(e) = std::fs::write(
        &o.out,
        serde_json::to_string_pretty(&doc).unwrap_or_default(),
    ) {
        eprintln!("migration-bench: write {}: {e}", o.out.display());
        return ExitCode::FAILURE;
    }
    if let Err(e) = std::fs::write(&o.chart, chart_svg(&o.mems, &c)) {
        eprintln!("migration-bench: write {}: {e}", o.chart.display());
        return ExitCode::FAILURE;
    }
    println!("wrote {} and {}", o.out.display(), o.chart.display());
    if ok.is_empty() {
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
