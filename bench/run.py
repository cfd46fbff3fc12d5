#!/usr/bin/env python3
"""Benchmark runner for smalloc: `make bench` calls this.

Runs every workload under every allocator found, interleaved, each round in
its own order (A B C ..., C A B ..., ...), one warm-up round and then counted rounds, and reports medians,
spreads (min-max), peak RSS and ratios to the freshly built library.

Allocators:
  fresh        the library just built (FRESH)
  fresh-naive  fresh with SMALLOC_RETIRE_CYCLES=0 (churn workloads only)
  fresh-prof   fresh with SMALLOC_PROF=1: the heap profiler on at its default rate
  fresh-thp    fresh with SMALLOC_HUGEPAGES=2 (threaded workloads only): every
               segment of small pages advised for transparent huge pages, the
               policy that trades resident size for page faults
  jemalloc-prof  jemalloc with MALLOC_CONF=prof:true (its sampled heap profiler at its
               default rate, one sample per 512 KiB like smalloc's), when jemalloc is found
  heaptrack    glibc's malloc with every call traced by heaptrack, on the python3
               workload only, when heaptrack is installed: what tracing costs
  baseline     BASELINE, else the installed libsmalloc (pkg-config, then
               ldconfig); if there is none, glibc serves as the baseline
  glibc        no preload
  jemalloc, tcmalloc, mimalloc when ldconfig knows them
  null         NULLLIB, the null allocator (nullalloc.c): per-thread LIFO
               lists, no checks, no statistics, nothing returned; run in
               the single-threaded churn cases only, as the least any
               allocator can spend there (left out of the geometric means)

Environment (make passes the first four):
  FRESH=path  BASELINE=path  NULLLIB=path  QUICK=1  BENCH_STRACE=1 (count OS calls of
  non-smalloc allocators in the churn cases with strace, untimed)
  BENCH_RUNS=n (counted rounds)  BENCH_ONLY=name,prefix* (workloads to run)
  BENCH_ALLOCS=name,... (allocators to run, by the names below; fresh always runs,
  as every ratio is to it)
  BENCH_PEERS=name=/path/lib.so,... (more allocators to preload, such as a
  mimalloc or snmalloc built from source)

After the timed workloads (unless BENCH_ONLY is set), two sections run every
allocator once: memory return (bench_idle burst: resident size while a
program that freed a burst makes no call) and the most malloc obtains under
a 256 MiB RLIMIT_AS (bench_idle limit).

Writes results.csv, results.md and (with gnuplot) results.svg and
results-idle.svg into the output directory.  Exits 1 when a run failed or checksums disagree.
Standard library only.
"""

import argparse
import datetime
import json
import math
import os
import platform
import random
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import zlib

STEP_NAMES = ["local_swap", "thread_collect", "extend", "next_page",
              "retired_page", "fresh_page", "new_segment"]
OS_KEYS = ["os_mmap", "os_munmap", "os_madvise", "os_mremap"]
PAGE_KEYS = ["pages_retired", "pages_reused", "pages_released"]
PEERS = [("jemalloc", "libjemalloc.so.2"),
         ("tcmalloc", "libtcmalloc_minimal.so.4"),
         ("mimalloc", "libmimalloc.so.2")]
RUN_TIMEOUT = 300
# A peer (not the baseline) whose first counted run of a workload took
# more than SLOW_PEER times the fresh library's time, and more than
# SLOW_PEER_S seconds, runs no more of that workload: its ratio is far
# from 1 whatever the spread, and its other runs would take most of
# `make bench` on a machine where page faults are dear (largerep-huge on
# a 2-core VM: jemalloc 80 s a run, snmalloc 40 s, against 0.16 s; 14
# minutes of a 28-minute full run).
SLOW_PEER = 20
SLOW_PEER_S = 5.0
HEAPTRACK_WORK = "python3"   # the one workload run under heaptrack
# What each row is, said once at the start of the console output.
ROW_MEANING = {
    "fresh": "the library just built",
    "fresh-naive": "the same with SMALLOC_RETIRE_CYCLES=0: a page goes back as soon as it "
                   "empties (what the retire policy saves)",
    "fresh-thp": "the same with SMALLOC_HUGEPAGES=2 (threaded workloads): every segment of "
                 "small pages advised for huge pages, fewer page faults for more resident memory",
    "fresh-prof": "the same with SMALLOC_PROF=1: the heap profiler sampling at its default "
                  "rate (smalloc_prof(3)), what profiling costs",
    "baseline": "the installed smalloc, the one this build is compared with",
    "glibc": "the C library's malloc",
    "jemalloc": "Debian's jemalloc", "tcmalloc": "Debian's tcmalloc (minimal)",
    "jemalloc-prof": "Debian's jemalloc with MALLOC_CONF=prof:true: its heap profiler at its "
                     "default rate, what profiling costs there",
    "mimalloc": "Debian's mimalloc",
    "heaptrack": "glibc's malloc under heaptrack, which records every call with its stack "
                 "(python3 only): what a tracing profiler costs",
    "null": "reference: a per-thread bump allocator with no checks and no stats, the floor of "
            "an allocator's own cost",
}
LINE_RE = re.compile(r"time_s=(\S+) ops=(\d+) maxrss_kb=(\d+) checksum=([0-9a-fA-F]+)")
LIVE_RE = re.compile(r"live_kb=(\d+) rss_kb=(\d+)")


def say(msg=""):
    print(msg, flush=True)


# ---- finding allocators ------------------------------------------------------

class Alloc:
    def __init__(self, name, lib, smalloc=False, env=None, note="", wrap=None):
        self.name = name
        self.lib = lib
        self.smalloc = smalloc
        self.env = env or {}
        self.note = note
        self.wrap = wrap or []   # a command the workload runs under (heaptrack)


def elf_id(path):
    """(class, data, machine) of an ELF file, or None."""
    try:
        with open(path, "rb") as f:
            head = f.read(20)
    except OSError:
        return None
    if len(head) < 20 or head[:4] != b"\x7fELF":
        return None
    order = "<" if head[5] == 1 else ">"
    return (head[4], head[5], struct.unpack(order + "H", head[18:20])[0])


def ldconfig_lookup(soname, want):
    exe = shutil.which("ldconfig") or next(
        (p for p in ("/sbin/ldconfig", "/usr/sbin/ldconfig") if os.path.exists(p)), None)
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "-p"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        m = re.match(r"\s*(\S+) \(([^)]*)\) => (\S+)", line)
        if m and m.group(1) == soname and os.path.exists(m.group(3)):
            if want is None or elf_id(m.group(3)) == want:
                return m.group(3)
    return None


