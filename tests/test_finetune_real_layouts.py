"""Every task of the evaluation suite on tiny copies of its dataset in the layout users download:
every task runs on data in the real layout, and `mpma-eval --suite` prints the table.

One data_dir holds VQA-RAD, SLAKE, VQA-Med-2019, MELINDA, CheXpert, RSNA Pneumonia, ROCO and the
ROCO retrieval draw, each written by its builder test's layout writer (tests/data/builders) plus
enough records for a batch in every split, and built with `builders.build`. `suite.run`
fine-tunes one task of each config file for one epoch from the tiny pre-trained run; the command
line runs VQA-RAD and re-evaluates its checkpoint with `mpma-eval --run`."""
import json
import math
import os
import re
import subprocess
import sys

import jax
import pytest

from mpma_jax import suite
from mpma_jax.data import builders, downstream, text
from mpma_jax.data.builders import chexpert, rsna_pneumonia
from tests.data.builders import test_chexpert, test_roco, test_rsna_pneumonia, test_vqa_sets

pytestmark = pytest.mark.slow  # the slow tier: fine-tunes every task of the suite

BATCH = 8  # train and eval batches split over conftest's 8 simulated devices
_jpeg = lambda i: test_vqa_sets._jpeg(i % 12)  # pylint: disable=protected-access

# --- the layouts ----------------------------------------------------------------------------------
# Every VQA set below has the same 9 answers in train as in all its splits together (each answer on
# 2+ training images, so VQA-RAD's carved validation image removes none) and 16-23 training
# questions: the 6 VQA runs have the same answer head and 2 steps, so they share compiled steps.
NUM_ANSWERS = 9
RAD_OPEN = ("chest", "head", "abdomen", "pelvis", "brain", "spine", "kidney")


def _vqa_rad(root):
  """trainset.json / testset.json / images/: 7 training images with a closed (yes / no) and two
  open questions each; test asks about 2 unseen images and 2 training ones (VQA-RAD's test images
  overlap train). answer_type 'CLOSED ' sometimes has the real file's trailing space."""
  (root / "images").mkdir(parents=True)

  def record(qid, image, kind):
    answer = {0: ("no", "Yes")[image % 2], 1: RAD_OPEN[image % 7], 2: RAD_OPEN[
        (image + 3) % 7]}[kind]
    return {
        "qid": qid, "image_name": f"synpic{image}.jpg", "image_organ": "CHEST", "answer": answer,
        "answer_type": ("CLOSED " if image % 4 == 1 else "CLOSED", "OPEN", "OPEN")[kind],
        "question_type": ("PRES", "ORGAN", "ABN")[kind], "phrase_type": "freeform", "question":
            ("Is there an abnormality?", "What organ is shown?", "What is abnormal here?")[kind]
    }

  for i in range(9):
    (root / "images" / f"synpic{i}.jpg").write_bytes(_jpeg(i))
  train = [record(3 * i + k, i, k) for i in range(7) for k in range(3)]
  test = [record(100 + 3 * i + k, i, k) for i in (7, 8, 0, 1) for k in range(2)]
  json.dump(train, open(root / "trainset.json", "w"))
  json.dump(test, open(root / "testset.json", "w"))


def _slake(root):
  """test_vqa_sets' SLAKE copy (Chinese, corrupt, missing, numeric answers) + a closed and an open
  question about each of 8 / 2 / 2 more images."""
  test_vqa_sets._slake(root)  # pylint: disable=protected-access
  organs = ("Lung", "Liver", "Brain", "Left Lung", "Right")  # the last two: val / test's answers
  image = 10
  for name, n_images in (("train", 8), ("validate", 2), ("test", 2)):
    records = json.load(open(root / f"{name}.json"))
    for _ in range(n_images):
      img = f"xmlab{image}/source.jpg"
      (root / "imgs" / f"xmlab{image}").mkdir()
      (root / "imgs" / img).write_bytes(_jpeg(image))
      records += [
          test_vqa_sets._slake_question(  # pylint: disable=protected-access
              1000 + 2 * image, img, "Is this normal?", ("No", "Yes")[image % 2], atype="CLOSED"),
          test_vqa_sets._slake_question(  # pylint: disable=protected-access
              1001 + 2 * image, img, "Which organ is shown?", organs[image % 5])
      ]
      image += 1
    json.dump(records, open(root / f"{name}.json", "w"))


