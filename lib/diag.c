/* Diagnostics: one printer that formats into a stack buffer and writes it
 * with write(2), so it never allocates and is safe inside malloc. */
#include "internal.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#define SM_WARN_CAP 32   /* repeated errors in warn mode are capped */

static void sm_vprint(const char *fmt, va_list ap) {
  char buf[512];
  int saved = errno;
  memcpy(buf, "smalloc: ", 9);
  int n = vsnprintf(buf + 9, sizeof buf - 10, fmt, ap);
  if (n < 0) n = 0;
  size_t len = 9 + ((size_t)n < sizeof buf - 10 ? (size_t)n : sizeof buf - 11);
  buf[len++] = '\n';
  const char *p = buf;
  int cancel;   /* a message is written whole, even by a thread being cancelled */
  pthread_setcancelstate(PTHREAD_CANCEL_DISABLE, &cancel);
  while (len > 0) {
    ssize_t w = write(STDERR_FILENO, p, len);
    if (w <= 0) break;
    p += w;
    len -= (size_t)w;
  }
  pthread_setcancelstate(cancel, NULL);
  errno = saved;
}

void sm_message(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  sm_vprint(fmt, ap);
  va_end(ap);
}

bool sm_errors_seen(void) {
  return atomic_load_explicit(&sm_gstats.errors_reported, memory_order_relaxed) != 0;
}

/* A heap misuse: report, then abort unless SMALLOC_ON_ERROR=warn, in which
 * case the caller leaks the block and goes on. */
void sm_error(const char *fmt, ...) {
  uint64_t n = sm_gadd(errors_reported, 1);
  bool warn = sm_opt(ON_ERROR) == 1;
  if (!warn || n < SM_WARN_CAP) {
    va_list ap;
    va_start(ap, fmt);
    sm_vprint(fmt, ap);
    va_end(ap);
  }
  if (!warn) {
    sm_message("aborting (set SMALLOC_ON_ERROR=warn to report and continue)");
    abort();
  }
  if (n + 1 == SM_WARN_CAP) sm_message("further heap errors are not reported");
}

void sm_assert_fail(const char *expr, const char *file, int line) {
  sm_message("internal assertion failed: %s (%s:%d)", expr, file, line);
  abort();
}

void sm_path_expand(const char *pattern, char *out, size_t cap) {
  size_t len = 0;
  for (const char *s = pattern; *s && len + 24 < cap; s++) {
    if (s[0] == '%' && s[1] == 'p') {
      len += (size_t)snprintf(out + len, cap - len, "%ld", (long)getpid());
      s++;
    } else if (s[0] == '%' && s[1] == '%') {
      out[len++] = '%';
      s++;
    } else {
      out[len++] = *s;
    }
  }
  out[len] = '\0';
}