def find_baseline(explicit, fresh, want):
    """(path or None, how it was found)."""
    if explicit:
        return explicit, "BASELINE"
    cands = []
    pc = shutil.which("pkg-config")
    if pc:
        try:
            r = subprocess.run([pc, "--variable=libdir", "smalloc"], capture_output=True,
                               text=True, timeout=30)
            libdir = r.stdout.strip()
            if r.returncode == 0 and libdir:
                cands.append((os.path.join(libdir, "libsmalloc.so.0"), "pkg-config"))
        except (OSError, subprocess.SubprocessError):
            pass
    found = ldconfig_lookup("libsmalloc.so.0", want)
    if found:
        cands.append((found, "ldconfig"))
    for path, how in cands:
        if os.path.exists(path) and os.path.realpath(path) != os.path.realpath(fresh):
            return path, how
    return None, None


# ---- workloads ----------------------------------------------------------------

class Work:
    def __init__(self, name, group, desc, argv, real=False, full_only=False,
                 stdin=None, pre=None, ops_unit="op", threads=1):
        self.name = name
        self.threads = threads  # the null allocator runs single-threaded work only, fresh-thp threaded
        self.group = group      # churn, floor, other, real
        self.desc = desc
        self.argv = argv        # list; None when skipped
        self.real = real
        self.full_only = full_only
        self.stdin = stdin
        self.pre = pre          # callable run before each run (untimed)
        self.ops_unit = ops_unit
        self.skip = None        # reason when skipped


def sqlite_script(path, nrows):
    """A deterministic SQL script: nrows single-row INSERTs, two indexes, a few
    queries, an update and a delete."""
    with open(path, "w") as f:
        f.write("PRAGMA journal_mode=OFF;\nPRAGMA synchronous=OFF;\n")
        f.write("CREATE TABLE item(id INTEGER PRIMARY KEY, name TEXT NOT NULL, "
                "grp INTEGER NOT NULL, price REAL NOT NULL, note TEXT);\nBEGIN;\n")
        for i in range(1, nrows + 1):
            h = (i * 2654435761) & 0xffffffff
            f.write("INSERT INTO item VALUES(%d,'item-%08x',%d,%d.%02d,'%s');\n"
                    % (i, h, h % 977, h % 10007, h % 100, "n" * (h % 61)))
        f.write("COMMIT;\n"
                "CREATE INDEX item_name ON item(name);\n"
                "CREATE INDEX item_grp_price ON item(grp, price);\n"
                "SELECT count(*), sum(price) FROM item WHERE grp BETWEEN 100 AND 200;\n"
                "SELECT name FROM item ORDER BY name LIMIT 3 OFFSET 5000;\n"
                "SELECT grp, count(*), round(avg(price),2) FROM item GROUP BY grp "
                "ORDER BY 3 DESC, 1 LIMIT 5;\n"
                "SELECT count(*) FROM item a JOIN item b ON b.id = a.grp * 100 + 1 "
                "WHERE a.price < b.price;\n"
                "SELECT length(group_concat(note, '')) FROM "
                "(SELECT note FROM item WHERE name LIKE 'item-0%' ORDER BY id);\n"
                "UPDATE item SET note = note || name WHERE id % 10 = 0;\n"
                "DELETE FROM item WHERE grp % 7 = 0;\n"
                "SELECT count(*), sum(length(note)) FROM item;\n")


def debian_program(name):
    for p in ("/usr/bin/" + name, "/bin/" + name):
        if os.access(p, os.X_OK):
            return p
    return shutil.which(name)


def workloads(bindir, srcdir, quick, tmpdir):
    q = ["quick"] if quick else []
    bindir, srcdir = os.path.abspath(bindir), os.path.abspath(srcdir)   # runs are in tmpdir

    def prog(name, *args):
        return [os.path.join(bindir, name)] + list(args) + q

    ws = [
        Work("churn-a", "churn", "malloc(32)/free ping-pong", prog("bench_churn", "a")),
        Work("churn-b", "churn", "batches of 1000 blocks 16-256 B, freed in allocation order",
             prog("bench_churn", "b")),
        Work("churn-c", "churn", "batches of 1000 blocks 16-256 B, freed in reverse order",
             prog("bench_churn", "c")),
        Work("churn-d", "churn", "batches of 1000 blocks 16-256 B, freed in random order",
             prog("bench_churn", "d")),
        Work("churn-e", "churn", "batches of 1000 blocks spread over size classes 16 B - 8 KiB",
             prog("bench_churn", "e")),
        Work("churn-f", "churn", "producer thread allocates, consumer thread frees",
             prog("bench_churn", "f"), threads=2),
        Work("churn-floor", "floor",
             "ideal floor: case a on a plain singly linked free list, no malloc",
             prog("bench_churn", "floor")),
        Work("server", "other", "8 threads, pools of 2000 live blocks, random replacement, "
             "1 in 8 freed by another thread", prog("bench_server"), threads=8),
        Work("server-relay", "other", "16 workers that come and go, each taking over its "
             "predecessor's pool of 2000 blocks every 25,000 steps", prog("bench_server", "relay"),
             threads=16),
        Work("pipeline", "other", "source, 3 transforming stages and a sink passing message batches",
             prog("bench_pipeline"), threads=5),
        Work("xchurn-16", "other", "16 threads, pools of 4096 blocks 16-256 B, random replacement, "
             "1 in 4 freed by another thread", prog("bench_xchurn", "16"), threads=16),
        Work("xchurn-64", "other", "the same with 64 threads", prog("bench_xchurn", "64"), threads=64),
        Work("falseshare-active", "other", "threads allocate small blocks and write into them",
             prog("bench_falseshare", "active")),
        Work("falseshare-passive", "other", "blocks allocated by one thread, freed, reallocated "
             "and written by others", prog("bench_falseshare", "passive")),
        Work("realloc", "other", "strings and arrays grown by small steps, then shrunk",
             prog("bench_realloc")),
        Work("large", "other", "64 KiB - 64 MiB blocks, every page touched, some huge reallocs",
             prog("bench_large")),
        Work("largerep-huge", "other", "20 live blocks of 5-25 MiB, random replacement, every "
             "page written", prog("bench_largerep", "huge")),
        Work("largerep-mid", "other", "64 live blocks of 256 KiB - 2 MiB, random replacement, "
             "every page written", prog("bench_largerep", "mid")),
        Work("longlived-1e3", "other", "1e3 live small blocks, random free+malloc replacements",
             prog("bench_longlived", "1000")),
        Work("longlived-1e5", "other", "1e5 live small blocks, random free+malloc replacements",
             prog("bench_longlived", "100000")),
        Work("longlived-1e7", "other", "1e7 live small blocks, random free+malloc replacements",
             prog("bench_longlived", "10000000"), full_only=True),
    ]

    py = debian_program("python3")
    w = Work("python3", "real", "python3 on py-alloc.py (dicts, strings, lists, JSON)",
             [py, "-I", os.path.join(srcdir, "py-alloc.py")] + q if py else None, real=True)
    if not py:
        w.skip = "python3 is not installed (apt-get install python3)"
    ws.append(w)

    sq = debian_program("sqlite3")
    nrows = 40000 if quick else 200000
    db = os.path.join(tmpdir, "bench.db")
    sql = os.path.join(tmpdir, "bench.sql")

    def fresh_db():
        if not os.path.exists(sql):
            sqlite_script(sql, nrows)
        for p in (db, db + "-journal"):
            if os.path.exists(p):
                os.unlink(p)
    w = Work("sqlite3", "real", "sqlite3: %d single-row inserts, 2 indexes, queries, update, "
             "delete" % nrows, [sq, db] if sq else None, real=True, stdin=sql, pre=fresh_db)
    if not sq:
        w.skip = "sqlite3 is not installed (apt-get install sqlite3)"
    ws.append(w)
    return ws


