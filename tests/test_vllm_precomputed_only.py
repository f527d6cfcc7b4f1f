"""An LLM engine in precomputed-only mode (what the Ray LLM replicas run): no embedder in the
process, compact embeddings made elsewhere, the reference model's outputs all the same."""

import pytest

from .test_vllm_spine import TOL, _ids
from .vllm_helpers import compare_with_reference, make_llm, shutdown

pytestmark = pytest.mark.engine  # a real vLLM engine, Ray runtime or server process (make test-fast skips)


@pytest.fixture(scope="module")
def precomputed_llm(tiny_checkpoint):
    # a step budget below the window: the encoder cache must still hold one request's slots
    llm = make_llm(tiny_checkpoint, max_model_len=64, max_num_batched_tokens=32,
                   hf_overrides={"extemb_precomputed_only": True})
    yield llm
    shutdown(llm)


def test_no_embedder_in_the_engine(precomputed_llm):
    assert precomputed_llm.apply_model(lambda m: (m.embedder is None, any("embedder" in n for n, _ in
                                                                          m.named_parameters()))) == [(True, False)]


def test_precomputed_embeddings_give_the_reference_outputs(precomputed_llm, tiny):
    model, _ = tiny
    cases = [(_ids(200, 31), 10, {"k": 8, "reserve": 4}), (_ids(90, 32), 5, {"k": 4, "raw_tail": 8, "reserve": 4}),
             (_ids(190, 34), 4, {"k": 4, "raw_tail": 8, "reserve": 4}),  # 46 slots: more than a step's 32
             (_ids(30, 33), 30, {})]  # the last fits the window: a plain prompt, no embeddings needed
    assert compare_with_reference(precomputed_llm, model, cases, precomputed=True) < TOL


@pytest.mark.parametrize("request_", [
    {"prompt_token_ids": list(range(3, 150))},                                           # over-long plain prompt
    {"prompt_token_ids": [5, 6], "multi_modal_data": {"context": {"token_ids": list(range(3, 200))}}},
])
def test_inputs_that_need_the_embedder_are_refused_clearly(precomputed_llm, request_):
    from vllm import SamplingParams

    with pytest.raises(ValueError, match="precomputed compact embeddings only"):
        precomputed_llm.generate([request_], SamplingParams(max_tokens=2), use_tqdm=False)
    out = precomputed_llm.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(max_tokens=2), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 2  # the engine keeps serving
