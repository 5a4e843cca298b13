#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Offloaded KV against all-resident KV: the decode loop of issue #5 on the GPU.

Two runs of the same loop, each with a kvtierd of its own on the cuda device:
  offloaded  the GPU pool holds --pool-frac of the KV, host RAM --host-frac, the rest
             is on NVMe only; the daemon's prefetcher brings up what the next step needs;
  resident   the pool holds all of the KV, brought up before the timed steps.
The model has the Llama-3.1-8B shape (32 layers, 8 KV heads, GQA 4, head dim 128,
bf16, 64-token pages); keys cluster in topics (what makes attention sparse) and the
queries turn slowly from one topic toward another. Per step and layer: append the new
token, select the pages (budget, sinks, window), attend in the client (torch CUDA
tensors). Prints each run's step time and where its selected pages were found, then
`prefetch_hit_rate: X` and `step_ratio_vs_resident: Y`.

    python3 tools/bench_prefetch.py --build build-gpu
"""
import argparse
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(here, "..", "ipc", "python"))
import kvtier  # noqa: E402


def start_daemon(build, state, gpu_bytes, host_bytes, nvme_bytes, log):
    sock = os.path.join(state, "kvtierd.sock")
    cmd = [os.path.join(build, "kvtierd"), "-o", f"ipc.socket={sock}",
           "-o", f"store.state_dir={state}", "-o", "store.device=cuda",
           "-o", f"tenant.gpu_bytes={gpu_bytes}", "-o", f"tenant.host_bytes={host_bytes}",
           "-o", f"store.nvme_bytes={nvme_bytes}", "-o", "tenant.summary_bytes=2G",
           "-o", "ipc.data_bytes_max=256M", "-o", "daemon.promote_timeout_ms=120000"]
    p = subprocess.Popen(cmd, stderr=log, stdout=log)
    for _ in range(600):
        if os.path.exists(sock):
            return p, sock
        if p.poll() is not None:
            raise RuntimeError(f"kvtierd exited with {p.returncode}")
        time.sleep(0.1)
    p.kill()
    raise RuntimeError("kvtierd did not start")


def run(args, name, gpu_bytes, host_bytes, resident, log, copy_fence=True):
    import torch
    L, H, G, D, T, n = args.layers, args.kv_heads, args.group, args.head_dim, args.page, args.context
    kv_bytes = L * H * n * 2 * D * 2
    state = tempfile.mkdtemp(prefix=f"kvt-{name}-", dir=args.dir)
    daemon, sock = start_daemon(args.build, state, gpu_bytes, host_bytes,
                                int(kv_bytes * 1.3) + (1 << 30), log)
    res = {"name": name}
    try:
        # KVTIER_COPY_FENCE=0: selects answer once their copies have landed
        os.environ["KVTIER_COPY_FENCE"] = "1" if copy_fence else "0"
        c = kvtier.Client(L, H, G, D, dtype="bf16", page_tokens=T, dense_layers=0, reps=0,
                          socket=sock, data_bytes=64 << 20,
                          host_reads=not resident and not args.no_host_reads,
                          lib=os.path.join(args.build, "libkvtier.so"))
        del os.environ["KVTIER_COPY_FENCE"]
        dev = torch.device("cuda")
        g = torch.Generator(device=dev).manual_seed(1)
        NC = 64
        centers = torch.randn(L, H, NC, D, device=dev, generator=g)
        total = n + args.warmup + args.steps
        which = torch.randint(0, NC, (total // 128 + 1,), device=dev, generator=g)
        which = which.repeat_interleave(128)[:total]
        seq = c.seq_create()
        t0 = time.time()
        for l in range(L):
            K = (centers[l][:, which].permute(1, 0, 2) * 2 +
                 torch.randn(total, H, D, device=dev, generator=g)).to(torch.bfloat16)
            V = torch.randn(total, H, D, device=dev, generator=g).to(torch.bfloat16)
            c.append(seq, l, K[:n], V[:n])
            if l == 0:
                Kn, Vn = [], []
            Kn.append(K[n:].clone())
            Vn.append(V[n:].clone())
            del K, V
        res["prefill_s"] = time.time() - t0
        # two topics the queries move between (the second one's pages start cold)
        qbase = torch.randn(L, H, G, D, device=dev, generator=g) * 0.3
        tA = int(which[n // 3])
        tB = int(which[(2 * n) // 3])
        if resident:  # every page of every layer up to the pool, once
            t1 = time.time()
            q = torch.zeros(H * G, D, device=dev, dtype=torch.bfloat16)
            for l in range(L):
                c.select([seq], l, q, budget_pages=n // T, sink_tokens=T, window_tokens=4 * T)
                # and unpinned (pins hold the host copies too): they stay on the GPU
                c.select([seq], l, q, budget_pages=args.budget // T, sink_tokens=T,
                         window_tokens=4 * T)
            res["warm_s"] = time.time() - t1
        steps, times = args.warmup + args.steps, []
        st0 = None
        for s in range(steps):
            if s == args.warmup:
                st0 = c.stats(seq)
            th = (math.pi / 2) * s / steps
            torch.cuda.synchronize()
            ts = time.perf_counter()
            for l in range(L):
                c.append(seq, l, Kn[l][s:s + 1], Vn[l][s:s + 1])
                q = (qbase[l] + math.cos(th) * centers[l][:, tA][:, None, :] +
                     math.sin(th) * centers[l][:, tB][:, None, :]).to(torch.bfloat16)
                q = q.reshape(H * G, D)
                t = c.select([seq], l, q, budget_pages=args.budget // T, sink_tokens=T,
                             window_tokens=4 * T)
                c.attend(t, q)
            torch.cuda.synchronize()
            if s >= args.warmup:
                times.append(time.perf_counter() - ts)
        st = c.stats(seq)
        d = {k: st[k] - st0[k] for k in kvtier.STATS_FIELDS}
        times.sort()
        res.update(step_ms=1e3 * times[len(times) // 2], step_mean_ms=1e3 * sum(times) / len(times),
                   stats=d, client=c.stats())
        c.seq_close(seq)
        c.close()
    finally:
        daemon.terminate()
        try:
            daemon.wait(60)
        except subprocess.TimeoutExpired:
            daemon.kill()
        shutil.rmtree(state, ignore_errors=True)
    return res


def show(r, kv_bytes):
    s = r["stats"]
    sel = max(1, s["selected"])
    print(f"[{r['name']}] prefill {r['prefill_s']:.1f} s" +
          (f", all pages up in {r['warm_s']:.1f} s" if "warm_s" in r else "") +
          f"; step {r['step_ms']:.2f} ms median, {r['step_mean_ms']:.2f} ms mean")
    print(f"[{r['name']}] pages selected {s['selected']}: hit {s['hit'] / sel:.4f} late "
          f"{s['late'] / sel:.4f} host {s['host'] / sel:.4f} disk {s['disk'] / sel:.4f} "
          f"fetched {s['fetched'] / sel:.4f}")
    print(f"[{r['name']}] prefetched to GPU {s['prefetch_gpu']}, to host {s['prefetch_host']}, "
          f"used {s['prefetch_used']}, wasted {s['prefetch_wasted']}, refused "
          f"{s['prefetch_refused']}")
    c = r["client"]
    for k in ("lat_gpu", "lat_host"):
        h = c[k]
        tot = sum(h)
        if tot:
            acc, p50, p99 = 0, None, None
            for i, v in enumerate(h):
                acc += v
                if p50 is None and acc >= tot / 2:
                    p50 = 2 ** i
                if p99 is None and acc >= tot * 0.99:
                    p99 = 2 ** i
            print(f"[{r['name']}] {k}: {tot} fetches, p50 < {2 * p50} us, p99 < {2 * p99} us")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build", default=os.path.join(here, "..", "build"))
    ap.add_argument("--dir", default=None, help="where the stores go (default: /tmp)")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--page", type=int, default=64)
    ap.add_argument("--context", type=int, default=131072)
    ap.add_argument("--budget", type=int, default=2048, help="tokens per step and head")
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--pool-frac", type=float, default=0.10)
    ap.add_argument("--host-frac", type=float, default=0.5)
    ap.add_argument("--no-host-reads", action="store_true",
                    help="the offloaded client reads no page in place: each comes to the pool")
    ap.add_argument("--compare-fence", action="store_true",
                    help="the offloaded run again with selects that wait for their copies "
                         "(KVTIER_COPY_FENCE=0), for the copy fence's gain")
    args = ap.parse_args()
    kv = args.layers * args.kv_heads * args.context * 2 * args.head_dim * 2
    print(f"model: {args.layers} layers x {args.kv_heads} KV heads x {args.group} (GQA) x "
          f"{args.head_dim}, bf16, {args.page}-token pages; context {args.context}: "
          f"{kv / 2**30:.2f} GiB of KV; budget {args.budget} tokens")
    log = open(os.path.join(args.dir or ".", "bench-prefetch-kvtierd.log"), "w")
    off = run(args, "offloaded", int(kv * args.pool_frac), int(kv * args.host_frac), False, log)
    show(off, kv)
    if args.compare_fence:
        nf = run(args, "offloaded-nofence", int(kv * args.pool_frac), int(kv * args.host_frac),
                 False, log, copy_fence=False)
        show(nf, kv)
        print(f"step_ratio_fence_vs_nofence: {off['step_ms'] / nf['step_ms']:.3f}")
    res = run(args, "resident", int(kv * 1.15), int(kv * args.host_frac), True, log)
    show(res, kv)
    s = off["stats"]
    print(f"prefetch_hit_rate: {s['hit'] / max(1, s['selected']):.4f}")
    print(f"step_ratio_vs_resident: {off['step_ms'] / res['step_ms']:.3f}")


if __name__ == "__main__":
    main()