# ---- running ------------------------------------------------------------------

def find_stats(text):
    """The smalloc stats object in stderr: the first JSON object holding os_mmap."""
    def search(obj):
        if isinstance(obj, dict):
            if "os_mmap" in obj:
                return obj
            for v in obj.values():
                r = search(v)
                if r is not None:
                    return r
        elif isinstance(obj, list):
            for v in obj:
                r = search(v)
                if r is not None:
                    return r
        return None

    dec = json.JSONDecoder()
    i = text.find("{")
    while i != -1:
        try:
            obj, end = dec.raw_decode(text, i)
        except ValueError:
            i = text.find("{", i + 1)
            continue
        r = search(obj)
        if r is not None:
            return r
        i = text.find("{", end)
    return None


def stats_summary(st):
    if st is None:
        return None
    out = {}
    try:
        out["os"] = sum(int(st.get(k, 0)) for k in OS_KEYS)
        out["slow_path"] = int(st.get("slow_path", 0))
        steps = st.get("slow_steps", {})
        if isinstance(steps, list):
            steps = dict(zip(STEP_NAMES, steps))
        for k in STEP_NAMES:
            out[k] = int(steps.get(k, 0))
        for k in PAGE_KEYS:
            if k in st:
                out[k] = int(st[k])
        if "calls_malloc" in st:
            out["calls_malloc"] = int(st["calls_malloc"])
    except (TypeError, ValueError, AttributeError):
        return None
    return out


def env_list(name):
    """The comma-separated items of environment variable name, empty ones left out."""
    return [x for x in os.environ.get(name, "").split(",") if x]


def base_env():
    env = dict(os.environ)
    for k in ("LD_PRELOAD", "SMALLOC_STATS", "MALLOC_CONF", "MIMALLOC_SHOW_STATS"):
        env.pop(k, None)
    env["PYTHONHASHSEED"] = "0"
    return env


def alloc_env(alloc):
    """The environment of a run under alloc: base_env, its preload and its own variables."""
    env = base_env()
    if alloc.lib:
        env["LD_PRELOAD"] = alloc.lib
    env.update(alloc.env)
    return env


def settle_mib(peak_kb):
    """MiB of bench_spawn's settle step (-p, see spawn.c) before a run of a
    workload whose runs so far peaked at peak_kb (0 before the first): half as
    much again as that peak, as a run that faults in more than the step freed
    is slow again (bench_large, 200 MB: a step of 212 MiB left 3 of 6 runs of
    one allocator slow, 256 MiB 0 of 6); within 256-1024."""
    return min(max(-(-peak_kb * 3 // 2048), 256), 1024)


def launch(spawn, argv, env_extra, stdin_path, tmpdir, settle=0):
    """Run argv through bench_spawn, with env_extra set in the child only,
    after a settle step of settle MiB (none when 0).
    Returns (status, wall seconds, peak RSS kB, stdout, stderr)."""
    outp = os.path.join(tmpdir, "stdout")
    errp = os.path.join(tmpdir, "stderr")
    repp = os.path.join(tmpdir, "spawn")
    if os.path.exists(repp):
        os.unlink(repp)
    cmd = [spawn, "-o", repp]
    if settle:
        cmd += ["-p", str(settle)]
    for k, v in env_extra.items():
        cmd += ["-e", "%s=%s" % (k, v)]
    if stdin_path:
        cmd += ["-i", stdin_path]
    cmd += ["--"] + argv
    with open(outp, "wb") as fo, open(errp, "wb") as fe:
        # in the scratch directory: a profile written at exit lands there
        p = subprocess.Popen(cmd, env=base_env(), stdin=subprocess.DEVNULL, stdout=fo,
                             stderr=fe, start_new_session=True, cwd=tmpdir)
        try:
            p.wait(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, 9)
            p.wait()
            raise TimeoutError("timed out after %d s" % RUN_TIMEOUT)
    with open(outp, "rb") as f:
        out = f.read().decode("utf-8", "replace")
    with open(errp, "rb") as f:
        err = f.read().decode("utf-8", "replace")
    try:
        with open(repp) as f:
            rep = dict(kv.split("=", 1) for kv in f.read().split())
        return int(rep["status"]), float(rep["wall_s"]), int(rep["maxrss_kb"]), out, err
    except (OSError, KeyError, ValueError):
        raise OSError("bench_spawn failed (exit %d): %s" % (p.returncode, err.strip()[-300:]))


def run_once(work, alloc, spawn, tmpdir, settle=0):
    env = {}
    if alloc.lib:
        env["LD_PRELOAD"] = alloc.lib
    if alloc.smalloc:
        env["SMALLOC_STATS"] = "json"
    env.update(alloc.env)
    if work.pre:
        work.pre()
    try:
        rc, wall, rss, out, err = launch(spawn, alloc.wrap + work.argv, env, work.stdin, tmpdir,
                                       settle)
    except (OSError, TimeoutError) as e:
        return {"error": str(e)}
    res = {}
    if rc != 0:
        tail = err.strip().splitlines()[-3:]
        why = "killed by signal %d" % -rc if rc < 0 else "exit status %d" % rc
        return {"error": "%s (%s)" % (why, " | ".join(tail)[:300])}
    if work.real:
        m = re.search(r"checksum=([0-9a-fA-F]+)", out)
        res.update(time=wall, ops=None, rss=rss,
                   checksum=m.group(1) if m else "%08x" % zlib.crc32(out.encode()))
    else:
        m = LINE_RE.search(out)
        if not m:
            return {"error": "no result line in output: %r" % out[:200]}
        res.update(time=float(m.group(1)), ops=int(m.group(2)), rss=int(m.group(3)),
                   checksum=m.group(4))
        m = LIVE_RE.search(out)
        if m:   # resident size against live bytes at the end (xchurn)
            res.update(live_kb=int(m.group(1)), end_rss_kb=int(m.group(2)))
    if alloc.smalloc:
        res["stats"] = stats_summary(find_stats(err))
    return res


def strace_count(work, alloc, tmpdir):
    """Memory syscalls of one untimed run under strace -f -c (start-up included)."""
    outp = os.path.join(tmpdir, "strace.out")
    argv = ["strace", "-f", "-c", "-e", "trace=memory", "-o", outp]
    if alloc.lib:
        argv += ["-E", "LD_PRELOAD=" + alloc.lib]
    argv += work.argv
    env = base_env()
    try:
        subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       timeout=RUN_TIMEOUT, check=True)
        with open(outp) as f:
            for line in f:
                tok = line.split()
                if tok and tok[-1] == "total" and len(tok) >= 5:
                    return int(tok[3])
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    return None


# ---- summarising -----------------------------------------------------------

class Row:
    def __init__(self, alloc):
        self.alloc = alloc
        self.runs = []
        self.checksums = set()
        self.error = None
        self.strace = None
        self.cut = False   # runs stopped after the first (SLOW_PEER)

    def ok(self):
        return self.runs and self.error is None

    def times(self):
        return [r["time"] for r in self.runs]

    def median(self):
        return statistics.median(self.times())

    def spread(self):
        t = self.times()
        return min(t), max(t)

    def rss(self):
        return statistics.median([r["rss"] for r in self.runs])

    def live_ratio(self):
        """Median resident size at the end over live bytes then, when reported."""
        v = [r["end_rss_kb"] / r["live_kb"] for r in self.runs if r.get("live_kb")]
        return statistics.median(v) if v else None

    def ns_per_op(self):
        r = self.runs[0]
        if not r.get("ops"):
            return None
        return self.median() / r["ops"] * 1e9

    def stat(self, key):
        vals = [r["stats"][key] for r in self.runs if r.get("stats") and key in r["stats"]]
        return statistics.median(vals) if vals else None

    def os_calls(self):
        if self.alloc.smalloc:
            return self.stat("os")
        return self.strace


def fmt(v, spec="%.3f"):
    return "-" if v is None else spec % v


def fmt_ns(v):
    if v is None:
        return "-"
    return "%.2f" % v if v < 100 else "%.0f" % v


def fmt_int(v):
    return "-" if v is None else "%d" % round(v)


def table(headers, rows, md=False, left=1):
    """A plain-text or Markdown table; the first `left` columns align left."""
    if md:
        out = ["| " + " | ".join(headers) + " |",
               "|" + "|".join("---" if i < left else "---:" for i in range(len(headers))) + "|"]
        out += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(out)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(widths[i]) if i < left else h.rjust(widths[i])
                       for i, h in enumerate(headers))]
    for r in rows:
        lines.append("  ".join(c.ljust(widths[i]) if i < left else c.rjust(widths[i])
                               for i, c in enumerate(r)))
    return "\n".join(lines)


