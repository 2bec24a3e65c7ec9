/* Drover's test guest: shared definitions of the ring-0 part (start.S, kernel.c)
 * and the ring-3 workloads (user.c). Freestanding x86-64, no libc. */
#ifndef DROVER_GUEST_H
#define DROVER_GUEST_H

#define KERNEL_CS 0x08
#define KERNEL_DS 0x10
#define KERNEL32_CS 0x18
#define USER_DS (0x20 | 3)
#define USER_CS (0x28 | 3)
#define TSS_SELECTOR(cpu) (0x30 + 16 * (cpu))

#define MAX_CPUS 256
#define KSTACK_SIZE 4096
#define USTACK_SIZE 8192
/* Where the BSP copies the AP start-up code; the SIPI vector is its page number. */
#define TRAMPOLINE 0x8000

/* Ports. The TSS I/O bitmap lets ring 3 use every port below IOMAP_PORTS. */
#define COM1 0x3f8
#define EXIT_PORT 0x501 /* QEMU's isa-debug-exit and Drover's exit device */
#define I8042_DATA 0x60
#define I8042_CMD 0x64 /* written: a controller command; read: the status */
#define I8042_STATUS 0x64
#define IOMAP_PORTS 0x600

/* Ring 3 asks ring 0 to halt its CPU with `ud2` and this value in %rax. Neither
 * `int n` nor `syscall` from ring 3 reaches ring 0 under PVM (the first raises #UD,
 * the second stays at CPL 3), but exceptions are delivered through the IDT. */
#define HALT_REQUEST 0x68616c74 /* "halt" */
/* The same way, ring 3 asks for a triple fault (to test the VMM's fault handling). */
#define TRIPLE_FAULT_REQUEST 0x74726970 /* "trip" */

#ifndef __ASSEMBLER__
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

/* The PVH start_info structure (xen/include/public/arch-x86/hvm/start_info.h). */
struct hvm_start_info {
    u32 magic;
    u32 version;
    u32 flags;
    u32 nr_modules;
    u64 modlist_paddr;
    u64 cmdline_paddr;
    u64 rsdp_paddr;
    u64 memmap_paddr;
    u32 memmap_entries;
    u32 reserved;
};

struct hvm_memmap_entry {
    u64 addr;
    u64 size;
    u32 type;
    u32 reserved;
};

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) {
    u8 v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}
static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }
static inline u64 rdtsc(void) {
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}

/* What ring 0 learned about each CPU (CPUID), for the workloads to report. */
struct cpu_facts {
    u32 apic_id;
    u32 threads_per_core;
    u32 threads_per_package;
};
extern struct cpu_facts cpu_facts[MAX_CPUS];

void user_main(u32 cpu, struct hvm_start_info *info) __attribute__((noreturn));
/* Serialises serial output between CPUs and privilege levels. */
extern volatile u32 print_lock;
static inline void print_lock_take(void) {
    while (__atomic_exchange_n(&print_lock, 1, __ATOMIC_ACQUIRE)) cpu_relax();
}
static inline void print_lock_release(void) { __atomic_store_n(&print_lock, 0, __ATOMIC_RELEASE); }

/* user.c: helpers every ring-3 workload uses. */
void lock(void);
void unlock(void);
void puts_(const char *s);
void put_dec(u64 v);
void put_hex(u64 v);
void guest_exit(u8 status) __attribute__((noreturn));
void halt_this_cpu(void) __attribute__((noreturn));
void barrier(u32 ncpus);
u64 splitmix64(u64 x);
const char *param(struct hvm_start_info *info, const char *key);
u64 param_u64(struct hvm_start_info *info, const char *key, u64 dflt);
/* Prints "drover-guest: <what>" and ends the VM with exit status `status`. */
void fail(const char *what, u8 status) __attribute__((noreturn));

/* virtio.c: a polling virtio-mmio (version 2) driver. */
struct virtio_dev {
    volatile u8 *regs;
    u64 base;
    u32 irq;
};
struct virtq {
    struct virtio_dev *dev;
    u32 index;
    u16 size;
    u16 avail_idx; /* the next free slot of the available ring */
    u16 last_used; /* the next used entry to read */
    volatile struct vring_desc *desc;
    volatile struct vring_avail *avail;
    volatile struct vring_used *used;
};
struct vring_desc {
    u64 addr;
    u32 len;
    u16 flags;
    u16 next;
};
#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2
struct vring_avail {
    u16 flags;
    u16 idx;
    u16 ring[];
};
struct vring_used_elem {
    u32 id;
    u32 len;
};
struct vring_used {
    u16 flags;
    u16 idx;
    struct vring_used_elem ring[];
};
#define VIRTIO_ID_NET 1
#define VIRTIO_ID_BLOCK 2
/* Guest-physical memory the drivers own (below it: the image, stacks, page tables;
 * the `digest` and `dirty` workloads use 32 MiB and up). */
#define VIRTQ_AREA (16ULL << 20)   /* 64 KiB per queue, 8 queues */
#define VIRTQ_AREA_SIZE (64ULL << 10)
#define DRIVER_AREA (17ULL << 20) /* buffers, up to 32 MiB */

/* Finds the nth (from 0) virtio device with this ID among those the command line
 * announces (virtio_mmio.device=<size>@<base>:<irq>); 0 if there is none. */
int virtio_find(struct hvm_start_info *info, u32 device_id, u32 nth, struct virtio_dev *dev);
/* Resets the device and negotiates VIRTIO_F_VERSION_1 plus the wanted low 32
 * feature bits the device offers; returns those, or stops the VM on a refusal. */
u32 virtio_init(struct virtio_dev *dev, u32 wanted);
/* Sets up queue `index` with at most `size` entries, its rings in area `slot`. */
void virtq_init(struct virtio_dev *dev, struct virtq *q, u32 index, u16 size, u32 slot);
/* DRIVER_OK: the device may use the queues now. */
void virtio_ready(struct virtio_dev *dev);
u32 virtio_config32(struct virtio_dev *dev, u32 offset);
u8 virtio_config8(struct virtio_dev *dev, u32 offset);
/* Makes the chain at `head` available (no notification yet). */
void virtq_push(struct virtq *q, u16 head);
/* Notifies the device of what was pushed, unless it asked not to be. */
void virtq_kick(struct virtq *q);
/* The next used chain: its head in *id and the bytes written in *len; 0 if none. */
int virtq_pop(struct virtq *q, u32 *id, u32 *len);

void disk_main(u32 cpu, u32 ncpus, struct hvm_start_info *info) __attribute__((noreturn));
void blkbench_main(u32 cpu, struct hvm_start_info *info) __attribute__((noreturn));
void net_main(u32 cpu, struct hvm_start_info *info) __attribute__((noreturn));
#endif
#endif
