# LongLoRA in C and CUDA. `make` builds every stage it can and says what it found;
# `make test` sets up the tests' reference libraries, runs every test and ends with
# "N passed, N failed, N skipped".

CC      ?= gcc
NVCC    ?= nvcc
# CFLAGS is yours (`make CFLAGS="-O3 -march=native"`); what the code needs (the C dialect, the
# warnings, OpenMP below) is added with `override`, so a CFLAGS of your own keeps it
CFLAGS  ?= -O2 -g -march=x86-64-v2
override CFLAGS += -std=gnu11 -Wall -Wextra
LDLIBS  += -lm
GPU_ARCH ?= sm_80 sm_90
# The Python of the tests, `make bench` and the demo's report: PYTHON if given, else .venv's
# where it exists, else python3. Looked up when a recipe runs, not when this file is read, so
# `make test` runs with the .venv it has just made.
PYTHON  ?= $(shell [ -x .venv/bin/python ] && echo "$(CURDIR)/.venv/bin/python" || echo python3)
export PYTHON

# ---- what this machine has -------------------------------------------------------------
HAVE_OPENMP := $(shell echo 'int main(void){return 0;}' | $(CC) -fopenmp -x c - -o /dev/null 2>/dev/null && echo 1)
HAVE_NVCC   := $(shell command -v $(NVCC) >/dev/null 2>&1 && echo 1)
CUDA_HOME   ?= $(if $(HAVE_NVCC),$(patsubst %/bin/,%,$(dir $(shell command -v $(NVCC)))),/usr/local/cuda)
HAVE_CUBLAS := $(if $(wildcard $(CUDA_HOME)/lib64/libcublas.so $(CUDA_HOME)/lib64/libcublas.so.*),1)
# NCCL: the CUDA toolkit's or the system's, or NCCL_HOME (a folder with include/nccl.h and
# lib/libnccl.so*, e.g. the one the nvidia-nccl Python wheel installs)
NCCL_HOME   ?=
HAVE_NCCL   := $(if $(wildcard $(CUDA_HOME)/lib64/libnccl.so /usr/lib/x86_64-linux-gnu/libnccl.so $(if $(NCCL_HOME),$(NCCL_HOME)/lib/libnccl.so*)),1)
HAVE_MPI    := $(shell command -v mpicc >/dev/null 2>&1 && echo 1)
HAVE_CLANG  := $(shell command -v clang >/dev/null 2>&1 && echo 1)
HAVE_GPU    := $(shell nvidia-smi -L 2>/dev/null | grep -q GPU && echo 1)

ifeq ($(HAVE_OPENMP),1)
  override CFLAGS += -fopenmp
endif
ifeq ($(HAVE_NVCC)$(HAVE_CUBLAS),11)
  USE_CUDA := 1
  NVCC_GENCODE := $(foreach a,$(GPU_ARCH),-gencode=arch=compute_$(subst sm_,,$(a)),code=$(a))
  NVCCFLAGS ?= -O3 -std=c++17 -lineinfo $(NVCC_GENCODE) -Xcompiler -Wall,-Wextra
  CUDA_LIBS := -L$(CUDA_HOME)/lib64 -lcudart -lcublas -lcublasLt -lstdc++
endif
ifeq ($(HAVE_NCCL),1)
  NCCL_LIBS := -lnccl
  ifneq ($(NCCL_HOME),)
    NCCL_LIBS := -L$(NCCL_HOME)/lib -Wl,-rpath,$(NCCL_HOME)/lib $(if $(wildcard $(NCCL_HOME)/lib/libnccl.so),-lnccl,-l:$(notdir $(firstword $(wildcard $(NCCL_HOME)/lib/libnccl.so.*))))
    NCCL_INC := -I$(NCCL_HOME)/include
  endif
endif
export HAVE_GPU USE_CUDA HAVE_CLANG

# The GPU code (04_*.cu): objects with an extern "C" API, linked into every program that runs on the GPU.
GPU_SRC := $(wildcard 04_*.cu)
GPU_OBJ := $(patsubst %.cu,build/%.o,$(GPU_SRC))

STAGES_CPU := 01_tokenize 02_model 03_lora
STAGES_CPU := $(foreach s,$(STAGES_CPU),$(if $(wildcard $(s).c),$(s)))

.PHONY: all test clean found bench
all: found $(STAGES_CPU)

