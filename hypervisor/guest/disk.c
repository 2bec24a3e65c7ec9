/* Drover's test guest, ring 3: the virtio-blk workloads.
 *
 * disk: every CPU, over drover.rounds rounds, reads each of its blocks (4 KiB,
 * block b belongs to CPU b mod ncpus), changes every word from the round, the
 * block number and its old value, and writes it back; then CPU 0 flushes, reads
 * the whole disk (or its first drover.blocks blocks) and prints a digest of it.
 * A block's new contents depend only on its old ones, so the digest is the same
 * for any number of CPUs, and a host can compute it (and the image's bytes) from
 * the image it started with.
 *
 * blkbench: CPU 0 keeps drover.qd requests (default 1) of drover.bs bytes
 * (default 4096) in flight until drover.ops (default 10000) are done: reads, or
 * writes with drover.op=write, at random block-aligned offsets, or in order with
 * drover.seq=1. It prints "blk start" and "blk end" around them: the host times
 * the lines. */
#include "guest.h"

#define BLK_T_IN 0
#define BLK_T_OUT 1
#define BLK_T_FLUSH 4
#define BLK_F_RO (1u << 5)
#define BLK_F_FLUSH (1u << 9)
#define BLOCK 4096
#define WORDS (BLOCK / 8)
#define MAX_QD 64
/* Data buffers of the benchmark: up to MAX_QD of 1 MiB from here. */
#define BENCH_DATA (32ULL << 20)

struct blk_header {
    u32 type;
    u32 reserved;
    u64 sector;
};

/* A request's header, status byte and (for the disk workload) data block. */
struct slot {
    struct blk_header header;
    u8 pad[48];
    volatile u8 status;
    u8 pad2[BLOCK - 65];
    u64 data[WORDS];
};

static struct virtio_dev blk;
static struct virtq q;
static u32 features;
static u64 capacity; /* in 512-byte sectors */
static volatile u32 ready, queue_lock;

static struct slot *slot_of(u32 n) { return (struct slot *)(DRIVER_AREA + (u64)n * sizeof(struct slot)); }

static void setup(struct hvm_start_info *info) {
    if (!virtio_find(info, VIRTIO_ID_BLOCK, 0, &blk)) fail("disk: no virtio block device", 3);
    features = virtio_init(&blk, BLK_F_RO | BLK_F_FLUSH);
    virtq_init(&blk, &q, 0, 256, 0);
    virtio_ready(&blk);
    capacity = virtio_config32(&blk, 0) | ((u64)virtio_config32(&blk, 4) << 32);
}

/* Descriptors 3n..3n+2 belong to slot n: header, data (if any), status. */
static void queue_request(u32 n, u32 type, u64 sector, u64 data, u32 len) {
    struct slot *s = slot_of(n);
    s->header.type = type;
    s->header.reserved = 0;
    s->header.sector = sector;
    s->status = 0xff;
    u16 d = (u16)(3 * n);
    q.desc[d].addr = (u64)&s->header;
    q.desc[d].len = sizeof(s->header);
    q.desc[d].flags = VRING_DESC_F_NEXT;
    q.desc[d].next = (u16)(d + (len ? 1 : 2));
    if (len) {
        q.desc[d + 1].addr = data;
        q.desc[d + 1].len = len;
        q.desc[d + 1].flags = VRING_DESC_F_NEXT | (type == BLK_T_IN ? VRING_DESC_F_WRITE : 0);
        q.desc[d + 1].next = (u16)(d + 2);
    }
    q.desc[d + 2].addr = (u64)&s->status;
    q.desc[d + 2].len = 1;
    q.desc[d + 2].flags = VRING_DESC_F_WRITE;
    q.desc[d + 2].next = 0;
    virtq_push(&q, d);
}

/* One request at a time across CPUs: the queue is shared, and the caller holding
 * the lock knows the one used entry is its own. Returns the virtio status. */
static u8 request(u32 cpu, u32 type, u64 sector, u64 data, u32 len) {
    while (__atomic_exchange_n(&queue_lock, 1, __ATOMIC_ACQUIRE)) cpu_relax();
    queue_request(cpu, type, sector, data, len);
    virtq_kick(&q);
    u32 id, used_len;
    while (!virtq_pop(&q, &id, &used_len)) cpu_relax();
    u8 status = slot_of(cpu)->status;
    __atomic_store_n(&queue_lock, 0, __ATOMIC_RELEASE);
    if (id != 3 * cpu) fail("disk: the device used a request nobody made", 4);
    return status;
}

static void check(u8 status, const char *what) {
    if (status != 0) fail(what, 5);
}

