"""Per-kernel device time of the WS path (kernel=4) at large M; plus a forced-split sweep in graphs."""
import collections
import os
import sys

sys.path.insert(0, "benchmarks")
import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from kernels import SHAPES, make_layers, time_graph  # noqa: E402
from zephyr_plugins.kernel_ops import gptq_gemm_repacked  # noqa: E402

MS = [int(v) for v in os.environ.get("MS", "256,512,1024").split(",")]
sweep = os.environ.get("SWEEP", "1") == "1"
for act in (True, False):
    for sname, (k, n) in SHAPES.items():
        layers = make_layers(k, n, 4, 128, act, torch.float16, 4)
        w16 = [torch.randn(k, n, device="cuda", dtype=torch.float16) for _ in range(2)]
        for m in MS:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            f = lambda L, s=0: gptq_gemm_repacked(x, L._zk_qweight, L._zk_scales, L._zk_zeros, L._zk_perm,  # noqa
                                                  L._zk_locks, 4, 128, n, 4, s)
            for L in layers:
                f(L)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    for L in layers:
                        f(L)
                torch.cuda.synchronize()
            agg = collections.defaultdict(list)
            for e in prof.events():
                if e.device_type == torch.autograd.DeviceType.CUDA:
                    agg[e.name[:60]].append(e.device_time)
            calls = 5 * len(layers)
            parts = "  ".join(f"{nm}: n/call={len(v)/calls:.0f} mean={sum(v)/len(v):.1f}" for nm, v in agg.items())
            g = time_graph([lambda L=L: f(L) for L in layers])
            fp = time_graph([lambda W=W: x @ W for W in w16])
            line = f"act={int(act)} {sname} M={m} graph={g:.1f} fp16={fp:.1f} | {parts}"
            if sweep:
                sw = []
                for s in (1, 2, 3, 4, 6, 8):
                    try:
                        sw.append(f"S{s}={time_graph([lambda L=L: f(L, s) for L in layers]):.1f}")
                    except Exception as exc:  # noqa: BLE001
                        sw.append(f"S{s}=err({str(exc)[:40]})")
                line += " | " + " ".join(sw)
            print(line, flush=True)
        del layers
