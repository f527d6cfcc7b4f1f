"""Only what pyproject.toml cannot say: the wheel carries a start-up file at its root.

`extemb_vllm_metadata.pth` (extemb_vllm/vllm_metadata.py says why) must sit in site-packages
itself, not inside the package, for Python to run it at start-up.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

STARTUP_FILE = "extemb_vllm_metadata.pth"


class BuildPyWithStartupFile(build_py):
    def run(self):
        super().run()
        self.copy_file(str(Path("extemb_vllm") / STARTUP_FILE), str(Path(self.build_lib) / STARTUP_FILE))

    def get_outputs(self, include_bytecode=True):
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib) / STARTUP_FILE)]


setup(cmdclass={"build_py": BuildPyWithStartupFile})
