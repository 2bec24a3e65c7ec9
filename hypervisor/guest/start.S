/* Drover's test guest: entry points, AP start-up trampoline, page tables, GDT and
 * exception stubs. Everything that must be assembly is here; the rest is C.
 *
 * Entry: the PVH boot protocol (32-bit protected mode, paging off, %ebx = start_info),
 * as QEMU and Drover's VMM both implement it. We switch to long mode with static
 * page tables (identity map of the first 64 GiB, 2 MiB pages, user-accessible so that
 * ring-3 workloads can touch all of memory) and call into C. Ring-0 code is kept
 * short on purpose: under PVM it is emulated (~1000x slower than ring 3). */
#include "guest.h"

/* PVH ELF note: XEN_ELFNOTE_PHYS32_ENTRY (18), name "Xen", the 32-bit entry point. */
    .section .note.pvh, "a"
    .p2align 2
    .long 4, 4, 18
    .asciz "Xen"
    .long pvh_start32

.macro ENABLE_LONG_MODE
    mov %cr4, %eax
    or $0x620, %eax          /* PAE | OSFXSR | OSXMMEXCPT */
    mov %eax, %cr4
    mov $pml4, %eax
    mov %eax, %cr3
    mov $0xC0000080, %ecx    /* EFER */
    rdmsr
    or $0x100, %eax          /* LME */
    wrmsr
    mov %cr0, %eax
    or $0x80000001, %eax     /* PG | PE */
    and $0x9FFFFFFF, %eax    /* caches on: clear CD, NW */
    mov %eax, %cr0
.endm

.macro LOAD_KERNEL_DATA_SEGMENTS
    mov $KERNEL_DS, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    mov %eax, %fs
    mov %eax, %gs
.endm

    .section .text.boot, "ax"
    .code32
    .globl pvh_start32
pvh_start32:
    cli
    mov %ebx, %esi
    lgdt gdt_ptr
    LOAD_KERNEL_DATA_SEGMENTS
    ENABLE_LONG_MODE
    ljmp $KERNEL_CS, $bsp_start64

    .code64
bsp_start64:
    LOAD_KERNEL_DATA_SEGMENTS
    lea kstacks+KSTACK_SIZE(%rip), %rsp
    mov %esi, %edi           /* start_info, zero-extended */
    call kmain_bsp
    jmp halt_forever

    .globl ap_start64
ap_start64:
    LOAD_KERNEL_DATA_SEGMENTS
    mov $1, %eax
    lock xadd %eax, next_cpu(%rip)   /* this CPU's index: 1, 2, ... in arrival order */
    cmp $MAX_CPUS, %eax
    jae halt_forever
    mov %eax, %edi
    lea 1(%rax), %rax
    shl $12, %rax                     /* KSTACK_SIZE == 4096 */
    lea kstacks(%rip), %rsp
    add %rax, %rsp
    call kmain_ap

    .globl halt_forever
halt_forever:
    cli
    hlt
    jmp halt_forever

/* AP start-up code, copied to TRAMPOLINE by the BSP: real mode -> protected mode ->
 * long mode -> ap_start64. Addresses inside it are computed relative to TRAMPOLINE. */
#define TRAMP(x) ((x) - tramp_start + TRAMPOLINE)
    .code16
    .globl tramp_start, tramp_end
tramp_start:
    cli
    xor %ax, %ax
    mov %ax, %ds
    lgdtl TRAMP(tramp_gdt_ptr)
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0
    ljmpl $KERNEL32_CS, $TRAMP(tramp32)
    .code32
tramp32:
    LOAD_KERNEL_DATA_SEGMENTS
    ENABLE_LONG_MODE
    ljmp $KERNEL_CS, $ap_start64
    .p2align 3
tramp_gdt_ptr:
    .word gdt_end - gdt - 1
    .long gdt
tramp_end:

/* Exception and system-call stubs: push a uniform frame and call into C. */
    .code64
    .text
.macro ISR vec, has_error
isr\vec:
    .if \has_error == 0
    push $0
    .endif
    push $\vec
    jmp isr_common
.endm
    ISR 0,0; ISR 1,0; ISR 2,0; ISR 3,0; ISR 4,0; ISR 5,0; ISR 6,0; ISR 7,0
    ISR 8,1; ISR 9,0; ISR 10,1; ISR 11,1; ISR 12,1; ISR 13,1; ISR 14,1; ISR 15,0
    ISR 16,0; ISR 17,1; ISR 18,0; ISR 19,0; ISR 20,0; ISR 21,1; ISR 22,0; ISR 23,0
    ISR 24,0; ISR 25,0; ISR 26,0; ISR 27,0; ISR 28,0; ISR 29,1; ISR 30,1; ISR 31,0
isr_common:
    mov %rsp, %rdi           /* struct frame: vector, error, rip, cs, rflags, rsp, ss */
    mov %rax, %rsi           /* HALT_REQUEST with ud2 */
    call ktrap
    jmp halt_forever

    .section .rodata
    .p2align 3
    .globl isr_table
isr_table:
    .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .quad isr\v
    .endr

/* GDT: fixed segments, then one 16-byte TSS descriptor per CPU (filled in by each CPU). */
    .data
    .p2align 4
    .globl gdt, gdt_tss
gdt:
    .quad 0
    .quad 0x00AF9A000000FFFF /* 0x08 kernel code, 64-bit */
    .quad 0x00CF92000000FFFF /* 0x10 kernel data */
    .quad 0x00CF9A000000FFFF /* 0x18 kernel code, 32-bit (AP trampoline) */
    .quad 0x00CFF2000000FFFF /* 0x20 user data */
    .quad 0x00AFFA000000FFFF /* 0x28 user code, 64-bit */
gdt_tss:
    .fill MAX_CPUS * 2, 8, 0
gdt_end:
gdt_ptr:
    .word gdt_end - gdt - 1
    .quad gdt

    .globl next_cpu
    .p2align 2
next_cpu:
    .long 1

/* Page tables, built by the assembler: no ring-0 time spent on them at boot. */
    .section .data.pagetables, "aw"
    .p2align 12
pml4:
    .quad pdpt + 0x7
    .fill 511, 8, 0
pdpt:
    .set i, 0
    .rept 64
    .quad pd + i * 4096 + 0x7
    .set i, i + 1
    .endr
    .fill 448, 8, 0
pd:
    .set i, 0
    .rept 32768
    .quad (i << 21) | 0x87   /* present, writable, user, 2 MiB page */
    .set i, i + 1
    .endr
