"""Which items a job sends to every destination: the original, the derived instance, its
Parametric Map, per [model] settings and the instance's SOP class."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from dicom_node.forwarder import Item, ItemKind


@dataclass(frozen=True)
class Routing:
    """[model] enhance (as SOP Class UIDs), parametric_map and forward_original."""
    enhance_classes: frozenset[str] = frozenset()
    parametric_map: bool = False
    forward_original: bool = True

    def __post_init__(self):
        if isinstance(self.enhance_classes, str) or not isinstance(self.enhance_classes, Iterable):
            raise TypeError(f"enhance_classes must be a set of SOP Class UIDs, not {self.enhance_classes!r}")
        object.__setattr__(self, "enhance_classes", frozenset(self.enhance_classes))

    def enhances(self, sop_class_uid: str) -> bool:
        return sop_class_uid in self.enhance_classes

    def items(self, original: Item, derived: Item | None = None, maps: Item | None = None) -> list[Item]:
        """The items a job has to send: with a derived instance, it, its maps (when made), then
        the original unless forward_original is off; without one, the original as it is (also
        when the enhancement failed: an image is never held back for it)."""
        if original.kind is not ItemKind.ORIGINAL:
            raise ValueError(f"original must be an original item, not {original.kind}")
        if derived is not None:
            items = [derived]
            if self.parametric_map and maps is not None:
                items.append(maps)
            if self.forward_original:
                items.append(original)
            return items
        return [original]
