/* 05_checkpoint.c: checkpoints that resume exactly (05_train.c includes it).
 *
 * OUT/checkpoint-<step>/ holds
 *   adapter_config.json, adapter_model.safetensors   the PEFT adapter (03's writer), loadable by peft
 *   train_state.safetensors   every trainable tensor in fp32 (its master copy) with its AdamW
 *                             moments "<name>.exp_avg", "<name>.exp_avg_sq", and the data
 *                             order of the current epoch "data.order" [n_seqs]
 *   trainer_state.json        step, AdamW step count, data epoch and position, the RNG
 *                             states, and the run's settings: those that shape the data and
 *                             the tensors (--ctx, --batch, LoRA, the trained parts) must not
 *                             change on resume; lr, warmup, --lr-scheduler and --max-steps may
 * The folder is written as OUT/.checkpoint-<step>.tmp.<pid> and renamed into place, so a
 * crash mid-save never leaves a half checkpoint under the real name.
 * Checked by: tests/test_train.c (exact resume, malformed and foreign checkpoints, SIGINT),
 * tests/test_dist_train.sh (resume across world sizes), tests/test_gpu_train_resume.c.
 */
#ifndef TRAIN_CHECKPOINT_C
#define TRAIN_CHECKPOINT_C

#define TRAINER_STATE_FORMAT "longlora-c trainer state"
#define TRAINER_STATE_VERSION 2 /* 2: "checksums" of the other files; 1 (without them) still loads */

/* The files of a checkpoint whose checksums trainer_state.json records (common.h's checksum64). */
#define CHECKPOINT_N_SUMMED 3
static const char *const CHECKPOINT_SUMMED[CHECKPOINT_N_SUMMED] = {"adapter_config.json", "adapter_model.safetensors", "train_state.safetensors"};

static void rng_to_hex(const Rng *r, char out[4][17]) {
    for (int i = 0; i < 4; i++) snprintf(out[i], 17, "%016llx", (unsigned long long)r->s[i]);
}
static int rng_from_json(Rng *r, const Json *arr, const char *path, const char *what) {
    if (!arr || arr->type != JSON_ARRAY || arr->count != 4) return set_error("%s: \"%s\" must be a list of 4 hex strings", path, what);
    for (int i = 0; i < 4; i++) {
        const Json *s = &arr->items[i];
        char *end;
        if (s->type != JSON_STRING || s->len != 16) return set_error("%s: \"%s\" must be a list of 4 hex strings", path, what);
        errno = 0;
        r->s[i] = (uint64_t)strtoull(s->string, &end, 16);
        if (*end != 0 || errno) return set_error("%s: \"%s\" must be a list of 4 hex strings", path, what);
    }
    if (!(r->s[0] | r->s[1] | r->s[2] | r->s[3])) return set_error("%s: \"%s\" is all zero", path, what);
    return 0;
}

