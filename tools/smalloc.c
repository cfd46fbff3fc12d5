/* smalloc(1): run a program on smalloc, and read its statistics.
 *
 *   smalloc run [--lib PATH] PROG [ARGS...]
 *   smalloc stats [--lib PATH] [--top] [--json] [-o FILE] PROG [ARGS...]
 *   smalloc version
 *
 * run puts the library first in LD_PRELOAD and executes the program.
 * stats runs it with every process of its tree writing a JSON report at
 * exit into a private directory (SMALLOC_STATS=json,
 * SMALLOC_STATS_FILE=DIR/%p), then prints one table: the sum over the
 * tree, or the top process's alone (--top), on stderr or into FILE.  The tables and the JSON
 * reading are the library's own (stats.c): this program is linked with
 * its objects, and allocates through them.  The exit status is the
 * program's (128 + the signal's number when a signal ended it; 127 when
 * it could not be run). */
#include "internal.h"

#include <dirent.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef SMALLOC_LIBPATH
#define SMALLOC_LIBPATH "libsmalloc.so.0"
#endif

static void usage(FILE *out) {
  fprintf(out, "usage: smalloc run [--lib PATH] PROG [ARGS...]\n"
               "       smalloc stats [--lib PATH] [--top] [--json] [-o FILE] PROG [ARGS...]\n"
               "       smalloc version\n");
}

/* LD_PRELOAD with lib first (the variable's other entries kept). */
static int set_preload(const char *lib) {
  const char *old = getenv("LD_PRELOAD");
  size_t n = strlen(lib) + (old ? strlen(old) : 0) + 2;
  char *v = malloc(n);
  if (v == NULL) return -1;
  if (old && *old) snprintf(v, n, "%s:%s", lib, old);
  else snprintf(v, n, "%s", lib);
  int rc = setenv("LD_PRELOAD", v, 1);
  free(v);
  return rc;
}

static int exit_status(int status) {
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return 1;
}

/* The whole of a small file, NUL-terminated (NULL when unreadable). */
static char *slurp(const char *path) {
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return NULL;
  size_t cap = 1 << 16, len = 0;
  char *buf = malloc(cap);
  for (ssize_t n; buf != NULL; len += (size_t)n) {
    if (len + 1 == cap) {
      char *more = realloc(buf, cap *= 2);
      if (more == NULL) { free(buf); buf = NULL; break; }
      buf = more;
    }
    n = read(fd, buf + len, cap - 1 - len);
    if (n <= 0) break;
  }
  close(fd);
  if (buf) buf[len] = '\0';
  return buf;
}

/* Run argv with the reports going to dir; returns the exit status. */
static int run_reporting(char **argv, const char *dir, pid_t *top) {
  char file[4200];
  snprintf(file, sizeof file, "%s/%%p", dir);
  if (setenv("SMALLOC_STATS", "json", 1) != 0 || setenv("SMALLOC_STATS_FILE", file, 1) != 0) {
    perror("smalloc: setenv");
    return 127;
  }
  fflush(NULL);
  pid_t pid = fork();
  if (pid < 0) {
    perror("smalloc: fork");
    return 127;
  }
  if (pid == 0) {
    execvp(argv[0], argv);
    fprintf(stderr, "smalloc: cannot run %s: %s\n", argv[0], strerror(errno));
    _exit(127);
  }
  *top = pid;
  int status;
  while (waitpid(pid, &status, 0) < 0) {
    if (errno != EINTR) {
      perror("smalloc: waitpid");
      return 127;
    }
  }
  return exit_status(status);
}

/* Read the reports in dir (removing them) and print the sum, or the top
 * process's alone.  Returns the number of reports read. */
