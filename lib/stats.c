/* Statistics: per-thread counters merged when read, folded into a process
 * total when a thread exits; one field list drives get, reset, the table
 * and the JSON printer.
 *
 * Cheap on the fast path by construction: malloc adds the requested size,
 * free counts into its page; per-class allocation counts are derived when
 * a page's counts are folded (allocs = frees + collected + change in used). */
#include "internal.h"

#include <pthread.h>
#include <stdio.h>
#include <fcntl.h>
#include <unistd.h>

sm_gstats_t sm_gstats;

static pthread_mutex_t sm_stats_mutex = PTHREAD_MUTEX_INITIALIZER;
static sm_tstats_t sm_exited;          /* threads that exited (heaps lock) */
static sm_tstats_t sm_orphan;          /* frees by threads without a heap (atomic) */
static smalloc_stats_t sm_reset_base;  /* raw figures at the last reset (stats lock) */

/* The figures being read, and the per-thread counters summed on the way:
 * 10 KiB and twice 7 KiB, too much for the stack of a thread that may
 * read them (a thread's stack can be 16 KiB: mallinfo2 and malloc_stats
 * overflowed a 32 KiB one), so one reader at a time, under
 * sm_stats_read_mutex, which is taken before any other lock. */
static pthread_mutex_t sm_stats_read_mutex = PTHREAD_MUTEX_INITIALIZER;
static struct {
  sm_tstats_t t, orphan;
  smalloc_stats_t s;
} sm_read;
/* This thread holds sm_stats_read_mutex: a printer's write may allocate,
 * and the periodic report that allocation may print (sm_stats_periodic)
 * waits for the next one rather than for itself. */
static __thread bool sm_stats_reading __attribute__((tls_model("initial-exec")));

static void sm_stats_read_lock(void) {
  pthread_mutex_lock(&sm_stats_read_mutex);
  sm_stats_reading = true;
}

static void sm_stats_read_unlock(void) {
  sm_stats_reading = false;
  pthread_mutex_unlock(&sm_stats_read_mutex);
}

/* Every figure after the header: name, and whether it is a gauge (kept by
 * reset) or an event count (zeroed by reset).  B marks byte figures for
 * the table. */
#define SM_STATS_FIELDS(X)                                                  \
  X(calls_malloc, 0, 0) X(calls_calloc, 0, 0) X(calls_realloc, 0, 0)        \
  X(calls_reallocarray, 0, 0) X(calls_free, 0, 0) X(calls_free_null, 0, 0)  \
  X(calls_posix_memalign, 0, 0) X(calls_aligned_alloc, 0, 0)                \
  X(calls_memalign, 0, 0) X(calls_valloc, 0, 0) X(calls_pvalloc, 0, 0)      \
  X(calls_usable_size, 0, 0) X(calls_free_sized, 0, 0)                      \
  X(calls_free_aligned_sized, 0, 0) X(calls_failed, 0, 0)                   \
  X(bytes_requested, 0, 1) X(bytes_in_use, 1, 1) X(bytes_in_use_peak, 1, 1) \
  X(blocks_in_use, 1, 0) X(large_allocs, 0, 0) X(large_frees, 0, 0)         \
  X(huge_allocs, 0, 0) X(huge_frees, 0, 0) X(huge_remaps, 0, 0)             \
  X(slow_path, 0, 0)
#define SM_STATS_FIELDS2(X)                                                 \
  X(pages_in_use, 1, 0) X(pages_retired, 0, 0) X(pages_reused, 0, 0)        \
  X(pages_released, 0, 0) X(pages_full, 0, 0) X(pages_unfull, 0, 0)         \
  X(segments_in_use, 1, 0) X(segments_mapped, 0, 0) X(segments_cached, 0, 0) \
  X(segments_cache_hits, 0, 0) X(segments_purged, 0, 0)                     \
  X(segments_unmapped, 0, 0) X(os_mmap, 0, 0) X(os_munmap, 0, 0)            \
  X(os_madvise, 0, 0) X(os_mremap, 0, 0) X(bytes_mapped, 1, 1)              \
  X(bytes_mapped_peak, 1, 1) X(bytes_committed, 1, 1) X(bytes_purged, 0, 1) \
  X(threads_started, 0, 0) X(threads_exited, 0, 0) X(pages_abandoned, 0, 0) \
  X(pages_reclaimed, 0, 0) X(segments_reclaimed, 0, 0)
/* after classes[] (stats version 2) */
#define SM_STATS_FIELDS3(X) X(pages_claimed, 0, 0) X(oom_collects, 0, 0) \
  X(huge_cached, 0, 0) X(huge_cache_hits, 0, 0) X(background_threads, 0, 0) \
  X(pages_purged, 0, 0) X(errors_reported, 0, 0)

/* after the per-class arrays (stats versions 5 and 6) */
#define SM_STATS_FIELDS4(X) X(purge_delay, 1, 0) X(heaps_purged, 0, 0)

/* Per-class arrays after classes[] (stats versions 3 and 4), with the key
 * each class object of the JSON report gives them. */
#define SM_STATS_CLASS_ARRAYS(X) X(class_blocks_peak, "blocks_peak") X(class_page_bytes, "page_bytes")

static const char *const sm_step_names[SMALLOC_STEP_COUNT] = {
  "local_swap", "thread_collect", "extend", "next_page", "retired_page", "fresh_page", "new_segment",
};

/* ---- accumulation -------------------------------------------------------- */

static void sm_tstats_add(sm_tstats_t *dst, const sm_tstats_t *src) {
  const uint64_t *s = (const uint64_t *)src;
  uint64_t *d = (uint64_t *)dst;
  for (size_t i = 0; i < sizeof *src / sizeof(uint64_t); i++) d[i] += sm_cnt_read(s[i]);
}

