"""Input pipeline throughput: the full pre-training pipeline (ArrayRecord read, JPEG decode, bicubic
resize + crop to 288 px, tokenize, paired masking, batch) next to bare JPEG decode + resize of the
same files, in one run.

  python benchmarks/input_pipeline.py [--examples 1024] [--workers 0,1,2] [--size 288]

Prints one line per setting and a JSON summary. "per worker" divides by max(workers, 1); the target
is pipeline / bare >= 0.7 per worker, and samples/s growing with workers (up to the cores there are).
Per-worker rows use one decoding thread per process (data.read_threads=1), like the bare loop; the
last row is the default in-process setting (16 threads).
"""
import argparse
import json
import os
import sys
import tempfile
import time

from absl import flags
import numpy as np

flags.FLAGS.mark_as_parsed()  # Grain reads absl flags
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for configs/

# pylint: disable=g-import-not-at-top
from mpma_jax.configs.pretrain import get_config
from mpma_jax.data import builders, images, pipeline, synthetic
from mpma_jax.data import tokenizer as tokenizers
from mpma_jax.data.builders import base


class BenchJpegs(base.Builder):
  """Benchmark pairs: 640x512 JPEGs of rendered radiographs, with synthetic reports."""
  N = 1024

  def _split_paths(self, manual_dir):
    return {"train": {}}

  def _examples(self, split, **_):
    for i in range(self.N):
      case = synthetic.sample_case(0, "train", i)
      img = synthetic.render_image(case, 512, index=i)  # [512, 512, 3]
      img = np.concatenate([img, img[:, :128]], axis=1)  # [512, 640, 3]: not square
      report = " ".join(synthetic.report(0, "train", i) for _ in range(2))  # ~ROCO caption length
      yield i, {"id": str(i), "image": images.encode_jpeg(img, 90), "texts": [report]}


def bare(source, size: int, n: int) -> float:
  """Samples/s of decode + resize + crop alone, in this process."""
  t = time.perf_counter()
  for i in range(n):
    images.load(source[i % len(source)]["image"], size)
  return n / (time.perf_counter() - t)


def full(config, tok_dir: str, data_dir: str, n: int) -> float:
  """Samples/s of the whole pipeline (after its first batch: worker start-up excluded)."""
  it = iter(pipeline.pretrain_dataset(config, tok_dir, data_dir))
  next(it)
  batches = n // config.train.batch_size
  t = time.perf_counter()
  for _ in range(batches):
    next(it)
  rate = batches * config.train.batch_size / (time.perf_counter() - t)
  del it
  return rate


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--examples", type=int, default=1024)
  parser.add_argument("--workers", default="0,1,2")
  parser.add_argument("--size", type=int, default=288)
  parser.add_argument("--batch", type=int, default=32)
  args = parser.parse_args()
  BenchJpegs.N = args.examples
  builders.BUILDERS["bench_jpegs"] = BenchJpegs
  root = tempfile.mkdtemp(prefix="mpma_bench_")
  data_dir, tok_dir = os.path.join(root, "data"), os.path.join(root, "tok")
  t = time.perf_counter()
  b, _ = builders.build("bench_jpegs", root, data_dir)
  print(
      f"built {args.examples} JPEGs in {time.perf_counter() - t:.1f}s "
      f"(mean {np.mean([len(b.as_data_source('train')[i]['image']) for i in range(16)]) / 1e3:.0f} kB)"
  )
  tokenizers.train_wordpiece(synthetic.report_corpus(2000), 4096, tok_dir)

  config = get_config("base")
  config.data.name = "bench_jpegs"
  config.model.image.size = args.size
  config.train.batch_size = args.batch
  source = b.as_data_source("train")
  results = []
  settings = [(int(w), 1) for w in args.workers.split(",")] + [(0, 16)]
  for workers, threads in settings:  # threads=1: one decoding thread per process, as bare decode
    config.data.workers, config.data.read_threads = workers, threads
    base_rate = bare(source, args.size, args.examples // 2)
    # enough batches that the read-ahead buffer filled during start-up does not flatter the rate
    n = max(args.examples * max(workers, 1) // 2, 4 * config.data.read_buffer)
    pipe_rate = full(config, tok_dir, data_dir, n)
    base_rate = (base_rate + bare(source, args.size, args.examples // 2)) / 2  # before + after
    per_worker = pipe_rate / max(workers, 1)
    results.append({
        "workers": workers, "threads": threads, "bare_decode_per_s": round(base_rate, 1),
        "pipeline_per_s": round(pipe_rate, 1), "pipeline_per_worker_per_s": round(per_worker, 1),
        "per_worker_ratio_to_bare": round(per_worker / base_rate, 3)
    })
    print(
        f"workers={workers} threads={threads:2d}: bare decode+resize {base_rate:6.1f}/s | "
        f"full pipeline {pipe_rate:6.1f}/s = {per_worker:6.1f}/s per worker = "
        f"{per_worker / base_rate:.2f} x bare", flush=True)
  print(
      json.dumps(
          {"size": args.size, "batch": args.batch, "cpus": os.cpu_count(), "results": results}))


if __name__ == "__main__":
  main()
