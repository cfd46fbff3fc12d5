/* Large blocks: 64 KiB - 64 MiB, log-uniform, eight live at a time, every
 * page written when it is allocated and read back before it is freed.  One
 * step in four reallocs a live block to between half and four times its
 * size (the huge ones exercise mremap).
 *
 *   bench_large [quick]
 *
 * The run stops after a fixed number of bytes has been newly touched, so the
 * work is the same under every allocator; what differs is how often the
 * allocator hands memory back to the kernel only to fault it in again.
 * ops counts steps (one malloc, free or realloc each).
 */
#include "common.h"

enum { NSLOT = 8, PAGE = 4096 };
#define MIN_SIZE ((size_t)64 << 10)
#define MAX_SIZE ((size_t)64 << 20)

struct slot {
  unsigned char *p;
  size_t size;
  uint64_t id;
};

static uint64_t touched;

static uint64_t word_for(uint64_t id, size_t off)
{
  return mix64(id << 20 ^ (off / PAGE));
}

static void put_word(unsigned char *p, size_t off, uint64_t v)
{
  memcpy(p + off, &v, 8);
}

/* Write one word in every page of [from, to) of the block, and its last word. */
static void touch(struct slot *s, size_t from, size_t to)
{
  size_t off = (from + PAGE - 1) / PAGE * PAGE;
  for (; off < to; off += PAGE)
    put_word(s->p, off, word_for(s->id, off));
  put_word(s->p, to - 8, word_for(s->id, to - 8));
  touched += to - from;
}

static uint64_t verify_and_free(struct slot *s)
{
  uint64_t ck = 0;
  for (size_t off = 0; off < s->size; off += PAGE) {
    uint64_t v;
    memcpy(&v, s->p + off, 8);
    ck += v;
  }
  free(s->p);
  s->p = NULL;
  return ck;
}

static size_t pick_size(uint64_t *rng)
{
  size_t lo = MIN_SIZE << rng_range(rng, 0, 9);
  return (lo + (size_t)rng_range(rng, 0, lo - 1)) & ~(size_t)15;
}

int main(int argc, char **argv)
{
  uint64_t budget = (uint64_t)(is_quick(argc, argv) ? 48 : 320) << 20;
  uint64_t rng = 0x1a46e;
  uint64_t ck = 0, ops = 0, next_id = 1;
  struct slot slot[NSLOT] = {{0}};

  double t0 = now_s();
  while (touched < budget) {
    struct slot *s = &slot[rng_next(&rng) % NSLOT];
    uint64_t r = rng_next(&rng);
    ops++;
    if (s->p != NULL && r % 4 == 0) {
      size_t lo = s->size / 2, hi = s->size * 4;
      size_t nsize = (size_t)rng_range(&rng, lo, hi) & ~(size_t)15;
      if (nsize < MIN_SIZE)
        nsize = MIN_SIZE;
      if (nsize > MAX_SIZE)
        nsize = MAX_SIZE;
      s->p = xrealloc(s->p, nsize);
      if (nsize > s->size)
        touch(s, s->size, nsize);
      else
        put_word(s->p, nsize - 8, word_for(s->id, nsize - 8));
      s->size = nsize;
      continue;
    }
    if (s->p != NULL) {
      ck += verify_and_free(s);
      ops++;
    }
    s->size = pick_size(&rng);
    s->id = next_id++;
    s->p = xmalloc(s->size);
    touch(s, 0, s->size);
  }
  for (int i = 0; i < NSLOT; i++)
    if (slot[i].p != NULL) {
      ck += verify_and_free(&slot[i]);
      ops++;
    }
  double t1 = now_s();

  report(t1 - t0, ops, ck);
  return 0;
}
