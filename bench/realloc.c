/* realloc-heavy: strings and arrays grown by small steps, then shrunk, many
 * of them live at once so growth in place is not always possible.
 *
 *   bench_realloc [quick]
 *
 * Strings grow by 1-16 bytes, arrays by one or two 8-byte elements (plus
 * 1/256 of their length, so the rare large ones finish in time); when an
 * object reaches its target length (256 B - 16 KiB, one in sixteen up to
 * 1 MiB) it shrinks by a quarter per step, then its contents are hashed and
 * it is freed.  ops counts steps: one realloc each, or a free and a malloc
 * when an object is done.
 */
#include "common.h"

enum { NOBJ = 16 };

struct obj {
  unsigned char *p;
  size_t len, target;
  uint64_t gen;
  int array, shrinking;
};

static unsigned char content(uint64_t gen, size_t pos)
{
  return (unsigned char)(gen * 7 + pos * 131 + (pos >> 8));
}

static size_t pick_target(uint64_t *rng)
{
  if (rng_next(rng) % 16 == 0)
    return (size_t)rng_range(rng, 65536, 1 << 20);
  return (size_t)rng_range(rng, 256, 16384);
}

static void start(struct obj *o, uint64_t *rng, uint64_t gen)
{
  o->array = (int)(rng_next(rng) & 1);
  o->len = o->array ? 8 : 1;
  o->p = xmalloc(o->len + 1);
  for (size_t i = 0; i < o->len; i++)
    o->p[i] = content(gen, i);
  o->p[o->len] = 0;
  o->target = pick_target(rng);
  o->gen = gen;
  o->shrinking = 0;
}

static uint64_t finish(struct obj *o)
{
  uint64_t h = 0xcbf29ce484222325ull;
  size_t i = 0;
  for (; i + 8 <= o->len; i += 8) {
    uint64_t w;
    memcpy(&w, o->p + i, 8);
    h = (h ^ w) * 0x100000001b3ull;
  }
  for (; i < o->len; i++)
    h = (h ^ o->p[i]) * 0x100000001b3ull;
  free(o->p);
  return mix64(h ^ o->len);
}

int main(int argc, char **argv)
{
  uint64_t steps = is_quick(argc, argv) ? 300000 : 3000000;
  uint64_t rng = 0x4ea110c;
  uint64_t gen = 0, ck = 0;
  struct obj obj[NOBJ];

  double t0 = now_s();
  for (int i = 0; i < NOBJ; i++)
    start(&obj[i], &rng, gen++);
  for (uint64_t s = 0; s < steps; s++) {
    struct obj *o = &obj[rng_next(&rng) % NOBJ];
    size_t len = o->len, nlen;
    if (!o->shrinking) {
      size_t step = o->array ? 8 * (size_t)rng_range(&rng, 1, 2) : (size_t)rng_range(&rng, 1, 16);
      nlen = len + step + (len / 256 & ~(size_t)7);
      /* strings keep a NUL after their length */
      o->p = xrealloc(o->p, o->array ? nlen : nlen + 1);
      for (size_t i = len; i < nlen; i++)
        o->p[i] = content(o->gen, i);
      if (!o->array)
        o->p[nlen] = 0;
      o->len = nlen;
      if (nlen >= o->target)
        o->shrinking = 1;
    } else {
      nlen = (len - len / 4 - 1) & ~(size_t)7;
      if (nlen < 64) {
        ck += finish(o);
        start(o, &rng, gen++);
        continue;
      }
      o->p = xrealloc(o->p, o->array ? nlen : nlen + 1);
      if (!o->array)
        o->p[nlen] = 0;
      o->len = nlen;
    }
  }
  for (int i = 0; i < NOBJ; i++)
    ck += finish(&obj[i]);
  double t1 = now_s();

  report(t1 - t0, steps, ck);
  return 0;
}
