"""benchmarks/accelerator_check.py: the whole check on the CPU (both dtypes, the PyTorch twin, XLA's
compiled peak), and its budget and failure handling with the passes stubbed out."""
import json
import math
import time

import pytest

from benchmarks import accelerator_check
from tests.conftest import tiny_config


def _table_rows(text: str) -> list[list[str]]:
  """Cells of the Markdown table's data lines in printed output."""
  lines = [l for l in text.splitlines() if l.startswith("| ") and not l.startswith("| dtype")]
  return [[c.strip() for c in l.strip("|").split("|")] for l in lines]


@pytest.mark.slow
def test_check_runs_both_dtypes_on_cpu(capsys):
  args = accelerator_check.parse_args(["--batch", "8", "--steps", "1", "--warmup", "0"])
  summary = accelerator_check.check(tiny_config(), args, log=lambda line: None)
  out = capsys.readouterr().out

  rows = {(r["dtype"], r["framework"].split()[0]): r for r in summary["rows"]}
  assert sorted(rows) == [("bfloat16", "JAX"), ("bfloat16", "PyTorch"), ("float32", "JAX"),
                          ("float32", "PyTorch")]
  for dtype in accelerator_check.DTYPES:
    jax_row, torch_row = rows[dtype, "JAX"], rows[dtype, "PyTorch"]
    assert "error" not in jax_row and "error" not in torch_row
    assert jax_row["median_s"] > 0 and torch_row["median_s"] > 0
    assert jax_row["compiled_peak_bytes"] > 0
    assert torch_row["torch_vs_jax"] == pytest.approx(torch_row["median_s"] / jax_row["median_s"])
    assert jax_row["estimate"] == {}  # no roofline for a CPU
    assert math.isfinite(jax_row["final_loss"])
  # Same parameters, batch and number of steps: in float32 the twin ends at JAX's loss.
  assert rows["float32",
              "PyTorch"]["final_loss"] == pytest.approx(rows["float32", "JAX"]["final_loss"],
                                                        rel=1e-3)

  cells = _table_rows(out)
  twin = "PyTorch eager f32 (cpu: no AMP)"
  assert [c[:2] for c in cells] == [["bfloat16", "JAX"], ["bfloat16", twin], ["float32", "JAX"],
                                    ["float32", twin]]
  ratio = accelerator_check.COLUMNS.index("PyTorch / JAX")
  compiled = accelerator_check.COLUMNS.index("XLA compiled peak")
  for c in cells:
    assert float(c[2]) > 0  # median step ms
  assert float(cells[1][ratio]) > 0 and float(cells[3][ratio]) > 0
  assert cells[0][compiled].endswith("MiB") and float(cells[0][compiled].split()[0]) > 0
  assert json.loads(out.strip().splitlines()[-1])["table"] == summary["table"]


def _fake_pass(seconds: float, fail: tuple = ()):
  """A stand-in for run_dtype: takes `seconds`, raises for dtypes in `fail`, else one JAX row."""
  def run(config, dtype, args, device, time_left, log):
    time.sleep(seconds)
    if dtype in fail:
      raise RuntimeError("RESOURCE_EXHAUSTED: out of memory")
    return [{
        "dtype": dtype, "framework": "JAX", "median_s": 0.1, "examples_per_s": 80.0, "tflops": 1.0,
        "mfu": None, "compiled_peak_bytes": 2.0**30, "estimate": {}
    }]

  return run


def test_pass_that_the_budget_cannot_hold_is_skipped(monkeypatch, capsys):
  monkeypatch.setattr(accelerator_check, "run_dtype", _fake_pass(0.2))
  args = accelerator_check.parse_args(["--budget_s", "0.3"])
  summary = accelerator_check.check(tiny_config(), args, log=lambda line: None)
  first, second = summary["rows"]
  assert first["dtype"] == "bfloat16" and "error" not in first
  assert second["dtype"] == "float32" and second["error"].startswith("skipped:")
  cells = _table_rows(capsys.readouterr().out)
  assert cells[0][:3] == ["bfloat16", "JAX", "100.00"]
  assert cells[1][2].startswith("skipped:") and len(cells[1]) == len(accelerator_check.COLUMNS)


def test_failed_pass_is_a_row_and_the_next_runs(monkeypatch):
  monkeypatch.setattr(accelerator_check, "run_dtype", _fake_pass(0.0, fail=("bfloat16",)))
  summary = accelerator_check.check(tiny_config(), accelerator_check.parse_args([]),
                                    log=lambda line: None)
  first, second = summary["rows"]
  assert first["error"].startswith("failed: RuntimeError: RESOURCE_EXHAUSTED")
  assert second["dtype"] == "float32" and "error" not in second


def test_refuses_overrides_it_does_not_apply():
  with pytest.raises(SystemExit):
    accelerator_check.parse_args(["--set", "xla_cpu_enable_fast_math=True"])
