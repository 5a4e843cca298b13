# SPDX-License-Identifier: MIT
"""Python binding of libkvtier (ctypes): attach to kvtierd, append K/V, select pages,
run sparse attention. Tensors are numpy arrays or torch tensors (CPU, or CUDA when the
daemon runs on a GPU); K/V of new tokens are [ntok, kv_heads, head_dim], queries
[nseq * kv_heads * group, head_dim] in the usual GQA head order.

    import kvtier
    c = kvtier.Client(layers=32, kv_heads=8, group=4, head_dim=128, dtype="bf16")
    s = c.seq_create()
    c.append(s, layer, k, v)
    t = c.select([s], layer, q, budget_pages=32)
    out = c.attend(t, q)

The fast path (attach with max_context; tensors on the daemon's device): per layer
append_batch_async(seqs, layer, k, v) with k, v [nseq, kv_heads, head_dim],
select_async(seqs, layer, q, ...) and attend_async(table, q), all on one stream, no
round trip to the daemon.

Errors raise OSError with the errno the library returned.
"""
import ctypes
import ctypes.util
import errno
import os

DTYPES = {"f16": 0, "fp16": 0, "float16": 0, "bf16": 1, "bfloat16": 1, "f32": 2, "fp32": 2,
          "float32": 2}
MEM_DEVICE = 1


class _Layout(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint32) for n in ("layers", "kv_heads", "group", "head_dim",
                                                "dtype", "page_tokens", "dense_layers", "reps")]


