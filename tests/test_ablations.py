"""The ablation study (configs/ablations.py, mpma_jax/ablation.py, benchmarks/ablations.py): its
arms, the summary arithmetic, the Markdown section, and the command end to end at a microscopic
size (2 arms x 2 seeds x 2 pre-training steps, the suite on one generated set for 1 epoch)."""
import json
import os

import numpy as np
import pytest

from benchmarks import ablations as ablations_cli
from mpma_jax import ablation, sweep, validate
from mpma_jax.configs import ablations as study
from mpma_jax.configs import pretrain
from tests.conftest import ROOT, tiny_config


def test_arms_and_sweep():
  arms = study.arms("tiny")
  assert list(arms) == ["mpma", "no_memory", "no_local", "no_global", "unpaired", "m3ae"]
  assert arms["mpma"] == {} and arms["m3ae"] == pretrain.M3AE
  assert study.arms("base")["m3ae"]["model.image.layers"] == 11
  runs = study.get_sweep("tiny")
  assert len(runs) == len(arms) * len(study.SEEDS) == 12
  # mpma-sweep accepts it: every override a field of the config, every run distinct.
  config_arg = os.path.join(ROOT, "configs", "ablations.py") + ":tiny"
  plan = sweep.make_plan(study.get_config("tiny"), config_arg, "/tmp/unused", {},
                         sweep.load_sweep(config_arg))
  assert len({r.name for r in plan.runs}) == 12
  # Each arm's config is valid and differs from full MPMA in the arm's fields only.
  runs = ablation.plan("/root", "tiny", seeds=(0,))
  ref = validate._flat(runs[0].config)  # pylint: disable=protected-access
  for r in runs:
    validate.check(r.config, 1)
    flat = validate._flat(r.config)  # pylint: disable=protected-access
    changed = {k for k in flat if flat[k] != ref[k]}
    assert changed == {k for k, v in arms[r.arm].items() if ref[k] != v}, r.arm
    assert r.workdir == os.path.join("/root", r.arm, "seed=0")
  with pytest.raises(ValueError, match="unknown arm 'nope'"):
    ablation.plan("/root", "tiny", ["nope"])
  with pytest.raises(ValueError, match="loss.local is set by arm 'no_local'"):
    ablation.plan("/root", "tiny", ["no_local"], fixed={"loss.local": 0.5})
  with pytest.raises(ValueError, match="seed is set by the study's seeds"):
    ablation.plan("/root", "tiny", fixed={"seed": 3})


def test_a_preempted_run_stops_the_study_and_a_run_steps_stop_does_not(tmp_path, monkeypatch):
  """SIGTERM during a pre-training run (train.pretrain returns its clean stop) ends the study with
  a message naming the run and step; a stop at train.run_steps is recorded and the study goes on."""
  stops = {
      "preempted": {"stopped_at": 3, "reason": "preempted (SIGTERM) at step 3"},
      "run_steps": {"stopped_at": 2, "reason": "train.run_steps=2 reached at step 2"}
  }
  (run,) = ablation.plan(str(tmp_path), "tiny", ["mpma"], seeds=(0,))
  monkeypatch.setattr(ablation.train, "pretrain", lambda *a, **k: stops["run_steps"])
  ablation.pretrain(run, log=lambda _: None)
  assert (run.action, run.status) == ("start", "stopped at step 2")
  monkeypatch.setattr(ablation.train, "pretrain", lambda *a, **k: stops["preempted"])
  with pytest.raises(
      ablation.Preempted, match=r"mpma/seed=0: preempted \(SIGTERM\) at step 3, "
      "checkpoint 3 saved; run the same command again"):
    ablation.pretrain(run, log=lambda _: None)


def test_an_unfinished_task_starts_over_and_a_finished_one_is_reused(tmp_path, monkeypatch):
  (run,) = ablation.plan(str(tmp_path), "tiny", ["mpma"], seeds=(0,))
  done, left = (os.path.join(run.workdir, "suite", t) for t in ("done", "left"))
  os.makedirs(os.path.join(left, "clean", "checkpoints", "2"))  # an interrupted attempt
  os.makedirs(done)
  with open(os.path.join(done, "suite.json"), "w") as f:
    json.dump({"rows": [{"task": "done", "accuracy": 0.5}]}, f)
  seen = []

  def fake_suite(run_dir, data_dir, workdir, configs, overrides, log):
    seen.append(
        (workdir, os.listdir(workdir) if os.path.isdir(workdir) else None, overrides["seed"]))
    return None, [{"task": "left", "accuracy": 0.25}]

  monkeypatch.setattr(ablation.suite, "run", fake_suite)
  out = ablation.run_suite(run, {"done": None, "left": None}, "", {}, log=lambda _: None)
  assert out == {
      "done": [{"task": "done", "accuracy": 0.5}], "left": [{"task": "left", "accuracy": 0.25}]
  }
  assert seen == [(left, None, 0)] and run.fine_tuned == 1


