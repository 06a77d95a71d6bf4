"""Host work per adapted linear: aten ops dispatched by one forward + backward (issue 13, section 2).

    python -m lorsbench.bench.host_ops [--tokens 64] [--out results/efficiency/host_ops.md]

A batch-1 training step on a GPU is bound by the host launching kernels (results/efficiency/README.md),
so the count of aten ops one adapted linear dispatches is a device-independent proxy for its host cost. Every
registered method is built from its conf/method YAML defaults (`bench.cell.compose_cell`, r 16) and attached to a
2-layer random LLaMA (hidden 32: compute is negligible) in bf16 on the CPU; the first adapted linear runs `y = m(x); y.backward(g)`
under a counting `TorchDispatchMode`. Views (`t`, `view`, ...) are counted apart: they launch no kernel. On the
CPU the LoRS methods take `kernel=torch` (the Triton paths need CUDA). `--device cuda` adds the kernels each call
runs (torch.profiler) and the host's time per call (at these shapes the GPU waits for the host), which on the CPU
would be dominated by its slow bf16 arithmetic instead.
"""
from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lorsbench.records import write_text_atomic

VIEW_OPS = frozenset({"t", "view", "alias", "unsqueeze", "expand", "slice", "reshape", "transpose", "_unsafe_view",
                      "as_strided", "detach"})


class OpCounter(TorchDispatchMode):
    """Counts every aten op dispatched while active (forward and autograd's backward alike)."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def count_ops(module: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor) -> collections.Counter[str]:
    """aten ops of `module(x).backward(grad)` (after one untimed call, so lazy setup is not counted)."""
    module(x).backward(grad)
    with OpCounter() as counter:
        module(x).backward(grad)
    return counter.ops


def device_kernels(module: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor) -> int:
    """Kernels (and device copies/memsets) one `module(x).backward(grad)` runs on the GPU (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        module(x).backward(grad)
        torch.cuda.synchronize()
    return sum(1 for event in prof.events() if event.device_type == torch.autograd.DeviceType.CUDA)


def host_us(module: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor, repeats: int) -> float:
    """Mean wall time of back-to-back `module(x).backward(grad)` calls, synchronized once per block of 10: at
    these shapes the GPU drains its queue faster than the host fills it, so this is the host's time per call."""
    blocks = []
    for _ in range(max(1, repeats // 10)):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(10):
            module(x).backward(grad)
        torch.cuda.synchronize()
        blocks.append((time.perf_counter() - t0) / 10)
    return statistics.median(blocks) * 1e6


def method_row(name: str, tokens: int, repeats: int, device: torch.device) -> dict | None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorsbench.bench.cell import CellSpec, compose_cell
    from lorsbench.modules import target_linears
    from lorsbench.pruning import build_pruner
    from lorsbench.registry import MethodContext, build_method

    torch.manual_seed(0)
    cfg = compose_cell(CellSpec(method=name, rank=16))  # the bench's protocol: magnitude 2:4, r 16, init=lora
    targets = cfg.pruning.targets
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1)).to(device, torch.bfloat16)
    masks = build_pruner(cfg.pruning).prune(model, None, keep_on_device=True)
    first = next(iter(target_linears(model, targets)))  # the first adapted linear, by its module name
    method = build_method(cfg.method)
    method.attach(model, masks, MethodContext(targets=targets, device=device, dtype=torch.bfloat16,
                                              generator=torch.Generator().manual_seed(0)))
    module = model.get_submodule(first)
    if type(module) is torch.nn.Linear:  # the method left it a plain linear (none): no adapter to count
        return None
    model.train()
    x = torch.randn(tokens, module.in_features, device=device, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(tokens, module.out_features, device=device, dtype=torch.bfloat16)
    ops = count_ops(module, x, grad)
    views = sum(n for op, n in ops.items() if op in VIEW_OPS)
    cuda = device.type == "cuda"
    return {"method": name, "aten_ops": sum(ops.values()), "non_view_ops": sum(ops.values()) - views,
            "kernels": device_kernels(module, x, grad) if cuda else None,
            "host_us": host_us(module, x, grad, repeats) if cuda else None,
            "ops": ", ".join(f"{op} {n}" for op, n in sorted(ops.items(), key=lambda item: (-item[1], item[0])))}


def table(rows: list[dict], tokens: int, device: torch.device) -> str:
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    lines = [f"# Host work per adapted linear: one forward + backward ({date}, {where}, torch {torch.__version__}, "
             f"bf16, {tokens} tokens, first adapted linear of a 2-layer hidden-32 LLaMA, 2:4, conf/method "
             "defaults, r 16)", "",
             "Written by `python -m lorsbench.bench.host_ops`. kernels: device kernels + copies the call runs; "
             "host µs: the host's time per call (CUDA only; see the module docstring).", "",
             "| method | aten ops | non-view ops | kernels | host µs | ops |", "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        kernels = "" if r["kernels"] is None else r["kernels"]
        host = "" if r["host_us"] is None else f"{r['host_us']:.0f}"
        lines.append(f"| {r['method']} | {r['aten_ops']} | {r['non_view_ops']} | {kernels} | {host} | {r['ops']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from lorsbench.registry import list_methods

    parser = argparse.ArgumentParser(prog="python -m lorsbench.bench.host_ops", description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--methods", nargs="*", default=None, help="registry names (default: all)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda (cuda adds kernel and host-time columns)")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    device = torch.device(args.device)
    names = args.methods or list_methods()
    rows = [row for name in names if (row := method_row(name, args.tokens, args.repeats, device))]
    text = table(rows, args.tokens, device)
    if args.out is not None:
        write_text_atomic(args.out, text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