void sm_stats_orphan_add(size_t offset, uint64_t n) {
  __atomic_fetch_add((uint64_t *)((uint8_t *)&sm_orphan + offset), n, __ATOMIC_RELAXED);
}

/* Fold the pending counts of every page of the calling thread's heap. */
void sm_stats_fold_heap(sm_heap_t *heap) {
  if (!heap->initialized) return;
  for (size_t qi = 1; qi < SM_BIN_COUNT; qi++)
    for (sm_page_t *page = heap->queues[qi].first; page; page = page->next)
      sm_page_fold_stats(heap, page);
  sm_lock(&heap->lock);   /* the full list changes under it (sm_heap_claim_full) */
  for (sm_page_t *page = heap->queues[SM_BIN_FULL].first; page; page = page->next)
    sm_page_fold_stats(heap, page);
  sm_unlock(&heap->lock);
}

static void sm_max_raise(_Atomic uint64_t *peak_at, uint64_t v) {
  uint64_t peak = atomic_load_explicit(peak_at, memory_order_relaxed);
  while (v > peak && !atomic_compare_exchange_weak(peak_at, &peak, v)) {
  }
}

/* The peak raised to small published bytes of size-class blocks and the
 * live bytes above the classes. */
static void sm_peak_raise(int64_t small) {
  sm_max_raise(&sm_gstats.peak_in_use, (small > 0 ? (uint64_t)small : 0) + sm_huge_live());
}

/* The bytes of size-class blocks published, changed by bytes: raising
 * them raises the peak, large and huge blocks included. */
static void sm_stats_bytes_publish(int64_t bytes) {
  int64_t small = atomic_fetch_add_explicit(&sm_gstats.small_live, bytes, memory_order_relaxed) + bytes;
  if (bytes > 0) sm_peak_raise(small);
}

/* blocks more blocks of class bin in use, published (internal.h:
 * SM_PUB_BYTES): a rise raises the class's peak. */
static void sm_stats_class_live_add(size_t bin, int64_t blocks) {
  int64_t n = atomic_fetch_add_explicit(&sm_gstats.class_live[bin], blocks, memory_order_relaxed) + blocks;
  if (blocks > 0 && n > 0) sm_max_raise(&sm_gstats.class_peak[bin], (uint64_t)n);
}

/* The same with its bytes, from a thread without a heap. */
void sm_stats_class_publish(size_t bin, int64_t blocks) {
  sm_stats_class_live_add(bin, blocks);
  sm_stats_bytes_publish(blocks * (int64_t)sm_bin_size(bin));
}

/* The heap's per-class tally goes to the process-wide counts: an add per
 * class that changed. */
static void sm_stats_publish_classes(sm_heap_t *heap) {
  for (size_t bin = 0; bin < SM_BIN_COUNT; bin += 4) {
    /* four classes a test: a thread uses few of them */
    uint64_t w[2];
    memcpy(w, &heap->class_unpub[bin], sizeof w);
    if ((w[0] | w[1]) == 0) continue;
    for (size_t b = bin; b < bin + 4; b++) {
      int32_t d = heap->class_unpub[b];
      if (d == 0) continue;
      heap->class_unpub[b] = 0;
      sm_stats_class_live_add(b, d);
    }
  }
  heap->pub_due = SM_PUB_CHURN;
}

/* The heap's net change of bytes goes to small_live, one add (internal.h:
 * SM_PUB_BYTES); its per-class tally too once SM_PUB_CHURN's worth of
 * changes came, each such call standing for SM_PUB_BYTES of them. */
void sm_stats_publish(sm_heap_t *heap) {
  heap->pub_due -= SM_PUB_BYTES;
  if (heap->pub_due < 0) sm_stats_publish_classes(heap);
  int64_t d = heap->pub_room - SM_PUB_BYTES;
  heap->pub_room = SM_PUB_BYTES;
  if (d) sm_stats_bytes_publish(d);
}

/* A large or huge block was just allocated (its bytes counted). */
void sm_stats_peak_large(void) {
  sm_peak_raise(atomic_load_explicit(&sm_gstats.small_live, memory_order_relaxed));
}

/* Everything the heap has not published yet, published. */
void sm_stats_publish_all(sm_heap_t *heap) {
  sm_stats_publish_classes(heap);
  sm_stats_publish(heap);
}

/* Called with the heaps lock held, so a reader counts the thread once. */
void sm_stats_thread_exit(sm_heap_t *heap) {
  sm_stats_publish_all(heap);
  sm_tstats_add(&sm_exited, &heap->stats);
}

