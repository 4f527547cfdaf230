// pelagos_bpf device rules (BPF_CGROUP_DEVICE), layout version 3 (pelagos_d{rt,hk,nr}_v3).
// Compiled once with bcc (when the package is built) against the uapi stub tree in bpf/include;
// loaded once per node (pins) and attached with BPF_F_ALLOW_MULTI to container cgroups. Rules
// live in maps, so a container start (or a live rule update) is map writes plus a PROG_ATTACH,
// never a compile or a PROG_LOAD.
//
// Owners (docs/DEVICES.md): each role that sets device rules on a cgroup (1 the runtime that
// calls the library, 2 the OCI hook, 3 the NRI plugin) has its own program, attached only while
// that role has a rule set there. The kernel runs every program attached to a cgroup and its
// ancestors and allows an access only if all allow, so one owner's rule set is AND-ed with the
// others' and with any foreign program: no owner can widen what another enforces, and each
// attaches, updates and detaches only its own program and entries.
//
// Semantics of one rule set: per requested access bit, the LAST rule matching the device and
// carrying that bit decides; no matching rule = allowed. Userspace (pelagos_bpf/devices/
// encode.py) turns a rule list into one entry per key pattern (type, major|ANY, minor|ANY)
// holding, per bit, the winner ((rule index + 1) << 1 | allow, 0 = none). A later rule has a
// larger value, so the max over the 4 patterns matching a device (M:m, M:*, *:*, *:m) is the last
// matching rule: at most 4 hash lookups whatever the number of rules, 1 for a listed device.
//
// Fail closed: a rule set always holds a *:* entry per type, written last, as its completeness
// sentinel. No final entry and no sentinel = the rule set is absent or incomplete = deny. An
// owner's generation 0 in dev_cur (its program attached, its rule set not installed yet) = deny.
//
// Denial audit: one counter per (cgroup, owner, device, access) in the shared dev_denials hash,
// at most dev_cur.audit_cap distinct entries per cgroup and CPU (per-CPU dev_audit.itemised;
// userspace sets the cap so the CPUs' sum stays under a per-cgroup bound). Past the cap, or when
// the hash is full, a denial still counts in the cgroup's own dev_audit.overflow: no cgroup can
// use up the counters of the others, and no denial goes uncounted.
//
// Layouts: declared once in pelagos_bpf/devices/layout.py; tests/test_layouts.py checks these
// structs against that declaration. Map sizes and flags come from there too (bcc's defaults for
// the BPF_HASH declarations below are never used: pelagos_bpf creates the maps).
#include <uapi/linux/bpf.h>

#define DEV_ANY 0xffffffffu

/* Cgroup storage shared by the owners' programs (one entry per cgroup: the key is the cgroup id
   and the attach type, the same for all of them). */
struct dev_cur {
    u64 cgroup;    /* id of the cgroup this storage belongs to (first half of dev_key) */
    u32 gen[4];    /* per owner (index 1..3): generation of its rule set in force; 0 = none */
    u32 audit_cap; /* distinct dev_denials entries this cgroup may create, per CPU */
    u32 pad;
};

/* Per-CPU cgroup storage (a program may use one shared and one per-CPU storage map): plain
   adds, no atomics. */
struct dev_audit {
    u64 itemised; /* distinct dev_denials entries this cgroup's programs created on this CPU */
    u64 overflow; /* denials counted here only: the cap was reached or the hash was full */
};

struct dev_key {
    u64 cgroup; /* cgroup id */
    u32 gen;    /* rule set generation: never reused for a (cgroup, owner) */
    u16 owner;  /* 1 runtime, 2 hook, 3 NRI plugin */
    u16 type;   /* BPF_DEVCG_DEV_BLOCK (1) or BPF_DEVCG_DEV_CHAR (2); 0 = index entries */
    u32 major;  /* or DEV_ANY; the chunk number for index entries */
    u32 minor;  /* or DEV_ANY */
};

/* Pattern entries (type 1 or 2). */
struct dev_rule {
    u32 bit[3]; /* winners for mknod, read, write (BPF_DEVCG_ACC_* bit positions 0, 1, 2) */
    u32 final;  /* 1: bit[] is already the max over every pattern this device can match, given
                   that the lookups before this one missed; the program stops here */
};

/* Index entries (type 0): up to 16 packed patterns of the rule set, so any process can find
   and delete exactly one rule set's entries (one map write per 16 patterns). Never looked up
   by the program (no device has type 0). */
struct dev_index {
    u64 pattern[16];
};

struct dev_val {
    union {
        struct dev_rule rule;
        struct dev_index index;
    };
};

struct deny_key {
    u64 cgroup; /* cgroup id the program is attached to */
    u16 owner;  /* whose rule set denied */
    u16 type;
    u32 major;
    u32 minor;
    u32 access; /* requested BPF_DEVCG_ACC_* bits */
};

