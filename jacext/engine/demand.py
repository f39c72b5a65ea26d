"""What the active extensions ask of the engine, read once from their declared contract
(:class:`jacext.extensions.JacextExtension`) when a tape opens."""

from dataclasses import dataclass, field
from typing import FrozenSet, List, Optional, Tuple

from jacext.extensions import JacextExtension, RescalingExtension, Seeds


@dataclass(frozen=True)
class Demand:
    """The extensions of one tape and what follows from their contract.

    Attributes:
        extensions: the active jacext extensions, in the order their results are kept.
        backpack: BackPACK's own module hooks are on the model (``extend(backpack=True)``);
            its hooks then need the model's ordinary backward untouched.
        rescaler: the extension that rescales the cotangent (ClipGrad), if any.
        one_cotangent: every extension needs the backward's own cotangent, unchanged: its
            cotangents can be caught as the ordinary backward passes (an inline plan).
        clipping: one rescaling extension and nothing needing other seeds: its clipped sums can
            be formed inside the ordinary backward where every call is fused.
        only_norms: seeds whose extensions all want squared norms only.
        fuses: calls get a FusedGrads node (chosen at forward time): for ClipGrad, or where the
            per-sample gradients BatchGrad materialises give the parameter gradients.
        catches: the records hook their nodes to catch cotangents in the ordinary backward.
        chunk_size: the fewest seeds any extension wants pulled back at a time (None: all).
    """

    extensions: Tuple[JacextExtension, ...]
    backpack: bool = False
    rescalers: Tuple[RescalingExtension, ...] = field(init=False)
    one_cotangent: bool = field(init=False)
    clipping: bool = field(init=False)
    only_norms: FrozenSet[Seeds] = field(init=False)
    fuses: bool = field(init=False)
    chunk_size: Optional[int] = field(init=False)

    def __post_init__(self):
        exts = self.extensions
        cotangent_only = all(e.seeds is Seeds.COTANGENT for e in exts)
        rescalers = tuple(e for e in exts if isinstance(e, RescalingExtension) and e.rescales)
        only_norms = {e.seeds for e in exts if not e.materialises} - {e.seeds for e in exts if e.materialises}
        one_cotangent = cotangent_only and not rescalers
        clipping = len(rescalers) == 1 and cotangent_only and not self.backpack
        fuses = clipping or (one_cotangent and Seeds.COTANGENT not in only_norms and not self.backpack)
        chunks = [e.chunk_size for e in exts if e.chunk_size]
        set_ = object.__setattr__
        set_(self, "rescalers", rescalers)
        set_(self, "one_cotangent", one_cotangent)
        set_(self, "clipping", clipping)
        set_(self, "only_norms", frozenset(only_norms))
        set_(self, "fuses", fuses)
        set_(self, "chunk_size", min(chunks) if chunks else None)

    @property
    def catches(self) -> bool:
        return self.one_cotangent or self.clipping

    @property
    def rescaler(self) -> Optional[RescalingExtension]:
        return self.rescalers[0] if len(self.rescalers) == 1 else None

    def seed_kinds(self) -> List[Seeds]:
        """The distinct seeds, in the order of the extensions that need them."""
        kinds: List[Seeds] = []
        for e in self.extensions:
            if e.seeds not in kinds:
                kinds.append(e.seeds)
        return kinds

    def owner(self, kind: Seeds) -> Optional[JacextExtension]:
        """The one extension that keeps the materialised result of ``kind``, or None."""
        owners = [e for e in self.extensions if e.materialises and e.seeds is kind]
        return owners[0] if len(owners) == 1 else None
