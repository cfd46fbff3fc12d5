/* Options: read once from the environment, without allocating (no getenv,
 * no stdio), and ignored in setuid/setgid programs (AT_SECURE). */
#include "internal.h"

#include <limits.h>
#include <strings.h>
#include <sys/auxv.h>

extern char **environ;

typedef struct sm_option_desc_s {
  const char *env;
  long def, min, max;
  const char *const *words;   /* accepted words, their index is the value */
} sm_option_desc_t;

static const char *const sm_words_stats[] = {"0", "1", "json", NULL};
static const char *const sm_words_on_error[] = {"abort", "warn", NULL};

/* Every option once: its variable, default, range and accepted words (the
 * index of a word is its value).  Retire cycles: measured in bench/
 * (churn cases); see NEWS. */
#define SM_OPTION_LIST(X)                                                   \
  X(STATS, "SMALLOC_STATS", 0, 0, 2, sm_words_stats)                        \
  X(VERBOSE, "SMALLOC_VERBOSE", 0, 0, 1, NULL)                              \
  X(RETIRE_CYCLES, "SMALLOC_RETIRE_CYCLES", 1024, 0, 1000000, NULL)         \
  X(PURGE_DELAY, "SMALLOC_PURGE_DELAY", 1000, 0, 3600000, NULL)             \
  X(SEGMENT_CACHE, "SMALLOC_SEGMENT_CACHE", 8, 0, 1024, NULL)               \
  X(ON_ERROR, "SMALLOC_ON_ERROR", 0, 0, 1, sm_words_on_error)               \
  X(BACKGROUND, "SMALLOC_BACKGROUND", 1, 0, 1, NULL)                        \
  X(STATS_INTERVAL, "SMALLOC_STATS_INTERVAL", 0, 0, 86400000, NULL)         \
  X(PROF, "SMALLOC_PROF", 0, 0, 1, NULL)                                    \
  X(PROF_RATE, "SMALLOC_PROF_RATE", 524288, 1, 1073741824, NULL)           \
  X(PROF_EVENT_RATE, "SMALLOC_PROF_EVENT_RATE", 256, 1, 1000000, NULL)      \
  X(PROF_LEAKS, "SMALLOC_PROF_LEAKS", 0, 0, 1, NULL)                        \
  X(PROF_SEED, "SMALLOC_PROF_SEED", 0, 0, 2147483647, NULL)                 \
  X(HUGEPAGES, "SMALLOC_HUGEPAGES", 1, 0, 2, NULL)                          \
  X(HEAP_CACHE, "SMALLOC_HEAP_CACHE", 8, 0, 1024, NULL)

