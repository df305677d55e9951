/* 04_load.c: where a run goes (CPU or GPU), and a model's weights straight from its files to
 * the GPU. 05_train.c and 06_infer.c include it after 03_lora.c.
 *
 * Teaches: what a GPU program does before its first step.
 *   - Where it runs (device_choose, the one rule both programs follow): --device cpu|gpu,
 *     or, without it, the GPU where this build has CUDA, the machine a GPU and the GPU code
 *     suits the model; the startup line says which and why. gpu_peak_tflops: the GPU's peak
 *     dense bf16 TFLOP/s from NVIDIA's datasheets, by device name, for MFU.
 *   - Loading (CUDA builds): no fp32 host copy of the frozen weights. 02's model_files_open
 *     reads the safetensors headers (the files are mapped, their data is never touched
 *     through the mapping); each tensor, or the slice of it this rank keeps under
 *     --shard-weights, is read with pread() in chunks into one of two pinned staging buffers,
 *     converted to bf16 there when the file holds fp16, fp32 or fp64 (through fp32 and
 *     f32_to_bf16, exactly the CPU loader's values rounded as the CPU rounds them; bf16 is
 *     copied as it is), and sent to the GPU with cudaMemcpyAsync on a stream of its own
 *     (a blocking one: ordered with the default stream the kernels run on):
 *     while one buffer's copy runs, the next chunk is read into the other. The host holds
 *     the two buffers (2 x 32 MiB), whatever the model's size.
 * Runs on: device_choose and gpu_peak_tflops everywhere (the CPU tests check them); the
 * loader where the build has CUDA.
 * Checked by: tests/test_gpu_load.c (the GPU's bits against 02's fp32 load rounded to bf16:
 * bf16, fp16 and fp32 files, one file and shards, slices; a truncated shard ends with one
 * sentence), tests/test_train.c and tests/test_infer_cli.sh (the device rule, the startup
 * lines), bench: the 7B load on an H200 (README).
 * Leaves out: O_DIRECT and several reader threads (one pread stream from the page cache or
 * an NVMe disk keeps up with the copies), GPUDirect Storage.
 */
#ifndef LOAD_04_C
#define LOAD_04_C
#include <sys/resource.h>

/* ---------------------------------------------------------------------------------------
 * Where a run goes
 * ------------------------------------------------------------------------------------- */

/* device: "cpu", "gpu" or NULL (not given). has_cuda: this build has the GPU code. gpu_name:
 * the GPU this process would use, or NULL when it sees none. why_not: why the GPU code cannot
 * run this model (NULL: it can). verb: what the program does there ("trains", "runs").
 * Returns 1 (GPU) or 0 (CPU) with note [cap] holding the startup line's words, or -1 +
 * last_error() when --device gpu cannot be honoured. */
static API int device_choose(const char *device, int has_cuda, const char *gpu_name, const char *why_not, const char *verb,
                             char *note, size_t cap) {
    int asked_gpu = device && !strcmp(device, "gpu");
    if (device && !strcmp(device, "cpu")) { snprintf(note, cap, "on the CPU (--device cpu)"); return 0; }
    const char *no = !has_cuda ? "this build has no CUDA (build with nvcc and cuBLAS present)"
                   : !gpu_name ? "no CUDA GPU is visible to this process"
                   : why_not;
    if (no) {
        if (asked_gpu) return set_error("--device gpu: %s; use --device cpu", no);
        snprintf(note, cap, "on the CPU (%s)", no);
        return 0;
    }
    if (asked_gpu) snprintf(note, cap, "on the GPU (%s, --device gpu)", gpu_name);
    else snprintf(note, cap, "on the GPU (%s, found one; --device cpu %s on the CPU)", gpu_name, verb);
    return 1;
}

/* Peak dense (no 2:4 sparsity) bf16 tensor-core TFLOP/s by device name, from NVIDIA's
 * datasheets: A100 312; H100 SXM and H200 SXM 989 (989.4); H100 PCIe 756; H100 NVL and
 * H200 NVL 835 (their sheets give 1,671 with sparsity); GH200 989. The more specific names
 * come first. 0 for a GPU not in the table (MFU then needs --peak-tflops). */
static API double gpu_peak_tflops(const char *name) {
    static const struct { const char *part; double tflops; } table[] = {
        {"H100 PCIe", 756.0}, {"H100 NVL", 835.0}, {"H200 NVL", 835.0}, {"GH200", 989.0},
        {"H100", 989.0},      {"H200", 989.0},     {"A100", 312.0},
    };
    for (size_t i = 0; name && i < sizeof table / sizeof table[0]; i++)
        if (strstr(name, table[i].part)) return table[i].tflops;
    return 0;
}

