/* tests/test_gpu_load.c: 04_load.c's GPU loader against 02's CPU loader, bit for bit.
 *
 * Tiny HF folders written here with fresh random weights (a LLaMA with an untied head, and a
 * Qwen2 with q, k, v biases; 2 layers, D 128, F 200, V 77) in every dtype the loader takes:
 * bf16 (random bits), fp16 (random finite bits, subnormals too), fp32 (random values, every
 * 17th one a tie of bf16 rounding, so round-to-nearest-even is exercised); as one
 * model.safetensors and as 3 shards + model.safetensors.index.json with the tensors spread
 * over them. The staging chunk is made 1000 values, so tensors cross chunk boundaries and
 * both staging buffers take turns.
 *  1. every tensor the loader puts on the GPU equals 02's fp32 load (model_try_load) rounded
 *     by f32_to_bf16, bit for bit, whole and as a random slice [a, z) (what a rank reads under
 *     --shard-weights); the destination is poisoned first;
 *  2. 05's GPU step set up from the files (a host model holding only embed and the norms,
 *     model_try_load_host) holds the same bits as the one set up from the whole fp32 host
 *     model, every frozen matrix, bias and the head;
 *  3. a truncated shard: 05_train --device gpu ends with one sentence naming the file and
 *     exit 1; a file cut after the loader opened it: the loader's read says it is truncated.
 * Without a GPU it exits 77.
 */
#define STAGE 0
#include "../05_train.c"
#include "check.h"
#include "split_args.h"

#include <sys/wait.h>

static char g_tmp[256];
static const char *g_self;

/* config.json of the fixture: arch "llama" (untied head) or "qwen2" (biases, tied head) */
static void write_config(const char *dir, const char *arch) {
    char path[512];
    FILE *f = fopen(path_join(path, sizeof path, dir, "config.json"), "w");
    CHECK(f, "cannot write %s", path);
    int qwen = !strcmp(arch, "qwen2");
    fprintf(f, "{\"architectures\": [\"%s\"], \"model_type\": \"%s\", \"hidden_size\": 128, \"intermediate_size\": 200,\n"
               " \"num_hidden_layers\": 2, \"num_attention_heads\": 2, \"num_key_value_heads\": 1, \"vocab_size\": 77,\n"
               " \"rms_norm_eps\": 1e-5, \"rope_theta\": 10000.0, \"max_position_embeddings\": 128, \"tie_word_embeddings\": %s}\n",
            qwen ? "Qwen2ForCausalLM" : "LlamaForCausalLM", arch, qwen ? "true" : "false");
    fclose(f);
}

/* Random raw values of dtype dt for numel elements, into a new buffer. */
static void *random_values(DType dt, size_t numel, Rng *r) {
    void *buf = xmalloc(numel * DTYPE_SIZES[dt]);
    for (size_t i = 0; i < numel; i++) {
        if (dt == DT_F32) {
            float v = 0.05f * rng_normal(r);
            if (i % 17 == 0) { uint32_t u; memcpy(&u, &v, 4); u = (u & 0xffff0000u) | 0x8000u; memcpy(&v, &u, 4); } /* a tie */
            ((float *)buf)[i] = v;
        } else if (dt == DT_BF16) {
            ((uint16_t *)buf)[i] = f32_to_bf16(0.05f * rng_normal(r));
        } else { /* fp16: sign, exponent 0..29 (0: subnormal), any mantissa: always finite */
            uint32_t e = (uint32_t)rng_below(r, 30), man = (uint32_t)rng_below(r, 1024), sign = (uint32_t)rng_below(r, 2);
            ((uint16_t *)buf)[i] = (uint16_t)(sign << 15 | e << 10 | man);
        }
    }
    return buf;
}

