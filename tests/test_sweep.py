"""mpma-sweep: expansion, names, validation, print/local modes. No training: local mode runs a fake
command that writes what mpma-pretrain would (a real 2-run sweep costs minutes of compilation)."""
import json
import os
import shlex
import sys
import textwrap

from absl import flags
from ml_collections import config_flags
import pytest

from mpma_jax import overrides
from mpma_jax import sweep as sw
from mpma_jax.cli import sweep as sweep_cli
from tests.conftest import ROOT

PRETRAIN = os.path.join(ROOT, "configs", "pretrain.py")

# A config with a field of every type the command line carries, and a sweep over all of them.
TYPES_CONFIG = textwrap.dedent('''
    import ml_collections

    def get_config(arg=None):
      c = ml_collections.ConfigDict()
      c.name = "synthetic"
      c.path = ""
      c.lr = 1e-3
      c.steps = 10
      c.on = True
      c.modules = ("image_encoder", "text_encoder")
      c.sub = ml_collections.ConfigDict()
      c.sub.layers = 2
      c.other = ml_collections.ConfigDict()
      c.other.layers = 3
      return c

    def get_sweep(arg=None):
      from mpma_jax.sweep import chain, fixed, product, sweep
      return chain(
          product(sweep("lr", [1e-4, 3e-05, 2]), sweep("on", [True, False])),
          fixed("name", "roco:2,medicat:1"),
          fixed("name", "a b/c 'quoted'"),
          fixed("path", "/data/with space"),
          fixed("modules", ("image_encoder",)),
          fixed("modules", ()),
          product(fixed("sub.layers", 4), fixed("other.layers", 5)),
      )
''')


@pytest.fixture
def types_config(tmp_path):
  path = tmp_path / "types.py"
  path.write_text(TYPES_CONFIG)
  return str(path)


def _config(path, arg=None):
  """get_config of a config file, as mpma-sweep loads it (locked)."""
  fv = flags.FlagValues()
  argv = ["x", "--config", path + (f":{arg}" if arg else "")]
  holder = config_flags.DEFINE_config_file("config", None, "", flag_values=fv, sys_argv=argv)
  fv(argv)
  return holder.value


def _parse_pretrain_command(line):
  """A printed command parsed by mpma-pretrain's flag definitions -> (config, workdir, resume)."""
  argv = shlex.split(line)
  assert argv[0] == "mpma-pretrain"
  fv = flags.FlagValues()
  holder = config_flags.DEFINE_config_file("config", None, "", flag_values=fv, sys_argv=argv,
                                           lock_config=True)
  flags.DEFINE_string("workdir", None, "", flag_values=fv)
  flags.DEFINE_bool("resume", False, "", flag_values=fv)
  assert fv(argv) == ["mpma-pretrain"]  # nothing left over
  return holder.value, fv["workdir"].value, fv["resume"].value


def _get(config, field):
  for part in field.split("."):
    config = config[part]
  return config


# --- declaring and naming -------------------------------------------------------------------------


def test_product_sizes_and_order_last_sweep_fastest():
  runs = sw.product(sw.sweep("a", [1, 2, 3]), sw.sweep("b", ["x", "y"]), sw.fixed("c", True))
  assert len(runs) == 6
  assert [(r["a"], r["b"]) for r in runs] == [(1, "x"), (1, "y"), (2, "x"), (2, "y"), (3, "x"),
                                              (3, "y")]
  assert all(r["c"] is True for r in runs)
  assert sw.zip_(sw.sweep("a", [1, 2]), sw.sweep("b", [3, 4])) == [{"a": 1, "b": 3},
                                                                   {"a": 2, "b": 4}]
  assert sw.chain(sw.sweep("a", [1, 2]), sw.fixed("b", 0)) == [{"a": 1}, {"a": 2}, {"b": 0}]
  assert len(
      sw.product(sw.sweep("a", [1, 2]), sw.zip_(sw.sweep("b", [1, 2]), sw.sweep("c", [1, 2])))) == 4


def test_combinators_reject_mistakes():
  with pytest.raises(ValueError, match="'a' is set by more than one sweep"):
    sw.product(sw.sweep("a", [1, 2]), sw.fixed("a", 3))
  with pytest.raises(ValueError, match=r"equal length, got lengths \[2, 3\]"):
    sw.zip_(sw.sweep("a", [1, 2]), sw.sweep("b", [1, 2, 3]))
  with pytest.raises(ValueError, match="non-empty list"):
    sw.sweep("a", [])
  with pytest.raises(ValueError, match="non-empty list"):
    sw.sweep("a", "abc")  # a string would sweep over its characters


