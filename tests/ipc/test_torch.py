#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""The Python binding with torch CUDA tensors end to end, on a kvtierd running on a GPU
($KVTIER_SOCKET): K/V appended from device memory (prefill chunks and decode tokens),
queries and outputs on the device, a named sequence reopened. With a budget that covers
every page, sparse attention must equal torch's dense attention over the same KV.
Exit 77 (skip) without torch, a GPU, or a daemon on the cuda backend."""
import sys
import time

from gpu_prelude import F, cuda_client, kvtier, torch  # exits 77 without them

L, H, G, D, T = 2, 4, 4, 128, 64
PREFILL, STEPS = 1000, 8
c = cuda_client(L, H, G, D, dtype="bf16", page_tokens=T, dense_layers=0, data_bytes=32 << 20)
dev = torch.device("cuda")
gen = torch.Generator(device=dev).manual_seed(3)
n = PREFILL + STEPS
K = torch.randn((L, n, H, D), device=dev, generator=gen, dtype=torch.bfloat16)
V = torch.randn((L, n, H, D), device=dev, generator=gen, dtype=torch.bfloat16)


def dense(l, t, q):
    """torch's attention over tokens [0, t) of layer l: q [H*G, D] -> [H*G, D]."""
    k = K[l, :t].permute(1, 0, 2).repeat_interleave(G, dim=0)  # [H*G, t, D]
    v = V[l, :t].permute(1, 0, 2).repeat_interleave(G, dim=0)
    o = F.scaled_dot_product_attention(q.unsqueeze(1).float(), k.float(), v.float())
    return o.squeeze(1)


def run(seq, start, worst):
    for step in range(STEPS):
        t = start + step
        for l in range(L):
            c.append(seq, l, K[l, t:t + 1], V[l, t:t + 1])  # device pointers
            q = torch.randn((H * G, D), device=dev, generator=gen, dtype=torch.bfloat16)
            tab = c.select([seq], l, q, budget_pages=(t + 1) // T + 2, sink_tokens=0,
                           window_tokens=T)
            out = c.attend(tab, q)  # allocated on the device, like q
            assert out.is_cuda and out.dtype == torch.bfloat16
            ref = dense(l, t + 1, q)
            err = (out.float() - ref).abs().max().item()
            worst = max(worst, err)
    return worst


seq, tok = c.seq_open("torch/doc", create=True)
assert tok == 0, tok
for l in range(L):  # the prefill in chunks, from device memory
    for a in range(0, PREFILL, 300):
        b = min(a + 300, PREFILL)
        c.append(seq, l, K[l, a:b], V[l, a:b])
worst = run(seq, PREFILL, 0.0)
synced = c.seq_sync(seq)
c.seq_close(seq)
# reopened: its full pages come back from the store, the rest is appended again
seq, tok = c.seq_open("torch/doc")
assert tok == synced == (PREFILL + STEPS) // T * T, (tok, synced)
for l in range(L):
    c.append(seq, l, K[l, tok:PREFILL], V[l, tok:PREFILL])
worst = run(seq, PREFILL, worst)
c.seq_close(seq)
c.seq_remove("torch/doc")
c.close()

# Ordering across the two processes: A's attend is queued on a stream behind about half
# a second of other GPU work; meanwhile A is closed and B then C are selected, and C's
# pages need slots only A's pages hold (every page goes to the GPU pool). The daemon
# must keep A's pages where they are until that attend has run (the read fence): C's
# select returns only once it has, and its output is the one it gave before, bit for bit.
co = kvtier.Client(1, H, G, D, dtype="bf16", page_tokens=T, dense_layers=0,
                   data_bytes=32 << 20, tenant="ordering", host_reads=False)
m = co.memory()
b = m["pool_bytes"] // m["slot_bytes"] // (2 * H) - 2  # A and B fit, A, B and C do not
ntok = (b + 16) * T
seqs, qs, tabs = [], [], []
for i in range(3):
    s = co.seq_create()
    k = torch.randn((ntok, H, D), device=dev, generator=gen, dtype=torch.bfloat16)
    v = torch.randn((ntok, H, D), device=dev, generator=gen, dtype=torch.bfloat16)
    co.append(s, 0, k, v)
    seqs.append(s)
    qs.append(torch.randn((H * G, D), device=dev, generator=gen, dtype=torch.bfloat16))
    tabs.append(co.table())
co.select([seqs[0]], 0, qs[0], budget_pages=b, sink_tokens=0, window_tokens=T, table=tabs[0])
before = co.attend(tabs[0], qs[0])
torch.cuda.synchronize()
st = torch.cuda.Stream()
with torch.cuda.stream(st):
    torch.cuda._sleep(1 << 30)  # about 0.5 s
    out = co.attend_async(tabs[0], qs[0], stream=st)
co.seq_close(seqs[0])
co.select([seqs[1]], 0, qs[1], budget_pages=b, sink_tokens=0, window_tokens=T, table=tabs[1])
a_queued = not st.query()
t0 = time.monotonic()
co.select([seqs[2]], 0, qs[2], budget_pages=b, sink_tokens=0, window_tokens=T, table=tabs[2])
waited = time.monotonic() - t0
a_done = st.query()
st.synchronize()
same = torch.equal(out, before)
c_out = co.attend(tabs[2], qs[2])
co.seq_close(seqs[1])
co.seq_close(seqs[2])
co.close()
print(f"ordering: {b} pages x {H} heads per select, A's attend still queued after B's select: "
      f"{a_queued}, done when C's select returned (after {waited:.3f} s): {a_done}, its output "
      f"unchanged: {same}")
assert a_done and same and torch.isfinite(c_out.float()).all()
print(f"torch cuda: {L} layers x {H} KV heads x {G} (GQA) x {D} bf16, {PREFILL}+{STEPS} tokens "
      f"appended from device memory, {2 * STEPS * L} selects: max abs error vs torch SDPA "
      f"{worst:.4f}")
sys.exit(0 if worst < 0.02 else 1)