def compare(a, b):
    """faster/slower when the spreads of a and b do not overlap, else None."""
    amin, amax = a.spread()
    bmin, bmax = b.spread()
    if amax < bmin:
        return "faster"
    if amin > bmax:
        return "slower"
    return None


class Report:
    def __init__(self, baseline_name):
        self.baseline_name = baseline_name
        self.results = []    # (work, {name: Row})
        self.errors = []
        self.notes = []
        self.idle = {}       # memory return: {name: (samples, base_kb, error)}
        self.limits = {}     # {name: [MiB per LIMIT_SIZES]}
        self.quick = False

    def work_tables(self, work, rows, md):
        fresh = rows.get("fresh")
        fresh_ok = fresh is not None and fresh.ok()
        base = rows.get(self.baseline_name)
        headers = ["allocator", "median s", "spread s", "ns/op",
                   "maxrss kB", "time/fresh", "rss/fresh", "OS calls", "slow path", "vs baseline"]
        body, csv = [], []
        for name, row in rows.items():
            if not row.ok():
                body.append([name, "ERROR", row.error or "no runs"] + ["-"] * 7)
                csv.append([work.name, name, "", "", "", "", "", "", "", "", "", "",
                            "", "", row.error or "no runs"])
                continue
            med = row.median()
            lo, hi = row.spread()
            tr = med / fresh.median() if fresh_ok and fresh.median() > 0 else None
            rr = row.rss() / fresh.rss() if fresh_ok and fresh.rss() > 0 else None
            verdict = ""
            if name == "fresh" and base is not None and base.ok() and base is not fresh:
                v = compare(row, base)
                if v:
                    verdict = "%s (%.2fx)" % (v, base.median() / med)
                else:
                    verdict = "within noise"
            label = name + (" (baseline)" if name == self.baseline_name
                            and name != "baseline" else "")
            osc = row.os_calls()
            os_s = fmt_int(osc)
            if osc is not None and not row.alloc.smalloc:
                os_s += "*"
            body.append([label, "%.4f" % med, "%.4f-%.4f" % (lo, hi),
                         fmt_ns(row.ns_per_op()), fmt_int(row.rss()), fmt(tr, "%.2f"),
                         fmt(rr, "%.2f"), os_s, fmt_int(row.stat("slow_path")), verdict])
            csv.append([work.name, name, "%.6f" % med, "%.6f" % lo, "%.6f" % hi,
                        fmt(row.ns_per_op(), "%.3f").replace("-", ""), "%d" % round(row.rss()),
                        fmt(tr, "%.4f").replace("-", ""), fmt(rr, "%.4f").replace("-", ""),
                        "" if osc is None else "%d" % round(osc),
                        fmt_int(row.stat("slow_path")).replace("-", ""),
                        verdict, " ".join("%.6f" % t for t in row.times()),
                        sorted(row.checksums)[0] if row.checksums else "", ""])
        out = [table(headers, body, md)]
        cut = [n for n, r in rows.items() if r.ok() and r.cut]
        if cut:
            out.append(("\n" if md else "") + "one counted run only, over %d times the fresh "
                       "library's time: %s" % (SLOW_PEER, ", ".join(cut)))
        live = [(n, r.live_ratio()) for n, r in rows.items() if r.ok() and r.live_ratio()]
        if live:
            out.append(("\n" if md else "") + "resident size / live bytes at the end (pools and "
                       "blocks in flight; thread stacks included): " +
                       ", ".join("%s %.2f" % (n, v) for n, v in live))
        null = rows.get("null")
        if null is not None and null.ok() and null.ns_per_op() is not None:
            above = ["%s %s" % (n, fmt_ns(r.ns_per_op() - null.ns_per_op()))
                     for n, r in rows.items() if n != "null" and r.ok()
                     and r.ns_per_op() is not None]
            out.append(("\n" if md else "") + "ns/op above the null allocator (the allocator's "
                       "own cost): " + ", ".join(above))
        smalloc_rows = [(n, r) for n, r in rows.items() if r.alloc.smalloc and r.ok()
                        and r.stat("slow_path") is not None]
        if work.group == "churn" and smalloc_rows:
            h2 = ["allocator", "slow path"] + STEP_NAMES + ["OS calls"] + PAGE_KEYS
            b2 = []
            for n, r in smalloc_rows:
                b2.append([n, fmt_int(r.stat("slow_path"))] + [fmt_int(r.stat(k)) for k in STEP_NAMES]
                          + [fmt_int(r.stat("os"))] + [fmt_int(r.stat(k)) for k in PAGE_KEYS])
            out.append(("\nSlow-path steps (median per run):\n\n" if md else
                        "slow-path steps (median per run):\n") + table(h2, b2, md))
        return "\n".join(out), csv

    def geomeans(self):
        """{alloc: (time geomean, rss geomean, n)} over workloads with fresh results."""
        acc = {}
        for work, rows in self.results:
            if work.group == "floor":
                continue
            fresh = rows.get("fresh")
            if fresh is None or not fresh.ok():
                continue
            for name, row in rows.items():
                if not row.ok() or name == "null":
                    continue
                t = math.log(row.median() / fresh.median())
                r = math.log(row.rss() / fresh.rss()) if fresh.rss() > 0 and row.rss() > 0 else 0
                a = acc.setdefault(name, [0.0, 0.0, 0])
                a[0] += t
                a[1] += r
                a[2] += 1
        return {n: (math.exp(a[0] / a[2]), math.exp(a[1] / a[2]), a[2]) for n, a in acc.items()}

    def geomean_table(self, md):
        g = self.geomeans()
        body = [[n, "%.3f" % t, "%.3f" % r, "%d" % k] for n, (t, r, k) in g.items()]
        return table(["allocator", "time/fresh", "rss/fresh", "workloads"], body, md)


