"""demo/compare_training.py, the demo's side-by-side training table: the numbers it prints
from two training logs (steps, time in steps, median step and tokens/s, peak memory, last
and mean loss, each computed here from the same made-up logs), and hostile inputs (missing,
cut or foreign logs and run files, a wall time that is not a number) ending in one sentence
and exit 1 with nothing printed on stdout. Standard library only."""
import csv, json, os, random, statistics, subprocess, sys, tempfile

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
SCRIPT = os.path.join(ROOT, "demo", "compare_training.py")
checks = fails = 0


def check(ok, what):
    global checks, fails
    checks += 1
    if not ok:
        fails += 1
        print("FAIL:", what)


def compare(*args):
    return subprocess.run([sys.executable, SCRIPT] + [str(a) for a in args], capture_output=True, text=True)


def write_log(path, steps, rng, gpu):
    rows = [{"step": s + 1, "loss": round(5 - s * 0.01 + rng.random() * 0.1, 4), "step_seconds": round(0.2 + rng.random() * 0.05, 4),
             "tokens_per_second": round(150000 + rng.random() * 10000, 1), "peak_memory_gib": round(4 + rng.random(), 3) if gpu else ""}
            for s in range(steps)]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return rows


def main():
    seed = int(os.environ.get("SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    tmp = tempfile.mkdtemp()
    ours, peer = os.path.join(tmp, "ours.csv"), os.path.join(tmp, "peer.csv")
    run = os.path.join(tmp, "peer_run.json")
    n_ours, n_peer = rng.randrange(25, 60), rng.randrange(25, 60)
    o_rows, p_rows = write_log(ours, n_ours, rng, True), write_log(peer, n_peer, rng, False)
    json.dump({"device": "NVIDIA H200", "engine": "PyTorch", "peak_memory_allocated_gib": 24.15, "peak_memory_reserved_gib": 30.97}, open(run, "w"))
    r = compare(ours, 33, peer, 92.5, run)
    check(r.returncode == 0, "a good pair: exit %d, %s" % (r.returncode, r.stderr.strip()))
    lines = r.stdout.strip().splitlines()
    check(len(lines) == 4 and "peak GPU memory" in lines[0], "a good pair: the table's shape: %r" % lines)
    for line, rows, wall, mem in ((lines[2] if len(lines) > 2 else "", o_rows, 33, None), (lines[3] if len(lines) > 3 else "", p_rows, 92, "24.15 GiB (30.97 reserved)")):
        cells = [c.strip() for c in line.strip("|").split("|")]
        secs = [r["step_seconds"] for r in rows]
        want = [str(len(rows)), "%d s" % wall, "%.1f s" % sum(secs), "%.3f s" % statistics.median(secs),
                "{:,.0f}".format(statistics.median(r["tokens_per_second"] for r in rows)),
                mem or "%.2f GiB" % max(r["peak_memory_gib"] for r in rows), "%.4f" % rows[-1]["loss"],
                "%.4f" % (sum(r["loss"] for r in rows[-20:]) / 20)]
        check(cells[1:] == want, "row %s: got %r, want %r" % (cells[:1], cells[1:], want))

    bad_json, cut_csv, foreign_csv = os.path.join(tmp, "bad.json"), os.path.join(tmp, "cut.csv"), os.path.join(tmp, "foreign.csv")
    open(bad_json, "w").write('{"device": ')
    open(cut_csv, "w").write(open(ours).read()[:-40])  # the last row cut in the middle of a field
    open(foreign_csv, "w").write("a,b\n1,2\n")
    list_json = os.path.join(tmp, "list.json")
    open(list_json, "w").write("[1, 2]")
    empty_csv = os.path.join(tmp, "empty.csv")
    open(empty_csv, "w").write(open(ours).read().splitlines()[0] + "\n")
    for why, args in (("no log", (os.path.join(tmp, "none.csv"), 1, peer, 1, run)),
                      ("a foreign log", (foreign_csv, 1, peer, 1, run)),
                      ("a cut log", (cut_csv, 1, peer, 1, run)),
                      ("a log of no steps", (ours, 1, empty_csv, 1, run)),
                      ("no run file", (ours, 1, peer, 1, os.path.join(tmp, "none.json"))),
                      ("a cut run file", (ours, 1, peer, 1, bad_json)),
                      ("a run file that is not JSON", (ours, 1, peer, 1, foreign_csv)),
                      ("a run file that is a list", (ours, 1, peer, 1, list_json)),
                      ("a wall time that is not a number", (ours, "soon", peer, 1, run))):
        r = compare(*args)
        said = r.stderr.strip().splitlines()
        check(r.returncode == 1 and r.stdout == "" and len(said) == 1 and said[0].startswith("compare_training.py: "),
              "%s: exit %d, stdout %r, said %r" % (why, r.returncode, r.stdout[:80], said[-3:]))
    print("test_demo_compare: %d checks, %d failures (seed %d)" % (checks, fails, seed))
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
