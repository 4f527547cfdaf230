/* Built and run by bench/bench_devices.py.
 *
 * setup  PARENT PID PROGFILE N: the peers' per-container path in bare syscalls, N times:
 *        mkdir, PROG_LOAD of a runc-shaped filter, PROG_ATTACH (MULTI), write PID to
 *        cgroup.procs; then cleanup (PID back to PARENT, close, rmdir). PROGFILE holds
 *        u32 count, then per program u32 insn count + insns (iteration i uses i % count).
 *        Prints "setup_ns total_ns setup_cpu_ns total_cpu_ns" per iteration (wall clock, then
 *        this thread's CPU time, which other load on the machine does not inflate).
 * open   N: open+close /dev/null N times; prints thread-CPU ns per open.
 * costs  PARENT PID PROGFILE N MAPFD ENTRYFILE: each syscall of a container's life, timed alone
 *        (wall ns, one line per iteration, columns named by COST_NAMES in bench_devices.py).
 *        PROGFILE holds 2 programs: [0] the runc-shaped filter, [1] our generic program, already
 *        relocated against map fds this process inherited. ENTRYFILE: u32 count, key size, value
 *        size, then the keys, then the values of one rule set for the map MAPFD (the first 8
 *        key bytes, the cgroup id, are rewritten per iteration so every batch inserts new keys).
 *        Even iterations detach both programs before rmdir; odd ones rmdir with both attached.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/bpf.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static uint64_t now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

static uint64_t cpu_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

static void die(const char *what) {
    fprintf(stderr, "devbench: %s: %s\n", what, strerror(errno));
    exit(1);
}

static void write_str(const char *path, const char *s) {
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0 || write(fd, s, strlen(s)) < 0)
        die(path);
    close(fd);
}

static struct bpf_insn **read_progs(const char *progfile, uint32_t **lens_out, uint32_t *count);

static int setup(const char *parent, const char *pid, const char *progfile, int n) {
    uint32_t count, *lens;
    struct bpf_insn **progs = read_progs(progfile, &lens, &count);
    char dir[4096], procs[4200], parent_procs[4200];
    snprintf(parent_procs, sizeof parent_procs, "%s/cgroup.procs", parent);
    for (int i = 0; i < n; i++) {
        snprintf(dir, sizeof dir, "%s/c%d", parent, i);
        snprintf(procs, sizeof procs, "%s/cgroup.procs", dir);
        uint64_t c0 = cpu_now(), t0 = now();
        if (mkdir(dir, 0755))
            die("mkdir");
        int cg = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (cg < 0)
            die("open cgroup");
        union bpf_attr a;
        memset(&a, 0, sizeof a);
        a.prog_type = BPF_PROG_TYPE_CGROUP_DEVICE;
        a.insns = (uint64_t)(uintptr_t)progs[i % count];
        a.insn_cnt = lens[i % count];
        a.license = (uint64_t)(uintptr_t) "GPL";
        int prog = syscall(SYS_bpf, BPF_PROG_LOAD, &a, sizeof a);
        if (prog < 0)
            die("BPF_PROG_LOAD");
        memset(&a, 0, sizeof a);
        a.target_fd = cg;
        a.attach_bpf_fd = prog;
        a.attach_type = BPF_CGROUP_DEVICE;
        a.attach_flags = BPF_F_ALLOW_MULTI;
        if (syscall(SYS_bpf, BPF_PROG_ATTACH, &a, sizeof a))
            die("BPF_PROG_ATTACH");
        write_str(procs, pid);
        uint64_t t1 = now(), c1 = cpu_now();
        write_str(parent_procs, pid);
        close(prog);
        close(cg);
        if (rmdir(dir))
            die("rmdir");
        uint64_t t2 = now(), c2 = cpu_now();
        printf("%llu %llu %llu %llu\n", (unsigned long long)(t1 - t0),
               (unsigned long long)(t2 - t0), (unsigned long long)(c1 - c0),
               (unsigned long long)(c2 - c0));
    }
    return 0;
}

static struct bpf_insn **read_progs(const char *progfile, uint32_t **lens_out, uint32_t *count) {
    FILE *f = fopen(progfile, "rb");
    if (!f)
        die(progfile);
    if (fread(count, 4, 1, f) != 1)
        die("progfile");
    struct bpf_insn **progs = calloc(*count, sizeof(*progs));
    uint32_t *lens = calloc(*count, sizeof(*lens));
    for (uint32_t i = 0; i < *count; i++) {
        if (fread(&lens[i], 4, 1, f) != 1)
            die("progfile");
        progs[i] = malloc(lens[i] * 8);
        if (fread(progs[i], 8, lens[i], f) != lens[i])
            die("progfile");
    }
    fclose(f);
    *lens_out = lens;
    return progs;
}

static int bpf_call(int cmd, union bpf_attr *a) { return syscall(SYS_bpf, cmd, a, sizeof *a); }

static int load(struct bpf_insn *insns, uint32_t n) {
    union bpf_attr a;
    memset(&a, 0, sizeof a);
    a.prog_type = BPF_PROG_TYPE_CGROUP_DEVICE;
    a.insns = (uint64_t)(uintptr_t)insns;
    a.insn_cnt = n;
    a.license = (uint64_t)(uintptr_t) "GPL";
    int fd = bpf_call(BPF_PROG_LOAD, &a);
    if (fd < 0)
        die("BPF_PROG_LOAD");
    return fd;
}

static void attach(int cg, int prog, int cmd) {
    union bpf_attr a;
    memset(&a, 0, sizeof a);
    a.target_fd = cg;
    a.attach_bpf_fd = prog;
    a.attach_type = BPF_CGROUP_DEVICE;
    a.attach_flags = cmd == BPF_PROG_ATTACH ? BPF_F_ALLOW_MULTI : 0;
    if (bpf_call(cmd, &a))
        die(cmd == BPF_PROG_ATTACH ? "BPF_PROG_ATTACH" : "BPF_PROG_DETACH");
}

/* One rule set's map entries, as bench_devices.write_entries stores them. */
struct entries {
    uint32_t n, key_size, value_size;
    char *keys, *values;
};