# ---- output files ------------------------------------------------------------

def machine_info():
    try:
        ncpu = len(os.sched_getaffinity(0))
    except AttributeError:
        ncpu = os.cpu_count()
    try:
        r = subprocess.run(["nproc"], capture_output=True, text=True, timeout=10)
        if r.returncode == 0:
            ncpu = int(r.stdout.strip())
    except (OSError, ValueError, subprocess.SubprocessError):
        pass
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    libc = " ".join(platform.libc_ver())
    return [("nproc", str(ncpu)), ("CPU", cpu),
            ("kernel", platform.system() + " " + platform.release()),
            ("libc", libc.strip() or "-"),
            ("date", datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %z"))]


# One colour per allocator, the same in every chart and every run; names
# not listed (BENCH_PEERS) take the spare ones in order of appearance.
COLOURS = {"fresh": "#d62728", "fresh-naive": "#ff9896", "fresh-prof": "#e377c2",
           "fresh-thp": "#ffbb78",
           "jemalloc-prof": "#c5b0d5", "baseline": "#8c564b",
           "glibc": "#7f7f7f", "jemalloc": "#2ca02c", "tcmalloc": "#1f77b4",
           "mimalloc": "#9467bd", "mimalloc3": "#17becf", "snmalloc": "#bcbd22",
           "null": "#c7c7c7", "heaptrack": "#ff7f0e"}
SPARE_COLOURS = ["#e377c2", "#ff7f0e", "#98df8a", "#aec7e8", "#c5b0d5", "#f7b6d2"]


def colour_of(name, names):
    if name in COLOURS:
        return COLOURS[name]
    spare = [n for n in names if n not in COLOURS]
    return SPARE_COLOURS[spare.index(name) % len(SPARE_COLOURS)]


def write_svg(path, report, tmpdir):
    """Two panels: median time and median peak resident size relative to
    fresh per workload, one bar per allocator with its min-max spread."""
    gp = shutil.which("gnuplot")
    if not gp:
        return False
    names = []
    for _, rows in report.results:
        for n in rows:
            if n not in names and n not in ("floor", "null"):
                names.append(n)
    works = [(w, rows) for w, rows in report.results
             if w.group != "floor" and "fresh" in rows and rows["fresh"].ok()]
    if not works or not names:
        return False
    data = os.path.join(tmpdir, "ratios.dat")
    with open(data, "w") as f:
        # per allocator: time ratio, its min, its max, rss ratio, its min, its max
        f.write("workload " + " ".join('"%s" t- t+ r r- r+' % n for n in names) + "\n")
        for w, rows in works:
            fresh = rows["fresh"]
            vals = []
            for n in names:
                r = rows.get(n)
                if r is None or not r.ok():
                    vals += ["?"] * 6
                    continue
                lo, hi = r.spread()
                rss = [x["rss"] for x in r.runs]
                fr = fresh.rss() or 1
                vals += ["%.4f" % (r.median() / fresh.median()), "%.4f" % (lo / fresh.median()),
                         "%.4f" % (hi / fresh.median()), "%.4f" % (r.rss() / fr),
                         "%.4f" % (min(rss) / fr), "%.4f" % (max(rss) / fr)]
            f.write('"%s" %s\n' % (w.name, " ".join(vals)))
    width = max(1000, 12 * len(works) * (len(names) + 1))
    styles = "".join("set linetype %d lc rgb '%s'\n" % (k + 1, colour_of(n, names))
                     for k, n in enumerate(names))

    def panel(col, title):
        return ("plot for [i=0:%d] '%s' using (column(2+6*i+%d)):(column(3+6*i+%d)):"
                "(column(4+6*i+%d)):xtic(1) lt (i+1) title columnheader(2+6*i)\n"
                % (len(names) - 1, data, col, col, col))
    script = os.path.join(tmpdir, "ratios.gp")
    with open(script, "w") as f:
        f.write("""set terminal svg size %d,1000 dynamic background rgb 'white' font 'sans,11'
set output '%s'
%sset datafile missing '?'
set style data histograms
set style histogram errorbars gap 1 lw 1
set style fill solid 0.85 border -1
set boxwidth 0.9
set logscale y 2
set grid ytics
set xtics rotate by 45 right nomirror
set key outside right top
set multiplot layout 2,1
set title 'median time relative to fresh, bars from the fastest to the slowest run (lower is faster)'
set ylabel 'time / fresh (log scale)'
set yrange [0.125:*]
set arrow 1 from graph 0, first 1 to graph 1, first 1 nohead dt 2 lw 1.5
set bmargin 9
""" % (width, path, styles))
        f.write(panel(0, "time"))
        f.write("""set title 'median peak resident size relative to fresh, bars from the smallest to the largest run'
set ylabel 'maxrss / fresh (log scale)'
set yrange [0.03125:*]
""")
        f.write(panel(3, "rss"))
        f.write("unset multiplot\n")
    r = subprocess.run([gp, script], capture_output=True, text=True)
    if r.returncode != 0:
        report.notes.append("gnuplot failed: " + r.stderr.strip()[:300])
        return False
    return True


# ---- memory return and the address-space limit (bench_idle) ------------------

IDLE_S = 3.0
SAMPLE_RE = re.compile(r"t_ms=(-?\d+) rss_kb=(\d+)")
LIMIT_SIZES = [("300 KB", 300000), ("1 MiB", 1 << 20)]


def run_idle(bindir, allocs, quick):
    """Burst, free, idle under each allocator: resident size over time.
    Returns {name: (samples [(t_ms, rss_kb)], base_kb, error)}."""
    prog = os.path.join(bindir, "bench_idle")
    out = {}
    for a in allocs:
        env = alloc_env(a)
        argv = [prog, "burst"] + (["quick"] if quick else []) + [str(IDLE_S)]
        try:
            r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.SubprocessError) as e:
            out[a.name] = ([], 0, str(e))
            continue
        m = re.search(r"base_kb=(\d+)", r.stdout)
        if r.returncode != 0 or not m:
            out[a.name] = ([], 0, "exit status %d" % r.returncode)
            continue
        out[a.name] = ([(int(t), int(k)) for t, k in SAMPLE_RE.findall(r.stdout)],
                       int(m.group(1)), None)
    return out


def run_limit(bindir, allocs):
    """MiB each allocator obtains under a 256 MiB RLIMIT_AS, per block size."""
    prog = os.path.join(bindir, "bench_idle")
    out = {}
    for a in allocs:
        env = alloc_env(a)
        vals = []
        for _, size in LIMIT_SIZES:
            try:
                r = subprocess.run([prog, "limit", str(size)], env=env, capture_output=True,
                                   text=True, timeout=120)
                m = re.search(r"limit_mib=(\d+)", r.stdout)
                vals.append(int(m.group(1)) if m else None)
            except (OSError, subprocess.SubprocessError):
                vals.append(None)
        out[a.name] = vals
    return out


def idle_table(idle, md):
    marks = [-2, -1, 1000, 2000, 3000]
    headers = ["allocator", "base MiB", "peak MiB", "freed MiB", "+1 s", "+2 s", "+3 s",
               "end - base MiB"]
    body = []
    for name, (samples, base, err) in idle.items():
        if err:
            body.append([name, "ERROR", err] + ["-"] * 5)
            continue
        at = dict(samples)
        row = [name, "%.1f" % (base / 1024.0)]
        for t in marks:
            row.append("%.1f" % (at[t] / 1024.0) if t in at else "-")
        end = samples[-1][1] if samples else base
        row.append("%.1f" % ((end - base) / 1024.0))
        body.append(row)
    return table(headers, body, md)


def limit_table(limits, glibc_name, md):
    headers = ["allocator"] + ["%s blocks, MiB" % n for n, _ in LIMIT_SIZES] + \
        ["of glibc's"]
    ref = limits.get(glibc_name)
    body = []
    for name, vals in limits.items():
        row = [name] + [str(v) if v is not None else "ERROR" for v in vals]
        if ref and all(ref) and all(v is not None for v in vals):
            row.append(" / ".join("%.0f %%" % (100.0 * v / r) for v, r in zip(vals, ref)))
        else:
            row.append("-")
        body.append(row)
    return table(headers, body, md)


def write_idle_svg(path, idle, tmpdir, report):
    gp = shutil.which("gnuplot")
    if not gp:
        return False
    names = [n for n, (samples, _, err) in idle.items() if not err and samples]
    if not names:
        return False
    data = os.path.join(tmpdir, "idle.dat")
    with open(data, "w") as f:
        for n in names:
            samples, base, _ = idle[n]
            f.write('"%s"\n' % n)
            for t, kb in samples:
                if t >= -1:
                    f.write("%.1f %.1f\n" % (max(t, 0) / 1000.0, kb / 1024.0))
            f.write("\n\n")
    script = os.path.join(tmpdir, "idle.gp")
    styles = "".join("set linetype %d lc rgb '%s'\n" % (k + 1, colour_of(n, names))
                     for k, n in enumerate(names))
    with open(script, "w") as f:
        f.write("""set terminal svg size 900,500 dynamic background rgb 'white' font 'sans,11'
set output '%s'
%sset title 'burst, free, idle: resident size after the frees (no allocator call)'
set xlabel 'seconds after the last free'
set ylabel 'resident MiB'
set grid
set key outside right top
plot for [i=0:%d] '%s' index i using 1:2 with linespoints lt (i+1) pt 7 ps 0.4 title columnheader(1)
""" % (path, styles, len(names) - 1, data))
    r = subprocess.run([gp, script], capture_output=True, text=True)
    if r.returncode != 0:
        report.notes.append("gnuplot failed (memory return): " + r.stderr.strip()[:300])
        return False
    return True


def write_files(outdir, report, allocs, info, mode, tmpdir):
    import csv
    os.makedirs(outdir, exist_ok=True)
    csv_path = os.path.join(outdir, "results.csv")
    md_path = os.path.join(outdir, "results.md")
    svg_path = os.path.join(outdir, "results.svg")
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["workload", "allocator", "median_s", "min_s", "max_s", "ns_per_op",
                    "maxrss_kb", "time_ratio", "rss_ratio", "os_calls", "slow_path",
                    "vs_baseline", "runs_s", "checksum", "error"])
        for work, rows in report.results:
            if work.skip:
                w.writerow([work.name, "", "", "", "", "", "", "", "", "", "", "", "", "",
                            "skipped: " + work.skip])
                continue
            _, rows_csv = report.work_tables(work, rows, False)
            for r in rows_csv:
                w.writerow(r)
        for n, (t, r, k) in report.geomeans().items():
            w.writerow(["geomean", n, "", "", "", "", "", "%.4f" % t, "%.4f" % r, "", "", "",
                        "", "", ""])
    with open(md_path, "w") as f:
        f.write("# smalloc benchmark results\n\n")
        f.write("Mode: %s.  Medians of the counted runs; spread is min-max; ratios are to "
                "`fresh`; *vs baseline* says faster/slower only where the spreads do not "
                "overlap, else *within noise*.\n\n" % mode)
        f.write(table(["machine", ""], [[k, v] for k, v in info], True, left=2) + "\n\n")
        f.write("## Allocators\n\n")
        f.write(table(["allocator", "library"],
                      [[a.name + (" (%s)" % a.note if a.note else ""),
                        "`%s`" % a.lib if a.lib else
                        "(no preload: glibc malloc%s)" % (", under `heaptrack`" if a.wrap else "")]
                       for a in allocs], True, left=2) + "\n\n")
        for note in report.notes:
            f.write("- %s\n" % note)
        if report.notes:
            f.write("\n")
        f.write("## Geometric mean over all workloads\n\n")
        f.write(report.geomean_table(True) + "\n\n")
        for work, rows in report.results:
            f.write("## %s\n\n%s\n\n" % (work.name, work.desc))
            if work.skip:
                f.write("Skipped: %s\n\n" % work.skip)
                continue
            text, _ = report.work_tables(work, rows, True)
            f.write(text + "\n\n")
        if report.idle:
            f.write("## Memory return: burst, free, idle\n\n"
                    "bench_idle: %s of small, 300 KB and 8 MiB blocks allocated, every page "
                    "written, all freed; then no allocator call for %.0f s.  Resident size "
                    "before the burst (base), at its peak, just after the frees and at each "
                    "second after; plot: results-idle.svg.\n\n" % (
                        "128 MiB" if report.quick else "1 GiB", IDLE_S))
            f.write(idle_table(report.idle, True) + "\n\n")
        if report.limits:
            f.write("## Under a 256 MiB address-space limit\n\n"
                    "The whole process under RLIMIT_AS = 256 MiB (`ulimit -v 262144`): "
                    "malloc(size) until NULL.\n\n")
            f.write(limit_table(report.limits, "glibc", True) + "\n\n")
        f.write("OS calls: smalloc's own counters (os_mmap + os_munmap + os_madvise + "
                "os_mremap); a value marked * is `strace -f -c -e trace=memory` of a separate "
                "untimed run and includes process start-up.\n")
        if report.errors:
            f.write("\n## Errors\n\n")
            for e in report.errors:
                f.write("- %s\n" % e)
    made = [csv_path, md_path]
    if write_svg(os.path.abspath(svg_path), report, tmpdir):
        made.append(svg_path)
    idle_svg = os.path.join(outdir, "results-idle.svg")
    if report.idle and write_idle_svg(os.path.abspath(idle_svg), report.idle, tmpdir, report):
        made.append(idle_svg)
    return made