found:
	@echo "make: found: cc=$(CC) openmp=$(if $(HAVE_OPENMP),yes,no) nvcc=$(if $(HAVE_NVCC),yes,no) cublas=$(if $(HAVE_CUBLAS),yes,no) nccl=$(if $(HAVE_NCCL),yes,no) mpi=$(if $(HAVE_MPI),yes,no) clang(fuzz)=$(if $(HAVE_CLANG),yes,no) gpu=$(if $(HAVE_GPU),yes,no)"
	@$(if $(USE_CUDA),echo "make: building GPU code for $(GPU_ARCH)",echo "make: skipping GPU code (no nvcc or cuBLAS)")
	@$(if $(HAVE_NCCL),true,echo "make: skipping multi-GPU (no NCCL)")

# Each stage includes the one before it, so every earlier file is a dependency.
HEADERS := common.h $(wildcard 0*.h)
01_tokenize: 01_tokenize.c $(HEADERS)
	$(CC) $(CFLAGS) -o $@ $< $(LDLIBS)
02_model: 02_model.c 01_tokenize.c $(HEADERS)
	$(CC) $(CFLAGS) -o $@ $< $(LDLIBS)
03_lora: 03_lora.c 02_model.c 01_tokenize.c $(HEADERS)
	$(CC) $(CFLAGS) -o $@ $< $(LDLIBS)

# Stage 5 (training) runs on the GPU where nvcc and cuBLAS are (05_train_gpu.c, 04's kernels),
# and on the CPU everywhere.
ifneq ($(wildcard 05_train.c),)
all: 05_train
endif
05_train: 05_train.c $(wildcard 05_*.c) 04_load.c 03_lora.c 02_model.c 01_tokenize.c $(HEADERS) $(if $(USE_CUDA),$(GPU_OBJ))
	$(CC) $(CFLAGS) $(if $(USE_CUDA),-DUSE_CUDA $(if $(NCCL_LIBS),-DUSE_NCCL) -I$(CUDA_HOME)/include $(NCCL_INC)) -o $@ $< $(if $(USE_CUDA),$(GPU_OBJ) $(CUDA_LIBS) $(NCCL_LIBS)) $(LDLIBS)

# ---- GPU code (04_*.cu): objects with an extern "C" API declared in 04_gpu.h -------------
build/%.o: %.cu $(HEADERS)
	@mkdir -p build
	$(NVCC) $(NVCCFLAGS) -DUSE_CUDA -I. -c -o $@ $<
ifeq ($(USE_CUDA),1)
  ifneq ($(wildcard 04_s2attn.cu),)
all: 04_s2attn
  endif
endif
# The stage's own program (--bench and the kernel checks) is 04_s2attn.cu built with its main.
04_s2attn: 04_s2attn.cu $(GPU_OBJ) $(HEADERS)
	$(NVCC) $(NVCCFLAGS) -DUSE_CUDA -DS2ATTN_MAIN -I. -o $@ 04_s2attn.cu $(filter-out build/04_s2attn.o,$(GPU_OBJ)) $(CUDA_LIBS)
# The attention kernels use Hopper's warpgroup MMA (wgmma), which exists only in sm_90a code:
# where sm_90 is asked for, 04_s2attn.cu is built for sm_90a (same GPUs, H100/H200).
S2ATTN_GENCODE := $(foreach a,$(GPU_ARCH),-gencode=arch=compute_$(subst sm_,,$(a:sm_90=sm_90a)),code=$(a:sm_90=sm_90a))
build/04_s2attn.o 04_s2attn build/libs2attn.so: NVCC_GENCODE = $(S2ATTN_GENCODE)
# The attention benchmark (GPU): every tile variant checked first (tests/test_gpu_attention:
# the fp64 criterion, odd N, GQA, S2, outputs poisoned; nothing is timed if one fails), then,
# for head dims 128 and 64, our kernels timed, then PyTorch SDPA (flash, cuDNN) on the same
# shapes, which also checks our kernels against torch through build/libs2attn.so, and ours and
# cuDNN timed in turns on the same tensors at BENCH_ALTERNATE (the like-for-like ratios: a
# sequential table runs into the card's power cap, bench/NOTES.md step 31).
BENCH_ALTERNATE ?= 4096,16384,32768
# one head dim's two runs: $(1) the head dim, $(2) the results files' suffix
bench_head_dim = ./04_s2attn --bench --d $(1) --out bench/results/attn_ours$(2).json && \
	$(PYTHON) bench/sdpa_peer.py --d $(1) --alternate $(BENCH_ALTERNATE) --lib build/libs2attn.so \
	    --ours bench/results/attn_ours$(2).json --out bench/results/attn_sdpa$(2).json
build/libs2attn.so: 04_s2attn.cu $(HEADERS)
	@mkdir -p build
	$(NVCC) $(NVCCFLAGS) -DUSE_CUDA -I. -shared -Xcompiler -fPIC -o $@ 04_s2attn.cu $(CUDA_LIBS)
