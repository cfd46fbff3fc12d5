/* Options: read once from the environment, without allocating (no getenv,
 * no stdio), and ignored in setuid/setgid programs (AT_SECURE). */
#include "internal.h"

#include <limits.h>
#include <sys/auxv.h>

extern char **environ;

typedef struct sm_option_desc_s {
  const char *env;
  long def, min, max;
  const char *const *words;   /* accepted words, their index is the value */
} sm_option_desc_t;

static const char *const sm_words_stats[] = {"0", "1", "json", NULL};
static const char *const sm_words_on_error[] = {"abort", "warn", NULL};

/* Retire cycles: measured in bench/ (churn cases); see NEWS. */
static const sm_option_desc_t sm_option_desc[SMALLOC_OPTION_COUNT] = {
  [SMALLOC_OPTION_STATS]         = {"SMALLOC_STATS", 0, 0, 2, sm_words_stats},
  [SMALLOC_OPTION_VERBOSE]       = {"SMALLOC_VERBOSE", 0, 0, 1, NULL},
  [SMALLOC_OPTION_RETIRE_CYCLES] = {"SMALLOC_RETIRE_CYCLES", 1024, 0, 1000000, NULL},
  [SMALLOC_OPTION_PURGE_DELAY]   = {"SMALLOC_PURGE_DELAY", 1000, 0, 3600000, NULL},
  [SMALLOC_OPTION_SEGMENT_CACHE] = {"SMALLOC_SEGMENT_CACHE", 8, 0, 1024, NULL},
  [SMALLOC_OPTION_ON_ERROR]      = {"SMALLOC_ON_ERROR", 0, 0, 1, sm_words_on_error},
  [SMALLOC_OPTION_BACKGROUND]    = {"SMALLOC_BACKGROUND", 1, 0, 1, NULL},
};

long sm_options[SMALLOC_OPTION_COUNT] = {
  [SMALLOC_OPTION_STATS] = 0, [SMALLOC_OPTION_VERBOSE] = 0,
  [SMALLOC_OPTION_RETIRE_CYCLES] = 1024, [SMALLOC_OPTION_PURGE_DELAY] = 1000,
  [SMALLOC_OPTION_SEGMENT_CACHE] = 8, [SMALLOC_OPTION_ON_ERROR] = 0,
  [SMALLOC_OPTION_BACKGROUND] = 1,
};

static bool sm_parse_long(const char *s, long *out) {
  if (*s == '\0') return false;
  long v = 0;
  for (; *s; s++) {
    if (*s < '0' || *s > '9') return false;
    if (v > (LONG_MAX - 9) / 10) return false;
    v = v * 10 + (*s - '0');
  }
  *out = v;
  return true;
}

static bool sm_streq(const char *a, const char *b) {
  while (*a && *a == *b) { a++; b++; }
  return *a == *b;
}

static void sm_option_from_env(int i, const char *val) {
  const sm_option_desc_t *d = &sm_option_desc[i];
  long v;
  if (d->words) {
    for (long w = 0; d->words[w]; w++)
      if (sm_streq(val, d->words[w])) { sm_options[i] = w; return; }
  }
  if (sm_parse_long(val, &v) && v >= d->min && v <= d->max) {
    sm_options[i] = v;
    return;
  }
  if (d->words)
    sm_message("ignoring %s='%.64s': not one of the accepted values; using %ld", d->env, val, d->def);
  else
    sm_message("ignoring %s='%.64s': not a number in [%ld, %ld]; using %ld", d->env, val, d->min,
               d->max, d->def);
  sm_options[i] = d->def;
}

static bool sm_options_loaded;

/* Called at the first allocation and again from the library constructor,
 * in case the first allocation came before the environment was set up. */
void sm_options_init(void) {
  if (sm_options_loaded) return;
  if (getauxval(AT_SECURE)) { sm_options_loaded = true; return; }
  char **env = environ;
  if (env == NULL) return;
  sm_options_loaded = true;
  for (; *env; env++) {
    const char *e = *env;
    if (strncmp(e, "SMALLOC_", 8) != 0) continue;
    for (int i = 0; i < SMALLOC_OPTION_COUNT; i++) {
      const char *name = sm_option_desc[i].env;
      size_t len = strlen(name);
      if (strncmp(e, name, len) == 0 && e[len] == '=') sm_option_from_env(i, e + len + 1);
    }
  }
  if (sm_options[SMALLOC_OPTION_VERBOSE]) sm_options_print();
  sm_stats_open_fd();
}

void sm_options_print(void) {
  for (int i = 0; i < SMALLOC_OPTION_COUNT; i++) {
    long v = __atomic_load_n(&sm_options[i], __ATOMIC_RELAXED);
    if (sm_option_desc[i].words) sm_message("option %s=%s", sm_option_desc[i].env, sm_option_desc[i].words[v]);
    else sm_message("option %s=%ld", sm_option_desc[i].env, v);
  }
}

/* Small blocks are asked for again soonest and cost least to keep: their
 * pages stay the full number of cycles, larger blocks a quarter of it. */
size_t sm_retire_cycles_for(size_t block_size) {
  long c = sm_opt(RETIRE_CYCLES);
  if (c <= 0) return 0;
  if (block_size <= 1024) return (size_t)c;
  return c >= 4 ? (size_t)c / 4 : 1;
}

SM_EXPORT long smalloc_option_get(smalloc_option_t option) {
  if ((unsigned)option >= SMALLOC_OPTION_COUNT) { errno = EINVAL; return -1; }
  return __atomic_load_n(&sm_options[option], __ATOMIC_RELAXED);
}

SM_EXPORT int smalloc_option_set(smalloc_option_t option, long value) {
  if ((unsigned)option >= SMALLOC_OPTION_COUNT) return EINVAL;
  const sm_option_desc_t *d = &sm_option_desc[option];
  if (value < d->min || value > d->max) return EINVAL;
  __atomic_store_n(&sm_options[option], value, __ATOMIC_RELAXED);
  return 0;
}
