//! `drover-agent` on the real control plane, with hosts that are network namespaces
//! (`e2e/cluster host ...`). Until the operator exists, the tests place VMs and
//! approve migrations themselves, by setting the status fields the operator owns
//! (`status.nodeName` + `phase: Scheduled`; a migration's source, target and Secret).
//!
//! The tests run one at a time (a lock): they time fencing and migrations, and two
//! of them at once on a 2-CPU machine would measure each other.

#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

use drover_e2e::control_plane;
use drover_e2e::hosts::{Host, unique_name};
use drover_e2e::vms::*;
use serde_json::Value;

#[test]
fn host_publishes_its_facts_and_a_placed_vm_boots_reports_and_takes_live_changes() {
    let _serial = serial();
    let ns = namespace("agent-life");
    let host = Host::add(&unique_name("life"));

    // Host facts on the Node.
    let node = wait_for("host facts on the Node", Duration::from_secs(20), || {
        let node = get("", "node", host.name());
        node["metadata"]["annotations"]["drover.dev/host-facts"].is_string().then_some(node)
    });
    let labels = &node["metadata"]["labels"];
    assert_eq!(labels["drover.dev/kvm"], "true", "KVM is usable here: {labels}");
    assert!(labels["drover.dev/cpus"].as_str().unwrap().parse::<u32>().unwrap() >= 1);
    let annotations = &node["metadata"]["annotations"];
    assert_eq!(annotations["drover.dev/migration-address"], host.ip().to_string());
    let facts: Value = serde_json::from_str(annotations["drover.dev/host-facts"].as_str().unwrap()).unwrap();
    assert_eq!(facts["kvm"]["usable"], true);
    assert!(facts["offered"]["memoryMib"].as_u64().unwrap() > 0, "{facts}");
    let lease = get("drover-system", "lease", host.name());
    assert_eq!(lease["spec"]["holderIdentity"], host.name());
    assert_eq!(lease["spec"]["leaseDurationSeconds"], 3);

    // A VM placed on the host runs and says so.
    apply(&vm_yaml(&ns, "web", 2, "64Mi", "drover.mode=idle"));
    let placed = Instant::now();
    place(&ns, "web", &host);
    let status = wait_phase(&ns, "web", "Running", Duration::from_secs(30));
    println!("figure: placed -> Running in {} ms", placed.elapsed().as_millis());
    assert_eq!(status["nodeName"], host.name());
    assert_eq!(status["shares"], 1000);
    assert!(status["startedAt"].is_string(), "{status}");
    // The VMM may answer its API a moment before the guest's first output, which is
    // what boot time measures: it follows within a status refresh.
    let status = wait_for("bootMillis in the status", Duration::from_secs(10), || {
        let status = vm_status(&ns, "web");
        status["bootMillis"].as_i64().is_some_and(|ms| ms >= 0).then_some(status)
    });
    let ready = status["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Ready").unwrap();
    assert_eq!(ready["status"], "True", "{ready}");
    let offered = facts["offered"]["cpus"].as_str().unwrap();
    assert_eq!(status["hostCpus"], offered, "a Shared VM without hostCpus gets every offered CPU");
    let vm = get(&ns, "vm", "web");
    assert!(vm["metadata"]["finalizers"].as_array().unwrap().iter().any(|f| f == "drover.dev/vm-agent"));
    let uid = uid(&ns, "web");
    let pid = vmm_pid(&host, &uid).expect("a VMM process for the VM");
    assert_eq!(vcpu_affinity(pid).len(), 2, "two vCPU threads");

    // The serial console, through the agent.
    let text = wait_for("the guest's serial output through the agent", Duration::from_secs(10), || {
        let text = console(&host, &ns, "web");
        text.contains("drover-guest: idle").then_some(text)
    });
    assert!(text.contains("2 cpus"), "{text}");
    assert_eq!(agent_get(&host, "/vms/default/nothing-here/console").map(|r| r.0), Some(404));
    let kubectl_wide = kubectl(&["get", "vm", "web", "-n", &ns, "-o", "wide"]);
    assert!(kubectl_wide.contains("Running") && kubectl_wide.contains(host.name()), "{kubectl_wide}");

    // Live changes: host CPUs and priority, without a restart.
    kubectl(&[
        "patch",
        "vm",
        "web",
        "-n",
        &ns,
        "--type=merge",
        "-p",
        r#"{"spec":{"cpu":{"hostCpus":"0","priority":"High"}}}"#,
    ]);
    let status = wait_for("the live change in status", Duration::from_secs(20), || {
        let vm = get(&ns, "vm", "web");
        let s = vm["status"].clone();
        (s["hostCpus"] == "0" && s["shares"] == 2000 && s["observedGeneration"] == vm["metadata"]["generation"])
            .then_some(s)
    });
    assert!(status["cpuChangedAt"].is_string(), "{status}");
    assert_eq!(vmm_pid(&host, &uid), Some(pid), "same VMM process: no restart");
    // What happened is also in the VM's events (kubectl describe vm).
    let events = wait_for("the agent's events on the VM", Duration::from_secs(10), || {
        let out = kubectl(&[
            "get",
            "events",
            "-n",
            &ns,
            "--field-selector",
            "involvedObject.name=web",
            "-o",
            "jsonpath={.items[*].reason}",
        ]);
        (out.contains("Started") && out.contains("CpuConfigChanged")).then_some(out)
    });
    assert!(!events.contains("Failed"), "{events}");
    assert_eq!(vcpu_affinity(pid), vec!["0".to_string(), "0".to_string()]);
    // A host CPU that is not there is refused with a condition; the VM keeps running.
    kubectl(&["patch", "vm", "web", "-n", &ns, "--type=merge", "-p", r#"{"spec":{"cpu":{"hostCpus":"900"}}}"#]);
    let condition = wait_for("a CpuConfigApplied=False condition", Duration::from_secs(20), || {
        let s = vm_status(&ns, "web");
        s["conditions"].as_array()?.iter().find(|c| c["type"] == "CpuConfigApplied" && c["status"] == "False").cloned()
    });
    assert!(condition["message"].as_str().unwrap().contains("spec.cpu.hostCpus: CPU 900"), "{condition}");
    assert_eq!(vmm_pid(&host, &uid), Some(pid));

    // Halted: the VM stops; deleted: the finalizer lets go once it has.
    kubectl(&["patch", "vm", "web", "-n", &ns, "--type=merge", "-p", r#"{"spec":{"runStrategy":"Halted"}}"#]);
    let status = wait_phase(&ns, "web", "Stopped", Duration::from_secs(20));
    assert!(status["lastExit"].as_str().unwrap().contains("Halted"), "{status}");
    assert!(!alive(pid), "the VMM is gone");
    kubectl(&["delete", "vm", "web", "-n", &ns, "--timeout=20s"]);
    assert!(control_plane().kubectl(&["get", "vm", "web", "-n", &ns], None).status.code() != Some(0));
}

#[test]
fn an_agent_killed_and_restarted_readopts_every_vm_without_restarting_any() {
    let _serial = serial();
    let ns = namespace("agent-readopt");
    let host = Host::add(&unique_name("readopt"));
    for vm in ["a", "b"] {
        apply(&vm_yaml(&ns, vm, 1, "32Mi", "drover.mode=idle"));
        place(&ns, vm, &host);
    }
    let before: Vec<(String, u32, Value)> = ["a", "b"]
        .iter()
        .map(|vm| {
            let status = wait_phase(&ns, vm, "Running", Duration::from_secs(30));
            let uid = uid(&ns, vm);
            let pid = vmm_pid(&host, &uid).expect("VMM");
            (vm.to_string(), pid, status["startedAt"].clone())
        })
        .collect();

    let agent = host.agent_pid().expect("agent runs");
    kill_9(agent);
    wait_for("the agent to die", Duration::from_secs(5), || (!alive(agent)).then_some(()));
    let restarted = Instant::now();
    host.start();
    let health = wait_for("the new agent to hold its lease", Duration::from_secs(20), || {
        agent_get(&host, "/healthz").filter(|(code, _)| *code == 200).map(|(_, body)| body)
    });
    println!("figure: agent restart -> lease held with {} in {} ms", health.trim(), restarted.elapsed().as_millis());
    let log = host.agent_log();
    assert_eq!(count(&log, "re-adopted"), 2, "{log}");
    for (vm, pid, started_at) in &before {
        assert!(alive(*pid), "VMM of {vm} survived the agent");
        let status = vm_status(&ns, vm);
        assert_eq!(status["phase"], "Running");
        assert_eq!(&status["startedAt"], started_at, "{vm} was not restarted");
        assert!(status.get("restartCount").is_none_or(|c| c == 0));
    }
    // The new agent controls the VMs it adopted: a live change reaches the VMM.
    kubectl(&["patch", "vm", "a", "-n", &ns, "--type=merge", "-p", r#"{"spec":{"cpu":{"priority":"Low"}}}"#]);
    wait_for("the priority change after re-adoption", Duration::from_secs(20), || {
        (vm_status(&ns, "a")["shares"] == 500).then_some(())
    });
    println!("figure: agent restart -> a live change applied in {} ms", restarted.elapsed().as_millis());
    let log = host.agent_log();
    let since_restart = log.rsplit_once("[drover-e2e]").map(|(_, after)| after).unwrap_or(&log);
    assert_eq!(count(since_restart, "vm_controller: started vm="), 0, "the new agent started no VM:\n{since_restart}");
    assert!(before.iter().all(|(_, pid, _)| alive(*pid)));
}

#[test]
fn an_isolated_host_powers_its_vms_off_before_its_lease_runs_out() {
    let _serial = serial();
    let ns = namespace("agent-fence");
    let host = Host::add(&unique_name("fence"));
    // A guest that would shut down if asked (spin mode): PowerOff, the isolation
    // response without a HostPolicy, does not ask.
    apply(&vm_yaml(&ns, "db", 1, "32Mi", "drover.mode=spin"));
    place(&ns, "db", &host);
    wait_phase(&ns, "db", "Running", Duration::from_secs(30));
    let db = uid(&ns, "db");
    let pid = vmm_pid(&host, &db).expect("VMM");

    let isolated = Instant::now();
    host.isolate();
    // The last heartbeat the API server accepted: nobody may restart the VM before
    // renewTime + leaseDurationSeconds.
    let lease = get("drover-system", "lease", host.name());
    let renewed = wall_ms(lease["spec"]["renewTime"].as_str().unwrap());
    let expires = renewed + 1000 * lease["spec"]["leaseDurationSeconds"].as_i64().unwrap();
    wait_for("the VMM to be powered off", Duration::from_secs(10), || (!alive(pid)).then_some(()));
    let dead_at = now_ms();
    println!(
        "figure: isolation -> VM powered off in {} ms; {} ms before the lease ran out",
        isolated.elapsed().as_millis(),
        expires - dead_at
    );
    assert!(dead_at < expires, "the VM ran until {dead_at}, past the lease's end {expires}");
    assert!(host.agent_log().contains("fencing"), "{}", host.agent_log());
    let exit = exit_record(&host, &db);
    assert_eq!(exit["signal"], 9, "killed, not shut down: {exit}");
    assert!(!serial_log(&host, &ns, "db").contains("ctrl-alt-del"), "PowerOff asks no guest");

    // Healed: the agent reports why the VM stopped, and does not start it again
    // (the operator may have restarted it elsewhere; it decides).
    host.heal();
    let status = wait_phase(&ns, "db", "Failed", Duration::from_secs(20));
    assert!(status["lastExit"].as_str().unwrap().contains("isolation response"), "{status}");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(vm_status(&ns, "db")["phase"], "Failed");
    assert!(vmm_pid(&host, &uid(&ns, "db")).is_none());
}

/// `exit.json` of a VM's VMM on a host, as its monitor writes it once the VMM has
/// ended (it is there until the agent has reported the end and forgotten the VM).
fn exit_record(host: &Host, uid: &str) -> Value {
    let path = host.runtime_dir().join("vms").join(uid).join("exit.json");
    let text = wait_for("the monitor's exit record", Duration::from_secs(5), || std::fs::read_to_string(&path).ok());
    serde_json::from_str(&text).expect("exit.json")
}

fn stop_reason(host: &Host, uid: &str) -> String {
    std::fs::read_to_string(host.runtime_dir().join("vms").join(uid).join("stop-reason")).unwrap_or_default()
}

/// A VM's serial log as its host keeps it (read from the host's state directory:
/// an isolated host's console endpoint cannot be reached).
fn serial_log(host: &Host, ns: &str, vm: &str) -> String {
    std::fs::read_to_string(host.state_dir().join("console").join(format!("{ns}_{vm}.log"))).unwrap_or_default()
}

#[test]
fn an_isolated_host_with_isolation_response_shutdown_asks_its_guests_before_powering_off() {
    let _serial = serial();
    let ns = namespace("agent-shutdown");
    let host = Host::add(&unique_name("shut"));
    // 1 s heartbeats, 5 s failure detection: F = 4 s; the host looks isolated 2 s
    // after its last accepted renewal, and guests get the 2 s left.
    let policy = format!("shutdown-{}", host.name());
    apply(&format!(
        "apiVersion: drover.dev/v1alpha1\nkind: HostPolicy\nmetadata: {{name: {policy}}}\nspec:\n  nodeSelector: {{matchLabels: {{kubernetes.io/hostname: {}}}}}\n  ha: {{heartbeatIntervalSeconds: 1, failureDetectionSeconds: 5, isolationResponse: Shutdown}}\n",
        host.name()
    ));
    wait_for("the agent to follow the HostPolicy", Duration::from_secs(45), || {
        let lease = get("drover-system", "lease", host.name());
        (lease["spec"]["leaseDurationSeconds"] == 5 && host.agent_log().contains("isolation response changed"))
            .then_some(())
    });
    // One guest shuts down when asked (spin mode); the other never reads its keyboard.
    apply(&vm_yaml(&ns, "polite", 1, "32Mi", "drover.mode=spin"));
    apply(&vm_yaml(&ns, "deaf", 1, "32Mi", "drover.mode=idle"));
    for vm in ["polite", "deaf"] {
        place(&ns, vm, &host);
    }
    let (polite, deaf) = (uid(&ns, "polite"), uid(&ns, "deaf"));
    for vm in ["polite", "deaf"] {
        wait_phase(&ns, vm, "Running", Duration::from_secs(30));
    }
    let (polite_pid, deaf_pid) = (vmm_pid(&host, &polite).expect("VMM"), vmm_pid(&host, &deaf).expect("VMM"));

    let isolated = Instant::now();
    host.isolate();
    let lease = get("drover-system", "lease", host.name());
    let expires = wall_ms(lease["spec"]["renewTime"].as_str().unwrap())
        + 1000 * lease["spec"]["leaseDurationSeconds"].as_i64().unwrap();
    wait_for("the polite guest to shut down", Duration::from_secs(10), || (!alive(polite_pid)).then_some(()));
    let (polite_gone, polite_at) = (isolated.elapsed(), now_ms());
    wait_for("the deaf guest to be powered off", Duration::from_secs(10), || (!alive(deaf_pid)).then_some(()));
    let (deaf_gone, deaf_at) = (isolated.elapsed(), now_ms());
    println!(
        "figure: isolation -> polite guest shut down in {} ms, deaf guest powered off in {} ms; {} ms before the lease ran out",
        polite_gone.as_millis(),
        deaf_gone.as_millis(),
        expires - deaf_at
    );
    assert!(polite_at < expires && deaf_at < expires, "a VM outlived the lease ({polite_at}, {deaf_at} vs {expires})");
    // The request came well before the deadline: the guest that took it was gone
    // a second or more before the one that did not.
    assert!(deaf_gone >= polite_gone + Duration::from_secs(1), "{polite_gone:?} {deaf_gone:?}");

    let exit = exit_record(&host, &polite);
    assert_eq!(exit["code"], 0, "a clean power-off: {exit}");
    assert!(serial_log(&host, &ns, "polite").contains("drover-guest: ctrl-alt-del, powering off"));
    assert!(stop_reason(&host, &polite).contains("isolation response (Shutdown)"), "{}", stop_reason(&host, &polite));
    let exit = exit_record(&host, &deaf);
    assert_eq!(exit["signal"], 9, "killed at the deadline: {exit}");
    assert!(stop_reason(&host, &deaf).contains("heartbeat deadline passed"), "{}", stop_reason(&host, &deaf));
    assert!(host.agent_log().contains("the host looks isolated"), "{}", host.agent_log());

    // Healed: each VM reports how it ended; neither starts again.
    host.heal();
    let status = wait_phase(&ns, "polite", "Stopped", Duration::from_secs(20));
    let last = status["lastExit"].as_str().unwrap();
    assert!(last.contains("guest powered off") && last.contains("isolation response (Shutdown)"), "{status}");
    let status = wait_phase(&ns, "deaf", "Failed", Duration::from_secs(20));
    assert!(status["lastExit"].as_str().unwrap().contains("heartbeat deadline passed"), "{status}");
    kubectl(&["delete", "hostpolicy", &policy]);
}

#[test]
fn vms_do_not_outlive_an_agent_that_stays_dead() {
    // The monitors keep the fencing deadline themselves: with the agent gone nobody
    // renews the lease, so the VMs must stop before it runs out.
    let _serial = serial();
    let ns = namespace("agent-dead");
    let host = Host::add(&unique_name("dead"));
    apply(&vm_yaml(&ns, "lonely", 1, "32Mi", "drover.mode=idle"));
    place(&ns, "lonely", &host);
    wait_phase(&ns, "lonely", "Running", Duration::from_secs(30));
    let pid = vmm_pid(&host, &uid(&ns, "lonely")).expect("VMM");
    let agent = host.agent_pid().expect("agent");
    kill_9(agent);
    let killed = Instant::now();
    let lease = get("drover-system", "lease", host.name());
    let expires = wall_ms(lease["spec"]["renewTime"].as_str().unwrap())
        + 1000 * lease["spec"]["leaseDurationSeconds"].as_i64().unwrap();
    wait_for("the monitor to power the VM off", Duration::from_secs(10), || (!alive(pid)).then_some(()));
    println!("figure: agent dead -> VM powered off by its monitor in {} ms", killed.elapsed().as_millis());
    assert!(now_ms() < expires, "the VM outlived the lease");
    let dir = host.runtime_dir().join("vms").join(uid(&ns, "lonely"));
    let reason = std::fs::read_to_string(dir.join("stop-reason")).unwrap_or_default();
    assert!(reason.contains("heartbeat deadline"), "{reason}");
}

#[test]
fn a_power_failure_is_reported_and_nothing_restarts_on_its_own() {
    let _serial = serial();
    let ns = namespace("agent-power");
    let host = Host::add(&unique_name("power"));
    apply(&vm_yaml(&ns, "vm", 1, "32Mi", "drover.mode=idle"));
    place(&ns, "vm", &host);
    wait_phase(&ns, "vm", "Running", Duration::from_secs(30));
    host.stop();
    host.start();
    let status = wait_phase(&ns, "vm", "Failed", Duration::from_secs(20));
    assert!(status["lastExit"].as_str().unwrap().contains("gone from"), "{status}");
    // The serial log is on persistent storage and outlives the power failure.
    assert!(console(&host, &ns, "vm").contains("drover-guest: idle"));
}

#[test]
fn bad_references_give_a_clear_condition_and_no_crash_loop() {
    let _serial = serial();
    let ns = namespace("agent-bad");
    let host = Host::add(&unique_name("bad"));
    let yaml = vm_yaml(&ns, "nokernel", 1, "32Mi", "drover.mode=idle")
        .replace(&guest_image().display().to_string(), "/nonexistent/vmlinux");
    apply(&yaml);
    place(&ns, "nokernel", &host);
    let status = wait_phase(&ns, "nokernel", "Failed", Duration::from_secs(20));
    let ready = status["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Ready").unwrap().clone();
    assert_eq!(ready["reason"], "InvalidSpec");
    let message = ready["message"].as_str().unwrap();
    assert!(
        message.contains("spec.boot.kernel")
            && message.contains("/nonexistent/vmlinux")
            && message.contains(host.name()),
        "{message}"
    );
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(count(&host.agent_log(), "cannot start: spec.boot.kernel"), 1, "tried once, not in a loop");
    // Fixed spec: it starts.
    let fixed = format!(r#"{{"spec":{{"boot":{{"kernel":"{}"}}}}}}"#, guest_image().display());
    kubectl(&["patch", "vm", "nokernel", "-n", &ns, "--type=merge", "-p", &fixed]);
    wait_phase(&ns, "nokernel", "Running", Duration::from_secs(20));

    // A migration whose Secret does not exist fails, saying so; the VM stays put.
    let target = Host::add(&unique_name("bad-target"));
    apply(&migration_yaml(&ns, "m", "nokernel", ""));
    approve(&ns, "m", &host, &target, "no-such-secret");
    let status = wait_for("the migration to fail", Duration::from_secs(20), || {
        let s = get(&ns, "vmim", "m")["status"].clone();
        (s["phase"] == "Failed").then_some(s)
    });
    let why = status["failureMessage"].as_str().unwrap();
    assert!(why.contains("Secret") && why.contains("no-such-secret") && why.contains("not found"), "{why}");
    let vm = vm_status(&ns, "nokernel");
    assert_eq!(vm["phase"], "Running");
    assert_eq!(vm["nodeName"], host.name());
}

/// A migration of `vm`; `more` adds spec fields (", lanes: 2").
fn migration_yaml(ns: &str, name: &str, vm: &str, more: &str) -> String {
    format!(
        "apiVersion: drover.dev/v1alpha1\nkind: VirtualMachineMigration\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {{vmName: {vm}{more}}}\n"
    )
}

/// Approves a migration as the operator will: source, target, and the Secret.
fn approve(ns: &str, migration: &str, from: &Host, to: &Host, secret: &str) {
    let patch = format!(
        r#"{{"status":{{"phase":"Scheduled","sourceNode":"{}","targetNode":"{}","secretName":"{secret}"}}}}"#,
        from.name(),
        to.name()
    );
    kubectl(&["patch", "vmim", migration, "-n", ns, "--subresource=status", "--type=merge", "-p", &patch]);
}

#[test]
fn a_vm_migrates_between_hosts_and_its_workload_result_is_intact() {
    let _serial = serial();
    let ns = namespace("agent-vmotion");
    let a = Host::add(&unique_name("mig-a"));
    let b = Host::add(&unique_name("mig-b"));
    let cmdline = "drover.mode=digest drover.rounds=3000 drover.mem=8";
    let want = reference_digest(2, 256, cmdline);

    apply(&vm_yaml(&ns, "busy", 2, "256Mi", cmdline));
    place(&ns, "busy", &a);
    wait_phase(&ns, "busy", "Running", Duration::from_secs(30));
    wait_for("the workload to be under way", Duration::from_secs(30), || {
        console(&a, &ns, "busy").contains("round 100").then_some(())
    });
    let secret = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: vmotion-key, namespace: {ns}}}\nstringData: {{key: correct-horse-battery-staple}}\n"
    );
    apply(&secret);
    // Two lanes, whatever the host's CPUs: the spec's setting reaches both VMMs.
    apply(&migration_yaml(&ns, "move", "busy", ", lanes: 2"));
    let asked = Instant::now();
    approve(&ns, "move", &a, &b, "vmotion-key");
    let status = wait_for("the migration to end", Duration::from_secs(60), || {
        let s = get(&ns, "vmim", "move")["status"].clone();
        (s["phase"] == "Succeeded" || s["phase"] == "Failed").then_some(s)
    });
    assert_eq!(status["phase"], "Succeeded", "{status}");
    println!(
        "figure: migration between hosts: approved -> Succeeded {} ms; VMM total {} ms, downtime {} us, {} bytes, {} passes",
        asked.elapsed().as_millis(),
        status["totalMillis"],
        status["downtimeMicros"],
        status["bytesTransferred"],
        status["iterations"]
    );
    let (millis, micros) = (status["downtimeMillis"].as_i64(), status["downtimeMicros"].as_i64());
    assert!(micros.is_some_and(|us| us > 0) && millis == micros.map(|us| us / 1000), "downtime in ms and µs: {status}");
    assert!(status["bytesTransferred"].as_i64().is_some_and(|b| b > 0), "{status}");
    assert!(status["iterations"].as_i64().is_some_and(|n| n >= 1), "{status}");
    assert!(status["totalMillis"].as_i64().is_some_and(|ms| ms > 0), "{status}");
    assert!(status["targetAddress"].as_str().unwrap().starts_with(&b.ip().to_string()), "{status}");
    let target_log =
        std::fs::read_to_string(b.runtime_dir().join("vms").join(uid(&ns, "busy")).join("vmm.log")).unwrap_or_default();
    assert!(target_log.contains("lanes=2"), "the target's VMM log says nothing of 2 lanes:\n{target_log}");

    let vm = wait_for("the VM to be reported from the target", Duration::from_secs(20), || {
        let s = vm_status(&ns, "busy");
        (s["nodeName"] == b.name() && (s["phase"] == "Running" || s["phase"] == "Stopped")).then_some(s)
    });
    assert!(vm.get("migration").is_none(), "{vm}");
    assert!(vmm_pid(&a, &uid(&ns, "busy")).is_none(), "nothing of the VM runs on the source");
    // The workload ends on the target with the digest of an undisturbed run.
    let status = wait_phase(&ns, "busy", "Stopped", Duration::from_secs(120));
    assert_eq!(status["nodeName"], b.name());
    let serial = console(&b, &ns, "busy");
    assert_eq!(digest_of(&serial).as_deref(), Some(want.as_str()), "target's serial log:\n{serial}");
    assert!(!console(&a, &ns, "busy").contains("digest"), "the source never finished the workload");
}

fn wall_ms(rfc3339: &str) -> i64 {
    // RFC 3339 with microseconds, UTC, as the API server writes MicroTime.
    let out = std::process::Command::new("date").args(["-u", "-d", rfc3339, "+%s%3N"]).output().expect("date");
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or_else(|e| panic!("date -d {rfc3339}: {e}"))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock after 1970").as_millis() as i64
}

#[test]
fn a_host_without_kvm_says_so_and_runs_no_vm() {
    let _serial = serial();
    let ns = namespace("agent-nokvm");
    let options = drover_e2e::hosts::HostOptions {
        agent_args: vec!["--kvm-device=/nonexistent/kvm".into()],
        ..Default::default()
    };
    let host = Host::add_with(&unique_name("nokvm"), &options);
    let node = wait_for("host facts on the Node", Duration::from_secs(20), || {
        let node = get("", "node", host.name());
        node["metadata"]["annotations"]["drover.dev/host-facts"].is_string().then_some(node)
    });
    assert_eq!(node["metadata"]["labels"]["drover.dev/kvm"], "false");
    let facts: Value =
        serde_json::from_str(node["metadata"]["annotations"]["drover.dev/host-facts"].as_str().unwrap()).unwrap();
    assert!(facts["kvm"]["reason"].as_str().unwrap().contains("/nonexistent/kvm"), "{facts}");
    apply(&vm_yaml(&ns, "vm", 1, "32Mi", "drover.mode=idle"));
    place(&ns, "vm", &host);
    let status = wait_phase(&ns, "vm", "Failed", Duration::from_secs(20));
    let ready = status["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Ready").unwrap().clone();
    assert_eq!(ready["reason"], "HostCannotRunVMs", "{ready}");
    assert!(ready["message"].as_str().unwrap().contains("cannot run VMs"), "{ready}");
    assert!(host.agent_log().contains("this host cannot run VMs"));
    assert!(
        !host.runtime_dir().join("vms").exists()
            || std::fs::read_dir(host.runtime_dir().join("vms")).unwrap().count() == 0
    );
}

#[test]
fn vm_ends_are_reported_with_their_reason_and_nothing_restarts_them() {
    let _serial = serial();
    let ns = namespace("agent-ends");
    let host = Host::add(&unique_name("ends"));
    // The guest computes a sum and powers off: Stopped, not a failure.
    apply(&vm_yaml(&ns, "short", 1, "32Mi", "drover.mode=sum"));
    place(&ns, "short", &host);
    let status = wait_phase(&ns, "short", "Stopped", Duration::from_secs(30));
    assert_eq!(status["lastExit"], "guest powered off", "{status}");
    // A VMM that dies (SIGKILL, as a crash would): Failed, with the reason.
    apply(&vm_yaml(&ns, "crash", 1, "32Mi", "drover.mode=idle"));
    place(&ns, "crash", &host);
    wait_phase(&ns, "crash", "Running", Duration::from_secs(30));
    let uid = uid(&ns, "crash");
    kill_9(vmm_pid(&host, &uid).expect("VMM"));
    let status = wait_phase(&ns, "crash", "Failed", Duration::from_secs(20));
    assert!(status["lastExit"].as_str().unwrap().contains("killed by signal 9"), "{status}");
    let ready = status["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Ready").unwrap().clone();
    assert_eq!(ready["reason"], "VmmExited", "{ready}");
    // The agent does not restart it: that is the operator's decision.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(vm_status(&ns, "crash")["phase"], "Failed");
    assert!(vmm_pid(&host, &uid).is_none());
}

#[test]
fn the_host_policy_sets_the_heartbeat() {
    let _serial = serial();
    control_plane().install_crds();
    let host = Host::add(&unique_name("policy"));
    wait_for("the first Lease", Duration::from_secs(20), || {
        (try_get("drover-system", "lease", host.name())?["spec"]["leaseDurationSeconds"] == 3).then_some(())
    });
    let policy = format!("hb-{}", host.name());
    apply(&format!(
        "apiVersion: drover.dev/v1alpha1\nkind: HostPolicy\nmetadata: {{name: {policy}}}\nspec:\n  nodeSelector: {{matchLabels: {{kubernetes.io/hostname: {}}}}}\n  ha: {{heartbeatIntervalSeconds: 1, failureDetectionSeconds: 5}}\n",
        host.name()
    ));
    wait_for("the Lease to follow the HostPolicy", Duration::from_secs(45), || {
        (get("drover-system", "lease", host.name())["spec"]["leaseDurationSeconds"] == 5).then_some(())
    });
    let node = get("", "node", host.name());
    let facts: Value =
        serde_json::from_str(node["metadata"]["annotations"]["drover.dev/host-facts"].as_str().unwrap()).unwrap();
    assert_eq!(facts["policy"], policy.as_str(), "{facts}");
    assert_eq!(facts["heartbeat"]["leaseDurationSeconds"], 5, "{facts}");
    assert!(host.agent_log().contains("heartbeat timing changed"));
    kubectl(&["delete", "hostpolicy", &policy]);
}