# ---- main --------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bindir", default=".", help="where the bench_* programs are")
    ap.add_argument("--srcdir", default=os.path.dirname(os.path.abspath(__file__)),
                    help="where py-alloc.py is")
    ap.add_argument("--outdir", default=".", help="where results.* are written")
    args = ap.parse_args()

    started = time.perf_counter()
    quick = os.environ.get("QUICK", "") not in ("", "0", "no")
    nruns = 3 if quick else 5
    if os.environ.get("BENCH_RUNS"):
        nruns = max(1, int(os.environ["BENCH_RUNS"]))
    use_strace = os.environ.get("BENCH_STRACE", "") not in ("", "0", "no")

    fresh = os.environ.get("FRESH", "")
    if not fresh or not os.path.exists(fresh):
        say("bench: FRESH=%r: the freshly built libsmalloc.so.0 was not found" % fresh)
        return 2
    fresh = os.path.abspath(fresh)
    probe = os.path.join(args.bindir, "bench_churn")
    spawn = os.path.abspath(os.path.join(args.bindir, "bench_spawn"))
    if not os.access(spawn, os.X_OK):
        say("bench: %s not found: build the benchmark programs first (make bench)" % spawn)
        return 2
    want = elf_id(probe)

    allocs = [Alloc("fresh", fresh, smalloc=True),
              Alloc("fresh-naive", fresh, smalloc=True, env={"SMALLOC_RETIRE_CYCLES": "0"},
                    note="SMALLOC_RETIRE_CYCLES=0"),
              Alloc("fresh-prof", fresh, smalloc=True, env={"SMALLOC_PROF": "1"},
                    note="SMALLOC_PROF=1"),
              Alloc("fresh-thp", fresh, smalloc=True, env={"SMALLOC_HUGEPAGES": "2"},
                    note="SMALLOC_HUGEPAGES=2")]
    explicit = os.environ.get("BASELINE", "")
    if explicit and not os.path.exists(explicit):
        say("bench: BASELINE=%s does not exist" % explicit)
        return 2
    base, how = find_baseline(explicit, fresh, want)
    if base:
        allocs.append(Alloc("baseline", os.path.abspath(base), smalloc=True, note=how))
        baseline_name = "baseline"
    else:
        say("bench: no installed smalloc found (BASELINE unset, pkg-config and ldconfig know "
            "none): glibc is the baseline")
        baseline_name = "glibc"
    allocs.append(Alloc("glibc", None))
    for name, soname in PEERS:
        lib = ldconfig_lookup(soname, want)
        if lib:
            allocs.append(Alloc(name, lib))
            if name == "jemalloc":
                allocs.append(Alloc("jemalloc-prof", lib, env={"MALLOC_CONF": "prof:true"},
                                    note="MALLOC_CONF=prof:true"))
    for spec in env_list("BENCH_PEERS"):
        name, _, lib = spec.partition("=")
        if not name or not os.path.exists(lib):
            say("bench: BENCH_PEERS entry %r: want name=/path/to/lib.so of an existing file" % spec)
            return 2
        allocs.append(Alloc(name, os.path.abspath(lib)))
    heaptrack = None
    if shutil.which("heaptrack"):
        heaptrack = Alloc("heaptrack", None, note=HEAPTRACK_WORK + " only")
    floor = Alloc("floor", None)
    nulllib = os.environ.get("NULLLIB", "")
    null = None
    if nulllib and os.path.exists(nulllib):
        null = Alloc("null", os.path.abspath(nulllib), note="reference: no checks, no stats")
    elif nulllib:
        say("bench: NULLLIB=%s does not exist: no null allocator row" % nulllib)

    pick = env_list("BENCH_ALLOCS")
    if pick:
        known = [a.name for a in allocs + [x for x in (null, heaptrack) if x]]
        unknown = [s for s in pick if s not in known]
        if unknown:
            say("bench: BENCH_ALLOCS names %s, not among the allocators found: %s" %
                (", ".join(unknown), ", ".join(known)))
            return 2
        allocs = [a for a in allocs if a.name == "fresh" or a.name in pick]
        if baseline_name not in pick:
            baseline_name = "fresh"
        null = null if "null" in pick else None
        heaptrack = heaptrack if "heaptrack" in pick else None

    if use_strace and not shutil.which("strace"):
        say("bench: BENCH_STRACE=1 but strace is not installed: OS calls of other "
            "allocators are not counted")
        use_strace = False

    tmpdir = tempfile.mkdtemp(prefix="smalloc-bench-")
    if heaptrack:
        heaptrack.wrap = [shutil.which("heaptrack"), "-o", os.path.join(tmpdir, "heaptrack")]
    try:
        ws = workloads(os.path.abspath(args.bindir), os.path.abspath(args.srcdir), quick, tmpdir)
        only = env_list("BENCH_ONLY")
        if only:
            ws = [w for w in ws if any(w.name == o or (o.endswith("*") and
                                                       w.name.startswith(o[:-1])) for o in only)]
        mode = ("QUICK (%d counted runs, small sizes)" % nruns) if quick else \
            ("full (%d counted runs)" % nruns)
        say("smalloc bench: %s; allocators: %s" % (mode, ", ".join(
            a.name + ("" if a.name != baseline_name or a.name == "baseline" else " (baseline)")
            for a in allocs)))
        extra = ([null] if null else []) + ([heaptrack] if heaptrack else [])
        for a in allocs + extra:
            say("  %-12s %s" % (a.name, " ".join(a.wrap) if a.wrap else a.lib or "(no preload)"))
            say("  %-12s   %s" % ("", ROW_MEANING.get(a.name, "a peer allocator, preloaded")
                                  + (" (%s)" % a.note if a.note and a.name == "baseline" else "")))
        say("columns: median s = median of the counted runs, spread s = fastest-slowest run, "
            "maxrss kB = median peak resident size, time/fresh and rss/fresh = ratios to fresh, "
            "OS calls = mmap+munmap+madvise+mremap (smalloc's counters; * strace), slow path = "
            "smalloc's slow-path entries, vs baseline = faster or slower where the spreads do not "
            "overlap, else within noise")
        report = Report(baseline_name)
        for w in ws:
            say("")
            say("== %s: %s" % (w.name, w.desc))
            if w.skip or (quick and w.full_only):
                if not w.skip:
                    w.skip = "skipped in QUICK mode"
                say("   skipped: %s" % w.skip)
                report.results.append((w, {}))
                continue
            if w.group == "floor":
                wallocs = [floor]
            elif w.group == "churn":
                wallocs = [a for a in allocs if a.name != "fresh-thp"] + \
                          ([null] if null and w.threads == 1 else [])
            else:
                wallocs = [a for a in allocs if a.name != "fresh-naive" and
                           (a.name != "fresh-thp" or w.threads > 1)]
            if heaptrack and w.name == HEAPTRACK_WORK:
                wallocs.append(heaptrack)
            rows = {a.name: Row(a) for a in wallocs}
            t0 = time.perf_counter()
            peak_kb = 0
            for rnd in range(nruns + 1):
                # each round in its own order (the same in every run of
                # the benchmark): a run right after one that used much
                # memory pays for the kernel taking it back (largerep-huge
                # after snmalloc: 2.5-4.5x), and no allocator should get
                # that place in every round, as a rotation would give it;
                # and every run starts after the same settle step, as on a
                # VM the run before also decides how fast memory faults in
                order = list(wallocs)
                random.Random(rnd).shuffle(order)
                for a in order:
                    row = rows[a.name]
                    if row.error or row.cut:
                        continue
                    r = run_once(w, a, spawn, tmpdir, settle_mib(peak_kb))
                    if "error" in r:
                        row.error = ("warm-up: " if rnd == 0 else "") + r["error"]
                        report.errors.append("%s under %s: %s" % (w.name, a.name, row.error))
                        continue
                    row.checksums.add(r["checksum"])
                    peak_kb = max(peak_kb, r["rss"])
                    if rnd > 0:
                        row.runs.append(r)
                # after the first counted round: no more runs of a peer
                # far slower than the fresh library (SLOW_PEER)
                fresh_row = rows.get("fresh")
                if rnd == 1 and fresh_row is not None and fresh_row.ok():
                    for row in rows.values():
                        if not row.alloc.smalloc and row.alloc.name != baseline_name and row.ok() and \
                                row.median() > SLOW_PEER_S and \
                                row.median() > SLOW_PEER * fresh_row.median():
                            row.cut = True
            if use_strace and w.group == "churn":
                for a in wallocs:
                    if not a.smalloc and rows[a.name].ok():
                        rows[a.name].strace = strace_count(w, a, tmpdir)
            sums = {}
            for n, row in rows.items():
                for c in row.checksums:
                    sums.setdefault(c, []).append(n)
            if len(sums) > 1:
                msg = "%s: checksums disagree: %s" % (w.name, "; ".join(
                    "%s from %s" % (c, ", ".join(ns)) for c, ns in sorted(sums.items())))
                report.errors.append(msg)
                say("   ERROR " + msg)
            for n, row in rows.items():
                if not (row.alloc.smalloc and row.ok()):
                    continue
                st = row.runs[0].get("stats")
                note = None
                if st is None:
                    note = "%s: no SMALLOC_STATS=json output found on stderr" % n
                elif st.get("calls_malloc", 1) == 0 and not w.real:
                    note = ("%s: smalloc counted no malloc calls: the library does not replace "
                            "malloc (built with --disable-override?)" % n)
                if note and note not in report.notes:
                    report.notes.append(note)
                    say("   note: " + note)
            report.results.append((w, rows))
            text, _ = report.work_tables(w, rows, False)
            say(text)
            say("   (%.1f s)" % (time.perf_counter() - t0))

        report.quick = quick
        if not only and os.access(os.path.join(args.bindir, "bench_idle"), os.X_OK):
            mallocs = [a for a in allocs
                       if a.name not in ("fresh-naive", "fresh-prof", "fresh-thp", "jemalloc-prof")]
            say("")
            say("== memory return: burst, free, then %.0f s without an allocator call" % IDLE_S)
            report.idle = run_idle(os.path.abspath(args.bindir), mallocs, quick)
            say(idle_table(report.idle, False))
            say("")
            say("== under a 256 MiB address-space limit: malloc until NULL (MiB obtained)")
            report.limits = run_limit(os.path.abspath(args.bindir), mallocs)
            say(limit_table(report.limits, "glibc", False))

        say("")
        say("== geometric mean over all workloads (ratios to fresh)")
        say(report.geomean_table(False))
        for note in report.notes:
            say("note: " + note)
        made = write_files(args.outdir, report, allocs + extra,
                           machine_info(), mode, tmpdir)
        say("")
        say("wrote " + ", ".join(made))
        if report.errors:
            say("")
            say("ERRORS:")
            for e in report.errors:
                say("  " + e)
        say("bench: total wall time %.1f s" % (time.perf_counter() - started))
        return 1 if report.errors else 0
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