def _vqa_med_2019(root):
  """test_vqa_sets' VQA-Med-2019 copy + C1-C3 questions about 5 training, 2 validation and 2 test
  images; test answers carry '#' alternatives (each also a training answer)."""
  test_vqa_sets._vqa_med(root)  # pylint: disable=protected-access
  qa = {
      "C1_Modality": ("what modality is shown?", ("mr - flair", "us", "us-d", "ct w/contrast",
                                                  "ct noncontrast")),
      "C2_Plane": ("what plane is this?", ("sagittal", "axial")),
      "C3_Organ": ("what organ system is shown?", ("gastrointestinal", "gi"))
  }
  for top, images, suffix, first, n in (("ImageClef-2019-VQA-Med-Training", "Train_images", "train",
                                         10, 5), ("ImageClef-2019-VQA-Med-Validation", "Val_images",
                                                  "val", 20, 2)):
    for cat, (question, answers) in qa.items():
      with open(root / top / "QAPairsByCategory" / f"{cat}_{suffix}.txt", "a") as f:
        f.write("".join(
            f"\nsynpic{i}|{question}|{answers[i % len(answers)]}" for i in range(first, first + n)))
    for i in range(first, first + n):
      (root / top / images / f"synpic{i}.jpg").write_bytes(_jpeg(i))
  test = root / "VQAMed2019Test"
  lines = []
  for i in (30, 31):
    (test / "VQAMed2019_Test_Images" / f"synpic{i}.jpg").write_bytes(_jpeg(i))
    lines += [
        f"synpic{i}|modality|what modality is shown?|ct noncontrast#ct w/contrast",
        f"synpic{i}|plane|what plane is this?|{('axial', 'sagittal')[i % 2]}",
        f"synpic{i}|organ|what organ system is shown?|gi#gastrointestinal"
    ]
  with open(test / "VQAMed2019_Test_Questions_w_Ref_Answers.txt", "a") as f:
    f.write("\n" + "\n".join(lines))


def _melinda(root):
  """test_vqa_sets' MELINDA copy + one more training figure per class and 3 more dev / test."""
  test_vqa_sets._melinda(root)  # pylint: disable=protected-access
  labels = test_vqa_sets.LABELS
  for name, first, n in (("train", 100, 7), ("dev", 200, 3), ("test", 300, 3)):
    with open(root / f"{name}.csv", "a") as f:
      for i in range(first, first + n):
        (root / "melinda_images" / f"f{i}.jpg").write_bytes(_jpeg(i))
        f.write(f'f{i}.jpg,"Panel {i}, figure caption.",a,b,c,{labels[i % 7]}\n')


def _chexpert(root):
  """test_chexpert's rows + 87 training and 6 validation radiographs whose competition labels
  cycle through 1, 0, -1 and empty (validation: 1 and 0, both for every label)."""
  comp = chexpert.COMPETITION
  train = [(f"train/patient{10 + i:05d}/study1/view{1 + i % 2}_"
            f"{('frontal', 'lateral')[i % 2]}.jpg", ("Frontal", "Lateral")[i % 2],
            {n: ("1.0", "0.0", "-1.0", "")[(i + j) % 4] for j, n in enumerate(comp)}, "ok")
           for i in range(87)]
  valid = [(f"valid/patient{64600 + i}/study1/view1_frontal.jpg", "Frontal",
            {n: ("1.0", "0.0")[(i + j) % 2] for j, n in enumerate(comp)}, "ok") for i in range(6)]
  root = root / test_chexpert.DIR
  root.mkdir(parents=True)
  test_chexpert._write(root, "train.csv", test_chexpert.TRAIN + train, chexpert.LABELS)  # pylint: disable=protected-access
  test_chexpert._write(root, "valid.csv", test_chexpert.VALID + valid, chexpert.LABELS[::-1])  # pylint: disable=protected-access


def _rsna_pneumonia(root):
  """40 patients (normal: one row without a box; pneumonia: one to three boxes) + test_rsna's
  empty id, missing image, corrupt image and three-box patient. Labels alternate along the
  patients ordered by their split, so that validation and test hold both classes."""
  quirks = {p: test_rsna_pneumonia.PATIENTS[p] for p in ("", "pid04", "pid10", "pid13")}
  ids = [f"rsna{i:03d}" for i in range(40)]
  split_of = rsna_pneumonia.RsnaPneumonia.split_of  # (the 40 ids split 28 / 4 / 8)
  order = sorted(ids + list(quirks), key=lambda p: (split_of(p), p))
  box = test_rsna_pneumonia.BOX
  patients = dict(quirks)
  for rank, p in enumerate(q for q in order if q in ids):
    patients[p] = ([f"{box},1"] * (1 + rank % 3) if rank % 2 else [",,,,0"], "ok")
  test_rsna_pneumonia._write(root, patients)  # pylint: disable=protected-access