/* Peak resident host memory of this process so far, in bytes (getrusage's ru_maxrss). */
static double peak_rss_bytes(void) {
    struct rusage ru;
    return getrusage(RUSAGE_SELF, &ru) == 0 ? (double)ru.ru_maxrss * 1024.0 : -1;
}

#ifdef USE_CUDA
/* ---------------------------------------------------------------------------------------
 * The loader
 * ------------------------------------------------------------------------------------- */
#include <fcntl.h>
#include "04_gpu.h"

/* Values per staging buffer: 16M, 32 MiB of bf16 (tests make it small and odd, so tensors
 * cross chunk boundaries). Read when a loader opens. */
static size_t g_load_chunk = (size_t)1 << 24;

typedef struct {
    ModelFiles mf;               /* 02's: the files, every tensor's file and place */
    int *fds;                    /* [mf.n_files] read descriptors */
    size_t chunk;                /* values per chunk (g_load_chunk) */
    uint16_t *stage[2];          /* [chunk] pinned bf16 staging buffers */
    void *raw;                   /* [chunk * 8] pageable: a chunk as the file holds it (fp16, fp32, fp64) */
    cudaStream_t stream;
    cudaEvent_t copied[2];       /* the copy out of stage[b] is done */
    int next;                    /* the buffer the next chunk goes into */
    double bytes_read, seconds;  /* what was read, and the wall time spent in gpu_load_* */
} GpuLoader;

/* Opens dir's weights for config c. -1 + last_error() (naming the file) on bad input. */
static API int gpu_loader_open(GpuLoader *ld, const char *dir, const Config *c) {
    memset(ld, 0, sizeof *ld);
    double t0 = now_seconds();
    if (model_files_open(&ld->mf, dir, c) != 0) return -1;
    ld->fds = (int *)xcalloc(ld->mf.n_files, sizeof(int));
    for (size_t k = 0; k < ld->mf.n_files; k++)
        if ((ld->fds[k] = open(ld->mf.files[k].path, O_RDONLY)) < 0) {
            set_error("cannot open %s: %s", ld->mf.files[k].path, strerror(errno));
            for (size_t j = 0; j < k; j++) close(ld->fds[j]);
            free(ld->fds);
            model_files_close(&ld->mf);
            return -1;
        }
    ld->chunk = g_load_chunk;
    for (int b = 0; b < 2; b++) {
        CUDA_CHECK(cudaMallocHost((void **)&ld->stage[b], ld->chunk * sizeof(uint16_t)));
        CUDA_CHECK(cudaEventCreateWithFlags(&ld->copied[b], cudaEventDisableTiming));
        CUDA_CHECK(cudaEventRecord(ld->copied[b], 0));
    }
    ld->raw = xmalloc(ld->chunk * 8);
    CUDA_CHECK(cudaStreamCreate(&ld->stream)); /* blocking: ordered with the default stream the kernels and memsets use */
    ld->seconds += now_seconds() - t0;
    return 0;
}

/* Waits for the last copies; the loader stays open. */
static void gpu_loader_sync(GpuLoader *ld) {
    double t0 = now_seconds();
    CUDA_CHECK(cudaStreamSynchronize(ld->stream));
    ld->seconds += now_seconds() - t0;
}

static API void gpu_loader_close(GpuLoader *ld) {
    if (!ld->fds) return;
    gpu_loader_sync(ld);
    for (int b = 0; b < 2; b++) {
        CUDA_CHECK(cudaFreeHost(ld->stage[b]));
        CUDA_CHECK(cudaEventDestroy(ld->copied[b]));
    }
    CUDA_CHECK(cudaStreamDestroy(ld->stream));
    for (size_t k = 0; k < ld->mf.n_files; k++) close(ld->fds[k]);
    free(ld->fds);
    free(ld->raw);
    model_files_close(&ld->mf);
    memset(ld, 0, sizeof *ld);
}

/* Reads len bytes at offset off of file k into buf; -1 + last_error() when the file ends
 * early (it was cut after it was opened) or cannot be read. */
