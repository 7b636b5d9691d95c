"""Peak host memory and time of checkpoint loading: `from_pretrained`, `init_from`, `convert`.

    python -m xformers_jax.bench.loading --sizes 0.1B,0.3B,1B --devices 8 --out DIR

For each size an XLM-R-XL-shaped HF checkpoint (random bfloat16 tensors in 2 GB safetensors
shards, written tensor by tensor) is made in `DIR`, then each operation runs in a fresh
subprocess with 8 host-platform CPU devices and an fsdp mesh: its peak resident memory (`VmHWM`),
the resident memory before it started (after imports and the mesh), and the bytes of what it
loads (the params as placed: float32). `transient = peak - before - loaded`: what loading costs on
top of the result, which must stay flat as the model grows. `convert` holds no model at the end:
its transient is its whole increase.

One measurement is `measure(op, ckpt_dir, devices)`, also used by the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

from xformers_jax.convert import lazy

# Sizes: (layers, hidden, vocab) of XLM-R-XL-shaped models (4x hidden MLP).
SIZES = {
    "0.1B": (12, 768, 32000),
    "0.3B": (24, 1024, 32000),
    "1B": (36, 1536, 32000),
    "tiny": (4, 256, 8000),
}


def hf_config(layers: int, hidden: int, vocab: int) -> dict[str, Any]:
    return {
        "model_type": "xlm-roberta-xl",
        "architectures": ["XLMRobertaXLForMaskedLM"],
        "vocab_size": vocab,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": max(1, hidden // 64),
        "intermediate_size": 4 * hidden,
        "max_position_embeddings": 514,
        "type_vocab_size": 1,
        "pad_token_id": 1,
        "layer_norm_eps": 1e-5,
        "torch_dtype": "bfloat16",
    }


def make_checkpoint(path: str, size: str | tuple, dtype: str = "bfloat16", shard_gb=2.0) -> int:
    """Writes a random HF checkpoint of an XLM-R-XL-shaped MLM model; returns its param count.

    Tensors are made one at a time as they are written (the model never exists in memory).
    """
    import ml_dtypes

    from xformers_jax import convert, hf_files, hub
    from xformers_jax.convert import param_map as pm

    layers, hidden, vocab = SIZES[size] if isinstance(size, str) else size
    cfg_dict = hf_config(layers, hidden, vocab)
    config, arch = hub.resolve(cfg_dict)
    shapes = pm.flatten(convert.abstract_params(config, arch))
    pmap = convert.converter(config).param_map(config, arch)
    np_dtype = np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)
    state: dict[str, Any] = {}
    for n, rule in enumerate(pmap.rules):
        shape = shapes[rule.path].shape
        per_layer = shape[1:] if rule.stacked else shape
        for i in range(pmap.num_layers) if rule.stacked else [0]:
            key = rule.hf.format(i=i)
            state[key] = _Random(pm.hf_shape(rule, per_layer), np_dtype, n * 1000 + i)
    for key, shape in pmap.unused.items():
        state[key] = lazy.Zeros(tuple(shape), np_dtype)
    cfg_dict["torch_dtype"] = dtype
    hf_files.write_hf_dir(path, cfg_dict, state, int(shard_gb * 1e9))
    return int(sum(np.prod(s.shape) for s in shapes.values()))


class _Random(lazy.Lazy):
    """A random tensor made when it is read."""

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype, seed: int):
        self.shape, self.dtype, self.seed = tuple(shape), np.dtype(dtype), seed

    def _read(self, index: lazy.Index) -> np.ndarray:
        rng = np.random.default_rng(self.seed)
        return (0.02 * rng.standard_normal(self.shape, np.float32)).astype(self.dtype)[index]


# --------------------------------------------------------------------------------------------------
# One measurement, in a subprocess.
# --------------------------------------------------------------------------------------------------


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _child(op: str, ckpt: str, work: str) -> dict[str, Any]:
    import jax

    from xformers_jax import checkpoint, hub, sharding
    from xformers_jax.convert import param_map as pm

    mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    config, arch = hub.resolve(json.load(open(os.path.join(ckpt, "config.json"))))
    shardings = hub.param_shardings(config, arch, mesh)  # traces the abstract params (cached)
    # init_from fills a run's initialised params: made (and compiled) before the measurement.
    fresh = _fresh_params(config, arch, shardings) if op == "init_from" else None
    jax.block_until_ready(fresh)  # dispatch is asynchronous: the init's buffers exist now
    lazy.release_freed_memory()  # what earlier work freed is not this operation's baseline
    before = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS: the peak is this operation's
    t0 = time.perf_counter()
    if op == "from_pretrained":
        model = hub.from_pretrained(ckpt, mesh=mesh)
        params = model.params
    elif op == "init_from":
        params, _ = checkpoint.load_hf_into(ckpt, config, arch, fresh, {})
    elif op == "convert":
        params = None
        checkpoint.convert_hf_to_orbax(ckpt, os.path.join(work, "orbax"), mesh=mesh)
    else:
        raise ValueError(f"unknown op {op!r}")
    if params is not None:
        jax.block_until_ready(params)
    seconds = time.perf_counter() - t0
    leaves = pm.flatten(params).values() if params is not None else []
    loaded = int(sum(x.nbytes for x in leaves))  # init_from: the init is in `before`
    peak = _status("VmHWM")
    return {"op": op, "before": before, "peak": peak, "loaded": loaded, "seconds": seconds}


def _fresh_params(config: Any, arch: str, shardings: Any) -> Any:
    """A run's freshly initialised params, made on their devices (as the trainer's jitted init)."""
    import jax

    from xformers_jax import convert

    module = convert.init_module(config, arch)
    inputs = convert.example_inputs(config, arch)

    def init(rng):
        import flax.linen as nn

        return nn.meta.unbox(module.init(rng, **inputs)["params"])

    return jax.jit(init, out_shardings=shardings)(jax.random.key(0))


def measure(op: str, ckpt: str, devices: int = 8, timeout: float = 1800) -> dict[str, Any]:
    """Runs `op` on the checkpoint in a fresh process; its memory figures (bytes) and time.

    `transient` is `peak - before - loaded` (see the module docstring).
    """
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    with tempfile.TemporaryDirectory() as work:
        cmd = [sys.executable, "-m", "xformers_jax.bench.loading", "--child", op, ckpt, work]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{op} failed:\n{out.stderr[-4000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["transient"] = result["peak"] - result["before"] - result["loaded"]
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--sizes", default="0.1B,0.3B", help=f"comma-separated of {list(SIZES)}")
    parser.add_argument("--ops", default="from_pretrained,init_from,convert")
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--out", default=None, help="where checkpoints go (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(*args.child)))
        return
    gib = 2**30
    rows = []
    with tempfile.TemporaryDirectory(dir=args.out) as tmp:
        for size in args.sizes.split(","):
            ckpt = os.path.join(tmp, size)
            n = make_checkpoint(ckpt, size)
            file_bytes = 2 * n
            for op in args.ops.split(","):
                r = measure(op, ckpt, args.devices)
                rows.append((size, n, file_bytes, r))
                print(
                    f"| {size} | {n / 1e9:.2f}B | {op} | {r['loaded'] / gib:.2f} | "
                    f"{(r['peak'] - r['before']) / gib:.2f} | {r['transient'] / gib:.2f} | "
                    f"{r['transient'] / (4 * n):.0%} | {r['seconds']:.1f} | "
                    f"{r['seconds'] / (file_bytes / 1e9):.1f} |",
                    flush=True,
                )
            shutil.rmtree(ckpt)


if __name__ == "__main__":
    main()
