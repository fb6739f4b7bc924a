"""Why a gated model's measured speed-up falls short of the one its FLOPs promise: each stage's share
of the MACs against its share of the time, and its time at the batch sizes the exits leave it.

For a ``dgate export`` directory, on one device: every stage timed on ``--batch`` inputs and on
the survivors of the exit shares given (``--exits``, as ``dgate bench`` reports them), and each
gate (outputs, then a gather of half its rows). Prints the speed-up the MACs promise, and the ones
the measured stage times allow - what no runtime can beat on that machine. Random inputs at the
model's input size (the timing does not depend on the values). GPU times by CUDA events; on a CPU,
wall time.

    python benchmarks/stage_shares.py /tmp/r50 --device cuda --batch 256 --exits 0.28,0.20,0.19
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import emit

from dgate_cli import load, tune_malloc


def timed_ms(fn, device: torch.device, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    ts = []
    for _ in range(reps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            ts.append(1e3 * (time.perf_counter() - t))
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a dgate export directory")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--exits", required=True, help="share of all inputs leaving at each gate, e.g. 0.28,0.20,0.19")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    device = torch.device(a.device)
    if device.type == "cpu":
        tune_malloc()  # as the dgate command line does: without it CPU stage times are not dgate bench's
    model = load(a.model, device=device)
    stages = list(model.stages)
    exits = [float(e) for e in a.exits.split(",")]
    if len(exits) != model.num_gates:
        ap.error(f"--exits needs one share per gate ({model.num_gates})")
    n = a.batch
    sizes, alive = [n], n
    for e in exits:
        alive = max(1, round(alive - e * n))
        sizes.append(alive)
    reach = model.reach_costs
    macs = [reach[0]] + [reach[i] - reach[i - 1] for i in range(1, len(reach))]
    side = int(model.manifest.get("input_size", 224))
    x = torch.randn(n, 3, side, side, device=device)
    if model.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    full, part, gate_ms = [], [], []
    with torch.inference_mode():
        ins, h = [], x
        for st in stages:
            ins.append(h)
            h = st(h)
        for k, st in enumerate(stages):
            full.append(timed_ms(lambda st=st, k=k: st(ins[k]), device))
            xk = ins[k][: sizes[k]].clone()
            part.append(timed_ms(lambda st=st, xk=xk: st(xk), device))
        for g in range(model.num_gates):
            hk = stages[g](ins[g][: sizes[g]].clone())
            idx = torch.arange(0, sizes[g], 2, device=device)
            gate_ms.append(
                timed_ms(lambda g=g, hk=hk: model.gate_outputs(g, hk), device)
                + timed_ms(lambda hk=hk, idx=idx: hk[idx], device)
            )
    tot_m, tot_t = sum(macs), sum(full)
    rows = [
        {
            "stage": k,
            "macs_pct": round(100 * macs[k] / tot_m, 1),
            f"ms_at_{n}": round(full[k], 3),
            "time_pct": round(100 * full[k] / tot_t, 1),
            "rows": sizes[k],
            "ms_at_rows": round(part[k], 3),
            "per_row_efficiency": round((full[k] / n) / (part[k] / sizes[k]), 3),
            "gate_ms": round(gate_ms[k], 3) if k < len(gate_ms) else None,
        }
        for k in range(len(stages))
    ]
    promised = tot_m / sum(m * s / n for m, s in zip(macs, sizes, strict=True))
    by_share = tot_t / sum(full[k] * sizes[k] / n for k in range(len(stages)))
    at_rows = tot_t / sum(part)
    with_gates = tot_t / (sum(part) + sum(gate_ms))
    emit(rows, a.json, title=f"{a.model} on {device}, batch {n}, exits {a.exits}")
    if not a.json:
        print(f"speed-up the MACs promise (gates free): {promised:.3f}")
        print(f"  with each stage's time share at {n}: {by_share:.3f} ({by_share / promised:.3f} of it)")
        print(f"  with stage times at the survivor batch sizes: {at_rows:.3f} ({at_rows / promised:.3f})")
        print(f"  and the gates (outputs + gather): {with_gates:.3f} ({with_gates / promised:.3f})")


if __name__ == "__main__":
    main()
