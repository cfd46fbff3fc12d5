/* Real programs on top of a preloaded smalloc: Python and sort(1) give the
 * same output as without it, and smalloc's exit statistics show it served
 * their allocations.
 *
 * make check sets SMALLOC_LIB (the built libsmalloc.so.0) and top_srcdir.
 * A missing program or library is reported as skipped, not failed. */
#include "common.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/wait.h>

static char tmpdir[256];

/* The directory holds plain files only. */
static void remove_tmpdir(void)
{
  DIR *d = opendir(tmpdir);
  struct dirent *e;
  char path[1024];
  while (d && (e = readdir(d)) != NULL) {
    if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
      continue;
    snprintf(path, sizeof path, "%s/%s", tmpdir, e->d_name);
    unlink(path);
  }
  if (d)
    closedir(d);
  if (rmdir(tmpdir) != 0)
    fprintf(stderr, "could not remove %s: %s\n", tmpdir, strerror(errno));
}

/* Made and removed by main(), around the tests: a failing test ends its
 * process at once. */
static int make_tmpdir(void)
{
  const char *t = getenv("TMPDIR");
  snprintf(tmpdir, sizeof tmpdir, "%s/smalloc-override-XXXXXX", t && *t ? t : "/tmp");
  if (mkdtemp(tmpdir) == NULL) {
    fprintf(stderr, "mkdtemp(%s): %s\n", tmpdir, strerror(errno));
    return -1;
  }
  return 0;
}

static const char *tmp_path(const char *name)
{
  static char buf[64][512];
  static unsigned next;
  ck_assert_uint_lt(next, 64);
  char *p = buf[next++];
  snprintf(p, sizeof buf[0], "%s/%s", tmpdir, name);
  return p;
}

/* The preloadable library, or NULL (and a "skipped" line) when there is none. */
static const char *preload_lib(void)
{
#ifndef SM_OVERRIDE
  printf("skipped: library built with --disable-override\n");
  return NULL;
#else
  const char *lib = getenv("SMALLOC_LIB");
  if (!lib || access(lib, R_OK) != 0) {
    printf("skipped: SMALLOC_LIB not set or unreadable (run through make check)\n");
    return NULL;
  }
  return lib;
#endif
}

static bool in_path(const char *prog)
{
  const char *path = getenv("PATH");
  char buf[4096];
  if (!path)
    path = "/usr/bin:/bin";
  while (*path) {
    size_t len = strcspn(path, ":");
    snprintf(buf, sizeof buf, "%.*s/%s", (int)len, path, prog);
    if (len > 0 && access(buf, X_OK) == 0)
      return true;
    path += len + (path[len] == ':');
  }
  return false;
}

typedef struct run {
  const char *const *argv;
  const char *preload;     /* LD_PRELOAD value, NULL for none */
  const char *const *env;  /* extra NAME=value settings, NULL-terminated */
  const char *in, *out, *err;
} run_t;

static int redirect(const char *path, int fd, int flags)
{
  int f = open(path, flags, 0600);
  if (f < 0 || dup2(f, fd) < 0)
    return -1;
  close(f);
  return 0;
}

/* Runs a program to completion; returns its wait status. */
static int run_program(const run_t *r)
{
  fflush(NULL);
  pid_t pid = fork();
  ck_assert_int_ge(pid, 0);
  if (pid == 0) {
    unsetenv("LD_PRELOAD");
    unsetenv("SMALLOC_STATS");
    unsetenv("SMALLOC_VERBOSE");
    if (r->preload)
      setenv("LD_PRELOAD", r->preload, 1);
    for (const char *const *e = r->env; e && *e; e++)
      putenv((char *)*e);
    setenv("LC_ALL", "C", 1);
    if ((r->in && redirect(r->in, 0, O_RDONLY) < 0) ||
        (r->out && redirect(r->out, 1, O_WRONLY | O_CREAT | O_TRUNC) < 0) ||
        (r->err && redirect(r->err, 2, O_WRONLY | O_CREAT | O_TRUNC) < 0))
      _exit(126);
    execvp(r->argv[0], (char *const *)r->argv);
    _exit(127);
  }
  int status;
  ck_assert_int_eq(waitpid(pid, &status, 0), pid);
  return status;
}