BPF_CGROUP_STORAGE(dev_cur, struct dev_cur);
BPF_PERCPU_CGROUP_STORAGE(dev_audit, struct dev_audit);
BPF_HASH(dev_rules, struct dev_key, struct dev_val);
BPF_HASH(dev_denials, struct deny_key, u64);

/* Arithmetic max (values < 2^32) and the branch-free denies() below keep the verifier's path
   count, and so the one-time PROG_LOAD, low. */
static __always_inline u64 max64(u64 a, u64 b) {
    s64 d = (s64)a - (s64)b;
    return a - (d & (d >> 63));
}

/* Fold one entry into the per-bit maxima; true when the entry says "no need to look further". */
static __always_inline int merge(struct dev_val *v, u64 *m, u64 *r, u64 *w) {
    if (!v)
        return 0;
    *m = max64(*m, v->rule.bit[0]);
    *r = max64(*r, v->rule.bit[1]);
    *w = max64(*w, v->rule.bit[2]);
    return v->rule.final;
}

/* A bit is denied when its winning rule exists (non-zero) and is a deny (low bit clear). */
static __always_inline u64 denies(u32 requested, u32 bit, u64 winner) {
    return !!(requested & bit) & !!winner & !(winner & 1);
}

static __always_inline int check(struct bpf_cgroup_dev_ctx *ctx, struct dev_cur *cur,
                                 struct dev_audit *audit, u16 owner) {
    u32 gen = cur->gen[owner];
    if (gen == 0)
        return 0;
    u32 type = ctx->access_type & 0xffff;
    u32 acc = ctx->access_type >> 16;
    u32 major = ctx->major;
    u32 minor = ctx->minor;
    u64 m = 0, r = 0, w = 0;
    u64 complete = 1;
    struct dev_key k = {};
    k.cgroup = cur->cgroup;
    k.gen = gen;
    k.owner = owner;
    k.type = type;
    k.major = major;
    k.minor = minor;
    /* Lookup order M:m, M:*, *:*, *:m, stopping at a final entry: a listed device such as
       /dev/null costs one lookup. Reaching *:* without a final entry requires the sentinel. */
    if (!merge(dev_rules.lookup(&k), &m, &r, &w)) {
        k.minor = DEV_ANY;
        if (!merge(dev_rules.lookup(&k), &m, &r, &w)) {
            k.major = DEV_ANY;
            struct dev_val *any = dev_rules.lookup(&k);
            complete = any != 0;
            if (!merge(any, &m, &r, &w)) {
                k.minor = minor;
                merge(dev_rules.lookup(&k), &m, &r, &w);
            }
        }
    }
    if (complete & !(denies(acc, BPF_DEVCG_ACC_MKNOD, m) | denies(acc, BPF_DEVCG_ACC_READ, r) |
                     denies(acc, BPF_DEVCG_ACC_WRITE, w)))
        return 1;
    /* Denial audit: answers "why does my container get EPERM on /dev/xyz". */
    struct deny_key d = {};
    d.cgroup = k.cgroup;
    d.owner = owner;
    d.type = type;
    d.major = major;
    d.minor = minor;
    d.access = acc;
    u64 *cnt = dev_denials.lookup(&d);
    if (!cnt && audit->itemised < cur->audit_cap) {
        u64 zero = 0;
        /* may lose a race with another CPU (then the entry exists) or find the hash full */
        if (dev_denials.insert(&d, &zero) == 0)
            audit->itemised += 1;
        cnt = dev_denials.lookup(&d);
    }
    if (cnt)
        __sync_fetch_and_add(cnt, 1);
    else
        audit->overflow += 1;
    return 0;
}

/* One program per owner, so each role attaches and detaches only its own (see the top). */
int pelagos_dev_rt(struct bpf_cgroup_dev_ctx *ctx) {
    struct dev_cur *cur = (struct dev_cur *)(long)dev_cur.get_local_storage(0);
    struct dev_audit *audit = (struct dev_audit *)(long)dev_audit.get_local_storage(0);
    return check(ctx, cur, audit, 1);
}

int pelagos_dev_hk(struct bpf_cgroup_dev_ctx *ctx) {
    struct dev_cur *cur = (struct dev_cur *)(long)dev_cur.get_local_storage(0);
    struct dev_audit *audit = (struct dev_audit *)(long)dev_audit.get_local_storage(0);
    return check(ctx, cur, audit, 2);
}

int pelagos_dev_nr(struct bpf_cgroup_dev_ctx *ctx) {
    struct dev_cur *cur = (struct dev_cur *)(long)dev_cur.get_local_storage(0);
    struct dev_audit *audit = (struct dev_audit *)(long)dev_audit.get_local_storage(0);
    return check(ctx, cur, audit, 3);
}
