/*
 * How fast can one SM pull scattered KV pages into its shared memory? A probe for the
 * sparse attention kernel (issue #3), not project code it links with: the same page
 * shape (64 tokens x 128 dims x bf16: 16 KiB of K then 16 KiB of V, 32 KiB a page),
 * pages at random places in a 2 GiB pool, cold (each launch of a graph reads another
 * set), 256 pages a launch (a batch-1 Llama step at a 2048-token budget: 8 KV heads x
 * 32 pages), spread over `blocks` blocks. Three ways to load:
 *   cpasync: 16-byte cp.async.cg by every thread, one commit group a round;
 *   bulk:    one cp.async.bulk (TMA, 1-D) per 16 KiB half page, on an mbarrier;
 *   row:     one cp.async.bulk per 256-byte token row, to rows padded to 272 bytes
 *            (the attention kernel's layout), on an mbarrier.
 * A round loads `round` pages and waits for them; a block does pages/blocks pages.
 * Built with the CUDA build as build-gpu/tools/kvtier-bench-ingest (sm_90 only), or
 *   nvcc -O3 -std=c++17 -arch=sm_90 -o bench-ingest tools/bench_ingest.cu && ./bench-ingest
 */
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <vector>

#define CK(x)                                                                              \
	do {                                                                               \
		cudaError_t e_ = (x);                                                      \
		if (e_ != cudaSuccess) {                                                   \
			fprintf(stderr, "%s:%d: %s\n", __FILE__, __LINE__, cudaGetErrorString(e_)); \
			exit(1);                                                           \
		}                                                                          \
	} while (0)

enum { PAGE = 32768, HALF = 16384, ROW = 256, PROW = 272, ROWS = PAGE / ROW };

__device__ __forceinline__ uint32_t sa(const void *p)
{
	return (uint32_t)__cvta_generic_to_shared(p);
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#error "bench_ingest needs sm_90 (cp.async.bulk, mbarrier transaction counts)"
#endif

__device__ __forceinline__ void mbar_init(uint64_t *b, uint32_t n)
{
	asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(sa(b)), "r"(n) : "memory");
	asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}

__device__ __forceinline__ void mbar_expect(uint64_t *b, uint32_t bytes)
{
	asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(sa(b)),
		     "r"(bytes)
		     : "memory");
}

__device__ __forceinline__ void mbar_wait(uint64_t *b, uint32_t parity)
{
	asm volatile("{\n\t.reg .pred p;\n"
		     "W: mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n\t"
		     "@!p bra W;\n}" ::"r"(sa(b)),
		     "r"(parity)
		     : "memory");
}

__device__ __forceinline__ void bulk(void *dst, const void *src, uint32_t n, uint64_t *b)
{
	asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], "
		     "%2, [%3];" ::"r"(sa(dst)),
		     "l"(src), "r"(n), "r"(sa(b))
		     : "memory");
}

__device__ __forceinline__ void cp16(void *dst, const void *src)
{
	asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(sa(dst)), "l"(src)
		     : "memory");
}

/* way 0 cpasync, 1 bulk, 2 row */
template <int WAY>
__global__ void __launch_bounds__(256, 1) ingest(const uint8_t *pool, const int *pages, int per,
						 int round, uint32_t *sink)
{
	extern __shared__ __align__(128) uint8_t sm[];
	__shared__ uint64_t bar;
	const int *mine = pages + blockIdx.x * per;
	if (WAY && threadIdx.x == 0)
		mbar_init(&bar, 1);
	__syncthreads();
	uint32_t acc = 0, phase = 0;
	const uint32_t stride = WAY == 2 ? ROWS * PROW : PAGE;
	for (int p0 = 0; p0 < per; p0 += round) {
		const int n = per - p0 < round ? per - p0 : round;
		if (WAY == 0) {
			for (int i = threadIdx.x; i < n * (PAGE / 16); i += blockDim.x) {
				const int pg = i / (PAGE / 16), ch = i % (PAGE / 16);
				cp16(sm + pg * stride + ch * 16,
				     pool + (size_t)__ldg(&mine[p0 + pg]) * PAGE + ch * 16);
			}
			asm volatile("cp.async.commit_group;\n\tcp.async.wait_group 0;" ::: "memory");
		} else if (WAY == 1) {
			if (threadIdx.x == 0) {
				mbar_expect(&bar, n * PAGE);
				for (int i = 0; i < 2 * n; i++)
					bulk(sm + (i / 2) * stride + (i % 2) * HALF,
					     pool + (size_t)mine[p0 + i / 2] * PAGE + (i % 2) * HALF, HALF,
					     &bar);
			}
			mbar_wait(&bar, phase);
		} else {
			if (threadIdx.x == 0)
				mbar_expect(&bar, n * PAGE);
			__syncthreads(); /* the expectation before any row lands */
			for (int i = threadIdx.x; i < n * ROWS; i += blockDim.x) {
				const int pg = i / ROWS, r = i % ROWS;
				bulk(sm + pg * stride + r * PROW,
				     pool + (size_t)__ldg(&mine[p0 + pg]) * PAGE + r * ROW, ROW, &bar);
			}
			mbar_wait(&bar, phase);
		}
		phase ^= 1;
		__syncthreads();
		acc += sm[(threadIdx.x * 64) % (n * stride)];
		__syncthreads();
	}
	if (acc == 0x12345678u)
		*sink = acc;
}