/* The raw figures into o; under sm_stats_read_mutex (sm_read). */
static void sm_stats_raw(smalloc_stats_t *o) {
  sm_tstats_t *tp = &sm_read.t, *orphan = &sm_read.orphan;
  memset(tp, 0, sizeof *tp);
  memset(o, 0, sizeof *o);
  sm_heap_t *self = sm_heap();
  sm_stats_fold_heap(self);
  sm_heaps_lock();
  sm_heaps_fold_parked();
  sm_tstats_add(tp, &sm_exited);
  for (sm_heap_t *h = sm_heaps_first(); h; h = h->all_next) sm_tstats_add(tp, &h->stats);
  sm_heaps_unlock();
  for (size_t i = 0; i < sizeof *orphan / sizeof(uint64_t); i++)
    ((uint64_t *)orphan)[i] = __atomic_load_n(&((uint64_t *)&sm_orphan)[i], __ATOMIC_RELAXED);
  sm_tstats_add(tp, orphan);
  if (self->initialized) sm_free_pending(self, tp->class_frees);   /* its unsent batches */

  uint64_t allocs = 0, frees = 0, bytes = 0, blocks = 0, pages = 0;
  o->nclasses = SMALLOC_STATS_CLASSES;
  for (size_t bin = 1; bin < SM_BIN_COUNT; bin++) {
    smalloc_class_stats_t *c = &o->classes[bin - 1];
    c->block_size = sm_bin_size(bin);
    c->allocs = tp->class_allocs[bin];
    c->frees = tp->class_frees[bin];
    /* a live thread's counts are read as they are: its frees of another
     * thread's blocks may be seen before its allocations are folded */
    c->blocks_in_use = c->allocs > c->frees ? c->allocs - c->frees : 0;
    sm_max_raise(&sm_gstats.class_peak[bin], c->blocks_in_use);
    o->class_blocks_peak[bin - 1] = atomic_load_explicit(&sm_gstats.class_peak[bin], memory_order_relaxed);
    int64_t pg = atomic_load_explicit(&sm_gstats.class_pages[bin], memory_order_relaxed);
    c->pages_in_use = pg > 0 ? (uint64_t)pg : 0;
    int64_t pb = atomic_load_explicit(&sm_gstats.class_page_bytes[bin], memory_order_relaxed);
    o->class_page_bytes[bin - 1] = pb > 0 ? (uint64_t)pb : 0;
    for (int s = 0; s < SMALLOC_STEP_COUNT; s++) {
      c->slow_steps[s] = tp->class_steps[bin][s];
      o->slow_steps[s] += c->slow_steps[s];
      o->slow_path += c->slow_steps[s];
    }
    allocs += c->allocs;
    frees += c->frees;
    blocks += c->blocks_in_use;
    bytes += c->blocks_in_use * c->block_size;
    pages += c->pages_in_use;
  }
  uint64_t huge_b = sm_huge_live();
  o->calls_malloc = allocs + tp->large_allocs + tp->huge_allocs - tp->alloc_other + tp->calls[SM_CALL_MALLOC_FAILED];
  o->calls_calloc = tp->calls[SM_CALL_CALLOC];
  o->calls_realloc = tp->calls[SM_CALL_REALLOC];
  o->calls_reallocarray = tp->calls[SM_CALL_REALLOCARRAY];
  o->calls_free = frees + tp->large_frees + tp->huge_frees - tp->free_other;
  o->calls_free_null = tp->calls[SM_CALL_FREE_NULL];
  o->calls_posix_memalign = tp->calls[SM_CALL_POSIX_MEMALIGN];
  o->calls_aligned_alloc = tp->calls[SM_CALL_ALIGNED_ALLOC];
  o->calls_memalign = tp->calls[SM_CALL_MEMALIGN];
  o->calls_valloc = tp->calls[SM_CALL_VALLOC];
  o->calls_pvalloc = tp->calls[SM_CALL_PVALLOC];
  o->calls_usable_size = tp->calls[SM_CALL_USABLE_SIZE];
  o->calls_free_sized = tp->calls[SM_CALL_FREE_SIZED];
  o->calls_free_aligned_sized = tp->calls[SM_CALL_FREE_ALIGNED_SIZED];
  o->calls_failed = tp->calls[SM_CALL_FAILED];
  o->bytes_requested = tp->requested - tp->prof_left;   /* see sm_tstats_t */
#define SM_POS(a, b) ((a) > (b) ? (a) - (b) : 0)
  o->bytes_in_use = bytes + huge_b;
  o->blocks_in_use = blocks + SM_POS(tp->large_allocs, tp->large_frees) + SM_POS(tp->huge_allocs, tp->huge_frees);
#undef SM_POS
  sm_max_raise(&sm_gstats.peak_in_use, o->bytes_in_use);   /* the exact figure */
  o->bytes_in_use_peak = atomic_load(&sm_gstats.peak_in_use);
  o->large_allocs = tp->large_allocs;
  o->large_frees = tp->large_frees;
  o->huge_allocs = tp->huge_allocs;
  o->huge_frees = tp->huge_frees;
  o->huge_remaps = tp->huge_remaps;
  o->pages_in_use = pages;
  o->pages_retired = tp->pages_retired;
  o->pages_reused = tp->pages_reused;
  o->pages_released = tp->pages_released;
  o->pages_full = tp->pages_full;
  o->pages_unfull = tp->pages_unfull;
#define G(f) atomic_load_explicit(&sm_gstats.f, memory_order_relaxed)
  o->segments_in_use = G(segments_in_use);
  o->segments_mapped = G(segments_mapped);
  o->segments_cached = G(segments_cached);
  o->segments_cache_hits = G(segments_cache_hits);
  o->segments_purged = G(segments_purged);
  o->segments_unmapped = G(segments_unmapped);
  o->os_mmap = G(os_mmap);
  o->os_munmap = G(os_munmap);
  o->os_madvise = G(os_madvise);
  o->os_mremap = G(os_mremap);
  o->bytes_mapped = G(bytes_mapped);
  o->bytes_mapped_peak = G(bytes_mapped_peak);
  o->bytes_committed = G(bytes_committed);
  o->bytes_purged = G(bytes_purged);
#undef G
  o->threads_started = tp->threads_started;
  o->threads_exited = tp->threads_exited;
  o->pages_abandoned = tp->pages_abandoned;
  o->pages_reclaimed = tp->pages_reclaimed;
  o->segments_reclaimed = tp->segments_reclaimed;
  o->pages_claimed = tp->pages_claimed;
  o->oom_collects = tp->oom_collects;
  o->huge_cached = atomic_load_explicit(&sm_gstats.huge_cached, memory_order_relaxed);
  o->huge_cache_hits = atomic_load_explicit(&sm_gstats.huge_cache_hits, memory_order_relaxed);
  o->background_threads = atomic_load_explicit(&sm_gstats.background_threads, memory_order_relaxed);
  o->pages_purged = atomic_load_explicit(&sm_gstats.pages_purged, memory_order_relaxed);
  o->errors_reported = atomic_load_explicit(&sm_gstats.errors_reported, memory_order_relaxed);
  o->purge_delay = sm_purge_delay(sm_clock_ms());
  o->heaps_purged = atomic_load_explicit(&sm_gstats.heaps_purged, memory_order_relaxed);
}

