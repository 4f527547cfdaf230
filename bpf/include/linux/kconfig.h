#define CONFIG_BPF_SYSCALL 1
/* bcc force-includes its own copy of the uapi bpf.h (guard _UAPI__LINUX_BPF_H__); Debian's
   /usr/include/linux/bpf.h uses another guard and would redefine everything: mark it seen. */
#define __LINUX_BPF_H__ 1