/*
 * The attention kernel's fixed cost without its passes: a cluster of 8 blocks of 256
 * threads with most of the shared memory, one dependent load (like n_pages); with
 * MERGE, each block then sends 4 x 128 floats into the first block's shared memory by
 * st.async on its mbarrier (the cluster kernel's merge), which waits, sums and stores.
 */
template <bool MERGE>
__global__ void __launch_bounds__(256, 1) cl_end(const int *pages, uint32_t *sink)
{
	extern __shared__ __align__(128) uint8_t sm[];
	__shared__ uint64_t bar;
	float *acc = reinterpret_cast<float *>(sm);
	uint32_t rank;
	asm("mov.u32 %0, %%cluster_ctarank;" : "=r"(rank));
	if (MERGE) {
		if (rank == 0 && threadIdx.x == 0)
			mbar_init(&bar, 1);
		asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
	}
	const float v = (float)__ldg(&pages[blockIdx.x]);
	if (!MERGE) {
		if (v == 12345.0f)
			*sink = 1;
		return;
	}
	uint32_t acc0, bar0;
	asm("mapa.shared::cluster.u32 %0, %1, 0;" : "=r"(acc0) : "r"(sa(acc)));
	asm("mapa.shared::cluster.u32 %0, %1, 0;" : "=r"(bar0) : "r"(sa(&bar)));
	if (rank) {
		asm volatile("barrier.cluster.wait.aligned;" ::: "memory");
		for (uint32_t i = threadIdx.x; i < 512; i += blockDim.x)
			asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.b32 [%0], %1, "
				     "[%2];" ::"r"(acc0 + (rank * 512 + i) * 4),
				     "r"(__float_as_uint(v + i)), "r"(bar0)
				     : "memory");
		return;
	}
	for (uint32_t i = threadIdx.x; i < 512; i += blockDim.x)
		acc[i] = v + i;
	if (threadIdx.x == 0)
		mbar_expect(&bar, 7 * 512 * 4);
	asm volatile("barrier.cluster.wait.aligned;" ::: "memory");
	mbar_wait(&bar, 0);
	__syncthreads();
	float sum = 0;
	for (int r = 0; r < 8; r++)
		sum += acc[r * 512 + threadIdx.x];
	if (sum == 12345.0f)
		*sink = 1;
}

__global__ void empty(uint32_t *sink)
{
	if (threadIdx.x == 1000)
		*sink = 1;
}