static struct entries read_entries(const char *file) {
    struct entries e;
    uint32_t hdr[3];
    FILE *f = fopen(file, "rb");
    if (!f || fread(hdr, 4, 3, f) != 3)
        die(file);
    e.n = hdr[0], e.key_size = hdr[1], e.value_size = hdr[2];
    e.keys = malloc(e.n * e.key_size);
    e.values = malloc(e.n * e.value_size);
    if (fread(e.keys, e.key_size, e.n, f) != e.n || fread(e.values, e.value_size, e.n, f) != e.n)
        die(file);
    fclose(f);
    return e;
}

/* MAP_UPDATE_BATCH (keys and values) or MAP_DELETE_BATCH (keys) of every entry. */
static void batch(int cmd, int map, const struct entries *e) {
    union bpf_attr a;
    memset(&a, 0, sizeof a);
    a.batch.map_fd = map;
    a.batch.keys = (uint64_t)(uintptr_t)e->keys;
    if (cmd == BPF_MAP_UPDATE_BATCH)
        a.batch.values = (uint64_t)(uintptr_t)e->values;
    a.batch.count = e->n;
    if (bpf_call(cmd, &a))
        die(cmd == BPF_MAP_UPDATE_BATCH ? "BPF_MAP_UPDATE_BATCH" : "BPF_MAP_DELETE_BATCH");
}

static int costs(const char *parent, const char *pid, const char *progfile, int n, int mapfd,
                 const char *entryfile) {
    uint32_t count, *lens;
    struct bpf_insn **progs = read_progs(progfile, &lens, &count);
    struct entries e = read_entries(entryfile);
    char dir[4096], procs[4200], parent_procs[4200];
    snprintf(parent_procs, sizeof parent_procs, "%s/cgroup.procs", parent);
    for (int i = 0; i < n; i++) {
        uint64_t t[14];
        int k = 0;
        snprintf(dir, sizeof dir, "%s/k%d", parent, i);
        snprintf(procs, sizeof procs, "%s/cgroup.procs", dir);
        uint64_t rs = (0x7ff0000000ull + (uint64_t)i) << 1;
        for (uint32_t j = 0; j < e.n; j++)
            memcpy(e.keys + j * e.key_size, &rs, 8);
        t[k++] = now();
        if (mkdir(dir, 0755))
            die("mkdir");
        t[k++] = now();
        int cg = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (cg < 0)
            die("open cgroup");
        t[k++] = now();
        int runc = load(progs[0], lens[0]);
        t[k++] = now();
        int ours = load(progs[1], lens[1]);
        t[k++] = now();
        attach(cg, ours, BPF_PROG_ATTACH);
        t[k++] = now();
        attach(cg, runc, BPF_PROG_ATTACH);
        t[k++] = now();
        batch(BPF_MAP_UPDATE_BATCH, mapfd, &e);
        t[k++] = now();
        write_str(procs, pid);
        t[k++] = now();
        write_str(parent_procs, pid);
        t[k++] = now();
        if (i % 2 == 0) {
            attach(cg, runc, BPF_PROG_DETACH);
            attach(cg, ours, BPF_PROG_DETACH);
        }
        t[k++] = now();
        close(cg);
        close(runc);
        close(ours);
        t[k++] = now();
        if (rmdir(dir))
            die("rmdir");
        t[k++] = now();
        batch(BPF_MAP_DELETE_BATCH, mapfd, &e);
        t[k++] = now();
        printf("%d", i % 2);
        for (int j = 1; j < k; j++)
            printf(" %llu", (unsigned long long)(t[j] - t[j - 1]));
        printf("\n");
    }
    return 0;
}

/* Thread CPU time, not wall time: other load on the machine does not count, while the device
   program (run inside our open syscall) does. */
static int openloop(long n) {
    uint64_t t0 = cpu_now();
    for (long i = 0; i < n; i++) {
        int fd = open("/dev/null", O_RDWR | O_CLOEXEC);
        if (fd < 0)
            die("open /dev/null");
        close(fd);
    }
    printf("%.1f\n", (double)(cpu_now() - t0) / n);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 6 && !strcmp(argv[1], "setup"))
        return setup(argv[2], argv[3], argv[4], atoi(argv[5]));
    if (argc == 8 && !strcmp(argv[1], "costs"))
        return costs(argv[2], argv[3], argv[4], atoi(argv[5]), atoi(argv[6]), argv[7]);
    if (argc == 3 && !strcmp(argv[1], "open"))
        return openloop(atol(argv[2]));
    fprintf(stderr, "usage: devbench setup PARENT PID PROGFILE N | open N | costs PARENT PID "
                    "PROGFILE N MAPFD ENTRYFILE\n");
    return 2;
}