static int load_pread(GpuLoader *ld, size_t k, void *buf, size_t len, size_t off) {
    size_t done = 0;
    while (done < len) {
        ssize_t r = pread(ld->fds[k], (char *)buf + done, len - done, (off_t)(off + done));
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) return set_error("cannot read %s: %s", ld->mf.files[k].path, strerror(errno));
        if (r == 0) return set_error("%s ends at byte %zu, inside its tensor data (the file is truncated)", ld->mf.files[k].path, off + done);
        done += (size_t)r;
    }
    ld->bytes_read += (double)len;
    return 0;
}

/* dst [to - from] (device) = values [from, to) of tensor i (in mf.refs' order) as bf16.
 * Returns once the last chunk's copy is queued (gpu_loader_sync waits for it). -1 +
 * last_error() on a read error. */
static API int gpu_load_slice(GpuLoader *ld, size_t i, size_t from, size_t to, uint16_t *dst) {
    double t0 = now_seconds();
    const StTensor *t = ld->mf.found[i];
    const SafeTensors *f = ld->mf.found_in[i];
    size_t k = (size_t)(f - ld->mf.files), esize = DTYPE_SIZES[t->dtype];
    size_t base = (size_t)(t->data - f->file.data); /* the tensor's byte offset in its file */
    CHECK(from <= to && to <= t->numel, "slice [%zu, %zu) of tensor %s (%zu values)", from, to, t->name, t->numel);
    for (size_t at = from; at < to; at += ld->chunk) {
        size_t n = to - at < ld->chunk ? to - at : ld->chunk;
        int b = ld->next;
        ld->next ^= 1;
        CUDA_CHECK(cudaEventSynchronize(ld->copied[b])); /* this buffer's previous copy is done */
        uint16_t *st = ld->stage[b];
        if (t->dtype == DT_BF16) {
            if (load_pread(ld, k, st, n * 2, base + at * 2) != 0) return -1;
        } else {
            if (load_pread(ld, k, ld->raw, n * esize, base + at * esize) != 0) return -1;
            const uint8_t *r = (const uint8_t *)ld->raw;
#pragma omp parallel for schedule(static)
            for (size_t j = 0; j < n; j++) { /* as st_to_f32 reads them, then f32_to_bf16 */
                float v;
                if (t->dtype == DT_F32) memcpy(&v, r + 4 * j, 4);
                else if (t->dtype == DT_F16) { uint16_t h; memcpy(&h, r + 2 * j, 2); v = f16_to_f32(h); }
                else { double d; memcpy(&d, r + 8 * j, 8); v = (float)d; }
                st[j] = f32_to_bf16(v);
            }
        }
        CUDA_CHECK(cudaMemcpyAsync(dst + (at - from), st, n * sizeof(uint16_t), cudaMemcpyHostToDevice, ld->stream));
        CUDA_CHECK(cudaEventRecord(ld->copied[b], ld->stream));
    }
    ld->seconds += now_seconds() - t0;
    return 0;
}

/* The whole tensor named `name` into dst (device, [numel] bf16); dies with one sentence on
 * a read error. */
static API void gpu_load_named(GpuLoader *ld, const char *name, uint16_t *dst, size_t numel) {
    long i = model_files_find(&ld->mf, name);
    CHECK(i >= 0, "the loader has no tensor %s", name);
    CHECK(ld->mf.found[i]->numel == numel, "tensor %s has %zu values, not %zu", name, ld->mf.found[i]->numel, numel);
    if (gpu_load_slice(ld, (size_t)i, 0, numel, dst) != 0) die("%s", last_error());
}

/* "13.48 GB read from 3 files in 5.1 s (2.6 GB/s), peak host RSS 2.10 GB" into buf [cap]. */
static void gpu_loader_summary(const GpuLoader *ld, char *buf, size_t cap) {
    snprintf(buf, cap, "%.2f GB read from %zu file%s in %.1f s (%.2f GB/s), peak host RSS %.2f GB", ld->bytes_read / 1e9, ld->mf.n_files,
             ld->mf.n_files == 1 ? "" : "s", ld->seconds, ld->seconds > 0 ? ld->bytes_read / 1e9 / ld->seconds : 0.0, peak_rss_bytes() / 1e9);
}

/* The name of the GPU this process uses, or NULL when it sees none. */
static const char *gpu_visible_name(char *buf, size_t cap) {
    int n = 0, dev = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) { cudaGetLastError(); return NULL; }
    struct cudaDeviceProp prop;
    CUDA_CHECK(cudaGetDevice(&dev));
    CUDA_CHECK(cudaGetDeviceProperties(&prop, dev));
    snprintf(buf, cap, "%s", prop.name);
    return buf;
}
#endif /* USE_CUDA */

#endif /* LOAD_04_C */
