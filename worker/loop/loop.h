/*
 * loop.h - `pgrunner work`: run the worker until SIGTERM/SIGINT.
 *
 * Thread: called on the main thread, which becomes the loop thread for the
 * duration of the call (pgr_mark_loop_thread), then joins the workers.
 */
#ifndef PGR_LOOP_H
#define PGR_LOOP_H

#include "config.h"

/* Returns the process exit code: 0 clean shutdown, 1 runtime failure, 2 bad
   configuration (the reason already printed). */
int pgr_loop_run(const struct pgr_config *cfg);

#endif /* PGR_LOOP_H */