static int write_trainer_state_json(const Trainer *t, const char *path, double last_loss, const uint64_t *sums /* [CHECKPOINT_N_SUMMED] */) {
    AtomicFile af;
    if (atomic_open(&af, path) != 0) return -1;
    FILE *f = af.f;
    const TrainOptions *o = &t->opt;
    char data_rng[4][17], drop_rng[4][17];
    rng_to_hex(&t->data.rng, data_rng);
    rng_to_hex(&t->lora.drop_rng, drop_rng);
    fprintf(f, "{\n  \"format\": \"%s\",\n  \"version\": %d,\n", TRAINER_STATE_FORMAT, TRAINER_STATE_VERSION);
    fprintf(f, "  \"step\": %d,\n  \"adamw_steps\": %ld,\n  \"last_loss\": %.9g,\n", t->step, t->lt.opt.steps_taken, last_loss);
    fprintf(f, "  \"data\": {\"kind\": \"%s\", \"epoch\": %llu, \"position\": %zu, \"sequences\": %zu, \"fingerprint\": \"%016llx\"},\n",
            t->data.stream ? "packed" : "sft", (unsigned long long)t->data.epoch, t->data.pos, t->data.n_seqs,
            (unsigned long long)t->data.fingerprint);
    fprintf(f, "  \"data_rng\": [\"%s\", \"%s\", \"%s\", \"%s\"],\n", data_rng[0], data_rng[1], data_rng[2], data_rng[3]);
    fprintf(f, "  \"dropout_rng\": [\"%s\", \"%s\", \"%s\", \"%s\"],\n", drop_rng[0], drop_rng[1], drop_rng[2], drop_rng[3]);
    /* grad_accum is the global one (ranks x --grad-accum): the files do not depend on the world size */
    fprintf(f, "  \"world_size\": %d,\n", comm_world());
    fprintf(f, "  \"checksums\": {");
    for (int i = 0; i < CHECKPOINT_N_SUMMED; i++) fprintf(f, "%s\"%s\": \"%016llx\"", i ? ", " : "", CHECKPOINT_SUMMED[i], (unsigned long long)sums[i]);
    fprintf(f, "},\n");
    fprintf(f, "  \"settings\": {\"ctx\": %d, \"group\": %d, \"batch\": %d, \"grad_accum\": %d, \"lora_rank\": %d, "
               "\"lora_alpha\": %.17g, \"train_embed\": %d, \"train_norms\": %d, \"seed\": \"%llu\", \"lr\": %.9g, \"warmup\": %d, "
               "\"lr_scheduler\": \"%s\", \"max_steps\": %d}\n}\n",
            o->ctx, o->group, o->batch, o->grad_accum * comm_world(), o->lora_rank, o->lora_alpha, o->train_embed, o->train_norms,
            (unsigned long long)o->seed, o->lr, o->warmup, LR_SCHEDULE_NAMES[o->lr_scheduler], o->max_steps);
    return atomic_commit(&af);
}

/* Writes OUT/checkpoint-<step> whole or not at all (common.h's AtomicDir). -1 + last_error()
 * on failure (the previous checkpoint stays). */
static int checkpoint_save(Trainer *t, double last_loss) {
    const TrainOptions *o = &t->opt;
    char path[4700], name[64];
    AtomicDir d;
    snprintf(name, sizeof name, "checkpoint-%d", t->step);
    if (make_dir(o->out_dir) != 0 || atomic_dir_begin(&d, o->out_dir, name) != 0) return -1;
    int rc = lora_write_adapter_files(&t->lora, &t->model, d.tmp_dir, o->model_dir);
    if (rc == 0) {
        /* fp32 trainable tensors, their moments, and the epoch's data order */
        StWriter sw = {0};
        size_t n = t->lt.opt.count;
        char (*names)[200] = (char (*)[200])xmalloc((3 * n + 1) * sizeof *names); /* [3n] param, m, v names */
        int64_t *order = (int64_t *)xmalloc(t->data.n_seqs * sizeof(int64_t)); /* [n_seqs] */
        for (size_t i = 0; i < t->data.n_seqs; i++) order[i] = t->data.order[i];
        for (size_t k = 0; k < n; k++) {
            const TrainParam *p = &t->lt.opt.params[k];
            int64_t shape[1] = {(int64_t)p->numel};
            snprintf(names[3 * k], sizeof names[0], "%s", p->name);
            snprintf(names[3 * k + 1], sizeof names[0], "%s.exp_avg", p->name);
            snprintf(names[3 * k + 2], sizeof names[0], "%s.exp_avg_sq", p->name);
            st_writer_add(&sw, names[3 * k], DT_F32, 1, shape, p->param);
            st_writer_add(&sw, names[3 * k + 1], DT_F32, 1, shape, p->m);
            st_writer_add(&sw, names[3 * k + 2], DT_F32, 1, shape, p->v);
        }
        int64_t oshape[1] = {(int64_t)t->data.n_seqs};
        st_writer_add(&sw, "data.order", DT_I64, 1, oshape, order);
        rc = st_write(&sw, path_join(path, sizeof path, d.tmp_dir, "train_state.safetensors"));
        st_writer_free(&sw);
        free(names);
        free(order);
    }
    /* the checksums of what is in the folder now, for the resume to verify */
    uint64_t sums[CHECKPOINT_N_SUMMED];
    for (int i = 0; i < CHECKPOINT_N_SUMMED && rc == 0; i++) rc = checksum_file(path_join(path, sizeof path, d.tmp_dir, CHECKPOINT_SUMMED[i]), &sums[i]);
    if (rc == 0) rc = write_trainer_state_json(t, path_join(path, sizeof path, d.tmp_dir, "trainer_state.json"), last_loss, sums);
    if (rc == 0) rc = atomic_dir_commit(&d);
    else atomic_dir_abort(&d);
    if (rc != 0) return error_in("saving the checkpoint of step %d failed", t->step);
    snprintf(t->last_checkpoint, sizeof t->last_checkpoint, "%s", d.final_dir);
    return 0;
}

