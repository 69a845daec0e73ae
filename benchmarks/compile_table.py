"""The docs/scaling.md table of compiled settings: `mpma-compile --suggest` for each target row.

  python benchmarks/compile_table.py [--rows base-bf16-v5e16,...] [--results DIR]
                                     [--max_compiles 3] [--hlo_dir DIR]
                                     [--write docs/scaling.md]

Each row is one `aot.suggest` (the same search `mpma-compile --suggest` runs, with the command
printed beside it); its JSON goes to --results/<row>.json and is reused on the next call (delete it
to recompile). --write replaces the part of the doc between the compile-table markers with the
rendered table. TPU rows need libtpu; h100 rows need the [gpu-aot] extra and JAX_PLATFORMS=cpu,
so run them in their own invocation (--rows base-bf16-h100x8).
"""
import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# pylint: disable=g-import-not-at-top,wrong-import-position
from mpma_jax import aot
from mpma_jax.configs import pretrain

# (row name, variant, dtype, topology, global batch): 16 examples per chip, the paper's 256 at 16.
ROWS = [(f"{v}-{'f32' if d == 'float32' else 'bf16'}-{name}", v, d, topo, batch) for v in ("base",)
        for d in ("bfloat16", "float32")
        for name, topo, batch in (("v5e16", "v5e:4x4", 256), ("v5e64", "v5e:8x8", 1024),
                                  ("v5e256", "v5e:16x16", 4096), ("v5p128", "v5p:4x4x4", 1024),
                                  ("v432", "v4:2x2x4", 256), ("h100x8", "h100:8", 256))]
START, END = "<!-- compile-table:start -->", "<!-- compile-table:end -->"


def command(variant: str, dtype: str, topology: str, batch: int) -> str:
  return (f"mpma-compile --config configs/pretrain.py:{variant} --topology {topology} --suggest "
          f"--max_fits=1 "
          f"--config.model.scan=True --config.model.dtype={dtype} "
          f"--config.train.batch_size={batch}")


def run_row(name, variant, dtype, topology, batch, max_compiles, results, hlo_dir) -> dict:
  """One row, in a child process: an XLA compiler that aborts (a failed CHECK) ends only that row,
  recorded with its message."""
  path = os.path.join(results, f"{name}.json")
  if not os.path.exists(path):
    proc = subprocess.run([
        sys.executable,
        os.path.abspath(__file__), "--rows", name, "--results", results, "--max_compiles",
        str(max_compiles), "--hlo_dir", hlo_dir, "--child"
    ], stderr=subprocess.PIPE, text=True)
    if proc.returncode and not os.path.exists(path):
      failed = [l for l in proc.stderr.splitlines() if "Check failed" in l or "Error" in l]
      result = {
          "name": name, "variant": variant, "dtype": dtype, "topology": topology,
          "global_batch": batch, "command": command(variant, dtype, topology, batch),
          "error": (failed or proc.stderr.splitlines()[-1:] or ["?"])
                   [-1].strip(), "fits": [], "tried": []
      }
      os.makedirs(results, exist_ok=True)
      with open(path, "w") as f:
        json.dump(result, f, indent=1)
  with open(path) as f:
    return json.load(f)


def compile_row(name, variant, dtype, topology, batch, max_compiles, results, hlo_dir) -> dict:
  path = os.path.join(results, f"{name}.json")
  config = pretrain.get_config(variant)
  config.model.update(scan=True, dtype=dtype)
  config.train.batch_size = batch
  print(f"== {name}: {command(variant, dtype, topology, batch)}", flush=True)
  result = aot.suggest(config, topology, max_compiles=max_compiles, max_fits=1,
                       log=lambda line: print(line, flush=True), hlo_dir=hlo_dir)
  result.update(name=name, variant=variant, dtype=dtype,
                command=command(variant, dtype, topology, batch))
  os.makedirs(results, exist_ok=True)
  with open(path, "w") as f:
    json.dump(result, f, indent=1)
  return result