def test_summary_marks_differences_larger_than_the_seed_spread():
  per_arm = {
      "mpma": [{"a": 0.50, "b": 0.2}, {"a": 0.60, "b": 0.2}],
      "x": [{"a": 0.40, "b": 0.3}, {"a": 0.48, "b": 0.1}],
      "y": [{"a": 0.90}],
  }
  s = ablation.summarize(per_arm)
  assert s["mpma"]["a"]["mean"] == pytest.approx(0.55)
  assert s["mpma"]["a"]["spread"] == pytest.approx(0.05)
  assert s["mpma"]["a"]["delta"] is None and s["mpma"]["a"]["exceeds"] is None
  # x, a: 0.44 ± 0.04 against 0.55 ± 0.05: |-0.11| > 0.09, the ranges do not overlap.
  assert s["x"]["a"]["delta"] == pytest.approx(-0.11) and s["x"]["a"]["exceeds"] is True
  # x, b: 0.2 ± 0.1 against 0.2 ± 0: no difference.
  assert s["x"]["b"]["delta"] == pytest.approx(0.0) and s["x"]["b"]["exceeds"] is False
  # y: one seed, no spread to compare with.
  assert s["y"]["a"]["delta"] == pytest.approx(0.35) and s["y"]["a"]["exceeds"] is None
  runs = [ablation.Run("mpma", 0, "", None, status="ok", metrics=per_arm["mpma"][0])]
  md = ablation.markdown(s, runs, "settings")
  table = _table(md)
  assert table[0] == ["arm", "seeds", "a", "b"]
  assert table[1] == ["mpma", "2", "55.0 ± 5.0", "20.0 ± 0.0"]
  assert table[2] == ["x", "2", "**44.0 ± 4.0 (−11.0)**", "20.0 ± 10.0 (+0.0)"]
  assert table[3] == ["y", "1", "90.0 ± 0.0 (+35.0)", "–"]
  assert "* x, a: −11.0 (44.0 ± 4.0 against 55.0 ± 5.0)" in md


def test_write_markdown_replaces_only_the_results_section(tmp_path):
  path = str(tmp_path / "doc.md")
  ablation.write_markdown(path, "first")
  assert open(path).read() == f"{ablation.BEGIN}\nfirst\n{ablation.END}\n"
  with open(path, "w") as f:
    f.write(f"# Title\n\nhow-to\n\n{ablation.BEGIN}\nold\n{ablation.END}\n\n## After\n")
  ablation.write_markdown(path, "new\nlines")
  assert open(path).read() == (f"# Title\n\nhow-to\n\n{ablation.BEGIN}\nnew\nlines\n"
                               f"{ablation.END}\n\n## After\n")


def _table(md: str, which: int = 0) -> list[list[str]]:
  """The cells of the which-th Markdown table in md (header first, separator dropped)."""
  tables, current = [], []
  for line in md.splitlines() + [""]:
    if line.startswith("|"):
      current.append([c.strip() for c in line.strip("|").split("|")])
    elif current:
      tables.append([r for r in current if not set("".join(r)) <= set("-: ")])
      current = []
  return tables[which]


def _tiny_flags() -> list[str]:
  """--set flags that turn the tiny variant into conftest's tiny_config()."""
  ref, want = validate._flat(pretrain.get_config("tiny")), validate._flat(tiny_config())  # pylint: disable=protected-access
  return [f"--set={k}={v}" for k, v in want.items() if ref[k] != v]


# The fine-tuning of conftest's 32 px model (tests/test_finetune.py ft_config).
FINETUNE_FLAGS = ("train.batch_size=8", "eval.batch_size=8", "data.max_len=24",
                  "data.read_threads=2", "data.read_buffer=16")


