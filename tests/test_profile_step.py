"""benchmarks/profile_step.py: reading ops and their model parts from compiled HLO text."""
from benchmarks import profile_step

HLO = """
ENTRY %main (p: f32[8,256]) -> s32[8,1] {
  %compare_convert_fusion.1 = s32[8,256]{1,0} fusion(%p), kind=kLoop, calls=%c1, metadata={op_name="jit(step_fn)/jvp(MPMA)/MPMA.fuse/memory/while/body/convert_element_type"}
  %wrapped_reduce-window.2 = s32[8,8]{1,0} fusion(%compare_convert_fusion.1, %constant.1), kind=kLoop, calls=%c2
  %wrapped_broadcast.5 = f32[8,8]{1,0} fusion(%constant.2), kind=kLoop, calls=%c3
  ROOT %add_fusion.3 = f32[8,8]{1,0} fusion(%wrapped_broadcast.5), kind=kLoop, calls=%c4, metadata={op_name="jit(step_fn)/add"}
}
"""


def test_ops_without_metadata_borrow_a_neighbours():
  ops = profile_step.hlo_ops(HLO)
  assert ops["compare_convert_fusion.1"][0] == "fusion:loop"
  # No metadata of its own: takes its operand's, so it counts under the memory's forward pass.
  assert profile_step.label(ops["wrapped_reduce-window.2"][1]) == ("fwd", "memory")
  # No operand with metadata: takes its user's.
  assert ops["wrapped_broadcast.5"][1] == "jit(step_fn)/add"
  assert profile_step.label(ops["add_fusion.3"][1]) == ("update", "grad norm / AdamW / guard")
