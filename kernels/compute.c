// SPDX-License-Identifier: MIT
/* Backend choice, argument checks and the per-layer policy. */
#include <errno.h>
#include <string.h>

#include "kvtier_config.h"
#include "daemon/log.h"
#include "kernels/compute_impl.h"

static const struct kvt_compute_ops *const backends[] = {
#if HAVE_CUDA
	&kvt_compute_cuda_ops,
#endif
	&kvt_compute_cpu_ops,
};

size_t kvt_dtype_size(uint32_t dtype)
{
	switch (dtype) {
	case KVT_F16:
	case KVT_BF16:
		return 2;
	case KVT_F32:
		return 4;
	default:
		return 0;
	}
}

size_t kvt_summary_record_bytes(const struct kvt_geom *g)
{
	return (size_t)(4 + g->reps) * g->head_dim * kvt_dtype_size(g->dtype);
}

size_t kvt_estimate_work_bytes(const struct kvt_geom *g, uint32_t rows, uint32_t max_pages)
{
	return (size_t)rows * kvt_est_chunks(max_pages) * g->group * (g->head_dim + 4) * sizeof(float);
}

int kvt_geom_check(const struct kvt_geom *g)
{
	if (!g || !kvt_dtype_size(g->dtype) || !g->head_dim || g->head_dim > 1024 ||
	    !g->page_tokens || g->page_tokens > 4096 || !g->group || g->group > 256 ||
	    g->reps > g->page_tokens || (g->reps && g->page_tokens % g->reps))
		return -EINVAL;
	return 0;
}

int kvt_compute_open(const char *name, struct kvt_compute **out)
{
	int ret = -ENOENT;
	for (size_t i = 0; i < sizeof(backends) / sizeof(backends[0]); i++) {
		const struct kvt_compute_ops *o = backends[i];
		if (name && strcmp(name, o->name))
			continue;
		if (o->version != KVT_COMPUTE_OPS_VERSION)
			continue;
		ret = o->open(out);
		if (ret == 0) {
			(*out)->ops = o;
			return 0;
		}
		if (name)
			return ret;
	}
	if (name && ret == -ENOENT && !strcmp(name, "cuda"))
		ret = -ENODEV; /* built without CUDA */
	return ret;
}

void kvt_compute_close(struct kvt_compute *c)
{
	if (c)
		c->ops->close(c);
}

const char *kvt_compute_name(const struct kvt_compute *c)
{
	return c->ops->name;
}

int kvt_compute_alloc(struct kvt_compute *c, size_t bytes, void **out)
{
	return c->ops->alloc(c, bytes, out);
}

void kvt_compute_free(struct kvt_compute *c, void *p)
{
	if (p)
		c->ops->free(c, p);
}

int kvt_compute_upload(struct kvt_compute *c, void *dst, const void *src, size_t bytes)
{
	return c->ops->upload(c, dst, src, bytes);
}

int kvt_compute_download(struct kvt_compute *c, void *dst, const void *src, size_t bytes)
{
	return c->ops->download(c, dst, src, bytes);
}

int kvt_compute_memset(struct kvt_compute *c, void *dst, int byte, size_t bytes)
{
	return c->ops->memset(c, dst, byte, bytes);
}

int kvt_compute_copy_async(struct kvt_compute *c, void *dst, const void *src, size_t bytes,
			   void *stream)
{
	return bytes ? c->ops->copy_async(c, dst, src, bytes, stream) : 0;
}

int kvt_compute_put_async(struct kvt_compute *c, void *dst, const void *src, size_t bytes,
			  void *stream)
{
	if ((bytes | (uintptr_t)dst | (uintptr_t)src) % 4 || (bytes && (!dst || !src)))
		return -EINVAL;
	return bytes ? c->ops->put_async(c, dst, src, bytes, stream) : 0;
}

void *kvt_compute_stream(struct kvt_compute *c)
{
	return c->ops->stream ? c->ops->stream(c) : NULL;
}

int kvt_compute_host_alloc(struct kvt_compute *c, size_t bytes, void **out)
{
	return c->ops->host_alloc(c, bytes, out);
}

