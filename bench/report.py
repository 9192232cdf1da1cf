"""The Markdown table of `bench/benchmark.py` runs (their JSON), side by side.

Every training and sampling cell shows its model-FLOPs utilisation (MFU, `bench/flops.py`)
where the run measured it; runs are grouped by config and `--label` (e.g. an XLA_FLAGS
variant). Results of older runs (no label, no steps_per_call) read as label ''
and steps_per_call 1.
"""
import functools

# Keys that results of older runs lack, and the value they meant.
_DEFAULTS = dict(label="", steps_per_call=1)
COMPILERS = (("torch_compile", "torch.compile"),
             ("torch_compile_ro", "torch.compile reduce-overhead"))


def _mib(n):
    return f"{n / 2 ** 20:,.0f} MiB" if n else "n/a"


def _find(results, **keys):
    for r in results:
        if all(r.get(k, _DEFAULTS.get(k)) == v for k, v in keys.items()):
            return r
    return None


def markdown_table(runs) -> str:
    """One Markdown report from the JSON of one or more runs (e.g. one per config)."""
    lines = []
    for data in runs:  # the header of each run (runs split by framework share one)
        m = data["meta"]
        v = m["versions"]
        torch_settings = m.get("torch") or {}
        lines += [
            f"Device: JAX {m['jax_device']}; PyTorch {torch_settings.get('name') or torch_settings.get('device', 'n/a')}; "
            f"CPU {m['cpu']} x{m['cpu_count']}; load average at start "
            f"{', '.join(f'{x:.1f}' for x in m['load_avg_start'])}"
            + (f", at end {', '.join(f'{x:.1f}' for x in m['load_avg_end'])}"
               if 'load_avg_end' in m else ""),
            f"Versions: python {v['python']}, jax {v['jax']}, jaxlib {v['jaxlib']}, flax "
            f"{v['flax']}, optax {v['optax']}, torch {v['torch']}; XLA_FLAGS='{m['xla_flags']}'"
            f"; GLIBC_TUNABLES='{m.get('glibc_tunables', '')}'",
            f"JAX step: {m.get('train_step', 'ddpm_jax.training.train_step.make_train_step')}. "
            f"Command: `{m['command']}`"
            + (" (--quick: few timed steps; sampling measured over fewer steps and scaled)"
               if m["quick"] else ""), ""]
    lines = [line for line in dict.fromkeys(lines) if line] + [""]
    results = [r for data in runs for r in data["results"]]
    errors = [e for data in runs for e in data["errors"]]
    groups = list(dict.fromkeys((r["config"], r.get("label", "")) for r in results + errors))
    lines += ["| config | measure | JAX | PyTorch eager | "
              + " | ".join(title for _, title in COMPILERS) + " | JAX / eager | "
              + " | ".join(f"JAX / {title}" for _, title in COMPILERS) + " |",
              "|---" * (5 + 2 * len(COMPILERS)) + "|"]

    def ratio(a, b):
        return f"{a / b:.2f}x" if a and b else ""

    def cell(r, key, fmt):
        return fmt(r[key]) if r and r.get(key) is not None else "-"

    def mfu(r):
        return f" ({r['mfu']:.2%} MFU)" if r and r.get("mfu") is not None else ""

    def ips(r):
        return cell(r, "images_per_s", lambda x: f"{x:,.1f}") + mfu(r)

    def peak(r):
        """Device memory; on CPU the process's peak RSS so far (all parts before it too)."""
        if r and r.get("device_peak_bytes") is None:
            return f"RSS {_mib(r['rss_peak_bytes'])}"
        return cell(r, "device_peak_bytes", _mib)

    def get(r, key):
        return r.get(key) if r else None

    def gflop(x):
        return f"{x / 1e9:.3f}"

    for name, label in groups:
        find = functools.partial(_find, results, config=name, label=label)
        shown = f"{name} {label}".strip()
        eager = find(part="train", framework="torch")
        compiled = [find(part="train", framework=f) for f, _ in COMPILERS]
        ks = sorted({r.get("steps_per_call", 1) for r in results if r["part"] == "train"
                     and r["framework"] == "jax" and (r["config"], r.get("label", "")) ==
                     (name, label)} or {1})
        jax32 = find(part="train", framework="jax", dtype="float32", steps_per_call=ks[0])
        jax16 = find(part="train", framework="jax", dtype="bfloat16", steps_per_call=ks[0])
        batch = next((r["batch"] for r in (jax32, jax16, eager, *compiled) if r), "?")
        for k in ks:
            for dtype in ("float32", "bfloat16"):
                r = find(part="train", framework="jax", dtype=dtype, steps_per_call=k)
                if r is None and (dtype == "bfloat16" or k != ks[0]):
                    continue
                per_call = f", {k} steps per call" if k > 1 else ""
                lines.append(
                    f"| {shown} | train images/s, JAX {'f32' if dtype == 'float32' else 'bf16'} "
                    f"(batch {batch}{per_call}) | {ips(r)} | {ips(eager)} | "
                    + " | ".join(ips(c) for c in compiled) + " | "
                    f"{ratio(get(r, 'images_per_s'), get(eager, 'images_per_s'))} | "
                    + " | ".join(ratio(get(r, 'images_per_s'), get(c, 'images_per_s'))
                                 for c in compiled) + " |")
        blank = " |" * (1 + len(COMPILERS))
        some = next((r for r in (jax32, jax16, eager, *compiled) if r and "model_flops_per_image"
                     in r), None)
        if some:
            lines.append(
                f"| {shown} | GFLOP per image: forward (XLA) / train (3x forward) / XLA's whole "
                f"f32 step | {gflop(some['forward_flops_per_image'])} / "
                f"{gflop(some['model_flops_per_image'])} / "
                f"{cell(jax32, 'xla_step_flops_per_image', gflop)} | | "
                + " | ".join("" for _ in COMPILERS) + " |" + blank)
        lines.append(f"| {shown} | first step s (compile) f32 / bf16 | "
                     f"{cell(jax32, 'first_step_s', '{:.1f}'.format)} / "
                     f"{cell(jax16, 'first_step_s', '{:.1f}'.format)} | "
                     f"{cell(eager, 'first_step_s', '{:.1f}'.format)} | "
                     + " | ".join(cell(c, "first_step_s", "{:.1f}".format) for c in compiled)
                     + " |" + blank)
        lines.append(f"| {shown} | peak memory, f32 (JAX: process peak / XLA program) | "
                     f"{peak(jax32)} / {cell(jax32, 'program_bytes', _mib)} | "
                     f"{peak(eager)} | " + " | ".join(peak(c) for c in compiled) + " |" + blank)
        for sampler in ("ddpm", "ddim"):
            j = find(part="sample", sampler=sampler, framework="jax")
            t = find(part="sample", sampler=sampler, framework="torch")
            if not (j or t):
                continue
            ref = j or t
            measured = ("" if ref["steps"] == ref["reported_steps"]
                        else f", scaled from {ref['steps']} steps")
            lines.append(
                f"| {shown} | sample {ref['images']} x {ref['reported_steps']} "
                f"{sampler.upper()} steps, s{measured} | {cell(j, 'seconds', '{:.2f}'.format)}"
                f"{mfu(j)} (compile {cell(j, 'compile_s', '{:.1f}'.format)}) | "
                f"{cell(t, 'seconds', '{:.2f}'.format)}{mfu(t)} | "
                + " | ".join("" for _ in COMPILERS) + " | "
                f"{ratio(get(t, 'seconds'), get(j, 'seconds'))} |"
                + " |" * len(COMPILERS))
    losses = [r for r in results if r["part"] == "loss"]
    if losses:
        lines += ["", "| config | bf16 vs f32 loss | steps x batch | f32 mean | bf16 mean | "
                  "diff | 2 s.e. | within noise |", "|---|---|---|---|---|---|---|---|"]
        for r in losses:
            lines.append(
                f"| {r['config']} | first {r['float32_first']:.4f} / {r['bfloat16_first']:.4f} "
                f"| {r['steps']} x {r['batch']} (mean of last {r['tail']}) | "
                f"{r['float32_tail_mean']:.4f} | {r['bfloat16_tail_mean']:.4f} | "
                f"{r['tail_diff']:+.4f} | {2 * r['noise_se']:.4f} | {r['within_noise']} |")
    if errors:
        lines += ["", "Failed parts:"]
        lines += [f"- {' '.join(f'{k}={v}' for k, v in e.items() if k not in ('error', 'traceback'))}: "
                  f"{e['error'].splitlines()[0][:300] if e['error'] else '?'}" for e in errors]
    return "\n".join(lines)
