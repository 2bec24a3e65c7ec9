/* Drover's test guest, ring 3: the workloads. They run at native speed even under
 * PVM, print through the serial port (COM1) and end the VM through the exit port.
 *
 * Every CPU reports in, learns how many CPUs there are (ACPI MADT, else the command
 * line's drover.cpus=N), waits for all of them, and runs the workload chosen by
 * drover.mode= on the command line:
 *   sum (default)  each CPU sums splitmix64(i) over its share of i < drover.work
 *                  (default 2^20); CPU 0 prints the total and exits with status 0.
 *   spin           every CPU spins; CPU 0 prints a tick about every 2^29 TSC cycles
 *                  and, about every 2^22 (a millisecond or so), looks for Ctrl+Alt+Del
 *                  on the i8042 keyboard (the VMM's request to shut down): it then
 *                  says so and powers off cleanly (exit status 0).
 *   idle           CPU 0 says "idle" and every CPU halts: a VM that runs and costs
 *                  the host no CPU (examples, agent tests). It ignores Ctrl+Alt+Del,
 *                  as a guest without a keyboard driver would (a halted CPU polls
 *                  nothing, and ring 0 takes no interrupts).
 *   reset          CPU 0 asks the i8042 controller for a CPU reset.
 *   fault          CPU 0 executes hlt in ring 3 (#GP), which ends the VM through
 *                  the exception handler.
 *   triple-fault   CPU 0 has ring 0 raise an exception with no IDT.
 *   digest         drover.rounds (default 100) rounds over a buffer of drover.mem MiB
 *                  (default 64) at 32 MiB: in each round every CPU rewrites its share
 *                  of the buffer from the round number and the previous contents,
 *                  then all wait for each other. CPU 0 prints each round, then a
 *                  digest of the buffer that depends on every byte of every round,
 *                  and the largest TSC gap between two rounds (a clock that jumped
 *                  shows here). Migrating the VM mid-run must not change the digest.
 *   dirty          every CPU rewrites its share of drover.mem MiB at 32 MiB over and
 *                  over, at about drover.rate MiB/s in all (0: as fast as it can),
 *                  printing nothing; for migration benchmarks. With drover.once=1
 *                  it writes the buffer once, says "filled", and every CPU halts
 *                  (drover.mem=0 drover.once=1: an idle guest).
 *   pio            CPU 0 writes drover.pio (default 100000) times to port 0x80,
 *                  between two lines, so a benchmark can time port-I/O exits.
 *   disk, blkbench the virtio-blk workloads (disk.c): a read-modify-write of every
 *                  block over drover.rounds rounds then a digest of the disk; and a
 *                  benchmark of drover.qd requests of drover.bs bytes in flight.
 *   net            CPU 0 answers ARP and ICMP echo for drover.ip= on the first
 *                  virtio-net device (net.c).
 * virtio.c is their driver: virtio-mmio devices found on the command line, polled.
 * Exit port values: 0 success, 1..0x7f workload failure, 0x80 + vector exception. */
#include "guest.h"

volatile u32 print_lock;
static volatile u32 arrived;
static volatile u32 finished;
static volatile u64 total;
static volatile u32 barrier_count, barrier_generation;

/* All ncpus CPUs wait here until every one has arrived. */
void barrier(u32 ncpus) {
    u32 gen = __atomic_load_n(&barrier_generation, __ATOMIC_ACQUIRE);
    if (__atomic_add_fetch(&barrier_count, 1, __ATOMIC_ACQ_REL) == ncpus) {
        __atomic_store_n(&barrier_count, 0, __ATOMIC_RELAXED);
        __atomic_add_fetch(&barrier_generation, 1, __ATOMIC_RELEASE);
    } else {
        while (__atomic_load_n(&barrier_generation, __ATOMIC_ACQUIRE) == gen) cpu_relax();
    }
}

void lock(void) { print_lock_take(); }
void unlock(void) { print_lock_release(); }

void puts_(const char *s) {
    while (*s) outb(COM1, (u8)*s++);
}

