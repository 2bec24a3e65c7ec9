//! How a VM ends: each way has its own exit status and a log line that says why.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

mod common;

use common::*;

#[test]
fn clean_shutdown_exits_zero() {
    let out = boot(2, "");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stderr(&out).contains("guest shut down"));
}

#[test]
fn guest_reset_exits_three() {
    let out = boot(2, "drover.mode=reset");
    assert_eq!(out.status.code(), Some(3), "{}{}", stdout(&out), stderr(&out));
    assert!(stderr(&out).contains("guest requested a reset"), "{}", stderr(&out));
}

#[test]
fn triple_fault_exits_four() {
    let out = boot(1, "drover.mode=triple-fault");
    assert_eq!(out.status.code(), Some(4), "{}{}", stdout(&out), stderr(&out));
    // Hardware KVM reports KVM_EXIT_SHUTDOWN ("triple fault"); PVM reports the same
    // guest state as an emulation failure. Either is a guest fault.
    let log = stderr(&out);
    assert!(log.contains("guest fault: triple fault") || log.contains("guest fault: KVM internal error"), "{log}");
}

#[test]
fn guest_reported_exception_exits_five() {
    // Ring-3 `hlt` raises #GP (vector 13); the guest's handler reports it.
    let out = boot(1, "drover.mode=fault");
    assert_eq!(out.status.code(), Some(5), "{}{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains("exception 0x000000000000000d"), "{}", stdout(&out));
    assert!(stderr(&out).contains("unhandled exception (vector 13)"), "{}", stderr(&out));
}

#[test]
fn serial_output_goes_to_a_file() {
    let path = std::env::temp_dir().join(format!("drover-serial-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let out = run_vmm(&["--vcpus", "1", "--memory-mib", "32", "--kernel", GUEST, "--serial", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).is_empty(), "serial went to stdout too");
    let log = std::fs::read_to_string(&path).unwrap();
    assert!(log.contains("drover-guest: done"), "{log}");
}

#[test]
fn serial_output_streams_to_socket_clients() {
    use std::io::Read;
    let socket = std::env::temp_dir().join(format!("drover-serial-{}.sock", std::process::id()));
    let mut vm = std::process::Command::new(env!("CARGO_BIN_EXE_drover-vmm"))
        .args(["run", "--vcpus", "1", "--memory-mib", "32", "--kernel", GUEST, "--cmdline", "drover.mode=spin"])
        .arg("--serial")
        .arg(format!("unix:{}", socket.display()))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut client = loop {
        match std::os::unix::net::UnixStream::connect(&socket) {
            Ok(c) => break c,
            Err(_) if std::time::Instant::now() < deadline => std::thread::sleep(std::time::Duration::from_millis(10)),
            Err(e) => panic!("serial socket: {e}"),
        }
    };
    client.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
    let mut seen = String::new();
    let mut buf = [0u8; 256];
    while !seen.contains("drover-guest: tick") {
        let n = client.read(&mut buf).expect("serial output on the socket");
        assert!(n > 0, "socket closed; got {seen:?}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    let _ = vm.kill();
    let _ = vm.wait();
}