def test_names_use_the_varying_fields_and_are_unique_and_safe():
  runs = sw.product(sw.fixed("train.steps", 100), sw.sweep("optim.lr", [1e-4, 2e-4]),
                    sw.sweep("model.memory.topk", [8, 16]))
  assert sw.run_names(runs) == [
      "lr=0.0001,topk=8", "lr=0.0001,topk=16", "lr=0.0002,topk=8", "lr=0.0002,topk=16"
  ]  # train.steps is the same everywhere
  # same last name -> the shortest suffix that tells them apart
  runs = sw.product(sw.sweep("model.image.layers", [2, 3]), sw.fixed("model.text.layers", 4))
  assert sw.run_names(runs) == ["image.layers=2", "image.layers=3"]
  # unsafe characters replaced; names that become equal get a suffix
  names = sw.run_names(sw.sweep("data.name", ["roco:1,medicat:1", "a/b", "a_b", "x" * 300]))
  assert names[:3] == ["name=roco_1,medicat_1", "name=a_b", "name=a_b_2"]
  assert len(names[3]) <= 120 and len(set(names)) == 4
  assert all(os.path.basename(n) == n and not n.startswith((".", "-")) for n in names)
  assert sw.run_names([{"optim.lr": 1e-3}]) == ["lr=0.001"]  # a single run: all of its fields
  assert sw.run_names([{}, {"model.memory.enabled": False}]) == ["default", "enabled=False"]


def test_example_sweep_in_configs_pretrain():
  """configs/pretrain.py's get_sweep: 3 x 3 grid around the variant's lr and top-k, 2 ablations."""
  c = _config(PRETRAIN, "tiny")
  runs = sw.load_sweep(f"{PRETRAIN}:tiny")
  plan = sw.make_plan(c, f"{PRETRAIN}:tiny", "/sweeps/x", {}, runs)
  lr, topk = c.optim.lr, c.model.memory.topk
  names = [r.name for r in plan.runs]
  assert len(names) == 11 and len(set(names)) == 11
  assert names[0] == f"lr={lr * 0.5!r},topk={topk // 2}"
  assert names[4] == f"lr={lr!r},topk={topk}"  # the variant's own settings, the grid's centre
  assert names[9:] == ["enabled=False", "features_from=masked"]
  assert plan.runs[9].overrides == {"model.memory.enabled": False}
  assert all(r.workdir == f"/sweeps/x/{r.name}" for r in plan.runs)


# --- validation ----------------------------------------------------------------------------------


def _plan(runs, fixed=None, config=PRETRAIN + ":tiny"):
  c = _config(*config.split(":"))
  for field, value in (fixed or {}).items():
    overrides.apply(c, field, value, "fixed")
  return sw.make_plan(c, config, "/r", dict(fixed or {}), runs)


@pytest.mark.parametrize("runs, match", [
    (sw.sweep("model.memory.topkk", [8, 16]),
     r"run 'topkk=8' \(#1 of 2\): unknown config field 'model.memory.topkk' .*did you mean "
     r"'model.memory.topk'"),
    (sw.chain(sw.fixed("optim.lr", 1e-3), sw.fixed("optim.nope.x", 1)),
     r"run 'x=1' \(#2 of 2\): unknown config field 'optim.nope.x' \(optim has no 'nope'"),
    (sw.sweep("optim.lr.x", [1, 2]), r"'optim.lr.x': optim.lr is a float, not a group"),
    (sw.sweep("model.memory.topk", ["8", "16"]),
     r"run 'topk=8' .*model.memory.topk='8' is a str but the config holds a int"),
    (sw.sweep("model.memory.topk", [8.0]), r"topk=8.0 is a float but the config holds a int"),
    (sw.sweep("model.memory.topk", [True]), r"topk=True is a bool but the config holds a int"),
    (sw.sweep("model.memory.enabled", [1]), r"enabled=1 is a int but the config holds a bool"),
    (sw.sweep("model.memory", [{}]), r"model.memory is a group of fields, not a value; .*"
     r"model.memory.topk"),
    (sw.chain(sw.sweep("optim.lr", [1e-3, 1e-4]), sw.fixed(
        "optim.lr", 1e-3)), r"runs #1 and #3 of the sweep are the same"),
])
def test_bad_overrides_name_the_field_and_the_run(runs, match):
  with pytest.raises(ValueError, match=match):
    _plan(runs)