def _roco(root):
  """ROCO v1 (data/{train,validation,test}/radiology/) via test_roco: 10 / 4 / 8 usable pairs,
  plus a missing image, a short caption, a malformed line and an empty caption."""
  captions = ("Axial CT of the abdomen shows a hypodense liver lesion.",
              "Chest radiograph with a right pleural effusion.",
              "Sagittal MRI of the lumbar spine shows a disc herniation.",
              "Renal ultrasound shows mild hydronephrosis on the left.")
  pairs = lambda first, n: [(f"ROCO_{first + i:05d}", f"{captions[i % 4]} Case {first + i}.", "ok")
                            for i in range(n)]
  test_roco._roco_split(
      root,
      "train",
      pairs(100, 10) + [  # pylint: disable=protected-access
          ("ROCO_00197", captions[0], None), ("ROCO_00198", "CT scan", "ok"),
          ("ROCO_00199", None, "ok")
      ])
  test_roco._roco_split(root, "validation", pairs(200, 4))  # pylint: disable=protected-access
  test_roco._roco_split(root, "test", pairs(300, 8) + [("ROCO_00399", "  ", "ok")])  # pylint: disable=protected-access


# dataset -> its layout writer (roco_retrieval reads ROCO's manual_dir)
LAYOUTS = {
    "vqa_rad": _vqa_rad, "slake": _slake, "vqa_med_2019": _vqa_med_2019, "melinda": _melinda,
    "chexpert": _chexpert, "rsna_pneumonia": _rsna_pneumonia, "roco": _roco
}
# One task of each config file (the test split each reads, for the counts).
TASKS = (("vqa_rad", ""), ("slake", ""), ("vqa_med_2019", ""), ("melinda", ""),
         ("roco", "zero_shot"), ("roco", "finetune"), ("chexpert", "probe_10"), ("rsna_pneumonia",
                                                                                 "finetune_100"))
# table label -> (dataset whose build report counts the test records, its test split, protocols)
EXPECTED = {
    "vqa_rad": ("vqa_rad", "test", ("prior", "clean")),
    "slake": ("slake", "test", ("prior", "clean")),
    "vqa_med_2019": ("vqa_med_2019", "test", ("prior", "clean")),
    "melinda": ("melinda", "test", ("clean",)),
    "roco_retrieval:zero_shot": ("roco_retrieval", "test", ("clean",)),
    "roco_retrieval:finetune": ("roco_retrieval", "test", ("clean",)),
    "chexpert:probe_10": ("chexpert", "validation", ("clean",)),  # valid.csv is the test set
    "rsna_pneumonia:finetune_100": ("rsna_pneumonia", "test", ("clean",)),
}
OVERRIDES = {
    "train.epochs": 1,
    "train.batch_size": BATCH,
    "eval.batch_size": BATCH,
    "optim.lr": 1e-4,  # x head_mult 50 on VQA: the head moves in 2 steps
    "image_size": 0,
    "data.max_len": 24,
    "data.read_threads": 2,
    "data.read_buffer": 8,
    "rsna_pneumonia:finetune_100": {"image_size": 48}
}  # resizes the position embedding


@pytest.fixture(scope="module")
def real_layouts(tmp_path_factory):
  """(data_dir with every dataset built, {dataset: build report})."""
  manual = tmp_path_factory.mktemp("manual")
  data_dir = str(tmp_path_factory.mktemp("data"))
  reports = {}
  for name, write in LAYOUTS.items():
    write(manual / name)
    reports[name] = builders.build(name, str(manual / name), data_dir)[1]
  reports["roco_retrieval"] = builders.build("roco_retrieval", str(manual / "roco"), data_dir)[1]
  return data_dir, reports


@pytest.fixture(scope="module")
def suite_run(pretrained_run, real_layouts, tmp_path_factory):
  """suite.run over TASKS: (workdir, table, rows, logged lines)."""
  data_dir, _ = real_layouts
  workdir = str(tmp_path_factory.mktemp("suite"))
  lines = []
  import time
  t0 = time.time()

  def log(line):
    lines.append(line)
    print(f"{time.time() - t0:7.1f} {line}", file=sys.stderr, flush=True)

  table, rows = suite.run(pretrained_run, data_dir, workdir, TASKS, OVERRIDES, log)
  print(table, file=sys.stderr)
  return workdir, table, rows, lines


