//! Placement decisions per second on one thread, on clusters of 100, 1,000 and
//! 5,000 hosts holding 10 VMs each (10 % Dedicated, a tenth of the VMs in VM-VM
//! anti-affinity rules of 10, some Preferred affinity pairs), placing 2,000 new
//! VMs of the same mix one after the other (each on the capacity the ones before
//! left). The goal: ≥ 10,000 decisions/s at 1,000 hosts × 10,000 VMs.
//!
//! `cargo bench -p drover-core --bench placement` (`DROVER_BENCH_SHARED_ONLY=1`: no Dedicated VMs)

mod clusters;

use std::time::Instant;

use clusters::{Lcg, cluster};
use drover_core::placement::schedule;
use drover_core::{Cluster, Vm};

fn main() {
    println!("placement decisions on one thread (2,000 new VMs placed one after another)");
    println!("| hosts | VMs held | build view | per decision | decisions/s | placed |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for hosts in [100, 1000, 5000] {
        let mut rng = Lcg(42);
        let (snapshot, new) = cluster(hosts, 2000, &mut rng);
        let built = Instant::now();
        let mut c = Cluster::new(&snapshot);
        let build = built.elapsed();
        let refs: Vec<&Vm> = new.iter().collect();
        let started = Instant::now();
        let results = schedule(&mut c, &refs);
        let took = started.elapsed();
        let placed = results.iter().filter(|r| r.is_ok()).count();
        let per = took / refs.len() as u32;
        println!(
            "| {hosts} | {} | {:.1} ms | {:.1} µs | {:.0} | {placed}/{} |",
            snapshot.vms.len(),
            build.as_secs_f64() * 1e3,
            per.as_secs_f64() * 1e6,
            refs.len() as f64 / took.as_secs_f64(),
            refs.len()
        );
    }
}