void put_dec(u64 v) {
    char buf[21];
    int i = 20;
    buf[i] = 0;
    do buf[--i] = (char)('0' + v % 10); while ((v /= 10) && i > 0);
    puts_(&buf[i]);
}

void put_hex(u64 v) {
    char buf[17];
    for (int i = 0; i < 16; i++) buf[i] = "0123456789abcdef"[(v >> (60 - 4 * i)) & 0xf];
    buf[16] = 0;
    puts_(buf);
}

void guest_exit(u8 status) {
    outb(EXIT_PORT, status);
    for (;;) cpu_relax(); /* the VMM ends the VM; never reached on a working one */
}

void fail(const char *what, u8 status) {
    lock();
    puts_("drover-guest: ");
    puts_(what);
    puts_("\n");
    unlock();
    guest_exit(status);
}

void halt_this_cpu(void) {
    __asm__ volatile("ud2" ::"a"((u64)HALT_REQUEST) : "memory");
    __builtin_unreachable();
}

/* Scan code set 2 as the VMM's keyboard types it (no translation: the controller
 * command byte is left as the VMM starts it). Ctrl and Alt are tracked, left or
 * right (0xe0-prefixed), and a Delete press with both held (0xe0 0x71, or the
 * keypad's 0x71, as Linux counts it) powers the VM off cleanly. Each status read
 * is a VM exit: callers poll it about every millisecond, from ring 3. */
static void check_ctrl_alt_del(void) {
    static u8 ctrl, alt, released;
    while (inb(I8042_STATUS) & 1) {
        u8 code = inb(I8042_DATA);
        if (code == 0xe0) continue; /* extended key: the same codes follow */
        if (code == 0xf0) {
            released = 1;
            continue;
        }
        u8 down = !released;
        released = 0;
        if (code == 0x14) ctrl = down;
        if (code == 0x11) alt = down;
        if (code == 0x71 && down && ctrl && alt) {
            lock();
            puts_("drover-guest: ctrl-alt-del, powering off\n");
            unlock();
            guest_exit(0);
        }
    }
}

static int starts_with(const char *s, const char *prefix) {
    while (*prefix)
        if (*s++ != *prefix++) return 0;
    return 1;
}

/* The value of `key` (e.g. "drover.mode=") on the command line, or 0. */
const char *param(struct hvm_start_info *info, const char *key) {
    const char *s = info->cmdline_paddr ? (const char *)info->cmdline_paddr : "";
    for (; *s; s++)
        if ((s == (const char *)info->cmdline_paddr || s[-1] == ' ') && starts_with(s, key)) {
            while (*s != '=') s++;
            return s + 1;
        }
    return 0;
}

u64 param_u64(struct hvm_start_info *info, const char *key, u64 dflt) {
    const char *v = param(info, key);
    if (!v || *v < '0' || *v > '9') return dflt;
    u64 n = 0;
    while (*v >= '0' && *v <= '9') n = n * 10 + (u64)(*v++ - '0');
    return n;
}

static int mode_is(struct hvm_start_info *info, const char *mode) {
    const char *v = param(info, "drover.mode=");
    if (!v) return starts_with("sum", mode) && mode[3] == 0;
    while (*mode)
        if (*v++ != *mode++) return 0;
    return *v == 0 || *v == ' ';
}

static int sig_is(const u8 *p, const char *sig) {
    for (int i = 0; i < 4; i++)
        if (p[i] != (u8)sig[i]) return 0;
    return 1;
}

/* Enabled local APICs in the ACPI MADT, as an OS counts its CPUs; 0 without ACPI. */
static u32 cpus_from_madt(struct hvm_start_info *info) {
    if (info->version < 1 || !info->rsdp_paddr) return 0;
    const u8 *rsdp = (const u8 *)info->rsdp_paddr;
    int xsdt = rsdp[15] >= 2 && *(const u64 *)(rsdp + 24);
    const u8 *sdt = xsdt ? (const u8 *)*(const u64 *)(rsdp + 24) : (const u8 *)(u64) * (const u32 *)(rsdp + 16);
    u32 entries = (*(const u32 *)(sdt + 4) - 36) / (xsdt ? 8 : 4);
    for (u32 i = 0; i < entries; i++) {
        const u8 *table = xsdt ? (const u8 *)*(const u64 *)(sdt + 36 + 8 * i) : (const u8 *)(u64) * (const u32 *)(sdt + 36 + 4 * i);
        if (!sig_is(table, "APIC")) continue;
        u32 len = *(const u32 *)(table + 4), count = 0;
        for (const u8 *e = table + 44; e + 2 <= table + len && e[1]; e += e[1]) {
            if (e[0] == 0 && (*(const u32 *)(e + 4) & 1)) count++;  /* local APIC */
            if (e[0] == 9 && (*(const u32 *)(e + 8) & 1)) count++;  /* local x2APIC */
        }
        return count;
    }
    return 0;
}