/* Subtract the reset base from every event count. */
static void sm_stats_rebase(smalloc_stats_t *o) {
#define SM_REBASE(name, gauge, bytes) if (!(gauge)) o->name -= sm_reset_base.name;
  SM_STATS_FIELDS(SM_REBASE)
  SM_STATS_FIELDS2(SM_REBASE)
  SM_STATS_FIELDS3(SM_REBASE)
  SM_STATS_FIELDS4(SM_REBASE)
#undef SM_REBASE
  for (int s = 0; s < SMALLOC_STEP_COUNT; s++) o->slow_steps[s] -= sm_reset_base.slow_steps[s];
  for (size_t i = 0; i < SMALLOC_STATS_CLASSES; i++) {
    smalloc_class_stats_t *c = &o->classes[i];
    const smalloc_class_stats_t *b = &sm_reset_base.classes[i];
    c->allocs -= b->allocs;
    c->frees -= b->frees;
    for (int s = 0; s < SMALLOC_STEP_COUNT; s++) c->slow_steps[s] -= b->slow_steps[s];
  }
}

static void sm_stats_current(smalloc_stats_t *o) {
  sm_stats_raw(o);
  pthread_mutex_lock(&sm_stats_mutex);
  sm_stats_rebase(o);
  pthread_mutex_unlock(&sm_stats_mutex);
  o->size = sizeof *o;
  o->version = SMALLOC_STATS_VERSION;
}

/* fn(the current figures, arg), under sm_stats_read_mutex: for readers
 * that need a few of them (override.c), without a copy of them all. */
void sm_stats_with(void (*fn)(const smalloc_stats_t *s, void *arg), void *arg) {
  sm_stats_read_lock();
  sm_stats_current(&sm_read.s);
  fn(&sm_read.s, arg);
  sm_stats_read_unlock();
}

/* The figures into *out, as many bytes of them as out->size says. */
static void sm_stats_copy_to(const smalloc_stats_t *s, void *arg) {
  smalloc_stats_t *out = arg;
  size_t size = out->size < sizeof *out ? out->size : sizeof *out;
  memcpy(out, s, size);
  out->size = size;
}

SM_EXPORT int smalloc_stats_get(smalloc_stats_t *out) {
  if (out == NULL || out->size < offsetof(smalloc_stats_t, nclasses)) return EINVAL;
  /* read apart from *out: reading the counters must not change them */
  sm_stats_with(sm_stats_copy_to, out);
  return 0;
}

SM_EXPORT void smalloc_stats_reset(void) {
  sm_stats_read_lock();
  const smalloc_stats_t *s = &sm_read.s;
  sm_stats_raw(&sm_read.s);
  pthread_mutex_lock(&sm_stats_mutex);
  sm_reset_base = *s;
  pthread_mutex_unlock(&sm_stats_mutex);
  atomic_store(&sm_gstats.peak_in_use, s->bytes_in_use);
  for (size_t bin = 1; bin < SM_BIN_COUNT; bin++)
    atomic_store(&sm_gstats.class_peak[bin], s->classes[bin - 1].blocks_in_use);
  sm_stats_read_unlock();
}

/* ---- printing --------------------------------------------------------------- */

static void sm_fmt_bytes(char *buf, size_t len, uint64_t v) {
  if (v >= ((uint64_t)10 << 30)) snprintf(buf, len, "%.1f GiB", (double)v / (1 << 30));
  else if (v >= ((uint64_t)10 << 20)) snprintf(buf, len, "%.1f MiB", (double)v / (1 << 20));
  else if (v >= ((uint64_t)10 << 10)) snprintf(buf, len, "%.1f KiB", (double)v / (1 << 10));
  else snprintf(buf, len, "%llu B", (unsigned long long)v);
}

static void sm_print_row(FILE *out, const char *name, uint64_t v, int bytes) {
  char buf[32];
  if (bytes) sm_fmt_bytes(buf, sizeof buf, v);
  else snprintf(buf, sizeof buf, "%llu", (unsigned long long)v);
  fprintf(out, "  %-26s %16s\n", name, buf);
}

static void sm_stats_print_table(FILE *out);
static void sm_stats_print_json(FILE *out);
static const char *sm_program(char *buf, size_t cap);
static uint64_t sm_resident(void);

/* The printers write with cancellation off: a thread cancelled at one of
 * their writes still prints the whole report, and leaves no FILE lock
 * held; the caller's state comes back afterwards. */
static void sm_stats_print_uncancelled(FILE *out, void (*print)(FILE *)) {
  if (out == NULL) return;
  int cancel;
  pthread_setcancelstate(PTHREAD_CANCEL_DISABLE, &cancel);
  print(out);
  pthread_setcancelstate(cancel, NULL);
}

SM_EXPORT void smalloc_stats_print(FILE *out) {
  sm_stats_print_uncancelled(out, sm_stats_print_table);
}

SM_EXPORT void smalloc_stats_print_json(FILE *out) {
  sm_stats_print_uncancelled(out, sm_stats_print_json);
}

/* The program's name: the last part of its argv[0] (glibc keeps it), or
 * else the kernel's (up to 15 characters); without allocating. */
static const char *sm_program(char *buf, size_t cap) {
  if (program_invocation_short_name && *program_invocation_short_name) {
    snprintf(buf, cap, "%s", program_invocation_short_name);
    return buf;
  }
  if (sm_os_read_file("/proc/self/comm", buf, cap) == 0) snprintf(buf, cap, "?");
  buf[strcspn(buf, "\n")] = '\0';
  return buf;
}