/* With --save-total-limit K, removes all but the newest K checkpoint-<step> folders of OUT. */
static void prune_checkpoints(const TrainOptions *o) {
    if (o->save_total_limit <= 0) return;
    DIR *d = opendir(o->out_dir);
    if (!d) return;
    long *steps = NULL;
    size_t n = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        long s;
        int used = 0;
        if (sscanf(e->d_name, "checkpoint-%ld%n", &s, &used) == 1 && e->d_name[used] == 0 && s >= 0) {
            steps = (long *)xrealloc(steps, (n + 1) * sizeof(long));
            steps[n++] = s;
        }
    }
    closedir(d);
    for (size_t i = 0; i < n; i++) { /* newest first */
        size_t newer = 0;
        for (size_t j = 0; j < n; j++) newer += steps[j] > steps[i];
        if (newer < (size_t)o->save_total_limit) continue;
        char name[64], path[4200];
        snprintf(name, sizeof name, "checkpoint-%ld", steps[i]);
        if (remove_flat_dir(path_join(path, sizeof path, o->out_dir, name)) != 0) fprintf(stderr, "warning: %s\n", last_error());
    }
    free(steps);
}

/* The checkpoint folder --resume DIR means: DIR itself when it holds trainer_state.json,
 * else the checkpoint-<step> inside it with the largest step. */
static int checkpoint_find(const char *dir, char *out, size_t cap) {
    char path[4096];
    if (file_exists(path_join(path, sizeof path, dir, "trainer_state.json"))) { snprintf(out, cap, "%s", dir); return 0; }
    DIR *d = opendir(dir);
    if (!d) return set_error("cannot open the --resume folder %s: %s", dir, strerror(errno));
    long best = -1;
    struct dirent *e;
    while ((e = readdir(d))) {
        long s;
        int used = 0;
        if (sscanf(e->d_name, "checkpoint-%ld%n", &s, &used) == 1 && e->d_name[used] == 0 && s > best) {
            char sub[4096];
            path_join(sub, sizeof sub, dir, e->d_name);
            if (file_exists(path_join(path, sizeof path, sub, "trainer_state.json"))) best = s;
        }
    }
    closedir(d);
    if (best < 0) return set_error("%s is not a checkpoint folder and holds no checkpoint-<step> folder", dir);
    char name[64];
    snprintf(name, sizeof name, "checkpoint-%ld", best);
    path_join(out, cap, dir, name);
    return 0;
}

static int json_int_field(const Json *obj, const char *key, double lo, double hi, double *out, const char *path) {
    const Json *v = json_get_type(obj, key, JSON_NUMBER);
    if (!v || v->number != floor(v->number) || v->number < lo || v->number > hi)
        return set_error("%s: \"%s\" is missing or not an integer in range", path, key);
    *out = v->number;
    return 0;
}

/* Restores the trainer (whose model, adapter, optimizer and data are set up as for a fresh
 * run) from checkpoint folder dir. -1 + last_error() when the checkpoint is malformed or
 * belongs to another run (other data, --ctx, --batch, --grad-accum, LoRA shape or trained
 * parts). A changed --lr, --warmup, --lr-scheduler or --max-steps is the resumed run's own. */
