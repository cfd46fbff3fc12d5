/* Launcher used by run.py for every measured process.
 *
 *   bench_spawn -o REPORT [-p MIB] [-e NAME=VALUE]... [-i STDIN] -- PROG ARGS...
 *
 * Linux keeps a process's peak RSS across exec, and a child forked from the
 * runner starts with the runner's RSS as its peak; so getrusage() in a
 * benchmark (or wait4() in the runner) would report at least the runner's
 * size.  This small program forks the benchmark instead, so the inherited
 * peak is this launcher's (about 1 MB), sets the allocator's environment
 * (LD_PRELOAD, SMALLOC_*) in the child only, and writes
 *   wall_s=<seconds from fork to exit> maxrss_kb=<child peak RSS> status=<exit code | -signal>
 * to REPORT.  Its own exit status is 0 unless it could not run the child.
 *
 * -p MIB first runs a settle step: a short-lived child maps MIB MiB,
 * advises huge pages, writes every page and exits.  On a virtual machine
 * whose kernel reports free pages to the host (virtio-balloon free page
 * reporting), a process that faults in much memory right after one that
 * used 4 KiB pages runs several times slower than one that starts after a
 * huge-page user (bench_large under smalloc: 0.3 s against 0.065 s), so
 * the place an allocator gets in a round decided its time.  After the
 * settle step every benchmark starts from the same state: memory just
 * freed in 2 MiB pieces.  The step runs before the timer and in its own
 * process, so neither the time nor the peak RSS reported includes it.
 */
#include "common.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#define USAGE "bench_spawn -o REPORT [-p MIB] [-e NAME=VALUE]... [-i STDIN] -- PROG ARGS..."

/* Wait for pid (its resource use in *ru unless NULL); 0, or -1 when
 * wait4 fails. */
static int wait_child(pid_t pid, int *status, struct rusage *ru)
{
  while (wait4(pid, status, 0, ru) < 0)
    if (errno != EINTR) {
      perror("bench_spawn: wait4");
      return -1;
    }
  return 0;
}

/* The settle step of -p: see the top of this file. */
static int settle(size_t mib)
{
  pid_t pid = fork();
  if (pid < 0) {
    perror("bench_spawn: fork");
    return -1;
  }
  if (pid == 0) {
    size_t len = mib << 20, huge = (size_t)2 << 20;
    char *p = mmap(NULL, len + huge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
      _exit(1);
    char *q = (char *)(((uintptr_t)p + huge - 1) & ~(uintptr_t)(huge - 1));
    madvise(q, len, MADV_HUGEPAGE);
    for (size_t off = 0; off < len; off += 4096)
      ((volatile char *)q)[off] = 1;
    _exit(0);
  }
  int status;
  if (wait_child(pid, &status, NULL) < 0)
    return -1;
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    fprintf(stderr, "bench_spawn: settle step of %zu MiB failed\n", mib);
    return -1;
  }
  return 0;
}

int main(int argc, char **argv)
{
  size_t settle_mib = 0;
  const char *report_path = NULL, *stdin_path = NULL;
  int i = 1;
  for (; i < argc; i++) {
    if (strcmp(argv[i], "--") == 0) {
      i++;
      break;
    }
    if (i + 1 >= argc)
      usage_exit(USAGE);
    if (strcmp(argv[i], "-o") == 0)
      report_path = argv[++i];
    else if (strcmp(argv[i], "-p") == 0) {
      char *end;
      unsigned long v = strtoul(argv[++i], &end, 10);
      if (*end != '\0' || end == argv[i] || v > ((size_t)1 << 20))
        usage_exit(USAGE);
      settle_mib = v;
    }
    else if (strcmp(argv[i], "-i") == 0)
      stdin_path = argv[++i];
    else if (strcmp(argv[i], "-e") == 0)
      i++; /* applied in the child */
    else
      usage_exit(USAGE);
  }
  if (report_path == NULL || i >= argc)
    usage_exit(USAGE);
  char **child_argv = argv + i;
  if (settle_mib > 0 && settle(settle_mib) < 0)
    return 2;

  double t0 = now_s();
  pid_t pid = fork();
  if (pid < 0) {
    perror("bench_spawn: fork");
    return 2;
  }
  if (pid == 0) {
    for (int k = 1; k < i - 1; k++)
      if (strcmp(argv[k], "-e") == 0 && putenv(argv[k + 1]) != 0)
        _exit(126);
    if (stdin_path != NULL) {
      int fd = open(stdin_path, O_RDONLY);
      if (fd < 0 || dup2(fd, 0) < 0) {
        fprintf(stderr, "bench_spawn: %s: %s\n", stdin_path, strerror(errno));
        _exit(126);
      }
      close(fd);
    }
    execvp(child_argv[0], child_argv);
    fprintf(stderr, "bench_spawn: %s: %s\n", child_argv[0], strerror(errno));
    _exit(127);
  }

  int status;
  struct rusage ru;
  if (wait_child(pid, &status, &ru) < 0)
    return 2;
  double t1 = now_s();

  int code = WIFEXITED(status) ? WEXITSTATUS(status) : WIFSIGNALED(status) ? -WTERMSIG(status) : -1;
  FILE *f = fopen(report_path, "w");
  if (f == NULL) {
    perror(report_path);
    return 2;
  }
  fprintf(f, "wall_s=%.6f maxrss_kb=%ld status=%d\n", t1 - t0, ru.ru_maxrss, code);
  return fclose(f) == 0 ? 0 : 2;
}