/* Resident bytes of the process (/proc/self/statm), 0 when unknown. */
static uint64_t sm_resident(void) {
  char buf[128];
  if (sm_os_read_file("/proc/self/statm", buf, sizeof buf) == 0) return 0;
  unsigned long long size, res;
  if (sscanf(buf, "%llu %llu", &size, &res) != 2) return 0;
  return (uint64_t)res * (uint64_t)sysconf(_SC_PAGESIZE);
}

/* The table of a filled struct, under a title line that names whose
 * figures they are ("PROG (pid N)"); resident: the resident bytes of
 * resident_of ("the process"), 0 when unknown.  The smalloc command prints a process
 * tree's sum with it. */
void sm_stats_format(const smalloc_stats_t *s, const char *who, uint64_t resident,
                     const char *resident_of, FILE *out) {
  char inuse[32], committed[32], res[32];
  fprintf(out, "smalloc %d.%d.%d statistics: %s\n", SMALLOC_VERSION_MAJOR, SMALLOC_VERSION_MINOR,
          SMALLOC_VERSION_PATCH, who);
  /* the headline: what the program holds, what it costs, how often the
   * slow path ran */
  char peak[32];
  sm_fmt_bytes(inuse, sizeof inuse, s->bytes_in_use);
  sm_fmt_bytes(peak, sizeof peak, s->bytes_in_use_peak);
  sm_fmt_bytes(committed, sizeof committed, s->bytes_committed);
  if (resident) sm_fmt_bytes(res, sizeof res, resident);
  else snprintf(res, sizeof res, "?");
  /* overhead: the share of the committed bytes that holds no live block */
  double overhead = s->bytes_committed > s->bytes_in_use
                        ? 100.0 * (double)(s->bytes_committed - s->bytes_in_use) / (double)s->bytes_committed
                        : 0.0;
  fprintf(out, "  summary: %s in %llu live blocks (peak %s); %s committed (%.1f %% overhead), "
          "%s resident (%s)\n",
          inuse, (unsigned long long)s->blocks_in_use, peak, committed, overhead, res, resident_of);
  uint64_t allocs = s->calls_malloc + s->calls_calloc + s->calls_realloc;
  uint64_t slow = s->slow_path < allocs ? s->slow_path : allocs;
  fprintf(out, "  summary: %llu malloc, calloc and realloc calls, %.2f %% on the fast path; "
          "%llu slow-path entries (%.1f per 1000 calls), %llu system calls\n",
          (unsigned long long)allocs, allocs ? 100.0 * (double)(allocs - slow) / (double)allocs : 100.0,
          (unsigned long long)s->slow_path,
          allocs ? 1000.0 * (double)s->slow_path / (double)allocs : 0.0,
          (unsigned long long)(s->os_mmap + s->os_munmap + s->os_madvise + s->os_mremap));
#define SM_ROW(name, gauge, bytes) sm_print_row(out, #name, s->name, bytes);
  SM_STATS_FIELDS(SM_ROW)
  for (int i = 0; i < SMALLOC_STEP_COUNT; i++) {
    char name[40];
    snprintf(name, sizeof name, "  step %s", sm_step_names[i]);
    sm_print_row(out, name, s->slow_steps[i], 0);
  }
  SM_STATS_FIELDS2(SM_ROW)
  SM_STATS_FIELDS3(SM_ROW)
  SM_STATS_FIELDS4(SM_ROW)
#undef SM_ROW
  fprintf(out, "  %-9s %11s %11s %11s %11s %9s %6s %9s %9s %9s %9s\n", "class", "allocs", "frees",
          "in use", "peak", "pages", "used", "swap", "collect", "extend", "other");
  for (size_t i = 0; i < s->nclasses && i < SMALLOC_STATS_CLASSES; i++) {
    const smalloc_class_stats_t *c = &s->classes[i];
    if (c->allocs == 0 && c->frees == 0 && c->blocks_in_use == 0 && c->pages_in_use == 0) continue;
    uint64_t other = c->slow_steps[SMALLOC_STEP_NEXT_PAGE] + c->slow_steps[SMALLOC_STEP_RETIRED_PAGE] +
                     c->slow_steps[SMALLOC_STEP_FRESH_PAGE] + c->slow_steps[SMALLOC_STEP_NEW_SEGMENT];
    /* used: the share of the class's page bytes that live blocks fill */
    char used[16];
    if (s->class_page_bytes[i])
      snprintf(used, sizeof used, "%.0f%%",
               100.0 * (double)(c->blocks_in_use * c->block_size) / (double)s->class_page_bytes[i]);
    else
      snprintf(used, sizeof used, "-");
    fprintf(out, "  %9llu %11llu %11llu %11llu %11llu %9llu %6s %9llu %9llu %9llu %9llu\n",
            (unsigned long long)c->block_size, (unsigned long long)c->allocs,
            (unsigned long long)c->frees, (unsigned long long)c->blocks_in_use,
            (unsigned long long)s->class_blocks_peak[i], (unsigned long long)c->pages_in_use, used,
            (unsigned long long)c->slow_steps[SMALLOC_STEP_LOCAL_SWAP],
            (unsigned long long)c->slow_steps[SMALLOC_STEP_THREAD_COLLECT],
            (unsigned long long)c->slow_steps[SMALLOC_STEP_EXTEND], (unsigned long long)other);
  }
  fflush(out);
}

static void sm_stats_table_of(const smalloc_stats_t *s, void *arg) {
  char prog[32], who[96];
  snprintf(who, sizeof who, "%s (pid %ld, running %.1f s)", sm_program(prog, sizeof prog),
           (long)getpid(), (double)(sm_clock_ms() - sm_start_ms) / 1000.0);
  sm_stats_format(s, who, sm_resident(), "the process", arg);
}

static void sm_stats_print_table(FILE *out) {
  sm_stats_with(sm_stats_table_of, out);
  sm_prof_print_top(out);
}

