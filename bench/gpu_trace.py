"""Top GPU kernels of a jitted call, from the JAX profiler's trace (bench/ scripts only)."""
import collections
import glob
import gzip
import json
import os
import shutil

import jax


def jax_profile(run, log_dir, steps: int = 5):
    """Trace `steps` calls of `run`; their top GPU kernels (per call). The trace is deleted
    after: few files come back from a lent device machine."""
    jax.block_until_ready(run())
    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
        for _ in range(steps):
            out = run()
        jax.block_until_ready(out)
    paths = glob.glob(os.path.join(log_dir, "**", "*.trace.json.gz"), recursive=True)
    if not paths:
        return [dict(error=f"no perfetto trace under {log_dir}")]
    kernels = gpu_kernel_totals(paths[0], steps)
    shutil.rmtree(log_dir)
    return kernels


def gpu_kernel_totals(path, steps):
    """Total time and count per GPU event name in a trace.json.gz, per step, largest first."""
    with gzip.open(path, "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    names = {e["pid"]: e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    totals, counts = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and "GPU" in str(names.get(e.get("pid"), "")):
            totals[e["name"]] += e.get("dur", 0)
            counts[e["name"]] += 1
    all_us = sum(totals.values())
    top = [dict(name=n[:90], us_per_step=us / steps, calls_per_step=counts[n] / steps)
           for n, us in totals.most_common(25)]
    return [dict(name="ALL GPU EVENTS", us_per_step=all_us / steps,
                 calls_per_step=sum(counts.values()) / steps)] + top


def print_kernels(title, kernels):
    """Print `gpu_kernel_totals`' list as a small table."""
    print(f"--- {title}: top GPU kernels (us per step, calls per step)", flush=True)
    for k in kernels:
        if "error" in k:
            print("   ", k["error"])
        else:
            print(f"   {k['us_per_step']:10.1f} {k['calls_per_step']:6.1f}  {k['name']}")