bench: 04_s2attn build/libs2attn.so build/tests/test_gpu_attention
	@mkdir -p bench/results
	@bash bench/attn_check.sh build/tests/test_gpu_attention build/bench_attention_check.log
	$(call bench_head_dim,128,)
	$(call bench_head_dim,64,_d64)

# Stage 6 (inference) runs on the GPU where nvcc and cuBLAS are, and on the CPU everywhere.
ifneq ($(wildcard 06_infer.c),)
all: 06_infer
endif
06_infer: 06_infer.c 04_load.c 03_lora.c 02_model.c 01_tokenize.c $(HEADERS) $(if $(USE_CUDA),$(GPU_OBJ))
	$(CC) $(CFLAGS) $(if $(USE_CUDA),-DUSE_CUDA -I$(CUDA_HOME)/include) -o $@ $< $(if $(USE_CUDA),$(GPU_OBJ) $(CUDA_LIBS)) $(LDLIBS)

# ---- tests -------------------------------------------------------------------------------
# tests/test_*.c      CPU tests: each includes the stage it checks (defining STAGE 0 first).
# tests/test_gpu_*.c  GPU tests: C compiled with -DUSE_CUDA, linked with the 04 objects;
#                     built where nvcc and cuBLAS are, run where a GPU is.
# tests/test_*.sh     test scripts.
# A test exits 0 (pass), 77 (skip, printing why on its last line) or anything else (fail).
TEST_CPU := $(filter-out build/tests/test_gpu_%,$(patsubst tests/%.c,build/tests/%,$(wildcard tests/test_*.c)))
TEST_GPU := $(if $(USE_CUDA),$(patsubst tests/%.c,build/tests/%,$(wildcard tests/test_gpu_*.c)))
ALL_SRC  := $(HEADERS) $(wildcard 0*.c)
TEST_HDR := $(wildcard tests/*.h) # the tests' shared helpers

# C that calls the GPU API (the GPU tests, the training benchmark), linked with the 04 objects
GPU_C_PROGRAM = $(CC) $(CFLAGS) -DUSE_CUDA $(if $(NCCL_LIBS),-DUSE_NCCL) -I. -I$(CUDA_HOME)/include $(NCCL_INC) -o $@ $< $(GPU_OBJ) $(CUDA_LIBS) $(NCCL_LIBS) $(LDLIBS)
build/tests/test_gpu_%: tests/test_gpu_%.c $(ALL_SRC) $(TEST_HDR) $(GPU_OBJ)
	@mkdir -p $(dir $@)
	$(GPU_C_PROGRAM)
# the GPU training benchmark (bench/train_device.sh runs it)
build/train_bench: bench/train_bench.c $(ALL_SRC) $(GPU_OBJ)
	@mkdir -p $(dir $@)
	$(GPU_C_PROGRAM)

build/tests/%: tests/%.c $(ALL_SRC) $(TEST_HDR)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -I. -o $@ $< $(LDLIBS)

# The reference libraries the tests compare against (tests/requirements.txt, never used by the
# product) go into .venv, which `make test` makes where it is missing, as `make demo` fetches
# what it needs. Where that cannot work (no network, no python3-venv) it says so in one line
# and the tests that need them skip. A PYTHON given to make is used as it is.
TEST_VENV := $(if $(filter environment command line,$(origin PYTHON)),,.venv/requirements.installed)
.venv/requirements.installed: tests/requirements.txt
	@bash tests/venv.sh .venv $< && touch $@ || true

test: all $(TEST_CPU) $(TEST_GPU) $(TEST_VENV)
	@bash tests/run.sh

# The GPU tests alone, then compute-sanitizer (memcheck, racecheck, synccheck) on the attention
# kernels' test: what to run after a change to 04_*.cu, 05_train_gpu.c or 06_infer.c.
.PHONY: test-gpu
test-gpu: 05_train $(TEST_GPU)
	@bash tests/run.sh --gpu

# The long fuzz run: every tests/fuzz_*.c target for 10 M executions (FUZZ_RUNS) under ASan
# and UBSan; `make test` runs the same targets for a short time. Its counts are in the README.
.PHONY: fuzz
fuzz:
	FUZZ_RUNS=$${FUZZ_RUNS:-10000000} bash tests/test_fuzz.sh

# ---- the demo: a real model (PyPI) and real text (Debian), see demo/run.sh -----------------
.PHONY: demo
demo: $(filter 01_tokenize 02_model,$(STAGES_CPU)) 05_train 06_infer
	@bash demo/run.sh

clean:
	rm -rf build $(STAGES_CPU) 04_s2attn 05_train 06_infer