/* Add src's figures to dst's (the smalloc command's sum over a process
 * tree: every figure as each process left it). */
void sm_stats_sum(smalloc_stats_t *dst, const smalloc_stats_t *src) {
#define SM_ADD(name, gauge, bytes) dst->name += src->name;
  SM_STATS_FIELDS(SM_ADD)
  SM_STATS_FIELDS2(SM_ADD)
  SM_STATS_FIELDS3(SM_ADD)
#undef SM_ADD
  /* events are summed, but a delay is not: the longest of them */
#define SM_ADD_OR_MAX(name, gauge, bytes) \
  if (!(gauge)) dst->name += src->name; else if (src->name > dst->name) dst->name = src->name;
  SM_STATS_FIELDS4(SM_ADD_OR_MAX)
#undef SM_ADD_OR_MAX
  for (int i = 0; i < SMALLOC_STEP_COUNT; i++) dst->slow_steps[i] += src->slow_steps[i];
  if (src->nclasses > dst->nclasses) dst->nclasses = src->nclasses;
  for (size_t i = 0; i < src->nclasses && i < SMALLOC_STATS_CLASSES; i++) {
    smalloc_class_stats_t *d = &dst->classes[i];
    const smalloc_class_stats_t *c = &src->classes[i];
    d->block_size = c->block_size;
    d->blocks_in_use += c->blocks_in_use;
    d->allocs += c->allocs;
    d->frees += c->frees;
    d->pages_in_use += c->pages_in_use;
#define SM_ADD_CLASS(name, key) dst->name[i] += src->name[i];
    SM_STATS_CLASS_ARRAYS(SM_ADD_CLASS)
#undef SM_ADD_CLASS
    for (int k = 0; k < SMALLOC_STEP_COUNT; k++) d->slow_steps[k] += c->slow_steps[k];
  }
}

/* ---- reading a JSON report back (the smalloc command) ----------------------
 * Only the shape sm_stats_print_json writes: an object of numbers, strings,
 * the options object, slow_steps and the classes array; anything else is
 * skipped.  Returns false when the text is not such an object. */
static const char *sm_j_ws(const char *p) {
  while (*p == ' ' || *p == '\n' || *p == '\t' || *p == '\r') p++;
  return p;
}

/* A string at p into buf (escapes kept as the character after the
 * backslash; \uXXXX as '?'); NULL when p holds none. */
static const char *sm_j_string(const char *p, char *buf, size_t cap) {
  if (*p != '"') return NULL;
  size_t n = 0;
  for (p++; *p && *p != '"'; p++) {
    char c = *p;
    if (c == '\\') {
      if (!*++p) return NULL;
      c = *p;
      if (c == 'u') { c = '?'; for (int k = 0; k < 4 && p[1]; k++) p++; }
    }
    if (n + 1 < cap) buf[n++] = c;
  }
  if (cap) buf[n] = '\0';
  return *p == '"' ? p + 1 : NULL;
}

static const char *sm_j_number(const char *p, uint64_t *v) {
  if (*p < '0' || *p > '9') return NULL;
  uint64_t x = 0;
  for (; *p >= '0' && *p <= '9'; p++) x = x * 10 + (uint64_t)(*p - '0');
  *v = x;
  return p;
}

/* Skip any value (nested objects and arrays included). */
static const char *sm_j_skip(const char *p) {
  p = sm_j_ws(p);
  if (*p == '"') return sm_j_string(p, NULL, 0);
  if (*p == '{' || *p == '[') {
    char close = *p == '{' ? '}' : ']';
    p = sm_j_ws(p + 1);
    if (*p == close) return p + 1;
    for (;;) {
      if (close == '}') {
        p = sm_j_string(sm_j_ws(p), NULL, 0);
        if (!p || *(p = sm_j_ws(p)) != ':') return NULL;
        p++;
      }
      if (!(p = sm_j_skip(p))) return NULL;
      p = sm_j_ws(p);
      if (*p == ',') { p++; continue; }
      return *p == close ? p + 1 : NULL;
    }
  }
  while (*p && *p != ',' && *p != '}' && *p != ']') p++;   /* number, true, false, null */
  return p;
}

/* The members of an object at p: for each, visit(key, value start) returns
 * where the value ends (NULL: skip it). */
static const char *sm_j_object(const char *p, void *ctx, const char *(*visit)(void *, const char *, const char *)) {
  p = sm_j_ws(p);
  if (*p != '{') return NULL;
  p = sm_j_ws(p + 1);
  if (*p == '}') return p + 1;
  for (;;) {
    char key[48];
    p = sm_j_string(sm_j_ws(p), key, sizeof key);
    if (!p || *(p = sm_j_ws(p)) != ':') return NULL;
    p = sm_j_ws(p + 1);
    const char *end = visit(ctx, key, p);
    p = end ? end : sm_j_skip(p);
    if (!p) return NULL;
    p = sm_j_ws(p);
    if (*p == ',') { p++; continue; }
    return *p == '}' ? p + 1 : NULL;
  }
}

static const char *sm_j_steps(void *ctx, const char *key, const char *p) {
  uint64_t *steps = ctx;
  for (int i = 0; i < SMALLOC_STEP_COUNT; i++)
    if (strcmp(key, sm_step_names[i]) == 0) return sm_j_number(p, &steps[i]);
  return NULL;
}

typedef struct sm_j_class_s {
  smalloc_stats_t *s;   /* NULL: a class past SMALLOC_STATS_CLASSES, skipped */
  size_t i;
} sm_j_class_t;