static int checkpoint_load(Trainer *t, const char *dir) {
    char path[4096];
    Json *js = json_parse_file(path_join(path, sizeof path, dir, "trainer_state.json"));
    if (!js) return -1;
    const TrainOptions *o = &t->opt;
    int rc = 0;
    double step = 0, adam_steps = 0, epoch = 0, position = 0, sequences = 0;
    const Json *data = json_get_type(js, "data", JSON_OBJECT), *settings = json_get_type(js, "settings", JSON_OBJECT);
    if (js->type != JSON_OBJECT || strcmp(json_get_string(js, "format", ""), TRAINER_STATE_FORMAT) != 0)
        rc = set_error("%s is not a trainer state of this program", path);
    else if (json_get_number(js, "version", -1) != TRAINER_STATE_VERSION && json_get_number(js, "version", -1) != 1)
        rc = set_error("%s has version %g; this program reads versions 1 and %d", path, json_get_number(js, "version", -1), TRAINER_STATE_VERSION);
    else if (!data || !settings) rc = set_error("%s lacks \"data\" or \"settings\"", path);
    else if (json_int_field(js, "step", 0, INT32_MAX, &step, path) || json_int_field(js, "adamw_steps", 0, 9e15, &adam_steps, path) ||
             json_int_field(data, "epoch", 0, 9e15, &epoch, path) || json_int_field(data, "position", 0, 9e15, &position, path) ||
             json_int_field(data, "sequences", 0, 9e15, &sequences, path))
        rc = -1;
    if (rc == 0) {
        /* the settings that shape the data stream and the tensors must match */
        const char *keys[] = {"ctx", "group", "batch", "grad_accum", "lora_rank"};
        const char *flags[] = {"--ctx", "S2-Attn group (--group-ratio / --no-s2)", "--batch", "--grad-accum (times the ranks)", "--lora-rank"};
        int now[] = {o->ctx, o->group, o->batch, o->grad_accum * comm_world(), o->lora_rank};
        for (int i = 0; i < 5 && rc == 0; i++) {
            double was = json_get_number(settings, keys[i], -1);
            if (was != now[i]) rc = set_error("the checkpoint %s was trained with %s %g but this run asks for %d; resume with the same value",
                                              dir, flags[i], was, now[i]);
        }
        if (rc == 0 && json_get_number(settings, "lora_alpha", -1) != o->lora_alpha)
            rc = set_error("the checkpoint %s was trained with --lora-alpha %g but this run asks for %g", dir,
                           json_get_number(settings, "lora_alpha", -1), o->lora_alpha);
        /* the trained parts: the checkpoint holds exactly their tensors (one without these keys
         * trained LoRA+ whole); the schedule, like lr and warmup, is this run's to choose */
        const char *part_keys[2] = {"train_embed", "train_norms"}, *part_flags[2] = {"--no-train-embed", "--no-train-norms"};
        const char *part_names[2] = {"embed_tokens", "the norm weights"}, *part_its[2] = {"it", "them"};
        int part_now[2] = {o->train_embed, o->train_norms};
        for (int i = 0; i < 2 && rc == 0; i++) {
            int was = json_get_number(settings, part_keys[i], 1) != 0;
            if (was != (part_now[i] != 0))
                rc = set_error("the checkpoint %s %s %s%s, but this run %s %s; resume %s %s", dir, was ? "trained" : "kept", part_names[i],
                               was ? "" : " frozen", was ? "freezes" : "trains", part_its[i], was ? "without" : "with", part_flags[i]);
        }
        char fp[17];
        snprintf(fp, sizeof fp, "%016llx", (unsigned long long)t->data.fingerprint);
        if (rc == 0 && ((size_t)sequences != t->data.n_seqs || strcmp(json_get_string(data, "fingerprint", ""), fp) != 0))
            rc = set_error("the checkpoint %s was trained on other data (or another tokenizer or --template); resume with the same data", dir);
        if (rc == 0 && (size_t)position > t->data.n_seqs) rc = set_error("%s: data position %g is past the %zu sequences", path, position, t->data.n_seqs);
    }
    Rng data_rng, drop_rng;
    if (rc == 0 && (rng_from_json(&data_rng, json_get(js, "data_rng"), path, "data_rng") ||
                    rng_from_json(&drop_rng, json_get(js, "dropout_rng"), path, "dropout_rng")))
        rc = -1;
    /* version 2 records the checksum of each other file; they are verified below, after the
     * structure (so a damaged file still meets the validating readers first) */
    uint64_t sums[CHECKPOINT_N_SUMMED];
    int have_sums = rc == 0 && json_get_number(js, "version", -1) >= 2;
    const Json *sj = json_get_type(js, "checksums", JSON_OBJECT);
    for (int i = 0; i < CHECKPOINT_N_SUMMED && have_sums && rc == 0; i++) {
        const char *hex = json_get_string(sj, CHECKPOINT_SUMMED[i], NULL);
        char *end = NULL;
        if (hex && strlen(hex) == 16) sums[i] = (uint64_t)strtoull(hex, &end, 16);
        if (!hex || strlen(hex) != 16 || *end) rc = set_error("%s: \"checksums\" lacks a 16-digit hex checksum of %s", path, CHECKPOINT_SUMMED[i]);
    }
    json_free(js);
    if (rc != 0) return -1;

    /* tensors: check everything first, then copy */
    SafeTensors st;
    if (st_open(&st, path_join(path, sizeof path, dir, "train_state.safetensors")) != 0) return -1;
    size_t n = t->lt.opt.count;
    const StTensor **src = (const StTensor **)xcalloc(3 * n + 1, sizeof *src); /* [3n] param, m, v */
    char name[220];
    for (size_t k = 0; k < n && rc == 0; k++) {
        const TrainParam *p = &t->lt.opt.params[k];
        const char *suffix[3] = {"", ".exp_avg", ".exp_avg_sq"};
        for (int j = 0; j < 3 && rc == 0; j++) {
            snprintf(name, sizeof name, "%s%s", p->name, suffix[j]);
            const StTensor *x = st_find(&st, name);
            int64_t shape[1] = {(int64_t)p->numel};
            if (!x) rc = set_error("%s: tensor '%s' is missing (was the checkpoint made with other LoRA settings?)", st.path, name);
            else if (x->dtype != DT_F32) rc = set_error("%s: tensor '%s' is %s, not F32", st.path, name, DTYPE_NAMES[x->dtype]);
            else if (st_check_shape(x, 1, shape) != 0) rc = error_in("%s", st.path);
            src[3 * k + (size_t)j] = x;
        }
    }
    const StTensor *order = st_find(&st, "data.order");
    int64_t oshape[1] = {(int64_t)t->data.n_seqs};
    if (rc == 0 && (!order || order->dtype != DT_I64 || st_check_shape(order, 1, oshape) != 0))
        rc = set_error("%s: \"data.order\" is missing or is not I64 [%zu]", st.path, t->data.n_seqs);
    uint32_t *new_order = NULL;
    if (rc == 0) {
        /* must be a permutation of 0..n_seqs-1 */
        new_order = (uint32_t *)xmalloc((t->data.n_seqs ? t->data.n_seqs : 1) * sizeof(uint32_t)); /* [n_seqs] */
        uint8_t *seen = (uint8_t *)xcalloc(t->data.n_seqs ? t->data.n_seqs : 1, 1); /* [n_seqs] */
        for (size_t i = 0; i < t->data.n_seqs && rc == 0; i++) {
            int64_t v;
            memcpy(&v, order->data + 8 * i, 8);
            if (v < 0 || (uint64_t)v >= t->data.n_seqs || seen[v]) rc = set_error("%s: \"data.order\" is not a permutation of the sequences", st.path);
            else { seen[v] = 1; new_order[i] = (uint32_t)v; }
        }
        free(seen);
    }
    for (int i = 0; i < CHECKPOINT_N_SUMMED && have_sums && rc == 0; i++) {
        uint64_t got;
        if (checksum_file(path_join(path, sizeof path, dir, CHECKPOINT_SUMMED[i]), &got) != 0) rc = -1;
        else if (got != sums[i])
            rc = set_error("the checkpoint %s is damaged: %s does not match the checksum its trainer_state.json records "
                           "(the file changed after it was saved); resume from another checkpoint", dir, CHECKPOINT_SUMMED[i]);
    }
    /* a saved state is always finite (a run stops before a non-finite step), moments v >= 0 */
    for (size_t k = 0; k < 3 * n && rc == 0; k++) {
        const float *x = (const float *)(const void *)src[k]->data;
        for (size_t i = 0; i < src[k]->numel && rc == 0; i++) {
            float v;
            memcpy(&v, x + i, sizeof v);
            if (!isfinite(v) || (k % 3 == 2 && v < 0))
                rc = set_error("the checkpoint %s is damaged: tensor '%s' holds %s value %g; resume from another checkpoint", dir,
                               src[k]->name, isfinite(v) ? "a negative second-moment" : "a non-finite", (double)v);
        }
    }
    if (rc == 0) {
        for (size_t k = 0; k < n; k++) {
            TrainParam *p = &t->lt.opt.params[k];
            memcpy(p->param, src[3 * k]->data, p->numel * sizeof(float));
            memcpy(p->m, src[3 * k + 1]->data, p->numel * sizeof(float));
            memcpy(p->v, src[3 * k + 2]->data, p->numel * sizeof(float));
        }
        memcpy(t->data.order, new_order, t->data.n_seqs * sizeof(uint32_t));
        t->data.pos = (size_t)position;
        t->data.epoch = (uint64_t)epoch;
        t->data.rng = data_rng;
        t->lora.drop_rng = drop_rng;
        t->lt.opt.steps_taken = (long)adam_steps;
        t->step = (int)step;
        snprintf(t->last_checkpoint, sizeof t->last_checkpoint, "%s", dir);
    }
    free(new_order);
    free(src);
    st_close(&st);
    return rc;
}