/* Writes a HF folder: config.json and the weights in dtype dt, in n_shards files. */
static void write_folder(const char *dir, const char *arch, DType dt, int n_shards, uint64_t seed) {
    CHECK(make_dir(dir) == 0, "%s", last_error());
    write_config(dir, arch);
    Config c;
    CHECK(model_read_config(&c, dir, 0) == 0, "%s", last_error());
    size_t n = params_list(NULL, &c, NULL);
    ParamRef *refs = (ParamRef *)xmalloc(n * sizeof(ParamRef));
    params_list(NULL, &c, refs);
    Rng r;
    rng_seed(&r, seed);
    void **vals = (void **)xcalloc(n, sizeof(void *));
    char path[512], shard_names[3][64];
    FILE *idx = NULL;
    if (n_shards > 1) {
        idx = fopen(path_join(path, sizeof path, dir, "model.safetensors.index.json"), "w");
        CHECK(idx, "cannot write %s", path);
        fprintf(idx, "{\"metadata\": {}, \"weight_map\": {");
    }
    for (int s = 0; s < n_shards; s++) {
        StWriter w = {0};
        if (n_shards > 1) snprintf(shard_names[s], sizeof shard_names[s], "model-%05d-of-%05d.safetensors", s + 1, n_shards);
        else snprintf(shard_names[s], sizeof shard_names[s], "model.safetensors");
        for (size_t i = 0; i < n; i++) {
            if ((int)(i % (size_t)n_shards) != s) continue;
            size_t numel = (size_t)refs[i].shape[0] * (size_t)refs[i].shape[1];
            vals[i] = random_values(dt, numel, &r);
            st_writer_add(&w, refs[i].name, dt, refs[i].ndim, refs[i].shape, vals[i]);
            if (idx) fprintf(idx, "%s\"%s\": \"%s\"", i ? ", " : "", refs[i].name, shard_names[s]);
        }
        CHECK(st_write(&w, path_join(path, sizeof path, dir, shard_names[s])) == 0, "%s", last_error());
        st_writer_free(&w);
    }
    if (idx) { fprintf(idx, "}}\n"); fclose(idx); }
    for (size_t i = 0; i < n; i++) free(vals[i]);
    free(vals);
    free(refs);
}

static uint16_t *device_poisoned(size_t numel) {
    uint16_t *d = (uint16_t *)gpu_malloc(numel * sizeof(uint16_t), "a test tensor");
    CUDA_CHECK(cudaMemset(d, 0xff, numel * sizeof(uint16_t))); /* NaN bits */
    return d;
}

/* 0 where dev [numel] (device) holds exactly want [numel]; else the first differing index + 1. */
static size_t first_diff(const uint16_t *dev, const uint16_t *want, size_t numel) {
    uint16_t *got = (uint16_t *)xmalloc(numel * sizeof(uint16_t));
    CUDA_CHECK(cudaMemcpy(got, dev, numel * sizeof(uint16_t), cudaMemcpyDeviceToHost));
    size_t bad = 0;
    for (size_t i = 0; i < numel && !bad; i++) if (got[i] != want[i]) bad = i + 1;
    free(got);
    return bad;
}

