/* Producer/consumer pipeline: a source thread, three transforming stages and
 * a sink, joined by bounded queues of message batches.  Every message and
 * every batch is allocated by one thread and freed by the next, so nearly
 * every free is a cross-thread free.
 *
 *   bench_pipeline [quick]
 */
#include "common.h"

#include <pthread.h>

enum { NSTAGES = 3, BATCH_MSGS = 64, QUEUE_DEPTH = 16 };

struct msg {
  uint32_t len;
  uint32_t seq;
  unsigned char data[];
};

struct batch {
  struct batch *next;
  int n; /* 0 marks the end of the stream */
  struct msg *m[BATCH_MSGS];
};

struct queue {
  pthread_mutex_t lock;
  pthread_cond_t nonempty, nonfull;
  struct batch *head, *tail;
  int depth;
};

static struct queue q[NSTAGES + 1];
static uint64_t nmsgs;
static uint64_t sink_ck;

static void queue_init(struct queue *qu)
{
  pthread_mutex_init(&qu->lock, NULL);
  pthread_cond_init(&qu->nonempty, NULL);
  pthread_cond_init(&qu->nonfull, NULL);
  qu->head = qu->tail = NULL;
  qu->depth = 0;
}

static void put(struct queue *qu, struct batch *b)
{
  b->next = NULL;
  pthread_mutex_lock(&qu->lock);
  while (qu->depth >= QUEUE_DEPTH)
    pthread_cond_wait(&qu->nonfull, &qu->lock);
  if (qu->tail)
    qu->tail->next = b;
  else
    qu->head = b;
  qu->tail = b;
  qu->depth++;
  pthread_cond_signal(&qu->nonempty);
  pthread_mutex_unlock(&qu->lock);
}

static struct batch *get(struct queue *qu)
{
  pthread_mutex_lock(&qu->lock);
  while (qu->head == NULL)
    pthread_cond_wait(&qu->nonempty, &qu->lock);
  struct batch *b = qu->head;
  qu->head = b->next;
  if (qu->head == NULL)
    qu->tail = NULL;
  qu->depth--;
  pthread_cond_signal(&qu->nonfull);
  pthread_mutex_unlock(&qu->lock);
  return b;
}

static void *source(void *arg)
{
  (void)arg;
  uint64_t rng = 0x919e11e;
  uint64_t seq = 0;
  while (seq < nmsgs) {
    struct batch *b = xmalloc(sizeof *b);
    b->n = 0;
    while (b->n < BATCH_MSGS && seq < nmsgs) {
      uint32_t len = (uint32_t)rng_range(&rng, 32, 1024);
      struct msg *m = xmalloc(sizeof *m + len);
      m->len = len;
      m->seq = (uint32_t)seq;
      memset(m->data, (int)(seq & 0xff), len);
      m->data[0] = (unsigned char)(len & 0xff);
      b->m[b->n++] = m;
      seq++;
    }
    put(&q[0], b);
  }
  struct batch *end = xmalloc(sizeof *end);
  end->n = 0;
  put(&q[0], end);
  return NULL;
}

/* Stage 1 adds a header, stage 2 halves the message, stage 3 doubles it. */
static uint32_t out_len(int stage, uint32_t len)
{
  switch (stage) {
  case 0: return len + 64;
  case 1: return len / 2 + 16;
  default: return len * 2 > 4096 ? 4096 : len * 2;
  }
}

static void *stage(void *arg)
{
  int k = (int)(uintptr_t)arg;
  for (;;) {
    struct batch *in = get(&q[k]);
    struct batch *out = xmalloc(sizeof *out);
    out->n = in->n;
    for (int i = 0; i < in->n; i++) {
      struct msg *a = in->m[i];
      uint32_t len = out_len(k, a->len);
      struct msg *b = xmalloc(sizeof *b + len);
      b->len = len;
      b->seq = a->seq;
      uint32_t keep = len < a->len ? len : a->len;
      memcpy(b->data, a->data, keep);
      memset(b->data + keep, k + 1, len - keep);
      b->data[0] ^= (unsigned char)(k + 1);
      free(a);
      out->m[i] = b;
    }
    int end = in->n == 0;
    free(in);
    put(&q[k + 1], out);
    if (end)
      return NULL;
  }
}

static void *sink(void *arg)
{
  (void)arg;
  uint64_t ck = 0;
  for (;;) {
    struct batch *b = get(&q[NSTAGES]);
    for (int i = 0; i < b->n; i++) {
      struct msg *m = b->m[i];
      uint64_t v = (uint64_t)m->seq | (uint64_t)m->len << 32;
      v ^= (uint64_t)m->data[0] << 48 ^ (uint64_t)m->data[m->len - 1] << 56;
      ck += mix64(v);
      free(m);
    }
    int end = b->n == 0;
    free(b);
    if (end)
      break;
  }
  sink_ck = ck;
  return NULL;
}

int main(int argc, char **argv)
{
  nmsgs = is_quick(argc, argv) ? 100000 : 1500000;
  for (int i = 0; i <= NSTAGES; i++)
    queue_init(&q[i]);
  pthread_t src, snk, st[NSTAGES];

  double t0 = now_s();
  if (pthread_create(&src, NULL, source, NULL) != 0 || pthread_create(&snk, NULL, sink, NULL) != 0)
    return 2;
  for (int k = 0; k < NSTAGES; k++)
    if (pthread_create(&st[k], NULL, stage, (void *)(uintptr_t)k) != 0)
      return 2;
  pthread_join(src, NULL);
  for (int k = 0; k < NSTAGES; k++)
    pthread_join(st[k], NULL);
  pthread_join(snk, NULL);
  double t1 = now_s();

  /* one message allocation per thread that creates it: source + stages */
  report(t1 - t0, nmsgs * (NSTAGES + 1), sink_ck);
  return 0;
}
