/* Built and run by bench/bench_devices.py.
 *
 * setup  PARENT PID PROGFILE N: the peers' per-container path in bare syscalls, N times:
 *        mkdir, PROG_LOAD of a runc-shaped filter, PROG_ATTACH (MULTI), write PID to
 *        cgroup.procs; then cleanup (PID back to PARENT, close, rmdir). PROGFILE holds
 *        u32 count, then per program u32 insn count + insns (iteration i uses i % count).
 *        Prints "setup_ns total_ns setup_cpu_ns total_cpu_ns" per iteration (wall clock, then
 *        this thread's CPU time, which other load on the machine does not inflate).
 * open   N: open+close /dev/null N times; prints thread-CPU ns per open.
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

static int setup(const char *parent, const char *pid, const char *progfile, int n) {
    FILE *f = fopen(progfile, "rb");
    if (!f)
        die(progfile);
    uint32_t count;
    if (fread(&count, 4, 1, f) != 1)
        die("progfile");
    struct bpf_insn **progs = calloc(count, sizeof(*progs));
    uint32_t *lens = calloc(count, sizeof(*lens));
    for (uint32_t i = 0; i < count; i++) {
        if (fread(&lens[i], 4, 1, f) != 1)
            die("progfile");
        progs[i] = malloc(lens[i] * 8);
        if (fread(progs[i], 8, lens[i], f) != lens[i])
            die("progfile");
    }
    fclose(f);
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
    if (argc == 3 && !strcmp(argv[1], "open"))
        return openloop(atol(argv[2]));
    fprintf(stderr, "usage: devbench setup PARENT PID PROGFILE N | open N\n");
    return 2;
}