/* Part 1: every tensor, whole and a slice, against the CPU loader's values rounded to bf16. */
static void check_loader(const char *dir, const char *what, Rng *r) {
    Model m;
    CHECK(model_try_load(&m, dir, 0) == 0, "%s", last_error());
    size_t n = params_list(&m.w, &m.cfg, NULL);
    ParamRef *refs = (ParamRef *)xmalloc(n * sizeof(ParamRef));
    params_list(&m.w, &m.cfg, refs);
    GpuLoader ld;
    CHECK(gpu_loader_open(&ld, dir, &m.cfg) == 0, "%s", last_error());
    size_t bad_whole = 0, bad_slice = 0, values = 0;
    for (size_t i = 0; i < n; i++) {
        size_t numel = (size_t)refs[i].shape[0] * (size_t)refs[i].shape[1];
        uint16_t *want = (uint16_t *)xmalloc(numel * sizeof(uint16_t));
        for (size_t k = 0; k < numel; k++) want[k] = f32_to_bf16(refs[i].data[k]);
        uint16_t *whole = device_poisoned(numel), *slice = device_poisoned(numel);
        size_t a = (size_t)rng_below(r, numel), z = a + (size_t)rng_below(r, numel - a + 1);
        long li = model_files_find(&ld.mf, refs[i].name);
        EXPECT(li == (long)i, "%s: the loader lists %s at %ld, not %zu", what, refs[i].name, li, i);
        EXPECT(gpu_load_slice(&ld, i, 0, numel, whole) == 0 && gpu_load_slice(&ld, i, a, z, slice) == 0, "%s: %s", what, last_error());
        gpu_loader_sync(&ld);
        size_t d = first_diff(whole, want, numel);
        if (d && !bad_whole++) printf("  %s: %s differs at value %zu\n", what, refs[i].name, d - 1);
        d = z > a ? first_diff(slice, want + a, z - a) : 0;
        if (d && !bad_slice++) printf("  %s: %s's slice [%zu, %zu) differs at value %zu\n", what, refs[i].name, a, z, a + d - 1);
        values += numel;
        CUDA_CHECK(cudaFree(whole));
        CUDA_CHECK(cudaFree(slice));
        free(want);
    }
    EXPECT(bad_whole == 0 && bad_slice == 0, "%s: %zu whole tensors and %zu slices differ from the CPU loader's bf16 rounding", what, bad_whole, bad_slice);
    printf("  %-24s %zu tensors (%zu values), whole and sliced: %s; %.0f bytes read\n", what, n, values,
           bad_whole || bad_slice ? "DIFFER" : "bit for bit", ld.bytes_read);
    gpu_loader_close(&ld);
    free(refs);
    model_free(&m);
}

/* Part 2: 05's GPU step from the files equals 05's GPU step from the whole fp32 host model. */
static void check_train_init(const char *dir, const char *what) {
    Model full, light;
    CHECK(model_try_load(&full, dir, 0) == 0 && model_try_load_host(&light, dir, 0, 0) == 0, "%s", last_error());
    EXPECT(light.w.layers[0].wq == NULL && light.w.embed != NULL, "%s: the host model for the GPU holds embed and no projections", what);
    LoraConfig lc = lora_default_config();
    LoraAdapter ad_full, ad_light;
    CHECK(lora_init(&ad_full, &full.cfg, &lc) == 0 && lora_init(&ad_light, &light.cfg, &lc) == 0, "%s", last_error());
    AdamWConfig oc = adamw_default_config();
    LoraTrainer lt_full, lt_light;
    lora_trainer_init(&lt_full, &full, &ad_full, &oc, 0, 0, 0);
    lora_trainer_init(&lt_light, &light, &ad_light, &oc, 0, 0, 0);
    GpuTrainer a, b;
    gpu_train_init(&a, &full, &ad_full, &lt_full.opt, 0);
    tg_weights_dir = dir;
    gpu_train_init(&b, &light, &ad_light, &lt_light.opt, 0);
    tg_weights_dir = NULL;
    EXPECT(b.load_note[0] && !a.load_note[0], "%s: only the set-up from the files has a load note", what);
    const Config *c = &full.cfg;
    size_t bad = 0, checked = 0;
    for (int l = 0; l < c->n_layers; l++) {
        const uint16_t *wa[N_PROJ] = {a.layers[l].wq, a.layers[l].wk, a.layers[l].wv, a.layers[l].wo, a.layers[l].w_gate, a.layers[l].w_up, a.layers[l].w_down};
        const uint16_t *wb[N_PROJ] = {b.layers[l].wq, b.layers[l].wk, b.layers[l].wv, b.layers[l].wo, b.layers[l].w_gate, b.layers[l].w_up, b.layers[l].w_down};
        for (int w = 0; w < N_PROJ; w++) {
            size_t in, out;
            proj_shape(c, w, &in, &out);
            uint16_t *host = (uint16_t *)xmalloc(in * out * sizeof(uint16_t));
            CUDA_CHECK(cudaMemcpy(host, wa[w], in * out * 2, cudaMemcpyDeviceToHost));
            bad += first_diff(wb[w], host, in * out) != 0;
            checked++;
            if (w <= PROJ_V && c->qkv_bias) {
                CUDA_CHECK(cudaMemcpy(host, a.layers[l].bias[w], out * 2, cudaMemcpyDeviceToHost));
                bad += first_diff(b.layers[l].bias[w], host, out) != 0;
                checked++;
            }
            free(host);
        }
    }
    size_t VD = (size_t)c->vocab_size * c->dim;
    uint16_t *host = (uint16_t *)xmalloc(VD * sizeof(uint16_t));
    CUDA_CHECK(cudaMemcpy(host, a.lm_head, VD * 2, cudaMemcpyDeviceToHost));
    bad += first_diff(b.lm_head, host, VD) != 0;
    CUDA_CHECK(cudaMemcpy(host, a.embed.w, VD * 2, cudaMemcpyDeviceToHost));
    bad += first_diff(b.embed.w, host, VD) != 0;
    checked += 2;
    free(host);
    EXPECT(bad == 0, "%s: %zu of %zu GPU tensors of the step set up from the files differ from the host model's", what, bad, checked);
    printf("  %-24s 05's GPU step from the files: %zu tensors %s (%s)\n", what, checked, bad ? "DIFFER" : "equal the host model's", b.load_note);
    gpu_train_free(&a);
    gpu_train_free(&b);
    lora_trainer_free(&lt_full);
    lora_trainer_free(&lt_light);
    lora_free(&ad_full);
    lora_free(&ad_light);
    model_free(&full);
    model_free(&light);
}