static void expect_success(int status, const char *what, const char *errfile)
{
  if (WIFEXITED(status) && WEXITSTATUS(status) == 0)
    return;
  char msg[512] = "";
  FILE *f = errfile ? fopen(errfile, "r") : NULL;
  if (f) {
    size_t n = fread(msg, 1, sizeof msg - 1, f);
    msg[n] = '\0';
    fclose(f);
  }
  if (WIFSIGNALED(status))
    ck_abort_msg("%s: killed by signal %d; stderr: %s", what, WTERMSIG(status), msg);
  ck_abort_msg("%s: exit status %d; stderr: %s", what, WEXITSTATUS(status), msg);
}

static char *slurp(const char *path, size_t *len)
{
  FILE *f = fopen(path, "rb");
  ck_assert_msg(f != NULL, "open %s: %s", path, strerror(errno));
  struct stat st;
  ck_assert_int_eq(fstat(fileno(f), &st), 0);
  char *buf = malloc((size_t)st.st_size + 1);
  ck_assert_ptr_nonnull(buf);
  size_t n = fread(buf, 1, (size_t)st.st_size, f);
  fclose(f);
  ck_assert_uint_eq(n, (size_t)st.st_size);
  buf[n] = '\0';
  *len = n;
  return buf;
}

static void expect_same_file(const char *a, const char *b)
{
  size_t la, lb;
  char *x = slurp(a, &la), *y = slurp(b, &lb);
  ck_assert_uint_gt(la, 0);
  ck_assert_msg(la == lb && memcmp(x, y, la) == 0,
                "%s (%zu bytes) and %s (%zu bytes) differ", a, la, b, lb);
  free(x);
  free(y);
}

/* The largest "calls_malloc" value in the JSON stats of a stderr file (a
 * wrapper script's processes print their own), or 0. */
static unsigned long long json_calls_malloc(const char *errfile)
{
  size_t len;
  char *s = slurp(errfile, &len);
  unsigned long long best = 0;
  for (char *p = s; (p = strstr(p, "\"calls_malloc\"")) != NULL;) {
    p += strlen("\"calls_malloc\"");
    p += strspn(p, " \t:");
    unsigned long long v = strtoull(p, &p, 10);
    if (v > best)
      best = v;
  }
  free(s);
  return best;
}

/* Whether some line of the file starts with "smalloc" (the stats table). */
static bool has_table(const char *errfile)
{
  size_t len;
  char *s = slurp(errfile, &len);
  bool found = strncmp(s, "smalloc", 7) == 0;
  for (char *p = s; !found && (p = strchr(p, '\n')) != NULL; p++)
    found = strncmp(p + 1, "smalloc", 7) == 0;
  free(s);
  return found;
}

/* ---- Python ---------------------------------------------------------------------------- */

static const char *script_path(void)
{
  static char buf[1024];
  const char *src = getenv("top_srcdir");
  snprintf(buf, sizeof buf, "%s/tests/override-alloc.py", src ? src : "..");
  return buf;
}

static bool python_ready(void)
{
  if (!in_path("python3")) {
    printf("skipped: python3 not installed\n");
    return false;
  }
  if (access(script_path(), R_OK) != 0) {
    printf("skipped: %s not found (set top_srcdir)\n", script_path());
    return false;
  }
  return true;
}

START_TEST(python_output_unchanged)
{
  const char *lib = preload_lib();
  if (!lib || !python_ready())
    return;
  const char *argv[] = {"python3", script_path(), NULL};
  const char *pymalloc_off[] = {"PYTHONMALLOC=malloc", NULL};
  run_t r = {argv, NULL, NULL, NULL, tmp_path("plain.out"), tmp_path("plain.err")};
  expect_success(run_program(&r), "python3 without smalloc", r.err);

  run_t p = {argv, lib, NULL, NULL, tmp_path("pre.out"), tmp_path("pre.err")};
  expect_success(run_program(&p), "python3 with smalloc", p.err);
  expect_same_file(r.out, p.out);

  /* every object through malloc, not only those pymalloc passes on */
  run_t m = {argv, lib, pymalloc_off, NULL, tmp_path("mal.out"), tmp_path("mal.err")};
  expect_success(run_program(&m), "python3 with smalloc and PYTHONMALLOC=malloc", m.err);
  expect_same_file(r.out, m.out);
}
END_TEST