def test_every_dataset_builds_from_its_layout_with_its_skips_counted(real_layouts):
  _, reports = real_layouts
  written = {name: {s: r["written"] for s, r in report.items()} for name, report in reports.items()}
  assert written == {
      "vqa_rad": {"train": 21, "test": 8}, "slake": {"train": 19, "validation": 5, "test": 5},
      "vqa_med_2019": {"train": 18, "validation": 7,
                       "test": 8}, "melinda": {"train": 14, "validation": 4, "test": 4},
      "chexpert": {"train": 90,
                   "validation": 8}, "rsna_pneumonia": {"train": 29, "validation": 4, "test": 8},
      "roco": {"train": 10, "validation": 4, "test": 8}, "roco_retrieval": {"test": 8}
  }
  assert reports["slake"]["train"]["skipped"] == {
      "not English": 1, "unreadable image": 1, "missing image": 1
  }
  assert sum(reports["rsna_pneumonia"][s]["skipped"].get("missing image", 0)
             for s in ("train", "validation", "test")) == 1
  assert reports["roco"]["train"]["skipped"] == {
      "missing image": 1, "text too short": 1, "malformed line": 1
  }
  # Validation and test hold both classes of the binary task (its AUC is defined).
  data_dir, _ = real_layouts
  b = builders.builder("rsna_pneumonia", data_dir)
  for split in ("validation", "test"):
    source = b.as_data_source(split)
    assert {int(source[i]["label"]) for i in range(len(source))} == {0, 1}, split


def test_suite_has_one_row_per_task_and_protocol_with_metrics_in_range(suite_run):
  workdir, table, rows, _ = suite_run
  assert [(r["task"], r["protocol"]) for r in rows
         ] == [(label, p) for label, (_, _, protocols) in EXPECTED.items() for p in protocols]
  # NaN only where a group is empty: VQA-Med-2019 has no closed questions.
  for r in rows:
    for column, value in r.items():
      if isinstance(value, float):
        if math.isnan(value):
          assert r["task"] == "vqa_med_2019" and column in ("closed", "majority closed"), (r,
                                                                                           column)
        else:
          assert 0 <= value <= 1, (r, column)
  notes = {(r["task"], r["protocol"]): r.get("note") for r in rows}
  assert notes.pop(("vqa_rad", "prior")) == "selected on test"
  assert set(notes.values()) == {None}
  lines = table.splitlines()
  assert lines[0].startswith("| task") and "| protocol" in lines[0] and "mean AUC" in lines[0]
  assert re.fullmatch(r"\|( *:?-+:? *\|)+", lines[1])
  assert len(lines) == 2 + len(rows) and "Not run" not in table
  assert open(os.path.join(workdir, "suite.md")).read().strip() == table.strip()
  saved = json.load(open(os.path.join(workdir, "suite.json")))
  assert len(saved["rows"]) == len(rows) and saved["not_built"] == []


def test_each_result_tests_every_record_of_its_test_split(suite_run, real_layouts):
  workdir, _, _, lines = suite_run
  _, reports = real_layouts
  for label, (dataset, split, protocols) in EXPECTED.items():
    results = json.load(open(os.path.join(workdir, label.replace(":", "_"), "results.json")))
    assert sorted(results) == sorted(protocols), label
    for protocol, r in results.items():
      assert r["num_test"] == reports[dataset][split]["written"], (label, protocol)
      if r["task"] == "vqa":
        assert r["test"]["n_open"] + r["test"]["n_closed"] == r["num_test"]
  rad = json.load(open(os.path.join(workdir, "vqa_rad", "results.json")))
  assert rad["prior"]["selected_on"] == "test" and rad["prior"]["selected_on_test"]
  assert rad["clean"]["selected_on"] == "train" and not rad["clean"]["selected_on_test"]
  assert rad["clean"]["num_train"] + rad["clean"]["num_select"] == 21  # one image's 3 carved
  for label in ("vqa_rad", "slake", "vqa_med_2019"):
    results = json.load(open(os.path.join(workdir, label, "results.json")))
    assert {p: r["num_answers"] for p, r in results.items()} == dict.fromkeys(("prior", "clean"),
                                                                             NUM_ANSWERS), label
    assert [h["step"] for r in results.values() for h in r["history"]] == [2, 2]  # 1 epoch
  chest = json.load(open(os.path.join(workdir, "chexpert_probe_10", "results.json")))["clean"]
  assert chest["num_select"] == 9 and chest["num_train"] == 8  # 10% of the 81 left to train
  assert all(0 <= chest["test"][n] <= 1 for n in chexpert.COMPETITION)
  zero = json.load(open(os.path.join(workdir, "roco_retrieval_zero_shot", "results.json")))
  assert zero["clean"]["history"] == [] and zero["clean"]["best_epoch"] == 0  # stayed zero-shot
  tuned = json.load(open(os.path.join(workdir, "roco_retrieval_finetune", "results.json")))
  assert len(tuned["clean"]["history"]) == 1 and tuned["clean"]["num_train"] == 10
  assert tuned["clean"]["num_select"] == 4  # ROCO's validation pairs
  assert any("position_embedding resized" in line for line in lines)  # rsna at 48 px


