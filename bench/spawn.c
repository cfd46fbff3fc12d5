/* Launcher used by run.py for every measured process.
 *
 *   bench_spawn -o REPORT [-e NAME=VALUE]... [-i STDIN] -- PROG ARGS...
 *
 * Linux keeps a process's peak RSS across exec, and a child forked from the
 * runner starts with the runner's RSS as its peak; so getrusage() in a
 * benchmark (or wait4() in the runner) would report at least the runner's
 * size.  This small program forks the benchmark instead, so the inherited
 * peak is this launcher's (about 1 MB), sets the allocator's environment
 * (LD_PRELOAD, SMALLOC_*) in the child only, and writes
 *   wall_s=<seconds from fork to exit> maxrss_kb=<child peak RSS> status=<exit code | -signal>
 * to REPORT.  Its own exit status is 0 unless it could not run the child.
 */
#include "common.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

int main(int argc, char **argv)
{
  const char *report_path = NULL, *stdin_path = NULL;
  int i = 1;
  for (; i < argc; i++) {
    if (strcmp(argv[i], "--") == 0) {
      i++;
      break;
    }
    if (i + 1 >= argc)
      usage_exit("bench_spawn -o REPORT [-e NAME=VALUE]... [-i STDIN] -- PROG ARGS...");
    if (strcmp(argv[i], "-o") == 0)
      report_path = argv[++i];
    else if (strcmp(argv[i], "-i") == 0)
      stdin_path = argv[++i];
    else if (strcmp(argv[i], "-e") == 0)
      i++; /* applied in the child */
    else
      usage_exit("bench_spawn -o REPORT [-e NAME=VALUE]... [-i STDIN] -- PROG ARGS...");
  }
  if (report_path == NULL || i >= argc)
    usage_exit("bench_spawn -o REPORT [-e NAME=VALUE]... [-i STDIN] -- PROG ARGS...");
  char **child_argv = argv + i;

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
  while (wait4(pid, &status, 0, &ru) < 0)
    if (errno != EINTR) {
      perror("bench_spawn: wait4");
      return 2;
    }
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