START_TEST(python_served_by_smalloc)
{
  const char *lib = preload_lib();
  if (!lib || !python_ready())
    return;
  const char *argv[] = {"python3", script_path(), "2", NULL};
  const char *json_env[] = {"PYTHONMALLOC=malloc", "SMALLOC_STATS=json", NULL};
  run_t j = {argv, lib, json_env, NULL, tmp_path("json.out"), tmp_path("json.err")};
  expect_success(run_program(&j), "python3 with SMALLOC_STATS=json", j.err);
  unsigned long long calls = json_calls_malloc(j.err);
  ck_assert_msg(calls >= 10000, "python3 made %llu malloc calls through smalloc", calls);

  const char *table_env[] = {"SMALLOC_STATS=1", NULL};
  run_t t = {argv, lib, table_env, NULL, tmp_path("table.out"), tmp_path("table.err")};
  expect_success(run_program(&t), "python3 with SMALLOC_STATS=1", t.err);
  ck_assert_msg(has_table(t.err), "no line starting with 'smalloc' on stderr");
}
END_TEST

/* ---- sort(1) --------------------------------------------------------------------------- */

static void write_lines(const char *path, unsigned n)
{
  static const char *const words[] = {
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel",
    "india", "juliet", "kilo", "lima", "mike", "november", "oscar", "papa",
  };
  FILE *f = fopen(path, "w");
  ck_assert_ptr_nonnull(f);
  sm_rng_t r;
  sm_rng_seed(&r, 2024);
  for (unsigned i = 0; i < n; i++) {
    unsigned nw = 1 + (unsigned)sm_rng_below(&r, 6);
    for (unsigned w = 0; w < nw; w++)
      fprintf(f, "%s%s", w ? " " : "", words[sm_rng_below(&r, 16)]);
    fprintf(f, " %llu\n", (unsigned long long)(sm_rng_next(&r) % 1000000007u));
  }
  ck_assert_int_eq(fclose(f), 0);
}

START_TEST(sort_output_unchanged)
{
  const char *lib = preload_lib();
  if (!lib)
    return;
  if (!in_path("sort")) {
    printf("skipped: sort not installed\n");
    return;
  }
  const char *in = tmp_path("lines.txt");
  write_lines(in, 200000);
  const char *argv[] = {"sort", NULL};
  run_t r = {argv, NULL, NULL, in, tmp_path("plain.out"), tmp_path("plain.err")};
  expect_success(run_program(&r), "sort without smalloc", r.err);
  run_t p = {argv, lib, NULL, in, tmp_path("pre.out"), tmp_path("pre.err")};
  expect_success(run_program(&p), "sort with smalloc", p.err);
  expect_same_file(r.out, p.out);

  /* numeric keys, several threads, a small buffer (merges through temporary
   * files), with statistics */
  const char *argv2[] = {"sort", "-k", "2,2", "-n", "-s", "--parallel=4", "-S", "2M",
                         "-T", tmpdir, NULL};
  const char *json_env[] = {"SMALLOC_STATS=json", NULL};
  run_t q = {argv2, NULL, NULL, in, tmp_path("plain2.out"), tmp_path("plain2.err")};
  expect_success(run_program(&q), "sort -n without smalloc", q.err);
  run_t s = {argv2, lib, json_env, in, tmp_path("pre2.out"), tmp_path("pre2.err")};
  expect_success(run_program(&s), "sort -n with smalloc", s.err);
  expect_same_file(q.out, s.out);
  unsigned long long calls = json_calls_malloc(s.err);
  ck_assert_msg(calls >= 100, "sort made %llu malloc calls through smalloc", calls);
}
END_TEST

int main(void)
{
  Suite *s = suite_create("override");
  TCase *tc = sm_tcase("programs", 120);
  tcase_add_test(tc, python_output_unchanged);
  tcase_add_test(tc, python_served_by_smalloc);
  tcase_add_test(tc, sort_output_unchanged);
  suite_add_tcase(s, tc);
  if (make_tmpdir() != 0)
    return EXIT_FAILURE;
  int rc = sm_run_suite(s);
  remove_tmpdir();
  return rc;
}
