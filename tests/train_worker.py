"""A pre-training process for the multi-process and signal tests: `tests.conftest.tiny_config()`
plus overrides, run through `train.train_and_evaluate` as `mpma-pretrain` would run it.

  python -m tests.train_worker --workdir W --data_dir D --tokenizer_dir T \
      [--overrides '{"train.steps": 6}'] [--resume] [--kill_in_save_at STEP]
      [--coordinator_address 127.0.0.1:PORT --num_processes N --process_id I]

Prints one JSON line with the result. --kill_in_save_at makes the process SIGKILL itself right
after the (asynchronous) save of that step has started, i.e. in the middle of writing it.
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def start(workdir, tokenizer_dir, data_dir, overrides: dict, *extra, env=None) -> subprocess.Popen:
  """Starts this script in a new process (stdout and stderr together, as text)."""
  cmd = [
      sys.executable, "-m", "tests.train_worker", "--workdir", workdir, "--data_dir", data_dir,
      "--tokenizer_dir", tokenizer_dir, "--overrides",
      json.dumps(overrides), *extra
  ]
  return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env=env)


def _cpu_seconds(pid: int) -> float:
  """User + system CPU time of a live process (Linux /proc), 0 when it cannot be read."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
  except (OSError, IndexError, ValueError):
    return 0.0


def wait_all(procs: list, timeout: float, idle: float = 90.0) -> list[str]:
  """Outputs of the processes. Fails, killing all of them, after `timeout` seconds, or as soon as
  the ones still running have used no CPU for `idle` seconds (a deadlock: blocked in collectives;
  a slow but working run, e.g. compiling on a loaded machine, keeps using CPU). The failure shows
  every thread's Python stack (main() registers SIGUSR1) and the end of each output."""
  chunks = [[] for _ in procs]
  readers = [
      threading.Thread(target=lambda p=p, c=c: c.extend(iter(p.stdout.readline, "")), daemon=True)
      for p, c in zip(procs, chunks)
  ]
  for r in readers:
    r.start()
  start = last_progress = time.monotonic()
  cpu = None
  problem = None
  while any(p.poll() is None for p in procs):
    time.sleep(1.0)
    now_cpu = sum(_cpu_seconds(p.pid) for p in procs if p.poll() is None)
    if cpu is None or now_cpu > cpu + 0.5 or now_cpu < cpu:  # (a process ended: new baseline)
      cpu, last_progress = now_cpu, time.monotonic()
    if time.monotonic() - last_progress > idle:
      problem = f"used no CPU for {idle:.0f}s (deadlocked)"
    elif time.monotonic() - start > timeout:
      problem = f"timed out after {timeout:.0f}s"
    if problem:
      for p in procs:
        if p.poll() is None:
          p.send_signal(signal.SIGUSR1)
      time.sleep(2)
      for p in procs:
        p.kill()
      break
  for p, r in zip(procs, readers):
    p.wait()
    r.join()
  outputs = ["".join(c) for c in chunks]
  if problem:
    raise AssertionError(f"workers {problem}, after {time.monotonic() - start:.0f}s:\n" +
                         "\n-----\n".join(out[-4000:] for out in outputs))
  return outputs


def result_of(output: str) -> dict:
  """The RESULT line a worker printed."""
  lines = [l for l in output.splitlines() if l.startswith("RESULT ")]
  if not lines:
    raise AssertionError("the worker printed no RESULT line:\n" + output[-3000:])
  return json.loads(lines[-1][len("RESULT "):])


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--workdir", required=True)
  p.add_argument("--data_dir", required=True)
  p.add_argument("--tokenizer_dir", required=True)
  p.add_argument("--overrides", default="{}")
  p.add_argument("--resume", action="store_true")
  p.add_argument("--kill_in_save_at", type=int, default=0)
  p.add_argument("--coordinator_address")
  p.add_argument("--num_processes", type=int)
  p.add_argument("--process_id", type=int)
  args = p.parse_args()
  import faulthandler  # pylint: disable=g-import-not-at-top
  faulthandler.register(signal.SIGUSR1, all_threads=True)  # wait_all's timeout asks for stacks
  if os.environ.get("MPMA_WORKER_TRACEBACK_AFTER"):  # debugging a hang: dump every thread's stack
    import faulthandler  # pylint: disable=g-import-not-at-top
    faulthandler.dump_traceback_later(float(os.environ["MPMA_WORKER_TRACEBACK_AFTER"]), exit=True)

  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.FLAGS.mark_as_parsed()  # Grain reads absl flags
  from mpma_jax import distributed  # pylint: disable=g-import-not-at-top
  distributed.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
  import jax  # pylint: disable=g-import-not-at-top
  if args.coordinator_address is None:
    # Not for multi-process workers: a CPU executable cached by a single-process run of the same
    # program (same HLO, same device count) lacks the cross-process collectives and hangs.
    jax.config.update("jax_compilation_cache_dir",
                      os.environ.get("MPMA_TEST_CACHE", "/tmp/mpma_jax_test_xla_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  from mpma_jax import checkpoint, overrides, train  # pylint: disable=g-import-not-at-top
  from tests.conftest import tiny_config  # pylint: disable=g-import-not-at-top

  config = overrides.apply_all(tiny_config(), json.loads(args.overrides), "--overrides")

  if args.kill_in_save_at:
    save = checkpoint.Checkpointer.save

    def save_then_die(self, step, state, data_iterator):
      save(self, step, state, data_iterator)  # returns once the background write has started
      if step == args.kill_in_save_at:
        os.kill(os.getpid(), signal.SIGKILL)

    checkpoint.Checkpointer.save = save_then_die

  os.makedirs(args.workdir, exist_ok=True)
  config.data.tokenizer = args.tokenizer_dir  # copied into <workdir>/tokenizer by process 0
  tok, tok_dir = train.prepare_tokenizer(config, args.workdir, args.data_dir)
  result = train.train_and_evaluate(config, args.workdir, tok, tok_dir, args.data_dir,
                                    resume=args.resume)
  print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
  main()
