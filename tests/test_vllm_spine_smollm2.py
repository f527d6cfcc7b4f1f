"""The spine on the real default: vLLM with the plug-in vs the reference model, SmolLM2 (slow).

Its own module so that the tiny engine of test_vllm_spine.py is torn down first:
one vLLM engine at a time in a process (teardown resets vLLM's process-wide state).
"""

import pytest

from .test_vllm_spine import TOL_SMOLLM2
from .vllm_helpers import compare_with_reference, make_llm, shutdown

pytestmark = pytest.mark.engine  # a real vLLM engine, Ray runtime or server process (make test-fast skips)


@pytest.fixture(scope="module")
def smollm2(smollm2_checkpoint):
    from extemb_vllm.model.checkpoint import load_model

    return load_model(smollm2_checkpoint)


@pytest.mark.slow
def test_smollm2_matches_reference(smollm2, smollm2_checkpoint, heldout_texts):
    model, tok = smollm2
    text = (heldout_texts / "pericles.txt").read_text()
    ids = tok(text).input_ids
    llm = make_llm(smollm2_checkpoint, max_model_len=model.ext.window, max_num_batched_tokens=8192)
    try:
        cases = [
            (ids[:720], 20, {"k": 8, "raw_tail": 64, "reserve": 4}),
            (ids[1000:1700], 30, {"k": 4, "raw_tail": 100, "reserve": 4}),
            (ids[5000:5050], 50, {}),                              # short plain prompt
            (ids[8000:12400], 40, {}),                             # over the window: adaptive k
        ]
        assert compare_with_reference(llm, model, cases) < TOL_SMOLLM2
    finally:
        shutdown(llm)
