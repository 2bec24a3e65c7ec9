//! Live-migration benchmark: drover-vmm and QEMU (microvm, same guest image and
//! memory) migrate the same workloads over loopback in the same run.
//!
//!   cargo bench -p drover-hypervisor --bench migration
//!
//! Cases (the test guest's `dirty` mode): idle 1 GiB and 4 GiB guests; a 1 GiB
//! guest whose memory was fully written once (zero-page skipping does not help);
//! guests dirtying memory at about 100 MiB/s (1 and 4 GiB) and 1 GiB/s. QEMU gets its
//! bandwidth cap lifted and keeps its default 300 ms downtime limit; drover-vmm runs
//! with its defaults. Both targets fault guest memory in before they listen
//! (drover-vmm `receive --prefault`, as the agent runs it; QEMU `-mem-prealloc`).
//! Prints medians of DROVER_BENCH_RUNS runs (default 3, at most 5)
//! of total time, downtime, bytes sent and passes, and the ratios.
//!
//! DROVER_BENCH_LANES=1,2,4 measures drover-vmm with each of those lane counts
//! (a row each) instead of its default; DROVER_BENCH_CASES="written,1 GiB/s" keeps
//! only the cases whose names contain one of the comma-separated words;
//! DROVER_BENCH_QEMU_MULTIFD=N gives QEMU N multifd channels (its own parallel
//! migration) in place of its default single stream; DROVER_BENCH_QEMU_TLS=1
//! encrypts QEMU's stream too (TLS with a pre-shared key, as drover's always is).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark: a failed unwrap is a failed run

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{median, qemu_cpu};

struct Case {
    name: &'static str,
    memory_mib: u64,
    cmdline: String,
    /// Serial text that says the workload is in its steady state.
    ready: &'static str,
}

#[derive(Clone, Copy, Default)]
struct Figures {
    total_ms: f64,
    downtime_ms: f64,
    bytes: f64,
    passes: f64,
}

fn tmp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("drover-migbench-{name}-{}", std::process::id()))
}

fn wait_for(path: &Path, text: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !std::fs::read_to_string(path).unwrap_or_default().contains(text) {
        assert!(Instant::now() < deadline, "guest never printed {text:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn kill(mut c: Child) {
    let _ = c.kill();
    let _ = c.wait();
}

/// TSC frequency in kHz, measured against the wall clock (for the guest's pacing).
fn tsc_khz() -> u64 {
    // SAFETY: rdtsc has no preconditions on x86-64.
    let t0 = unsafe { core::arch::x86_64::_rdtsc() };
    let start = Instant::now();
    std::thread::sleep(Duration::from_millis(200));
    // SAFETY: as above.
    let t1 = unsafe { core::arch::x86_64::_rdtsc() };
    ((t1 - t0) as f64 / start.elapsed().as_secs_f64() / 1000.0) as u64
}

fn drover_run(vmm: &Path, guest: &Path, case: &Case, key: &Path, lanes: Option<u32>) -> Figures {
    let (serial, log, socket) = (tmp("d-src.serial"), tmp("d-src.log"), tmp("d-src.sock"));
    let _ = std::fs::remove_file(&serial);
    // The target knows the VM it expects and faults its memory in before it
    // listens (as the agent runs it); QEMU's target gets -mem-prealloc to match.
    let (expected, target_log) = (tmp("d-expected.json"), tmp("d-dst.log"));
    std::fs::write(
        &expected,
        serde_json::json!({"vcpus": 1, "memoryMib": case.memory_mib, "kernel": guest}).to_string(),
    )
    .unwrap();
    let target = Command::new(vmm)
        .args(["receive", "--listen", "127.0.0.1:0", "--serial", "null", "--prefault", "--config"])
        .arg(&expected)
        .arg("--secret-file")
        .arg(key)
        .stderr(std::fs::File::create(&target_log).unwrap())
        .spawn()
        .unwrap();
    // The guest starts once the target is ready, so that it has run (and
    // dirtied memory) as long as QEMU's guest has when the migration starts,
    // whatever either target's memory took to fault in.
    wait_for(&target_log, "waiting for the migration source");
    let source = Command::new(vmm)
        .args([
            "run",
            "--vcpus",
            "1",
            "--memory-mib",
            &case.memory_mib.to_string(),
            "--cmdline",
            &case.cmdline,
            "--kernel",
        ])
        .arg(guest)
        .arg("--serial")
        .arg(&serial)
        .arg("--api-socket")
        .arg(&socket)
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    wait_for(&serial, case.ready);
    std::thread::sleep(Duration::from_millis(300));
    // The port the kernel gave the target, from its log.
    let listening = std::fs::read_to_string(&target_log).unwrap();
    let at = listening.find("address=").unwrap() + "address=".len();
    let destination: String = listening[at..].chars().take_while(|c| !c.is_whitespace()).collect();
    let mut body = serde_json::json!({"destination": destination, "secretFile": key});
    if let Some(lanes) = lanes {
        body["lanes"] = lanes.into();
    }
    let body = body.to_string();
    let (code, reply) = drover_vmm_api::client::request(&socket, "PUT", "/vm/migrate", Some(&body)).unwrap();
    assert_eq!(code, 204, "{reply}");
    wait_for(&log, "migration completed");
    let line =
        std::fs::read_to_string(&log).unwrap().lines().find(|l| l.contains("migration completed")).unwrap().to_string();
    let figure = |name: &str| -> f64 {
        let at = line.find(&format!("{name}=")).unwrap() + name.len() + 1;
        line[at..].chars().take_while(|c| c.is_ascii_digit()).collect::<String>().parse().unwrap()
    };
    let f = Figures {
        total_ms: figure("total_ms"),
        downtime_ms: figure("downtime_us") / 1000.0,
        bytes: figure("bytes_sent"),
        passes: figure("passes"),
    };
    kill(source);
    kill(target);
    f
}

/// A QMP client: one JSON command per line, answers read until a return or error.
struct Qmp(BufReader<UnixStream>);

impl Qmp {
    fn connect(path: &Path) -> Qmp {
        let deadline = Instant::now() + Duration::from_secs(10);
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => panic!("QMP {}: {e}", path.display()),
            }
        };
        let mut q = Qmp(BufReader::new(stream));
        let mut greeting = String::new();
        q.0.read_line(&mut greeting).unwrap();
        q.call(serde_json::json!({"execute": "qmp_capabilities"}));
        q
    }

    fn call(&mut self, cmd: serde_json::Value) -> serde_json::Value {
        writeln!(self.0.get_mut(), "{cmd}").unwrap();
        loop {
            let mut line = String::new();
            self.0.read_line(&mut line).unwrap();
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            if v.get("return").is_some() || v.get("error").is_some() {
                return v;
            }
        }
    }
}

