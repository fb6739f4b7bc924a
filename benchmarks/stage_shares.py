"""Why a gated model's measured speed-up falls short of the one its FLOPs promise: each stage's share
of the MACs against its share of the time, and its time at the batch sizes the exits leave it.

For a ``dgate export`` directory, on one device: every stage timed on ``--batch`` inputs and on
the survivors of the exit shares given (``--exits``, as ``dgate bench`` reports them; default: the
calibration's), and each gate (its decision as the runtime makes it, with the model's decision
backends, then a gather of half its rows). Prints the speed-up the MACs promise, and the ones
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
from dgate_cli.runtime.decisions import decide


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
    ap.add_argument(
        "--exits", help="share of all inputs leaving at each gate, e.g. 0.28,0.20,0.19 (default: the calibration's)"
    )
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    device = torch.device(a.device)
    if device.type == "cpu":
        tune_malloc()  # as the dgate command line does: without it CPU stage times are not dgate bench's
    model = load(a.model, device=device)
    stages = list(model.stages)
    if a.exits is None:
        chosen = model.manifest.get("calibration", {}).get("chosen", {}).get("exit_fractions")
        if not chosen:
            ap.error("the export records no calibrated exit shares: give --exits")
        a.exits = ",".join(f"{e:.3f}" for e in chosen[:-1])
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
                timed_ms(lambda g=g, hk=hk: decision(model, g, hk), device)
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
    info = {
        "model": a.model,
        "device": str(device),
        "batch": n,
        "exits": a.exits,
        "backends": ", ".join(b.name for b in model.backends) or "reference",
        "speedup_macs_promise": round(promised, 3),
        "speedup_stage_time_shares": round(by_share, 3),
        "speedup_survivor_stage_times": round(at_rows, 3),
        "speedup_with_gates": round(with_gates, 3),
    }
    title = "each stage's share of the MACs and of the time; its time on the rows the exits leave it"
    emit({"stages": (title, rows)}, a.json, info)
    if not a.json:
        print(
            f"(of the MACs' promise: {by_share / promised:.3f}, {at_rows / promised:.3f}, {with_gates / promised:.3f})"
        )


def decision(model, g: int, h: torch.Tensor):
    """Gate ``g``'s decision on ``h`` as the runtime makes it: the first backend that answers, else
    the reference (a threshold no score reaches if the gate is closed: the gate still runs)."""
    t = model.thresholds[g]
    t = t if t != float("inf") else float(torch.finfo(torch.float32).max)
    for backend in model.backends:
        d = backend.decide(g, model.gates[g], h, t, model.score)
        if d is not None:
            return d
    return decide(model.gates[g], h, t, model.score)


if __name__ == "__main__":
    main()