/* ---- the --out folder: one run at a time, and only its own run ------------------------
 * OUT/.lock is held (flock) while a run lives, so a second run into OUT is refused; the
 * kernel lets go when the process ends, however it ends. OUT/run.json records the run's
 * identity (model, data, recipe): a run into an OUT that holds another run's output is
 * refused unless it resumes (--resume) or starts over (--overwrite, which removes the
 * checkpoints, adapter and log a run leaves there, and nothing else). Temporaries of runs
 * that died mid-save are removed when the next run takes the lock. Rank 0 does all this. */

#define RUN_FILE "run.json"
#define RUN_FORMAT "longlora-c run"

/* Takes OUT's lock or says which run holds it; then removes dead runs' temporaries. */
static int out_lock(Trainer *t) {
    const TrainOptions *o = &t->opt;
    char path[4400], b[PATH_MSG_MAX + 1];
    if (make_dir(o->out_dir) != 0) return -1;
    int fd = open(path_join(path, sizeof path, o->out_dir, ".lock"), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) return set_error("cannot create %s: %s", path_for_message(path, b), strerror(errno));
    if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
        char pid[32] = "";
        ssize_t n = read(fd, pid, sizeof pid - 1);
        pid[n > 0 ? n : 0] = 0;
        pid[strcspn(pid, "\n")] = 0;
        close(fd);
        return set_error("another run (pid %s) is writing into --out %s; wait for it to end, or choose another --out", pid[0] ? pid : "?",
                         path_for_message(o->out_dir, b));
    }
    if (ftruncate(fd, 0) == 0) { char pid[32]; int n = snprintf(pid, sizeof pid, "%d\n", (int)getpid()); if (write(fd, pid, (size_t)n) != n) {} }
    t->out_lock_fd = fd;
    int removed = remove_stale_temporaries(o->out_dir, NULL);
    if (removed) printf("removed %d temporary file(s) or folder(s) that runs which ended mid-save left in %s\n", removed, o->out_dir);
    return 0;
}

