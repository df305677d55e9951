/* gpu_mem.h: the device-memory helpers of the kernel tests. Every failure goes through
 * CUDA_CHECK (one clear sentence, non-zero exit). Include after 04_gpu.h. */
#ifndef TESTS_GPU_MEM_H
#define TESTS_GPU_MEM_H

static inline void *dev_alloc(size_t bytes) {
    void *p = NULL;
    CUDA_CHECK(cudaMalloc(&p, bytes ? bytes : 1));
    return p;
}
static inline void *to_dev(const void *host, size_t bytes) {
    void *p = dev_alloc(bytes);
    CUDA_CHECK(cudaMemcpy(p, host, bytes, cudaMemcpyHostToDevice));
    return p;
}
static inline void upload(void *dev, const void *host, size_t bytes) {
    CUDA_CHECK(cudaMemcpy(dev, host, bytes, cudaMemcpyHostToDevice));
}
static inline void download(void *host, const void *dev, size_t bytes) {
    CUDA_CHECK(cudaDeviceSynchronize());
    CUDA_CHECK(cudaMemcpy(host, dev, bytes, cudaMemcpyDeviceToHost));
}
/* 0xff bytes: NaN as bf16 and as fp32, so an element the kernel forgot fails every comparison. */
static inline void poison(void *dev, size_t bytes) { CUDA_CHECK(cudaMemset(dev, 0xff, bytes)); }
/* a fresh buffer of NaN bytes, for an output */
static inline void *dev_poisoned(size_t bytes) {
    void *p = dev_alloc(bytes);
    poison(p, bytes);
    return p;
}

#endif
