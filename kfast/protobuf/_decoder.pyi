from typing import Any

from kfast._batch import BaseDecoder

class ProtobufDecoderBase(BaseDecoder):
    def _load(self, plan: Any) -> None: ...
    @staticmethod
    def _struct_sizes() -> dict[str, int]: ...

class FramedProtobufDecoder(BaseDecoder):
    def _resolve(
        self, schema_id: int, path_bytes: bytes
    ) -> tuple[ProtobufDecoderBase | None, str | None]: ...
    def _columns_decoder(self) -> ProtobufDecoderBase: ...
