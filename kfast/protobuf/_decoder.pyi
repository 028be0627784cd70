from typing import Any

from kfast._batch import BaseDecoder

class ProtobufDecoderBase(BaseDecoder):
    def _load(self, plan: Any) -> None: ...
    @staticmethod
    def _struct_sizes() -> dict[str, int]: ...

def decode_framed(payloads: Any, out: Any, resolve: Any, empty: ProtobufDecoderBase) -> Any: ...