u64 splitmix64(u64 x) {
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

void user_main(u32 cpu, struct hvm_start_info *info) {
    u32 apic_id = cpu_facts[cpu].apic_id;
    u32 ncpus = cpus_from_madt(info);
    if (!ncpus) ncpus = (u32)param_u64(info, "drover.cpus=", 1);

    lock();
    puts_("drover-guest: cpu ");
    put_dec(cpu);
    puts_(" up, apic id ");
    put_dec(apic_id);
    puts_("\n");
    if (cpu == 0) {
        puts_("drover-guest: ");
        put_dec(ncpus);
        puts_(" cpus, cpuid topology: ");
        put_dec(cpu_facts[0].threads_per_core);
        puts_(" threads/core, ");
        put_dec(cpu_facts[0].threads_per_package);
        puts_(" threads/package\n");
    }
    unlock();

    __atomic_add_fetch(&arrived, 1, __ATOMIC_SEQ_CST);
    u64 deadline = rdtsc() + (120ULL << 30); /* ~1 minute at 2 GHz; the wait is normally milliseconds */
    while (__atomic_load_n(&arrived, __ATOMIC_SEQ_CST) < ncpus) {
        if (rdtsc() > deadline) {
            if (cpu == 0) {
                lock();
                puts_("drover-guest: only ");
                put_dec(arrived);
                puts_(" of ");
                put_dec(ncpus);
                puts_(" cpus came up\n");
                unlock();
                guest_exit(2);
            }
            halt_this_cpu();
        }
        cpu_relax();
    }
    if (cpu == 0) {
        lock();
        puts_("drover-guest: all cpus up\n");
        unlock();
    }

    if (mode_is(info, "spin")) {
        u64 next = rdtsc(), ticks = 0, poll = next;
        for (;;) {
            if (cpu == 0 && rdtsc() >= poll) {
                poll = rdtsc() + (1ULL << 22);
                check_ctrl_alt_del();
            }
            if (cpu == 0 && rdtsc() >= next) {
                next = rdtsc() + (1ULL << 29);
                lock();
                puts_("drover-guest: tick ");
                put_dec(ticks++);
                puts_("\n");
                unlock();
            }
            cpu_relax();
        }
    }
    if (mode_is(info, "idle")) {
        if (cpu == 0) {
            lock();
            puts_("drover-guest: idle\n");
            unlock();
        }
        halt_this_cpu();
    }
    if (mode_is(info, "reset")) {
        if (cpu == 0) outb(I8042_CMD, 0xfe);
        halt_this_cpu();
    }
    if (mode_is(info, "triple-fault")) {
        if (cpu == 0) __asm__ volatile("ud2" ::"a"((u64)TRIPLE_FAULT_REQUEST) : "memory");
        halt_this_cpu();
    }
    if (mode_is(info, "fault")) {
        if (cpu == 0) __asm__ volatile("hlt");
        halt_this_cpu();
    }
    if (mode_is(info, "digest")) {
        u64 *buf = (u64 *)(32ULL << 20);
        u64 words = param_u64(info, "drover.mem=", 64) << 17; /* MiB -> 8-byte words */
        u64 rounds = param_u64(info, "drover.rounds=", 100);
        u64 per_cpu = (words + ncpus - 1) / ncpus, first = cpu * per_cpu;
        u64 last = first + per_cpu > words ? words : first + per_cpu;
        u64 max_gap = 0, prev = rdtsc();
        for (u64 r = 0; r < rounds; r++) {
            for (u64 i = first; i < last; i++) buf[i] = splitmix64(buf[i] ^ (r * 0x100000001b3ULL + i));
            barrier(ncpus);
            if (cpu == 0) {
                u64 now = rdtsc();
                /* Round 1 touches fresh memory and is slow; gaps count from round 2. */
                if (r > 0 && now - prev > max_gap) max_gap = now - prev;
                prev = now;
                lock();
                puts_("drover-guest: round ");
                put_dec(r + 1);
                puts_("\n");
                unlock();
            }
        }
        if (cpu != 0) halt_this_cpu();
        u64 digest = 0;
        for (u64 i = 0; i < words; i++) digest = splitmix64(digest ^ buf[i]);
        lock();
        puts_("drover-guest: digest ");
        put_hex(digest);
        puts_(" max-round-gap-cycles ");
        put_dec(max_gap);
        puts_("\ndrover-guest: done\n");
        unlock();
        guest_exit(0);
    }
    if (mode_is(info, "dirty")) {
        u64 *buf = (u64 *)(32ULL << 20);
        u64 pages = param_u64(info, "drover.mem=", 64) << 8;
        u64 rate = param_u64(info, "drover.rate=", 0); /* MiB/s for the whole VM */
        u64 once = param_u64(info, "drover.once=", 0);
        u64 per_cpu = (pages + ncpus - 1) / ncpus, first = cpu * per_cpu;
        u64 last = first + per_cpu > pages ? pages : first + per_cpu;
        /* Pace with the TSC: calibrate cycles per ms against the PIT is not
         * available in ring 3; drover.tsc_khz (default 2500000) says the rate. */
        u64 khz = param_u64(info, "drover.tsc_khz=", 2500000);
        u64 cycles_per_page = rate ? khz * 1000 / (rate * 256 / ncpus) : 0;
        u64 next = rdtsc(), round = 0;
        if (cpu == 0) {
            lock();
            puts_("drover-guest: dirtying\n");
            unlock();
        }
        for (;;) {
            for (u64 p = first; p < last; p++) {
                buf[p * 512] = splitmix64(p ^ round);
                buf[p * 512 + 511] = round;
                if (cycles_per_page) {
                    next += cycles_per_page;
                    while (rdtsc() < next) cpu_relax();
                }
            }
            round++;
            if (once) {
                barrier(ncpus);
                if (cpu == 0) {
                    lock();
                    puts_("drover-guest: filled\n");
                    unlock();
                }
                halt_this_cpu();
            }
        }
    }
    if (mode_is(info, "disk")) disk_main(cpu, ncpus, info);
    if (mode_is(info, "blkbench")) blkbench_main(cpu, info);
    if (mode_is(info, "net")) net_main(cpu, info);
    if (mode_is(info, "pio")) {
        if (cpu != 0) halt_this_cpu();
        u64 n = param_u64(info, "drover.pio=", 100000);
        puts_("drover-guest: pio start\n");
        for (u64 i = 0; i < n; i++) outb(0x80, (u8)i);
        puts_("drover-guest: pio end\n");
        guest_exit(0);
    }
    if (!mode_is(info, "sum")) {
        if (cpu == 0) {
            puts_("drover-guest: unknown drover.mode\n");
            guest_exit(1);
        }
        halt_this_cpu();
    }

    u64 work = param_u64(info, "drover.work=", 1 << 20), sum = 0;
    for (u64 i = cpu; i < work; i += ncpus) sum += splitmix64(i);
    __atomic_add_fetch(&total, sum, __ATOMIC_SEQ_CST);
    __atomic_add_fetch(&finished, 1, __ATOMIC_SEQ_CST);
    if (cpu != 0) halt_this_cpu();
    while (__atomic_load_n(&finished, __ATOMIC_SEQ_CST) < ncpus) cpu_relax();
    lock();
    puts_("drover-guest: sum ");
    put_hex(total);
    puts_(" over ");
    put_dec(work);
    puts_(" on ");
    put_dec(ncpus);
    puts_(" cpus\ndrover-guest: done\n");
    unlock();
    guest_exit(0);
}