/// How QEMU migrates: its default single stream, or multifd channels; in the
/// clear, or over TLS with a pre-shared key (the directory holding `keys.psk`).
struct QemuMode {
    multifd: u32,
    tls: Option<PathBuf>,
}

fn qemu_run(guest: &Path, case: &Case, cpu: &str, mode: &QemuMode) -> Figures {
    let (serial, src_qmp, dst_qmp) = (tmp("q-src.serial"), tmp("q-src.qmp"), tmp("q-dst.qmp"));
    for p in [&serial, &src_qmp, &dst_qmp] {
        let _ = std::fs::remove_file(p);
    }
    let base = |serial: &str, qmp: &Path| {
        let mut c = Command::new("qemu-system-x86_64");
        c.args(["-M", "microvm", "-enable-kvm", "-cpu", cpu, "-smp", "1", "-m", &format!("{}M", case.memory_mib)])
            .args(["-nodefaults", "-no-user-config", "-nographic", "-device", "isa-debug-exit", "-kernel"])
            .arg(guest)
            .args(["-append", &case.cmdline, "-serial", serial, "-qmp"])
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        c
    };
    // The server looks the client's username up in the same file.
    let tls = |endpoint: &str| match &mode.tls {
        Some(dir) => {
            let user = if endpoint == "client" { ",username=drover" } else { "" };
            vec![
                "-object".to_string(),
                format!("tls-creds-psk,id=tls0,endpoint={endpoint},dir={}{user}", dir.display()),
            ]
        }
        None => Vec::new(),
    };
    // The target listens once told to, after its capabilities are set.
    let target =
        base("null", &dst_qmp).args(tls("server")).args(["-mem-prealloc", "-incoming", "defer"]).spawn().unwrap();
    // Its QMP answers once its memory is allocated; the guest starts then (as
    // drover's does).
    let mut target_qmp = Qmp::connect(&dst_qmp);
    let source = base(&format!("file:{}", serial.display()), &src_qmp).args(tls("client")).spawn().unwrap();
    let mut qmp = Qmp::connect(&src_qmp);
    wait_for(&serial, case.ready);
    std::thread::sleep(Duration::from_millis(300));
    for q in [&mut qmp, &mut target_qmp] {
        if mode.multifd > 0 {
            q.call(serde_json::json!({"execute": "migrate-set-capabilities", "arguments": {"capabilities": [{"capability": "multifd", "state": true}]}}));
            q.call(serde_json::json!({"execute": "migrate-set-parameters", "arguments": {"multifd-channels": mode.multifd}}));
        }
        if mode.tls.is_some() {
            q.call(serde_json::json!({"execute": "migrate-set-parameters", "arguments": {"tls-creds": "tls0"}}));
        }
    }
    // Port 0: the kernel picks a free one, which the target then reports.
    let incoming =
        target_qmp.call(serde_json::json!({"execute": "migrate-incoming", "arguments": {"uri": "tcp:127.0.0.1:0"}}));
    assert!(incoming.get("error").is_none(), "QEMU target: {incoming}");
    let listening = target_qmp.call(serde_json::json!({"execute": "query-migrate"}));
    let port = &listening["return"]["socket-address"][0]["port"];
    let port = port.as_str().map(str::to_string).unwrap_or_else(|| port.to_string());
    // Lift QEMU 7.2's 32 MiB/s default cap, as measured in the issue.
    qmp.call(serde_json::json!({"execute": "migrate-set-parameters", "arguments": {"max-bandwidth": 100u64 << 30}}));
    qmp.call(serde_json::json!({"execute": "migrate", "arguments": {"uri": format!("tcp:127.0.0.1:{port}")}}));
    let deadline = Instant::now() + Duration::from_secs(120);
    let info = loop {
        let r = qmp.call(serde_json::json!({"execute": "query-migrate"}));
        let status = r["return"]["status"].as_str().unwrap_or("").to_string();
        if status == "completed" || status == "failed" || Instant::now() > deadline {
            break r["return"].clone();
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    kill(source);
    kill(target);
    if info["status"] != "completed" {
        return Figures { total_ms: f64::NAN, downtime_ms: f64::NAN, bytes: f64::NAN, passes: f64::NAN };
    }
    Figures {
        total_ms: info["total-time"].as_f64().unwrap_or(f64::NAN),
        downtime_ms: info["downtime"].as_f64().unwrap_or(f64::NAN),
        bytes: info["ram"]["transferred"].as_f64().unwrap_or(f64::NAN),
        passes: info["ram"]["dirty-sync-count"].as_f64().unwrap_or(f64::NAN),
    }
}

/// Throughput of the encrypted channel alone on loopback, in GiB/s: the ceiling
/// for pages on the wire.
fn channel_gib_per_s() -> f64 {
    use drover_hypervisor::migration::channel::SecureStream;
    use std::io::Read;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let total = 1usize << 30;
    let target = std::thread::spawn(move || {
        let mut s = SecureStream::accept(listener.accept().unwrap().0, b"k", b"bench").unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0;
        while got < total {
            got += s.read(&mut buf).unwrap();
        }
    });
    let mut s = SecureStream::initiate(std::net::TcpStream::connect(addr).unwrap(), b"k", b"bench").unwrap();
    // As a migration sends pages: 1 MiB runs, each sealed in place.
    let mut chunk = vec![7u8; 1 << 20];
    let start = Instant::now();
    for _ in 0..total >> 20 {
        s.write_in_place(&mut chunk).unwrap();
    }
    s.flush().unwrap();
    target.join().unwrap();
    total as f64 / start.elapsed().as_secs_f64() / (1u64 << 30) as f64
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let runs = std::env::var("DROVER_BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(3usize).clamp(1, 5);
    let (vmm, guest) = common::setup("migration");
    let cpu = qemu_cpu(&guest);
    let key = tmp("key");
    std::fs::write(&key, "benchmark secret").unwrap();
    let khz = tsc_khz();
    let dirty =
        |mem: u64, rate: u64| format!("drover.mode=dirty drover.mem={mem} drover.rate={rate} drover.tsc_khz={khz}");
    let cases = [
        Case {
            name: "idle 1 GiB",
            memory_mib: 1024,
            cmdline: "drover.mode=dirty drover.mem=0 drover.once=1".into(),
            ready: "filled",
        },
        Case {
            name: "idle 4 GiB",
            memory_mib: 4096,
            cmdline: "drover.mode=dirty drover.mem=0 drover.once=1".into(),
            ready: "filled",
        },
        Case {
            name: "1 GiB fully written, idle",
            memory_mib: 1024,
            cmdline: "drover.mode=dirty drover.mem=990 drover.once=1".into(),
            ready: "filled",
        },
        Case { name: "1 GiB dirtying 100 MiB/s", memory_mib: 1024, cmdline: dirty(512, 100), ready: "dirtying" },
        Case { name: "4 GiB dirtying 100 MiB/s", memory_mib: 4096, cmdline: dirty(2048, 100), ready: "dirtying" },
        Case { name: "1 GiB dirtying 1 GiB/s", memory_mib: 1024, cmdline: dirty(512, 1024), ready: "dirtying" },
    ];
    let list = |name: &str| -> Vec<String> {
        std::env::var(name)
            .unwrap_or_default()
            .split(',')
            .map(|w| w.trim().to_string())
            .filter(|w| !w.is_empty())
            .collect()
    };
    let wanted = list("DROVER_BENCH_CASES");
    let lanes: Vec<Option<u32>> = match list("DROVER_BENCH_LANES") {
        l if l.is_empty() => vec![None],
        l => l
            .iter()
            .map(|n| Some(n.parse().expect("DROVER_BENCH_LANES: a comma-separated list of lane counts")))
            .collect(),
    };
    let multifd = std::env::var("DROVER_BENCH_QEMU_MULTIFD")
        .map_or(0, |v| v.parse().expect("DROVER_BENCH_QEMU_MULTIFD: a channel count"));
    let tls = std::env::var("DROVER_BENCH_QEMU_TLS").is_ok_and(|v| v == "1").then(|| {
        // QEMU's PSK file: `username:key in hex`, one per line.
        let dir = tmp("qemu-psk");
        std::fs::create_dir_all(&dir).unwrap();
        let hex: String = b"benchmark secret".iter().map(|b| format!("{b:02x}")).collect();
        std::fs::write(dir.join("keys.psk"), format!("drover:{hex}\n")).unwrap();
        dir
    });
    let qemu_mode = QemuMode { multifd, tls };
    let host = std::thread::available_parallelism().map_or(1, |n| n.get());
    let streams = if multifd > 0 { format!("{multifd} multifd channels") } else { "one stream".into() };
    let clear = if qemu_mode.tls.is_some() { "TLS-PSK" } else { "in the clear" };
    println!(
        "live migration on loopback, drover-vmm vs QEMU microvm (-cpu {cpu}, {streams}, {clear}), 1 vCPU, {host} host CPUs, median of {runs} runs"
    );
    println!("(drover's encrypted channel alone carries {:.2} GiB/s here)\n", channel_gib_per_s());
    println!(
        "{:<36} {:>10} {:>10} {:>7} | {:>9} {:>9} {:>7} | {:>8} {:>8} | {:>6} {:>6}",
        "", "total ms", "qemu", "ratio", "down ms", "qemu", "ratio", "MB sent", "qemu", "passes", "qemu"
    );
    for case in cases.iter().filter(|c| wanted.is_empty() || wanted.iter().any(|w| c.name.contains(w.as_str()))) {
        // Runs alternate between the VMMs (and lane counts), so that a slow
        // moment of the host falls on both.
        let (mut d, mut q) = (vec![Vec::new(); lanes.len()], Vec::new());
        for _ in 0..runs {
            for (figures, lanes) in d.iter_mut().zip(&lanes) {
                figures.push(drover_run(&vmm, &guest, case, &key, *lanes));
            }
            q.push(qemu_run(&guest, case, cpu, &qemu_mode));
        }
        let m = |v: &[Figures], f: fn(&Figures) -> f64| median(v.iter().map(f).collect());
        for (d, lanes) in d.iter().zip(&lanes) {
            let name = lanes.map_or_else(
                || case.name.to_string(),
                |n| format!("{}, {n} lane{}", case.name, if n == 1 { "" } else { "s" }),
            );
            let (dt, qt) = (m(d, |f| f.total_ms), m(&q, |f| f.total_ms));
            let (dd, qd) = (m(d, |f| f.downtime_ms), m(&q, |f| f.downtime_ms));
            // QEMU reports whole milliseconds: 0 there means under one.
            let down_ratio = if qd > 0.0 { format!("{:.2}x", dd / qd) } else { "-".into() };
            println!(
                "{:<36} {:>10.0} {:>10.0} {:>6.2}x | {:>9.1} {:>9.0} {:>7} | {:>8.0} {:>8.0} | {:>6.0} {:>6.0}",
                name,
                dt,
                qt,
                dt / qt,
                dd,
                qd,
                down_ratio,
                m(d, |f| f.bytes) / 1e6,
                m(&q, |f| f.bytes) / 1e6,
                m(d, |f| f.passes),
                m(&q, |f| f.passes)
            );
        }
    }
    let _ = std::fs::remove_file(&guest);
    if let Some(dir) = &qemu_mode.tls {
        let _ = std::fs::remove_dir_all(dir);
    }
}
