/* Telling memcheck about blocks.  When valgrind's headers were found at
 * build time and the process runs under valgrind, every page is flagged so
 * malloc and free take their out-of-line paths, which report each block
 * with client requests: memcheck then catches use after free, reads of
 * uninitialised memory and overruns of smalloc blocks.  Natively the
 * requests are never reached, so the fast paths cost nothing extra. */
#ifndef SM_TRACK_H
#define SM_TRACK_H

#include "internal.h"

#if defined(HAVE_VALGRIND_VALGRIND_H) && defined(HAVE_VALGRIND_MEMCHECK_H)
#include <valgrind/memcheck.h>
#include <valgrind/valgrind.h>
#define SM_TRACK 1
extern bool sm_valgrind;
#define sm_track_on() sm_unlikely(sm_valgrind)
/* a block handed out: n bytes, undefined unless zeroed */
#define sm_track_malloc(p, n, zero) \
  do { if (sm_track_on()) VALGRIND_MALLOCLIKE_BLOCK((p), (n) ? (n) : 1, 0, (zero)); } while (0)
/* a block given back; its first two words stay usable for the free-list
 * link and the tag */
#define sm_track_free(p, b) \
  do { if (sm_track_on()) { VALGRIND_FREELIKE_BLOCK((p), 0); \
       VALGRIND_MAKE_MEM_UNDEFINED((b), sizeof(sm_block_t)); } } while (0)
/* the library reads a block's link and tag (or user data it checks) */
#define sm_track_link(b) \
  do { if (sm_track_on()) VALGRIND_MAKE_MEM_DEFINED((b), sizeof(sm_block_t)); } while (0)
/* the library reads or writes the mark before an aligned pointer */
#define sm_track_mark(p) \
  do { if (sm_track_on()) VALGRIND_MAKE_MEM_DEFINED((uint8_t *)(p) - 8, 8); } while (0)
bool sm_track_memcheck(void);
/* memory the library takes over again (a segment or page reused after its
 * blocks died): addressable, contents undefined */
#define sm_track_reuse(p, n) \
  do { if (sm_track_on()) VALGRIND_MAKE_MEM_UNDEFINED((p), (n)); } while (0)
#define sm_track_detect() (sm_valgrind = RUNNING_ON_VALGRIND != 0 && sm_track_memcheck())
#else
#define SM_TRACK 0
#define sm_track_on() 0
#define sm_track_malloc(p, n, zero) ((void)0)
#define sm_track_free(p, b) ((void)0)
#define sm_track_link(b) ((void)0)
#define sm_track_mark(p) ((void)0)
#define sm_track_reuse(p, n) ((void)0)
#define sm_track_detect() ((void)0)
#endif

#endif /* SM_TRACK_H */