/* What makes this run this run: the model, the data, the recipe (what shapes the trajectory;
 * not --max-steps, which a resume may raise). */
static void run_identity(const Trainer *t, char *model /* [8192] */, char *data /* [256] */, char *recipe /* [8704] */) {
    const TrainOptions *o = &t->opt;
    char res[PATH_MAX + 4096];
    if (o->model_dir) { resolve_path(o->model_dir, res, sizeof res); snprintf(model, 8192, "%s", res); }
    else snprintf(model, 8192, "random %s, seed %llu", o->shape, (unsigned long long)o->seed);
    snprintf(data, 256, "%s, %zu sequences of %d, fingerprint %016llx", t->data.stream ? "packed text" : "SFT", t->data.n_seqs, o->ctx,
             (unsigned long long)t->data.fingerprint);
    if (o->adapter_dir) resolve_path(o->adapter_dir, res, sizeof res);
    snprintf(recipe, 8704, "ctx %d, group %d, batch %d x %d accumulation, LoRA r %d alpha %g%s%s%s, lr %g, betas %g,%g, eps %g, weight decay %g, "
             "warmup %d, %s schedule, clip %g, seed %llu", o->ctx, o->group, o->batch, o->grad_accum * comm_world(), o->lora_rank, o->lora_alpha,
             train_parts(o), o->adapter_dir ? " from " : "", o->adapter_dir ? res : "", o->lr, o->beta1, o->beta2, o->eps, o->weight_decay,
             o->warmup, LR_SCHEDULE_NAMES[o->lr_scheduler], o->clip, (unsigned long long)o->seed);
}