static int report(const char *dir, pid_t top, bool top_only, bool json, const char *prog, FILE *out) {
  static smalloc_stats_t sum, one;
  memset(&sum, 0, sizeof sum);
  sum.size = sizeof sum;
  uint64_t resident = 0;
  char program[64] = "";
  int n = 0;
  DIR *d = opendir(dir);
  if (d == NULL) return 0;
  for (struct dirent *e; (e = readdir(d)) != NULL;) {
    if (e->d_name[0] == '.') continue;
    char path[4400];
    snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
    char *text = slurp(path);
    unlink(path);
    if (text == NULL) continue;
    bool is_top = strtol(e->d_name, NULL, 10) == (long)top;
    char name[64];
    uint64_t res;
    if (sm_stats_parse_json(text, &one, name, sizeof name, &res) && (!top_only || is_top)) {
      if (json && (top_only || is_top)) fputs(text, out);
      sm_stats_sum(&sum, &one);
      resident += res;
      n++;
      if (is_top) snprintf(program, sizeof program, "%s", name);
    }
    free(text);
  }
  closedir(d);
  if (json || n == 0) return n;
  char who[160];
  if (program[0] == '\0') snprintf(program, sizeof program, "%s", prog);
  if (top_only)
    snprintf(who, sizeof who, "%s (pid %ld)", program, (long)top);
  else
    snprintf(who, sizeof who, "%s and the processes it started (%d report%s, summed)", program, n,
             n == 1 ? "" : "s");
  sum.version = SMALLOC_STATS_VERSION;
  sm_stats_format(&sum, who, resident,
                  top_only ? "the process, at its exit" : "each process at its exit, summed", out);
  return n;
}

int main(int argc, char **argv) {
  /* this program's own allocations are not the report */
  smalloc_option_set(SMALLOC_OPTION_STATS, 0);
  if (argc < 2) {
    usage(stderr);
    return 2;
  }
  const char *cmd = argv[1];
  if (strcmp(cmd, "version") == 0 || strcmp(cmd, "--version") == 0) {
    printf("smalloc %d.%d.%d\n", SMALLOC_VERSION_MAJOR, SMALLOC_VERSION_MINOR, SMALLOC_VERSION_PATCH);
    return 0;
  }
  if (strcmp(cmd, "help") == 0 || strcmp(cmd, "--help") == 0 || strcmp(cmd, "-h") == 0) {
    usage(stdout);
    return 0;
  }
  bool run = strcmp(cmd, "run") == 0, stats = strcmp(cmd, "stats") == 0;
  if (!run && !stats) {
    fprintf(stderr, "smalloc: unknown command '%s'\n", cmd);
    usage(stderr);
    return 2;
  }
  const char *lib = SMALLOC_LIBPATH;
  bool top_only = false, json = false;
  const char *output = NULL;
  int i = 2;
  for (; i < argc && argv[i][0] == '-'; i++) {
    if (strcmp(argv[i], "--") == 0) { i++; break; }
    if (strcmp(argv[i], "--lib") == 0 && i + 1 < argc) lib = argv[++i];
    else if (strncmp(argv[i], "--lib=", 6) == 0) lib = argv[i] + 6;
    else if (stats && strcmp(argv[i], "--top") == 0) top_only = true;
    else if (stats && strcmp(argv[i], "--json") == 0) json = true;
    else if (stats && strcmp(argv[i], "-o") == 0 && i + 1 < argc) output = argv[++i];
    else {
      fprintf(stderr, "smalloc: unknown option '%s'\n", argv[i]);
      usage(stderr);
      return 2;
    }
  }
  if (i >= argc) {
    fprintf(stderr, "smalloc: no program to run\n");
    usage(stderr);
    return 2;
  }
  if (set_preload(lib) != 0) {
    perror("smalloc: setenv");
    return 127;
  }
  if (run) {
    execvp(argv[i], argv + i);
    fprintf(stderr, "smalloc: cannot run %s: %s\n", argv[i], strerror(errno));
    return 127;
  }
  FILE *out = stderr;
  if (stats && output && (out = fopen(output, "w")) == NULL) {
    fprintf(stderr, "smalloc: cannot write %s: %s\n", output, strerror(errno));
    return 2;
  }
  char dir[4096];
  const char *tmp = getenv("TMPDIR");
  snprintf(dir, sizeof dir, "%s/smalloc-stats.XXXXXX", tmp && *tmp ? tmp : "/tmp");
  if (mkdtemp(dir) == NULL) {
    fprintf(stderr, "smalloc: cannot make a directory for the reports: %s\n", strerror(errno));
    return 127;
  }
  pid_t top = 0;
  int rc = run_reporting(argv + i, dir, &top);
  int n = report(dir, top, top_only, json, argv[i], out);
  rmdir(dir);
  if (out != stderr && fclose(out) != 0) {
    fprintf(stderr, "smalloc: writing %s: %s\n", output, strerror(errno));
    if (rc == 0) rc = 1;
  }
  if (n == 0 && rc != 127)
    fprintf(stderr, "smalloc: no report from %s%s: a process reports when it exits normally on %s "
            "(not by a signal or _exit, and not a static or set-user-ID program)\n",
            argv[i], top_only ? " itself" : " or the processes it started", lib);
  return rc;
}