def render(results: list[dict]) -> str:
  head = ("| config | target | global batch | best mesh (data, fsdp, tensor) | remat | "
          "micro-batch / chip | memory / chip (HBM) | compile s | est. step ms | MFU | examples/s "
          "| collectives / step (GB) |\n"
          "|:---|:---|---:|:---|:---|---:|---:|---:|---:|---:|---:|:---|")
  rows = []
  for r in results:
    target = r["topology"]
    if r.get("error"):
      message = r["error"].split("] ", 1)[-1]  # without the C++ log prefix
      rows.append(f"| {r['variant']} {r['dtype']} | {target} | {r['global_batch']:,} | XLA compile "
                  f"aborted: `{message}` | | | | | | | | |")
      continue
    if not r["fits"]:
      tried = ", ".join(f"{tuple(t['setting']['mesh'].values())} {t['setting']['remat']} "
                        f"x{t['setting']['grad_accum']}" for t in r["tried"])
      rows.append(f"| {r['variant']} {r['dtype']} | {target} | {r['global_batch']:,} | nothing "
                  f"fits ({tried}) | | | | | | | | |")
      continue
    b = r["fits"][0]
    s, est, mem = b["setting"], b["estimate"], b["memory"]
    coll = b["collectives"]
    comm = ", ".join(f"{k.replace('collective-', '')} {v['bytes'] / 1e9:.2f}"
                     for k, v in coll.items() if v["bytes"])
    rows.append(
        f"| {r['variant']} {r['dtype']} | {target} | {r['global_batch']:,} | "
        f"{tuple(s['mesh'].values())} | {s['remat']} x{s['grad_accum']} | "
        f"{b['micro_batch_per_device']} | {mem['peak'] / aot.GiB:.1f} ({r['hbm_bytes'] / aot.GiB:.0f})"
        f" GiB | {b['compile_seconds']:.0f} | {1e3 * est['step_s']:.0f} | {100 * est['mfu']:.0f}% | "
        f"{est['examples_per_s']:,.0f} | {comm} |")
  commands = "\n".join(f"    {r['command']}" for r in results)
  return "\n".join([
      head, *rows, "", "Each row's command (python benchmarks/compile_table.py ran "
      "them and wrote this table):", "", commands
  ])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rows", default="",
                      help="comma-separated row names (default: all TPU rows)")
  parser.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "compile_results"))
  parser.add_argument("--max_compiles", type=int, default=3,
                      help="per row; a row stops at its first fitting setting")
  parser.add_argument("--write", default="", help="a Markdown file with the compile-table markers")
  parser.add_argument("--hlo_dir", default="",
                      help="also keep each compiled HLO here, gzipped (tens of MB per base row)")
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  wanted = set(filter(None, args.rows.split(",")))
  rows = [r for r in ROWS if (r[0] in wanted if wanted else "h100" not in r[0])]
  if wanted - {r[0] for r in ROWS}:
    parser.error(f"unknown rows {sorted(wanted - {r[0] for r in ROWS})}; known: "
                 f"{[r[0] for r in ROWS]}")
  if args.child:  # one row, in this process
    compile_row(*rows[0], args.max_compiles, args.results, args.hlo_dir)
    return
  done = [run_row(*r, args.max_compiles, args.results, args.hlo_dir) for r in rows]
  # Every row with a result, in table order (also those from earlier invocations).
  every = []
  for r in ROWS:
    path = os.path.join(args.results, f"{r[0]}.json")
    if os.path.exists(path):
      with open(path) as f:
        every.append(json.load(f))
  table = render(every or done)
  print(table)
  if args.write:
    with open(args.write) as f:
      doc = f.read()
    if START not in doc or END not in doc:
      sys.exit(f"{args.write}: no {START} ... {END} markers")
    doc = doc[:doc.index(START) + len(START)] + "\n" + table + "\n" + doc[doc.index(END):]
    with open(args.write, "w") as f:
      f.write(doc)


if __name__ == "__main__":
  main()
