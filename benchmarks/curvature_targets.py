"""Issue 14's CPU figures, one run per model: per-probe cost against one gradient, interleaved repeats."""
import json, sys, time, resource
import torch
import optim
from optim.hessian.hvp import compile_seconds, first_order_graph
from benchmarks._models import gpt_case, mlp_case, sequence_cross_entropy
from benchmarks._timing import time_interleaved_ms
torch.set_num_threads(int(sys.argv[2]))
dev = torch.device("cpu")
case = {"mlp": mlp_case, "gpt": gpt_case}[sys.argv[1]](dev, False)
case.model.eval()
params = [p.detach() for p in case.params]
f = case.loss_of_params(sequence_cross_entropy)
k = 8
g = torch.Generator().manual_seed(0)
v1 = [torch.randn(p.shape, generator=g) for p in params]
v8 = [torch.randn((k, *p.shape), generator=g) for p in params]
batch = (case.inputs, case.targets)
def gradient():
    leaves = [p.detach().requires_grad_() for p in params]
    return torch.autograd.grad(f(*leaves), leaves)
def double_backward():  # torch's own: grad with create_graph, then a vector-Jacobian product of it
    leaves = [p.detach().requires_grad_() for p in params]
    gr = torch.autograd.grad(f(*leaves), leaves, create_graph=True)
    return torch.autograd.grad(gr, leaves, v1)
def plain_loop8():  # a plain loop of second backwards on one retained graph
    leaves = [p.detach().requires_grad_() for p in params]
    gr = torch.autograd.grad(f(*leaves), leaves, create_graph=True)
    return [torch.autograd.grad(gr, leaves, [t[j] for t in v8], retain_graph=j < k - 1) for j in range(k)]
H = optim.HessianOperator(case.model, sequence_cross_entropy, batch)
flat8 = H.flatten(v8)
G = optim.GGNOperator(case.model, optim.hessian.cross_entropy, batch)
flat1 = H.flatten(v1)
methods = {
    "gradient": gradient,
    "torch double backward k=1": double_backward,
    "plain loop k=8 (per probe)": plain_loop8,
    "optim.hvp k=1": lambda: optim.hvp(f, params, v1),
    "optim.hvp k=8 (per probe)": lambda: optim.hvp(f, params, v8),
    "HessianOperator kept k=8 (per probe)": lambda: H @ flat8,
    "GGNOperator kept k=1": lambda: G @ flat1,
    "GGNOperator kept k=8 (per probe)": lambda: G @ flat8,
    "optim.hvp compile=True k=1": lambda: optim.hvp(f, params, v1, compile=True),
}
start = time.perf_counter(); methods["optim.hvp compile=True k=1"](); compile_s = time.perf_counter() - start
for name, fn in methods.items():
    fn()  # warm (the k=8 blocks measure vmap against the loop here)
t = time_interleaved_ms(methods, dev, warmup=1, repeats=5)
base = t["gradient"].median_ms
rows = {n: {"ms": x.median_ms, "x_gradient_per_probe": x.median_ms / base / (k if "(per probe)" in n else 1)} for n, x in t.items()}
from optim.hessian.hvp import batching_choice
print(json.dumps({"model": case.description, "numel": case.numel, "threads": torch.get_num_threads(),
                  "compile_seconds_first_call": compile_s, "batching_choice_hvp_k8": batching_choice(f, k),
                  "batching_choice_operator_k8": batching_choice(H, k),
                  "max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, "rows": rows}, indent=1))
