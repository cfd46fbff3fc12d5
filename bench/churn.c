/* Churn: the allocate-and-free-again patterns smalloc is built for.
 *
 *   bench_churn MODE [N | quick]
 *
 *   a      malloc(32)/free ping-pong
 *   b      batches of 1000 blocks of 16-256 B, freed in allocation order
 *   c      the same, freed in reverse order
 *   d      the same, freed in random order
 *   e      batches of 1000 blocks spread over the size classes 16 B - 8 KiB
 *   f      a producer thread allocates 16-256 B blocks, a consumer frees them
 *   floor  case a against a plain singly linked free list (no malloc): the
 *          cost of the loop plus the least any allocator could do
 *
 * N is the number of malloc+free pairs (rounded down to whole batches);
 * ops is reported as that number so ns/op is per pair.
 */
#include "common.h"

#include <pthread.h>

enum { BATCH = 1000, TABLE = 4096, NPERM = 8 };

static unsigned sizes[TABLE];
static unsigned perm[NPERM][BATCH];

static void fill_sizes_small(uint64_t *rng)
{
  for (int i = 0; i < TABLE; i++)
    sizes[i] = (unsigned)rng_range(rng, 16, 256);
}

/* Log-uniform over 16 B - 8 KiB so every size class gets its share. */
static void fill_sizes_spread(uint64_t *rng)
{
  for (int i = 0; i < TABLE; i++) {
    unsigned lo = 16u << rng_range(rng, 0, 9);
    unsigned sz = lo + (unsigned)rng_range(rng, 0, lo - 1);
    sizes[i] = sz > 8192 ? 8192 : sz;
  }
}

static void fill_perms(uint64_t *rng)
{
  for (int k = 0; k < NPERM; k++) {
    for (int i = 0; i < BATCH; i++)
      perm[k][i] = (unsigned)i;
    for (int i = BATCH - 1; i > 0; i--) {
      int j = (int)rng_range(rng, 0, (uint64_t)i);
      unsigned t = perm[k][i];
      perm[k][i] = perm[k][j];
      perm[k][j] = t;
    }
  }
}

/* ---- a: ping-pong --------------------------------------------------------- */

static uint64_t run_pingpong(uint64_t n)
{
  uint64_t ck = 0;
  for (uint64_t i = 0; i < n; i++) {
    uint64_t *p = xmalloc(32);
    p[0] = i;
    ESCAPE(p);
    ck += p[0];
    free(p);
  }
  return ck;
}

/* ---- floor: the same loop on a list with no checks at all ------------------ */

struct fblock {
  struct fblock *next;
  uint64_t pad[3];
};
static struct fblock floor_arena[64];
static size_t floor_used;
static struct fblock *floor_head;

static __attribute__((noinline)) void *floor_malloc(size_t n)
{
  (void)n;
  struct fblock *b = floor_head;
  if (__builtin_expect(b != NULL, 1)) {
    floor_head = b->next;
    return b;
  }
  return floor_used < 64 ? &floor_arena[floor_used++] : NULL;
}

static __attribute__((noinline)) void floor_free(void *p)
{
  struct fblock *b = p;
  b->next = floor_head;
  floor_head = b;
}

static uint64_t run_floor(uint64_t n)
{
  uint64_t ck = 0;
  for (uint64_t i = 0; i < n; i++) {
    uint64_t *p = floor_malloc(32);
    if (p == NULL)
      exit(2);
    p[0] = i;
    ESCAPE(p);
    ck += p[0];
    floor_free(p);
  }
  return ck;
}

/* ---- b, c, d, e: batches ----------------------------------------------------- */

enum order { FIFO, LIFO, RANDOM };

static uint64_t run_batches(uint64_t rounds, enum order order)
{
  static uint64_t *blk[BATCH];
  uint64_t ck = 0;
  unsigned s = 0;
  for (uint64_t r = 0; r < rounds; r++) {
    for (int i = 0; i < BATCH; i++) {
      uint64_t *p = xmalloc(sizes[s]);
      s = (s + 1) & (TABLE - 1);
      p[0] = r + (uint64_t)i;
      ESCAPE(p);
      blk[i] = p;
    }
    const unsigned *pm = perm[r & (NPERM - 1)];
    for (int i = 0; i < BATCH; i++) {
      int k = order == FIFO ? i : order == LIFO ? BATCH - 1 - i : (int)pm[i];
      ck += mix64(blk[k][0]);
      free(blk[k]);
    }
  }
  return ck;
}

/* ---- f: producer/consumer ------------------------------------------------- */