/* 1 for what a run leaves in OUT: checkpoint-<step>, the adapter, the log, run.json. */
static int is_run_output(const char *name) {
    long s;
    int used = 0;
    if (sscanf(name, "checkpoint-%ld%n", &s, &used) == 1 && name[used] == 0) return 1;
    return !strcmp(name, "adapter_config.json") || !strcmp(name, "adapter_model.safetensors") || !strcmp(name, "train_log.csv") ||
           !strcmp(name, RUN_FILE);
}

/* Checks that this run may write into OUT (see above), clears it with --overwrite, and
 * records this run's identity in OUT/run.json. */
static int out_claim(Trainer *t) {
    const TrainOptions *o = &t->opt;
    char path[4400], b[PATH_MSG_MAX + 1], first[256] = "", model[8192], data[256], recipe[8704];
    run_identity(t, model, data, recipe);
    DIR *d = opendir(o->out_dir);
    if (!d) return set_error("cannot open the folder %s: %s", path_for_message(o->out_dir, b), strerror(errno));
    int has_checkpoint = 0;
    for (struct dirent *e; (e = readdir(d));) {
        if (!is_run_output(e->d_name)) continue;
        has_checkpoint |= !strncmp(e->d_name, "checkpoint-", 11) || !strcmp(e->d_name, "adapter_config.json");
        if (!first[0] || strcmp(e->d_name, RUN_FILE) != 0) snprintf(first, sizeof first, "%s", e->d_name);
        if (o->overwrite) {
            path_join(path, sizeof path, o->out_dir, e->d_name);
            struct stat st;
            if (lstat(path, &st) == 0 && (S_ISDIR(st.st_mode) ? remove_flat_dir(path) : unlink(path)) != 0) {
                closedir(d);
                return set_error("--overwrite: cannot remove %s: %s", path_for_message(path, b), errno ? strerror(errno) : last_error());
            }
        }
    }
    closedir(d);
    if (!o->overwrite && !o->resume_dir && first[0]) {
        const char *how = "continue it with --resume %s, start over with --overwrite, or choose another --out";
        char advice[600];
        snprintf(advice, sizeof advice, how, path_for_message(o->out_dir, b));
        Json *j = file_exists(path_join(path, sizeof path, o->out_dir, RUN_FILE)) ? json_parse_file(path) : NULL;
        if (j) {
            const char *keys[3] = {"model", "data", "recipe"}, *now[3] = {model, data, recipe};
            int differs = -1;
            for (int i = 0; i < 3 && differs < 0; i++)
                if (strcmp(json_get_string(j, keys[i], ""), now[i]) != 0) differs = i;
            int rc = 0;
            if (differs >= 0)
                rc = set_error("--out %s holds another run (its %s: %s; this run's: %s); %s", path_for_message(o->out_dir, b), keys[differs],
                               json_get_string(j, keys[differs], "?"), now[differs], advice);
            else if (has_checkpoint)
                rc = set_error("--out %s already holds this run's output (%s); %s", path_for_message(o->out_dir, b), first, advice);
            json_free(j);
            if (rc) return rc;
        } else return set_error("--out %s holds a run's output (%s); %s", path_for_message(o->out_dir, b), first, advice);
    }
    AtomicFile af;
    if (atomic_open(&af, path_join(path, sizeof path, o->out_dir, RUN_FILE)) != 0) return -1;
    fprintf(af.f, "{\n  \"format\": \"%s\",\n  \"version\": 1,\n  \"model\": ", RUN_FORMAT);
    json_write_string(af.f, model);
    fprintf(af.f, ",\n  \"data\": ");
    json_write_string(af.f, data);
    fprintf(af.f, ",\n  \"recipe\": ");
    json_write_string(af.f, recipe);
    fprintf(af.f, "\n}\n");
    return atomic_commit(&af);
}

#endif /* TRAIN_CHECKPOINT_C */
