#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""An example decode loop against kvtierd, through the Python binding.

A synthetic model (random K/V whose keys cluster, queries that drift slowly) is
prefilled, then decoded step by step: per layer, append the new token's K/V, select the
pages for the step's query (sinks, window, top-k by Quest score), and run sparse
attention. Every few steps the sparse output is compared with dense attention over the
whole context computed here in numpy. At the end it prints what each tier holds.
--batch decodes several sequences together; --fast takes the fast path (one
append_batch_async, select_async and attend_async a layer; numpy arrays: the cpu
backend).
"""
import argparse
import os
import socket
import struct
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "ipc", "python"))
import numpy as np  # noqa: E402

import kvtier  # noqa: E402


def daemon_stats(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.sendall(struct.pack("<IHHIi", kvtier.WIRE_MAGIC, kvtier.WIRE_VERSION, 6, 0, 0))
    hdr = s.recv(16, socket.MSG_WAITALL)
    _, _, typ, ln, _ = struct.unpack("<IHHIi", hdr)
    body = s.recv(ln, socket.MSG_WAITALL)
    s.close()
    f = struct.unpack("<II" + "Q" * 13, body[:112])
    return {"clients": f[1], "pages": f[2], "seqs": f[3], "used": f[4:7], "slots": f[7:10]}


def dense(K, V, q, scale):
    """K, V [ntok, D]; q [G, D] -> [G, D] in float64."""
    lg = (q.astype(np.float64) @ K.astype(np.float64).T) * scale
    lg -= lg.max(axis=1, keepdims=True)
    p = np.exp(lg)
    p /= p.sum(axis=1, keepdims=True)
    return p @ V.astype(np.float64)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--socket", default=os.environ.get("KVTIER_SOCKET"))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--page", type=int, default=64)
    ap.add_argument("--context", type=int, default=16384)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--budget", type=int, default=32, help="pages per step and head")
    ap.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    ap.add_argument("--fast", action="store_true",
                    help="the fast path: append_batch_async, select_async, attend_async")
    ap.add_argument("--estimate", action="store_true",
                    help="with --fast: the attention adds an estimate of the pages left out")
    ap.add_argument("--host-gap", type=float, default=0.0,
                    help="with --fast: pages within this many nats of a row's best are read in "
                         "place from host RAM or waited for (0: the library's default, < 0: all)")
    ap.add_argument("--max-error", type=float, default=None,
                    help="exit 1 if sparse vs dense differs more (a test)")
    args = ap.parse_args()
    L, H, G, D, T = args.layers, args.kv_heads, args.group, args.head_dim, args.page
    B, n = args.batch, args.context
    rng = np.random.default_rng(1)
    c = kvtier.Client(L, H, G, D, dtype="f16", page_tokens=T, dense_layers=0, reps=4,
                      socket=args.socket, data_bytes=64 << 20, max_live_seqs=max(B, 4),
                      max_context=n + args.steps + T if args.fast else 0)
    if args.fast and c.backend != "cpu":
        sys.exit(f"--fast with numpy arrays needs the cpu backend (this daemon's: {c.backend}); "
                 "on a GPU pass CUDA tensors to the binding instead")
    print(f"attached: backend {c.backend}; model {L} layers x {H} KV heads x {G} (GQA) x {D}, "
          f"f16, {T}-token pages; batch {B} x context {n} tokens = "
          f"{B * n * L * H * 2 * D * 2 / 2**20:.0f} MiB of KV{'; fast path' if args.fast else ''}")
    seqs = [c.seq_create() for _ in range(B)]
    # keys come in topics: runs of 128 tokens share one of 64 directions, so a query
    # that leans to one topic attends to a few pages (what makes decode attention sparse)
    NC = 64
    centers = rng.standard_normal((L, H, NC, D)).astype(np.float32)
    K = np.empty((L, n + args.steps, B, H, D), np.float16)
    V = rng.standard_normal((L, n + args.steps, B, H, D)).astype(np.float16)
    which = np.repeat(rng.integers(0, NC, ((n + args.steps) // 128 + 1,)), 128)[:n + args.steps]
    for l in range(L):
        for b in range(B):
            K[l, :, b] = (centers[l][:, np.roll(which, 311 * b)].transpose(1, 0, 2) * 2 +
                          rng.standard_normal((n + args.steps, H, D))).astype(np.float16)
    t0 = time.time()
    for l in range(L):
        for b in range(B):
            c.append(seqs[b], l, np.ascontiguousarray(K[l, :n, b]), np.ascontiguousarray(V[l, :n, b]))
    print(f"prefill: {B} x {n} tokens x {L} layers appended in {time.time() - t0:.2f} s")
    scale = D ** -0.5
    qbase = rng.standard_normal((L, B, H, G, D)).astype(np.float32)
    errs, t_step = [], []
    for st in range(args.steps):
        ts = time.time()
        for l in range(L):
            if args.fast:  # the batch's token in one call
                c.append_batch_async(seqs, l, K[l, n], V[l, n])
            else:
                for b in range(B):
                    c.append(seqs[b], l, K[l, n:n + 1, b], V[l, n:n + 1, b])
            # queries drift slowly and lean toward one key cluster per head
            topic = which[(st // 8 * 997) % n]
            q = (0.3 * qbase[l] + 0.02 * st * rng.standard_normal((B, H, G, D)) +
                 0.5 * centers[l][:, topic][None, :, None, :]).astype(np.float16)
            q = q.reshape(B * H * G, D)
            if args.fast:
                t = c.select_async(seqs, l, q, budget_pages=args.budget, sink_tokens=T,
                                   window_tokens=4 * T, estimate=args.estimate,
                                   host_gap=args.host_gap)
                out = c.attend_async(t, q)
            else:
                t = c.select(seqs, l, q, budget_pages=args.budget, sink_tokens=T,
                             window_tokens=4 * T)
                out = c.attend(t, q)
            if st % 8 == 0 and l == L - 1:
                for b in range(B):
                    for h in range(H):
                        r = (b * H + h) * G
                        ref = dense(K[l, :n + 1, b, h], V[l, :n + 1, b, h],
                                    q[r:r + G].astype(np.float32), scale)
                        got = out[r:r + G].astype(np.float64)
                        errs.append(np.abs(got - ref).max() / (np.abs(ref).max() + 1e-9))
        n += 1
        t_step.append(time.time() - ts)
    print(f"decode: {args.steps} steps of {B} sequence(s), budget {args.budget} of {n // T} pages "
          f"per head; step {np.median(t_step) * 1e3:.1f} ms median (all {L} layers, "
          f"{c.backend} backend)")
    print(f"sparse vs dense attention (whole context): max relative error {max(errs):.3f}, "
          f"mean {np.mean(errs):.3f}")
    if args.socket or os.environ.get("KVTIER_SOCKET"):
        s = daemon_stats(args.socket or os.environ["KVTIER_SOCKET"])
        names = ("gpu", "host", "nvme")
        print(f"daemon: {s['clients']} client(s), {s['seqs']} sequence(s), {s['pages']} pages")
        for i in range(3):
            print(f"  {names[i]:5s} {s['used'][i]:7d} of {s['slots'][i]:7d} slots in use")
    ctl = os.environ.get("KVTIER_CTL")
    if ctl and os.path.exists(ctl):  # what an operator sees while the sequence is live
        import subprocess
        for cmd in (["status"], ["seqs"], ["stats"]):
            print(f"$ kvtierctl {' '.join(cmd)}", flush=True)
            subprocess.run([ctl] + cmd, check=False)
    for s in seqs:
        c.seq_close(s)
    c.close()
    if args.max_error is not None and max(errs) > args.max_error:
        print(f"FAIL: error {max(errs):.4f} above {args.max_error}")
        sys.exit(1)


if __name__ == "__main__":
    main()