/* Blocks travel in batches through a small ring of batch slots; waiting
 * blocks on a condition variable, so the result does not depend on how
 * spinning threads share two cores. */
enum { PC_BATCH = 256, PC_SLOTS = 16 };

static struct {
  pthread_mutex_t lock;
  pthread_cond_t nonempty, nonfull;
  unsigned full;
  uint64_t *slot[PC_SLOTS][PC_BATCH];
} pc = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, {{0}}};

static uint64_t pc_batches;

static void *producer(void *arg)
{
  (void)arg;
  uint64_t i = 0;
  for (uint64_t b = 0; b < pc_batches; b++) {
    pthread_mutex_lock(&pc.lock);
    while (pc.full == PC_SLOTS)
      pthread_cond_wait(&pc.nonfull, &pc.lock);
    pthread_mutex_unlock(&pc.lock);
    uint64_t **slot = pc.slot[b % PC_SLOTS];
    for (int k = 0; k < PC_BATCH; k++, i++) {
      uint64_t *p = xmalloc(sizes[i & (TABLE - 1)]);
      p[0] = i;
      slot[k] = p;
    }
    pthread_mutex_lock(&pc.lock);
    pc.full++;
    pthread_cond_signal(&pc.nonempty);
    pthread_mutex_unlock(&pc.lock);
  }
  return NULL;
}

static uint64_t consume(void)
{
  uint64_t ck = 0;
  for (uint64_t b = 0; b < pc_batches; b++) {
    pthread_mutex_lock(&pc.lock);
    while (pc.full == 0)
      pthread_cond_wait(&pc.nonempty, &pc.lock);
    pthread_mutex_unlock(&pc.lock);
    uint64_t **slot = pc.slot[b % PC_SLOTS];
    for (int k = 0; k < PC_BATCH; k++) {
      ck += mix64(slot[k][0]);
      free(slot[k]);
    }
    pthread_mutex_lock(&pc.lock);
    pc.full--;
    pthread_cond_signal(&pc.nonfull);
    pthread_mutex_unlock(&pc.lock);
  }
  return ck;
}

static uint64_t run_prodcons(uint64_t n)
{
  pthread_t t;
  pc_batches = n / PC_BATCH;
  if (pthread_create(&t, NULL, producer, NULL) != 0) {
    fprintf(stderr, "bench_churn: pthread_create failed\n");
    exit(2);
  }
  uint64_t ck = consume();
  pthread_join(t, NULL);
  return ck;
}

int main(int argc, char **argv)
{
  if (argc < 2)
    usage_exit("bench_churn a|b|c|d|e|f|floor [N|quick]");
  const char *mode = argv[1];
  int quick = is_quick(argc, argv);
  uint64_t n_arg = 0;
  if (argc > 2 && !quick)
    n_arg = strtoull(argv[2], NULL, 10);

  uint64_t rng = 0x5eed0001;
  uint64_t n, ck;
  double t0, t1;

  if (strcmp(mode, "a") == 0 || strcmp(mode, "floor") == 0) {
    n = n_arg ? n_arg : quick ? 3000000 : 40000000;
    int fl = mode[0] == 'f';
    t0 = now_s();
    ck = fl ? run_floor(n) : run_pingpong(n);
    t1 = now_s();
  } else if (strlen(mode) == 1 && mode[0] >= 'b' && mode[0] <= 'e') {
    uint64_t def = mode[0] == 'e' ? (quick ? 300000 : 8000000) : (quick ? 1000000 : 20000000);
    uint64_t rounds = (n_arg ? n_arg : def) / BATCH;
    if (rounds == 0)
      rounds = 1;
    n = rounds * BATCH;
    if (mode[0] == 'e')
      fill_sizes_spread(&rng);
    else
      fill_sizes_small(&rng);
    fill_perms(&rng);
    enum order ord = mode[0] == 'c' ? LIFO : mode[0] == 'd' ? RANDOM : FIFO;
    t0 = now_s();
    ck = run_batches(rounds, ord);
    t1 = now_s();
  } else if (strcmp(mode, "f") == 0) {
    n = (n_arg ? n_arg : quick ? 500000 : 8000000) / PC_BATCH * PC_BATCH;
    if (n == 0)
      n = PC_BATCH;
    fill_sizes_small(&rng);
    t0 = now_s();
    ck = run_prodcons(n);
    t1 = now_s();
  } else {
    usage_exit("bench_churn a|b|c|d|e|f|floor [N|quick]");
    return 64;
  }
  report(t1 - t0, n, ck);
  return 0;
}
