"""SLAKE, VQA-Med-2019 and MELINDA on tiny copies in their distributed layouts."""
import codecs
import json

import numpy as np
import pytest

from mpma_jax.data import builders, images


def _jpeg(i: int) -> bytes:
  return images.encode_jpeg(np.full((16, 16, 3), 20 * i, np.uint8))


# --- SLAKE ------------------------------------------------------------------------------------------
def _slake_question(qid, img, question, answer, lang="en", atype="OPEN") -> dict:
  """One record of SLAKE's {train,validate,test}.json."""
  return {
      "img_id": 1, "img_name": img, "question": question, "answer": answer, "q_lang": lang,
      "location": "Lung", "modality": "X-Ray", "answer_type": atype, "base_type": "vqa",
      "content_type": "Position", "triple": ["vhead", "_", "_"], "qid": qid
  }


def _slake(root):
  (root / "imgs" / "xmlab1").mkdir(parents=True)
  (root / "imgs" / "xmlab2").mkdir(parents=True)
  (root / "imgs" / "xmlab1" / "source.jpg").write_bytes(_jpeg(1))
  (root / "imgs" / "xmlab2" / "source.jpg").write_bytes(_jpeg(2)[:25])  # corrupt
  q = _slake_question
  json.dump([
      q(1, "xmlab1/source.jpg", "How many lungs are there?", 2),
      q(2, "xmlab1/source.jpg", "Is this a CT?", "No", atype="CLOSED "),
      q(3, "xmlab1/source.jpg", "这是什么?", "肺", lang="zh"),
      q(4, "xmlab2/source.jpg", "What organ?", "Lung"),
      q(5, "xmlab3/source.jpg", "What organ?", "Lung"),
      q(6, "xmlab1/source.jpg", "Size?", 2.5)
  ], open(root / "train.json", "w"))
  json.dump([q(7, "xmlab1/source.jpg", "Where?", "Left Lung")], open(root / "validate.json", "w"))
  json.dump([q(8, "xmlab1/source.jpg", "Where?", "Right")], open(root / "test.json", "w"))


def test_slake(tmp_path):
  _slake(tmp_path / "m")
  b, report = builders.build("slake", str(tmp_path / "m"), str(tmp_path / "out"))
  assert report == {
      "train": {
          "written": 3, "skipped": {"not English": 1, "unreadable image": 1, "missing image": 1}
      }, "validation": {"written": 1, "skipped": {}}, "test": {"written": 1, "skipped": {}}
  }
  train = b.as_data_source("train")
  got = {train[i]["id"]: train[i] for i in range(len(train))}
  assert got[b"1"]["answer"] == b"2" and got[b"6"]["answer"] == b"2.5"  # numbers coerced
  assert got[b"2"]["answer_type"] == b"closed" and got[b"1"]["category"] == b"position"
  (tmp_path / "m" / "validate.json").unlink()
  with pytest.raises(FileNotFoundError, match="validate.json"):
    builders.build("slake", str(tmp_path / "m"), str(tmp_path / "out2"))


def _json_with_raw_bytes(path, records):
  """Writes records as JSON, with every '@@' inside a string replaced by the byte 0xff."""
  path.write_bytes(json.dumps(records, ensure_ascii=False).encode().replace(b"@@", b"\xff"))


def test_slake_bad_records_are_counted(tmp_path):
  root = tmp_path / "m"
  _slake(root)
  q = _slake_question
  good = "xmlab1/source.jpg"
  no_qid, no_lang = q(9, good, "Where?", "Left"), q(10, good, "Where?", "Left")
  del no_qid["qid"], no_lang["q_lang"]
  no_image = q(11, good, "Where?", "Left")
  del no_image["img_name"]
  _json_with_raw_bytes(root / "train.json", [
      q(1, good, "Which organ is shown?", "Lung"), no_qid, no_lang, no_image,
      q(12, "", "Where?", "Left"),
      q(13, "xmlab1", "Where?", "Left"),
      q(14, good, "Where?", None),
      q(15, good, "Where?", ["Left"]),
      q(16, good, "Wh@@ere?", "Left"),
      q(17, good, "Where?", "   "), "not a record",
      q(18, good, "这是什么?", None, lang="zh")
  ])
  b, report = builders.build("slake", str(root), str(tmp_path / "out"))
  assert report["train"] == {
      "written": 1, "skipped": {
          "missing field": 3, "no image name": 1, "missing image": 1, "empty answer": 2,
          "malformed record": 2, "non-UTF-8 text": 1, "not English": 1
      }
  }
  assert b.as_data_source("train")[0]["answer"] == b"Lung"


