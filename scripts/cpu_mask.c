/* Makes a process see a CPU with fewer vector extensions than this one, at native speed: what
 * scripts/as_cpu.py preloads so that onnxruntime picks the int8 kernels of another CPU kind here.
 *
 * The kernel's CPUID faulting (flag cpuid_fault in /proc/cpuinfo; arch_prctl ARCH_SET_CPUID) turns every
 * cpuid instruction into a SIGSEGV; the handler runs the real cpuid and clears the bits of the extensions
 * the emulated kind lacks. The setting is inherited by threads, so onnxruntime's thread pool sees the same
 * CPU. /proc/cpuinfo is rewritten the same way, for code that reads flags there (embedder.build.isa).
 *
 * CPU_MASK=avx2          AVX2 + FMA only (Zen 3, Haswell to Ice Lake client): no AVX-512, VNNI or AMX
 * CPU_MASK=avx512-vnni   AVX-512 with VNNI but no AMX (Zen 4/5, Ice Lake and Cascade Lake Xeons)
 */
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <dlfcn.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#ifndef ARCH_SET_CPUID
#define ARCH_SET_CPUID 0x1012
#endif

enum { KEEP_ALL, AVX2, AVX512_VNNI };
static int kind = KEEP_ALL;

static void mask(uint32_t leaf, uint32_t sub, uint32_t *a, uint32_t *b, uint32_t *c, uint32_t *d) {
    if (leaf != 7) return;
    const uint32_t amx = (1u << 22) | (1u << 24) | (1u << 25);  /* AMX-BF16, AMX-TILE, AMX-INT8 */
    if (sub == 0) {
        *d &= ~amx;
        if (kind == AVX2) {
            /* AVX512 F, DQ, IFMA, PF, ER, CD, BW, VL */
            *b &= ~((1u << 16) | (1u << 17) | (1u << 21) | (1u << 26) | (1u << 27) | (1u << 28) | (1u << 30) | (1u << 31));
            /* AVX512 VBMI, VBMI2, VNNI, BITALG, VPOPCNTDQ */
            *c &= ~((1u << 1) | (1u << 6) | (1u << 11) | (1u << 12) | (1u << 14));
            /* AVX512 4VNNIW, 4FMAPS, VP2INTERSECT, FP16 */
            *d &= ~((1u << 2) | (1u << 3) | (1u << 8) | (1u << 23));
        }
    } else if (sub == 1) {
        *a &= ~(1u << 21);  /* AMX-FP16 */
        if (kind == AVX2) {
            *a &= ~((1u << 4) | (1u << 5) | (1u << 23));  /* AVX-VNNI, AVX512-BF16, AVX-IFMA */
            *d &= ~((1u << 4) | (1u << 5) | (1u << 10));  /* AVX-VNNI-INT8, AVX-NE-CONVERT, AVX-VNNI-INT16 */
        }
    }
}

static void on_fault(int sig, siginfo_t *info, void *context) {
    (void)info;
    greg_t *r = ((ucontext_t *)context)->uc_mcontext.gregs;
    const unsigned char *ip = (const unsigned char *)r[REG_RIP];
    if (ip[0] != 0x0f || ip[1] != 0xa2) {  /* a real fault: let it crash as it would have */
        signal(sig, SIG_DFL);
        return;
    }
    uint32_t leaf = (uint32_t)r[REG_RAX], sub = (uint32_t)r[REG_RCX], a, b, c, d;
    syscall(SYS_arch_prctl, ARCH_SET_CPUID, 1);
    __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(leaf), "c"(sub));
    syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0);
    mask(leaf, sub, &a, &b, &c, &d);
    r[REG_RAX] = a;
    r[REG_RBX] = b;
    r[REG_RCX] = c;
    r[REG_RDX] = d;
    r[REG_RIP] += 2;
}

static int hidden(const char *flag) {
    if (strncmp(flag, "amx", 3) == 0) return 1;
    return kind == AVX2 && (strncmp(flag, "avx512", 6) == 0 || strncmp(flag, "avx_vnni", 8) == 0);
}

/* /proc/cpuinfo with the hidden flags taken out of every "flags" line, as an in-memory file. */
static int masked_cpuinfo(void) {
    FILE *in = NULL;
    int src = (int)syscall(SYS_openat, AT_FDCWD, "/proc/cpuinfo", O_RDONLY);
    if (src < 0 || !(in = fdopen(src, "r"))) return -1;
    int out = memfd_create("cpuinfo", 0);
    char line[8192], copy[8192];
    while (fgets(line, sizeof line, in)) {
        if (strncmp(line, "flags", 5) != 0) {
            write(out, line, strlen(line));
            continue;
        }
        char *colon = strchr(line, ':');
        size_t head = colon ? (size_t)(colon - line + 1) : strlen(line);
        memcpy(copy, line, head);
        copy[head] = 0;
        for (char *tok = strtok(line + head, " \n"); tok; tok = strtok(NULL, " \n"))
            if (!hidden(tok)) {
                strcat(copy, " ");
                strcat(copy, tok);
            }
        strcat(copy, "\n");
        write(out, copy, strlen(copy));
    }
    fclose(in);
    lseek(out, 0, SEEK_SET);
    return out;
}

#define OPEN_WRAPPER(name, ...)                                                          \
    int name(__VA_ARGS__, int flags, ...) {                                              \
        mode_t mode = 0;                                                                 \
        if (flags & (O_CREAT | O_TMPFILE)) {                                             \
            va_list ap;                                                                  \
            va_start(ap, flags);                                                         \
            mode = va_arg(ap, mode_t);                                                   \
            va_end(ap);                                                                  \
        }                                                                                \
        if (kind != KEEP_ALL && strcmp(path, "/proc/cpuinfo") == 0) return masked_cpuinfo(); \
        return OPEN_REAL;                                                                \
    }

#define OPEN_REAL (int)syscall(SYS_openat, AT_FDCWD, path, flags, mode)
OPEN_WRAPPER(open, const char *path)
OPEN_WRAPPER(open64, const char *path)
#undef OPEN_REAL
#define OPEN_REAL (int)syscall(SYS_openat, dirfd, path, flags, mode)
OPEN_WRAPPER(openat, int dirfd, const char *path)
OPEN_WRAPPER(openat64, int dirfd, const char *path)

__attribute__((constructor)) static void start(void) {
    const char *want = getenv("CPU_MASK");
    if (!want || !*want) return;
    if (strcmp(want, "avx2") == 0) kind = AVX2;
    else if (strcmp(want, "avx512-vnni") == 0) kind = AVX512_VNNI;
    else {
        fprintf(stderr, "cpu_mask: unknown CPU_MASK=%s (avx2 or avx512-vnni)\n", want);
        _exit(2);
    }
    struct sigaction action = {0};
    action.sa_sigaction = on_fault;
    action.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigaction(SIGSEGV, &action, NULL);
    if (syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0) != 0) {
        perror("cpu_mask: this CPU or kernel has no CPUID faulting (flag cpuid_fault)");
        _exit(2);
    }
}