/* Runs this program as 05_train (--train FLAGS) with stderr captured; returns the exit status. */
static int run_train(const char *flags, char *err, size_t cap) {
    char buf[2048];
    snprintf(buf, sizeof buf, "%s --train %s", g_self, flags);
    char *argv[64];
    split_args(buf, argv, 64);
    int fd[2];
    CHECK(pipe(fd) == 0, "pipe: %s", strerror(errno));
    fflush(stdout);
    pid_t pid = fork();
    CHECK(pid >= 0, "fork: %s", strerror(errno));
    if (pid == 0) {
        close(fd[0]);
        dup2(fd[1], 2);
        int devnull = open("/dev/null", O_WRONLY);
        dup2(devnull, 1);
        execv(g_self, argv);
        _exit(98);
    }
    close(fd[1]);
    size_t len = 0;
    ssize_t got;
    while (len + 1 < cap && (got = read(fd[0], err + len, cap - 1 - len)) > 0) len += (size_t)got;
    err[len] = 0;
    close(fd[0]);
    int status = 0;
    waitpid(pid, &status, 0);
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

/* Part 3: truncated shards. */
static void check_truncated(const char *dir) {
    char shard[512], data[512], out[512], flags[2048], err[4096];
    path_join(shard, sizeof shard, dir, "model-00002-of-00003.safetensors");
    int32_t ids[256];
    for (int i = 0; i < 256; i++) ids[i] = i % 77;
    CHECK(tokfile_write(path_join(data, sizeof data, g_tmp, "data.tok"), ids, 256, 77) == 0, "%s", last_error());
    path_join(out, sizeof out, g_tmp, "run");
    snprintf(flags, sizeof flags, "--model %s --data %s --ctx 16 --max-steps 1 --device gpu --out %s", dir, data, out);
    int rc = run_train(flags, err, sizeof err);
    EXPECT(rc == 0, "05_train --device gpu on the intact folder ran (exit %d): %s", rc, err);
    EXPECT(strstr(err, "error") == NULL, "no error on the intact folder: %s", err);
    /* a loader that opened the intact file, then the file is cut */
    Config c;
    CHECK(model_read_config(&c, dir, 0) == 0, "%s", last_error());
    GpuLoader ld;
    CHECK(gpu_loader_open(&ld, dir, &c) == 0, "%s", last_error());
    struct stat st;
    CHECK(stat(shard, &st) == 0, "stat %s", shard);
    CHECK(truncate(shard, st.st_size - 1000) == 0, "truncate %s: %s", shard, strerror(errno));
    size_t cut = 0, n_bad = 0;
    for (size_t i = 0; i < ld.mf.n; i++) {
        if (strcmp(ld.mf.found_in[i]->path, shard) != 0) continue;
        uint16_t *d = device_poisoned(ld.mf.found[i]->numel);
        if (gpu_load_slice(&ld, i, 0, ld.mf.found[i]->numel, d) != 0) {
            n_bad++;
            if (!cut++) printf("  cut after opening: %s\n", last_error());
            EXPECT(strstr(last_error(), "truncated") && strstr(last_error(), shard), "the read names the file and says it is truncated: %s", last_error());
        }
        gpu_loader_sync(&ld);
        CUDA_CHECK(cudaFree(d));
    }
    EXPECT(n_bad >= 1, "a read past the cut end of %s fails", shard);
    gpu_loader_close(&ld);
    /* the cut file, opened from the start */
    snprintf(flags, sizeof flags, "--model %s --data %s --ctx 16 --max-steps 1 --device gpu --out %s --overwrite", dir, data, out);
    rc = run_train(flags, err, sizeof err);
    size_t lines = 0;
    for (const char *p = err; *p; p++) lines += *p == '\n';
    printf("  truncated shard, 05_train --device gpu: exit %d: %s", rc, err);
    EXPECT(rc == 1, "05_train --device gpu on a truncated shard exits 1, not %d", rc);
    EXPECT(lines == 1 && !strncmp(err, "error: ", 7) && strstr(err, "model-00002-of-00003.safetensors"),
           "one sentence naming the shard: '%s'", err);
}

int main(int argc, char **argv) {
    if (argc > 1 && !strcmp(argv[1], "--train")) return train_main(argc - 1, argv + 1);
    g_self = argv[0];
    int n_gpu = 0;
    if (cudaGetDeviceCount(&n_gpu) != cudaSuccess || n_gpu == 0) {
        printf("skip: no GPU\n");
        return 77;
    }
    snprintf(g_tmp, sizeof g_tmp, "/tmp/test_gpu_load.XXXXXX");
    CHECK(mkdtemp(g_tmp), "mkdtemp: %s", strerror(errno));
    g_load_chunk = 1000;
    uint64_t seed = (uint64_t)time(NULL);
    printf("seed %llu; staging chunks of %zu values\n", (unsigned long long)seed, g_load_chunk);
    Rng r;
    rng_seed(&r, seed);
    const DType dts[3] = {DT_BF16, DT_F16, DT_F32};
    const char *archs[2] = {"llama", "qwen2"};
    char sharded_bf16[512] = "";
    for (int a = 0; a < 2; a++)
        for (int k = 0; k < 3; k++)
            for (int shards = 1; shards <= 3; shards += 2) {
                char dir[512], name[64], what[96];
                snprintf(name, sizeof name, "%s-%s-%d", archs[a], DTYPE_NAMES[dts[k]], shards);
                snprintf(what, sizeof what, "%s %s, %d file%s", archs[a], DTYPE_NAMES[dts[k]], shards, shards > 1 ? "s" : "");
                path_join(dir, sizeof dir, g_tmp, name);
                write_folder(dir, archs[a], dts[k], shards, seed + (uint64_t)(a * 10 + k * 2 + shards));
                check_loader(dir, what, &r);
                check_train_init(dir, what);
                if (a == 0 && dts[k] == DT_BF16 && shards == 3) snprintf(sharded_bf16, sizeof sharded_bf16, "%s", dir);
            }
    check_truncated(sharded_bf16);
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf %s", g_tmp);
    if (system(cmd) != 0) printf("note: could not remove %s\n", g_tmp);
    printf("test_gpu_load: %d checks, %d failed\n", g_checks, g_failures);
    return g_failures ? 1 : 0;
}