def test_a_swept_field_cannot_also_be_fixed_and_ints_become_floats():
  with pytest.raises(ValueError, match="optim.lr is swept by get_sweep and also fixed by "
                     "--config.optim.lr"):
    _plan(sw.sweep("optim.lr", [1e-3]), fixed={"optim.lr": 1e-4})
  plan = _plan(sw.sweep("optim.lr", [1, 2]))  # ints for a float field: stored as floats
  assert plan.runs[0].overrides == {"optim.lr": 1.0} and plan.runs[0].name == "lr=1.0"
  assert "--config.optim.lr=1.0" in plan.runs[0].argv


def test_cli_errors(tmp_path, types_config):
  root = str(tmp_path / "r")
  with pytest.raises(
      ValueError, match=r"--config.model.memory.topkk: unknown config field "
      r"'model.memory.topkk' .*did you mean 'model.memory.topk'"):
    sweep_cli.main([
        "mpma-sweep", "--config", f"{PRETRAIN}:tiny", "--workdir", root,
        "--config.model.memory.topkk=3"
    ])
  no_sweep = tmp_path / "plain.py"
  no_sweep.write_text("import ml_collections\ndef get_config():\n"
                      "  return ml_collections.ConfigDict({'a': 1})\n")
  with pytest.raises(ValueError, match=r"plain.py defines no get_sweep\(arg\)"):
    sweep_cli.main(["mpma-sweep", "--config", str(no_sweep), "--workdir", root])
  with pytest.raises(flags.Error, match="--workdir is required"):
    sweep_cli.main(["mpma-sweep", "--config", types_config])
  assert not os.path.exists(root)  # nothing written on an error


# --- print mode: the commands carry every value exactly -----------------------------------------


def test_print_mode_commands_parse_back_to_the_overrides(tmp_path, capsys, types_config):
  root = str(tmp_path / "sweep")
  assert sweep_cli.main([
      "mpma-sweep", "--config", types_config, "--workdir", root, "--mode=print", "--config.steps=7"
  ]) == 0
  lines = capsys.readouterr().out.splitlines()
  want = sw.load_sweep(types_config)
  assert len(lines) == len(want) == 12
  manifest = json.load(open(os.path.join(root, "sweep.json")))
  assert manifest["config"] == types_config and manifest["fixed"] == {"steps": 7}
  assert [r["command"] for r in manifest["runs"]] == lines
  workdirs = set()
  for line, changes, entry in zip(lines, want, manifest["runs"]):
    config, workdir, resume = _parse_pretrain_command(line)
    assert not resume and config.steps == 7
    for field, value in changes.items():
      got = _get(config, field)
      assert got == value and type(got) is type(float(value) if field == "lr" else value), field
    assert workdir == os.path.join(root, entry["name"]) == entry["workdir"]
    assert entry["overrides"] == json.loads(json.dumps(changes)), entry  # tuples -> lists
    workdirs.add(workdir)
  assert len(workdirs) == 12
  assert "lr=0.0001,on=True" in {os.path.basename(w) for w in workdirs}


def test_print_mode_with_a_launcher_and_run_states(tmp_path, capsys, types_config):
  root = tmp_path / "sweep"
  plan = sw.make_plan(_config(types_config), types_config, str(root), {},
                      sw.load_sweep(types_config))
  done, interrupted = plan.runs[0].workdir, plan.runs[1].workdir
  os.makedirs(done)
  open(os.path.join(done, "eval.json"), "w").write("{}")
  os.makedirs(os.path.join(interrupted, "checkpoints", "20"))

  assert sweep_cli.main(
      ["mpma-sweep", "--config", types_config, "--workdir",
       str(root), "--mode=print"]) == 0
  out = capsys.readouterr()
  lines = out.out.splitlines()
  assert len(lines) == 11 and "finished" in out.err and plan.runs[0].name in out.err
  assert _parse_pretrain_command(lines[0])[1:] == (interrupted, True)  # --resume added
  assert not any(_parse_pretrain_command(l)[2] for l in lines[1:])

  assert sweep_cli.main([
      "mpma-sweep", "--config", types_config, "--workdir",
      str(root), "--mode=print", "--launcher", "sbatch --time=1:00:00 launch/slurm.sbatch"
  ]) == 0
  argv = shlex.split(capsys.readouterr().out.splitlines()[0])
  assert argv[:5] == ["sbatch", "--time=1:00:00", "launch/slurm.sbatch", types_config,
                      interrupted]  # CONFIG WORKDIR; the launcher decides --resume
  assert "--resume" not in argv and argv[5:] == sw.override_flags(plan.runs[1].overrides)
  manifest = json.load(open(root / "sweep.json"))
  assert [r["action"] for r in manifest["runs"][:3]] == ["skip", "resume", "start"]