static const char *sm_j_class(void *ctx, const char *key, const char *p) {
  sm_j_class_t *jc = ctx;
  smalloc_class_stats_t junk;
  uint64_t junk_n;
  smalloc_class_stats_t *c = jc->s ? &jc->s->classes[jc->i] : &junk;
  if (strcmp(key, "slow_steps") == 0) return sm_j_object(p, c->slow_steps, sm_j_steps);
#define SM_J_CLASS(name, k) \
  if (strcmp(key, k) == 0) return sm_j_number(p, jc->s ? &jc->s->name[jc->i] : &junk_n);
  SM_STATS_CLASS_ARRAYS(SM_J_CLASS)
#undef SM_J_CLASS
  uint64_t *f = strcmp(key, "block_size") == 0 ? &c->block_size
              : strcmp(key, "blocks_in_use") == 0 ? &c->blocks_in_use
              : strcmp(key, "allocs") == 0 ? &c->allocs
              : strcmp(key, "frees") == 0 ? &c->frees
              : strcmp(key, "pages_in_use") == 0 ? &c->pages_in_use : NULL;
  return f ? sm_j_number(p, f) : NULL;
}

typedef struct sm_j_report_s {
  smalloc_stats_t *s;
  char *program;
  size_t cap;
  uint64_t resident;
} sm_j_report_t;

