/* SPDX-License-Identifier: MIT */
#ifndef KVT_LOG_H
#define KVT_LOG_H

/*
 * Logging to stderr in a journald-friendly form: "<N>subsystem: message", where
 * <N> is the syslog priority that journald reads off the line's start.
 * Thread-safe (one write(2) per line).
 */

#ifdef __cplusplus
extern "C" {
#endif

enum kvt_log_level {
	KVT_LOG_ERR = 3,
	KVT_LOG_WARN = 4,
	KVT_LOG_NOTICE = 5,
	KVT_LOG_INFO = 6,
	KVT_LOG_DEBUG = 7,
};

void kvt_log_set_level(enum kvt_log_level lvl);
enum kvt_log_level kvt_log_get_level(void);
void kvt_log(enum kvt_log_level lvl, const char *sys, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

#define kvt_err(sys, ...)    kvt_log(KVT_LOG_ERR, sys, __VA_ARGS__)
#define kvt_warn(sys, ...)   kvt_log(KVT_LOG_WARN, sys, __VA_ARGS__)
#define kvt_notice(sys, ...) kvt_log(KVT_LOG_NOTICE, sys, __VA_ARGS__)
#define kvt_info(sys, ...)   kvt_log(KVT_LOG_INFO, sys, __VA_ARGS__)
#define kvt_debug(sys, ...)  kvt_log(KVT_LOG_DEBUG, sys, __VA_ARGS__)

#ifdef __cplusplus
}
#endif

#endif
