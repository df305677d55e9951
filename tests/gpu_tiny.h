/* gpu_tiny.h: the tiny trainer the GPU tests build when they need one but no particular
 * numbers (a plan that does not fit, a budget too small, a spoilt step): a random model of
 * dim 128 (2 heads of 64, ffn 256, vocab 100, context 64), its LoRA adapter with the default
 * targets, 03's trainable tensors and AdamW (no CPU activations), and 05_train_gpu.c's
 * trainer over them. Include after 05_train_gpu.c. */
#ifndef TESTS_GPU_TINY_H
#define TESTS_GPU_TINY_H

typedef struct {
    Config c;
    Model m;
    LoraAdapter ad;
    LoraTrainer lt;
    GpuTrainer g;
} TinyTrainer;

static void tiny_trainer_init(TinyTrainer *t, int n_layers, int n_kv_heads, uint64_t seed) {
    Config *c = &t->c;
    memset(c, 0, sizeof *c);
    c->dim = 128; c->n_layers = n_layers; c->n_heads = 2; c->n_kv_heads = n_kv_heads; c->head_dim = 64; c->ffn_dim = 256;
    c->vocab_size = 100; c->rms_eps = 1e-5f; c->rope_theta = 10000.0f; c->rope_config_factor = 1.0f; c->rope_factor = 1.0f;
    c->max_pos = 64; c->bos_id = c->eos_id = -1;
    model_init_random(&t->m, c, seed, 0.05f);
    LoraConfig lc = lora_default_config();
    if (lora_init(&t->ad, c, &lc) != 0) die("%s", last_error());
    AdamWConfig oc = adamw_default_config();
    lora_trainer_init(&t->lt, &t->m, &t->ad, &oc, 0, 0, 0);
    gpu_train_init(&t->g, &t->m, &t->ad, &t->lt.opt, 0);
}

static void tiny_trainer_free(TinyTrainer *t) {
    gpu_train_free(&t->g);
    lora_trainer_free(&t->lt);
    lora_free(&t->ad);
    model_free(&t->m);
}

#endif