int main(void)
{
	const int total = 256, launches = 40;
	const size_t pool_pages = 65536; /* 2 GiB */
	uint8_t *pool;
	uint32_t *sink;
	int *pages;
	CK(cudaMalloc(&pool, pool_pages * PAGE));
	CK(cudaMemset(pool, 1, pool_pages * PAGE));
	CK(cudaMalloc(&sink, 4));
	std::vector<int> h((size_t)total * launches);
	srand(1);
	for (auto &x : h) /* distinct enough: 10240 of 65536 pages */
		x = (int)(((uint64_t)rand() << 16 ^ rand()) % pool_pages);
	CK(cudaMalloc(&pages, h.size() * sizeof(int)));
	CK(cudaMemcpy(pages, h.data(), h.size() * sizeof(int), cudaMemcpyHostToDevice));
	cudaStream_t s;
	CK(cudaStreamCreate(&s));
	int dev, optin;
	CK(cudaGetDevice(&dev));
	CK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
	int lim[3];
	void (*ks[3])(const uint8_t *, const int *, int, int, uint32_t *) = {ingest<0>, ingest<1>,
									     ingest<2>};
	for (int w = 0; w < 3; w++) {
		cudaFuncAttributes fa;
		CK(cudaFuncGetAttributes(&fa, ks[w]));
		lim[w] = optin - (int)fa.sharedSizeBytes - 1024;
		CK(cudaFuncSetAttribute(ks[w], cudaFuncAttributeMaxDynamicSharedMemorySize, lim[w]));
	}
	auto timeit = [&](auto launch) {
		cudaGraph_t g;
		cudaGraphExec_t ge;
		CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
		for (int i = 0; i < launches; i++)
			launch(i);
		CK(cudaStreamEndCapture(s, &g));
		CK(cudaGraphInstantiate(&ge, g, 0));
		cudaEvent_t a, b;
		CK(cudaEventCreate(&a));
		CK(cudaEventCreate(&b));
		float best = 1e30f;
		for (int rep = 0; rep < 6; rep++) {
			CK(cudaEventRecord(a, s));
			CK(cudaGraphLaunch(ge, s));
			CK(cudaEventRecord(b, s));
			CK(cudaEventSynchronize(b));
			float ms;
			CK(cudaEventElapsedTime(&ms, a, b));
			if (rep && ms < best)
				best = ms;
		}
		CK(cudaGraphExecDestroy(ge));
		CK(cudaGraphDestroy(g));
		return best * 1000.0f / launches; /* us a launch */
	};
	const float e = timeit([&](int) { empty<<<64, 256, 0, s>>>(sink); });
	printf("empty kernel (64 blocks): %.2f us a launch\n", e);
	{
		const int big = 200 * 1024;
		CK(cudaFuncSetAttribute(cl_end<false>, cudaFuncAttributeMaxDynamicSharedMemorySize, big));
		CK(cudaFuncSetAttribute(cl_end<true>, cudaFuncAttributeMaxDynamicSharedMemorySize, big));
		auto launch = [&](void (*k)(const int *, uint32_t *), int i, int smem) {
			cudaLaunchAttribute at = {};
			at.id = cudaLaunchAttributeClusterDimension;
			at.val.clusterDim.x = 8;
			at.val.clusterDim.y = at.val.clusterDim.z = 1;
			cudaLaunchConfig_t cfg = {};
			cfg.gridDim = dim3(64, 1, 1);
			cfg.blockDim = dim3(256, 1, 1);
			cfg.dynamicSmemBytes = smem;
			cfg.stream = s;
			cfg.attrs = &at;
			cfg.numAttrs = 1;
			CK(cudaLaunchKernelEx(&cfg, k, (const int *)(pages + i * total), sink));
		};
		const int most = lim[0] - 1024;
		CK(cudaFuncSetAttribute(cl_end<false>, cudaFuncAttributeMaxDynamicSharedMemorySize, most));
		CK(cudaFuncSetAttribute(cl_end<true>, cudaFuncAttributeMaxDynamicSharedMemorySize, most));
		const float c0 = timeit([&](int i) { launch(cl_end<false>, i, big); });
		const float c1 = timeit([&](int i) { launch(cl_end<true>, i, big); });
		const float c2 = timeit([&](int i) { launch(cl_end<true>, i, most); });
		printf("clusters of 8 (64 blocks, 200 KiB shared memory each), one load: %.2f us; "
		       "and the merge by st.async: %.2f us (with %d KiB: %.2f us)\n", c0, c1, most / 1024, c2);
	}
	printf("%-8s %6s %5s %5s %9s %9s %12s\n", "way", "blocks", "per", "round", "us", "GB/s",
	       "GB/s per SM");
	const char *names[] = {"cpasync", "bulk", "row"};
	struct cfg {
		int blocks, round;
	} cfgs[] = {{8, 4}, {8, 6}, {32, 4}, {32, 6}, {64, 2}, {64, 4}, {128, 1}, {128, 2}, {256, 1}};
	for (int way = 0; way < 3; way++)
		for (auto c : cfgs) {
			const int per = total / c.blocks;
			const size_t smem = (size_t)c.round * (way == 2 ? ROWS * PROW : PAGE);
			if (smem > (size_t)lim[way])
				continue;
			auto k = ks[way];
			const float us = timeit([&](int i) {
				k<<<c.blocks, 256, smem, s>>>(pool, pages + (size_t)i * total, per, c.round,
							     sink);
			});
			CK(cudaGetLastError());
			const double gbs = (double)total * PAGE / (us * 1e3);
			const int sms = c.blocks < 132 ? c.blocks : 132;
			printf("%-8s %6d %5d %5d %9.2f %9.0f %12.1f\n", names[way], c.blocks, per,
			       c.round, us, gbs, gbs / sms);
		}
	CK(cudaDeviceSynchronize());
	return 0;
}
