# LongLoRA in C and CUDA. `make` builds every stage it can and says what it found;
# `make test` runs every test and ends with "N passed, N failed".

CC      ?= gcc
NVCC    ?= nvcc
CFLAGS  ?= -O2 -g -march=x86-64-v2
CFLAGS  += -std=gnu11 -Wall -Wextra -Wno-unused-function
LDLIBS  += -lm
GPU_ARCH ?= sm_80 sm_90
PYTHON  ?= $(if $(wildcard .venv/bin/python),$(CURDIR)/.venv/bin/python,python3)
export PYTHON

# ---- what this machine has -------------------------------------------------------------
HAVE_OPENMP := $(shell echo 'int main(void){return 0;}' | $(CC) -fopenmp -x c - -o /dev/null 2>/dev/null && echo 1)
HAVE_NVCC   := $(shell command -v $(NVCC) >/dev/null 2>&1 && echo 1)
CUDA_HOME   ?= $(if $(HAVE_NVCC),$(patsubst %/bin/,%,$(dir $(shell command -v $(NVCC)))),/usr/local/cuda)
HAVE_CUBLAS := $(if $(wildcard $(CUDA_HOME)/lib64/libcublas.so $(CUDA_HOME)/lib64/libcublas.so.*),1)
HAVE_NCCL   := $(if $(wildcard $(CUDA_HOME)/lib64/libnccl.so /usr/lib/x86_64-linux-gnu/libnccl.so),1)
HAVE_MPI    := $(shell command -v mpicc >/dev/null 2>&1 && echo 1)
HAVE_CLANG  := $(shell command -v clang >/dev/null 2>&1 && echo 1)
HAVE_GPU    := $(shell nvidia-smi -L 2>/dev/null | grep -q GPU && echo 1)

ifeq ($(HAVE_OPENMP),1)
  CFLAGS += -fopenmp
endif
ifeq ($(HAVE_NVCC)$(HAVE_CUBLAS),11)
  USE_CUDA := 1
  NVCC_GENCODE := $(foreach a,$(GPU_ARCH),-gencode=arch=compute_$(subst sm_,,$(a)),code=$(a))
  NVCCFLAGS ?= -O3 -std=c++17 -lineinfo $(NVCC_GENCODE) -Xcompiler -Wall,-Wextra,-Wno-unused-function
  CUDA_LIBS := -L$(CUDA_HOME)/lib64 -lcudart -lcublas -lcublasLt -lstdc++
endif
ifeq ($(HAVE_NCCL),1)
  NCCL_LIBS := -lnccl
endif
export HAVE_GPU USE_CUDA HAVE_CLANG

STAGES_CPU := 01_tokenize 02_model 03_lora
STAGES_CPU := $(foreach s,$(STAGES_CPU),$(if $(wildcard $(s).c),$(s)))

.PHONY: all test clean found bench
all: found $(STAGES_CPU)

found:
	@echo "make: found: cc=$(CC) openmp=$(if $(HAVE_OPENMP),yes,no) nvcc=$(if $(HAVE_NVCC),yes,no) cublas=$(if $(HAVE_CUBLAS),yes,no) nccl=$(if $(HAVE_NCCL),yes,no) mpi=$(if $(HAVE_MPI),yes,no) clang(fuzz)=$(if $(HAVE_CLANG),yes,no) gpu=$(if $(HAVE_GPU),yes,no)"
	@$(if $(USE_CUDA),echo "make: building GPU code for $(GPU_ARCH)",echo "make: skipping GPU code (no nvcc or cuBLAS)")
	@$(if $(HAVE_NCCL),true,echo "make: skipping multi-GPU (no NCCL)")

# Each stage includes the one before it, so every earlier file is a dependency.
01_tokenize: 01_tokenize.c common.h
	$(CC) $(CFLAGS) -o $@ $< $(LDLIBS)
02_model: 02_model.c 01_tokenize.c common.h
	$(CC) $(CFLAGS) -o $@ $< $(LDLIBS)
03_lora: 03_lora.c 02_model.c 01_tokenize.c common.h
	$(CC) $(CFLAGS) -o $@ $< $(LDLIBS)

# ---- tests -------------------------------------------------------------------------------
# Every tests/test_*.c is a test program (it includes the stage it checks); every
# tests/test_*.sh is a test script; tests/test_*.cu are GPU tests (built where nvcc is,
# run where a GPU is). A test exits 0 (pass), 77 (skip, with a message) or other (fail).
TEST_C   := $(patsubst tests/%.c,build/tests/%,$(wildcard tests/test_*.c))
TEST_CU  := $(if $(USE_CUDA),$(patsubst tests/%.cu,build/tests/%,$(wildcard tests/test_*.cu)))
ALL_SRC  := common.h $(wildcard 0*.c 0*.cu)

build/tests/%: tests/%.c $(ALL_SRC)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -I. -o $@ $< $(LDLIBS)

build/tests/%: tests/%.cu $(ALL_SRC)
	@mkdir -p $(dir $@)
	$(NVCC) $(NVCCFLAGS) -I. -o $@ $< $(CUDA_LIBS)

test: all $(TEST_C) $(TEST_CU)
	@bash tests/run.sh

clean:
	rm -rf build $(STAGES_CPU) 04_s2attn 05_train 06_infer