void kvt_compute_host_free(struct kvt_compute *c, void *p)
{
	if (p)
		c->ops->host_free(c, p);
}

int kvt_check_summarize(const struct kvt_summarize_args *a)
{
	if (!a || kvt_geom_check(&a->g) < 0)
		return -EINVAL;
	if (!a->n)
		return 0;
	if (!a->pool || !a->slots || !a->records || !a->summaries ||
	    a->slot_bytes < 2ull * a->g.page_tokens * a->g.head_dim * kvt_dtype_size(a->g.dtype))
		return -EINVAL;
	return 0;
}

int kvt_check_score(const struct kvt_score_args *a)
{
	if (!a || kvt_geom_check(&a->g) < 0 || a->method >= KVT_SCORE_MAX || a->agg >= KVT_GQA_MAX_)
		return -EINVAL;
	if (a->method == KVT_SCORE_REPS && !a->g.reps)
		return -EINVAL;
	if (!a->rows)
		return 0;
	if (!a->q || !a->summaries || !a->n_pages || !a->scores || !a->stride)
		return -EINVAL;
	return 0;
}

int kvt_check_select(const struct kvt_select_args *a)
{
	if (!a || a->mode >= KVT_SELECT_MAX || !a->page_tokens)
		return -EINVAL;
	if (!a->rows)
		return 0;
	if (!a->stride || !a->n_pages || !a->out || !a->n_out || a->out_stride < a->budget_pages)
		return -EINVAL;
	uint32_t T = a->page_tokens;
	uint64_t forced = (a->sink_tokens + (uint64_t)T - 1) / T + a->window_tokens / T + 1;
	if (a->out_stride < a->stride && a->out_stride < forced)
		return -EINVAL;
	if (a->mode == KVT_SELECT_TOPP && !(a->top_p >= 0.0f && a->top_p <= 1.0f))
		return -EINVAL;
	if (!a->scores && (a->budget_pages < a->stride || a->mode == KVT_SELECT_TOPP))
		return -EINVAL;
	return 0;
}

int kvt_check_attend(const struct kvt_attend_args *a)
{
	if (!a || kvt_geom_check(&a->g) < 0)
		return -EINVAL;
	if (!a->rows)
		return 0;
	if (!a->q || !a->pool || !a->out || !a->n_pages || (!a->table && a->stride) ||
	    (a->tail_slot && !a->tail_len) ||
	    (a->host_pool && a->host_slot_bytes < 2ull * a->g.page_tokens * a->g.head_dim *
						     kvt_dtype_size(a->g.dtype)) ||
	    a->slot_bytes < 2ull * a->g.page_tokens * a->g.head_dim * kvt_dtype_size(a->g.dtype))
		return -EINVAL;
	return 0;
}

int kvt_summarize(struct kvt_compute *c, const struct kvt_summarize_args *a, void *stream)
{
	int ret = kvt_check_summarize(a);
	return ret < 0 ? ret : a->n ? c->ops->summarize(c, a, stream) : 0;
}

int kvt_score(struct kvt_compute *c, const struct kvt_score_args *a, void *stream)
{
	int ret = kvt_check_score(a);
	return ret < 0 ? ret : a->rows ? c->ops->score(c, a, stream) : 0;
}

int kvt_select(struct kvt_compute *c, const struct kvt_select_args *a, void *stream)
{
	int ret = kvt_check_select(a);
	return ret < 0 ? ret : a->rows ? c->ops->select(c, a, stream) : 0;
}

int kvt_attend(struct kvt_compute *c, const struct kvt_attend_args *a, void *stream)
{
	int ret = kvt_check_attend(a);
	return ret < 0 ? ret : a->rows ? c->ops->attend(c, a, stream) : 0;
}

static int check_resolve(const struct kvt_resolve_args *a)
{
	if (!a || (a->rows && (!a->stride || !a->sel || !a->n_sel || !a->map || !a->row_base ||
			       !a->table || !a->n_table || (a->report && !a->ready) || (a->ack && !a->report) ||
			       (a->scores && (!a->n_full || !a->score_stride)))))
		return -EINVAL;
	return 0;
}