@pytest.mark.parametrize("content, message", [
    (b'[{"qid": 1, "img_name": "xmlab1/source.jpg",', r"not valid JSON \(Expecting .* line 1 "),
    (b'[\n{"qid": 1}, \xff\n]', r"not valid JSON \(Expecting value: line 2 column 13"),
    (b'{"qid": 1}', "expected a JSON list of questions, found dict"),
])
def test_slake_unreadable_file_is_a_one_line_error(tmp_path, content, message):
  _slake(tmp_path / "m")
  (tmp_path / "m" / "validate.json").write_bytes(content)
  with pytest.raises(ValueError, match=r"validate\.json: " + message):
    builders.build("slake", str(tmp_path / "m"), str(tmp_path / "out"))


# --- VQA-Med-2019 -----------------------------------------------------------------------------------
def _vqa_med(root):
  for top, images_dir, suffix, rows in (("ImageClef-2019-VQA-Med-Training", "Train_images", "train",
                                         {
                                             "C1_Modality": [
                                                 "synpic1|what modality is shown?|ct noncontrast",
                                                 "bad line"
                                             ], "C2_Plane": [
                                                 "synpic1|what plane is this?|axial",
                                                 "synpic9|which plane?|axial"
                                             ],
                                             "C3_Organ": ["synpic2|what organ system is shown?|gi"]
                                         }),
                                        ("ImageClef-2019-VQA-Med-Validation", "Val_images", "val", {
                                            "C1_Modality": ["synpic1|what modality?|mr - flair"],
                                            "C2_Plane": [], "C3_Organ": []
                                        })):
    (root / top / "QAPairsByCategory").mkdir(parents=True)
    (root / top / images_dir).mkdir()
    (root / top / images_dir / "synpic1.jpg").write_bytes(_jpeg(1))
    (root / top / images_dir / "synpic2.jpg").write_bytes(_jpeg(2))
    for cat, lines in rows.items():
      (root / top / "QAPairsByCategory" / f"{cat}_{suffix}.txt").write_text("\n".join(lines))
  test = root / "VQAMed2019Test"
  (test / "VQAMed2019_Test_Images").mkdir(parents=True)
  (test / "VQAMed2019_Test_Images" / "synpic5.jpg").write_bytes(_jpeg(5))
  (test / "VQAMed2019_Test_Questions_w_Ref_Answers.txt").write_text("\n".join([
      "synpic5|modality|what imaging method was used?|us#us-d",
      "synpic5|plane|what plane?|sagittal", "synpic5|abnormality|what is abnormal?|fracture"
  ]))


def test_vqa_med_2019(tmp_path):
  _vqa_med(tmp_path / "m")
  b, report = builders.build("vqa_med_2019", str(tmp_path / "m"), str(tmp_path / "out"))
  assert report == {
      "train": {"written": 3, "skipped": {"malformed line": 1, "missing image": 1}},
      "validation": {"written": 1,
                     "skipped": {}}, "test": {"written": 2, "skipped": {"category not used": 1}}
  }
  test = b.as_data_source("test")
  got = {test[i]["category"]: test[i] for i in range(len(test))}
  assert got[b"modality"]["answer"] == b"us#us-d"  # alternatives kept
  assert got[b"plane"]["answer_type"] == b"open"
  (tmp_path / "m" / "VQAMed2019Test" / "VQAMed2019_Test_Questions_w_Ref_Answers.txt").unlink()
  with pytest.raises(FileNotFoundError, match="VQAMed2019_Test_Questions_w_Ref_Answers.txt"):
    builders.build("vqa_med_2019", str(tmp_path / "m"), str(tmp_path / "out2"))


# --- MELINDA ----------------------------------------------------------------------------------------
LABELS = [
    "Cell-based", "Cryo-EM", "Flow cytometry", "Immunoassay", "Light microscopy", "Molecular",
    "X-ray"
]  # any 7 labels: the builder takes the class list from train.csv


def _melinda(root):
  (root / "melinda_images").mkdir(parents=True)
  header = "figure_file,caption,i_meth,p_meth,i_meth_label,p_meth_label\n"
  train = [f"f{i}.jpg,\"Figure {i}, a caption.\",a,b,c,{label}" for i, label in enumerate(LABELS)]
  train.append("f90.jpg,missing image,a,b,c,X-ray")
  for i in range(len(LABELS)):
    (root / "melinda_images" / f"f{i}.jpg").write_bytes(_jpeg(i))
  (root / "melinda_images" / "f20.jpg").write_bytes(_jpeg(3))
  (root / "train.csv").write_text(header + "\n".join(train) + "\n")
  (root / "dev.csv").write_text(header + "f20.jpg,,a,b,c,Cryo-EM\nf0.jpg,x,a,b,c,Unknown\n")
  (root / "test.csv").write_text(header + "f1.jpg,caption,a,b,c,Molecular\n")


