/* USDT tracepoints: a NOP instruction and an ELF note each, so tracers
 * (bpftrace, perf, SystemTap) can count the allocator's slow work by the
 * stack that caused it while the program runs at full speed.  Only slow
 * paths have them.  smalloc(7), TRACEPOINTS, lists every probe and its
 * arguments; tests/probes.sh checks the list against the built library.
 * Without <sys/sdt.h> (systemtap-sdt-dev) they compile to nothing. */
#ifndef SMALLOC_PROBES_H
#define SMALLOC_PROBES_H

#ifdef HAVE_SYS_SDT_H
#define SDT_USE_VARIADIC 1
#include <sys/sdt.h>
#define SM_PROBE(name, ...) STAP_PROBEV(smalloc, name, __VA_ARGS__)
#else
/* nothing, but the arguments count as used (sizeof does not evaluate) */
char sm_probe_args(int, ...);
#define SM_PROBE(name, ...) ((void)sizeof(sm_probe_args(0, __VA_ARGS__)))
#endif

#endif
