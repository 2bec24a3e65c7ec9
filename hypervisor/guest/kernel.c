/* Drover's test guest, ring 0: the least a CPU needs before it can run workloads in
 * ring 3: a TSS (its I/O bitmap opens the ports the workloads use; PVM checks it
 * instead of IOPL), an IDT for exceptions and one system call (halt), and, on the
 * BSP, the INIT-SIPI-SIPI that starts the APs through the local APIC. */
#include "guest.h"

struct tss {
    u32 reserved0;
    u64 rsp[3];
    u64 reserved1;
    u64 ist[7];
    u64 reserved2;
    u16 reserved3;
    u16 iomap_base;
    u8 iomap[IOMAP_PORTS / 8 + 1]; /* bit clear = port allowed; last byte all ones */
} __attribute__((packed));

struct idt_gate {
    u16 offset_lo;
    u16 selector;
    u8 ist;
    u8 type_attr;
    u16 offset_mid;
    u32 offset_hi;
    u32 reserved;
} __attribute__((packed));

struct frame {
    u64 vector, error, rip, cs, rflags, rsp, ss;
};

extern u64 gdt_tss[];
extern const u64 isr_table[32];
extern const char tramp_start[], tramp_end[];
void halt_forever(void) __attribute__((noreturn));

u8 kstacks[MAX_CPUS][KSTACK_SIZE] __attribute__((aligned(4096)));
static u8 ustacks[MAX_CPUS][USTACK_SIZE] __attribute__((aligned(4096)));
static struct tss tss[MAX_CPUS] __attribute__((aligned(64)));
static struct idt_gate idt[256] __attribute__((aligned(16)));
static struct hvm_start_info *boot_info;

#define LAPIC_ICR_LO ((volatile u32 *)0xFEE00300)
#define LAPIC_ICR_HI ((volatile u32 *)0xFEE00310)

static void kputs(const char *s) {
    while (*s) outb(COM1, (u8)*s++);
}

static void kput_hex(u64 v) {
    char buf[19] = "0x";
    for (int i = 0; i < 16; i++) buf[2 + i] = "0123456789abcdef"[(v >> (60 - 4 * i)) & 0xf];
    buf[18] = 0;
    kputs(buf);
}

static void set_gate(int vector, u64 handler, u8 dpl) {
    struct idt_gate *g = &idt[vector];
    g->offset_lo = (u16)handler;
    g->selector = KERNEL_CS;
    g->ist = 0;
    g->type_attr = (u8)(0x8E | (dpl << 5)); /* present, 64-bit interrupt gate */
    g->offset_mid = (u16)(handler >> 16);
    g->offset_hi = (u32)(handler >> 32);
    g->reserved = 0;
}

static void load_idt(void) {
    struct {
        u16 limit;
        u64 base;
    } __attribute__((packed)) ptr = {sizeof(idt) - 1, (u64)idt};
    __asm__ volatile("lidt %0" ::"m"(ptr));
}

/* Gives this CPU its TSS and drops to ring 3, never to return. */
struct cpu_facts cpu_facts[MAX_CPUS];

static void cpuid(u32 leaf, u32 sub, u32 *a, u32 *b, u32 *c, u32 *d) {
    __asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(sub));
}

static void __attribute__((noreturn)) enter_user(u32 cpu) {
    /* CPUID from ring 0: under PVM, ring-3 CPUID reports the host's CPU, not ours. */
    u32 a, b, c, d;
    struct cpu_facts *facts = &cpu_facts[cpu];
    cpuid(1, 0, &a, &b, &c, &d);
    facts->apic_id = b >> 24;
    cpuid(0xb, 0, &a, &b, &c, &d);
    facts->threads_per_core = b & 0xffff;
    cpuid(0xb, 1, &a, &b, &c, &d);
    facts->threads_per_package = b & 0xffff;

    struct tss *t = &tss[cpu];
    u64 base = (u64)t, limit = sizeof(*t) - 1;
    t->rsp[0] = (u64)&kstacks[cpu][KSTACK_SIZE];
    t->iomap_base = __builtin_offsetof(struct tss, iomap);
    t->iomap[IOMAP_PORTS / 8] = 0xff;
    /* 64-bit available TSS descriptor (type 9, present). */
    gdt_tss[2 * cpu] = (limit & 0xffff) | ((base & 0xffffff) << 16) | (0x89ULL << 40) | (((limit >> 16) & 0xf) << 48) |
                       (((base >> 24) & 0xff) << 56);
    gdt_tss[2 * cpu + 1] = base >> 32;
    __asm__ volatile("ltr %w0" ::"r"((u16)TSS_SELECTOR(cpu)));
    load_idt();

    u64 ustack_top = (u64)&ustacks[cpu][USTACK_SIZE] - 8; /* as if after a call */
    __asm__ volatile(
        "pushq %[ss]\n\t"
        "pushq %[rsp]\n\t"
        "pushq $0x2\n\t" /* RFLAGS: interrupts off, IOPL 0 */
        "pushq %[cs]\n\t"
        "pushq %[rip]\n\t"
        "iretq" ::[ss] "i"(USER_DS),
        [rsp] "r"(ustack_top), [cs] "i"(USER_CS), [rip] "r"((u64)user_main), "D"((u64)cpu), "S"((u64)boot_info)
        : "memory");
    __builtin_unreachable();
}

void kmain_bsp(u32 start_info) {
    boot_info = (struct hvm_start_info *)(u64)start_info;
    for (int v = 0; v < 32; v++) set_gate(v, isr_table[v], 0);

    /* Start every other CPU: INIT, then SIPI twice (vector = trampoline page). */
    /* One string instruction: ring 0 is emulated under PVM, a byte loop costs ~1 ms. */
    u64 n = (u64)(tramp_end - tramp_start);
    void *dst = (void *)TRAMPOLINE;
    const void *src = tramp_start;
    __asm__ volatile("rep movsb" : "+D"(dst), "+S"(src), "+c"(n)::"memory");
    *LAPIC_ICR_HI = 0;
    *LAPIC_ICR_LO = 0x000C4500; /* INIT, all excluding self */
    *LAPIC_ICR_LO = 0x000C4600 | (TRAMPOLINE >> 12); /* SIPI */
    *LAPIC_ICR_LO = 0x000C4600 | (TRAMPOLINE >> 12);
    enter_user(0);
}

void kmain_ap(u32 cpu) { enter_user(cpu); }

/* Exceptions land here: a halt request from ring 3, or a fault to report. */
void ktrap(struct frame *f, u64 rax) {
    const u8 *insn = (const u8 *)f->rip;
    int ud2 = f->vector == 6 && insn[0] == 0x0f && insn[1] == 0x0b;
    if (ud2 && rax == HALT_REQUEST) halt_forever();
    if (ud2 && rax == TRIPLE_FAULT_REQUEST) {
        /* An exception with no usable IDT: the CPU shuts down. */
        struct {
            u16 limit;
            u64 base;
        } __attribute__((packed)) empty = {0, 0};
        __asm__ volatile("lidt %0; int3" ::"m"(empty));
    }
    print_lock_take();
    kputs("drover-guest: exception ");
    kput_hex(f->vector);
    kputs(" error ");
    kput_hex(f->error);
    kputs(" at ");
    kput_hex(f->rip);
    kputs("\n");
    print_lock_release();
    outb(EXIT_PORT, (u8)(0x80 | f->vector));
    halt_forever();
}