def test_dry_run_writes_and_runs_nothing(tmp_path, capsys, types_config):
  root = str(tmp_path / "sweep")
  calls = []
  assert sweep_cli.main(["mpma-sweep", "--config", types_config, "--workdir", root, "--dry_run"],
                        runner=lambda argv, log: calls.append(argv) or 0) == 0
  lines = capsys.readouterr().out.splitlines()
  assert len(lines) == 12 and all(l.startswith("start   mpma-pretrain ") for l in lines)
  assert not calls and not os.path.exists(root)


# --- local mode -----------------------------------------------------------------------------------


def test_local_mode_skips_resumes_continues_past_failures_and_summarises(tmp_path, capsys):
  config = tmp_path / "four.py"
  config.write_text(
      textwrap.dedent('''
      import ml_collections
      def get_config():
        return ml_collections.ConfigDict({"seed": 0, "optim": {"lr": 1e-3}})
      def get_sweep():
        from mpma_jax.sweep import sweep
        return sweep("seed", [0, 1, 2, 3, 4])
  '''))
  root = tmp_path / "sweep"
  (root / "seed=0").mkdir(parents=True)  # finished before
  (root / "seed=0" / "eval.json").write_text(json.dumps({"trained": {"i2t_r5": 0.5}}))
  (root / "seed=1" / "checkpoints" / "10").mkdir(parents=True)  # interrupted

  calls = []

  def fake_pretrain(argv, log_path):
    """seed 2 fails, seed 3 stops early at a checkpoint, the others finish with an eval.json."""
    _, workdir, _ = _parse_pretrain_command(shlex.join(argv))
    calls.append((os.path.basename(workdir), "--resume" in argv, log_path))
    seed = int(workdir[-1])
    if seed == 2:
      return 3
    os.makedirs(os.path.join(workdir, "checkpoints", str(10 * seed)), exist_ok=True)
    if seed != 3:
      with open(os.path.join(workdir, "eval.json"), "w") as f:
        json.dump({"trained": {"i2t_r5": seed / 10}}, f)
    return 0

  rc = sweep_cli.main(
      ["mpma-sweep", "--config",
       str(config), "--workdir",
       str(root), "--config.optim.lr=0.01"], runner=fake_pretrain)
  assert rc == 1  # seed=2 failed; the runs after it still ran
  assert [c[:2] for c in calls] == [("seed=1", True), ("seed=2", False), ("seed=3", False),
                                    ("seed=4", False)]
  assert all(c[2] == str(root / c[0] / "run.log") for c in calls)
  out = capsys.readouterr().out
  table = out[out.index(f"sweep {root} "):].splitlines()[1:]
  rows = {l.split()[0]: l.split(None, 1)[1] for l in table[1:]}
  assert table[0].split() == ["run", "status", "i2t_r5", "(%)"]
  assert rows["seed=0"].split() == ["finished", "before", "50.00"]
  assert rows["seed=1"].split() == ["ok", "(resumed)", "10.00"]
  assert rows["seed=2"].split() == ["failed", "(exit", "3)", "-"]
  assert rows["seed=3"].split() == ["stopped", "at", "step", "30", "-"]
  assert rows["seed=4"].split() == ["ok", "40.00"]
  manifest = json.load(open(root / "sweep.json"))
  assert manifest["fixed"] == {"optim.lr": 0.01}
  assert [r["name"] for r in manifest["runs"]] == [f"seed={i}" for i in range(5)]
  assert all("--config.optim.lr=0.01" in r["command"] for r in manifest["runs"])

  # again: finished runs are skipped, the stopped one resumes, the failed one starts over
  calls.clear()
  assert sweep_cli.main(
      ["mpma-sweep", "--config",
       str(config), "--workdir",
       str(root), "--config.optim.lr=0.01"], runner=fake_pretrain) == 1
  assert [c[:2] for c in calls] == [("seed=2", False), ("seed=3", True)]


def test_run_logged_tees_output_and_returns_the_exit_code(tmp_path, capsys):
  log = tmp_path / "run" / "run.log"
  rc = sw.run_logged([sys.executable, "-c", "import sys; print('step 1'); sys.exit(3)"], str(log))
  assert rc == 3 and "step 1" in capsys.readouterr().out
  sw.run_logged([sys.executable, "-c", "print('resumed')"], str(log))
  assert log.read_text() == "step 1\nresumed\n"  # appended across runs
