// pelagos_bpf net classification + accounting (cgroup_skb). Compiled with bcc against the uapi
// stub tree in bpf/include; loaded once per process from cached bytecode and attached with
// BPF_F_ALLOW_MULTI to every classified cgroup. Per-cgroup settings live in cgroup storage, so a
// container start is a PROG_ATTACH plus a map write, never a compile or a PROG_LOAD.
//
// Layouts: declared once in pelagos_bpf/net/layout.py; tests/test_layouts.py checks these structs
// against that declaration. Map sizes and flags come from there too (bcc's default size for the
// BPF_HASH below is never used: pelagos_bpf creates the maps).
#include <uapi/linux/bpf.h>

#define NET_F_MARK 1  /* carry the classid in skb->mark (else skb->priority) */
#define NET_F_PRIOS 2 /* look up net_prios[(prio_key, skb->ifindex)] */
#define NET_F_SOCKET 4 /* carrier "socket": classid set once on the socket, at creation */

struct net_cfg {
    u32 classid;  /* major<<16 | minor, 0 = none */
    u32 flags;    /* NET_F_* */
    u64 prio_key; /* first half of the net_prios key (the cgroup id at attach time) */
};

struct net_acct {
    u64 bytes;
    u64 packets;
};

struct prio_key {
    u64 cgroup;
    u32 ifindex;
    u32 pad;
};

BPF_CGROUP_STORAGE(net_cfg, struct net_cfg);
BPF_PERCPU_CGROUP_STORAGE(net_acct, struct net_acct);
BPF_HASH(net_prios, struct prio_key, u32);

static __always_inline void account(struct net_acct *a, struct __sk_buff *skb) {
    // Per-CPU storage: plain adds, no atomics, no cross-CPU contention. A GSO/GRO skb stands
    // for gso_segs packets on the wire; its len counts the headers once (IP-level bytes).
    u32 segs = skb->gso_segs;
    a->bytes += skb->len;
    a->packets += segs ? segs : 1;
}

int pelagos_net_eg(struct __sk_buff *skb) {
    struct net_acct *a = (struct net_acct *)(long)net_acct.get_local_storage(0);
    struct net_cfg *c = (struct net_cfg *)(long)net_cfg.get_local_storage(0);
    account(a, skb);
    u32 classid = c->classid;
    u32 flags = c->flags;
    u32 mark = skb->mark;
    u32 prio = skb->priority;
    // Programs of nested cgroups run child first: a value a nearer cgroup (or a privileged app
    // via SO_MARK / a classid-valued SO_PRIORITY) already set is kept, like net_cls's "nearest
    // cgroup wins". Plain SO_PRIORITY values (major 0) are not classids and get replaced.
    if (classid) {
        if (flags & NET_F_MARK) {
            if (mark == 0)
                mark = classid;
        } else if ((prio >> 16) == 0) {
            prio = classid;
        }
    }
    // net_prio semantics: set only while the priority is still 0 (an app's SO_PRIORITY wins).
    if ((flags & NET_F_PRIOS) && prio == 0) {
        struct prio_key k = {};
        k.cgroup = c->prio_key;
        k.ifindex = skb->ifindex;
        u32 *p = net_prios.lookup(&k);
        if (p)
            prio = *p;
    }
    // Unconditional stores of both fields: clang merges conditional stores to different ctx
    // fields into one store through a computed pointer, which the verifier rejects.
    skb->mark = mark;
    skb->priority = prio;
    return 1;
}

int pelagos_net_in(struct __sk_buff *skb) {
    struct net_acct *a = (struct net_acct *)(long)net_acct.get_local_storage(0);
    account(a, skb);
    return 1;
}

// tc classifier for the "mark" carrier (cls_bpf, classic mode, not direct-action): the return
// value is the classid, so the mark becomes the class exactly as with a bare `fw` filter, for
// kernels built without cls_fw. 0 = no match (next filter, then HTB's default class).
int pelagos_mark_cls(struct __sk_buff *skb) {
    return skb->mark;
}

// ---------------------------------------------------------------- carrier "socket"
// No per-packet program: the classid goes into sk->sk_priority once, when the socket is created
// (the kernel copies it into skb->priority of every packet the socket sends, and HTB maps that
// to class major:minor). Config: the same net_cfg cgroup storage, whose key carries the attach
// type, so these programs read their own entry (written for INET_SOCK_CREATE and SETSOCKOPT).
// Why cgroup storage and not a hash keyed by cgroup id: the program of each cgroup of a nested
// chain then reads that cgroup's own value (bpf_get_current_cgroup_id would name only the
// innermost one), and the kernel frees it with the cgroup; bpf_get_local_storage is allowed for
// CGROUP_SOCK and CGROUP_SOCKOPT since 5.x (checked on 5.10 and 6.12 by the tests).

#define SOL_SOCKET 1
#define SO_PRIORITY 12

int pelagos_net_sk(struct bpf_sock *sk) {
    struct net_cfg *c = (struct net_cfg *)(long)net_cfg.get_local_storage(0);
    u32 classid = c->classid;
    // Child first, as with the packet carriers: a classid a nearer cgroup set is kept.
    if (classid && (sk->priority >> 16) == 0)
        sk->priority = classid;
    return 1;
}

// The guard: an app's plain SO_PRIORITY (major 0) on a classified socket would move it out of
// its class. Bypassing the kernel's handler (optlen = -1) keeps the class and still succeeds;
// rewriting the value to the classid would fail with EPERM for an app without CAP_NET_ADMIN
// (the kernel allows only 0..6 then). A classid-valued SO_PRIORITY goes to the kernel (kept, as
// with the "priority" carrier); a socket that carries no class (created before the classid was
// set) keeps the app's value.
int pelagos_net_so(struct bpf_sockopt *ctx) {
    struct net_cfg *c = (struct net_cfg *)(long)net_cfg.get_local_storage(0);
    if (c->classid == 0 || ctx->level != SOL_SOCKET || ctx->optname != SO_PRIORITY)
        return 1;
    if (ctx->optlen < 4) // also -1: a nearer cgroup's program already bypassed the kernel
        return 1;
    void *optval = (void *)(long)ctx->optval;
    void *end = (void *)(long)ctx->optval_end;
    if (optval + 4 > end)
        return 1;
    u32 val = *(u32 *)optval;
    struct bpf_sock *sk = ctx->sk;
    if ((val >> 16) == 0 && (sk->priority >> 16) != 0)
        ctx->optlen = -1;
    return 1;
}
