"""megatron-core's GPT dataset classes, imported without running megatron/core/__init__.py.

That __init__ imports megatron-core's whole training stack (tensor_parallel, transformer, its inference code,
torch's compiler, wandb): about 1,500 more modules and two more seconds of CPU for every rank of every job,
and each module is a round of metadata lookups on a cluster's shared filesystem. The datasets package needs
only parallel_state and utils. The package module put in its place runs the real __init__ the first time
anything asks it for a name the datasets did not load, so other code that imports megatron.core still sees
the whole package.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import sys
import types
import warnings

PACKAGE = "megatron.core"


class _LazyPackage(types.ModuleType):
    def __getattr__(self, name: str):
        submodule = f"{PACKAGE}.{name}"
        if importlib.machinery.PathFinder.find_spec(submodule, self.__path__) is not None:
            return importlib.import_module(submodule)
        self.__class__ = types.ModuleType
        self.__spec__.loader.exec_module(self)
        return getattr(self, name)


def _install_lazy_package() -> None:
    import megatron

    spec = importlib.machinery.PathFinder.find_spec(PACKAGE, list(megatron.__path__))
    package = _LazyPackage(PACKAGE)
    package.__spec__, package.__file__, package.__path__ = spec, spec.origin, spec.submodule_search_locations
    package.__package__, package.__loader__ = PACKAGE, spec.loader
    sys.modules[PACKAGE] = package
    megatron.core = package


if PACKAGE not in sys.modules:
    _install_lazy_package()

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    # megatron/core/__init__.py imports parallel_state before utils: utils imports it back.
    import megatron.core.parallel_state  # noqa: F401
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

__all__ = ["BlendedMegatronDatasetBuilder", "GPTDataset", "GPTDatasetConfig"]
