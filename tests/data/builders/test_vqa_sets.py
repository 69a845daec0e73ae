"""SLAKE, VQA-Med-2019 and MELINDA on tiny copies in their distributed layouts."""
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