#define SM_OPTION_DESC(id, env, def, min, max, words) \
  [SMALLOC_OPTION_##id] = {env, def, min, max, words},
static const sm_option_desc_t sm_option_desc[SMALLOC_OPTION_COUNT] = {SM_OPTION_LIST(SM_OPTION_DESC)};
#define SM_OPTION_DEFAULT(id, env, def, min, max, words) [SMALLOC_OPTION_##id] = def,
long sm_options[SMALLOC_OPTION_COUNT] = {SM_OPTION_LIST(SM_OPTION_DEFAULT)};

/* val without leading and trailing white space, into buf (NUL-terminated;
 * false when it does not fit: no value is that long). */
static bool sm_trim(const char *val, char *buf, size_t cap) {
  while (*val == ' ' || *val == '\t') val++;
  size_t n = strlen(val);
  while (n > 0 && (val[n - 1] == ' ' || val[n - 1] == '\t' || val[n - 1] == '\n')) n--;
  if (n >= cap) return false;
  memcpy(buf, val, n);
  buf[n] = '\0';
  return true;
}

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

static char sm_lower(char c) { return c >= 'A' && c <= 'Z' ? (char)(c - 'A' + 'a') : c; }

/* Words match whatever their case: JSON, Warn. */
static bool sm_word_eq(const char *a, const char *b) {
  while (*a && sm_lower(*a) == sm_lower(*b)) { a++; b++; }
  return *a == *b;
}

/* The accepted words of an option, "a, b or c", into buf. */
static const char *sm_words_list(const char *const *words, char *buf, size_t cap) {
  size_t len = 0;
  buf[0] = '\0';
  for (size_t w = 0; words[w]; w++) {
    const char *sep = w == 0 ? "" : words[w + 1] ? ", " : " or ";
    int n = snprintf(buf + len, cap - len, "%s%s", sep, words[w]);
    if (n < 0 || (size_t)n >= cap - len) break;
    len += (size_t)n;
  }
  return buf;
}

/* Set option i from the text raw, as given for `what` (the variable, or
 * "SMALLOC_CONF key"): a warning names what was ignored and the default. */
static void sm_option_from_text(int i, const char *raw, const char *what) {
  const sm_option_desc_t *d = &sm_option_desc[i];
  char val[64];
  long v;
  bool fits = sm_trim(raw, val, sizeof val);
  if (fits && val[0] == '\0') { sm_options[i] = d->def; return; }   /* empty: unset */
  if (fits && d->words) {
    for (long w = 0; d->words[w]; w++)
      if (sm_word_eq(val, d->words[w])) { sm_options[i] = w; return; }
  }
  if (fits && sm_parse_long(val, &v) && v >= d->min && v <= d->max) {
    sm_options[i] = v;
    return;
  }
  if (d->words) {
    char list[96];
    sm_message("ignoring %s='%.64s': not %s; using %s", what, raw,
               sm_words_list(d->words, list, sizeof list), d->words[d->def]);
  } else {
    sm_message("ignoring %s='%.64s': not a number in [%ld, %ld]; using %ld", what, raw, d->min,
               d->max, d->def);
  }
  sm_options[i] = d->def;
}

/* Edit distance of a and b, case aside, up to 3 (3 means "3 or more"): names this
 * close to an option's are taken for misspellings of it. */
static unsigned sm_distance(const char *a, size_t na, const char *b, size_t nb) {
  enum { M = 40 };
  if (na >= M || nb >= M) return 3;
  unsigned row[M], prev[M];
  for (size_t j = 0; j <= nb; j++) prev[j] = (unsigned)j;
  for (size_t i = 1; i <= na; i++) {
    row[0] = (unsigned)i;
    for (size_t j = 1; j <= nb; j++) {
      unsigned sub = prev[j - 1] + (sm_lower(a[i - 1]) != sm_lower(b[j - 1]));
      unsigned del = prev[j] + 1, ins = row[j - 1] + 1;
      row[j] = sub < del ? (sub < ins ? sub : ins) : (del < ins ? del : ins);
    }
    memcpy(prev, row, (nb + 1) * sizeof row[0]);
  }
  return prev[nb] < 3 ? prev[nb] : 3;
}

/* A SMALLOC_ variable that is no option: when its name is within two
 * edits of one, say so (other SMALLOC_ variables, of scripts and test
 * harnesses, are left alone). */
/* The option whose name (its variable, from character skip on: 8 leaves
 * SMALLOC_ out) is within two edits of name[0..n), or -1. */
static int sm_option_near(const char *name, size_t n, size_t skip) {
  for (int i = 0; i < SMALLOC_OPTION_COUNT; i++) {
    const char *o = sm_option_desc[i].env + skip;
    if (sm_distance(name, n, o, strlen(o)) <= 2) return i;
  }
  return -1;
}

static void sm_option_unknown(const char *e) {
  const char *eq = strchr(e, '=');
  size_t n = eq ? (size_t)(eq - e) : strlen(e);
  int i = sm_option_near(e, n, 0);
  if (i >= 0)
    sm_message("ignoring %.*s: no such option; did you mean %s?", (int)(n < 64 ? n : 64), e,
               sm_option_desc[i].env);
}

/* An option's key in SMALLOC_CONF: its name without SMALLOC_, in lower
 * case ("retire_cycles"), into buf. */
static const char *sm_option_key(int i, char *buf, size_t cap) {
  const char *name = sm_option_desc[i].env + 8;
  size_t n = 0;
  for (; name[n] && n + 1 < cap; n++) buf[n] = sm_lower(name[n]);
  buf[n] = '\0';
  return buf;
}

/* The options that take a path (the table above holds numbers): their
 * variable, their SMALLOC_CONF key, and where the path goes (shorter
 * than SM_STATS_FILE_MAX, "%p" expanded when it is used). */
static const struct {
  const char *env, *key;
  void (*set)(const char *path);
} sm_path_options[] = {
  {"SMALLOC_STATS_FILE", "stats_file", sm_stats_set_file},
  {"SMALLOC_PROF_DUMP", "prof_dump", sm_prof_set_dump},
};
#define SM_PATH_OPTIONS (sizeof sm_path_options / sizeof sm_path_options[0])

/* One key:value pair of SMALLOC_CONF (key and value trimmed). */
static void sm_options_conf_pair(const char *key, const char *val) {
  const char *name = strncasecmp(key, "SMALLOC_", 8) == 0 ? key + 8 : key;   /* the full name too */
  for (size_t i = 0; i < SM_PATH_OPTIONS; i++)
    if (sm_word_eq(name, sm_path_options[i].key)) {
      sm_path_options[i].set(val);
      return;
    }
  char what[64], opt[40];
  for (int i = 0; i < SMALLOC_OPTION_COUNT; i++) {
    if (sm_word_eq(name, sm_option_desc[i].env + 8)) {
      snprintf(what, sizeof what, "SMALLOC_CONF %s", sm_option_key(i, opt, sizeof opt));
      sm_option_from_text(i, val, what);
      return;
    }
  }
  int near = sm_option_near(name, strlen(name), 8);
  if (near >= 0)
    sm_message("ignoring SMALLOC_CONF key '%s': no such option; did you mean %s?", key,
               sm_option_key(near, opt, sizeof opt));
  else
    sm_message("ignoring SMALLOC_CONF key '%s': no such option", key);
}

/* SMALLOC_CONF="stats:json,retire_cycles:512": several options in one
 * variable, as users of jemalloc's MALLOC_CONF expect.  A key is an
 * option's name without SMALLOC_, in any case (the full name works too);
 * stats_file sets SMALLOC_STATS_FILE and prof_dump SMALLOC_PROF_DUMP (a
 * path runs to the next comma).
 * Read before the separate variables, which win.  A pair without a colon
 * or with an unknown key is named in one warning. */
static void sm_options_conf(const char *conf) {
  for (const char *p = conf; *p;) {
    const char *end = strchr(p, ',');
    if (end == NULL) end = p + strlen(p);
    size_t len = (size_t)(end - p);
    const char *colon = memchr(p, ':', len);
    char pair[SM_STATS_FILE_MAX + 40], key[40], val[SM_STATS_FILE_MAX];
    if (len >= sizeof pair) {
      sm_message("ignoring SMALLOC_CONF '%.40s...': longer than %zu characters", p, sizeof pair - 1);
    } else if (colon == NULL) {
      memcpy(pair, p, len);
      pair[len] = '\0';
      if (sm_trim(pair, val, sizeof val) && val[0] != '\0')
        sm_message("ignoring SMALLOC_CONF '%s': not key:value", val);
    } else {
      size_t klen = (size_t)(colon - p);
      memcpy(pair, p, klen);
      pair[klen] = '\0';
      bool ok = sm_trim(pair, key, sizeof key);
      memcpy(pair, colon + 1, len - klen - 1);
      pair[len - klen - 1] = '\0';
      ok = ok && sm_trim(pair, val, sizeof val);
      if (ok && key[0] != '\0') sm_options_conf_pair(key, val);
      else sm_message("ignoring SMALLOC_CONF '%.*s': not key:value", (int)(len < 64 ? len : 64), p);
    }
    p = *end ? end + 1 : end;
  }
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
  for (char **c = env; *c; c++)
    if (strncmp(*c, "SMALLOC_CONF=", 13) == 0) sm_options_conf(*c + 13);
  for (; *env; env++) {
    const char *e = *env;
    if (strncmp(e, "SMALLOC_", 8) != 0 || strncmp(e, "SMALLOC_CONF=", 13) == 0) continue;
    bool known = false;
    for (size_t i = 0; i < SM_PATH_OPTIONS && !known; i++) {
      size_t len = strlen(sm_path_options[i].env);
      if (strncmp(e, sm_path_options[i].env, len) != 0 || e[len] != '=') continue;
      char path[SM_STATS_FILE_MAX];
      if (sm_trim(e + len + 1, path, sizeof path)) sm_path_options[i].set(path);
      else sm_message("ignoring %s: longer than %zu characters", sm_path_options[i].env, sizeof path - 1);
      known = true;
    }
    if (known) continue;
    for (int i = 0; i < SMALLOC_OPTION_COUNT; i++) {
      const char *name = sm_option_desc[i].env;
      size_t len = strlen(name);
      if (strncmp(e, name, len) == 0 && e[len] == '=') {
        sm_option_from_text(i, e + len + 1, name);
        known = true;
      }
    }
    if (!known) sm_option_unknown(e);
  }
  if (sm_options[SMALLOC_OPTION_VERBOSE]) sm_options_print();
  sm_stats_open_fd();
}

/* The options in effect, and what the library was built to check on its
 * fast paths (configure --enable-checks) and whether it is the secure
 * build: which library a program runs is not in its environment. */
void sm_options_print(void) {
  bool any = SM_CHECK_FREE_LIST || SM_CHECK_DOUBLE_FREE || SM_CHECK_BLOCK_START;
  sm_message("build: checks%s%s%s%s%s", SM_CHECK_FREE_LIST ? " free-list" : "",
             SM_CHECK_DOUBLE_FREE ? " double-free" : "", SM_CHECK_BLOCK_START ? " block-start" : "",
             any ? "" : " none", SM_CANARY ? "; secure" : "");
  for (int i = 0; i < SMALLOC_OPTION_COUNT; i++) {
    long v = __atomic_load_n(&sm_options[i], __ATOMIC_RELAXED);
    if (sm_option_desc[i].words) sm_message("option %s=%s", sm_option_desc[i].env, sm_option_desc[i].words[v]);
    else sm_message("option %s=%ld", sm_option_desc[i].env, v);
  }
}

/* The options in effect as JSON members: "SMALLOC_X": value (a string for
 * the options that have words). */
void sm_options_print_json(FILE *out) {
  for (int i = 0; i < SMALLOC_OPTION_COUNT; i++) {
    long v = __atomic_load_n(&sm_options[i], __ATOMIC_RELAXED);
    const char *sep = i ? ", " : "";
    if (sm_option_desc[i].words) fprintf(out, "%s\"%s\": \"%s\"", sep, sm_option_desc[i].env, sm_option_desc[i].words[v]);
    else fprintf(out, "%s\"%s\": %ld", sep, sm_option_desc[i].env, v);
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
  if (option == SMALLOC_OPTION_BACKGROUND && value == 0) sm_background_stop();   /* returns once it has */
  if (option == SMALLOC_OPTION_PURGE_DELAY) sm_purge_delay_reset();
  return 0;
}
