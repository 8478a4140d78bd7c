"""CUDA extensions warmed for the formats a search will run."""

from __future__ import annotations

# --------------------------------------------------------------------------------------------------
# Extension warm-up
# --------------------------------------------------------------------------------------------------


class FakeExtensionGetter:
    """Stands in for one of ModelOpt's ``get_cuda_ext*`` loaders; ``extension`` set = loaded before."""

    def __init__(self, calls: list[str], name: str, result: object, loaded: bool = False) -> None:
        self.calls, self.name, self.result = calls, name, result
        if loaded:
            self.extension = result

    def __call__(self) -> object:
        self.calls.append(self.name)
        return self.result


def test_warm_up_loads_the_extensions_the_formats_rows_name() -> None:
    from auto_quantize_model.backend.modelopt.search import warm_cuda_extensions
    from auto_quantize_model.core.formats import cuda_extensions

    calls: list[str] = []
    getters = {
        "modelopt_cuda_ext": FakeExtensionGetter(calls, "int", object(), loaded=True),
        "modelopt_cuda_ext_fp8": FakeExtensionGetter(calls, "fp8", object()),
        "modelopt_cuda_ext_mx": FakeExtensionGetter(calls, "mx", None),
    }
    # W4A8_AWQ_BETA_CFG has FP8 activations without FP8 in its name; wfp4_afp4 is NVFP4 without
    # NVFP4 in its name: the substring match of old warmed neither
    wanted = cuda_extensions(["W4A8_AWQ_BETA_CFG", "wfp4_afp4"])
    found = warm_cuda_extensions(wanted, getters, built=lambda name: name == "modelopt_cuda_ext_fp8")
    assert [(name, what) for name, what, _ in found] == [
        ("modelopt_cuda_ext", "already loaded in this process"),
        ("modelopt_cuda_ext_fp8", "prebuilt, loaded"),
        ("modelopt_cuda_ext_mx", "failed to build or load (ModelOpt falls back to slower code)"),
    ]
    assert calls == ["fp8", "mx"]
    assert warm_cuda_extensions(cuda_extensions(["wint8_aint8"]), getters) == (
        ("modelopt_cuda_ext", "already loaded in this process", 0.0),
    )
