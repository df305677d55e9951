"""Dead code: builds every stage program, test and benchmark (the GPU builds too where the
CUDA headers are) at -O1 without inlining, where the compiler drops each static function that
nothing calls (and what only such functions call), and lists each function of the project's
sources that is missing from every object whose build includes its file: code that no
program or test calls. Exits 1 when there is any, 77 when no C compiler or nm is found."""
import collections, glob, os, re, shutil, subprocess, sys, tempfile

os.chdir(os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
cc = os.environ.get('CC', 'cc')
if not shutil.which(cc) or not shutil.which('nm'):
    print('skip: no C compiler (%s) or nm' % cc); sys.exit(77)
cuda_home = os.environ.get('CUDA_HOME', '/usr/local/cuda')
gpu = ['-DUSE_CUDA', '-I' + cuda_home + '/include'] if os.path.exists(cuda_home + '/include/cuda_runtime.h') else None
nccl_home = os.environ.get('NCCL_HOME', '')
have_nccl = gpu and any(os.path.exists(p) for p in (cuda_home + '/include/nccl.h', '/usr/include/nccl.h', nccl_home + '/include/nccl.h'))
if have_nccl: gpu = gpu + ['-DUSE_NCCL'] + (['-I' + nccl_home + '/include'] if nccl_home else [])  # the multi-GPU paths too
# the stage programs: each stage file that defines STAGE (the others are parts a stage includes)
builds = [(s, []) for s in sorted(glob.glob('0*.c')) if '#define STAGE' in open(s).read()]
for t in sorted(glob.glob('tests/test_*.c') + glob.glob('tests/fuzz_*.c') + glob.glob('bench/*.c')):
    needs_gpu = 'test_gpu_' in t or t.startswith('bench/')
    if not needs_gpu: builds.append((t, []))
    elif gpu: builds.append((t, gpu))
if gpu: builds += [(s, gpu) for s in ('05_train.c', '06_infer.c')]

# every static function the project's C sources define: (file, name)
defined = set()
for f in glob.glob('*.h') + glob.glob('0*.c') + glob.glob('tests/*.h'):
    for m in re.finditer(r'^static [^;={}()]*?\b(\w+)\s*\([^;{]*\)\s*\{', open(f).read(), re.M):
        defined.add((f, m.group(1)))

base = [cc, '-std=gnu11', '-O1', '-fno-inline', '-fopenmp', '-I.', '-w']
kept = collections.defaultdict(set)      # file -> names emitted by some build that includes it
included = collections.defaultdict(int)  # file -> how many builds include it
obj = os.path.join(tempfile.mkdtemp(), 'x.o')
for src, flags in builds:
    r = subprocess.run(base + ['-c', '-o', obj, src] + flags, capture_output=True, text=True)
    if r.returncode != 0:
        print('%s %s does not build:\n%s' % (src, ' '.join(flags), r.stderr[-3000:])); sys.exit(1)
    syms = set(line.split()[-1].split('.')[0] for line in subprocess.run(['nm', obj], capture_output=True, text=True).stdout.splitlines())
    deps = subprocess.run(base + ['-MM', src] + flags, capture_output=True, text=True).stdout
    for f in deps.replace('\\\n', ' ').split(':', 1)[1].split():
        f = os.path.normpath(f)
        included[f] += 1
        kept[f] |= syms
dead = sorted((f, fn) for f, fn in defined if included[f] and fn not in kept[f])
for f, fn in dead: print('dead: %s: %s() is called by no program or test' % (f, fn))
print('%d builds, %d static functions, %d called by none%s' % (len(builds), len(defined), len(dead),
      '' if have_nccl else ' (GPU builds skipped: no CUDA headers)' if not gpu else ' (NCCL paths skipped: no nccl.h)'))
sys.exit(1 if dead else 0)