@pytest.mark.slow  # 4 tiny pre-training runs and 4 fine-tuning runs
def test_study_command_end_to_end_and_skips_finished_runs(tmp_path):
  root, out = str(tmp_path / "study"), str(tmp_path / "ablations.md")
  with open(out, "w") as f:
    f.write(f"# Ablations\n\nhow-to\n\n{ablation.BEGIN}\n{ablation.END}\n")
  argv = [
      "--workdir", root, "--arms", "mpma,m3ae", "--seeds", "0,1", "--steps", "2", "--tasks",
      "synthetic_cls", "--synthetic", "16,8", "--epochs", "1", "--out", out, *_tiny_flags(),
      *(f"--finetune_set={o}" for o in FINETUNE_FLAGS)
  ]
  first = ablations_cli.main(argv)
  runs = first["runs"]
  assert [(r["arm"], r["seed"]) for r in runs] == [("mpma", 0), ("mpma", 1), ("m3ae", 0),
                                                   ("m3ae", 1)]
  assert all(r["action"] == "start" and r["status"] == "ok" for r in runs)
  figures = ["pretrain i2t_r5", "pretrain t2i_r5", "synthetic_cls accuracy"]
  for r in runs:
    # The run's own files give its figures; its config is the arm's.
    config = json.load(open(os.path.join(r["workdir"], "config.json")))
    assert config["seed"] == r["seed"] and config["train"]["steps"] == 2
    assert config["masking"]["paired"] is (r["arm"] == "mpma")
    assert config["loss"]["itm"] == (1.0 if r["arm"] == "m3ae" else 0.0)
    trained = json.load(open(os.path.join(r["workdir"], "eval.json")))["trained"]
    (row,) = json.load(open(os.path.join(r["workdir"], "suite", "synthetic_cls",
                                         "suite.json")))["rows"]
    assert row["protocol"] == "clean" and row["task"].startswith("synthetic_cls/n16_e8_s32")
    assert r["metrics"] == {
        "pretrain i2t_r5": trained["i2t_r5"], "pretrain t2i_r5": trained["t2i_r5"],
        "synthetic_cls accuracy": row["accuracy"]
    }
    task_dir = os.path.join(r["workdir"], "suite", "synthetic_cls", *row["task"].split("/"))
    ft = json.load(open(os.path.join(task_dir, "config.json")))  # the fine-tuning run's
    assert ft["seed"] == r["seed"] and ft["protocols"] == ["clean"]
  # The summary and the tables agree with the runs.
  by_arm = {a: [r["metrics"] for r in runs if r["arm"] == a] for a in ("mpma", "m3ae")}
  table = _table(open(out).read())
  assert table[0] == ["arm", "seeds", *figures]
  assert [row[:2] for row in table[1:]] == [["mpma", "2"], ["m3ae", "2"]]
  for i, arm in enumerate(("mpma", "m3ae")):
    for j, name in enumerate(figures):
      values = [m[name] for m in by_arm[arm]]
      mean, spread = np.mean(values), (max(values) - min(values)) / 2
      f = first["summary"][arm][name]
      assert f["mean"] == pytest.approx(mean) and f["spread"] == pytest.approx(spread)
      assert table[1 + i][2 + j].strip("*").startswith(f"{100 * mean:.1f} ± {100 * spread:.1f}")
      if arm == "m3ae":
        delta = mean - np.mean([m[name] for m in by_arm["mpma"]])
        assert f["delta"] == pytest.approx(delta)
  per_run = _table(open(out).read(), 1)
  assert per_run[0] == ["arm", "seed", "status", *figures] and len(per_run) == 5
  assert open(out).read().startswith("# Ablations\n\nhow-to\n\n")
  # The record of the invocation: its command, machine and what it did.
  assert first["invocation"]["command"] == " ".join(["python benchmarks/ablations.py", *argv])
  assert (first["invocation"]["pretrained"], first["invocation"]["runs"]) == (4, 4)
  assert (first["invocation"]["fine_tuned"], first["invocation"]["tasks"]) == (4, 4)
  assert f"Command: `{first['invocation']['command']}`. Machine: " in open(out).read()

  # Again: every run and every task is found finished and nothing is trained.
  files = [os.path.join(r["workdir"], "eval.json") for r in runs]
  files += [os.path.join(r["workdir"], "suite", "synthetic_cls", "suite.json") for r in runs]
  stamps = {p: os.path.getmtime(p) for p in files}
  second = ablations_cli.main(argv)
  assert [r["action"] for r in second["runs"]] == ["skip"] * 4
  assert {p: os.path.getmtime(p) for p in stamps} == stamps
  assert second["summary"] == first["summary"]
  assert (second["invocation"]["pretrained"], second["invocation"]["fine_tuned"]) == (0, 0)
  assert "pre-trained 0 of 4 runs and fine-tuned 0 of 4 tasks" in open(out).read()
  saved = json.load(open(os.path.join(root, "ablations.json")))
  assert saved["summary"] == first["summary"] and len(saved["runs"]) == 4