def test_melinda(tmp_path):
  _melinda(tmp_path / "m")
  b, report = builders.build("melinda", str(tmp_path / "m"), str(tmp_path / "out"))
  assert report == {
      "train": {"written": 7, "skipped": {"missing image": 1}},
      "validation": {"written": 1,
                     "skipped": {"unknown label": 1}}, "test": {"written": 1, "skipped": {}}
  }
  assert list(b.info.metadata["class_names"]) == sorted(LABELS)
  dev = b.as_data_source("validation")[0]
  assert dev["text"] == b"" and dev["label"] == sorted(LABELS).index("Cryo-EM")
  np.testing.assert_array_equal(dev["labels"], np.eye(7)[dev["label"]])
  reloaded = builders.builder("melinda", str(tmp_path / "out"))  # class names survive a reload
  assert list(reloaded.info.metadata["class_names"]) == sorted(LABELS)
  (tmp_path / "m" / "dev.csv").unlink()
  with pytest.raises(FileNotFoundError, match="dev.csv"):
    builders.build("melinda", str(tmp_path / "m"), str(tmp_path / "out2"))


def test_melinda_bad_rows_are_counted(tmp_path):
  root = tmp_path / "m"
  _melinda(root)
  header = b"figure_file,caption,i_meth,p_meth,i_meth_label,p_meth_label\n"
  rows = [
      b'f1.jpg,"A caption\nover two lines.",a,b,c,Molecular',
      b",no figure file,a,b,c,Molecular",
      b'f2.jpg,"Caf\xe9 caption in Latin-1.",a,b,c,Molecular',
      b"f3.jpg,a short row",
      b"f4.jpg,caption,a,b,c,X-ray,one field too many",
      b"f5.jpg,caption,a,b,c,Caf\xe9",  # a label that is not UTF-8 is no class either
      b"melinda_images,caption,a,b,c,Molecular",  # not a file
  ]
  (root / "test.csv").write_bytes(header + b"\n".join(rows) + b"\n")
  (root / "melinda_images" / "melinda_images").mkdir()
  train = (root / "train.csv").read_bytes()
  (root / "train.csv").write_bytes(codecs.BOM_UTF8 + train + rows[5] + b"\n")
  b, report = builders.build("melinda", str(root), str(tmp_path / "out"))
  assert list(b.info.metadata["class_names"]) == sorted(LABELS)
  assert report["train"] == {"written": 7, "skipped": {"missing image": 1, "non-UTF-8 text": 1}}
  assert report["test"] == {
      "written": 1,
      "skipped": {"no image name": 1, "non-UTF-8 text": 2, "malformed line": 2, "missing image": 1}
  }
  assert b.as_data_source("test")[0]["text"] == b"A caption over two lines."
  (root / "dev.csv").write_bytes(header + b"f1.jpg,x,a,b,c,Molecular\nf2.jpg," + b"x" * 140000)
  with pytest.raises(ValueError, match=r"dev\.csv: line 3: field larger than field limit"):
    builders.build("melinda", str(root), str(tmp_path / "out2"))


# --- VQA-Med-2019 (name and encoding) ----------------------------------------------------------------
def test_vqa_med_2019_builds_under_its_name_and_counts_non_utf8(tmp_path):
  root = tmp_path / "m"
  _vqa_med(root)
  path = root / "ImageClef-2019-VQA-Med-Training" / "QAPairsByCategory" / "C3_Organ_train.txt"
  path.write_bytes(codecs.BOM_UTF8 + path.read_bytes() + b"\nsynpic1|what organ?|caf\xe9\n")
  b, report = builders.build("vqa_med_2019", str(root), str(tmp_path / "out"))
  assert b.name == "vqa_med_2019"
  assert (tmp_path / "out" / "vqa_med_2019" / "1.0.0" / "build_report.json").exists()
  assert report["train"] == {
      "written": 3, "skipped": {"malformed line": 1, "missing image": 1, "non-UTF-8 text": 1}
  }
  train = b.as_data_source("train")
  assert {train[i]["image_id"] for i in range(3)} == {b"synpic1", b"synpic2"}  # BOM not in the id
