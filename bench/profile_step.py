"""Where the time of gangen's training step goes: torch.profiler over timed batches of the real fit loop.

    python bench/profile_step.py --steps 3 --warmup 1                          # CPU, 64x64, batch 64
    python bench/profile_step.py --device cuda --batch_size 1024 --variant gangen --steps 20

Runs bench/throughput.py's gangen fit (same config, same variants) with a profiler switched on from batch
`--warmup` for `--steps` batches, then prints the top operators / kernels by self time on the device
(CUDA) or the CPU, and the share of the top rows. For CUDA-graph variants the replayed kernels are not
listed one by one: profile the eager variant (at batch 1024 it runs as fast, README Speed).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import lightning.pytorch as L
import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # bench/, gangen
from throughput import EXPERIMENT_VARIANTS, VARIANTS, run_gangen, variant  # noqa: E402


class Profiled(L.Callback):
    """A torch.profiler session from batch `start` to batch `start + steps - 1`."""

    def __init__(self, start: int, steps: int, cuda: bool, shapes: bool = False) -> None:
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        self.start, self.stop, self.cuda = start, start + steps - 1, cuda
        self.prof = profile(activities=activities, record_shapes=shapes)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.start:
            self.prof.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == self.stop:
            if self.cuda:
                torch.cuda.synchronize()
            self.prof.__exit__(None, None, None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--variant", default="gangen", choices=[*VARIANTS, *EXPERIMENT_VARIANTS])
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--steps", type=int, default=10, help="profiled batches")
    p.add_argument("--warmup", type=int, default=5, help="batches before the profiler starts")
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--shapes", action="store_true", help="also list operators by input shapes (their kernels' time)")
    p.add_argument("--callers", default="", help="also list who called this operator (e.g. aten::copy_)")
    p.add_argument("--root", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    args = p.parse_args()
    args.batch = args.batch_size
    cuda = args.device == "cuda"
    prof = Profiled(args.warmup, args.steps, cuda, args.shapes or bool(args.callers))
    overrides, experiments = variant(args.variant)
    result = run_gangen(args, overrides, callbacks=(prof,), experiments=experiments)
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = prof.prof.key_averages()
    # on CUDA an operator's self device time is the time of the kernels it launched: count kernels only
    total = sum(getattr(e, key) for e in events if not cuda or e.device_type == DeviceType.CUDA)
    top = sorted(events, key=lambda e: getattr(e, key), reverse=True)[: args.rows]
    print(f"{args.variant}, {args.device}, batch {args.batch}, {args.resolution}x{args.resolution}: "
          f"{result['img_s']:.0f} img/s with the profiler on; {args.steps} batches, self time {total / 1e3:.1f} ms "
          f"({total / 1e3 / args.steps:.2f} ms per batch{', kernels' if cuda else ''})")  # fmt: skip
    print(f"{'self ms':>9} {'share':>6} {'calls':>6}  name")
    for e in top:
        t = getattr(e, key)
        print(f"{t / 1e3:9.2f} {t / total:6.1%} {e.count:6d}  {e.key[:110]}")
    print(f"top {len(top)} rows: {sum(getattr(e, key) for e in top) / total:.1%} of the self time")
    if args.shapes:  # operators (not kernels) by input shapes, with the time of the kernels each launched
        by_shape = prof.prof.key_averages(group_by_input_shape=True)
        ops = [e for e in by_shape if e.device_type == DeviceType.CPU and getattr(e, key) > 0]
        print(f"{'self ms':>9} {'share':>6} {'calls':>6}  operator [input shapes]")
        for e in sorted(ops, key=lambda e: getattr(e, key), reverse=True)[: args.rows]:
            t = getattr(e, key)
            print(f"{t / 1e3:9.2f} {t / total:6.1%} {e.count:6d}  {e.key} {str(e.input_shapes)[:150]}")
    if args.callers:  # who called the operators named --callers: their parent chains, by kernel time
        chains: dict[str, list[float]] = {}
        for e in prof.prof.events():
            if e.name == args.callers and e.device_type == DeviceType.CPU and getattr(e, key) > 0:
                names, parent = [], e.cpu_parent
                while parent is not None and len(names) < 4:
                    names.append(parent.name[:60])
                    parent = parent.cpu_parent
                chain = f"{e.input_shapes[0] if e.input_shapes else ''} <- {' <- '.join(names) or '(top level)'}"
                entry = chains.setdefault(chain, [0.0, 0])
                entry[0] += getattr(e, key)
                entry[1] += 1
        print(f"{'self ms':>9} {'calls':>6}  {args.callers} [first input shape] <- callers")
        for chain, (t, count) in sorted(chains.items(), key=lambda kv: -kv[1][0])[:12]:
            print(f"{t / 1e3:9.2f} {count:6d}  {chain[:200]}")
    if cuda:  # kernels by kind: where a GPU-bound step's time goes
        kinds: dict[str, list[float]] = {}
        for e in events:
            if e.device_type == DeviceType.CUDA:
                kind = kinds.setdefault(kernel_kind(e.key), [0.0, 0])
                kind[0] += getattr(e, key)
                kind[1] += e.count
        print(f"{'self ms':>9} {'share':>6} {'calls':>6}  kind")
        for kind, (t, count) in sorted(kinds.items(), key=lambda kv: -kv[1][0]):
            print(f"{t / 1e3:9.2f} {t / total:6.1%} {count:6d}  {kind}")


KINDS = (  # (kind, substrings of a CUDA kernel's name), first match wins
    ("batchnorm", ("batch_norm", "batchnorm", "bn_fw", "bn_bw", "welford")),
    ("optimizer", ("adam", "foreach", "lerp")),
    ("convolution / GEMM", ("conv", "gemm", "cutlass", "xmma", "sm90", "sm80", "dgrad", "wgrad", "implicit")),
    ("copy / layout", ("copy", "transpose", "nchw", "nhwc", "memcpy", "memset", "fill")),
    ("reduction", ("reduce",)),
    ("elementwise", ("elementwise", "vectorized", "unrolled")),
)


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, needles in KINDS if any(n in low for n in needles)), "other")


if __name__ == "__main__":
    main()
