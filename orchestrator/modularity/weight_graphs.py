"""Which weight matrices of a model are regularised, grouped by the hidden neurons they share.

An MLP's hidden neurons are the rows of its in-projections and the columns of its out-projections, so one
partition of the hidden neurons covers the whole group (`MatrixGroup`). Transformers families are found by
their MLP layout; any other model declares its groups with a `modularity_groups()` method.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from torch import Tensor, nn

MATRIX_KINDS = ("mlp_in", "mlp_out")

# (in-projection children, out-projection children) of an MLP module, by family.
MLP_LAYOUTS: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    (("c_fc",), ("c_proj",)),  # GPT-2 (Conv1D)
    (("dense_h_to_4h",), ("dense_4h_to_h",)),  # GPT-NeoX / Pythia
    (("gate_proj", "up_proj"), ("down_proj",)),  # Gemma and other gated MLPs
)


@dataclass(frozen=True)
class RegularisedMatrix:
    name: str  # module path, e.g. transformer.h.0.mlp.c_fc
    module: nn.Module
    role: Literal["in", "out"]  # in-projection (rows = hidden neurons) or out-projection (columns = hidden neurons)
    transposed: bool  # weight stored [n_in, n_out], as in transformers' Conv1D

    def weight(self) -> Tensor:
        """The weight as `[n_out, n_in]`, whatever the storage orientation."""
        return self.module.weight.T if self.transposed else self.module.weight

    @property
    def shape(self) -> tuple[int, int]:
        """`(n_out, n_in)`, also while ZeRO-3 has partitioned the weight away (the full shape is in `ds_shape`)."""
        stored = tuple(getattr(self.module.weight, "ds_shape", self.module.weight.shape))
        return stored[::-1] if self.transposed else stored


@dataclass(frozen=True)
class MatrixGroup:
    name: str  # e.g. transformer.h.0.mlp
    inputs: tuple[RegularisedMatrix, ...]
    outputs: tuple[RegularisedMatrix, ...]

    @property
    def matrices(self) -> tuple[RegularisedMatrix, ...]:
        """In-projections, then out-projections: the order partitions list their per-matrix labels in."""
        return self.inputs + self.outputs


def find_matrix_groups(model: nn.Module, matrices: Sequence[str] = MATRIX_KINDS) -> list[MatrixGroup]:
    """The model's regularised matrices by hidden-neuron group, keeping only the kinds in `matrices`
    ("mlp_in": in-projections, "mlp_out": out-projections)."""
    unknown = sorted(set(matrices) - set(MATRIX_KINDS))
    if unknown or not matrices:
        raise ValueError(f"find_matrix_groups: matrices must be a non-empty subset of {MATRIX_KINDS}, got {matrices}")
    declared = list(model.modularity_groups()) if hasattr(model, "modularity_groups") else _mlp_groups(model)
    if not declared:
        raise ValueError(
            f"find_matrix_groups: no MLP of a known layout {MLP_LAYOUTS} in {type(model).__name__} "
            f"(model_type={getattr(getattr(model, 'config', None), 'model_type', None)!r}); declare its groups with "
            f"a method {type(model).__name__}.modularity_groups() returning "
            f"[(group_name, [in-projection module names], [out-projection module names])]"
        )
    return [
        _build_group(model, name, ins if "mlp_in" in matrices else (), outs if "mlp_out" in matrices else ())
        for name, ins, outs in declared
    ]


def _mlp_groups(model: nn.Module) -> list[tuple[str, tuple[str, ...], tuple[str, ...]]]:
    """Every module whose children match one of the known MLP layouts, with full module paths."""
    groups = []
    for name, module in model.named_modules():
        children = dict(module.named_children())
        for ins, outs in MLP_LAYOUTS:
            if all(child in children for child in ins + outs):
                prefix = f"{name}." if name else ""
                groups.append((name, tuple(prefix + c for c in ins), tuple(prefix + c for c in outs)))
    return groups


def _build_group(model: nn.Module, name: str, ins: Sequence[str], outs: Sequence[str]) -> MatrixGroup:
    group = MatrixGroup(
        name, tuple(_matrix(model, path, "in") for path in ins), tuple(_matrix(model, path, "out") for path in outs)
    )
    hidden = {m.shape[0] for m in group.inputs} | {m.shape[1] for m in group.outputs}
    if len(hidden) > 1:
        shapes = {m.name: list(m.shape) for m in group.matrices}
        raise ValueError(
            f"find_matrix_groups: group {name!r} does not share one hidden size; [n_out, n_in] "
            f"shapes {shapes} (in-projection rows must equal out-projection columns)"
        )
    return group


def _matrix(model: nn.Module, path: str, role: Literal["in", "out"]) -> RegularisedMatrix:
    module = model.get_submodule(path)
    if isinstance(module, nn.Linear):
        return RegularisedMatrix(path, module, role, transposed=False)
    from transformers.pytorch_utils import Conv1D  # only models that use it pay for the import

    if isinstance(module, Conv1D):
        return RegularisedMatrix(path, module, role, transposed=True)
    raise ValueError(
        f"find_matrix_groups: {path} is a {type(module).__name__}; only nn.Linear and "
        f"transformers' Conv1D weights can be regularised"
    )
