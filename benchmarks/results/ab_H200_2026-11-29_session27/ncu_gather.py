import sys
sys.path.insert(0, "benchmarks")
import torch  # noqa: E402
from kernels import make_layers  # noqa: E402
from zephyr_plugins.kernel_ops import gptq_gemm_repacked  # noqa: E402

k, n, act, m = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4])
L = make_layers(k, n, 4, 128, act, torch.float16, 1)[0]
x = torch.randn(m, k, device="cuda", dtype=torch.float16)
for _ in range(6):
    gptq_gemm_repacked(x, L._zk_qweight, L._zk_scales, L._zk_zeros, L._zk_perm, L._zk_locks, 4, 128, n, 4)
torch.cuda.synchronize()
