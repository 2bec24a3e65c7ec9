/* Drover's test guest, ring 3: the virtio-net workload.
 *
 * net: CPU 0 answers ARP requests and ICMP echo requests for the IPv4 address
 * drover.ip= (default 10.0.2.15) on the first virtio network device, with the MAC
 * the device reports, and never ends (the VMM stops it). An echo reply carries the
 * request's data unchanged, so a ping's pattern checks the whole path. It prints
 * "net up" when its receive buffers are posted. */
#include "guest.h"

#define NET_F_MAC (1u << 5)
#define HDR 12 /* struct virtio_net_hdr_v1: every frame starts with one */
#define BUF 2048
#define RXQ 256
#define TXQ 256
#define RX_BUFS (DRIVER_AREA)
#define TX_BUFS (DRIVER_AREA + RXQ * BUF)

static struct virtio_dev nic;
static struct virtq rx, tx;
static u8 mac[6];
static u8 ip[4];
static u32 tx_free[TXQ], tx_nfree;

static u16 be16(const u8 *p) { return (u16)(p[0] << 8 | p[1]); }
static void put_be16(u8 *p, u16 v) {
    p[0] = (u8)(v >> 8);
    p[1] = (u8)v;
}
static void copy(u8 *dst, const u8 *src, u32 n) {
    while (n--) *dst++ = *src++;
}
static int same(const u8 *a, const u8 *b, u32 n) {
    while (n--)
        if (*a++ != *b++) return 0;
    return 1;
}

/* The Internet checksum (RFC 1071) of n bytes. */
static u16 checksum(const u8 *p, u32 n) {
    u64 sum = 0;
    for (; n > 1; p += 2, n -= 2) sum += be16(p);
    if (n) sum += (u64)p[0] << 8;
    while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
    return (u16)~sum;
}

static void parse_ip(const char *s) {
    static const u8 dflt[4] = {10, 0, 2, 15};
    copy(ip, dflt, 4);
    if (!s) return;
    for (int i = 0; i < 4; i++) {
        u32 n = 0;
        while (*s >= '0' && *s <= '9') n = n * 10 + (u32)(*s++ - '0');
        ip[i] = (u8)n;
        if (*s == '.') s++;
    }
}

static void post_rx(u32 n) {
    rx.desc[n].addr = RX_BUFS + (u64)n * BUF;
    rx.desc[n].len = BUF;
    rx.desc[n].flags = VRING_DESC_F_WRITE;
    virtq_push(&rx, (u16)n);
}

static void reclaim_tx(void) {
    u32 id, len;
    while (virtq_pop(&tx, &id, &len)) tx_free[tx_nfree++] = id;
}

/* Sends `len` bytes of frame; drops it when every buffer is in flight. */
static int send(const u8 *frame, u32 len) {
    reclaim_tx();
    if (tx_nfree == 0) return 0;
    u32 n = tx_free[--tx_nfree];
    u8 *buf = (u8 *)(TX_BUFS + (u64)n * BUF);
    for (int i = 0; i < HDR; i++) buf[i] = 0;
    copy(buf + HDR, frame, len);
    tx.desc[n].addr = (u64)buf;
    tx.desc[n].len = HDR + len;
    tx.desc[n].flags = 0;
    virtq_push(&tx, (u16)n);
    return 1;
}

/* Turns a received frame into its reply in place; returns the reply's length or 0. */
static u32 answer(u8 *f, u32 len) {
    if (len < 14) return 0;
    u16 type = be16(f + 12);
    u8 *p = f + 14;
    if (type == 0x0806 && len >= 42 && be16(p + 6) == 1 && same(p + 24, ip, 4)) {
        put_be16(p + 6, 2);
        copy(p + 18, p + 8, 10); /* the asker becomes the target */
        copy(p + 8, mac, 6);
        copy(p + 14, ip, 4);
    } else if (type == 0x0800 && len >= 34 && p[9] == 1 && same(p + 16, ip, 4)) {
        u32 ihl = (u32)(p[0] & 15) * 4, total = be16(p + 2);
        if (ihl < 20 || total > len - 14 || total < ihl + 8 || p[ihl] != 8) return 0;
        u8 src[4];
        copy(src, p + 12, 4);
        copy(p + 12, p + 16, 4);
        copy(p + 16, src, 4);
        p[8] = 64;
        put_be16(p + 10, 0);
        put_be16(p + 10, checksum(p, ihl));
        u8 *icmp = p + ihl;
        icmp[0] = 0;
        put_be16(icmp + 2, 0);
        put_be16(icmp + 2, checksum(icmp, total - ihl));
        len = 14 + total;
    } else {
        return 0;
    }
    copy(f, f + 6, 6);
    copy(f + 6, mac, 6);
    return len;
}

void net_main(u32 cpu, struct hvm_start_info *info) {
    if (cpu != 0) halt_this_cpu();
    if (!virtio_find(info, VIRTIO_ID_NET, 0, &nic)) fail("net: no virtio network device", 3);
    if (!(virtio_init(&nic, NET_F_MAC) & NET_F_MAC)) fail("net: the device has no MAC address", 3);
    for (u32 i = 0; i < 6; i++) mac[i] = virtio_config8(&nic, i);
    parse_ip(param(info, "drover.ip="));
    virtq_init(&nic, &rx, 0, RXQ, 1);
    virtq_init(&nic, &tx, 1, TXQ, 2);
    if (rx.size != RXQ || tx.size != TXQ) fail("net: the device's queues are too small", 3);
    for (u32 n = 0; n < TXQ; n++) tx_free[tx_nfree++] = n;
    for (u32 n = 0; n < RXQ; n++) post_rx(n);
    virtio_ready(&nic);
    virtq_kick(&rx);
    lock();
    puts_("drover-guest: net up, mac ");
    for (int i = 0; i < 6; i++) {
        const char *hex = "0123456789abcdef";
        char s[4] = {hex[mac[i] >> 4], hex[mac[i] & 15], i < 5 ? ':' : ' ', 0};
        puts_(s);
    }
    puts_("ip ");
    for (int i = 0; i < 4; i++) {
        put_dec(ip[i]);
        puts_(i < 3 ? "." : "\n");
    }
    unlock();
    for (;;) {
        u32 id, len, got = 0, sent = 0;
        while (virtq_pop(&rx, &id, &len)) {
            u8 *frame = (u8 *)(RX_BUFS + (u64)id * BUF) + HDR;
            u32 reply = len > HDR ? answer(frame, len - HDR) : 0;
            if (reply) sent += (u32)send(frame, reply);
            post_rx(id);
            got = 1;
        }
        if (sent) virtq_kick(&tx);
        if (got) virtq_kick(&rx);
        else cpu_relax();
    }
}
