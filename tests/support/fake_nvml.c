/* A fake libnvidia-ml.so.1 for tests and benchmarks: nvidia-ml-py's real ctypes code runs
 * against it. Driven by a line-oriented scenario file named by $FAKE_NVML_SCENARIO, re-read
 * whenever its inode, size or mtime changes (tests replace it atomically with rename):
 *
 *   driver 550.54.15
 *   nvml 12.550.54.15
 *   gpu <idx> <uuid> <total_bytes> <used_bytes> <util_gpu_pct> <util_mem_pct> <name...>
 *   cproc <idx> <pid> <bytes|NA>          compute process
 *   gproc <idx> <pid> <bytes|NA>          graphics process
 *   sample <idx> <pid> <ts_us> <sm> <mem> <enc> <dec>
 *   fail <function> <nvml_return_code>    that function returns the code
 *
 * Built with -DFAKE_535 it behaves like a 535-era driver: it exports
 * nvmlDeviceGetConfComputeMemSizeInfo but not nvmlDeviceGetRunningProcessDetailList, and its
 * ..._v3 process lists use the 32-byte struct with usedGpuCcProtectedMemory.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define OK 0
#define E_UNINIT 1
#define E_INVALID 2
#define E_INSUFFICIENT 7
#define E_NOT_FOUND 6
#define E_ARG_VERSION 25
#define NA_ULL 0xFFFFFFFFFFFFFFFFULL
#define MAXGPU 8
#define MAXPROC 4096
#define MAXSAMPLE 8192
#define MAXFAIL 64

typedef struct { unsigned int pid; unsigned long long mem; int graphics; int gpu; } proc_t;
typedef struct { int gpu; unsigned int pid; unsigned long long ts; unsigned int sm, mem, enc, dec; } sample_t;
typedef struct {
    int present; char uuid[96]; char name[96];
    unsigned long long total, used; unsigned int util_gpu, util_mem;
} gpu_t;

static gpu_t gpus[MAXGPU];
static proc_t procs[MAXPROC];
static int nprocs;
static sample_t samples[MAXSAMPLE];
static int nsamples;
static struct { char fn[96]; int code; } fails[MAXFAIL];
static int nfails;
static char driver[80] = "550.54.15", nvmlver[80] = "12.550.54.15";
static struct stat last_st;
static int initialized;

static void load(void) {
    const char *path = getenv("FAKE_NVML_SCENARIO");
    struct stat st;
    if (!path || stat(path, &st) != 0) { memset(&last_st, 0, sizeof last_st); nprocs = nsamples = nfails = 0;
        memset(gpus, 0, sizeof gpus); return; }
    if (st.st_ino == last_st.st_ino && st.st_size == last_st.st_size &&
        st.st_mtim.tv_sec == last_st.st_mtim.tv_sec && st.st_mtim.tv_nsec == last_st.st_mtim.tv_nsec) return;
    FILE *f = fopen(path, "r");
    if (!f) return;
    last_st = st;
    memset(gpus, 0, sizeof gpus); nprocs = nsamples = nfails = 0;
    char line[512];
    while (fgets(line, sizeof line, f)) {
        char kw[32], a[128], b[128];
        int idx, n;
        if (sscanf(line, "%31s", kw) != 1 || kw[0] == '#') continue;
        if (!strcmp(kw, "driver")) sscanf(line, "%*s %79s", driver);
        else if (!strcmp(kw, "nvml")) sscanf(line, "%*s %79s", nvmlver);
        else if (!strcmp(kw, "gpu")) {
            gpu_t g = {0};
            if (sscanf(line, "%*s %d %95s %llu %llu %u %u %n", &idx, g.uuid, &g.total, &g.used, &g.util_gpu,
                       &g.util_mem, &n) >= 6 && idx >= 0 && idx < MAXGPU) {
                snprintf(g.name, sizeof g.name, "%s", line + n);
                g.name[strcspn(g.name, "\n")] = 0;
                g.present = 1; gpus[idx] = g;
            }
        } else if ((!strcmp(kw, "cproc") || !strcmp(kw, "gproc")) && nprocs < MAXPROC) {
            proc_t p = {0};
            if (sscanf(line, "%*s %d %u %127s", &idx, &p.pid, a) == 3) {
                p.gpu = idx; p.graphics = kw[0] == 'g';
                p.mem = strcmp(a, "NA") ? strtoull(a, NULL, 10) : NA_ULL;
                procs[nprocs++] = p;
            }
        } else if (!strcmp(kw, "sample") && nsamples < MAXSAMPLE) {
            sample_t s;
            if (sscanf(line, "%*s %d %u %llu %u %u %u %u", &s.gpu, &s.pid, &s.ts, &s.sm, &s.mem, &s.enc, &s.dec) == 7)
                samples[nsamples++] = s;
        } else if (!strcmp(kw, "fail") && nfails < MAXFAIL) {
            if (sscanf(line, "%*s %95s %127s", fails[nfails].fn, b) == 2) { fails[nfails].code = atoi(b); nfails++; }
        }
    }
    fclose(f);
}

static int failing(const char *fn) {
    load();
    for (int i = 0; i < nfails; i++) if (!strcmp(fails[i].fn, fn)) return fails[i].code;
    return 0;
}

#define FAIL_OR(fn) do { int _c = failing(fn); if (_c) return _c; } while (0)
#define NEED_INIT() do { if (!initialized) return E_UNINIT; } while (0)

static int gpu_of(void *h) {
    long i = (gpu_t *)h - gpus;
    return (i >= 0 && i < MAXGPU && gpus[i].present) ? (int)i : -1;
}

static int copy_str(char *dst, unsigned int len, const char *src) {
    if (strlen(src) + 1 > len) return E_INSUFFICIENT;
    strcpy(dst, src);
    return OK;
}

int nvmlInitWithFlags(unsigned int flags) { (void)flags; FAIL_OR("nvmlInitWithFlags"); initialized = 1; return OK; }
int nvmlInit_v2(void) { return nvmlInitWithFlags(0); }
int nvmlInit(void) { return nvmlInitWithFlags(0); }
int nvmlShutdown(void) { FAIL_OR("nvmlShutdown"); initialized = 0; return OK; }

const char *nvmlErrorString(int r) {
    switch (r) {
    case 0: return "Success"; case 1: return "Uninitialized"; case 3: return "Not Supported";
    case 6: return "Not Found"; case 7: return "Insufficient Size"; case 9: return "Driver Not Loaded";
    case 13: return "Function Not Found"; case 15: return "GPU is lost"; case 18: return "RM has detected an NVML/RM version mismatch.";
    default: return "Unknown Error";
    }
}

int nvmlSystemGetDriverVersion(char *v, unsigned int len) { NEED_INIT(); FAIL_OR("nvmlSystemGetDriverVersion"); return copy_str(v, len, driver); }
int nvmlSystemGetNVMLVersion(char *v, unsigned int len) { NEED_INIT(); FAIL_OR("nvmlSystemGetNVMLVersion"); return copy_str(v, len, nvmlver); }

int nvmlDeviceGetCount_v2(unsigned int *count) {
    NEED_INIT(); FAIL_OR("nvmlDeviceGetCount_v2");
    unsigned int n = 0;
    while (n < MAXGPU && gpus[n].present) n++;
    *count = n;
    return OK;
}
int nvmlDeviceGetCount(unsigned int *count) { return nvmlDeviceGetCount_v2(count); }

int nvmlDeviceGetHandleByIndex_v2(unsigned int i, void **h) {
    NEED_INIT(); FAIL_OR("nvmlDeviceGetHandleByIndex_v2");
    if (i >= MAXGPU || !gpus[i].present) return E_INVALID;
    *h = &gpus[i];
    return OK;
}

int nvmlDeviceGetName(void *h, char *n, unsigned int len) {
    NEED_INIT(); FAIL_OR("nvmlDeviceGetName"); int g = gpu_of(h); if (g < 0) return E_INVALID;
    return copy_str(n, len, gpus[g].name);
}
int nvmlDeviceGetUUID(void *h, char *n, unsigned int len) {
    NEED_INIT(); FAIL_OR("nvmlDeviceGetUUID"); int g = gpu_of(h); if (g < 0) return E_INVALID;
    return copy_str(n, len, gpus[g].uuid);
}
int nvmlDeviceGetIndex(void *h, unsigned int *i) {
    NEED_INIT(); int g = gpu_of(h); if (g < 0) return E_INVALID; *i = (unsigned)g; return OK;
}

typedef struct { unsigned long long total, free, used; } mem_v1;
typedef struct { unsigned int version; unsigned long long total, reserved, free, used; } mem_v2;

int nvmlDeviceGetMemoryInfo(void *h, mem_v1 *m) {
    NEED_INIT(); FAIL_OR("nvmlDeviceGetMemoryInfo"); int g = gpu_of(h); if (g < 0) return E_INVALID;
    m->total = gpus[g].total; m->used = gpus[g].used; m->free = gpus[g].total - gpus[g].used;
    return OK;
}
int nvmlDeviceGetMemoryInfo_v2(void *h, mem_v2 *m) {
    NEED_INIT(); FAIL_OR("nvmlDeviceGetMemoryInfo_v2"); int g = gpu_of(h); if (g < 0) return E_INVALID;
    if (m->version != 0x02000028) return E_ARG_VERSION;
    m->total = gpus[g].total; m->reserved = 0; m->used = gpus[g].used; m->free = gpus[g].total - gpus[g].used;
    return OK;
}

typedef struct { unsigned int gpu, memory; } util_t;
int nvmlDeviceGetUtilizationRates(void *h, util_t *u) {
    NEED_INIT(); FAIL_OR("nvmlDeviceGetUtilizationRates"); int g = gpu_of(h); if (g < 0) return E_INVALID;
    u->gpu = gpus[g].util_gpu; u->memory = gpus[g].util_mem;
    return OK;
}

typedef struct { unsigned int pid; unsigned long long usedGpuMemory; unsigned int gi, ci; } pinfo24;
typedef struct { unsigned int pid; unsigned long long usedGpuMemory; unsigned int gi, ci;
                 unsigned long long ccProtected; } pinfo32;

static int list_procs(const char *fn, void *h, unsigned int *count, void *out, int graphics, int wide) {
    NEED_INIT(); FAIL_OR(fn); int g = gpu_of(h); if (g < 0) return E_INVALID;
    unsigned int n = 0;
    for (int i = 0; i < nprocs; i++) if (procs[i].gpu == g && procs[i].graphics == graphics) n++;
    if (n == 0) { *count = 0; return OK; }
    if (!out || *count < n) { *count = n; return E_INSUFFICIENT; }
    unsigned int k = 0;
    for (int i = 0; i < nprocs; i++) {
        if (procs[i].gpu != g || procs[i].graphics != graphics) continue;
        if (wide) { pinfo32 *p = (pinfo32 *)out + k; p->pid = procs[i].pid; p->usedGpuMemory = procs[i].mem;
                    p->gi = p->ci = 0xFFFFFFFFu; p->ccProtected = 0; }
        else { pinfo24 *p = (pinfo24 *)out + k; p->pid = procs[i].pid; p->usedGpuMemory = procs[i].mem;
               p->gi = p->ci = 0xFFFFFFFFu; }
        k++;
    }
    *count = k;
    return OK;
}

#ifdef FAKE_535
#define V3_WIDE 1
int nvmlDeviceGetConfComputeMemSizeInfo(void *h, void *info) { (void)h; (void)info; return 3; }
#else
#define V3_WIDE 0
int nvmlDeviceGetRunningProcessDetailList(void *h, void *plist) { (void)h; (void)plist; return 3; }
#endif

int nvmlDeviceGetComputeRunningProcesses_v3(void *h, unsigned int *c, void *o) {
    return list_procs("nvmlDeviceGetComputeRunningProcesses_v3", h, c, o, 0, V3_WIDE); }
int nvmlDeviceGetGraphicsRunningProcesses_v3(void *h, unsigned int *c, void *o) {
    return list_procs("nvmlDeviceGetGraphicsRunningProcesses_v3", h, c, o, 1, V3_WIDE); }
int nvmlDeviceGetComputeRunningProcesses_v2(void *h, unsigned int *c, void *o) {
    return list_procs("nvmlDeviceGetComputeRunningProcesses_v2", h, c, o, 0, 0); }
int nvmlDeviceGetGraphicsRunningProcesses_v2(void *h, unsigned int *c, void *o) {
    return list_procs("nvmlDeviceGetGraphicsRunningProcesses_v2", h, c, o, 1, 0); }

typedef struct { unsigned int pid; unsigned long long ts; unsigned int sm, mem, enc, dec; } usample_t;

int nvmlDeviceGetProcessUtilization(void *h, usample_t *out, unsigned int *count, unsigned long long last) {
    NEED_INIT(); FAIL_OR("nvmlDeviceGetProcessUtilization"); int g = gpu_of(h); if (g < 0) return E_INVALID;
    unsigned int n = 0;
    for (int i = 0; i < nsamples; i++) if (samples[i].gpu == g && samples[i].ts > last) n++;
    if (n == 0) { *count = 0; return E_NOT_FOUND; }
    if (!out || *count < n) { *count = n; return E_INSUFFICIENT; }
    unsigned int k = 0;
    for (int i = 0; i < nsamples; i++) {
        sample_t *s = &samples[i];
        if (s->gpu != g || s->ts <= last) continue;
        out[k].pid = s->pid; out[k].ts = s->ts; out[k].sm = s->sm; out[k].mem = s->mem;
        out[k].enc = s->enc; out[k].dec = s->dec; k++;
    }
    *count = k;
    return OK;
}

typedef struct { unsigned long long ts; unsigned int pid, sm, mem, enc, dec, jpg, ofa; } uinfo_t;
typedef struct { unsigned int version, count; unsigned long long last; uinfo_t *arr; } uinfos_t;

int nvmlDeviceGetProcessesUtilizationInfo(void *h, uinfos_t *info) {
    NEED_INIT(); FAIL_OR("nvmlDeviceGetProcessesUtilizationInfo"); int g = gpu_of(h); if (g < 0) return E_INVALID;
    if (info->version != 0x01000018) return E_ARG_VERSION;
    unsigned int n = 0;
    for (int i = 0; i < nsamples; i++) if (samples[i].gpu == g && samples[i].ts > info->last) n++;
    if (n == 0) { info->count = 0; return E_NOT_FOUND; }
    if (!info->arr || info->count < n) { info->count = n; return E_INSUFFICIENT; }
    unsigned int k = 0;
    for (int i = 0; i < nsamples; i++) {
        sample_t *s = &samples[i];
        if (s->gpu != g || s->ts <= info->last) continue;
        uinfo_t *u = &info->arr[k++];
        u->ts = s->ts; u->pid = s->pid; u->sm = s->sm; u->mem = s->mem; u->enc = s->enc; u->dec = s->dec;
        u->jpg = u->ofa = 0;
    }
    info->count = k;
    return OK;
}
