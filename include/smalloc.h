/* smalloc: a free-list-sharded malloc replacement with exact churn counters.
 *
 * Linking with -lsmalloc (or preloading libsmalloc.so.0) replaces the C
 * library's malloc family.  The same functions are also available under
 * smalloc_* names, which keep working when the library is built with
 * --disable-override and the libc names are left to the system allocator.
 */
#ifndef SMALLOC_H
#define SMALLOC_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <malloc.h>

#ifdef __cplusplus
extern "C" {
#endif

#define SMALLOC_VERSION_MAJOR 0
#define SMALLOC_VERSION_MINOR 1
#define SMALLOC_VERSION_PATCH 0

#if defined(__GNUC__)
#define SMALLOC_MALLOC_ATTR __attribute__((malloc, warn_unused_result))
#else
#define SMALLOC_MALLOC_ATTR
#endif

/* ---- the malloc family under smalloc_ names ---------------------------- */
void  *smalloc_malloc(size_t size) SMALLOC_MALLOC_ATTR;
void   smalloc_free(void *ptr);
void  *smalloc_calloc(size_t nmemb, size_t size) SMALLOC_MALLOC_ATTR;
void  *smalloc_realloc(void *ptr, size_t size);
void  *smalloc_reallocarray(void *ptr, size_t nmemb, size_t size);
int    smalloc_posix_memalign(void **memptr, size_t alignment, size_t size);
void  *smalloc_aligned_alloc(size_t alignment, size_t size) SMALLOC_MALLOC_ATTR;
void  *smalloc_memalign(size_t alignment, size_t size) SMALLOC_MALLOC_ATTR;
void  *smalloc_valloc(size_t size) SMALLOC_MALLOC_ATTR;
void  *smalloc_pvalloc(size_t size) SMALLOC_MALLOC_ATTR;
size_t smalloc_malloc_usable_size(void *ptr);
void   smalloc_free_sized(void *ptr, size_t size);
void   smalloc_free_aligned_sized(void *ptr, size_t alignment, size_t size);
int    smalloc_malloc_trim(size_t pad);
struct mallinfo2 smalloc_mallinfo2(void);
void   smalloc_malloc_stats(void);
/* glibc's older introspection calls, answered from smalloc's figures */
struct mallinfo smalloc_mallinfo(void);
int    smalloc_malloc_info(int options, FILE *fp);
int    smalloc_mallopt(int param, int value);

/* ---- memory return ------------------------------------------------------ */
/* Release retired pages and cached segments.  With force, everything that
 * holds no live block goes back to the OS now; without, only what has
 * outlived its retire cycles or purge delay. */
void   smalloc_collect(bool force);

/* ---- statistics ---------------------------------------------------------- */
#define SMALLOC_STATS_VERSION 6
/* Number of size classes reported in smalloc_stats_t.classes. */
#define SMALLOC_STATS_CLASSES 96

/* Slow-path steps, cheapest first; index of smalloc_stats_t.slow_steps. */
enum smalloc_slow_step {
  SMALLOC_STEP_LOCAL_SWAP = 0,  /* local_free swapped into free */
  SMALLOC_STEP_THREAD_COLLECT,  /* thread_free collected */
  SMALLOC_STEP_EXTEND,          /* page extended into untouched capacity */
  SMALLOC_STEP_NEXT_PAGE,       /* another page of the class had blocks */
  SMALLOC_STEP_RETIRED_PAGE,    /* a retired (empty, kept) page was reused */
  SMALLOC_STEP_FRESH_PAGE,      /* a fresh page from an owned segment */
  SMALLOC_STEP_NEW_SEGMENT,     /* a segment from the cache or the OS */
  SMALLOC_STEP_COUNT
};

typedef struct smalloc_class_stats {
  uint64_t block_size;      /* bytes per block of this class */
  uint64_t blocks_in_use;   /* allocs - frees */
  uint64_t allocs;          /* blocks handed out */
  uint64_t frees;           /* blocks given back */
  uint64_t pages_in_use;    /* pages of this class in use (bytes: class_page_bytes) */
  uint64_t slow_steps[SMALLOC_STEP_COUNT]; /* slow-path entries served */
} smalloc_class_stats_t;

typedef struct smalloc_stats {
  /* Set size = sizeof(smalloc_stats_t) before calling smalloc_stats_get;
   * the library fills no more than that and sets version. */
  size_t   size;
  uint32_t version;
  uint32_t nclasses;        /* classes[] entries filled */

  /* calls per entry point (libc and smalloc_ names together) */
  uint64_t calls_malloc;
  uint64_t calls_calloc;
  uint64_t calls_realloc;
  uint64_t calls_reallocarray;
  uint64_t calls_free;      /* blocks freed, any entry point; free(NULL) not included */
  uint64_t calls_free_null;
  uint64_t calls_posix_memalign;
  uint64_t calls_aligned_alloc;
  uint64_t calls_memalign;
  uint64_t calls_valloc;
  uint64_t calls_pvalloc;
  uint64_t calls_usable_size;
  uint64_t calls_free_sized;
  uint64_t calls_free_aligned_sized;
  uint64_t calls_failed;    /* requests answered with NULL / an error */

  /* bytes and blocks */
  uint64_t bytes_requested; /* sum of sizes asked for */
  uint64_t bytes_in_use;    /* block bytes held by live blocks now */
  uint64_t bytes_in_use_peak; /* highest bytes_in_use sampled (reads, thread exits, heap growth) */
  uint64_t blocks_in_use;
  uint64_t large_allocs;    /* blocks above the largest size class, and lent ones (smalloc(7)) */
  uint64_t large_frees;
  uint64_t huge_allocs;     /* blocks in their own mapping */
  uint64_t huge_frees;
  uint64_t huge_remaps;     /* huge reallocs served by mremap or in place */

  /* slow path */
  uint64_t slow_path;       /* entries into the malloc slow path */
  uint64_t slow_steps[SMALLOC_STEP_COUNT];

  /* page life cycle */
  uint64_t pages_in_use;
  uint64_t pages_retired;   /* pages emptied and kept warm */
  uint64_t pages_reused;    /* retired pages that served again */
  uint64_t pages_released;  /* pages given back to their segment */
  uint64_t pages_full;      /* moves of a page to the full list */
  uint64_t pages_unfull;    /* moves back after a free into a full page */

  /* segments */
  uint64_t segments_in_use;
  uint64_t segments_mapped;   /* obtained from the OS */
  uint64_t segments_cached;   /* put in the segment cache */
  uint64_t segments_cache_hits;
  uint64_t segments_purged;
  uint64_t segments_unmapped;

  /* OS calls */
  uint64_t os_mmap;
  uint64_t os_munmap;
  uint64_t os_madvise;
  uint64_t os_mremap;
  uint64_t bytes_mapped;      /* mapped now */
  uint64_t bytes_mapped_peak;
  uint64_t bytes_committed;   /* mapped and not purged now */
  uint64_t bytes_purged;      /* total handed back with madvise */

  /* threads */
  uint64_t threads_started;
  uint64_t threads_exited;
  uint64_t pages_abandoned;
  uint64_t pages_reclaimed;
  uint64_t segments_reclaimed;

  smalloc_class_stats_t classes[SMALLOC_STATS_CLASSES];

  /* version 2: memory handed between threads */
  uint64_t pages_claimed;     /* retired pages of another thread's heap released
                                 (trim, smalloc_collect(true), memory pressure);
                                 also counted in pages_released */
  uint64_t oom_collects;      /* allocations the OS refused, retried after giving
                                 back everything that held no live block */
  uint64_t huge_cached;       /* freed huge blocks whose mapping was kept */
  uint64_t huge_cache_hits;   /* huge blocks served by a kept mapping */
  uint64_t background_threads; /* purge threads started (one, parked when idle) */
  uint64_t pages_purged;      /* free pages of live segments whose memory was given
                                 back (madvise), after the purge delay */
  uint64_t errors_reported;   /* heap misuse reported (double or invalid free,
                                 corrupted free list...); under
                                 SMALLOC_ON_ERROR=warn the process went on */

  /* version 3: the highest blocks_in_use of each class sampled (when
   * bytes_in_use_peak is), indexed as classes[] */
  uint64_t class_blocks_peak[SMALLOC_STATS_CLASSES];

  /* version 4: the bytes of each class's pages (pages_in_use counts
   * them; a class's pages differ in size), indexed as classes[] */
  uint64_t class_page_bytes[SMALLOC_STATS_CLASSES];

  /* version 5: the purge delay in force, in ms: SMALLOC_PURGE_DELAY,
   * doubled up to three times while memory given back is soon used
   * again */
  uint64_t purge_delay;

  /* version 6: heaps of exited threads whose struct went back to the OS
   * (but a page of it) while they waited for a new thread */
  uint64_t heaps_purged;
} smalloc_stats_t;

/* Fill *out up to out->size bytes.  Returns 0, or EINVAL when out is NULL
 * or out->size does not cover the size and version fields. */
int    smalloc_stats_get(smalloc_stats_t *out);
/* Zero every counter that counts events; gauges (in use, mapped) stay. */
void   smalloc_stats_reset(void);
/* A human table and one JSON object with the same figures. */
void   smalloc_stats_print(FILE *out);
void   smalloc_stats_print_json(FILE *out);

/* ---- heap profile (smalloc_prof(3)) ---------------------------------------- */
int    smalloc_prof_start(void);
void   smalloc_prof_stop(void);
void   smalloc_prof_reset(void);
int    smalloc_prof_dump(const char *path);

/* ---- options ------------------------------------------------------------- */
typedef enum smalloc_option {
  SMALLOC_OPTION_STATS = 0,      /* SMALLOC_STATS: 0 off, 1 table, 2 json at exit */
  SMALLOC_OPTION_VERBOSE,        /* SMALLOC_VERBOSE: print options at start-up */
  SMALLOC_OPTION_RETIRE_CYCLES,  /* SMALLOC_RETIRE_CYCLES: slow-path cycles a retired page is kept */
  SMALLOC_OPTION_PURGE_DELAY,    /* SMALLOC_PURGE_DELAY: ms before cached memory is purged */
  SMALLOC_OPTION_SEGMENT_CACHE,  /* SMALLOC_SEGMENT_CACHE: empty segments kept mapped */
  SMALLOC_OPTION_ON_ERROR,       /* SMALLOC_ON_ERROR: 0 abort, 1 warn and leak */
  SMALLOC_OPTION_BACKGROUND,     /* SMALLOC_BACKGROUND: 1 a purge thread gives memory back
                                    while the program is idle, 0 never start one */
  SMALLOC_OPTION_STATS_INTERVAL, /* SMALLOC_STATS_INTERVAL: ms between reports while the
                                    program runs, 0 only at exit */
  SMALLOC_OPTION_PROF,           /* SMALLOC_PROF: 1 sample from the start, profile at exit */
  SMALLOC_OPTION_PROF_RATE,      /* SMALLOC_PROF_RATE: mean bytes between samples */
  SMALLOC_OPTION_PROF_EVENT_RATE, /* SMALLOC_PROF_EVENT_RATE: one slow-path step in this many
                                     is sampled with its stack */
  SMALLOC_OPTION_PROF_LEAKS,     /* SMALLOC_PROF_LEAKS: 1 sample from the start, report the
                                    sampled blocks still live at exit */
  SMALLOC_OPTION_PROF_SEED,      /* SMALLOC_PROF_SEED: 0 random sampling, else the same
                                    samples for the same allocations */
  SMALLOC_OPTION_HUGEPAGES,      /* SMALLOC_HUGEPAGES: 1 ask for transparent huge pages for
                                    large and huge blocks and large heaps, 2 for every
                                    segment of small blocks too, 0 never */
  SMALLOC_OPTION_HEAP_CACHE,     /* SMALLOC_HEAP_CACHE: exited threads' heaps kept whole for
                                    the next threads, each for up to a purge delay */
  SMALLOC_OPTION_COUNT
} smalloc_option_t;

/* The value of an option, or -1 with errno = EINVAL for an unknown one. */
long   smalloc_option_get(smalloc_option_t option);
/* Set an option; 0 on success, EINVAL for an unknown option or a value
 * out of its range. */
int    smalloc_option_set(smalloc_option_t option, long value);

#ifdef __cplusplus
}
#endif
#endif /* SMALLOC_H */