int kvt_resolve(struct kvt_compute *c, const struct kvt_resolve_args *a, void *stream)
{
	int ret = check_resolve(a);
	return ret < 0 ? ret : a->rows ? c->ops->resolve(c, a, stream) : 0;
}

int kvt_select_resolve(struct kvt_compute *c, const struct kvt_select_args *s,
		       const struct kvt_resolve_args *r, void *stream)
{
	int ret = kvt_check_select(s);
	if (ret == 0)
		ret = check_resolve(r);
	if (ret < 0 || !s->rows)
		return ret;
	if (r->rows != s->rows || r->stride != s->out_stride || r->sel != s->out ||
	    r->n_sel != s->n_out || s->slot_map)
		return -EINVAL;
	if (c->ops->select_resolve)
		return c->ops->select_resolve(c, s, r, stream);
	ret = c->ops->select(c, s, stream);
	return ret < 0 ? ret : c->ops->resolve(c, r, stream);
}

int kvt_put_rows(struct kvt_compute *c, const struct kvt_put_rows_args *a, void *stream)
{
	if (!a || kvt_geom_check(&a->g) < 0)
		return -EINVAL;
	if (!a->ntok)
		return 0;
	if (!a->heads || !a->k || !a->v || !a->pool ||
	    (!a->nseq && (uint64_t)a->pos0 + a->ntok > a->g.page_tokens) ||
	    a->slot_bytes < 2ull * a->g.page_tokens * a->g.head_dim * kvt_dtype_size(a->g.dtype))
		return -EINVAL;
	if (a->nseq) {
		if (!a->seq_pos || !a->seq_slot0)
			return -EINVAL;
		for (uint32_t i = 0; i < a->nseq; i++)
			if ((uint64_t)a->seq_pos[i] + a->ntok > a->g.page_tokens)
				return -EINVAL;
	}
	return c->ops->put_rows(c, a, stream);
}

int kvt_estimate(struct kvt_compute *c, const struct kvt_estimate_args *a, void *stream)
{
	if (!a || kvt_geom_check(&a->g) < 0)
		return -EINVAL;
	if (!a->rows)
		return 0;
	if (!a->q || !a->summaries || !a->n_full || !a->est || (a->stride && (!a->sel || !a->n_sel)) ||
	    (!a->row_base && a->sum_stride < a->max_pages))
		return -EINVAL;
	if (a->subtract ? !a->stride : !a->work || !a->sync || ((uintptr_t)a->work & 15))
		return -EINVAL;
	return c->ops->estimate(c, a, stream);
}

int kvt_scatter_i32(struct kvt_compute *c, int32_t *dst, const int32_t *pairs, uint32_t n)
{
	if (!n)
		return 0;
	if (!dst || !pairs)
		return -EINVAL;
	return c->ops->scatter_i32(c, dst, pairs, n);
}

int kvt_compute_sync(struct kvt_compute *c, void *stream)
{
	return c->ops->sync(c, stream);
}

void kvt_layer_policy_default(struct kvt_layer_policy *p)
{
	memset(p, 0, sizeof(*p));
	p->dense_layers = 2;
	for (size_t i = 0; i < sizeof(p->method) / sizeof(p->method[0]); i++)
		p->method[i] = KVT_SCORE_QUEST;
	p->agg = KVT_GQA_MAX;
	p->mode = KVT_SELECT_TOPK;
}

int kvt_select_layer(struct kvt_compute *c, const struct kvt_layer_policy *p, uint32_t layer,
		     struct kvt_score_args *sc, struct kvt_select_args *sel, void *stream)
{
	if (!p || !sc || !sel || layer >= sizeof(p->method) / sizeof(p->method[0]))
		return -EINVAL;
	if (layer < p->dense_layers) {
		struct kvt_select_args all = *sel;
		all.mode = KVT_SELECT_TOPK;
		all.budget_pages = all.stride;
		all.scores = NULL;
		return kvt_select(c, &all, stream);
	}
	sc->method = p->method[layer];
	sc->agg = p->agg;
	sel->mode = p->mode;
	if (sel->scores != sc->scores)
		return -EINVAL;
	int ret = kvt_score(c, sc, stream);
	return ret < 0 ? ret : kvt_select(c, sel, stream);
}
