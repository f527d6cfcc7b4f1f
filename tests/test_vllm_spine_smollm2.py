"""The spine on the real default: vLLM with the plug-in vs the reference model, SmolLM2 (slow),
in float32 and in bfloat16 (what `vllm serve` picks on a CPU with native bf16).

Its own module so that the tiny engine of test_vllm_spine.py is torn down first:
one vLLM engine at a time in a process (teardown resets vLLM's process-wide state).
"""

import pytest

from .test_vllm_spine import TOL_SMOLLM2
from .vllm_helpers import compare_with_reference, make_llm, shutdown, vllm_request

pytestmark = pytest.mark.engine  # a real vLLM engine, Ray runtime or server process (make test-fast skips)

# bf16 against the float32 reference: the mean |logprob difference| per case. Measured (SmolLM2,
# the cases below, AMX CPU): 0.031-0.037 (the largest single one 0.10-0.13); with 10% noise on the
# embedder's weights 0.13-0.18, with another text's compact slots 0.37-0.45, float32 5e-6.
TOL_BF16_MEAN = 0.06


@pytest.fixture(scope="module")
def smollm2(smollm2_checkpoint):
    from extemb_vllm.model.checkpoint import load_model

    return load_model(smollm2_checkpoint)


@pytest.fixture(scope="module")
def pericles(smollm2, heldout_texts):
    _, tok = smollm2
    return tok((heldout_texts / "pericles.txt").read_text()).input_ids


def _compressing_cases(ids):
    # fill_window off: exactly raw_tail raw, so these short inputs are compressed at the given k
    return [(ids[:720], 20, {"k": 8, "raw_tail": 64, "reserve": 4, "fill_window": False}),
            (ids[1000:1700], 30, {"k": 4, "raw_tail": 100, "reserve": 4, "fill_window": False})]


@pytest.mark.slow
def test_smollm2_matches_reference(smollm2, smollm2_checkpoint, pericles):
    model, _ = smollm2
    ids = pericles
    llm = make_llm(smollm2_checkpoint, max_model_len=model.ext.window, max_num_batched_tokens=8192)
    try:
        cases = [
            *_compressing_cases(ids),
            (ids[5000:5050], 50, {}),                              # short plain prompt
            (ids[8000:12400], 40, {}),                             # over the window: adaptive k
        ]
        assert compare_with_reference(llm, model, cases) < TOL_SMOLLM2
    finally:
        shutdown(llm)


@pytest.mark.slow
def test_smollm2_in_bf16_matches_reference_at_bf16_tolerance(smollm2, smollm2_checkpoint, pericles, monkeypatch):
    """bf16 on every machine (EXTEMB_KEEP_DTYPE: where the CPU has no native bf16 the plug-in
    would serve float32), against the float32 reference. Greedy tokens may part at a near tie;
    log-probs along vLLM's tokens are compared. The control: another text's compact slots in
    vLLM's input are far outside the tolerance, so the check can fail."""
    import torch

    model, _ = smollm2
    monkeypatch.setenv("EXTEMB_KEEP_DTYPE", "1")
    llm = make_llm(smollm2_checkpoint, max_model_len=model.ext.window, max_num_batched_tokens=8192,
                   dtype="bfloat16")
    try:
        assert llm.llm_engine.vllm_config.model_config.dtype == torch.bfloat16
        cases = _compressing_cases(pericles)
        assert compare_with_reference(llm, model, cases, same_greedy=False, mean=True) < TOL_BF16_MEAN
        ids, n, opts = cases[0]
        other = pericles[20000:20000 + len(ids) - 100] + ids[-100:]  # other compressed text, same raw part
        control = compare_with_reference(llm, model, [(ids, n, opts)], same_greedy=False, mean=True,
                                         request=lambda *_: vllm_request(other, n, **opts))
        assert control > 4 * TOL_BF16_MEAN
    finally:
        shutdown(llm)
