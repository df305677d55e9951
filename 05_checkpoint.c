/* 05_checkpoint.c: checkpoints that resume exactly (05_train.c includes it).
 *
 * OUT/checkpoint-<step>/ holds
 *   adapter_config.json, adapter_model.safetensors   the PEFT adapter (03's writer), loadable by peft
 *   train_state.safetensors   every trainable tensor in fp32 (its master copy) with its AdamW
 *                             moments "<name>.exp_avg", "<name>.exp_avg_sq", and the data
 *                             order of the current epoch "data.order" [n_seqs]
 *   trainer_state.json        step, AdamW step count, data epoch and position, the RNG
 *                             states, and the settings that must not change on resume
 * The folder is written as OUT/.checkpoint-<step>.tmp.<pid> and renamed into place, so a
 * crash mid-save never leaves a half checkpoint under the real name.
 * Checked by: tests/test_train.c (exact resume, malformed and foreign checkpoints, SIGINT),
 * tests/test_dist_train.sh (resume across world sizes), tests/test_gpu_train_resume.c.
 */
#ifndef TRAIN_CHECKPOINT_C
#define TRAIN_CHECKPOINT_C

#define TRAINER_STATE_FORMAT "longlora-c trainer state"
#define TRAINER_STATE_VERSION 1

/* Removes a folder of plain files (what a checkpoint holds). */
static int remove_flat_dir(const char *dir) {
    DIR *d = opendir(dir);
    if (!d) return errno == ENOENT ? 0 : set_error("cannot open the folder %s: %s", dir, strerror(errno));
    struct dirent *e;
    char path[4096];
    int rc = 0;
    while ((e = readdir(d))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        if (remove(path_join(path, sizeof path, dir, e->d_name)) != 0) rc = set_error("cannot remove %s: %s", path, strerror(errno));
    }
    closedir(d);
    if (rc == 0 && rmdir(dir) != 0) rc = set_error("cannot remove the folder %s: %s", dir, strerror(errno));
    return rc;
}

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

static int write_trainer_state_json(const Trainer *t, const char *path, double last_loss) {
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
    fprintf(f, "  \"settings\": {\"ctx\": %d, \"group\": %d, \"batch\": %d, \"grad_accum\": %d, \"lora_rank\": %d, "
               "\"lora_alpha\": %.17g, \"seed\": \"%llu\", \"lr\": %.9g, \"warmup\": %d, \"max_steps\": %d}\n}\n",
            o->ctx, o->group, o->batch, o->grad_accum * comm_world(), o->lora_rank, o->lora_alpha, (unsigned long long)o->seed, o->lr, o->warmup,
            o->max_steps);
    return atomic_commit(&af);
}

/* Writes OUT/checkpoint-<step>. -1 + last_error() on failure (the previous checkpoint stays). */
static int checkpoint_save(Trainer *t, double last_loss) {
    const TrainOptions *o = &t->opt;
    char final_dir[4200], tmp_dir[4200], old_dir[4200], path[4400], name[64];
    if (make_dir(o->out_dir) != 0) return -1;
    snprintf(name, sizeof name, "checkpoint-%d", t->step);
    path_join(final_dir, sizeof final_dir, o->out_dir, name);
    snprintf(name, sizeof name, ".checkpoint-%d.tmp.%d", t->step, (int)getpid());
    path_join(tmp_dir, sizeof tmp_dir, o->out_dir, name);
    remove_flat_dir(tmp_dir);
    if (make_dir(tmp_dir) != 0) return -1;
    int rc = lora_save_adapter(&t->lora, &t->model, tmp_dir, o->model_dir);
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
        rc = st_write(&sw, path_join(path, sizeof path, tmp_dir, "train_state.safetensors"));
        st_writer_free(&sw);
        free(names);
        free(order);
    }
    if (rc == 0) rc = write_trainer_state_json(t, path_join(path, sizeof path, tmp_dir, "trainer_state.json"), last_loss);
    if (rc != 0) {
        char why[1024];
        snprintf(why, sizeof why, "%s", last_error());
        remove_flat_dir(tmp_dir);
        return set_error("saving the checkpoint of step %d failed: %s", t->step, why);
    }
    /* into place: an older folder of the same name is moved aside first, then removed */
    snprintf(name, sizeof name, ".checkpoint-%d.old.%d", t->step, (int)getpid());
    path_join(old_dir, sizeof old_dir, o->out_dir, name);
    int had_old = file_exists(final_dir);
    if (had_old && rename(final_dir, old_dir) != 0) {
        remove_flat_dir(tmp_dir);
        return set_error("cannot move the old %s aside: %s", final_dir, strerror(errno));
    }
    if (rename(tmp_dir, final_dir) != 0) {
        int e = errno;
        if (had_old) rename(old_dir, final_dir);
        remove_flat_dir(tmp_dir);
        return set_error("cannot rename %s to %s: %s", tmp_dir, final_dir, strerror(e));
    }
    if (had_old) remove_flat_dir(old_dir);
    snprintf(t->last_checkpoint, sizeof t->last_checkpoint, "%s", final_dir);
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
 * belongs to another run (other data, --ctx, --batch, --grad-accum or LoRA shape). */
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
    else if (json_get_number(js, "version", -1) != TRAINER_STATE_VERSION)
        rc = set_error("%s has version %g; this program reads version %d", path, json_get_number(js, "version", -1), TRAINER_STATE_VERSION);
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
            else if (st_check_shape(x, 1, shape) != 0) { char why[1024]; snprintf(why, sizeof why, "%s", last_error()); rc = set_error("%s: %s", st.path, why); }
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

#endif /* TRAIN_CHECKPOINT_C */