static const char *sm_j_report(void *ctx, const char *key, const char *p) {
  sm_j_report_t *r = ctx;
  smalloc_stats_t *s = r->s;
  uint64_t v;
#define SM_J_FIELD(name, gauge, bytes) \
  if (strcmp(key, #name) == 0) return sm_j_number(p, &s->name);
  SM_STATS_FIELDS(SM_J_FIELD)
  SM_STATS_FIELDS2(SM_J_FIELD)
  SM_STATS_FIELDS3(SM_J_FIELD)
  SM_STATS_FIELDS4(SM_J_FIELD)
#undef SM_J_FIELD
  if (strcmp(key, "resident") == 0) return sm_j_number(p, &r->resident);
  if (strcmp(key, "version") == 0 && (p = sm_j_number(p, &v))) { s->version = (uint32_t)v; return p; }
  if (strcmp(key, "program") == 0) return sm_j_string(p, r->program, r->cap);
  if (strcmp(key, "slow_steps") == 0) return sm_j_object(p, s->slow_steps, sm_j_steps);
  if (strcmp(key, "classes") == 0) {
    if (*p != '[') return NULL;
    p = sm_j_ws(p + 1);
    if (*p == ']') return p + 1;
    for (size_t i = 0;; i++) {
      sm_j_class_t jc = {i < SMALLOC_STATS_CLASSES ? s : NULL, i};
      if (!(p = sm_j_object(p, &jc, sm_j_class))) return NULL;
      if (i < SMALLOC_STATS_CLASSES) s->nclasses = (uint32_t)(i + 1);
      p = sm_j_ws(p);
      if (*p == ',') { p = sm_j_ws(p + 1); continue; }
      return *p == ']' ? p + 1 : NULL;
    }
  }
  return NULL;
}

bool sm_stats_parse_json(const char *text, smalloc_stats_t *s, char *program, size_t cap,
                         uint64_t *resident) {
  memset(s, 0, sizeof *s);
  s->size = sizeof *s;
  if (cap) program[0] = '\0';
  sm_j_report_t r = {s, program, cap, 0};
  const char *end = sm_j_object(text, &r, sm_j_report);
  *resident = r.resident;
  return end != NULL;
}

static void sm_json_steps(FILE *out, const uint64_t *steps) {
  fputc('{', out);
  for (int i = 0; i < SMALLOC_STEP_COUNT; i++)
    fprintf(out, "%s\"%s\": %llu", i ? ", " : "", sm_step_names[i], (unsigned long long)steps[i]);
  fputc('}', out);
}

static void sm_stats_json_of(const smalloc_stats_t *s, void *arg) {
  FILE *out = arg;
  char prog[32];
  fprintf(out, "{\"version\": %u, \"size\": %zu, \"nclasses\": %u", s->version, s->size, s->nclasses);
  /* who, and with what: the process, the library, the options in effect */
  fprintf(out, ", \"pid\": %ld, \"program\": \"", (long)getpid());
  for (const char *p = sm_program(prog, sizeof prog); *p; p++) {
    if (*p == '"' || *p == '\\') fprintf(out, "\\%c", *p);
    else if ((unsigned char)*p < 0x20) fprintf(out, "\\u%04x", (unsigned)*p);
    else fputc(*p, out);
  }
  fprintf(out, "\", \"library\": \"%d.%d.%d\", \"options\": {", SMALLOC_VERSION_MAJOR,
          SMALLOC_VERSION_MINOR, SMALLOC_VERSION_PATCH);
  sm_options_print_json(out);
  fprintf(out, "}, \"resident\": %llu, \"running_ms\": %llu", (unsigned long long)sm_resident(),
          (unsigned long long)(sm_clock_ms() - sm_start_ms));
#define SM_JSON(name, gauge, bytes) fprintf(out, ", \"%s\": %llu", #name, (unsigned long long)s->name);
  SM_STATS_FIELDS(SM_JSON)
  SM_STATS_FIELDS2(SM_JSON)
  SM_STATS_FIELDS3(SM_JSON)
  SM_STATS_FIELDS4(SM_JSON)
#undef SM_JSON
  fputs(", \"slow_steps\": ", out);
  sm_json_steps(out, s->slow_steps);
  fputs(", \"classes\": [", out);
  for (size_t i = 0; i < s->nclasses; i++) {
    const smalloc_class_stats_t *c = &s->classes[i];
    fprintf(out, "%s{\"block_size\": %llu, \"blocks_in_use\": %llu, \"allocs\": %llu, \"frees\": %llu, "
            "\"pages_in_use\": %llu", i ? ", " : "",
            (unsigned long long)c->block_size, (unsigned long long)c->blocks_in_use,
            (unsigned long long)c->allocs, (unsigned long long)c->frees, (unsigned long long)c->pages_in_use);
#define SM_JSON_CLASS(name, key) fprintf(out, ", \"%s\": %llu", key, (unsigned long long)s->name[i]);
    SM_STATS_CLASS_ARRAYS(SM_JSON_CLASS)
#undef SM_JSON_CLASS
    fputs(", \"slow_steps\": ", out);
    sm_json_steps(out, c->slow_steps);
    fputc('}', out);
  }
  fputs("]}\n", out);
}

static void sm_stats_print_json(FILE *out) {
  sm_stats_with(sm_stats_json_of, out);
  fflush(out);
}

/* Duplicated at start-up when SMALLOC_STATS is set: programs such as
 * sort(1) close stderr before they exit, and the report must survive it. */
static int sm_stats_fd = -1;

/* SMALLOC_STATS_FILE: where the report at exit goes instead of stderr,
 * "%p" standing for the process id (one file per process of a tree run
 * under LD_PRELOAD). */
static char sm_stats_file[SM_STATS_FILE_MAX];

void sm_stats_set_file(const char *path) {
  snprintf(sm_stats_file, sizeof sm_stats_file, "%s", path);
}

void sm_stats_open_fd(void) {
  if ((sm_opt(STATS) != 0 || sm_opt(STATS_INTERVAL) != 0) && sm_stats_fd < 0)
    sm_stats_fd = fcntl(STDERR_FILENO, F_DUPFD_CLOEXEC, 3);
}

/* Whether this process wrote a report to its file already: the first
 * report truncates the file, the later ones (periodic, then the one at
 * exit) are appended.  A child after fork appends to a shared file and
 * starts its own when the path names its pid. */
static _Atomic bool sm_stats_file_started;   /* periodic reports and the one at exit may race */

/* The report file of this process: sm_stats_file with %p expanded (%% is
 * a percent sign); -1 when there is none or it cannot be opened (said). */
static int sm_stats_open_file(void) {
  if (sm_stats_file[0] == '\0') return -1;
  char path[512];
  sm_path_expand(sm_stats_file, path, sizeof path);
  bool started = atomic_load_explicit(&sm_stats_file_started, memory_order_relaxed);
  int fd = open(path, O_WRONLY | O_CREAT | O_CLOEXEC | (started ? O_APPEND : O_TRUNC), 0644);
  if (fd >= 0) atomic_store_explicit(&sm_stats_file_started, true, memory_order_relaxed);
  if (fd < 0) {
    /* said where the report goes: stderr as it was at start-up (the
     * program may have closed its own by now) */
    char msg[640];
    int n = snprintf(msg, sizeof msg, "smalloc: SMALLOC_STATS_FILE: cannot open %s: %s; the report "
                     "goes to stderr\n", path, strerror(errno));
    if (n > 0 && write(sm_stats_fd >= 0 ? sm_stats_fd : STDERR_FILENO, msg,
                       (size_t)n < sizeof msg ? (size_t)n : sizeof msg - 1) < 0) {
    }
  }
  return fd;
}

/* A report in SMALLOC_STATS's format: JSON, else the table. */
static void sm_stats_report(FILE *out) {
  if (sm_opt(STATS) == 2) smalloc_stats_print_json(out);
  else smalloc_stats_print(out);
}

void sm_stats_at_exit(void) {
  if (sm_opt(STATS) == 0) return;
  int fd = sm_stats_open_file();
  if (fd >= 0) {
    if (sm_stats_fd >= 0) close(sm_stats_fd);
    sm_stats_fd = fd;
  }
  FILE *out = sm_stats_fd >= 0 ? fdopen(sm_stats_fd, "w") : NULL;
  if (out == NULL) out = stderr;
  sm_stats_report(out);
  if (out != stderr) fclose(out);
  sm_stats_fd = -1;
}

/* SMALLOC_STATS_INTERVAL: a report every interval while the program runs,
 * in SMALLOC_STATS's format (the table when that is 0), to where the one
 * at exit goes.  Every 16th slow-path entry of a thread looks at the
 * clock and asks for it; it is printed at the end of that
 * malloc or free (sm_background_poll), where printing may allocate.  A
 * program that stops calling the allocator prints nothing new. */
static _Atomic uint64_t sm_report_next_ms;

void sm_stats_tick(void) {
  long interval = sm_opt(STATS_INTERVAL);
  if (interval <= 0) return;
  uint64_t now = sm_clock_ms();
  uint64_t next = atomic_load_explicit(&sm_report_next_ms, memory_order_relaxed);
  if (now < next) return;
  if (!atomic_compare_exchange_strong(&sm_report_next_ms, &next, now + (uint64_t)interval)) return;
  if (next == 0) return;   /* the first look starts the clock */
  atomic_fetch_or_explicit(&sm_bg_wanted, SM_WANT_REPORT, memory_order_relaxed);
}

void sm_stats_periodic(void) {
  static _Atomic int printing;
  if (sm_stats_reading) return;   /* this thread is printing one */
  if (atomic_exchange(&printing, 1)) return;   /* another thread prints one */
  int fd = sm_stats_open_file();
  if (fd < 0 && sm_stats_fd >= 0) fd = fcntl(sm_stats_fd, F_DUPFD_CLOEXEC, 3);
  FILE *out = fd >= 0 ? fdopen(fd, "w") : NULL;
  if (out == NULL) {
    if (fd >= 0) close(fd);
  } else {
    sm_stats_report(out);
    fclose(out);
  }
  atomic_store(&printing, 0);
}

__attribute__((destructor)) static void sm_stats_destructor(void) {
  sm_prof_at_exit();
  sm_stats_at_exit();
}

/* fork (fork.c): the reset base is numbers only; a half-copied one skews
 * the child's figures, nothing more */
void sm_stats_fork_child(void) {
  sm_fork_mutex_was_held(&sm_stats_read_mutex);
  sm_fork_mutex_was_held(&sm_stats_mutex);
}
