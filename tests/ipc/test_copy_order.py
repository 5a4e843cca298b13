#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Copies into the GPU pool and the client's reads, ordered by the daemon's copy fence
(a CUDA IPC event), on a GPU. The daemon ($KVTIER_SOCKET) runs with
KVT_CUDA_COPY_DELAY_US: every copy batch into the pool starts that long after it is
queued. A client that reads nothing in place (every selected page comes to the pool)
selects pages scattered over a sequence larger than the pool, so that each select
brings pages up; the daemon answers once their copies are queued, and the client's
kernels must wait on the fence: kvtier_attend on the backend's stream, attend_async on a
stream of the caller's, and an engine's own read (torch, over the pool) after
kvtier_table_ready. Each output must equal torch's attention over the pages the table
names, read from the KV this test appended: a read before its copy landed finds the
slot's old page. kvtierctl must count selects answered before their copies landed.
argv[1]: the build directory (tools/kvtierctl). Exit 77 without torch or a GPU daemon."""
import json
import os
import subprocess
import sys
import time

from gpu_prelude import F, cuda_client, torch  # exits 77 without them

H, G, D, T = 2, 4, 128, 64
PAGES, BUDGET, STEPS = 600, 96, 12  # per head; the pool holds 512 pages of 32 KiB
c = cuda_client(1, H, G, D, dtype="bf16", page_tokens=T, dense_layers=0, data_bytes=32 << 20,
                tenant="copies", host_reads=False)
dev = torch.device("cuda")
gen = torch.Generator(device=dev).manual_seed(5)
ntok = PAGES * T + 17
K = torch.randn((ntok, H, D), device=dev, generator=gen, dtype=torch.bfloat16)
V = torch.randn((ntok, H, D), device=dev, generator=gen, dtype=torch.bfloat16)
s = c.seq_create()
for a in range(0, ntok, 4096):
    c.append(s, 0, K[a:a + 4096], V[a:a + 4096])
mem = c.memory()
slot_elems = mem["slot_bytes"] // 2
pool = None
if mem["pool"]:
    # the pool as a torch tensor over the client's read-only mapping (the engine's view)
    class _Pool:
        __cuda_array_interface__ = {"shape": (mem["pool_bytes"] // 2,), "typestr": "<i2",
                                    "data": (mem["pool"], False), "version": 3}
    pool = torch.as_tensor(_Pool(), device=dev).view(torch.bfloat16)


def reference(tab, q):
    """torch's attention of q over exactly the pages the table names, plus the tail."""
    _, n, tail = tab.view()
    pages = tab.pages()
    out = []
    for h in range(H):
        idx = torch.cat([torch.arange(p * T, p * T + T) for p in pages[h][:n[h]]] +
                        [torch.arange(ntok - int(tail[h]), ntok)]).to(dev)
        k = K[idx, h].float().unsqueeze(0).expand(G, -1, -1)
        v = V[idx, h].float().unsqueeze(0).expand(G, -1, -1)
        qh = q[h * G:(h + 1) * G].float().unsqueeze(1)
        out.append(F.scaled_dot_product_attention(qh, k, v).squeeze(1))
    return torch.cat(out)


worst, own_bad, sel_ms = 0.0, 0, []
st = torch.cuda.Stream()
for step in range(STEPS):
    q = torch.randn((H * G, D), device=dev, generator=gen, dtype=torch.bfloat16) * 3
    tab = c.table()
    t0 = time.monotonic()
    c.select([s], 0, q, budget_pages=BUDGET, sink_tokens=T, window_tokens=T, table=tab)
    sel_ms.append((time.monotonic() - t0) * 1e3)
    if step % 3 == 0:
        out = c.attend(tab, q)
    elif step % 3 == 1:
        with torch.cuda.stream(st):
            out = c.attend_async(tab, q, stream=st)
        st.synchronize()
    else:  # an engine's own kernels over the pool: ordered by kvtier_table_ready
        out = c.attend(tab, q)
        if pool is not None:
            with torch.cuda.stream(st):
                c.table_ready(tab, stream=st)
                slots, n, _ = tab.view()
                pages = tab.pages()
                for h in range(H):
                    for j in range(int(n[h])):
                        got = pool[int(slots[h][j]) * slot_elems:][:T * D].view(T, D)
                        want = K[pages[h][j] * T:pages[h][j] * T + T, h]
                        own_bad += not torch.equal(got, want)
            st.synchronize()
    err = (out.float() - reference(tab, q)).abs().max().item()
    worst = max(worst, err)
    tab.close()
ctl = os.path.join(sys.argv[1], "tools", "kvtierctl")
cl = json.loads(subprocess.run([ctl, "-s", os.environ["KVTIER_SOCKET"], "--json", "clients"],
                               capture_output=True, text=True, check=True).stdout)
me = [x for x in cl if x.get("copy_fence")]
early = sum(x["selects_before_copies"] for x in me)
pages_early = sum(x["pages_before_copies"] for x in me)
c.seq_close(s)
c.close()
sel_ms.sort()
print(f"copy order: {STEPS} selects of {BUDGET} pages x {H} heads, copies {os.environ.get('KVT_CUDA_COPY_DELAY_US', '0')} us late: "
      f"{early} answered before their copies landed ({pages_early} pages), select median "
      f"{sel_ms[len(sel_ms) // 2]:.2f} ms; max abs error vs torch over the same pages "
      f"{worst:.4f}; own reads after table_ready: {own_bad} slots wrong")
ok = early > 0 and pages_early >= early and worst < 0.02 and own_bad == 0
sys.exit(0 if ok else 1)