class _Opts(ctypes.Structure):
    _fields_ = [("socket", ctypes.c_char_p), ("tenant", ctypes.c_char_p),
                ("data_bytes", ctypes.c_uint64), ("ring_entries", ctypes.c_uint32),
                ("max_live_seqs", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("max_context", ctypes.c_uint32)]


class _SelParams(ctypes.Structure):
    _fields_ = [("budget_pages", ctypes.c_uint32), ("sink_tokens", ctypes.c_uint32),
                ("window_tokens", ctypes.c_uint32), ("top_p_mode", ctypes.c_uint32),
                ("top_p", ctypes.c_float), ("flags", ctypes.c_uint32),
                ("host_gap", ctypes.c_float), ("wait_us", ctypes.c_int32)]


class _View(ctypes.Structure):
    _fields_ = [("rows", ctypes.c_uint32), ("stride", ctypes.c_uint32), ("layer", ctypes.c_uint32),
                ("slots", ctypes.POINTER(ctypes.c_int32)),
                ("n_pages", ctypes.POINTER(ctypes.c_int32)),
                ("tail_len", ctypes.POINTER(ctypes.c_int32)),
                ("tail_slot", ctypes.POINTER(ctypes.c_int32)),
                ("pages", ctypes.POINTER(ctypes.c_int32))]


class _Memory(ctypes.Structure):
    _fields_ = [("pool", ctypes.c_void_p), ("pool_bytes", ctypes.c_uint64),
                ("slot_bytes", ctypes.c_uint64), ("tail_pool", ctypes.c_void_p),
                ("host_pool", ctypes.c_void_p), ("host_slot_bytes", ctypes.c_uint64)]


LAT_BUCKETS = 24
STATS_FIELDS = ("steps", "selected", "hit", "late", "host", "disk", "fetched", "substituted",
                "prefetch_gpu", "prefetch_host", "prefetch_used", "prefetch_wasted",
                "prefetch_refused", "bytes_h2d", "bytes_nvme", "missed")
SLOT_HOST = 0x40000000
# The socket protocol (ipc/wire.h), for tools that speak it without the library.
WIRE_MAGIC = 0x3154564B
WIRE_VERSION = 7
ATTACH_NO_HOST_READS = 1
SEL_SUBSTITUTE = 1
SEL_ESTIMATE = 2


class _Stats(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in STATS_FIELDS] + [
        ("lat_gpu", ctypes.c_uint64 * LAT_BUCKETS), ("lat_host", ctypes.c_uint64 * LAT_BUCKETS)]


def _load(path=None):
    cands = [path, os.environ.get("KVTIER_LIB")]
    here = os.path.dirname(os.path.abspath(__file__))
    cands += [os.path.join(here, "..", "..", "build", "libkvtier.so"), ctypes.util.find_library("kvtier")]
    for p in cands:
        if p and (os.path.exists(p) or not os.path.isabs(p)):
            try:
                lib = ctypes.CDLL(p)
                break
            except OSError:
                continue
    else:
        raise OSError(errno.ENOENT, "libkvtier.so not found (set KVTIER_LIB)")
    P, U32, I = ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int
    sig = {
        "kvtier_attach": (I, [ctypes.POINTER(_Layout), ctypes.POINTER(_Opts), ctypes.POINTER(P)]),
        "kvtier_detach": (None, [P]),
        "kvtier_backend": (ctypes.c_char_p, [P]),
        "kvtier_seq_create": (I, [P, ctypes.POINTER(U32)]),
        "kvtier_seq_close": (I, [P, U32]),
        "kvtier_seq_fork": (I, [P, U32, U32, ctypes.POINTER(U32)]),
        "kvtier_seq_tokens": (I, [P, U32, U32, ctypes.POINTER(U32)]),
        "kvtier_seq_open": (I, [P, ctypes.c_char_p, U32, ctypes.POINTER(U32),
                                ctypes.POINTER(U32)]),
        "kvtier_seq_sync": (I, [P, U32, ctypes.POINTER(U32)]),
        "kvtier_seq_remove": (I, [P, ctypes.c_char_p]),
        "kvtier_append": (I, [P, U32, U32, P, P, U32, ctypes.c_uint]),
        "kvtier_append_async": (I, [P, U32, U32, P, P, U32, P]),
        "kvtier_append_batch_async": (I, [P, ctypes.POINTER(U32), U32, U32, P, P, P]),
        "kvtier_select_async": (I, [P, ctypes.POINTER(U32), U32, U32, P,
                                    ctypes.POINTER(_SelParams), P, P]),
        "kvtier_table_create": (P, [P, U32]),
        "kvtier_table_destroy": (None, [P]),
        "kvtier_table_view": (None, [P, ctypes.POINTER(_View)]),
        "kvtier_select": (I, [P, ctypes.POINTER(U32), U32, U32, P, ctypes.c_uint,
                              ctypes.POINTER(_SelParams), P]),
        "kvtier_attend": (I, [P, P, P, P, P, ctypes.c_float, ctypes.c_uint]),
        "kvtier_attend_async": (I, [P, P, P, P, P, ctypes.c_float, P]),
        "kvtier_reads_fence": (I, [P, P]),
        "kvtier_table_ready": (I, [P, P, P]),
        "kvtier_reads_hold": (None, [P]),
        "kvtier_reads_release": (None, [P]),
        "kvtier_memory": (None, [P, ctypes.POINTER(_Memory)]),
        "kvtier_stats": (I, [P, U32, ctypes.POINTER(_Stats)]),
        "kvtier_nop": (I, [P]),
        "kvtier_ping": (I, [P]),
    }
    for name, (res, args) in sig.items():
        f = getattr(lib, name)
        f.restype, f.argtypes = res, args
    return lib


def _stream_ptr(stream, like):
    """The cudaStream_t of a torch.cuda.Stream (None: torch's current stream when like is
    a CUDA tensor or torch is in use, else the legacy default stream)."""
    if stream is not None:
        return stream.cuda_stream if hasattr(stream, "cuda_stream") else stream
    if like is not None and getattr(like, "is_cuda", False):
        import torch
        return torch.cuda.current_stream(like.device).cuda_stream
    return None


def _check(ret, what):
    if ret < 0:
        raise OSError(-ret, f"{what}: {os.strerror(-ret)}")
    return ret


def _ptr(x):
    """(address, mem flag, keepalive) of a numpy array or torch tensor, contiguous."""
    if hasattr(x, "data_ptr"):  # torch
        x = x.contiguous()
        return x.data_ptr(), (MEM_DEVICE if x.is_cuda else 0), x
    import numpy as np
    x = np.ascontiguousarray(x)
    return x.ctypes.data, 0, x


class Table:
    """Page tables of one select (a batch of sequences, one layer)."""

    def __init__(self, client, max_seqs):
        self._c = client
        self._t = client._lib.kvtier_table_create(client._h, max_seqs)
        if not self._t:
            raise OSError(errno.EINVAL, "kvtier_table_create")
        self.max_seqs = max_seqs

    def view(self):
        """(slots [rows, stride], n_pages [rows], tail_len [rows]) as numpy arrays."""
        import numpy as np
        v = _View()
        self._c._lib.kvtier_table_view(self._t, ctypes.byref(v))
        rows, stride = v.rows, v.stride
        slots = np.ctypeslib.as_array(v.slots, (rows * stride,)).reshape(rows, stride).copy()
        n = np.ctypeslib.as_array(v.n_pages, (rows,)).copy()
        tail = np.ctypeslib.as_array(v.tail_len, (rows,)).copy()
        return slots, n, tail

    def pages(self):
        """The page index of every entry of view()'s slots: [rows][stride]."""
        import numpy as np
        v = _View()
        self._c._lib.kvtier_table_view(self._t, ctypes.byref(v))
        return np.ctypeslib.as_array(v.pages, (v.rows * v.stride,)).reshape(v.rows, v.stride).copy()

    def close(self):
        if self._t:
            self._c._lib.kvtier_table_destroy(self._t)
            self._t = None

    def __del__(self):
        self.close()


class Client:
    def __init__(self, layers, kv_heads, group, head_dim, dtype="bf16", page_tokens=64,
                 dense_layers=2, reps=4, socket=None, tenant=None, data_bytes=0,
                 max_live_seqs=0, host_reads=True, max_context=0, lib=None):
        """max_context: tokens per sequence the fast path (select_async) covers, for
        the first max_live_seqs sequence ids; 0: none."""
        self._lib = _load(lib)
        self.layers, self.kv_heads, self.group, self.head_dim = layers, kv_heads, group, head_dim
        self.dtype = DTYPES[dtype] if isinstance(dtype, str) else int(dtype)
        lay = _Layout(layers, kv_heads, group, head_dim, self.dtype, page_tokens, dense_layers, reps)
        opts = _Opts(socket.encode() if socket else None, tenant.encode() if tenant else None,
                     data_bytes, 0, max_live_seqs, 0 if host_reads else ATTACH_NO_HOST_READS,
                     max_context)
        h = ctypes.c_void_p()
        _check(self._lib.kvtier_attach(ctypes.byref(lay), ctypes.byref(opts), ctypes.byref(h)),
               "kvtier_attach")
        self._h = h
        self._backend = self._lib.kvtier_backend(h).decode()  # fixed for the client's life
        self._tables = {}
        self._own = []

    @property
    def backend(self):
        return self._backend

    def close(self):
        if getattr(self, "_h", None):
            for t in list(self._tables.values()) + self._own:
                t.close()
            self._lib.kvtier_detach(self._h)
            self._h = None

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()

    def __del__(self):
        self.close()

    def seq_create(self):
        s = ctypes.c_uint32()
        _check(self._lib.kvtier_seq_create(self._h, ctypes.byref(s)), "seq_create")
        return s.value

    def seq_close(self, seq):
        _check(self._lib.kvtier_seq_close(self._h, seq), "seq_close")

    def seq_fork(self, parent, prefix_tokens):
        s = ctypes.c_uint32()
        _check(self._lib.kvtier_seq_fork(self._h, parent, prefix_tokens, ctypes.byref(s)),
               "seq_fork")
        return s.value

    SEQ_CREATE, SEQ_EXCL = 1, 2

    def seq_open(self, name, create=False, exclusive=False):
        """A named sequence, kept by the daemon across detaches and restarts:
        (seq, tokens it already holds in every layer)."""
        s, n = ctypes.c_uint32(), ctypes.c_uint32()
        flags = (self.SEQ_CREATE if create else 0) | (self.SEQ_EXCL if exclusive else 0)
        _check(self._lib.kvtier_seq_open(self._h, name.encode(), flags, ctypes.byref(s),
                                         ctypes.byref(n)), "seq_open")
        return s.value, n.value

    def seq_sync(self, seq):
        """Waits until every full page of seq is on NVMe: the tokens so covered."""
        n = ctypes.c_uint32()
        _check(self._lib.kvtier_seq_sync(self._h, seq, ctypes.byref(n)), "seq_sync")
        return n.value

    def seq_remove(self, name):
        _check(self._lib.kvtier_seq_remove(self._h, name.encode()), "seq_remove")

    def seq_tokens(self, seq, layer=0):
        n = ctypes.c_uint32()
        _check(self._lib.kvtier_seq_tokens(self._h, seq, layer, ctypes.byref(n)), "seq_tokens")
        return n.value

    def append(self, seq, layer, k, v):
        """k, v: [ntok, kv_heads, head_dim] in the layout's dtype."""
        ntok = k.shape[0]
        kp, km, kk = _ptr(k)
        vp, vm, vk = _ptr(v)
        _check(self._lib.kvtier_append(self._h, seq, layer, kp, vp, ntok, km), "append")

    def _dev_ptr(self, x, what):
        """(address, keepalive) of a tensor the device reads in place: contiguous, and a
        CUDA tensor when the backend is cuda (a host address would fault the kernel)."""
        if hasattr(x, "is_contiguous") and not x.is_contiguous():
            raise ValueError(f"{what}: tensors must be contiguous")
        p, m, keep = _ptr(x)
        if self._backend != "cpu" and not m:
            raise ValueError(f"{what}: tensors must be in device memory (backend {self._backend})")
        return p, keep

    def append_async(self, seq, layer, k, v, stream=None):
        """k, v: [ntok, kv_heads, head_dim] in device memory, queued on stream (the
        fast path: the page still filling stays with the client until full)."""
        kp, kk = self._dev_ptr(k, "append_async")
        vp, vk = self._dev_ptr(v, "append_async")
        _check(self._lib.kvtier_append_async(self._h, seq, layer, kp, vp, k.shape[0],
                                             _stream_ptr(stream, k)), "append_async")

    def append_batch_async(self, seqs, layer, k, v, stream=None):
        """One token of each of seqs to layer in one call: k, v [len(seqs), kv_heads,
        head_dim] in device memory (row i is seqs[i]'s), queued on stream."""
        n = len(seqs)
        if k.shape[0] != n or v.shape[0] != n:
            raise ValueError("append_batch_async: k and v need one row per sequence")
        kp, kk = self._dev_ptr(k, "append_batch_async")
        vp, vk = self._dev_ptr(v, "append_batch_async")
        ids = (ctypes.c_uint32 * n)(*seqs)
        _check(self._lib.kvtier_append_batch_async(self._h, ids, n, layer, kp, vp,
                                                   _stream_ptr(stream, k)), "append_batch_async")

    def select_async(self, seqs, layer, q, budget_pages, sink_tokens=64, window_tokens=256,
                     top_p=None, estimate=False, host_gap=0.0, wait_us=0, table=None,
                     stream=None):
        """The fast path's select: made on stream by this process's device from the
        daemon's summaries and map (q in device memory), no round trip; pages not leased
        yet are left out (the daemon leases them for the next steps), those that may
        matter wait up to wait_us (0: the library's default, < 0: never). estimate: the
        attention adds an estimate of the pages left out. Returns the Table (as
        select()); attend_async on the same stream reads it."""
        n = len(seqs)
        t = table if table is not None else self._tables.get(n)
        if t is None:
            t = self._tables[n] = Table(self, n)
        ids = (ctypes.c_uint32 * n)(*seqs)
        qp, qk = self._dev_ptr(q, "select_async")
        p = _SelParams(budget_pages, sink_tokens, window_tokens, 1 if top_p is not None else 0,
                       top_p or 0.0, SEL_ESTIMATE if estimate else 0, host_gap, wait_us)
        _check(self._lib.kvtier_select_async(self._h, ids, n, layer, qp, ctypes.byref(p), t._t,
                                             _stream_ptr(stream, q)), "select_async")
        return t

    def table(self, max_seqs=1):
        """A table of its own for select(table=...): one per layer keeps the layers of a
        pipeline of attend_async() apart (a select into a table waits for the attend
        still queued on it)."""
        t = Table(self, max_seqs)
        self._own.append(t)
        return t

    def select(self, seqs, layer, q, budget_pages, sink_tokens=64, window_tokens=256,
               top_p=None, substitute=False, table=None):
        """Selects the pages of layer for q and makes them readable (GPU pool, or
        pinned host RAM read in place); returns a Table: the one given, or one the
        client keeps per batch size (overwritten by the next select of that size)."""
        n = len(seqs)
        t = table if table is not None else self._tables.get(n)
        if t is None:
            t = self._tables[n] = Table(self, n)
        ids = (ctypes.c_uint32 * n)(*seqs)
        qp, qm, qk = _ptr(q)
        p = _SelParams(budget_pages, sink_tokens, window_tokens, 1 if top_p is not None else 0,
                       top_p or 0.0, SEL_SUBSTITUTE if substitute else 0)
        _check(self._lib.kvtier_select(self._h, ids, n, layer, qp, qm, ctypes.byref(p), t._t),
               "select")
        return t

    def _attend_io(self, q, out, lse, scale):
        """(q, out, lse pointers, q's memory flag, scale, out, keepalive) of an attend;
        out like q, allocated if None."""
        if out is None:
            if hasattr(q, "data_ptr"):
                import torch
                out = torch.empty_like(q)
            else:
                import numpy as np
                out = np.empty_like(q)
        qp, qm, qk = _ptr(q)
        op, om, ok = _ptr(out)
        lp = _ptr(lse)[0] if lse is not None else None
        s = scale if scale is not None else self.head_dim ** -0.5
        return qp, op, lp, qm, s, out, (qk, ok)

    def attend(self, table, q, out=None, lse=None, scale=None):
        """Sparse attention over the table; out like q (allocated if None)."""
        qp, op, lp, qm, s, out, keep = self._attend_io(q, out, lse, scale)
        _check(self._lib.kvtier_attend(self._h, table._t, qp, op, lp, s, qm), "attend")
        return out

    def attend_async(self, table, q, out=None, lse=None, scale=None, stream=None):
        """attend() queued on a CUDA stream without waiting (contiguous torch tensors on
        the GPU; stream: a torch.cuda.Stream, default the current one). The daemon keeps
        the table's pages in their slots until it has run; a select into the same table
        or an append to its layer waits for it. Returns out, valid once the stream has
        run. On the cpu backend it completes before returning, like attend()."""
        for x in (q, out, lse):  # a contiguous copy would be freed under the kernel
            if x is not None and hasattr(x, "is_contiguous") and not x.is_contiguous():
                raise ValueError("attend_async: tensors must be contiguous")
        qp, op, lp, qm, s, out, keep = self._attend_io(q, out, lse, scale)
        _check(self._lib.kvtier_attend_async(self._h, table._t, qp, op, lp, s,
                                             _stream_ptr(stream, q)), "attend_async")
        return out

    def table_ready(self, table, stream=None):
        """Orders work queued on stream (an engine's own kernels over memory()) after the
        daemon's copies of the table's pages into the GPU pool, which a select on a GPU
        may return before."""
        _check(self._lib.kvtier_table_ready(self._h, table._t, _stream_ptr(stream, None)),
               "table_ready")

    def reads_fence(self, stream=None):
        """Marks the end of reads of table pages queued on stream (an engine's own kernels
        over memory()): no slot a later select lets go of is reused before they run."""
        _check(self._lib.kvtier_reads_fence(self._h, _stream_ptr(stream, None)), "reads_fence")

    def reads_hold(self):
        """Host threads of this process read table pages: slots stay until reads_release()."""
        self._lib.kvtier_reads_hold(self._h)

    def reads_release(self):
        self._lib.kvtier_reads_release(self._h)

    def memory(self):
        m = _Memory()
        self._lib.kvtier_memory(self._h, ctypes.byref(m))
        return {"pool": m.pool, "pool_bytes": m.pool_bytes, "slot_bytes": m.slot_bytes,
                "tail_pool": m.tail_pool, "host_pool": m.host_pool,
                "host_slot_bytes": m.host_slot_bytes}

    def stats(self, seq=None):
        """The prefetcher's counters (kvtier_prefetch_stats) of a sequence or, with
        None, of this client, as a dict; lat_gpu/lat_host are lists of log2-us buckets."""
        st = _Stats()
        _check(self._lib.kvtier_stats(self._h, 0xFFFFFFFF if seq is None else seq,
                                      ctypes.byref(st)), "stats")
        d = {n: getattr(st, n) for n in STATS_FIELDS}
        d["lat_gpu"], d["lat_host"] = list(st.lat_gpu), list(st.lat_host)
        return d

    def nop(self):
        _check(self._lib.kvtier_nop(self._h), "nop")