void disk_main(u32 cpu, u32 ncpus, struct hvm_start_info *info) {
    if (ncpus > MAX_QD) fail("disk: too many cpus for one queue", 3);
    if (cpu == 0) {
        setup(info);
        /* Past the end must be an error the guest sees, not a crash of the VMM. */
        u8 past_end = request(0, BLK_T_IN, capacity, (u64)slot_of(0)->data, BLOCK);
        lock();
        puts_("drover-guest: disk of ");
        put_dec(capacity);
        puts_(" sectors");
        puts_(features & BLK_F_RO ? ", read-only" : "");
        puts_(", read past its end: status ");
        put_dec(past_end);
        puts_("\n");
        unlock();
        __atomic_store_n(&ready, 1, __ATOMIC_RELEASE);
    }
    while (!__atomic_load_n(&ready, __ATOMIC_ACQUIRE)) cpu_relax();

    u64 blocks = capacity / (BLOCK / 512);
    u64 limit = param_u64(info, "drover.blocks=", blocks);
    if (limit < blocks) blocks = limit;
    u64 rounds = param_u64(info, "drover.rounds=", 10);
    u64 *w = slot_of(cpu)->data;
    for (u64 r = 0; r < rounds; r++) {
        for (u64 b = cpu; b < blocks; b += ncpus) {
            check(request(cpu, BLK_T_IN, b * 8, (u64)w, BLOCK), "disk: a read failed");
            for (u64 i = 0; i < WORDS; i++) w[i] = splitmix64(w[i] ^ (r * 0x100000001b3ULL + b * WORDS + i));
            check(request(cpu, BLK_T_OUT, b * 8, (u64)w, BLOCK), "disk: a write failed");
        }
        barrier(ncpus);
        if (cpu == 0) {
            lock();
            puts_("drover-guest: round ");
            put_dec(r + 1);
            puts_("\n");
            unlock();
        }
    }
    if (cpu != 0) halt_this_cpu();
    if (features & BLK_F_FLUSH) check(request(0, BLK_T_FLUSH, 0, 0, 0), "disk: the flush failed");
    u64 digest = 0;
    for (u64 b = 0; b < blocks; b++) {
        check(request(0, BLK_T_IN, b * 8, (u64)w, BLOCK), "disk: a read failed");
        for (u64 i = 0; i < WORDS; i++) digest = splitmix64(digest ^ w[i]);
    }
    lock();
    puts_("drover-guest: disk digest ");
    put_hex(digest);
    puts_(" over ");
    put_dec(blocks);
    puts_(" blocks\ndrover-guest: done\n");
    unlock();
    guest_exit(0);
}

void blkbench_main(u32 cpu, struct hvm_start_info *info) {
    if (cpu != 0) halt_this_cpu();
    setup(info);
    const char *op = param(info, "drover.op=");
    u32 type = op && op[0] == 'w' ? BLK_T_OUT : BLK_T_IN;
    u64 seq = param_u64(info, "drover.seq=", 0);
    u64 bs = param_u64(info, "drover.bs=", BLOCK);
    u64 qd = param_u64(info, "drover.qd=", 1);
    u64 ops = param_u64(info, "drover.ops=", 10000);
    if (qd < 1 || qd > MAX_QD) fail("blkbench: drover.qd must be 1 to 64", 3);
    if (bs < 512 || bs % 512 || bs > (1 << 20)) fail("blkbench: drover.bs must be a multiple of 512 up to 1 MiB", 3);
    u64 units = capacity * 512 / bs, next = 0, seed = 1;
    if (units == 0) fail("blkbench: the disk is smaller than one request", 3);
    for (u64 i = 0; i < qd * bs / 8; i++) ((u64 *)BENCH_DATA)[i] = splitmix64(i);

    lock();
    puts_("drover-guest: blk start\n");
    unlock();
    u64 submitted = 0, completed = 0;
    for (u32 n = 0; n < qd && submitted < ops; n++, submitted++) {
        u64 unit = seq ? next++ % units : splitmix64(seed++) % units;
        queue_request(n, type, unit * (bs / 512), BENCH_DATA + n * bs, (u32)bs);
    }
    virtq_kick(&q);
    while (completed < ops) {
        u32 id, len, again = 0;
        while (virtq_pop(&q, &id, &len)) {
            u32 n = id / 3;
            check(slot_of(n)->status, "blkbench: a request failed");
            completed++;
            if (submitted < ops) {
                u64 unit = seq ? next++ % units : splitmix64(seed++) % units;
                queue_request(n, type, unit * (bs / 512), BENCH_DATA + n * bs, (u32)bs);
                submitted++;
                again = 1;
            }
        }
        if (again) virtq_kick(&q);
        else cpu_relax();
    }
    lock();
    puts_("drover-guest: blk end ");
    put_dec(completed);
    puts_("\n");
    unlock();
    guest_exit(0);
}
