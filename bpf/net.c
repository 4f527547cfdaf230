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
