"""samapi model types mapped onto the Service's models.

samapi names models by SAM architecture (`vit_h vit_l vit_b vit_t sam2_l sam2_bp sam2_s sam2_t`).
Here: `sam2_t` = every MedSAM2 checkpoint (SAM 2.1 hiera-tiny at 512 px, the only size MedSAM2
exists in), `vit_t` = LiteMedSAM (TinyViT, the embedded default). The other types (`sam3` included) have
no medical weights, so they are never available; asking for one is a 404 that names the available types.

Each available model is listed by `GET weights/` as `{"type", "name", "url"}`; the client sends that
`url` back as `checkpoint_url` to pick it. Built-in models have `local://<name>`; registered ones the
URL they were registered from (scheme, host and path only: query strings carry secrets).
"""

from __future__ import annotations

from collections.abc import Mapping

from medsam2_endpoint.base.errors import NotFound
from medsam2_endpoint.contract.samapi import SAM_TYPES
from medsam2_endpoint.core.registry import LITE_NAME
from medsam2_endpoint.core.service import ModelInfo, Service
from medsam2_endpoint.io.fetch import redact_url

FAMILY_TYPE = {"medsam2": "sam2_t", LITE_NAME: "vit_t"}  # the samapi type each model family answers as


class ModelTypes:
    """samapi types <-> registry names, over a Service's (growing) registry."""

    def __init__(self, service: Service) -> None:
        self.service = service

    def type_of(self, name: str, models: Mapping[str, ModelInfo] | None = None) -> str | None:
        info = (models or self.service.models()).get(name)
        return None if info is None else FAMILY_TYPE.get(info.family)

    def names(self, sam_type: str) -> list[str]:
        """Registry names of this type (from one snapshot), the service's default model first."""
        models = self.service.models()
        names = [n for n in models if self.type_of(n, models) == sam_type]
        return sorted(names, key=lambda n: n != self.service.default)

    def available(self) -> list[str]:
        return [t for t in SAM_TYPES if self.names(t)]

    def url_of(self, name: str) -> str:
        return self.service.weight_url(name) or f"local://{name}"

    def weights(self, sam_type: str | None) -> list[dict[str, str]]:
        types = [sam_type] if sam_type else list(SAM_TYPES)
        if sam_type and not self.names(sam_type):
            raise self._not_available(sam_type)
        return [{"type": t, "name": n, "url": self.url_of(n)} for t in types for n in self.names(t)]

    def offered(self) -> str:
        """The served types with their models, e.g. "vit_t (lite-medsam); sam2_t (MedSAM2_latest)"."""
        return "; ".join(f"{t} ({', '.join(self.names(t))})" for t in self.available()) or "none"

    def _not_available(self, sam_type: str) -> NotFound:
        return NotFound(f"type: {sam_type} is not available on this server; available types: {self.offered()}")

    def resolve(self, sam_type: str | None, checkpoint_url: str | None) -> tuple[str, str]:
        """(samapi type, registry name) for a request's type and checkpoint_url (None: the type's default)."""
        chosen = sam_type or self.type_of(self.service.default) or "vit_t"
        names = self.names(chosen)
        if not names:
            raise self._not_available(chosen)
        if not checkpoint_url:
            return chosen, names[0]
        wanted = redact_url(checkpoint_url)
        for name in names:
            if self.url_of(name) in (checkpoint_url, wanted):
                return chosen, name
        listed = ", ".join(self.url_of(n) for n in names)
        raise NotFound(
            f"checkpoint_url: {wanted} is not a registered {chosen} checkpoint; use one GET weights/ lists ({listed})"
        )
