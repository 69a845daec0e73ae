"""Shared test setup: 8 simulated CPU devices (mesh tests; the default mesh puts all of them on
the data axis), absl flags parsed (Grain reads them), a persistent XLA compilation cache (the same
small model is compiled by several tests), and small configs."""
import os
import sys

# Before JAX starts: 8 CPU devices, unless the caller chose a device count.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()

# XLA:CPU runs each device's independent thunks concurrently on one shared pool of
# max(cores, devices) threads, and a collective blocks its thread until every participant
# arrives. On a 2-core machine two or more collectives in flight per device used up all 8
# threads and deadlocked (XLA aborts after 40 s). A larger pool leaves threads for the
# participants still computing. Subprocesses (multi-host tests) inherit it.
os.environ.setdefault("PJRT_NPROC", "32")

from absl import flags  # pylint: disable=g-import-not-at-top
import jax  # pylint: disable=g-import-not-at-top
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # for `configs.*`

flags.FLAGS.mark_as_parsed()
jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("MPMA_TEST_CACHE", "/tmp/mpma_jax_test_xla_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
# One computation in flight at a time: on a 2-core machine, 8 simulated devices' collectives
# (in-process rendezvous, aborted by XLA after 40 s) intermittently stalled while the next step
# was already dispatched and the input pipeline's threads competed for the cores.
jax.config.update("jax_cpu_enable_async_dispatch", False)


def tiny_config():
  """The `tiny` pre-training config, shrunk further so that tests compile and run in seconds."""
  from mpma_jax.configs.pretrain import get_config  # pylint: disable=g-import-not-at-top
  c = get_config("tiny")
  m = c.model
  m.image.update(size=32, patch=8, width=64, layers=2, heads=2)
  m.text.update(vocab_size=512, width=64, layers=2, heads=2, mlp_dim=128)
  m.hidden = 64
  m.fusion.update(layers=2, heads=2, mlp_dim=128)
  m.memory.update(slots=32, topk=8, heads=2)
  m.gla.update(dim=32, chunk=4)
  m.mim.update(layer=1, width=32, depth=1, heads=2)
  c.data.update(max_len=24, num_train=256, num_eval=64, tokenizer_vocab=512, read_threads=2,
                read_buffer=32)
  c.train.update(batch_size=8, steps=20, log_every=5, ckpt_every=10)
  c.eval.update(num_pairs=32, batch_size=32, pictures=False)  # tests/test_finetune.py: on
  return c


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """A data_dir holding the synthetic set of `tiny_config()` (generated once per session)."""
  from mpma_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  out = str(tmp_path_factory.mktemp("data"))
  pipeline.prepare(tiny_config(), out)
  return out


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
  """A WordPiece tokenizer (512 ids) trained once per session on synthetic reports."""
  from mpma_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  from mpma_jax.data import tokenizer as tokenizers
  out = str(tmp_path_factory.mktemp("tok"))
  tokenizers.train_wordpiece(synthetic.report_corpus(500), 512, out)
  return out


@pytest.fixture(scope="session")
def pretrained_run(tmp_path_factory, data_dir):
  """A tiny pre-training run directory (config.json, tokenizer/, checkpoints/) after 100 steps
  (after 20 the image [CLS] barely depends on the image, and fine-tuning starts from nothing)."""
  from mpma_jax import train  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp("pretrained"))
  config = tiny_config()
  config.train.update(steps=100, log_every=50, ckpt_every=100)
  config.eval.pictures = True
  tok, tok_dir = train.prepare_tokenizer(config, workdir, data_dir)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort())
  result = train.train_and_evaluate(config, workdir, tok, tok_dir, data_dir)
  # The end-of-run evaluation writes the pictures (visualize.py) for the last checkpoint.
  assert sorted(os.path.basename(p) for p in result["pictures"]) == [
      f"{n}_step100.png" for n in ("alignment", "curves", "mim", "retrieval")
  ]
  assert all(os.path.getsize(p) > 1000 for p in result["pictures"])
  return workdir


@pytest.fixture(scope="session")
def downstream_dir(tmp_path_factory):
  """synthetic_vqa / synthetic_cls / synthetic_chest at 32 px."""
  from mpma_jax.data.builders import synthetic_downstream as sd  # pylint: disable=g-import-not-at-top
  out = str(tmp_path_factory.mktemp("downstream"))
  sd.make_vqa(out, 48, 32, num_eval=12).download_and_prepare()
  sd.make_cls(out, 96, 32, num_eval=48).download_and_prepare()
  sd.make_chest(out, 96, 32, num_eval=32).download_and_prepare()
  return out