def test_vqa_med_2019_is_all_open_and_accepts_every_alternative(suite_run, real_layouts,
                                                                pretrained_run):
  workdir, _, _, _ = suite_run
  data_dir, _ = real_layouts
  results = json.load(open(os.path.join(workdir, "vqa_med_2019", "results.json")))
  for r in results.values():
    assert r["test"]["n_closed"] == 0 and r["test"]["n_open"] == r["num_test"] == 8
  vocab = json.load(open(os.path.join(workdir, "vqa_med_2019", "prior", "vocab.json")))
  b = builders.builder("vqa_med_2019", data_dir)
  test = b.as_data_source("test")
  decode = downstream.Decode("vqa", os.path.join(pretrained_run, "tokenizer"), 32, 24, vocab)
  alternatives = 0
  for i in range(len(test)):
    accepted = text.accepted_answers(test[i]["answer"])
    assert all("#" not in a for a in accepted) and set(accepted) <= set(vocab)
    example = decode.map({"record": test[i], "index": i})
    assert example["accepted"].sum() == len(accepted) and example["closed"] == 0
    alternatives += len(accepted) > 1
  assert alternatives == 5  # us#us-d and four of the added questions


def test_command_line_suite_and_eval_of_its_run(pretrained_run, real_layouts, suite_run, tmp_path):
  """`mpma-eval --suite --override ...` on a data_dir holding only VQA-RAD: the table, MELINDA
  under "Not run"; then `mpma-eval --run` on its VQA-RAD run recomputes the test metrics of
  results.json from the checkpoint. (After suite_run, with its overrides and devices: the
  compiled steps come from the persistent cache.)"""
  data_dir, _ = real_layouts
  only_rad = tmp_path / "data"
  only_rad.mkdir()
  os.symlink(os.path.join(data_dir, "vqa_rad"), only_rad / "vqa_rad")
  env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir or ""}
  # `mpma-eval`, with conftest's one-computation-at-a-time setting for 8 devices.
  cmd = [
      sys.executable, "-c", "import jax; jax.config.update('jax_cpu_enable_async_dispatch', "
      "False); from mpma_jax.cli import evaluate; evaluate.run()"
  ]
  overrides = [f"--override={k}={v!r}" for k, v in OVERRIDES.items() if not isinstance(v, dict)]
  done = subprocess.run(
      cmd + [
          "--suite", "--init", pretrained_run, "--data_dir",
          str(only_rad), "--workdir",
          str(tmp_path / "w"), "--tasks", "vqa_rad,melinda"
      ] + overrides, capture_output=True, text=True, env=env, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  table = open(tmp_path / "w" / "suite.md").read().strip()
  assert table in done.stdout
  lines = table.splitlines()
  assert lines[0].startswith("| task") and re.fullmatch(r"\|( *:?-+:? *\|)+", lines[1])
  assert [line.split("|")[1:3] for line in lines[2:4]] == [[" vqa_rad ", " prior "],
                                                           [" vqa_rad ", " clean "]]
  assert lines[-1].startswith("Not run") and lines[-1].endswith(": melinda")
  run = tmp_path / "w" / "vqa_rad"
  config = json.load(open(run / "config.json"))
  assert (config["train"]["epochs"], config["train"]["batch_size"], config["image_size"],
          config["optim"]["lr"]) == (1, BATCH, 0, OVERRIDES["optim.lr"])
  # The same data, config and seed as the in-process suite's VQA-RAD run: the same results.
  same = json.load(open(os.path.join(suite_run[0], "vqa_rad", "results.json")))
  results = json.load(open(run / "results.json"))
  for protocol, r in results.items():
    assert r["test"] == pytest.approx(same[protocol]["test"], nan_ok=True)
  done = subprocess.run(cmd + ["--run", str(run)], capture_output=True, text=True, env=env,
                        timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  again = json.load(open(run / "eval_test.json"))
  assert sorted(again) == ["clean", "prior"]
  for protocol, r in results.items():
    assert again[protocol]["checkpoint"] == r["best_epoch"] == 1
    for k in ("open", "closed", "overall", "n_open", "n_closed", "n"):
      assert again[protocol][k] == pytest.approx(r["test"][k]), (protocol, k)
