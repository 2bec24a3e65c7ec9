/* Drover's test guest, ring 3: a polling driver for virtio-mmio devices (virtio
 * 1.x, "version 2" registers), the same for Drover's devices and QEMU's. No
 * interrupts: ring 3 takes none, so the workloads poll the used rings. Register
 * accesses are MMIO exits to the VMM, which is what a real driver costs too. */
#include "guest.h"

/* Register offsets (virtio 1.2, 4.2.2). */
#define MAGIC 0x000
#define VERSION 0x004
#define DEVICE_ID 0x008
#define DEVICE_FEATURES 0x010
#define DEVICE_FEATURES_SEL 0x014
#define DRIVER_FEATURES 0x020
#define DRIVER_FEATURES_SEL 0x024
#define QUEUE_SEL 0x030
#define QUEUE_NUM_MAX 0x034
#define QUEUE_NUM 0x038
#define QUEUE_READY 0x044
#define QUEUE_NOTIFY 0x050
#define STATUS 0x070
#define QUEUE_DESC 0x080
#define QUEUE_DRIVER 0x090
#define QUEUE_DEVICE 0x0a0
#define CONFIG 0x100

#define STATUS_ACKNOWLEDGE 1
#define STATUS_DRIVER 2
#define STATUS_DRIVER_OK 4
#define STATUS_FEATURES_OK 8
#define USED_F_NO_NOTIFY 1

static u32 rd(struct virtio_dev *d, u32 off) { return *(volatile u32 *)(d->regs + off); }
static void wr(struct virtio_dev *d, u32 off, u32 v) { *(volatile u32 *)(d->regs + off) = v; }
static void wr64(struct virtio_dev *d, u32 off, u64 v) {
    wr(d, off, (u32)v);
    wr(d, off + 4, (u32)(v >> 32));
}

static int is_hex(char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F'); }
static u64 hex_digit(char c) {
    return c <= '9' ? (u64)(c - '0') : (u64)((c | 0x20) - 'a' + 10);
}

/* A number as Linux's memparse reads one: decimal or 0x hex, then K, M or G. */
static const char *parse_num(const char *s, u64 *out) {
    u64 n = 0;
    if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
        for (s += 2; is_hex(*s); s++) n = n * 16 + hex_digit(*s);
    } else {
        for (; *s >= '0' && *s <= '9'; s++) n = n * 10 + (u64)(*s - '0');
    }
    if (*s == 'K' || *s == 'k') n <<= 10, s++;
    else if (*s == 'M' || *s == 'm') n <<= 20, s++;
    else if (*s == 'G' || *s == 'g') n <<= 30, s++;
    *out = n;
    return s;
}

int virtio_find(struct hvm_start_info *info, u32 device_id, u32 nth, struct virtio_dev *dev) {
    static const char key[] = "virtio_mmio.device=";
    const char *s = info->cmdline_paddr ? (const char *)info->cmdline_paddr : "";
    for (const char *start = s; *s; s++) {
        if (s != start && s[-1] != ' ') continue;
        const char *p = s, *k = key;
        while (*k && *p == *k) p++, k++;
        if (*k) continue;
        u64 size, base, irq;
        p = parse_num(p, &size);
        if (*p++ != '@') continue;
        p = parse_num(p, &base);
        if (*p++ != ':') continue;
        parse_num(p, &irq);
        struct virtio_dev d = {(volatile u8 *)base, base, (u32)irq};
        if (rd(&d, MAGIC) != 0x74726976 || rd(&d, DEVICE_ID) != device_id) continue;
        if (rd(&d, VERSION) != 2) fail("virtio: a legacy (version 1) device; this driver needs version 2", 3);
        if (nth-- == 0) {
            *dev = d;
            return 1;
        }
    }
    return 0;
}

u32 virtio_init(struct virtio_dev *d, u32 wanted) {
    wr(d, STATUS, 0);
    while (rd(d, STATUS) != 0) cpu_relax();
    wr(d, STATUS, STATUS_ACKNOWLEDGE);
    wr(d, STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    wr(d, DEVICE_FEATURES_SEL, 1);
    if (!(rd(d, DEVICE_FEATURES) & 1)) fail("virtio: the device does not offer VIRTIO_F_VERSION_1", 3);
    wr(d, DEVICE_FEATURES_SEL, 0);
    u32 features = rd(d, DEVICE_FEATURES) & wanted;
    wr(d, DRIVER_FEATURES_SEL, 0);
    wr(d, DRIVER_FEATURES, features);
    wr(d, DRIVER_FEATURES_SEL, 1);
    wr(d, DRIVER_FEATURES, 1);
    wr(d, STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
    if (!(rd(d, STATUS) & STATUS_FEATURES_OK)) fail("virtio: the device refused our features", 3);
    return features;
}

void virtq_init(struct virtio_dev *d, struct virtq *q, u32 index, u16 size, u32 slot) {
    wr(d, QUEUE_SEL, index);
    u32 max = rd(d, QUEUE_NUM_MAX);
    if (max == 0) fail("virtio: the device has no such queue", 3);
    if (size > max) size = (u16)max;
    u8 *area = (u8 *)(VIRTQ_AREA + slot * VIRTQ_AREA_SIZE);
    for (u64 i = 0; i < VIRTQ_AREA_SIZE; i++) area[i] = 0;
    q->dev = d;
    q->index = index;
    q->size = size;
    q->avail_idx = 0;
    q->last_used = 0;
    /* Descriptors (16 bytes each), then the available ring, then the used ring on
     * its own 4 KiB page: 256 entries fit in 64 KiB with room to spare. */
    q->desc = (volatile struct vring_desc *)area;
    q->avail = (volatile struct vring_avail *)(area + 16 * 256);
    q->used = (volatile struct vring_used *)(area + 32 * 1024);
    wr(d, QUEUE_NUM, size);
    wr64(d, QUEUE_DESC, (u64)q->desc);
    wr64(d, QUEUE_DRIVER, (u64)q->avail);
    wr64(d, QUEUE_DEVICE, (u64)q->used);
    wr(d, QUEUE_READY, 1);
}

void virtio_ready(struct virtio_dev *d) {
    wr(d, STATUS, rd(d, STATUS) | STATUS_DRIVER_OK);
}

u32 virtio_config32(struct virtio_dev *d, u32 offset) { return rd(d, CONFIG + offset); }
u8 virtio_config8(struct virtio_dev *d, u32 offset) { return *(volatile u8 *)(d->regs + CONFIG + offset); }

void virtq_push(struct virtq *q, u16 head) {
    q->avail->ring[q->avail_idx % q->size] = head;
    /* The entry before the index that publishes it (x86 keeps stores in order;
     * the compiler must too). */
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    q->avail_idx++;
    q->avail->idx = q->avail_idx;
}

void virtq_kick(struct virtq *q) {
    /* The index store before the flag load: a device that set NO_NOTIFY rechecks
     * the index after clearing it, so one of us sees the other. */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (!(q->used->flags & USED_F_NO_NOTIFY)) wr(q->dev, QUEUE_NOTIFY, q->index);
}

int virtq_pop(struct virtq *q, u32 *id, u32 *len) {
    if (q->used->idx == q->last_used) return 0;
    __atomic_signal_fence(__ATOMIC_SEQ_CST); /* the entry after the index */
    volatile struct vring_used_elem *e = &q->used->ring[q->last_used % q->size];
    *id = e->id;
    *len = e->len;
    q->last_used++;
    return 1;
}
