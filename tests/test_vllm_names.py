"""Every vLLM name the plug-in relies on beyond the documented entry points still exists in the
installed vLLM (extemb_vllm/vllm_plugin/vllm_names.py): an upgrade that moves one fails here,
naming it, instead of deep inside a server."""

import importlib
import inspect

import pytest

from extemb_vllm.vllm_plugin.vllm_names import CHECKED_WITH, PRIVATE_NAMES


def test_names_were_checked_against_the_installed_vllm():
    import vllm

    assert vllm.__version__ == CHECKED_WITH, (
        f"vllm_names.py was checked against vLLM {CHECKED_WITH}, {vllm.__version__} is installed: "
        "re-check every name and update CHECKED_WITH")


@pytest.mark.parametrize("name", sorted(PRIVATE_NAMES))
def test_name_exists(name):
    module, _, path = name.partition(":")
    obj = importlib.import_module(module)
    for part in path.split("."):
        assert hasattr(obj, part), f"{name} ({PRIVATE_NAMES[name]}) is gone from vLLM"
        obj = getattr(obj, part)


def test_server_state_carries_the_vllm_config():
    """The middleware finds the served model's config at app.state.vllm_config."""
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state

    assert "state.vllm_config = vllm_config" in inspect.getsource(init_app_state)
