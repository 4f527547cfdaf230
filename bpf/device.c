// pelagos_bpf device rules (BPF_CGROUP_DEVICE), layout version 2 (program name pelagos_dev_v2).
// Compiled once with bcc against the uapi stub tree in bpf/include; the bytecode is cached and
// loaded once per process, then attached with BPF_F_ALLOW_MULTI to every container cgroup.
// Rules live in maps, so a container start (or a live rule update) is map writes plus a
// PROG_ATTACH, never a compile or a PROG_LOAD.
//
// Semantics: per requested access bit, the LAST rule matching the device and carrying that bit
// decides; no matching rule = allowed. Userspace (pelagos_bpf/devices/encode.py) turns a rule
// list into one entry per key pattern (type, major|ANY, minor|ANY) holding, per bit, the winner
// ((rule index + 1) << 1 | allow, 0 = none). A later rule has a larger value, so the max over the
// 4 patterns matching a device (M:m, M:*, *:*, *:m) is the last matching rule: at most 4 hash
// lookups whatever the number of rules, 1 for a listed device (see dev_rule.final).
//
// Fail closed (docs/DEVICES.md): a rule set always holds a *:* entry per type, written last, as
// its completeness sentinel. No final entry and no sentinel = the rule set is absent or
// incomplete = deny. Generation 0 in dev_cur (attached, rule set not installed yet) = deny.
//
// Layouts: declared once in pelagos_bpf/devices/layout.py; tests/test_layouts.py checks these
// structs against that declaration. Map sizes and flags come from there too (bcc's defaults
// for the BPF_HASH declarations below are never used: pelagos_bpf creates the maps).
#include <uapi/linux/bpf.h>

#define DEV_ANY 0xffffffffu

struct dev_cur {
    u64 cgroup; /* id of the cgroup this storage belongs to (first half of dev_key) */
    u32 gen;    /* generation of the rule set in force; 0 = not installed (deny all) */
    u32 pad;
};

struct dev_key {
    u64 cgroup; /* cgroup id */
    u32 gen;    /* rule set generation: never reused for a cgroup */
    u32 type;   /* BPF_DEVCG_DEV_BLOCK (1) or BPF_DEVCG_DEV_CHAR (2); 0 = index entries */
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
    u32 type;
    u32 major;
    u32 minor;
    u32 access; /* requested BPF_DEVCG_ACC_* bits */
};

BPF_CGROUP_STORAGE(dev_cur, struct dev_cur);
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

int pelagos_dev(struct bpf_cgroup_dev_ctx *ctx) {
    struct dev_cur *cur = (struct dev_cur *)(long)dev_cur.get_local_storage(0);
    u32 gen = cur->gen;
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
    d.type = type;
    d.major = major;
    d.minor = minor;
    d.access = acc;
    u64 *cnt = dev_denials.lookup(&d);
    if (!cnt) {
        u64 zero = 0;
        dev_denials.insert(&d, &zero); /* may lose a race with another CPU: then it exists */
        cnt = dev_denials.lookup(&d);
    }
    if (cnt)
        __sync_fetch_and_add(cnt, 1);
    return 0;
}
