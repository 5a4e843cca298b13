#!/usr/bin/env python3
"""Where a decode step's device time goes, from tools/cupti_trace.c's records.

    trace_steps.py TRACE_DIR

The bench's process is the trace with the most attention kernels. Its steps end with the
download of the step's outputs (a device-to-host copy of --out-bytes, the bench's
L x rows x G x D outputs); a step with a kernel only libkvtier's fast path launches
(KVTIER_ONLY) is kvtier's, else sparse's (the run: --methods sparse,kvtier). For each method: the step's span
(its first cache write to its last attention), the time the device was busy with anything of this
process, each kernel's count and mean time a step, and the idle gaps on the stream
the step's attention runs on; then one median step's ops in order.
"""
import collections
import glob
import os
import statistics
import sys

# the staging's put, resolve alone or fused into the selection (select_kernel<true>)
KVTIER_ONLY = ("put_words_kernel", "resolve_kernel", "select_kernelILb1E")


def load(path):
    ops = []
    with open(path) as f:
        for line in f:
            p = line.split(" ", 5)
            if len(p) < 6:
                continue
            kind, t0, t1, stream, nbytes, name = p
            ops.append((int(t0), int(t1), kind, int(stream), int(nbytes), name.strip()))
    ops.sort()
    return ops


def short(name):
    n = name.split("(")[0]
    n = n.split("<")[0]
    return n.replace("void ", "").strip() or name[:40]


def union(iv):
    tot, end = 0, None
    for a, b in sorted(iv):
        if end is None or a > end:
            tot += b - a
            end = b
        elif b > end:
            tot += b - end
            end = b
    return tot


def main():
    d = sys.argv[1]
    out_bytes = int(sys.argv[2]) if len(sys.argv) > 2 else 32 * 32 * 128 * 2
    def attends(path):
        with open(path) as f:
            return sum("attend" in line for line in f)

    traces = sorted((t for t in glob.glob(os.path.join(d, "trace.*.txt")) if os.path.getsize(t)),
                    key=attends)
    if not traces:
        sys.exit("no traces in " + d)
    ops = load(traces[-1])
    print(f"{traces[-1]}: {len(ops)} ops; other processes: "
          + ", ".join(f"{os.path.basename(t)} {os.path.getsize(t)} B" for t in traces[:-1]))
    ends = [i for i, o in enumerate(ops) if o[2] == "C" and o[4] == out_bytes and o[5].endswith(" 2")]
    steps = collections.defaultdict(list)
    start = 0
    for e in ends:
        body = [o for o in ops[start:e] if o[2] != "C" or o[4] != out_bytes]
        start = e + 1
        # the step's ops: after the last host-to-device copy of the metadata that
        # precedes the first kernel of the step is part of it too
        ks = [o for o in body if o[2] == "K"]
        if not ks:
            continue
        meth = "kvtier" if any(k in o[5] for o in ks for k in KVTIER_ONLY) else "sparse"
        # the step: from its first put_rows (the first layer's cache write) to its last
        # attention (what the bench reads after the step, its tables, is not the step's)
        first = next((i for i, o in enumerate(body) if "put_rows" in o[5]), 0)
        last = max(i for i, o in enumerate(body) if "attend" in o[5])
        steps[meth].append(body[first:last + 1])
    for meth, sl in steps.items():
        sl = sl[1:] if len(sl) > 2 else sl
        spans = [s[-1][1] - s[0][0] for s in sl]
        busy = [union([(o[0], o[1]) for o in s]) for s in sl]
        print(f"\n== {meth}: {len(sl)} steps; span p50 {statistics.median(spans) / 1e3:.1f} us, "
              f"device busy p50 {statistics.median(busy) / 1e3:.1f} us")
        per = collections.defaultdict(list)
        for s in sl:
            c = collections.Counter()
            t = collections.Counter()
            for o in s:
                k = (o[2], short(o[5]) if o[2] == "K" else o[5], o[3])
                c[k] += 1
                t[k] += o[1] - o[0]
            for k in c:
                per[k].append((c[k], t[k]))
        print(f"{'op':>40} {'stream':>6} {'n/step':>7} {'us/step':>8} {'us each':>8}")
        for k, v in sorted(per.items(), key=lambda kv: -sum(x[1] for x in kv[1])):
            n = statistics.mean(x[0] for x in v)
            us = statistics.mean(x[1] for x in v) / 1e3
            print(f"{k[0] + ' ' + k[1][:38]:>40} {k[2]:>6} {n:7.1f} {us:8.1f} {us / n:8.2f}")
        # the attention's stream: gaps between its consecutive ops
        att_stream = collections.Counter(o[3] for s in sl for o in s if "attend" in o[5])
        if att_stream:
            st = att_stream.most_common(1)[0][0]
            gaps = collections.defaultdict(list)
            for s in sl:
                on = [o for o in s if o[3] == st]
                for a, b in zip(on, on[1:]):
                    gaps[(short(a[5]) if a[2] == "K" else a[2], short(b[5]) if b[2] == "K" else b[2])].append(
                        max(0, b[0] - a[1]))
            print(f"gaps on stream {st} (the attention's), before -> after: mean us, per step")
            for k, v in sorted(gaps.items(), key=lambda kv: -sum(kv[1])):
                print(f"  {k[0][:30]:>30} -> {k[1][:30]:<30} {statistics.mean(v) / 1e3:7.2f} us x "
                      f"{len(v) / len(sl):5.1f}")
        mid = sorted(range(len(sl)), key=lambda i: spans[i])[len(sl) // 2]
        s = sl[mid]
        print(f"median step ({spans[mid] / 1e3:.1f} us), first 40 ops: start us, length us, stream, op")
        for o in s[:40]:
            print(f"  {(o[0] - s[0][0]) / 1e3:8.2f} {(o[1] - o[0]) / 1e3:7.2f} {o[3]:>4} {o[2]} "
                  f"{short(o[5]) if o[2] == 'K' else o[5]}")


if __name__ == "__main__":
    main()
