// SPDX-License-Identifier: MIT
/*
 * A device timeline without nsys: LD_PRELOAD=libkvt_cupti_trace.so, and every kernel,
 * copy and memset the process (and the processes it starts) puts on the GPU is
 * written, as CUPTI's activity records give them, to $KVT_TRACE_DIR/trace.<pid>.txt:
 *
 *   K|C|S start_ns end_ns stream bytes name
 *
 * (kernel, copy, memset; bytes 0 for kernels, name "-" for the others; the copy's
 * kind after its name). tools/trace_steps.py reads them. The GPU machine builds it
 * (tools/gpu-bench.sh trace), against its toolkit's CUPTI; KREC, MREC and SREC name
 * the newest record structures that toolkit has.
 */
#include <cupti.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define BUF_BYTES (16u << 20)

static FILE *out;

static void CUPTIAPI buf_req(uint8_t **buf, size_t *size, size_t *max_records)
{
	*buf = aligned_alloc(ACTIVITY_RECORD_ALIGNMENT, BUF_BYTES);
	*size = *buf ? BUF_BYTES : 0;
	*max_records = 0;
}

static void CUPTIAPI buf_done(CUcontext ctx, uint32_t stream, uint8_t *buf, size_t size,
			      size_t valid)
{
	(void)ctx;
	(void)stream;
	(void)size;
	CUpti_Activity *rec = NULL;
	while (out && cuptiActivityGetNextRecord(buf, valid, &rec) == CUPTI_SUCCESS) {
		switch (rec->kind) {
		case CUPTI_ACTIVITY_KIND_KERNEL:
		case CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL: {
			const KREC *k = (const KREC *)rec;
			fprintf(out, "K %llu %llu %u 0 %s\n", (unsigned long long)k->start,
				(unsigned long long)k->end, k->streamId, k->name);
			break;
		}
		case CUPTI_ACTIVITY_KIND_MEMCPY: {
			const MREC *m = (const MREC *)rec;
			fprintf(out, "C %llu %llu %u %llu - %u\n", (unsigned long long)m->start,
				(unsigned long long)m->end, m->streamId,
				(unsigned long long)m->bytes, (unsigned)m->copyKind);
			break;
		}
		case CUPTI_ACTIVITY_KIND_MEMSET: {
			const SREC *m = (const SREC *)rec;
			fprintf(out, "S %llu %llu %u %llu -\n", (unsigned long long)m->start,
				(unsigned long long)m->end, m->streamId, (unsigned long long)m->bytes);
			break;
		}
		default:
			break;
		}
	}
	free(buf);
}

__attribute__((constructor)) static void trace_init(void)
{
	const char *dir = getenv("KVT_TRACE_DIR");
	char path[4096];
	snprintf(path, sizeof(path), "%s/trace.%d.txt", dir ? dir : ".", (int)getpid());
	if (!(out = fopen(path, "w")))
		return;
	if (cuptiActivityRegisterCallbacks(buf_req, buf_done) != CUPTI_SUCCESS ||
	    cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL) != CUPTI_SUCCESS ||
	    cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMCPY) != CUPTI_SUCCESS ||
	    cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMSET) != CUPTI_SUCCESS)
		fprintf(stderr, "kvt_cupti_trace: CUPTI would not trace pid %d\n", (int)getpid());
	cuptiActivityFlushPeriod(200); /* a process killed later keeps most of its records */
}

__attribute__((destructor)) static void trace_fini(void)
{
	if (!out)
		return;
	cuptiActivityFlushAll(1);
	fclose(out);
	out = NULL;
}
